"""Pretraining step cost: today's `experiment=paper` configuration against the tuned one, in one process.

    python -m perf.bench_pretrain_recipe                       # CPU: the embedded student
    python -m perf.bench_pretrain_recipe --model t5-base --student DIR --corpus DIR   # a CUDA card

Both arms train the same randomly initialised model (seed 0) on the same examples (the paper's 500
released Mixtral outputs, review -> teacher text) through the pretraining stage's own Trainer
(`fsa_distill.pretraining.make_trainer`), for `--warmup` updates and then `--steps` timed ones:

* `today`: the recipe `experiment=paper` had before: 20 x 5 accumulated micro-batches, torch AdamW,
  the cosine schedule, bf16 autocast, no TF32, no compile, collation in the training process;
* `tuned`: one micro-batch of 100, AdamWScale (multi-tensor) with the paper's schedule, bf16 with
  TF32 matmuls, the tokenised data memory-mapped and collated by 4 DataLoader workers;
* `paper`: the paper's optimizer and schedule run the paper's way (20 x 5, no TF32, no workers):
  `tuned` must reach its loss (within bf16/TF32 rounding), at a higher rate;
* `compile`, `pad64`: `tuned` with `torch.compile`, or with lengths padded to multiples of 64;
* `grouped`: `compile` with length-grouped batches (less padding, a different batch order);
* `rebalance2`, `rebalance4`: `compile` with each random batch of 100 sorted by length and cut into
  2 x ~50 or 4 x ~25 micro-batches of balanced padded cost (`pretrain.batch_rebalance`): the same
  examples per update as `compile`, less padding, smaller kernels;
* `tuned_rb2`, `tuned_rb4`: the same without compile (the CPU comparison); `tuned_2x`, `tuned_4x`:
  random micro-batches of 50 or 25 (what the split alone does, without the sort);
* `default`, `default_scale`: the embedded default's recipe (batches of 16) with AdamW, and with the
  paper's AdamWScale and schedule: run with `--warmup 0 --steps 200` (the default's length).

Prints, per arm, non-pad tokens/s, the share of the padded positions holding real tokens, optimizer
steps/s, model FLOPs utilisation (`fsa_distill.mfu`: against the card's dense peak on CUDA; on a
CPU against a measured fp32 matmul rate), the mean
token loss on 200 fixed examples after training, peak GPU memory, the 200k-step time, and the
ratio to `today`; then the AdamWScale update time, the paper's per-tensor loop against the
multi-tensor one. With `--student` and `--corpus` (a student folder, a folder with corpus.parquet)
it needs no Prefect, MLflow or Hydra: it runs on a bare GPU box with torch, transformers, datasets.
`--padding-only` counts the padding of `batch_rebalance`'s two possible sort keys, without training.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, Seq2SeqTrainingArguments, TrainerCallback

from fsa_distill.mfu import peak_flops
from fsa_distill.optim import AdamWScale
from fsa_distill.pretraining import (
    _DropLength,
    ensure_newline_token,
    load_tokenized,
    make_trainer,
    recipe_args,
    tokenize_to_disk,
)

#: `experiment=paper`'s pretraining recipe, spelled out (no Hydra on a bare GPU box).
PAPER = {
    "max_steps": 200_000, "learning_rate": 3e-3, "min_learning_rate": 1e-5, "warmup_steps": 0,
    "weight_decay": 0.0, "max_grad_norm": 1.0, "max_source_length": 128, "max_target_length": 400,
    "group_by_length": False, "save_steps": 10**9, "seed": 42, "bf16": True,
}  # fmt: skip
ARMS: dict[str, dict[str, Any]] = {
    "today": {"batch_size": 20, "grad_accum": 5, "optimizer": "adamw", "lr_schedule": "cosine", "tf32": False,
              "torch_compile": False, "dataloader_workers": 0, "pad_to_multiple_of": None},
    "tuned": {"batch_size": 100, "grad_accum": 1, "optimizer": "adamw_scale", "lr_schedule": "paper", "tf32": True,
              "torch_compile": False, "dataloader_workers": 4, "pad_to_multiple_of": None},
}  # fmt: skip
# the paper's own recipe run the paper's way (20 x 5): `tuned` must reach the same loss
ARMS["paper"] = {**ARMS["today"], "optimizer": "adamw_scale", "lr_schedule": "paper"}
ARMS["compile"] = {**ARMS["tuned"], "torch_compile": True}
ARMS["pad64"] = {**ARMS["tuned"], "pad_to_multiple_of": 64}
ARMS["grouped"] = {**ARMS["compile"], "group_by_length": True}
for _k in (2, 4):
    ARMS[f"rebalance{_k}"] = {**ARMS["compile"], "batch_size": 100 // _k, "grad_accum": _k, "batch_rebalance": True}
    ARMS[f"tuned_rb{_k}"] = {**ARMS[f"rebalance{_k}"], "torch_compile": False}
    ARMS[f"tuned_{_k}x"] = {**ARMS[f"tuned_rb{_k}"], "batch_rebalance": False}  # the split without the sort
# The embedded default's recipe (conf/pretrain/default.yaml) with its AdamW, and with the paper's
# optimizer and schedule: which trains the small student better (`--warmup 0 --steps 200`)?
ARMS["default"] = {"batch_size": 16, "grad_accum": 1, "optimizer": "adamw", "lr_schedule": "cosine", "bf16": False,
                   "tf32": False, "torch_compile": False, "dataloader_workers": 0, "pad_to_multiple_of": None,
                   "group_by_length": True}  # fmt: skip
ARMS["default_scale"] = {**ARMS["default"], "optimizer": "adamw_scale", "lr_schedule": "paper"}
#: t5-base's shape (google-t5/t5-base), built from its config with random weights: throughput only.
T5_BASE = {"d_model": 768, "d_ff": 3072, "d_kv": 64, "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12,
           "vocab_size": 32128, "feed_forward_proj": "relu", "dropout_rate": 0.1}  # fmt: skip


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_matmul_flops() -> float:
    """This CPU's fp32 matmul rate (FLOP/s, best of 5): the ceiling a CPU MFU is measured against."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * 1024**3 / best


def build_model(student: Path, shape: str) -> Any:
    """The student's architecture (`student`) or t5-base's, randomly initialised from seed 0."""
    config = AutoConfig.from_pretrained(student)
    if shape == "t5-base":
        for key, value in T5_BASE.items():
            setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(config)


def held_out_loss(model: Any, collate: Any, rows: list[dict[str, Any]], bf16: bool) -> float:
    """Token-mean cross-entropy on fixed rows, in batches of 50 (eval mode, no dropout)."""
    model.eval()
    total = count = 0.0
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(rows), 50):
            batch = collate(rows[i : i + 50]).to(device)
            logits = model(**batch).logits.float()
            labels = batch["labels"]
            flat = logits.reshape(-1, logits.size(-1))
            ce = torch.nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(ce)
            count += float(labels.ne(-100).sum())
    return total / count


class _Window(TrainerCallback):
    """Starts the timed window after `warmup` updates: syncs, zeroes the Trainer's counters."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.trainer, self.start = warmup, None, None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.warmup == 0:
            self.start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.warmup:
            _sync()
            self.trainer.throughput()
            self.start = time.perf_counter()


def run_arm(name: str, overrides: dict[str, Any], student: Path, shape: str, data: Path, steps: int, warmup: int,
            work: Path, cpu_peak: float | None) -> dict[str, Any]:  # fmt: skip
    recipe = {**PAPER, **overrides}
    tokenizer = AutoTokenizer.from_pretrained(student)
    ensure_newline_token(tokenizer)
    model = build_model(student, shape)
    if len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    dataset = load_tokenized(data)
    args = recipe_args(recipe, work / name)
    args.update(max_steps=warmup + steps, save_strategy="no", logging_steps=10**9, seed=recipe["seed"])
    trainer = make_trainer(model, tokenizer, dataset, recipe, Seq2SeqTrainingArguments(**args))
    window = _Window(warmup)
    window.trainer = trainer
    trainer.add_callback(window)
    positions: dict[str, Any] = {"real": 0, "padded": 0}
    count = trainer._count

    def count_positions(inputs: dict[str, Any]) -> None:  # real tokens summed on the device: no sync
        if window.start is not None:
            positions["padded"] += inputs["input_ids"].numel() + inputs["labels"].numel()
            positions["real"] = positions["real"] + inputs["attention_mask"].sum() + inputs["labels"].ne(-100).sum()
        count(inputs)

    trainer._count = count_positions
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    _sync()
    seconds = time.perf_counter() - window.start
    rates = trainer.throughput()
    mfu = rates.get("mfu")
    if mfu is None and cpu_peak:
        mfu = rates["model_flops_per_second"] / cpu_peak
    rows = [{k: dataset[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(200)]
    collate = _DropLength(tokenizer, model=model, label_pad_token_id=-100)
    loss = held_out_loss(trainer.accelerator.unwrap_model(trainer.model), collate, rows, bool(trainer.args.bf16))
    out = {
        "arm": name,
        "batch": f"{recipe['batch_size']} x {recipe['grad_accum']}",
        "tokens_per_s": rates["tokens_per_second"],
        "real_share": float(positions["real"]) / max(positions["padded"], 1),
        "steps_per_s": steps / seconds,
        "mfu": mfu,
        "loss": loss,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "hours_200k": 200_000 / (steps / seconds) / 3600,
    }
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def padding_by_sort_key(dataset: Any, splits: tuple[int, ...] = (1, 2, 4), batch: int = 100) -> dict[str, Any]:
    """Real share of the padded positions over one epoch of `BatchRebalanceSampler` (no training):
    sorting each update by source + target (`length`) against by the longer side (`rebalance_length`)."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    sources = [len(x) for x in dataset["input_ids"]]
    targets = [len(y) for y in dataset["labels"]]
    out: dict[str, Any] = {}
    for key in ("length", "rebalance_length"):
        for k in splits:
            sampler = BatchRebalanceSampler(lengths=dataset[key], effective_batch_size=batch, dp_size=1, grad_accum=k,
                                            seed=0, drop_last=True)  # fmt: skip
            real = padded = 0
            for micro in sampler:
                real += sum(sources[i] + targets[i] for i in micro)
                padded += len(micro) * (max(sources[i] for i in micro) + max(targets[i] for i in micro))
            out[f"{key} / {k}"] = real / padded
    return out


def optimizer_step_ms(student: Path, shape: str, updates: int = 20) -> dict[str, float]:
    """Milliseconds per AdamWScale update of the whole model: the paper's loop against multi-tensor."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(student, shape).to(device)
    out = {}
    for label, foreach in (("loop", False), ("foreach", True)):
        params = [p for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = AdamWScale(params, lr=3e-3, foreach=foreach)
        opt.step()
        _sync()
        start = time.perf_counter()
        for _ in range(updates):
            opt.step()
        _sync()
        out[label] = (time.perf_counter() - start) / updates * 1e3
    return out


def _cpu_inputs(work: Path) -> tuple[Path, Path]:
    """The embedded student and the Mixtral corpus, made with the pipeline's own stages (CPU path)."""
    import os

    from fsa_distill.tasks.acquire import acquire
    from fsa_distill.tasks.student import init_student

    from fsa_distill.config import compose_config
    from perf.bench_pretrain import mixtral_corpus

    cfg = compose_config([])
    source = os.environ.get("FSA_DATA_SOURCE", cfg["data"]["source"])
    corpus = mixtral_corpus(source, work / "corpus")
    data = acquire.run(work, acquire.params(cfg, dataset="atsa/rest14"))
    student = init_student.run(work, init_student.params(cfg, datasets=[data]))
    return Path(student.path), Path(corpus.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, help="a student folder (config + tokenizer); default: build one")
    parser.add_argument("--corpus", type=Path, help="a folder with corpus.parquet (review, output)")
    parser.add_argument("--model", choices=["student", "t5-base"], default="student",
                        help="the student's own shape, or t5-base's (random weights)")  # fmt: skip
    parser.add_argument("--arms", default="today,paper,tuned", help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer updates per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates first (compilation, caches)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON lines here")
    parser.add_argument("--padding-only", action="store_true",
                        help="only count the padding of each sort key for batch_rebalance (no training)")  # fmt: skip
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    student, corpus = (args.student, args.corpus) if args.student else _cpu_inputs(work)
    tokenizer = AutoTokenizer.from_pretrained(student)
    ensure_newline_token(tokenizer)
    data = tokenize_to_disk("distill", corpus / "corpus.parquet", tokenizer, PAPER, work / "tokenized")
    if args.padding_only:
        for name, share in padding_by_sort_key(load_tokenized(data)).items():
            print(f"sorted by {name} micro-batches per update: {share:.1%} of the padded positions real")
        return
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    cpu_peak = None if cuda else cpu_matmul_flops()
    peak = peak_flops(torch.device("cuda"), "bf16") if cuda else cpu_peak
    params = sum(p.numel() for p in build_model(student, args.model).parameters())
    print(f"device: {device}; torch {torch.__version__}; model {args.model} ({params / 1e6:.1f}M parameters); "
          f"{len(load_tokenized(data))} examples; {args.warmup} + {args.steps} updates per arm; "
          f"MFU against {'the dense bf16 peak' if cuda else 'a measured fp32 matmul rate'} "
          f"{(peak or 0) / 1e12:.2f} TFLOP/s", flush=True)  # fmt: skip
    optim = optimizer_step_ms(student, args.model)
    results = []
    for name in args.arms.split(","):
        overrides = dict(ARMS[name])
        if not cuda:  # one process of two cores: the workers would only compete with it
            overrides["dataloader_workers"] = min(overrides["dataloader_workers"], 1)
        result = run_arm(name, overrides, student, args.model, data, args.steps, args.warmup, work, cpu_peak)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps({"device": device, "model": args.model, **result}) + "\n")
    print(f"\n{'arm':10} {'batch':>9} {'tokens/s':>10} {'real':>5} {'steps/s':>8} {'MFU':>6} {'loss':>7} "
          f"{'peak GiB':>8} {'200k steps':>10} {'vs today':>8}")  # fmt: skip
    base = results[0]["tokens_per_s"]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['arm']:10} {r['batch']:>9} {r['tokens_per_s']:10.0f} {r['real_share']:5.0%} "
              f"{r['steps_per_s']:8.2f} {mfu:>6} {r['loss']:7.3f} {gib:>8} {r['hours_200k']:9.1f}h "
              f"{r['tokens_per_s'] / base:7.2f}x")  # fmt: skip
    print(f"AdamWScale update: paper's loop {optim['loop']:.1f} ms, multi-tensor {optim['foreach']:.1f} ms "
          f"({optim['loop'] / optim['foreach']:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
