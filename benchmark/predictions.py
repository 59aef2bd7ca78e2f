"""Predictions written next to metrics: one schema and one scoring path for students and the teacher.

A model's raw outputs for the test + hard_test sentences become `predictions.parquet` (ID, split,
sentence, gold target, raw prediction, parsed pairs, the test-type flags) and `metrics.json`
(`score_rows` per test type), whoever produced them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsa_distill.benchmark.protocol import parse_pairs, score_rows

PAIR = pa.struct([("label", pa.string()), ("polarity", pa.string())])
PREDICTIONS = pa.schema(
    [
        ("ID", pa.string()),
        ("split", pa.string()),
        ("sentence", pa.string()),
        ("gold", pa.string()),
        ("prediction", pa.string()),
        ("pairs", pa.list_(PAIR)),
        ("implicit", pa.bool_()),
        ("mams", pa.bool_()),
    ]
)


def write_scored(
    out: Path, task: str, rows: Sequence[dict[str, Any]], predictions: Sequence[str], test_types: Sequence[str]
) -> dict[str, Any]:
    """Parse each prediction against its sentence, write `predictions.parquet` and `metrics.json`."""
    records = []
    for row, prediction in zip(rows, predictions, strict=True):
        pairs = parse_pairs(task, prediction, row["sentence"])
        records.append(
            {
                "ID": row["ID"],
                "split": row["split"],
                "sentence": row["sentence"],
                "gold": row["target"],
                "prediction": prediction,
                "pairs": [{"label": label, "polarity": pol} for label, pol in pairs],
                "implicit": row["implicit"],
                "mams": row["mams"],
            }
        )
    pq.write_table(pa.Table.from_pylist(records, schema=PREDICTIONS), out / "predictions.parquet")
    metrics = score_rows(task, records, test_types)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def read_test_rows(folder: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(task, test + hard_test rows) of an acquired dataset folder."""
    folder = Path(folder)
    task = json.loads((folder / "meta.json").read_text())["task"]
    rows = pq.read_table(folder / "test.parquet").to_pylist() + pq.read_table(folder / "hard_test.parquet").to_pylist()
    return task, rows
