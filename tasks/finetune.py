"""Stage `finetune`: Seq2SeqTrainer on one dataset's train split; the best dev-F1 epoch is kept.

Dev F1 is computed from generated sequences with the benchmark's own parser and scorer, as the
paper selects checkpoints. Checkpoints go to a scratch folder, so a killed run resumes from the
last one; labels are padded with -100 so padding never enters the loss.

`finetune.train_fraction` < 1 trains on a nested subset of the train split (`train_subset`): the
first ceil(fraction x n) rows of one fixed permutation drawn with `finetune.subset_seed` (not the
training seed), so every seed of a fraction sees the same rows and the 5% subset contains the 1%
one. Dev and test are never subsampled.

Progress (steps, loss, lr, ETA) goes to the `fsa_distill.progress` log and the curves to the
stage's observer while it trains; `measured/log_times.json` keeps when each log entry was made.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from fsa_distill.benchmark.protocol import micro_prf, parse_pairs
from fsa_distill.tasks.acquire import read_meta
from transformers import (
    DataCollatorForSeq2Seq,
    PrinterCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from fsa_distill.artifacts import Artifact
from fsa_distill.ddp import (
    distributed,
    per_device_batch,
    relay_callbacks,
    train_stage,
    training_arguments,
    training_stage,
)
from fsa_distill.losses import token_mean_loss
from fsa_distill.models import TRAIN_LOCK, last_checkpoint, load_seq2seq, write_log
from fsa_distill.progress import ProgressCallback, write_log_times


def _tokenize(tokenizer: Any, rows: list[dict[str, Any]], ft: dict[str, Any]) -> Dataset:
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=ft["max_source_length"])
    labels = tokenizer(text_target=[r["target"] for r in rows], truncation=True, max_length=ft["max_target_length"])
    return Dataset.from_dict(
        {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels["input_ids"],
        }
    )


def train_subset(n: int, fraction: float, seed: int) -> list[int]:
    """Indices (ascending) of the nested train subset: the first ceil(fraction x n) (at least 1) of a
    fixed permutation of range(n) drawn with `seed`. All of range(n) when fraction >= 1."""
    if fraction >= 1 or n == 0:
        return list(range(n))
    size = min(n, max(1, math.ceil(fraction * n - 1e-9)))  # 1e-9: 0.1 x 30 is 3.0000000000000004
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[:size])


class DevOrderError(RuntimeError):
    """The dev predictions the Trainer returned do not line up with the dev rows."""


def check_dev_order(label_ids: Any, dev_labels: list[list[int]], pad_id: int | None) -> None:
    """Raise unless the first len(dev_labels) gold label rows the Trainer returned are the dev rows'
    targets, in order (padded with -100 and, up to the generation length, with `pad_id`).

    Under DDP, Seq2SeqTrainer gathers every rank's dev batches with `accelerator.gather`, not
    `gather_for_metrics`: each step's batches come back in rank order (the dev rows' own order), and
    the last rank's shard is evened out with rows repeated from the start, which come back after all
    the real rows. `dev_f1_metric` keeps the first len(dev_labels) rows; this check proves that they
    are the dev rows, so predictions (gathered with the labels) are zipped with the right rows.
    """

    def bare(row: Any) -> list[int]:
        ids = [int(t) for t in row if t != -100]
        while ids and ids[-1] == pad_id:
            ids.pop()
        return ids

    label_ids = label_ids[0] if isinstance(label_ids, tuple) else label_ids
    if label_ids is None or len(label_ids) < len(dev_labels):
        got = "none" if label_ids is None else len(label_ids)
        raise DevOrderError(f"dev evaluation returned {got} label rows for {len(dev_labels)} dev rows")
    for i, want in enumerate(dev_labels):
        if bare(label_ids[i]) != bare(want):
            raise DevOrderError(f"dev evaluation row {i} is not dev row {i}: predictions would be scored out of order")


def dev_f1_metric(
    task: str, tokenizer: Any, dev_rows: list[dict[str, Any]], dev_labels: list[list[int]] | None = None
) -> Any:
    """compute_metrics for the Trainer: decode generated ids, parse, micro-F1 against the gold targets.

    With `dev_labels` (the dev rows' tokenized targets), the order of what the Trainer returned is
    checked first (`check_dev_order`); rows past the dev set (DDP's even shards) are dropped."""
    gold = [parse_pairs(task, r["target"], r["sentence"]) for r in dev_rows]

    def compute(eval_pred: Any) -> dict[str, float]:
        if dev_labels is not None:
            check_dev_order(eval_pred.label_ids, dev_labels, tokenizer.pad_token_id)
        preds = eval_pred.predictions
        preds = preds[0] if isinstance(preds, tuple) else preds
        preds = preds[: len(dev_rows)]  # under DDP, rows past the dev set repeat its first ones
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        texts = tokenizer.batch_decode(preds, skip_special_tokens=True)
        pred = [parse_pairs(task, t.strip(), r["sentence"]) for t, r in zip(texts, dev_rows, strict=True)]
        return micro_prf(gold, pred)

    return compute


@training_stage("finetune", resumable=True)
def finetune(
    out: Path,
    *,
    scratch: Path,
    data: Artifact,
    student: Artifact,
    seed: int,
    finetune: dict[str, Any],
    generation: dict[str, Any],
    trainer: dict[str, Any] | None = None,
) -> None:
    """Fine-tune `student` on `data` with `seed`; write the best model, `train_log.json`, `dev_metrics.json`.
    With a `trainer` (devices x nodes > 1), data-parallel in torchrun ranks (`fsa_distill.ddp`)."""
    job = {"out": str(out), "scratch": str(scratch), "data": data.path, "student": student.path, "seed": seed,
           "ft": finetune, "generation": generation, "resume": last_checkpoint(scratch)}  # fmt: skip
    train_stage("finetune", train, job, trainer, scratch)


def train(out: str, scratch: str, data: str, student: str, seed: int, ft: dict[str, Any],
          generation: dict[str, Any], resume: str | None, trainer: dict[str, Any] | None = None) -> None:  # fmt: skip
    """The fine-tuning itself, in the stage's process or on every rank of a distributed run (`trainer`)."""
    task = read_meta(data)["task"]
    model, tokenizer = load_seq2seq(student)
    # Dev decoding is passed to the Trainer as `generation_max_length` (decoder start + new tokens):
    # with `max_new_tokens` on the model's generation config, Seq2SeqTrainer restores the default
    # `max_length` after the first batch and every later batch warned that both were set.
    model.generation_config.max_new_tokens = None
    model.generation_config.num_beams = generation["num_beams"]
    model.generation_config.do_sample = False

    train_rows = pq.read_table(Path(data) / "train.parquet").to_pylist()
    keep = train_subset(len(train_rows), ft.get("train_fraction", 1.0), ft.get("subset_seed", 0))
    train_rows = [train_rows[i] for i in keep]
    dev_rows = pq.read_table(Path(data) / "dev.parquet").to_pylist()
    # Longest first: generation over similar lengths wastes less compute on padding.
    dev_rows.sort(key=lambda r: -len(r["sentence"]))
    with TRAIN_LOCK:
        _train(Path(out), Path(scratch), model, tokenizer, ft, seed, task, train_rows, dev_rows, generation, resume,
               trainer)  # fmt: skip


def _train(out: Path, scratch: Path, model: Any, tokenizer: Any, ft: dict[str, Any], seed: int, task: str,
           train_rows: list[dict[str, Any]], dev_rows: list[dict[str, Any]],
           generation: dict[str, Any], resume: str | None, trainer: dict[str, Any] | None) -> None:  # fmt: skip
    use_cuda = torch.cuda.is_available()
    world = 1 if trainer is None else trainer["world_size"]
    args = Seq2SeqTrainingArguments(
        generation_max_length=generation["max_new_tokens"] + 1,
        generation_num_beams=generation["num_beams"],
        output_dir=str(scratch),
        seed=seed,
        data_seed=seed,
        learning_rate=ft["learning_rate"],
        num_train_epochs=ft["epochs"],
        # the configured batch is the global one: each rank takes its share
        per_device_train_batch_size=per_device_batch(ft["batch_size"], trainer, "finetune.batch_size"),
        per_device_eval_batch_size=-(-ft["eval_batch_size"] // world),
        weight_decay=ft["weight_decay"],
        lr_scheduler_type=ft["lr_scheduler"],
        # transformers 5: a float below 1 is a fraction of the total steps.
        warmup_steps=float(ft["warmup_ratio"]) if ft["warmup_ratio"] else 0,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="f1",
        greater_is_better=True,
        predict_with_generate=True,
        logging_strategy="steps",
        # at least one loss point per epoch, however small the shrunk run
        logging_steps=max(1, min(10, len(train_rows) // ft["batch_size"])),
        report_to=[],
        disable_tqdm=True,
        bf16=bool(ft["bf16"]) and use_cuda,
        dataloader_num_workers=0,
        # a rank of a distributed run: its backend (gloo trains on the CPU even where CUDA is)
        **{"use_cpu": not use_cuda, **training_arguments(trainer)},
    )
    dev = _tokenize(tokenizer, dev_rows, ft)
    # Under DDP every rank generates for its shard of the dev rows and the Trainer gathers them (in
    # order, then the even-shard padding); the gathered gold labels are checked against the dev rows
    # before F1 is computed on the first len(dev_rows) predictions.
    hf = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=_tokenize(tokenizer, train_rows, ft),
        eval_dataset=dev,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        compute_metrics=dev_f1_metric(task, tokenizer, dev_rows, dev["labels"]),
        compute_loss_func=token_mean_loss,
    )
    # progress lines and live metrics instead of the raw dicts PrinterCallback prints (disable_tqdm)
    hf.remove_callback(PrinterCallback)
    progress = ProgressCallback("finetune")
    for callback in (progress, *relay_callbacks()) if hf.is_world_process_zero() else ():
        hf.add_callback(callback)
    hf.train(resume_from_checkpoint=resume)
    if not hf.is_world_process_zero():  # only rank 0 writes the stage's files
        return
    hf.save_model(str(out))
    tokenizer.save_pretrained(out)
    history = hf.state.log_history
    evals = [h for h in history if "eval_f1" in h]
    best = max(evals, key=lambda h: h["eval_f1"]) if evals else {}
    write_log(out, "train_log.json", history)
    write_log_times(out, progress.times(history))
    dev_metrics = {
        "f1": best.get("eval_f1"),
        "precision": best.get("eval_precision"),
        "recall": best.get("eval_recall"),
        "best_epoch": best.get("epoch"),
        "best_checkpoint": Path(hf.state.best_model_checkpoint or "").name,
        "resumed_from": Path(resume).name if resume else None,
        "device": hf.args.device.type,
        "bf16": bool(hf.args.bf16),
    }
    if trainer is not None:  # an in-process run's metrics stay as they were
        dev_metrics.update(world_size=hf.args.world_size, backend=hf.args.ddp_backend)
    write_log(out, "dev_metrics.json", dev_metrics)
    for name in ("training_args.bin",):
        (out / name).unlink(missing_ok=True)


@finetune.configure
def params(cfg: dict[str, Any], *, data: Artifact, student: Artifact, seed: int) -> dict[str, Any]:
    """The recipe without the seed list (one run per seed) and the decoding used for dev selection.

    The subset settings are keyed only when a subset is drawn (`train_fraction` < 1), so the full
    train split keeps the key it had before they existed and `subset_seed` alone never re-keys it."""
    recipe = {k: v for k, v in cfg["finetune"].items() if k not in ("seeds", "seed", "train_fraction", "subset_seed")}
    fraction = cfg["finetune"].get("train_fraction", 1.0)
    if fraction < 1:
        recipe["train_fraction"] = fraction
        recipe["subset_seed"] = cfg["finetune"].get("subset_seed", 0)
    generation = {k: cfg["evaluate"][k] for k in ("max_new_tokens", "num_beams")}
    out = {"data": data, "student": student, "seed": seed, "finetune": recipe, "generation": generation}
    trainer = distributed(cfg)
    if trainer is not None:  # keyed by its world size only (`fsa_distill.ddp.TrainingStage`)
        out["trainer"] = trainer
    return out
