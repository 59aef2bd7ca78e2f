"""Pretraining throughput: length-grouped batches vs. random batches padded to the batch maximum.

    python -m perf.bench_pretrain [--steps N] [--batch-size 16] [--bf16] [student.d_model=768 ...]

Same model (the embedded default student), same data (review -> teacher text from the paper's
released Mixtral outputs, the `distill` objective), same examples (one epoch by default). The random
arm is the paper's collator: shuffled batches padded to their longest member. The grouped arm is
transformers' LengthGroupedSampler over (source + target) lengths, which the `pretrain` stage
uses. Prints non-pad tokens/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.student import init_student
from torch.utils.data import RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler

from fsa_distill.artifacts import Artifact, seal
from fsa_distill.config import compose_config
from fsa_distill.models import load_seq2seq
from fsa_distill.pretraining import _DropLength, build_dataset


def mixtral_corpus(source: str, folder: Path) -> Artifact:
    """The 500 released teacher outputs as a cleaned-corpus table (review, output)."""
    path = Path(source) / "prompting/test/mixtral/test_500_4m8d.json"
    rows = [json.loads(line.lstrip("\ufeff")) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"review": [r["Text"] for r in rows], "output": [r["mixtral_response"].strip() for r in rows]})
    pq.write_table(table, folder / "corpus.parquet")
    return Artifact(path=str(folder), sha256=seal(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=0, help="0: one full epoch, so both arms see the same examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA), as the paper's recipe")
    parser.add_argument("--repeats", type=int, default=1, help="passes per arm; the best is reported (GPU warm-up)")
    parser.add_argument("--pad-multiple", type=int, default=None, help="pad batches to a multiple (fewer shapes)")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. student.d_model=768 for a t5-base-sized student"
    )
    args = parser.parse_args()

    cfg = compose_config(args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = os.environ.get("FSA_DATA_SOURCE", cfg["data"]["source"])
    store = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    corpus = mixtral_corpus(source, store / "corpus")
    data = acquire.run(store, acquire.params(cfg, dataset="atsa/rest14"))
    student = init_student.run(store, init_student.params(cfg, datasets=[data]))
    _, tokenizer = load_seq2seq(student.path)
    dataset = build_dataset("distill", Path(corpus.path) / "corpus.parquet", tokenizer, cfg["pretrain"])
    lengths = dataset["length"]
    collate = _DropLength(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=args.pad_multiple)

    def run(order: list[int], steps: int) -> tuple[float, float]:
        torch.manual_seed(0)
        model, _ = load_seq2seq(student.path)
        model.to(device).train()
        optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = padded = 0
        start = time.perf_counter()
        for i in range(0, steps * args.batch_size, args.batch_size):
            batch = collate([dataset[j] for j in order[i : i + args.batch_size]]).to(device)
            tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
            padded += batch["input_ids"].numel() + batch["labels"].numel()
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(**batch).loss
            loss.backward()
            optim.step()
            optim.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - start), tokens / padded

    generator = torch.Generator().manual_seed(0)
    random_order = list(RandomSampler(range(len(dataset)), generator=generator))
    grouped = list(LengthGroupedSampler(args.batch_size, lengths=lengths, generator=torch.Generator().manual_seed(0)))
    # Both arms see as many batches; the grouped arm's batches come from the same shuffled mega-batches.
    steps = args.steps or len(dataset) // args.batch_size
    run(random_order, 2)  # warm-up
    random_rate, random_fill = max(run(random_order, steps) for _ in range(args.repeats))
    grouped_rate, grouped_fill = max(run(grouped, steps) for _ in range(args.repeats))
    params = sum(p.numel() for p in load_seq2seq(student.path)[0].parameters())
    print(f"device={device} bf16={args.bf16} params={params / 1e6:.1f}M threads={torch.get_num_threads()} "
          f"examples={len(dataset)} steps={steps} batch={args.batch_size} repeats={args.repeats} "
          f"pad_multiple={args.pad_multiple}")  # fmt: skip
    print(f"random batches (paper collator): {random_rate:8.0f} non-pad tokens/s, {random_fill:.0%} of tokens real")
    print(f"length-grouped batches:          {grouped_rate:8.0f} non-pad tokens/s, {grouped_fill:.0%} of tokens real")
    print(f"ratio grouped/random: {grouped_rate / random_rate:.2f}x")


if __name__ == "__main__":
    main()
