"""The teacher as an evaluated model: what its answers depend on, and greedy answers to prompts.

Shared by the `teacher_fsa` and `teacher_sentiment` stages. The backend is imported by name
(`BACKENDS`), so only the chosen backend's code is keyed (`backend_code`).
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

from fsa_distill.tasks.teachers import BACKENDS, for_backend
from fsa_distill.tasks.teachers.common import Pair

from fsa_distill.artifacts import fingerprint
from fsa_distill.codehash import code_version
from fsa_distill.errors import InputError

_RUN_ONLY = ("python", "concurrency", "timeout_s", "max_retries", "backoff_s", "retry_budget_s", "api_key_env")
#: How the teacher is reached, not what it answers (the model path: its content is keyed).
UNKEYED = tuple(f"teacher.{k}" for k in ("model", *_RUN_ONLY))
#: The teacher settings an in-context answer can depend on (and the run-only ones, unkeyed).
TEACHER_KEYS = ("backend", "model", "batch_size", "vllm_args", "base_url", *_RUN_ONLY)


def teacher_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The teacher as far as its answers depend on it: backend and its code, settings, model content."""
    teacher = for_backend({k: cfg["teacher"].get(k) for k in TEACHER_KEYS})
    backend = teacher["backend"]
    if backend not in BACKENDS:
        raise InputError(f"teacher.backend={backend!r} cannot be scored in context; use one of {', '.join(BACKENDS)}")
    return {
        "teacher": teacher,
        "model_fingerprint": fingerprint(str(teacher["model"])),
        "backend_code": code_version([BACKENDS[backend]]),
    }


def backend(teacher: dict[str, Any], backend_code: str) -> Any:
    """The teacher's backend module, checked against the code version its params were keyed with."""
    if backend_code != code_version([BACKENDS[teacher["backend"]]]):
        raise InputError("teacher backend code changed since the params were made; recompute them")
    return importlib.import_module(BACKENDS[teacher["backend"]])


def answers(
    module: Any, teacher: dict[str, Any], prompts: list[str], max_new_tokens: int, tag: str
) -> tuple[list[str], int]:
    """Greedy answers of the backend, one chat user message per prompt, and how many prompts got no
    usable answer (refused, or malformed after every retry: "" and counted, so the score says so)."""
    settings = {**teacher, "max_new_tokens": max_new_tokens, "do_sample": False, "temperature": 0.0,
                "top_p": 1.0, "seed": 0}  # fmt: skip
    pairs = [Pair(i, str(i), prompt, tag, tag, None, prompt) for i, prompt in enumerate(prompts)]
    generations, _ = module.generate(pairs, settings)
    failed = sum(g.finish_reason == "error" for g in generations)
    return [g.output if g.finish_reason != "error" else "" for g in generations], failed


def write_timing(out: Path, began: float, n: int) -> None:
    """Wall time and size, as a measurement (outside the content hash)."""
    (out / "measured").mkdir(exist_ok=True)
    wall = time.perf_counter() - began
    (out / "measured" / "timing.json").write_text(json.dumps({"wall_s": round(wall, 3), "sentences": n}))
