"""Stage `pretrain`: continue training the student before fine-tuning.

Two objectives on the same reviews:

* `distill` (the paper's method): input = the raw review, no prefix; target = the teacher's
  analysis or rewrite with newlines as the added `[NL]` token.
* `span_corruption` (control arm, no teacher): T5's span corruption of the review text itself,
  which separates what the teacher adds from what in-domain text adds.

The recipe (data, optimizer, schedule, Trainer) is `fsa_distill.pretraining`; this module wires it
into a stage. The examples are tokenised once into the scratch folder, and checkpoints go there too,
so a killed run resumes from the last one without tokenising again.

`distill.corpus_size` pretrains both arms on a prefix of the cleaned corpus (`fsa_distill.pretraining.corpus_rows`): the
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

import pyarrow.parquet as pq
from transformers import AutoTokenizer, PrinterCallback, Seq2SeqTrainingArguments

from fsa_distill.artifacts import Artifact
from fsa_distill.ddp import (
    distributed,
    per_device_batch,
    relay_callbacks,
    train_stage,
    training_arguments,
    training_stage,
)
from fsa_distill.models import MODEL_LOCK, TRAIN_LOCK, last_checkpoint, write_log
from fsa_distill.pretraining import (
    ensure_newline_token,
    load_student,
    load_tokenized,
    make_trainer,
    recipe_args,
    tokenize_to_disk,
)
from fsa_distill.progress import ProgressCallback, write_log_times


def training_args(
    scratch: Path, cfg: dict[str, Any], trainer: dict[str, Any] | None = None
) -> Seq2SeqTrainingArguments:
    """The recipe's arguments (`fsa_distill.pretraining.recipe_args`); with a `trainer` (one rank of a
    distributed run), its share of the global batch and its backend."""
    args = recipe_args(cfg, scratch)
    if trainer is not None:
        args["per_device_train_batch_size"] = per_device_batch(cfg["batch_size"], trainer, "pretrain.batch_size")
        args.update(training_arguments(trainer))
        if args.get("use_cpu"):
            args["tf32"] = None
    return Seq2SeqTrainingArguments(**args)


@training_stage("pretrain", resumable=True, unkeyed=("pretrain.save_steps",))
def pretrain(out: Path, *, scratch: Path, student: Artifact, corpus: Artifact, objective: str,
             pretrain: dict[str, Any], corpus_size: float | None = None,
             trainer: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Pretrain `student` with `objective` on the cleaned corpus (or its `corpus_size` prefix); write the
    model and `pretrain_log.json`. With a `trainer` (devices x nodes > 1), data-parallel in torchrun
    ranks (`fsa_distill.ddp`); without, in this process."""
    with MODEL_LOCK:  # tokenised once here, before any rank starts (the tokenizer alone: no weights)
        tokenizer = AutoTokenizer.from_pretrained(student.path)
    ensure_newline_token(tokenizer)
    data = tokenize_to_disk(objective, Path(corpus.path) / "corpus.parquet", tokenizer, pretrain,
                            Path(scratch) / "tokenized", corpus_size)  # fmt: skip
    job = {"out": str(out), "scratch": str(scratch), "student": student.path, "data": str(data),
           "objective": objective, "cfg": pretrain, "corpus_size": corpus_size,
           "resume": last_checkpoint(scratch)}  # fmt: skip
    train_stage("pretrain", train, job, trainer, scratch)


def train(out: str, scratch: str, student: str, data: str, objective: str, cfg: dict[str, Any],
          corpus_size: float | None, resume: str | None, trainer: dict[str, Any] | None = None) -> None:  # fmt: skip
    """The training itself, in the stage's process or on every rank of a distributed run (`trainer`),
    on the examples tokenised to `data`: only global rank 0 writes `out` (the Trainer saves
    checkpoints from rank 0 only)."""
    model, tokenizer = load_student(student)
    dataset = load_tokenized(Path(data))
    with TRAIN_LOCK:
        hf = make_trainer(model, tokenizer, dataset, cfg, training_args(Path(scratch), cfg, trainer))
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
