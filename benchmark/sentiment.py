"""Zero-shot sentiment classification sets: specs from config, validated loading, macro-F1 and scoring.

The built-ins (sst2, imdb, yelp2, twitter) and any user set are declared in `conf/sentiment/` only; this
module turns one `sentiment.datasets.<name>` entry into a `SentimentSpec`, reads its split files (JSON array,
JSON lines, CSV or Parquet) into rows `{"ID": row index, "text", "label"}`, and scores predictions the way
upstream `icl_multifaced.py` does (macro-F1 and accuracy), except that macro-F1 is averaged over the set's
own labels. Pure Python + pyarrow: no torch, no stage imports.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsa_distill.benchmark.files import COMMAS, format_of, read_records

from fsa_distill.errors import InputError

Row = dict[str, Any]


@dataclass(frozen=True)
class SentimentSpec:
    """One validated sentiment set: where each split's file is and how to read and label its records."""

    name: str
    files: Mapping[str, Path]
    text_column: str
    label_column: str
    labels: tuple[str, ...]
    instruction: str
    formats: Mapping[str, str]
    delimiter: str | None = None
    label_map: Mapping[str, str] | None = None
    sha256: Mapping[str, str] | None = None

    @property
    def splits(self) -> tuple[str, ...]:
        """The declared split names, in declaration order."""
        return tuple(self.files)


def spec_from_config(name: str, entry: Mapping[str, Any]) -> SentimentSpec:
    """Check one `sentiment.datasets.<name>` entry (plain dict) and resolve its files, so errors name the key."""
    where = f"sentiment.datasets.{name}"
    if entry.get("name") not in (None, name):
        raise InputError(f"{where}.name is {entry['name']!r}; it must equal the key {name!r} (or be left out)")
    labels = list(entry.get("labels") or [])
    if not labels:
        raise InputError(f"{where}.labels is empty: list the label words, e.g. [negative, positive]")
    if any(not isinstance(label, str) or not label.strip() for label in labels):
        raise InputError(f"{where}.labels: every label word must be a non-empty string, got {labels}")
    if len(set(labels)) != len(labels):
        raise InputError(f"{where}.labels has duplicates: {labels}")
    files = dict(entry.get("files") or {})
    if "test" not in files:
        raise InputError(f"{where}.files must name a `test` split (the scored one); got {sorted(files) or 'none'}")
    instruction = entry.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError(f"{where}.instruction is missing or empty")
    label_map = {_raw_key(k): v for k, v in (entry.get("label_map") or {}).items()}
    bad = {k: v for k, v in label_map.items() if v not in labels}
    if bad:
        raise InputError(f"{where}.label_map maps to words that are not labels: {bad}; labels: {labels}")
    sha256 = dict(entry.get("sha256") or {})
    unknown = sorted(set(sha256) - set(files))
    if unknown:
        raise InputError(f"{where}.sha256 names splits that have no file: {unknown}")
    source = entry.get("source")
    base = Path(source).expanduser() if source else Path()
    paths = {split: base / Path(str(rel)).expanduser() for split, rel in files.items()}
    formats = {split: format_of(path, entry.get("format"), f"{where}.files.{split}") for split, path in paths.items()}
    return SentimentSpec(
        name=name,
        files=paths,
        text_column=str(entry.get("text_column") or "sentence"),
        label_column=str(entry.get("label_column") or "label"),
        labels=tuple(labels),
        instruction=instruction,
        formats=formats,
        delimiter=entry.get("delimiter"),
        label_map=label_map or None,
        sha256=sha256 or None,
    )


def get_dataset(sentiment_cfg: Mapping[str, Any], name: str) -> SentimentSpec:
    """Look a set up in the composed `sentiment` config, listing the known names when it is not there."""
    datasets = sentiment_cfg.get("datasets") or {}
    if name not in datasets:
        raise ValueError(f"unknown sentiment dataset {name!r}; known: {', '.join(datasets) or 'none'}")
    return spec_from_config(name, datasets[name])


def _raw_key(value: Any) -> str:
    """A raw label value as a label_map key: YAML `0`, Parquet `0`/`0.0` and CSV "0" all meet as "0"."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _label_of(spec: SentimentSpec, value: Any, where: str) -> str:
    """The record's label word: mapped through label_map when set; anything else lists the allowed labels."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{where}: missing label (column {spec.label_column!r})")
    key = _raw_key(value)
    word = spec.label_map.get(key) if spec.label_map else None
    if word is None and key in spec.labels:
        word = key
    if word is None:
        allowed = ", ".join(spec.labels)
        if spec.label_map:
            allowed = f"{allowed} (or a label_map key: {', '.join(spec.label_map)})"
        raise InputError(f"{where}: unknown label {value!r}; allowed: {allowed}")
    return word


def load_split(spec: SentimentSpec, split: str) -> list[Row]:
    """Read and validate one split: rows `{"ID": 0-based row index, "text", "label"}`, all or an InputError.

    Every error names the file, the record (row index, and line for text formats) and the problem.
    """
    if split not in spec.files:
        raise InputError(f"sentiment dataset {spec.name!r} has no {split!r} split; it has {', '.join(spec.files)}")
    path = spec.files[split]
    if not path.is_file():
        raise InputError(f"{path}: file not found (sentiment dataset {spec.name!r}, split {split!r})")
    data = path.read_bytes()
    expected = (spec.sha256 or {}).get(split)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise InputError(
            f"{path}: sha256 {hashlib.sha256(data).hexdigest()} does not match the pinned {expected} "
            f"(sentiment.datasets.{spec.name}.sha256.{split}); is the source the right copy?"
        )
    records = read_records(path, data, spec.formats[split], spec.delimiter, style=COMMAS)
    rows: list[Row] = []
    for i, (where_in_file, record) in enumerate(records):
        where = f"{path}, {where_in_file}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: record is a {type(record).__name__}, not an object")
        text_value = record.get(spec.text_column)
        if not isinstance(text_value, str) or not text_value.strip():
            problem = "missing" if text_value is None else ("empty" if isinstance(text_value, str) else "not a string")
            raise InputError(f"{where}: text column {spec.text_column!r} is {problem}")
        label = _label_of(spec, record.get(spec.label_column), where)
        rows.append({"ID": i, "text": text_value, "label": label})
    return rows


def load_dataset(spec: SentimentSpec, splits: Sequence[str] | None = None) -> dict[str, list[Row]]:
    """Every (or the named) split, all validated before any is returned, so a caller never writes half a set."""
    return {split: load_split(spec, split) for split in (splits or spec.splits)}


def write_dataset(spec: SentimentSpec, out_dir: str | Path) -> dict[str, Path]:
    """Normalise a set to `<out_dir>/<split>.parquet` (ID, text, label): validate all splits first, then
    write each file atomically (temp file + rename), so a bad record leaves nothing half-written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    loaded = load_dataset(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("ID", pa.int64()), ("text", pa.string()), ("label", pa.string())])
    written: dict[str, Path] = {}
    for split, rows in loaded.items():
        target = out / f"{split}.parquet"
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{split}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written[split] = target
    return written


def per_label(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per label; a prediction outside `labels` is a positive of no class."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels, predictions {len(pred)}")
    result: dict[str, dict[str, float]] = {}
    for label in labels:
        tp = sum(1 for g, p in zip(gold, pred, strict=True) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, pred, strict=True) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, pred, strict=True) if g == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        result[label] = {"precision": precision, "recall": recall, "f1": f1, "support": float(tp + fn)}
    return result


def macro_f1(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean F1 over the set's own labels (sklearn's `f1_score(average="macro", labels=labels)`).

    Upstream lets sklearn take the union of gold and predicted labels; a stray prediction would then add a
    zero-F1 class and shrink the average, so here it only costs its gold class a false negative.
    """
    if not labels:
        raise ValueError("macro_f1 needs at least one label")
    scores = per_label(gold, pred, labels)
    return sum(s["f1"] for s in scores.values()) / len(labels)


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Share of exact matches (0.0 for no rows)."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels, predictions {len(pred)}")
    return sum(1 for g, p in zip(gold, pred, strict=True) if g == p) / len(gold) if gold else 0.0


def score_rows(spec: SentimentSpec, rows: Sequence[Row], predictions: Mapping[str, str]) -> dict[str, Any]:
    """Score predictions (by str(ID)) that cover `rows` exactly; missing or unknown IDs are one clear error."""
    ids = {str(r["ID"]) for r in rows}
    missing = [r["ID"] for r in rows if str(r["ID"]) not in predictions]
    unknown = [i for i in predictions if i not in ids]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(rows)} test IDs have no prediction (e.g. {missing[:3]})")
        if unknown:
            parts.append(
                f"{len(unknown)} IDs are not row indices of {spec.name} test (0..{len(rows) - 1}) (e.g. {unknown[:3]})"
            )
        raise InputError("; ".join(parts))
    gold = [r["label"] for r in rows]
    # upstream strips the predicted label word; anything that is then no label word is wrong
    pred = [predictions[str(r["ID"])].strip() for r in rows]
    return {
        "dataset": spec.name,
        "n": len(rows),
        "macro_f1": macro_f1(gold, pred, spec.labels),
        "accuracy": accuracy(gold, pred),
        "invalid": sum(1 for p in pred if p not in spec.labels),
        "labels": list(spec.labels),
        "per_label": per_label(gold, pred, spec.labels),
    }


def score_sentiment_file(
    dataset_cfg: SentimentSpec | Mapping[str, Any], predictions_path: str | Path
) -> dict[str, Any]:
    """Score a JSON-lines predictions file (`{"ID": row index, "prediction": label word}`) against `test`.

    `dataset_cfg` is a spec or one config entry (which must then carry its `name`).
    """
    from fsa_distill.benchmark.scoring import read_predictions

    if isinstance(dataset_cfg, SentimentSpec):
        spec = dataset_cfg
    else:
        if not dataset_cfg.get("name"):
            raise InputError("score_sentiment_file: the dataset entry has no name; pass get_dataset(...)'s spec")
        spec = spec_from_config(str(dataset_cfg["name"]), dataset_cfg)
    rows = load_split(spec, "test")
    predictions = read_predictions(predictions_path)
    try:
        return score_rows(spec, rows, predictions)
    except InputError as exc:
        raise InputError(f"{predictions_path}: {exc}") from None
