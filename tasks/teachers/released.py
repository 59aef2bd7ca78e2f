"""Stage `released`: import existing teacher outputs (the paper's released Mixtral answers).

The file is JSON lines `{"ID", "Text", "Overall", "<teacher.released_field>"}` (a BOM possible);
rows become the `generations.parquet` schema of the generate stage, so later stages cannot tell
imported from generated outputs. What was not recorded is filled honestly: the prompt is
inferred from the answer's shape, finish_reason is "stop", tokens are whitespace words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fsa_distill.tasks.stage import stage
from fsa_distill.tasks.teachers.common import Generation, Pair, sha256_text, write_generations, write_stats

from fsa_distill.artifacts import sha256_file
from fsa_distill.errors import InputError

ANALYSIS_MARKER = "Opinion Target 1:"
VERSION = "released"


def released_params(teacher: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """Stage parameters for `import_released` from the teacher settings alone (`import_released.params`).

    The file's content hash is keyed, its path is not (`unkeyed`); of the teacher, only what the
    output records is passed: its label and model name, the answer's field and the review cap.
    """
    path = path or teacher.get("released_path")
    if not path:
        raise InputError("teacher.released_path is not set")
    if not Path(path).is_file():
        raise InputError(f"teacher.released_path: {path} does not exist")
    kept = {k: teacher.get(k) for k in ("name", "model", "released_field", "max_reviews")}
    return {"path": str(path), "fingerprint": sha256_file(path), "teacher": kept}


def infer_prompt(output: str) -> str:
    """The paper's two prompts answer differently: numbered target blocks, or a rewritten review."""
    return "analysis" if ANALYSIS_MARKER in output else "rewriting"


def read_released(path: Path, field: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Parsed records (ID as str, Text, output); a malformed line is an `InputError` naming it."""
    records: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.lstrip("\ufeff").strip()
            if not line:
                continue
            if limit is not None and len(records) >= limit:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in ("ID", "Text", field) if record.get(k) is None]
            if missing:
                raise InputError(f"{path}: line {number}: missing {', '.join(missing)}")
            if not isinstance(record["Text"], str) or not isinstance(record[field], str):
                raise InputError(f"{path}: line {number}: Text and {field} must be strings")
            review_id, output = str(record["ID"]), record[field]
            key = (review_id, infer_prompt(output))
            if key in seen:
                raise InputError(
                    f"{path}: line {number}: a second {key[1]} answer for ID {review_id} (first on line {seen[key]})"
                )
            seen[key] = number
            records.append({"review_id": review_id, "review": record["Text"], "output": output})
    return records


@stage("released", unkeyed=("path",))
def import_released(out: Path, *, path: str, fingerprint: str, teacher: dict[str, Any]) -> None:
    """Write `generations.parquet` and `stats.json` from a released-outputs file."""
    source = Path(path)
    if not source.is_file():
        raise InputError(f"{source}: released outputs file not found")
    if sha256_file(source) != fingerprint:
        raise InputError(f"{source}: content changed since its fingerprint was taken; recompute the params")
    field = teacher.get("released_field")
    if not field:
        raise InputError("teacher.released_field is not set (the answer's key, e.g. mixtral_response)")
    records = read_released(source, field, teacher.get("max_reviews"))
    pairs, generations = [], []
    for index, r in enumerate(records):
        prompt = infer_prompt(r["output"])
        pairs.append(Pair(index, r["review_id"], r["review"], prompt, VERSION, None, r["review"]))
        # The prompt actually sent is unknown; the review text is the part of it we know.
        generations.append(
            Generation(
                sha256_text(r["review"]), r["output"], "stop", len(r["review"].split()), len(r["output"].split()), 0.0
            )
        )
    write_generations(out, pairs, generations, teacher, json.dumps({"released": True}), str(teacher["model"]))
    counts = {p: sum(q.prompt == p for q in pairs) for p in ("analysis", "rewriting")}
    write_stats(out, {"backend": "released", "pairs": len(pairs), "errors": 0, "prompts": counts})


@import_released.configure
def params(cfg: dict[str, Any]) -> dict[str, Any]:
    """`{"path", "fingerprint", "teacher": {name, model, released_field, max_reviews}}`; `path` is unkeyed."""
    return released_params(cfg["teacher"])
