"""Score any model's outputs (an LLM's included) against a benchmark dataset's test sets."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fsa_distill.benchmark.protocol import TEST_TYPES, score_rows
from fsa_distill.benchmark.records import load_test_rows
from fsa_distill.benchmark.specs import get_spec

from fsa_distill.errors import InputError


def read_predictions(path: str | Path) -> dict[str, str]:
    """JSON lines `{"ID": ..., "prediction": "..."}` -> {ID: prediction}; errors name the line."""
    predictions: dict[str, str] = {}
    with open(path, encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: malformed JSON: {exc}") from None
            if not isinstance(record, dict) or "ID" not in record or "prediction" not in record:
                raise InputError(f'{path}:{lineno}: expected an object with "ID" and "prediction"')
            if not isinstance(record["prediction"], str):
                raise InputError(f"{path}:{lineno}: prediction is not a string")
            rid = str(record["ID"])
            if rid in predictions:
                raise InputError(f"{path}:{lineno}: duplicate ID {rid!r}")
            predictions[rid] = record["prediction"]
    return predictions


def score_file(
    dataset: str,
    predictions_path: str | Path,
    source: str,
    custom: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> dict[str, dict[str, float]]:
    """{test_type: {precision, recall, f1}} of a predictions file covering test + hard_test.

    `dataset` is a built-in (read from `source`) or a user dataset declared in `custom` (the composed
    `data.custom`), whose test and hard_test files are read and validated as the acquire stage reads them.
    """
    spec = get_spec(dataset, custom)
    rows = load_test_rows(dataset, source, custom, timeout_s)
    predictions = read_predictions(predictions_path)
    gold_ids = {r["ID"] for r in rows}
    missing = [r["ID"] for r in rows if r["ID"] not in predictions]
    unknown = [i for i in predictions if i not in gold_ids]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} of {len(gold_ids)} test/hard_test IDs have no prediction (e.g. {missing[:3]})"
            )
        if unknown:
            parts.append(f"{len(unknown)} IDs are not in {dataset} test/hard_test (e.g. {unknown[:3]})")
        raise InputError(f"{predictions_path}: " + "; ".join(parts))
    scored: list[dict[str, Any]] = [{**r, "gold": r["target"], "prediction": predictions[r["ID"]]} for r in rows]
    result = score_rows(spec.task, scored, TEST_TYPES)
    return {tt: {k: v[k] for k in ("precision", "recall", "f1")} for tt, v in result.items()}
