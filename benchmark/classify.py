"""Sentiment classification as the teacher and the students are asked it: the sample, the prompts,
matching a generated answer to a label word, and the predictions written next to the metrics.

The same seeded sample and the same prompts serve every model, so teacher and students are scored
on the same sentences (benchmark/icl.py builds the prompts; benchmark/sentiment.py scores).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsa_distill.benchmark.icl import extract_label, sentiment_prompts
from fsa_distill.benchmark.sentiment import SentimentSpec, get_dataset, load_split, score_rows

from fsa_distill.errors import InputError

SAMPLE_SEED = 0  # one sample for every seed, k and model, so they are scored on the same sentences
PREDICTIONS = pa.schema(
    [("ID", pa.int64()), ("text", pa.string()), ("gold", pa.string()), ("prediction", pa.string()),
     ("answer", pa.string()), ("scores", pa.list_(pa.float64()))]
)  # fmt: skip


def sample_rows(rows: list[dict[str, Any]], sample: int | None) -> list[dict[str, Any]]:
    """A seeded sample of `sample` rows in their original order (all rows when None or larger)."""
    if sample is None or sample >= len(rows):
        return rows
    keep = sorted(random.Random(SAMPLE_SEED).sample(range(len(rows)), sample))
    return [rows[i] for i in keep]


def settings(cfg: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What a sentiment evaluation's questions depend on: the set's entry and its files' content (not
    where they are: `source` is for unkeyed use), k and the sample size."""
    from fsa_distill.artifacts import sha256_file

    zs = cfg["zeroshot"]
    spec = get_dataset(cfg["sentiment"], dataset)
    files = {}
    for split, path in spec.files.items():
        if split in ("train", "test"):
            if not path.is_file():
                raise InputError(
                    f"{path}: file not found (sentiment dataset {dataset!r}, split {split!r}; "
                    f"sentiment.source / FSA_SENTIMENT_SOURCE = {cfg['sentiment'].get('source')!r})"
                )
            files[split] = sha256_file(path)
    entry = dict(cfg["sentiment"]["datasets"][dataset])
    return {
        "entry": {k: v for k, v in entry.items() if k != "source"},
        "source": entry.get("source"),
        "files": files,
        "k": zs["k"],
        "sample": zs["sample"],
    }


def inputs(settings: dict[str, Any], dataset: str, seed: int) -> tuple[SentimentSpec, list[dict[str, Any]], list[str]]:
    """(spec, scored rows, prompts) of one sentiment set for `settings`."""
    entry = {**settings["entry"], "source": settings["source"]}
    spec = get_dataset({"datasets": {dataset: entry}}, dataset)
    rows = sample_rows(load_split(spec, "test"), settings["sample"])
    pool = [{"sentence": r["text"], "label": r["label"]} for r in load_split(spec, "train")] if settings["k"] else []
    tests = [{"sentence": r["text"], "label": r["label"]} for r in rows]
    return spec, rows, sentiment_prompts(spec.instruction, tests, pool, k=settings["k"], seed=seed)


def match_label(answer: str, labels: tuple[str, ...]) -> str:
    """The label word that occurs first in a generated answer (case-insensitive), else the answer itself."""
    text = extract_label(answer).lower()
    found = [(text.find(label.lower()), label) for label in labels if label.lower() in text]
    return min(found)[1] if found else text


def write(out: Path, spec: SentimentSpec, rows: list[dict[str, Any]], predictions: list[str], answers: list[str],
          scores: list[list[float]], extra: dict[str, Any]) -> None:  # fmt: skip
    """`predictions.parquet` and `metrics.json` (macro-F1 over the set's labels, accuracy, method, size)."""
    records = [
        {"ID": r["ID"], "text": r["text"], "gold": r["label"], "prediction": p, "answer": a, "scores": s}
        for r, p, a, s in zip(rows, predictions, answers, scores, strict=True)
    ]
    pq.write_table(pa.Table.from_pylist(records, schema=PREDICTIONS), out / "predictions.parquet")
    metrics = score_rows(spec, rows, {str(r["ID"]): p for r, p in zip(rows, predictions, strict=True)})
    (out / "metrics.json").write_text(json.dumps({**metrics, **extra}, indent=1))
