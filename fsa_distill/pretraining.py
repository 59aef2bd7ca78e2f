"""The pretraining recipe: data, optimizer, schedule and Trainer, with no orchestration in it.

`fsa_distill.tasks.pretrain` (the stage) wires this into the pipeline; `perf/bench_pretrain.py`
runs it on a bare GPU box (no Prefect or MLflow there). Everything a training step costs is here:

* the examples are tokenised once, before training, into an Arrow dataset on disk
  (`tokenize_to_disk`); every DataLoader worker memory-maps it, and a resumed run reads it again;
* `pretrain.optimizer`: `adamw` (torch's AdamW through the Trainer) or `adamw_scale` (the paper's
  `fsa_distill.optim.AdamWScale`, multi-tensor on CUDA);
* `pretrain.lr_schedule`: `cosine` (linear warm-up from 0, cosine to `min_learning_rate`) or
  `paper` (the paper's LinearLR + cosine, as its torch 2.1 ran it: `fsa_distill.optim`);
* `pretrain.tf32`, `pretrain.torch_compile`, `pretrain.dataloader_workers`,
  `pretrain.pad_to_multiple_of`, `pretrain.batch_rebalance`: how hard the card works (README,
  "Paper-scale pretraining");
* the loss is the token mean over the whole optimizer step (`token_mean_loss`), so 20 x 5 and
  100 x 1 give the same update;
* every log entry carries non-pad `tokens_per_second`, `model_flops_per_second` and, on a card
  whose peak is known, `mfu` (`fsa_distill.mfu`), counted on the device and read once per log.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from datasets import Dataset, disable_progress_bars, load_from_disk
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, PreTrainedTokenizerBase, Seq2SeqTrainer
from transformers.trainer_pt_utils import BatchRebalanceSampler

from fsa_distill.errors import InputError
from fsa_distill.losses import token_mean_loss
from fsa_distill.mfu import T5Flops, peak_flops
from fsa_distill.models import load_seq2seq
from fsa_distill.optim import LR_SCHEDULES, OPTIMIZERS, AdamWScale, paper_schedule

#: The student tokenizer's newline token (the same string as `fsa_distill.tasks.student.NEWLINE_TOKEN`,
#: which this module cannot import without the pipeline; a test keeps the two equal).
NEWLINE_TOKEN = "[NL]"

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
    """Tokenised training examples from the whole corpus or its `corpus_size` prefix (`corpus_rows`),
    with two length columns: `length` (source + target tokens), which `group_by_length` groups by,
    and `rebalance_length`, which `batch_rebalance` sorts by: the length of the side that holds most
    of the corpus's tokens (the targets of `distill`, the sources of `span_corruption`). Sources and
    targets are padded separately, so sorting by their sum leaves more padding: on the 500 released
    Mixtral outputs, 74.8% of 2 micro-batches' positions are real sorted by the sum, 78.2% by the target."""
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
    longer = labels if sum(map(len, labels)) >= sum(map(len, inputs)) else inputs
    return Dataset.from_dict(
        {
            "input_ids": inputs,
            "attention_mask": [[1] * len(x) for x in inputs],
            "labels": labels,
            "length": [len(x) + len(y) for x, y in zip(inputs, labels, strict=True)],
            "rebalance_length": [len(x) for x in longer],
        }
    )


LENGTH_COLUMNS = ("length", "rebalance_length")


class _DropLength(DataCollatorForSeq2Seq):
    """Seq2seq collator (-100 label padding) that ignores the length columns the samplers read."""

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> Any:
        features = [{k: v for k, v in f.items() if k not in LENGTH_COLUMNS} for f in features]
        return super().__call__(features, return_tensors)


def ensure_newline_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Add the `[NL]` token to a tokenizer that lacks it (a hub checkpoint such as t5-base), and grow
    the model's embeddings to match. The embedded student's tokenizer already has it."""
    if NEWLINE_TOKEN in tokenizer.get_vocab():
        return
    tokenizer.add_special_tokens({"additional_special_tokens": [NEWLINE_TOKEN]})
    if model is not None:
        model.resize_token_embeddings(len(tokenizer))


def load_student(folder: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The student to pretrain and its tokenizer, with the `[NL]` token."""
    model, tokenizer = load_seq2seq(folder)
    ensure_newline_token(tokenizer, model)
    return model, tokenizer


def tokenize_to_disk(objective: str, corpus: Path, tokenizer: PreTrainedTokenizerBase, cfg: Mapping[str, Any],
                     folder: Path, corpus_size: float | None = None) -> Path:  # fmt: skip
    """Tokenise the examples once into `folder` (an Arrow dataset) and return it; a complete copy
    there is reused (a resumed run). Written aside and renamed, so a killed run leaves none half done.

    Training memory-maps it (`load_from_disk`): DataLoader workers share the pages instead of
    copying Python lists, and no tokenisation happens while the card waits."""
    if (folder / "dataset_info.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    disable_progress_bars()  # the stage reports its own progress; these bars would flood its log
    build_dataset(objective, corpus, tokenizer, dict(cfg), corpus_size).save_to_disk(str(partial))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def load_tokenized(folder: Path) -> Dataset:
    """The dataset `tokenize_to_disk` wrote, memory-mapped."""
    return load_from_disk(str(folder))


def recipe_args(cfg: Mapping[str, Any], scratch: Path) -> dict[str, Any]:
    """`Seq2SeqTrainingArguments` keywords of the pretraining recipe for one process.

    The schedule named `paper` is built by `PretrainTrainer`; `lr_scheduler_type` is then unused.
    TF32 and bf16 apply on CUDA only (a CPU run trains in fp32, as it always did); TF32 from Ampere on."""
    use_cuda = torch.cuda.is_available()
    workers = int(cfg.get("dataloader_workers", 0))
    sampling = sampling_strategy(cfg)
    return dict(
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
        train_sampling_strategy=sampling,
        length_column_name="rebalance_length" if sampling == "batch_rebalance" else "length",
        save_strategy="steps",
        save_steps=cfg["save_steps"],
        save_total_limit=2,
        logging_steps=max(1, min(25, cfg["max_steps"] // 10)),
        report_to=[],
        disable_tqdm=True,
        bf16=bool(cfg["bf16"]) and use_cuda,
        tf32=True if cfg.get("tf32") and _has_tf32() else None,
        torch_compile=bool(cfg.get("torch_compile", False)),
        use_cpu=not use_cuda,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_pin_memory=use_cuda,
        remove_unused_columns=False,
    )


def sampling_strategy(cfg: Mapping[str, Any]) -> str:
    """The Trainer's `train_sampling_strategy` of the recipe: `batch_rebalance` (each step's random
    examples sorted by length into balanced micro-batches), `group_by_length` or `random`."""
    if cfg.get("batch_rebalance") and cfg.get("group_by_length"):
        raise InputError("pretrain.batch_rebalance and pretrain.group_by_length are two samplers: choose one")
    if cfg.get("batch_rebalance"):
        return "batch_rebalance"
    return "group_by_length" if cfg["group_by_length"] else "random"


def _has_tf32() -> bool:
    """TF32 matmuls exist on CUDA cards from Ampere on; elsewhere `pretrain.tf32` is a no-op (the
    Trainer would refuse the argument)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


class PretrainTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer with the recipe's schedule, and throughput counted on the device.

    Each training micro-batch adds its non-pad tokens and model FLOPs (`fsa_distill.mfu`) to two
    device tensors; a log entry reads them once and reports `tokens_per_second`,
    `model_flops_per_second` and `mfu` (on a known card) for the steps since the previous entry
    (under DDP, the sums over the ranks, and `mfu` against the peak of all their cards). `mfu` goes
    to the callbacks (progress, live metrics) but not into the log history, which is content: it is
    `model_flops_per_second` over the card's peak. A student that is not a T5 gets tokens/s only."""

    def __init__(self, *args: Any, recipe: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        if recipe.get("optimizer", "adamw") == "adamw_scale":
            # read by Trainer.create_optimizer, which still builds the decay / no-decay groups
            self.optimizer_cls_and_kwargs = (AdamWScale, {"lr": recipe["learning_rate"]})
        self._flops_of = T5Flops.of(self.model)
        self._tokens: torch.Tensor | None = None
        self._flops: torch.Tensor | None = None
        self._since: float | None = None
        self._rebalance: BatchRebalanceSampler | None = None

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.recipe.get("lr_schedule", "cosine") != "paper" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = paper_schedule(
            optimizer if optimizer is not None else self.optimizer,
            max_steps=num_training_steps,
            warmup_steps=self.args.get_warmup_steps(num_training_steps),
            min_lr=self.recipe["min_learning_rate"],
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        columns = getattr(dataset, "column_names", None) or []
        if self.args.train_sampling_strategy == "batch_rebalance" and self.args.length_column_name not in columns:
            # transformers would quietly sort by the length of input_ids alone (after a pass over them)
            raise InputError(f"pretrain.batch_rebalance: the tokenised examples have no "
                             f"{self.args.length_column_name!r} column (built by build_dataset)")  # fmt: skip
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, BatchRebalanceSampler):
            # transformers 5.24 leaves it at its own seed 42 whatever the run's seed: every run would
            # see the same batches in the same order
            sampler.seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self._rebalance = sampler
        return sampler

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # The Trainer tells the sampler its epoch one wrapper down (transformers 5.24, accelerate
        # 1.15); a DDP run resumed mid-epoch wraps it twice (skipped batches around the rank
        # shard), so it would replay epoch 0's order for the rest of that epoch.
        if self._rebalance is not None:
            self._rebalance.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:  # fmt: skip
        if model.training:
            self._count(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _count(self, inputs: Mapping[str, Any]) -> None:
        enc, dec = inputs["attention_mask"].sum(1), inputs["labels"].ne(-100).sum(1)
        tokens = enc.sum() + dec.sum()
        flops = self._flops_of.batch(enc, dec) if self._flops_of is not None else tokens.new_zeros(())
        if self._since is None:
            self._since = time.perf_counter()
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        self._flops = flops if self._flops is None else self._flops + flops

    def throughput(self) -> dict[str, float]:
        """Rates since the last call (or the first batch), and zero the counters."""
        if self._tokens is None or self._flops is None or self._since is None:
            return {}
        now = time.perf_counter()
        seconds, world = max(now - self._since, 1e-9), self.args.world_size
        counts = torch.stack([self._tokens.double(), self._flops.double()])
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank logs at the same step (the Trainer gathers the loss there too): one small
            # all-reduce per log entry sums what each rank really trained on, which differs between
            # ranks (random lengths; batch_rebalance evens the cost, not the token count)
            torch.distributed.all_reduce(counts)
        tokens, flops = counts.tolist()
        self._tokens = self._flops = None
        self._since = now
        out = {"tokens_per_second": tokens / seconds}
        if self._flops_of is None:
            return out
        out["model_flops_per_second"] = flops / seconds
        precision = "bf16" if self.args.bf16 else "tf32" if self.args.tf32 else "fp32"
        peak = peak_flops(self.args.device, precision)
        if peak:
            out["mfu"] = flops / seconds / (peak * world)
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        rates = self.throughput() if "loss" in logs else {}
        super().log({**logs, **rates}, start_time)
        if "mfu" in rates and self.state.log_history:
            self.state.log_history[-1].pop("mfu", None)


def make_trainer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset,
                 cfg: Mapping[str, Any], args: Any) -> PretrainTrainer:  # fmt: skip
    """The Trainer of the recipe `cfg` (the `pretrain` config) with arguments `args`."""
    optimizer = cfg.get("optimizer", "adamw")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"pretrain.optimizer={optimizer!r} is not one of {OPTIMIZERS}")
    if cfg.get("lr_schedule", "cosine") not in LR_SCHEDULES:
        raise InputError(f"pretrain.lr_schedule={cfg.get('lr_schedule')!r} is not one of {LR_SCHEDULES}")
    collator = _DropLength(tokenizer, model=model, label_pad_token_id=-100,
                           pad_to_multiple_of=cfg.get("pad_to_multiple_of"))  # fmt: skip
    return PretrainTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        compute_loss_func=token_mean_loss,
        recipe=cfg,
    )
