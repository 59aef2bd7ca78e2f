"""Stage `generate`: the teacher LLM answers every (review, prompt) pair, one shard per stage run.

The pairs are the first `teacher.max_reviews` reviews (all if null) in file order, each with
every prompt in name order; shard k holds pairs [k * shard_size, (k + 1) * shard_size). A shard
is the unit of caching, resume and scale-out: a killed run loses at most the shards in flight,
a rerun finds the finished ones in the stage cache, and the flow maps shards over its task
runner. Backends (tasks/teachers/): transformers, vllm (its own environment), openai (any
OpenAI-compatible server). Imported outputs use the separate `released` stage.

Output `generations.parquet` (schema `GENERATIONS`, one row per pair, pair order) and
`stats.json` (backend, counts of retries, errors and malformed replies, wall time).

Per backend, what the provenance columns measure:
* `prompt_sha256`: transformers/vllm hash the chat-template text the model was fed (system
  message included); openai hashes the JSON of the messages sent (the server renders them).
* `latency_s`: transformers, the wall time of the pair's batch; vllm, the whole offline
  `generate` call (all requests are submitted at once); openai, the successful request's round trip.
* `finish_reason`: "length" when max_new_tokens ran out before EOS, "error" when the backend
  gave no usable answer (openai: malformed after all retries, or the request was refused).
"""

from __future__ import annotations

import importlib
import json
import math
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from fsa_distill.tasks.stage import stage
from fsa_distill.tasks.teachers.common import (
    GENERATIONS,
    PLACEHOLDER,
    Pair,
    read_generations,
    render,
    sampling_settings,
    write_generations,
    write_stats,
)
from fsa_distill.tasks.teachers.released import import_released, read_released, released_params

from fsa_distill.artifacts import Artifact
from fsa_distill.errors import InputError

__all__ = [
    "BACKENDS",
    "GENERATIONS",
    "count_shards",
    "generate_shard",
    "import_released",
    "read_generations",
    "read_released",
    "released_params",
    "shard_pairs",
]

#: backend name -> module with `generate(pairs, teacher) -> (generations, stats)`
BACKENDS = {
    "transformers": "fsa_distill.tasks.teachers.hf",
    "vllm": "fsa_distill.tasks.teachers.vllm",
    "openai": "fsa_distill.tasks.teachers.openai_compat",
}
REVIEWS_FILE = "reviews.parquet"


def _n_reviews(n_rows: int, teacher: dict[str, Any]) -> int:
    cap = teacher.get("max_reviews")
    return n_rows if cap is None else max(0, min(n_rows, int(cap)))


def _shard_size(teacher: dict[str, Any]) -> int:
    size = int(teacher["shard_size"])
    if size < 1:
        raise InputError(f"teacher.shard_size must be at least 1, got {size}")
    return size


def count_shards(reviews_parquet_path: str | Path, prompts: dict[str, Any], teacher: dict[str, Any]) -> int:
    """How many shards the run has (reads only the Parquet footer)."""
    path = Path(reviews_parquet_path)
    if not path.is_file():
        raise InputError(f"{path}: reviews file not found")
    n_pairs = _n_reviews(pq.read_metadata(path).num_rows, teacher) * len(prompts)
    return math.ceil(n_pairs / _shard_size(teacher))


def _check_prompts(prompts: dict[str, Any]) -> list[str]:
    if not prompts:
        raise InputError("prompts: no prompt templates configured")
    for name, spec in prompts.items():
        for key in ("version", "template"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise InputError(f"prompts.{name}.{key} is missing or empty")
        if PLACEHOLDER not in spec["template"]:
            raise InputError(f"prompts.{name}.template has no {PLACEHOLDER} placeholder")
    return sorted(prompts)


def _read_reviews(path: Path, n_first: int) -> list[dict[str, Any]]:
    """The first `n_first` reviews (id, text), checked: ids unique, text a non-empty string."""
    if not path.is_file():
        raise InputError(f"{path}: reviews file not found")
    schema = pq.read_schema(path)
    missing = [c for c in ("id", "text") if c not in schema.names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(schema.names)})")
    rows = pq.read_table(path, columns=["id", "text"]).slice(0, n_first).to_pylist()
    seen: dict[str, int] = {}
    for number, row in enumerate(rows):
        if row["id"] is None:
            raise InputError(f"{path}: row {number}: id is null")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise InputError(f"{path}: row {number} (id {row['id']}): text is empty or null")
        rid = str(row["id"])
        if rid in seen:
            raise InputError(f"{path}: row {number}: duplicate id {rid} (also row {seen[rid]})")
        seen[rid] = number
    return rows


def shard_pairs(
    reviews_parquet_path: str | Path, shard: int, prompts: dict[str, Any], teacher: dict[str, Any]
) -> list[Pair]:
    """The (review, prompt) pairs of shard `shard`, review-major, prompts by name."""
    path = Path(reviews_parquet_path)
    names = _check_prompts(prompts)
    size = _shard_size(teacher)
    n_shards = count_shards(path, prompts, teacher)
    if not 0 <= shard < max(n_shards, 1):
        raise InputError(f"shard {shard} is out of range: {path} gives {n_shards} shard(s) of {size} pairs")
    n_reviews = _n_reviews(pq.read_metadata(path).num_rows, teacher)
    first, last = shard * size, min((shard + 1) * size, n_reviews * len(names))
    reviews = _read_reviews(path, n_reviews) if last > first else []
    pairs = []
    for index in range(first, last):
        review, name = reviews[index // len(names)], names[index % len(names)]
        spec = prompts[name]
        pairs.append(
            Pair(
                index=index,
                review_id=str(review["id"]),
                review=review["text"],
                prompt=name,
                version=spec["version"],
                system=spec.get("system") or None,
                user=render(spec["template"], review["text"]),
            )
        )
    return pairs


@stage(
    "generate",
    code=(
        "fsa_distill.tasks.teachers.common",
        "fsa_distill.tasks.teachers.hf",
        "fsa_distill.tasks.teachers.vllm",
        "fsa_distill.tasks.teachers.openai_compat",
        "fsa_distill.tasks.vllm_worker",
        "fsa_distill.llm",
    ),
    retries=2,
    # how requests are made, not what the teacher answers
    unkeyed={"teacher": ("python", "concurrency", "timeout_s", "max_retries", "backoff_s", "api_key_env")},
)
def generate_shard(
    out: Path,
    *,
    reviews: Artifact,
    shard: int,
    prompts: dict[str, Any],
    teacher: dict[str, Any],
    fingerprint: str = "",
) -> None:
    """Generate shard `shard` of the (review, prompt) pairs with `teacher.backend`.

    `fingerprint` is the content hash of a local `teacher.model` folder: it only feeds the key.
    """
    backend = teacher.get("backend")
    if backend == "released":
        raise InputError("teacher.backend=released imports outputs: use the `released` stage (import_released)")
    if backend not in BACKENDS:
        raise InputError(f"teacher.backend: unknown {backend!r}; known: {', '.join([*BACKENDS, 'released'])}")
    pairs = shard_pairs(Path(reviews.path) / REVIEWS_FILE, shard, prompts, teacher)
    began = time.perf_counter()
    if pairs:
        generations, extra = importlib.import_module(BACKENDS[backend]).generate(pairs, teacher)
    else:
        generations, extra = [], {}
    wall = time.perf_counter() - began
    sampling = json.dumps(sampling_settings(teacher), sort_keys=True)
    write_generations(out, pairs, generations, teacher, sampling)
    n_out = sum(g.output_tokens for g in generations)
    stats = {
        "backend": backend,
        "shard": shard,
        "pairs": len(pairs),
        "errors": sum(g.finish_reason == "error" for g in generations),
        "retries": 0,
        "malformed": 0,
        "finish_reasons": {r: sum(g.finish_reason == r for g in generations) for r in ("stop", "length", "error")},
        "output_tokens": n_out,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(n_out / wall, 2) if wall > 0 else None,
        **extra,
    }
    write_stats(out, stats)
