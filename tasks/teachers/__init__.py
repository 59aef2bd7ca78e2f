"""Teacher backends: each turns (review, prompt) pairs into generations (see tasks/generate.py).

Backends are imported by name at run time, never at module level, so a stage's own code version
holds no backend and its params key only the chosen one (`backend_code`).
"""

from __future__ import annotations

from typing import Any

#: backend name -> module with `generate(pairs, teacher) -> (generations, measured)`.
BACKENDS = {
    "transformers": "fsa_distill.tasks.teachers.hf",
    "vllm": "fsa_distill.tasks.teachers.vllm",
    "openai": "fsa_distill.tasks.teachers.openai_compat",
}
#: Teacher settings read by one backend only: for the others they are blanked in params (no re-key).
BACKEND_ONLY = {"base_url": ("openai", None), "vllm_args": ("vllm", {}), "batch_size": ("transformers", None)}


def for_backend(teacher: dict[str, Any]) -> dict[str, Any]:
    """The teacher settings with those of other backends blanked."""
    out = dict(teacher)
    for setting, (used_by, blank) in BACKEND_ONLY.items():
        if used_by != out.get("backend") and setting in out:
            out[setting] = blank
    return out
