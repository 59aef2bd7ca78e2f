"""Stage `generate`: the teacher LLM answers a range of (review, prompt) pairs, one range per stage run.

The pairs are the reviews in file order, each with every prompt in name order: pair i is review
i // n_prompts with prompt i % n_prompts. A shard is the pair range [first, last): the unit of
caching, resume and scale-out. `shard_ranges` cuts the first `teacher.max_reviews` reviews' pairs
into ranges of `teacher.shard_size`; the stage itself only sees its range, so neither setting is
in its key (raising max_reviews keeps every full shard's key). A killed run loses at most the
shards in flight, a rerun finds the finished ones in the stage cache, and the flow maps shards
over its task runner. Backends (tasks/teachers/): transformers, vllm (its own environment), openai
(any OpenAI-compatible server); only the chosen backend's code is in the key (`backend_code`).
Imported outputs use the separate `released` stage (tasks/teachers/released.py).

Output (content, what later stages read): `generations.parquet` (schema `GENERATIONS`, one row per
pair, pair order; the `model` column holds the model's content fingerprint, never its path) and
`stats.json` (backend, range, pairs, errors, finish reasons, tokens). Measurements, outside the
content hash (fsa_distill.artifacts): `measured/latency.parquet` (review_id, prompt, latency_s) and
`measured/timing.json` (wall_s, output_tokens_per_s, resumed_pairs, retries, malformed and the
backend's own counters: device, worker timings, HTTP errors). Greedy decoding of the same range
twice gives the same bytes and the same artifact hash.

The stage is resumable: a backend whose pairs are independent requests (openai) reports each
finished pair, which is appended to `<scratch>/pairs.jsonl`; a retried or restarted attempt sends
only the pairs not in it. (transformers/vllm generate a range as one batch job: a subset would be
batched, padded and seeded differently, so they always regenerate the whole range.)

Per backend, what the provenance columns measure:
* `prompt_sha256`: transformers/vllm hash the chat-template text the model was fed (system
  message included); openai hashes the JSON of the messages sent (the server renders them).
* `latency_s` (measured): transformers, the wall time of the pair's batch; vllm, the whole offline
  `generate` call (all requests are submitted at once); openai, the successful request's round trip.
* `finish_reason`: "length" when max_new_tokens ran out before EOS, "error" when the backend
  gave no usable answer (openai: malformed after all retries, or the request was refused).
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from fsa_distill.tasks.stage import stage
from fsa_distill.tasks.teachers import BACKENDS, for_backend
from fsa_distill.tasks.teachers.common import (
    FINISH_REASONS,
    GENERATIONS,
    PLACEHOLDER,
    Generation,
    Pair,
    read_generations,
    render,
    sampling_settings,
    write_generations,
    write_stats,
)

from fsa_distill.artifacts import Artifact, fingerprint
from fsa_distill.codehash import code_version
from fsa_distill.errors import InputError

__all__ = [
    "BACKENDS",
    "GENERATIONS",
    "generate_shard",
    "read_generations",
    "shard_pairs",
    "shard_ranges",
]

#: The `released` stage's names, re-exported lazily (module `__getattr__`) so its code is not in this stage's key.
_RELEASED = {"import_released", "read_released", "released_params"}
REVIEWS_FILE = "reviews.parquet"
CHECKPOINT = "pairs.jsonl"
#: Dotted paths into the params that change how the stage runs, not what it writes.
UNKEYED = (
    "teacher.model",  # the path; its content is keyed as `model_fingerprint`
    "teacher.max_reviews",  # decide which ranges exist (shard_ranges), not what a range holds
    "teacher.shard_size",
    # keyed through `sampling` (sampling_settings): greedy decoding ignores temperature, top_p and seed
    "teacher.do_sample",
    "teacher.max_new_tokens",
    "teacher.temperature",
    "teacher.top_p",
    "teacher.seed",
    # how requests are made, not what the teacher answers (base_url stays keyed: it picks the server)
    "teacher.python",
    "teacher.concurrency",
    "teacher.timeout_s",
    "teacher.max_retries",
    "teacher.backoff_s",
    "teacher.retry_budget_s",
    "teacher.api_key_env",
    # the released stage's settings
    "teacher.released_path",
    "teacher.released_field",
)


def __getattr__(name: str) -> Any:
    if name in _RELEASED:
        return getattr(importlib.import_module("fsa_distill.tasks.teachers.released"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _n_reviews(n_rows: int, teacher: dict[str, Any]) -> int:
    cap = teacher.get("max_reviews")
    return n_rows if cap is None else max(0, min(n_rows, int(cap)))


def _shard_size(teacher: dict[str, Any]) -> int:
    size = int(teacher["shard_size"])
    if size < 1:
        raise InputError(f"teacher.shard_size must be at least 1, got {size}")
    return size


def _n_rows(path: Path) -> int:
    if not path.is_file():
        raise InputError(f"{path}: reviews file not found")
    return pq.read_metadata(path).num_rows


def shard_ranges(
    reviews_parquet: str | Path, prompts: dict[str, Any], teacher: dict[str, Any]
) -> list[tuple[int, int]]:
    """The pair ranges [first, last) of a run: the first `teacher.max_reviews` reviews' pairs in
    ranges of `teacher.shard_size` (the last one may be shorter). Reads only the Parquet footer."""
    n_pairs = _n_reviews(_n_rows(Path(reviews_parquet)), teacher) * len(_check_prompts(prompts))
    size = _shard_size(teacher)
    return [(first, min(first + size, n_pairs)) for first in range(0, n_pairs, size)]


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


def _pair_range(pairs: Any) -> tuple[int, int]:
    """`pairs` as (first, last), checked for shape: two integers with 0 <= first < last."""
    if not isinstance(pairs, list | tuple) or len(pairs) != 2 or not all(isinstance(v, int) for v in pairs):
        raise InputError(f"pairs must be [first, last) as two integers, got {pairs!r}")
    first, last = int(pairs[0]), int(pairs[1])
    if first < 0 or last <= first:
        raise InputError(f"pairs [{first}, {last}) is empty or negative: need 0 <= first < last")
    return first, last


def shard_pairs(reviews_parquet_path: str | Path, pairs: Any, prompts: dict[str, Any]) -> list[Pair]:
    """The (review, prompt) pairs with index in [first, last), review-major, prompts by name."""
    path = Path(reviews_parquet_path)
    names = _check_prompts(prompts)
    first, last = _pair_range(pairs)
    n_rows = _n_rows(path)
    total = n_rows * len(names)
    if last > total:
        raise InputError(
            f"pairs [{first}, {last}) is out of range: {path} has {n_rows} review(s) x {len(names)} prompt(s)"
            f" = {total} pairs"
        )
    reviews = _read_reviews(path, (last - 1) // len(names) + 1)
    out = []
    for index in range(first, last):
        review, name = reviews[index // len(names)], names[index % len(names)]
        spec = prompts[name]
        out.append(
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
    return out


def _check_backend(backend: Any) -> str:
    if backend == "released":
        raise InputError("teacher.backend=released imports outputs: use the `released` stage (import_released)")
    if backend not in BACKENDS:
        raise InputError(f"teacher.backend: unknown {backend!r}; known: {', '.join([*BACKENDS, 'released'])}")
    return backend


def _load_checkpoint(path: Path, pairs: list[Pair]) -> dict[int, Generation]:
    """The finished pairs recorded by an earlier attempt (a torn last line, or a stranger, is ignored)."""
    if not path.is_file():
        return {}
    wanted = {p.index: p for p in pairs}
    found: dict[int, Generation] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            pair = wanted.get(record["index"])
            if pair is None or (record["review_id"], record["prompt"]) != (pair.review_id, pair.prompt):
                continue
            found[pair.index] = Generation.from_record(record)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return found


@stage("generate", retries=2, resumable=True, unkeyed=UNKEYED)
def generate_shard(
    out: Path,
    *,
    reviews: Artifact,
    pairs: list[int],
    prompts: dict[str, Any],
    teacher: dict[str, Any],
    model_fingerprint: str,
    backend_code: str,
    sampling: dict[str, Any],
    scratch: Path | None = None,
) -> None:
    """Generate the pairs [first, last) = `pairs` with `teacher.backend` (params: `generate_shard.params`).

    `model_fingerprint` (content hash of a local `teacher.model`, or its hub id) is what the rows
    record as `model`; `backend_code` and `sampling` are keyed and checked against the code and
    settings that run. `scratch` (from the stage runner) holds the per-pair checkpoint.
    """
    backend = _check_backend(teacher.get("backend"))
    if backend_code != code_version([BACKENDS[backend]]):
        raise InputError(f"backend_code does not match the {backend} backend's code: recompute the params")
    if sampling != sampling_settings(teacher):
        raise InputError("sampling does not match the teacher's settings: recompute the params")
    todo = shard_pairs(Path(reviews.path) / REVIEWS_FILE, pairs, prompts)
    module = importlib.import_module(BACKENDS[backend])
    checkpoint = scratch / CHECKPOINT if scratch is not None and getattr(module, "PAIRWISE", False) else None
    finished = _load_checkpoint(checkpoint, todo) if checkpoint else {}
    remaining = [p for p in todo if p.index not in finished]
    began = time.perf_counter()
    extra: dict[str, Any] = {}
    if remaining and checkpoint is not None:
        lock = threading.Lock()
        with open(checkpoint, "a", encoding="utf-8") as handle:

            def done(pair: Pair, generation: Generation) -> None:
                with lock:
                    handle.write(json.dumps(generation.record(pair)) + "\n")
                    handle.flush()

            generated, extra = module.generate(remaining, teacher, done=done)
    elif remaining:
        generated, extra = module.generate(remaining, teacher)
    else:
        generated = []
    wall = time.perf_counter() - began
    finished.update({p.index: g for p, g in zip(remaining, generated, strict=True)})
    generations = [finished[p.index] for p in todo]
    write_generations(out, todo, generations, teacher, json.dumps(sampling, sort_keys=True), model_fingerprint)
    n_new = sum(g.output_tokens for g in generated)
    stats = {
        "backend": backend,
        "range": [todo[0].index, todo[-1].index + 1],
        "pairs": len(todo),
        "errors": sum(g.finish_reason == "error" for g in generations),
        "finish_reasons": {r: sum(g.finish_reason == r for g in generations) for r in FINISH_REASONS},
        "prompt_tokens": sum(g.prompt_tokens for g in generations),
        "output_tokens": sum(g.output_tokens for g in generations),
    }
    measured = {
        "retries": 0,
        "malformed": 0,
        **{k: v for k, v in extra.items() if k != "errors"},
        "wall_s": round(wall, 3),
        "generated_pairs": len(remaining),
        "resumed_pairs": len(todo) - len(remaining),
        "output_tokens_per_s": round(n_new / wall, 2) if wall > 0 and n_new else None,
    }
    write_stats(out, stats, measured)


@generate_shard.configure
def params(cfg: dict[str, Any], *, reviews: Artifact, pairs: tuple[int, int] | list[int]) -> dict[str, Any]:
    """The stage's params for pair range `pairs` of `reviews` (the flow maps `shard_ranges`).

    `{"reviews", "pairs": [first, last], "prompts", "teacher", "model_fingerprint", "backend_code",
    "sampling"}`; the paths in `UNKEYED` stay out of the key. Settings that only another backend
    reads (base_url, vllm_args, batch_size) are blanked, so they cannot re-key this one.
    """
    teacher = for_backend(cfg["teacher"])
    backend = _check_backend(teacher.get("backend"))
    first, last = _pair_range(list(pairs))
    return {
        "reviews": reviews,
        "pairs": [first, last],
        "prompts": cfg["prompts"],
        "teacher": teacher,
        "model_fingerprint": fingerprint(str(teacher["model"])),
        "backend_code": code_version([BACKENDS[backend]]),
        "sampling": sampling_settings(teacher),
    }
