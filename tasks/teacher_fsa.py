"""Stage `teacher_fsa`: the teacher LLM in context on one benchmark dataset, scored like a student.

The protocol of HITSZ-HLT/Sentiment-Distillation `fsa.py` (benchmark/icl.py): an instruction
naming the task and the label format, k demonstrations drawn with a seed from the train split,
each `Sentence: ...\\nLabel: <benchmark target>`, then the test sentence; greedy decoding through
the configured backend (transformers, vllm, openai); the answer's first line is the label; the
project's own parser and scorer on every test type, exactly as `evaluate` scores a student. The
prompt goes to the backend as one chat user message, since the backends serve chat models
(upstream fed base models raw text).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from fsa_distill.benchmark.classify import sample_rows
from fsa_distill.benchmark.icl import extract_label, fsa_prompts, load_templates
from fsa_distill.benchmark.predictions import read_test_rows, write_scored
from fsa_distill.benchmark.protocol import TEST_TYPES
from fsa_distill.tasks.stage import stage
from fsa_distill.tasks.teachers import prompted

from fsa_distill import CONF_DIR
from fsa_distill.artifacts import Artifact


@stage("teacher_fsa", retries=2, unkeyed=prompted.UNKEYED)
def teacher_fsa(
    out: Path,
    *,
    data: Artifact,
    k: int,
    seed: int,
    templates: dict[str, Any],
    teacher: dict[str, Any],
    model_fingerprint: str,
    backend_code: str,
    max_new_tokens: int,
    sample: int | None,
) -> None:
    """In-context answers of the teacher on one dataset's test + hard_test sentences (a seeded sample),
    scored on every test type (the report shows the configured ones)."""
    module = prompted.backend(teacher, backend_code)
    began = time.perf_counter()
    task, rows = read_test_rows(data.path)
    rows = sample_rows(rows, sample)
    pool = pq.read_table(Path(data.path) / "train.parquet").to_pylist()
    prompts = fsa_prompts(templates["fsa"][task], task, rows, pool, k=k, seed=seed)
    answers, n_errors = prompted.answers(module, teacher, prompts, max_new_tokens, f"icl-{templates['version']}")
    write_scored(out, task, rows, [extract_label(a) for a in answers], list(TEST_TYPES))
    (out / "answers.json").write_text(json.dumps({"n_errors": n_errors, "answers": answers}, indent=0))
    prompted.write_timing(out, began, len(rows))


@teacher_fsa.configure
def params(cfg: dict[str, Any], *, data: Artifact, k: int, seed: int) -> dict[str, Any]:
    """The dataset, the draw (k, seed), the versioned templates, the teacher and how much is scored."""
    te = cfg["teacher_eval"]
    templates = load_templates(CONF_DIR / "icl" / f"{te['templates']}.yaml")
    return {
        "data": data,
        "k": k,
        "seed": seed,
        "templates": templates,
        **prompted.teacher_params(cfg),
        "max_new_tokens": te["max_new_tokens"],
        "sample": te["sample"],
    }
