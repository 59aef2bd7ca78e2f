"""Stage `pretrain`: continue training the student before fine-tuning.

Two objectives on the same reviews:

* `distill` (the paper's method): input = the raw review, no prefix; target = the teacher's
  analysis or rewrite with newlines as the added `[NL]` token.
* `span_corruption` (control arm, no teacher): T5's span corruption of the review text itself,
  which separates what the teacher adds from what in-domain text adds.

Seq2SeqTrainer with a cosine schedule decaying to `min_learning_rate`, gradient clipping and
batches grouped by length (see perf/bench_pretrain.py). Checkpoints go to a scratch folder,
so a killed run resumes from the last one.

`distill.corpus_size` pretrains both arms on a prefix of the cleaned corpus (`corpus_rows`): the
rows in one fixed shuffled order, drawn with the constant `CORPUS_ORDER_SEED` (not `pretrain.seed`,
so every pretraining seed sees the same rows), first N rows (a whole number > 1) or the first
ceil(fraction x total) (0 < fraction <= 1). Prefixes are nested: 50 pairs are among the 100. The
subset is taken here, so generation and cleaning are reused across sizes.

Progress (steps, loss, lr, ETA) goes to the `fsa_distill.progress` log and the curves to the
stage's observer while it trains; `measured/log_times.json` keeps when each history entry was made.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from fsa_distill.tasks.student import NEWLINE_TOKEN
from transformers import DataCollatorForSeq2Seq, PrinterCallback, Seq2SeqTrainer, Seq2SeqTrainingArguments

from fsa_distill.artifacts import Artifact
from fsa_distill.ddp import (
    distributed,
    per_device_batch,
    relay_callbacks,
    token_mean_loss,
    train_stage,
    training_arguments,
    training_stage,
)
from fsa_distill.errors import InputError
from fsa_distill.models import TRAIN_LOCK, last_checkpoint, load_seq2seq, write_log
from fsa_distill.progress import ProgressCallback, write_log_times

OBJECTIVES = ("distill", "span_corruption")
#: Seed of the one fixed shuffled order of the cleaned corpus whose prefixes `distill.corpus_size` takes.
CORPUS_ORDER_SEED = 0


def corpus_rows(total: int, size: float | None) -> list[int] | None:
    """Row indices (ascending) of the corpus prefix for `size`, or None for the whole corpus.

    The rows are put in one fixed shuffled order (`CORPUS_ORDER_SEED`); `size` > 1 (a whole number)
    keeps that many of them (all when the corpus is smaller), 0 < size <= 1 keeps ceil(size x total),
    at least 1.
    """
    if size is None:
        return None
    count = int(size) if size > 1 else max(1, math.ceil(size * total - 1e-9))
    if count >= total:
        return None
    order = np.random.default_rng(CORPUS_ORDER_SEED).permutation(total)
    return sorted(int(i) for i in order[:count])


def _read_corpus(corpus: Path, columns: list[str], size: float | None) -> Any:
    table = pq.read_table(corpus, columns=columns)
    rows = corpus_rows(table.num_rows, size)
    return table if rows is None else table.take(rows)


def distill_pairs(corpus: Path, size: float | None = None) -> tuple[list[str], list[str]]:
    """(review, teacher output with [NL] for newlines) for every cleaned corpus row (of the `size` prefix)."""
    table = _read_corpus(corpus, ["review", "output"], size)
    reviews = table.column("review").to_pylist()
    return reviews, [newline_tokens(t) for t in table.column("output").to_pylist()]


def newline_tokens(text: str) -> str:
    """Teacher text with each newline as the `[NL]` token, so the student can emit line structure."""
    return f" {NEWLINE_TOKEN} ".join(line.strip() for line in text.strip().split("\n"))


def unique_reviews(corpus: Path, size: float | None = None) -> list[str]:
    """The distinct review texts of the corpus (of its `size` prefix), in first-seen order: the
    span-corruption arm's data."""
    seen: dict[str, None] = {}
    for text in _read_corpus(corpus, ["review"], size).column("review").to_pylist():
        seen.setdefault(text, None)
    return list(seen)


def random_spans_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """T5's noise mask: about `density` of the tokens in spans of mean length `mean_span`."""
    num_noise = round(length * density)
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(1, round(num_noise / mean_span))
    num_spans = min(num_spans, num_noise, length - num_noise)

    def partition(total: int, parts: int) -> np.ndarray:
        cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.array([], int)
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise, keep = partition(num_noise, num_spans), partition(length - num_noise, num_spans)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for k, n in zip(keep, noise, strict=True):
        pos += k
        mask[pos : pos + n] = True
        pos += n
    return mask


def span_corrupt(ids: list[int], sentinels: list[int], eos: int, density: float, mean_span: float,
                 rng: np.random.Generator) -> tuple[list[int], list[int]]:  # fmt: skip
    """(input, target) ids: noise spans replaced by sentinels in the input, spelled out in the target."""
    if len(ids) < 2:
        return [*ids, eos], [sentinels[0], eos]
    mask = random_spans_mask(len(ids), density, mean_span, rng)
    source: list[int] = []
    target: list[int] = []
    span = -1
    for i, token in enumerate(ids):
        if mask[i]:
            if i == 0 or not mask[i - 1]:
                span += 1
                sentinel = sentinels[min(span, len(sentinels) - 1)]
                source.append(sentinel)
                target.append(sentinel)
            target.append(token)
        else:
            source.append(token)
    target.append(sentinels[min(span + 1, len(sentinels) - 1)])
    return [*source, eos], [*target, eos]


def build_dataset(objective: str, corpus: Path, tokenizer: Any, cfg: dict[str, Any],
                  corpus_size: float | None = None) -> Dataset:  # fmt: skip
    """Tokenised training examples with a `length` column (source + target tokens) for grouping,
    from the whole corpus or its `corpus_size` prefix (`corpus_rows`)."""
    if objective == "distill":
        sources, targets = distill_pairs(corpus, corpus_size)
        enc = tokenizer(sources, truncation=True, max_length=cfg["max_source_length"])
        lab = tokenizer(text_target=targets, truncation=True, max_length=cfg["max_target_length"])
        inputs, labels = enc["input_ids"], lab["input_ids"]
    elif objective == "span_corruption":
        sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
        if tokenizer.unk_token_id in sentinels:
            raise InputError("span_corruption needs <extra_id_N> sentinel tokens in the student's tokenizer")
        rng = np.random.default_rng(cfg["seed"])
        texts = unique_reviews(corpus, corpus_size)
        ids = tokenizer(texts, truncation=True, max_length=cfg["max_source_length"] - 1, add_special_tokens=False)
        pairs = [
            span_corrupt(x, sentinels, tokenizer.eos_token_id, cfg["noise_density"], cfg["mean_span_length"], rng)
            for x in ids["input_ids"]
        ]
        inputs = [p[0] for p in pairs]
        labels = [p[1][: cfg["max_target_length"]] for p in pairs]
    else:
        raise InputError(f"pretrain objective {objective!r} is not one of {OBJECTIVES}")
    if not inputs:
        raise InputError(f"{corpus}: the corpus is empty; nothing to pretrain on")
    return Dataset.from_dict(
        {
            "input_ids": inputs,
            "attention_mask": [[1] * len(x) for x in inputs],
            "labels": labels,
            "length": [len(x) + len(y) for x, y in zip(inputs, labels, strict=True)],
        }
    )


def training_args(
    scratch: Path, cfg: dict[str, Any], trainer: dict[str, Any] | None = None
) -> Seq2SeqTrainingArguments:
    """The paper's optimiser settings (AdamW, cosine to a floor, clipping) from the pretrain config;
    with a `trainer` (one rank of a distributed run), its share of the global batch and its backend."""
    use_cuda = torch.cuda.is_available()
    args: dict[str, Any] = dict(
        output_dir=str(scratch),
        seed=cfg["seed"],
        max_steps=cfg["max_steps"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": cfg["min_learning_rate"]},
        warmup_steps=cfg["warmup_steps"],
        weight_decay=cfg["weight_decay"],
        optim="adamw_torch",
        max_grad_norm=cfg["max_grad_norm"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        train_sampling_strategy="group_by_length" if cfg["group_by_length"] else "random",
        length_column_name="length",
        save_strategy="steps",
        save_steps=cfg["save_steps"],
        save_total_limit=2,
        logging_steps=max(1, min(25, cfg["max_steps"] // 10)),
        report_to=[],
        disable_tqdm=True,
        bf16=bool(cfg["bf16"]) and use_cuda,
        use_cpu=not use_cuda,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    if trainer is not None:
        args["per_device_train_batch_size"] = per_device_batch(cfg["batch_size"], trainer, "pretrain.batch_size")
        args.update(training_arguments(trainer))
    return Seq2SeqTrainingArguments(**args)


class _DropLength(DataCollatorForSeq2Seq):
    """Seq2seq collator (-100 label padding) that ignores the `length` column used for grouping."""

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> Any:
        return super().__call__([{k: v for k, v in f.items() if k != "length"} for f in features], return_tensors)


@training_stage("pretrain", resumable=True, unkeyed=("pretrain.save_steps",))
def pretrain(out: Path, *, scratch: Path, student: Artifact, corpus: Artifact, objective: str,
             pretrain: dict[str, Any], corpus_size: float | None = None,
             trainer: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Pretrain `student` with `objective` on the cleaned corpus (or its `corpus_size` prefix); write the
    model and `pretrain_log.json`. With a `trainer` (devices x nodes > 1), data-parallel in torchrun
    ranks (`fsa_distill.ddp`); without, in this process."""
    job = {"out": str(out), "scratch": str(scratch), "student": student.path, "corpus": corpus.path,
           "objective": objective, "cfg": pretrain, "corpus_size": corpus_size,
           "resume": last_checkpoint(scratch)}  # fmt: skip
    train_stage("pretrain", train, job, trainer, scratch)


def train(out: str, scratch: str, student: str, corpus: str, objective: str, cfg: dict[str, Any],
          corpus_size: float | None, resume: str | None, trainer: dict[str, Any] | None = None) -> None:  # fmt: skip
    """The training itself, in the stage's process or on every rank of a distributed run (`trainer`):
    only global rank 0 writes `out` (the Trainer saves checkpoints from rank 0 only)."""
    model, tokenizer = load_seq2seq(student)
    if NEWLINE_TOKEN not in tokenizer.get_vocab():  # a hub checkpoint such as t5-base
        tokenizer.add_special_tokens({"additional_special_tokens": [NEWLINE_TOKEN]})
        model.resize_token_embeddings(len(tokenizer))
    dataset = build_dataset(objective, Path(corpus) / "corpus.parquet", tokenizer, cfg, corpus_size)
    with TRAIN_LOCK:
        hf = Seq2SeqTrainer(
            model=model,
            args=training_args(Path(scratch), cfg, trainer),
            train_dataset=dataset,
            data_collator=_DropLength(tokenizer, model=model, label_pad_token_id=-100),
            processing_class=tokenizer,
            compute_loss_func=token_mean_loss,
        )
        # progress lines and live metrics instead of the raw dicts PrinterCallback prints (disable_tqdm)
        hf.remove_callback(PrinterCallback)
        progress = ProgressCallback("pretrain")
        for callback in (progress, *relay_callbacks()) if hf.is_world_process_zero() else ():
            hf.add_callback(callback)
        hf.train(resume_from_checkpoint=resume)
        if not hf.is_world_process_zero():
            return
        hf.save_model(out)
    tokenizer.save_pretrained(out)
    (Path(out) / "training_args.bin").unlink(missing_ok=True)
    stats = {
        "objective": objective,
        "corpus_size": corpus_size,
        "examples": len(dataset),
        "tokens": int(sum(dataset["length"])),
        "resumed_from": Path(resume).name if resume else None,
        "device": hf.args.device.type,
        "bf16": bool(hf.args.bf16),
        "train_runtime_s": hf.state.log_history[-1].get("train_runtime") if hf.state.log_history else None,
    }
    if trainer is not None:  # an in-process run's log stays as it was
        stats["world_size"] = hf.args.world_size
        stats["backend"] = hf.args.ddp_backend
    write_log(Path(out), "pretrain_log.json", {"stats": stats, "history": hf.state.log_history})
    write_log_times(Path(out), progress.times(hf.state.log_history))


#: Settings that only one objective reads: the other arm's key leaves them out.
OBJECTIVE_ONLY = {"span_corruption": ("noise_density", "mean_span_length")}


@pretrain.configure
def params(cfg: dict[str, Any], *, student: Artifact, corpus: Artifact, objective: str) -> dict[str, Any]:
    """One arm's recipe: the list of objectives and the other arms' settings are not part of it,
    so adding or dropping an arm, or tuning span corruption, never retrains the distill arm.
    `corpus_size` is keyed only when it takes a proper prefix: None, 1.0 and a count at or above the
    corpus's rows all pretrain on the whole corpus and keep the key it had before the setting existed."""
    foreign = {k for other, keys in OBJECTIVE_ONLY.items() if other != objective for k in keys}
    recipe = {k: v for k, v in cfg["pretrain"].items() if k != "objectives" and k not in foreign}
    out = {"student": student, "corpus": corpus, "objective": objective, "pretrain": recipe}
    size = cfg.get("distill", {}).get("corpus_size")
    if size is not None and size != 1 and not (size > 1 and size >= _corpus_total(corpus)):
        out["corpus_size"] = size
    trainer = distributed(cfg)
    if trainer is not None:  # keyed by its world size only (`fsa_distill.ddp.TrainingStage`)
        out["trainer"] = trainer
    return out


def _corpus_total(corpus: Artifact) -> float:
    """Rows of the cleaned corpus (from the Parquet footer), or infinity when it cannot be read."""
    path = Path(corpus.path) / "corpus.parquet"
    return pq.ParquetFile(path).metadata.num_rows if path.is_file() else math.inf
