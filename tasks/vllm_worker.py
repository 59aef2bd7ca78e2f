"""Offline vLLM generation, run by the vllm environment's python (imports only stdlib + vllm).

    <vllm-env>/bin/python tasks/vllm_worker.py JOB.json

JOB.json: {"model", "prompts" (JSONL of {"index", "prompt_token_ids"}), "outputs" (JSONL written
here: {"index", "text", "finish_reason", "prompt_tokens", "output_tokens"}), "sampling" (vLLM
SamplingParams keywords; "seeds" optional, one per prompt), "vllm_args" (LLM keywords),
"stats" (a JSON file written here)}. vLLM pins fastapi/transformers versions that conflict with
Prefect, so it lives in its own environment and this script is all that runs there.

On a CPU-only vLLM build the defaults below keep a small model workable on a few cores: eager
mode (torch.compile would take minutes), bfloat16 where the CPU has native bf16 instructions,
a bounded context and a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE, GiB). `vllm_args` overrides them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

CPU_DEFAULTS: dict[str, Any] = {"enforce_eager": True, "max_model_len": 4096}


def cpu_has_bf16() -> bool:
    """Whether this x86 CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_args(model: str, vllm_args: dict[str, Any], on_cpu: bool) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM`: platform defaults, then the user's `vllm_args`."""
    args: dict[str, Any] = {"model": model, "seed": 0}
    if on_cpu:
        args.update(CPU_DEFAULTS, dtype="bfloat16" if cpu_has_bf16() else "float32")
    args.update(vllm_args)
    return args


def write_atomic(path: Path, text: str) -> None:
    """Temp file + rename, so the caller never reads half an output."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run(job: dict[str, Any]) -> None:
    """Generate every prompt of the job and write the outputs JSONL."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    prompts = [json.loads(line) for line in Path(job["prompts"]).read_text(encoding="utf-8").splitlines() if line]
    sampling = dict(job["sampling"])
    seeds = sampling.pop("seeds", None)
    params = [SamplingParams(**sampling, seed=s) for s in seeds] if seeds is not None else SamplingParams(**sampling)
    started = time.perf_counter()
    llm = LLM(**engine_args(job["model"], job.get("vllm_args") or {}, current_platform.is_cpu()))
    loaded = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p["prompt_token_ids"]} for p in prompts], params, use_tqdm=False)
    finished = time.perf_counter()
    lines = []
    for prompt, result in zip(prompts, outputs, strict=True):
        completion = result.outputs[0]
        lines.append(
            json.dumps(
                {
                    "index": prompt["index"],
                    "text": completion.text,
                    "finish_reason": completion.finish_reason,
                    "prompt_tokens": len(result.prompt_token_ids or prompt["prompt_token_ids"]),
                    "output_tokens": len(completion.token_ids),
                }
            )
        )
    write_atomic(Path(job["outputs"]), "".join(line + "\n" for line in lines))
    stats = {"load_s": loaded - started, "generate_s": finished - loaded, "platform": str(current_platform.device_type)}
    write_atomic(Path(job["stats"]), json.dumps(stats))


def main(argv: list[str]) -> int:
    """Entry point: one argument, the job file."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run(json.loads(Path(argv[1]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":  # vLLM starts its engine in spawned processes that re-import this file
    sys.exit(main(sys.argv))
