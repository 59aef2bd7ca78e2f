"""Evaluation throughput: length-sorted batches vs. unsorted batches of 64, same model, one run.

    python -m perf.bench_evaluate [--model FOLDER] [--dataset atsa/rest14] [--repeats 2]

Without --model, a student of the embedded default size is built (random weights, trained
tokenizer); random weights generate until max_new_tokens, which is the worst case for padding.
Prints sentences/s for both orders and the ratio sorted/unsorted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.evaluate import generate, load_model
from fsa_distill.tasks.student import init_student

from fsa_distill.config import compose_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a student folder (default: build the embedded default student)")
    parser.add_argument("--dataset", default="atsa/rest14")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    cfg = compose_config([])
    store = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    data = acquire.run(store, acquire.params(cfg, dataset=args.dataset))
    folder = args.model or init_student.run(store, init_student.params(cfg, datasets=[data])).path
    model, tokenizer = load_model(folder)
    texts = pq.read_table(Path(data.path) / "test.parquet").column("sentence").to_pylist()
    texts += pq.read_table(Path(data.path) / "hard_test.parquet").column("sentence").to_pylist()

    def run(sort: bool) -> tuple[float, list[str]]:
        best = float("inf")
        outputs: list[str] = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = generate(
                model, tokenizer, texts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                sort_by_length=sort,
            )  # fmt: skip
            best = min(best, time.perf_counter() - start)
        return len(texts) / best, outputs

    run(True)  # warm-up
    sorted_rate, sorted_out = run(True)
    unsorted_rate, unsorted_out = run(False)
    agree = sum(a == b for a, b in zip(sorted_out, unsorted_out, strict=True)) / len(texts)
    print(f"device={model.device} threads={torch.get_num_threads()} sentences={len(texts)} batch={args.batch_size}")
    print(f"unsorted: {unsorted_rate:8.1f} sentences/s")
    print(f"sorted:   {sorted_rate:8.1f} sentences/s")
    print(f"ratio sorted/unsorted: {sorted_rate / unsorted_rate:.2f}x  (identical outputs: {agree:.1%})")


if __name__ == "__main__":
    main()
