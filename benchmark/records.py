"""Reading the FSA benchmark's data: every split of a built-in or user dataset, verified, validated and
normalised to one row schema (`SCHEMA`), with errors that name the file, the record and the problem.

A built-in's source is a URL base or a local folder with the upstream layout, every file pinned by sha256
(`specs.SHA256`); a file without a pinned checksum (a user's own mirror) is validated record by record. A user
dataset (`data.custom.<name>`, checked by `specs.user_spec`) is JSON, JSON lines, CSV or Parquet files, one per
split, in the benchmark's nested record schema or a flat one-row-per-aspect layout, and is always validated
record by record. Every sentence is kept, including those with no aspects (their gold set is empty).

This is the benchmark's own reading (the acquire stage writes what it returns; `scoring` scores against it),
so it imports no stage.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from fsa_distill.benchmark.files import read_records
from fsa_distill.benchmark.protocol import POLARITIES, is_implicit, is_mams, make_target
from fsa_distill.benchmark.specs import SHA256, UserDatasetSpec, get_spec, is_url

from fsa_distill.errors import InputError, TransientError

ASPECT = pa.struct(
    [
        ("from", pa.int32()),
        ("to", pa.int32()),
        ("target", pa.string()),
        ("category", pa.string()),
        ("polarity", pa.string()),
        ("opinion_words", pa.list_(pa.string())),
    ]
)
SCHEMA = pa.schema(
    [
        ("ID", pa.string()),
        ("split", pa.string()),
        ("sentence", pa.string()),
        ("aspects", pa.list_(ASPECT)),
        ("target", pa.string()),
        ("implicit", pa.bool_()),
        ("mams", pa.bool_()),
    ]
)


def read_source(source: str, rel_path: str, timeout_s: float = 60.0) -> bytes:
    """Bytes of one upstream file from a URL base or a local mirror folder."""
    if is_url(source):
        return _read_url(f"{source.rstrip('/')}/{rel_path}", timeout_s, "data.source")
    path = Path(source).expanduser() / rel_path
    if not path.is_file():
        raise InputError(f"{path}: file not found (data.source / FSA_DATA_SOURCE = {source!r})")
    return path.read_bytes()


def _read_url(url: str, timeout_s: float, setting: str) -> bytes:
    """Bytes at a URL; 429/5xx are transient (retried), other HTTP errors name the setting to check."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 429 or exc.code >= 500:
            raise TransientError(f"{url}: HTTP {exc.code}") from exc
        raise InputError(f"{url}: HTTP {exc.code} (is {setting} right?)") from exc


def read_location(location: str, timeout_s: float = 60.0, setting: str = "data.custom") -> bytes:
    """Bytes of one user file: a URL or a local path."""
    if is_url(location):
        return _read_url(location, timeout_s, setting)
    path = Path(location).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: file not found (check {setting})")
    return path.read_bytes()


def _offset(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: span offset {value!r} is not an integer") from None


def _opinions(value: Any) -> list[str] | None:
    """opinion_words is a string, a list of {from,to,opinion} or strings, or null/empty."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [item["opinion"] if isinstance(item, dict) else str(item) for item in value]
    return [str(value)]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _check_span(task: str, aspect: dict[str, Any], sentence: str, where: str) -> None:
    """Both offsets or neither, inside the sentence; an explicit ATSA term equals its span (or, with no span,
    occurs in the sentence: the scorer only credits terms that are substrings of the sentence)."""
    start, end = aspect["from"], aspect["to"]
    if (start is None) != (end is None):
        given, lacking = ("from", "to") if end is None else ("to", "from")
        raise InputError(f"{where}: the span has '{given}' but no '{lacking}'")
    if start is not None and end is not None and not 0 <= start <= end <= len(sentence):
        raise InputError(f"{where}: span {start}:{end} is outside the sentence (length {len(sentence)})")
    term = aspect["target"]
    if task != "atsa" or term in (None, "NULL"):
        return
    if start is not None and sentence[start:end] != term:
        raise InputError(
            f"{where}: term {term!r} does not match its span {start}:{end}, which is {sentence[start:end]!r}"
        )
    if start is None and term not in sentence:
        raise InputError(f"{where}: term {term!r} does not occur in the sentence")


def normalise_record(
    task: str,
    record: Any,
    where: str,
    *,
    strict: bool = False,
    aspect_where: list[str] | None = None,
    columns: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One upstream record -> one row of SCHEMA; raises InputError naming `where` and the record ID.

    `strict` (user datasets, unpinned files) also rejects an empty sentence, a span outside the sentence and
    an ATSA term that differs from its span. `aspect_where` locates each aspect in the file (flat layout:
    its row); `columns` gives the file's column names for the messages.
    """

    def col(field: str) -> str:
        name = (columns or {}).get(field, field)
        return repr(field) if name == field else f"{field!r} (column {name!r})"

    if not isinstance(record, dict):
        raise InputError(f"{where}: record is a {type(record).__name__}, not an object")
    rid = record.get("ID")
    label = f"{where}, record ID {rid!r}"
    if rid is None:
        raise InputError(f"{label}: missing {col('ID')}")
    sentence = record.get("sentence")
    if not isinstance(sentence, str):
        raise InputError(f"{label}: missing or non-string {col('sentence')}")
    if strict and not sentence.strip():
        raise InputError(f"{label}: empty {col('sentence')}")
    aspects_in = record.get("aspects") or []
    if not isinstance(aspects_in, list):
        raise InputError(f"{label}: {col('aspects')} is not a list")
    aspects = []
    for i, aspect in enumerate(aspects_in):
        at = f"{label}: aspect {i}" + (f" ({aspect_where[i]})" if aspect_where else "")
        if not isinstance(aspect, dict):
            raise InputError(f"{at} is not an object")
        polarity = aspect.get("polarity")
        if polarity not in POLARITIES:
            raise InputError(f"{at} has polarity {polarity!r}, expected one of {POLARITIES}")
        category = aspect.get("category")
        if task == "acsa" and (not isinstance(category, str) or (strict and not category.strip())):
            raise InputError(f"{at} has no category (needed for ACSA; {col('category')})")
        term = aspect.get("target")
        if strict and isinstance(term, str) and not term.strip():
            term = None  # an empty term is an implicit one, like null and "NULL"
        if strict and term is not None and not isinstance(term, str):
            raise InputError(f"{at}: term {term!r} is not a string ({col('target')})")
        normalised = {
            "from": _offset(aspect.get("from"), at),
            "to": _offset(aspect.get("to"), at),
            "target": term,
            "category": category,
            "polarity": polarity,
            "opinion_words": _opinions(aspect.get("opinion_words")),
        }
        if strict:
            _check_span(task, normalised, sentence, at)
        aspects.append(normalised)
    return {
        "ID": str(rid),
        "sentence": sentence,
        "aspects": aspects,
        "target": make_target(task, aspects),
        "implicit": is_implicit(aspects),
        "mams": is_mams(aspects),
    }


def _unique_ids(rows: list[dict[str, Any]], where: str) -> None:
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row["ID"] in first:
            raise InputError(f"{where}: duplicate record ID {row['ID']!r} (records {first[row['ID']]} and {i})")
        first[row["ID"]] = i


def load_split(source: str, dataset: str, split: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Read, verify and normalise one split of a built-in; every failure names the file.

    A file with a pinned checksum is verified by it; one without (a user's own mirror) is validated record
    by record (`normalise_record(strict=True)`).
    """
    spec = get_spec(dataset)
    assert not isinstance(spec, UserDatasetSpec)
    rel = spec.path(split)
    where = f"{source.rstrip('/')}/{rel}"
    data = read_source(source, rel, timeout_s)
    expected = SHA256.get(rel)
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise InputError(f"{where}: sha256 mismatch (expected {expected}, got {actual}); the file is corrupted")
    records = read_records(where, data, "json")
    rows = [normalise_record(spec.task, r, f"{where} [{pos}]", strict=expected is None) for pos, r in records]
    _unique_ids(rows, where)
    for row in rows:
        row["split"] = split
    return rows


# --- user datasets (`data.custom.<name>`) -------------------------------------------------------------------------

_ASPECT_FIELDS = ("target", "category", "polarity", "from", "to", "opinion_words")


Located = tuple[str, dict[str, Any], list[str] | None]  # where, record in the benchmark schema, aspect positions


def _nested(spec: UserDatasetSpec, location: str, records: list[tuple[str, Any]]) -> list[Located]:
    """One record per sentence, aspects nested (the benchmark's schema, columns renamed); no ID: its index."""
    cols = spec.columns
    if not any(isinstance(r, dict) and cols["aspects"] in r for _, r in records):
        raise InputError(
            f"{location}: no record has an {cols['aspects']!r} field (the list of aspects); "
            "set columns.aspects, or layout: flat for one row per aspect"
        )
    located: list[Located] = []
    for i, (pos, record) in enumerate(records):
        where = f"{location} [{pos}]"
        if not isinstance(record, dict):
            raise InputError(f"{where}: record is a {type(record).__name__}, not an object")
        aspects = record.get(cols["aspects"])
        if isinstance(aspects, list):
            aspects = [{f: a.get(cols[f]) for f in _ASPECT_FIELDS} if isinstance(a, dict) else a for a in aspects]
        rid = record.get(cols["ID"])
        out = {"ID": i if rid is None else rid, "sentence": record.get(cols["sentence"]), "aspects": aspects}
        located.append((where, out, None))
    return located


def _flat(spec: UserDatasetSpec, location: str, records: list[tuple[str, Any]]) -> list[Located]:
    """One row per aspect, grouped into sentences by ID (in order of first appearance). A row with no
    polarity, term or category is a sentence without aspects."""
    cols = spec.columns
    required = ("ID", "sentence", "polarity", "target" if spec.task == "atsa" else "category")
    groups: dict[str, dict[str, Any]] = {}
    for pos, row in records:
        where = f"{location} [{pos}]"
        if not isinstance(row, dict):
            raise InputError(f"{where}: row is a {type(row).__name__}, not an object")
        for field_name in required:
            if cols[field_name] not in row:
                raise InputError(
                    f"{where}: no column {cols[field_name]!r} ({field_name}; set columns.{field_name}); "
                    f"the row has {', '.join(map(str, row)) or 'no columns'}"
                )
        rid = row[cols["ID"]]
        if _blank(rid):
            raise InputError(f"{where}: empty ID (column {cols['ID']!r}): a flat layout groups rows by ID")
        rid = str(int(rid)) if isinstance(rid, float) and rid.is_integer() else str(rid)
        sentence = row[cols["sentence"]]
        if not isinstance(sentence, str) or not sentence.strip():
            raise InputError(f"{where}, record ID {rid!r}: missing or empty 'sentence' (column {cols['sentence']!r})")
        group = groups.setdefault(rid, {"ID": rid, "sentence": sentence, "aspects": [], "rows": [], "first": pos})
        if group["sentence"] != sentence:
            raise InputError(
                f"{where}, record ID {rid!r}: its sentence differs from the one in {group['first']} (same ID)"
            )
        aspect = {f: row.get(cols[f]) for f in _ASPECT_FIELDS}
        if all(_blank(aspect[f]) for f in ("polarity", "target", "category")):
            continue  # a sentence with no aspects
        group["aspects"].append(aspect)
        group["rows"].append(pos)
    return [
        (f"{location} [record {k}]", {f: g[f] for f in ("ID", "sentence", "aspects")}, g["rows"])
        for k, g in enumerate(groups.values())
    ]


def _load_user_file(spec: UserDatasetSpec, split: str, timeout_s: float) -> tuple[list[dict[str, Any]], str]:
    """Rows of one user split (every record validated) and the sha256 of its bytes."""
    location = spec.files[split]
    data = read_location(location, timeout_s, f"data.custom.{spec.name}.files.{split}")
    actual = hashlib.sha256(data).hexdigest()
    expected = spec.sha256.get(split)
    if expected is not None and actual != expected:
        raise InputError(
            f"{location}: sha256 {actual} does not match {expected} (pinned in data.custom.{spec.name}.sha256."
            f"{split}, or the file's content when the run was configured): a different or edited file"
        )
    fmt, layout = spec.formats[split], spec.layouts[split]
    records = read_records(location, data, fmt, spec.delimiter, "row" if layout == "flat" else "record")
    located = _flat(spec, location, records) if layout == "flat" else _nested(spec, location, records)
    rows = [
        normalise_record(spec.task, record, where, strict=True, aspect_where=rows_at, columns=dict(spec.columns))
        for where, record, rows_at in located
    ]
    _unique_ids(rows, location)
    for row in rows:
        row["split"] = split
    return rows, actual


def load_user_split(spec: UserDatasetSpec, split: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Read and validate one split of a user dataset: rows of SCHEMA, or an InputError naming file, record and
    problem. An absent hard_test is an empty split."""
    if split not in spec.files:
        if split == "hard_test":
            return []
        raise InputError(f"user dataset {spec.name!r} has no {split!r} split")
    return _load_user_file(spec, split, timeout_s)[0]


def load_user_dataset(
    spec: UserDatasetSpec, timeout_s: float = 60.0
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Every split of a user dataset, all validated before any is returned, and each file's sha256.

    test and hard_test IDs must not overlap: predictions are scored by ID over both.
    """
    splits: dict[str, list[dict[str, Any]]] = {}
    digests: dict[str, str] = {}
    for split in spec.files:
        splits[split], digests[split] = _load_user_file(spec, split, timeout_s)
    _distinct_test_ids(spec, splits.get("test", []), splits.get("hard_test", []))
    return splits, digests


def _distinct_test_ids(spec: UserDatasetSpec, test: list[dict[str, Any]], hard_test: list[dict[str, Any]]) -> None:
    test_ids = {r["ID"] for r in test}
    both = [r["ID"] for r in hard_test if r["ID"] in test_ids]
    if both:
        raise InputError(
            f"{spec.files['hard_test']}: record ID {both[0]!r} is also in {spec.files['test']} "
            f"({len(both)} shared); test and hard_test are scored together by ID, so IDs must differ"
        )


def load_test_rows(
    dataset: str, source: str, custom: Mapping[str, Any] | None = None, timeout_s: float = 60.0
) -> list[dict[str, Any]]:
    """The gold rows a model's predictions are scored against: test + hard_test of a built-in (read from
    `source`) or of a user dataset declared in `custom` (the composed `data.custom`; its files say where)."""
    spec = get_spec(dataset, custom)
    if isinstance(spec, UserDatasetSpec):
        test, hard_test = (load_user_split(spec, split, timeout_s) for split in ("test", "hard_test"))
        _distinct_test_ids(spec, test, hard_test)
        return test + hard_test
    return load_split(source, dataset, "test", timeout_s) + load_split(source, dataset, "hard_test", timeout_s)
