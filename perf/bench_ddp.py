"""Data-parallel pretraining throughput: 2 CPU processes (DDP over gloo) vs 1 process, same global batch.

    python -m perf.bench_ddp [--processes 2] [--batch-size 16] [--epochs 1] [student.d_model=256 ...]

Same model (the embedded default student unless overridden), same data (review -> teacher text
from the paper's released Mixtral outputs, `distill`, random batches), same global batch and steps:
both arms see the same examples in the same order (their loss curves agree to ~1e-7), so their
token counts are equal. Arms, each a real `pretrain` stage run on its own store:

* 1 process, torch's default threads (every core), in the bench's process: the default path;
* 1 process, 1 thread (on a busy machine, spinning OpenMP threads cost more than they give);
* N processes launched by the stage with torchrun (`trainer.devices=N`, gloo), cores / N threads each.

Prints for each: non-pad tokens/s over the Trainer's training loop (`train_runtime`), the stage's
wall time (for DDP it includes starting torchrun and importing torch in every rank), the final
loss, and the ratios DDP / 1 process. A CPU is a stand-in here: on GPUs each rank has its own device.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.pretrain import pretrain
from fsa_distill.tasks.student import init_student

from fsa_distill.artifacts import Artifact, seal
from fsa_distill.config import compose_config
from fsa_distill.models import read_log
from perf.bench_pretrain import mixtral_corpus


def run_arm(store: Path, params: dict, threads: int | None) -> dict:
    """One `pretrain` stage run on a fresh store; its stats, last loss and wall seconds."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        model = pretrain.run(store, params)
        wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    log = read_log(model.path, "pretrain_log.json")
    losses = [h["loss"] for h in log["history"] if "loss" in h]
    return {"stats": log["stats"], "loss": losses[-1], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch (split over the processes)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the corpus (whole batches only)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. student.d_model=256")
    args = parser.parse_args()

    cfg = compose_config(args.overrides)
    source = os.environ.get("FSA_DATA_SOURCE", cfg["data"]["source"])
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    folder = Path(mixtral_corpus(source, root / "corpus").path)
    table = pq.read_table(folder / "corpus.parquet")
    rows = table.num_rows - table.num_rows % args.batch_size  # whole batches: each arm trains on exactly these
    pq.write_table(table.slice(0, rows), folder / "corpus.parquet")
    corpus = Artifact(path=str(folder), sha256=seal(folder))
    data = acquire.run(root / "setup", acquire.params(cfg, dataset="atsa/rest14"))
    built = init_student.run(root / "setup", init_student.params(cfg, datasets=[data]))
    student = Artifact(path=built.path, sha256=built.sha256)  # by path: each arm has its own store
    steps = args.epochs * rows // args.batch_size
    recipe = [f"pretrain.batch_size={args.batch_size}", f"pretrain.max_steps={steps}", "pretrain.grad_accum=1",
              "pretrain.group_by_length=false", f"pretrain.save_steps={steps}"]  # fmt: skip

    def params(*extra: str) -> dict:
        return pretrain.params(compose_config([*args.overrides, *recipe, *extra]), student=student, corpus=corpus,
                               objective="distill")  # fmt: skip

    cores = len(os.sched_getaffinity(0))
    arms = {
        f"1 process, {torch.get_num_threads()} threads": run_arm(root / "one", params(), None),
        "1 process, 1 thread": run_arm(root / "one-thread", params(), 1),
        f"{args.processes} processes (gloo), {max(1, cores // args.processes)} thread(s) each": run_arm(
            root / "ddp", params(f"trainer.devices={args.processes}", "trainer.backend=gloo"), None
        ),
    }
    tokens = args.epochs * next(iter(arms.values()))["stats"]["tokens"]
    print(f"cores={cores} load_average={os.getloadavg()[0]:.2f} examples={rows} epochs={args.epochs} steps={steps} "
          f"global_batch={args.batch_size} tokens={tokens}")  # fmt: skip
    for name, arm in arms.items():
        runtime = arm["stats"]["train_runtime_s"]
        print(f"{name:40s} {tokens / runtime:8.0f} tokens/s (training loop {runtime:6.1f} s), "
              f"stage wall {arm['wall_s']:6.1f} s, last loss {arm['loss']:.5f}")  # fmt: skip
    ddp = list(arms.values())[-1]
    for name, arm in list(arms.items())[:-1]:
        loop, wall = arm["stats"]["train_runtime_s"] / ddp["stats"]["train_runtime_s"], arm["wall_s"] / ddp["wall_s"]
        print(f"ratio DDP / ({name}), tokens/s: training loop {loop:.2f}x, stage wall {wall:.2f}x")


if __name__ == "__main__":
    main()
