"""The `vllm` backend: offline `LLM.generate` in the separate vllm environment, one process per shard.

Prompts are chat-formatted and tokenized here with the model's own tokenizer, so the worker gets
token ids: the prompt hash and token counts mean the same as with the transformers backend and
no second BOS can sneak in. A failed worker becomes a `VllmWorkerError` with its log's tail.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fsa_distill.tasks.teachers.common import Generation, Pair, apply_chat_template, sha256_text

from fsa_distill.errors import InputError
from fsa_distill.llm import load_tokenizer, resolve_model
from fsa_distill.progress import Progress

#: The worker runs as a script by path, so no import shows it: declared for the code version (codehash).
__code_deps__ = ("fsa_distill.tasks.vllm_worker",)
WORKER = Path(__file__).resolve().parents[1] / "vllm_worker.py"
LOG_TAIL = 4000
log = logging.getLogger(__name__)


class VllmWorkerError(RuntimeError):
    """The vLLM worker process failed; the message carries the end of its log."""


def vllm_python(teacher: dict[str, Any]) -> str:
    """The vllm environment's interpreter (`teacher.python`, conf default from FSA_VLLM_PYTHON)."""
    python = teacher.get("python")
    if not python:
        raise InputError(
            "teacher.python is not set: the vllm backend runs in its own environment; "
            "set FSA_VLLM_PYTHON (or teacher.python) to that environment's python (scripts/setup_vllm_env.sh)"
        )
    if not Path(python).is_file():
        raise InputError(f"teacher.python: {python} does not exist (create it with scripts/setup_vllm_env.sh)")
    return python


def sampling_params(teacher: dict[str, Any], pairs: list[Pair]) -> dict[str, Any]:
    """vLLM SamplingParams keywords; sampled runs get one seed per pair (seed + pair index)."""
    if not teacher["do_sample"]:
        return {"max_tokens": teacher["max_new_tokens"], "temperature": 0.0}
    return {
        "max_tokens": teacher["max_new_tokens"],
        "temperature": teacher["temperature"],
        "top_p": teacher["top_p"],
        "seeds": [teacher["seed"] + p.index for p in pairs],
    }


def run_worker(python: str, job: dict[str, Any], workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the worker on `job` (paths filled in here) and return its output records and stats."""
    job = {**job, "prompts": str(workdir / "prompts.jsonl")}
    job.update(outputs=str(workdir / "outputs.jsonl"), stats=str(workdir / "worker_stats.json"))
    (workdir / "job.json").write_text(json.dumps(job), encoding="utf-8")
    log = workdir / "worker.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    with open(log, "wb") as handle:
        proc = subprocess.run(
            [python, str(WORKER), str(workdir / "job.json")], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
    outputs = workdir / "outputs.jsonl"
    if proc.returncode != 0 or not outputs.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
        raise VllmWorkerError(f"vllm worker ({python}) exited with code {proc.returncode}; end of its log:\n{tail}")
    records = [json.loads(line) for line in outputs.read_text(encoding="utf-8").splitlines() if line]
    return records, json.loads((workdir / "worker_stats.json").read_text())


def generate(pairs: list[Pair], teacher: dict[str, Any]) -> tuple[list[Generation], dict[str, Any]]:
    """Generate every pair in one vLLM worker run; returns generations and stats."""
    python = vllm_python(teacher)
    tokenizer = load_tokenizer(teacher["model"])
    prompts = [apply_chat_template(tokenizer, p) for p in pairs]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    job = {
        "model": resolve_model(teacher["model"]),
        "sampling": sampling_params(teacher, pairs),
        "vllm_args": teacher.get("vllm_args") or {},
    }
    # one offline batch in another process: a line when it starts, the final one when it returns
    progress = Progress("generate", len(pairs), "pairs", rates=("tokens",))
    log.info("generate: %d pairs sent to the vLLM worker", len(pairs))
    with progress, tempfile.TemporaryDirectory(prefix="fsa-vllm-") as tmp:
        workdir = Path(tmp)
        lines = [json.dumps({"index": i, "prompt_token_ids": t}) for i, t in enumerate(ids)]
        (workdir / "prompts.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        records, stats = run_worker(python, job, workdir)
        progress.update(len(records), tokens=sum(int(r.get("output_tokens") or 0) for r in records))
    by_index = {r["index"]: r for r in records}
    if sorted(by_index) != list(range(len(pairs))):
        raise VllmWorkerError(f"vllm worker returned {len(by_index)} outputs for {len(pairs)} prompts")
    latency = float(stats["generate_s"])  # offline batch: every request waits for the whole call
    generations = []
    for i, prompt in enumerate(prompts):
        r = by_index[i]
        reason = r["finish_reason"] if r["finish_reason"] in ("stop", "length") else "error"
        generations.append(
            Generation(sha256_text(prompt), r["text"].strip(), reason, r["prompt_tokens"], r["output_tokens"], latency)
        )
    return generations, {"worker": stats}
