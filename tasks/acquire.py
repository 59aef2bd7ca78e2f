"""Stage `acquire`: fetch one benchmark dataset, verify its checksums, normalise it to Parquet.

The source is a URL base or a local folder with the upstream layout. Every sentence is kept,
including those with no aspects (their gold set is empty).
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsa_distill.benchmark.protocol import POLARITIES, is_implicit, is_mams, make_target
from fsa_distill.benchmark.specs import SHA256, SPLITS, get_spec
from fsa_distill.tasks.stage import stage

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


def is_url(source: str) -> bool:
    """Whether a data source is a URL base rather than a local folder."""
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def read_source(source: str, rel_path: str, timeout_s: float = 60.0) -> bytes:
    """Bytes of one upstream file from a URL base or a local mirror folder."""
    if is_url(source):
        url = f"{source.rstrip('/')}/{rel_path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 429 or exc.code >= 500:
                raise TransientError(f"{url}: HTTP {exc.code}") from exc
            raise InputError(f"{url}: HTTP {exc.code} (is data.source right?)") from exc
    path = Path(source).expanduser() / rel_path
    if not path.is_file():
        raise InputError(f"{path}: file not found (data.source / FSA_DATA_SOURCE = {source!r})")
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


def normalise_record(task: str, record: Any, where: str) -> dict[str, Any]:
    """One upstream record -> one row of SCHEMA; raises InputError naming `where` and the record ID."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: record is a {type(record).__name__}, not an object")
    rid = record.get("ID")
    label = f"{where}, record ID {rid!r}"
    if rid is None:
        raise InputError(f"{label}: missing 'ID'")
    if not isinstance(record.get("sentence"), str):
        raise InputError(f"{label}: missing or non-string 'sentence'")
    aspects_in = record.get("aspects") or []
    if not isinstance(aspects_in, list):
        raise InputError(f"{label}: 'aspects' is not a list")
    aspects = []
    for i, aspect in enumerate(aspects_in):
        if not isinstance(aspect, dict):
            raise InputError(f"{label}: aspect {i} is not an object")
        polarity = aspect.get("polarity")
        if polarity not in POLARITIES:
            raise InputError(f"{label}: aspect {i} has polarity {polarity!r}, expected one of {POLARITIES}")
        if task == "acsa" and not isinstance(aspect.get("category"), str):
            raise InputError(f"{label}: aspect {i} has no category (needed for ACSA)")
        aspects.append(
            {
                "from": _offset(aspect.get("from"), f"{label}, aspect {i}"),
                "to": _offset(aspect.get("to"), f"{label}, aspect {i}"),
                "target": aspect.get("target"),
                "category": aspect.get("category"),
                "polarity": polarity,
                "opinion_words": _opinions(aspect.get("opinion_words")),
            }
        )
    return {
        "ID": str(rid),
        "sentence": record["sentence"],
        "aspects": aspects,
        "target": make_target(task, aspects),
        "implicit": is_implicit(aspects),
        "mams": is_mams(aspects),
    }


def load_split(source: str, dataset: str, split: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Read, verify and normalise one split; every failure names the file."""
    spec = get_spec(dataset)
    rel = spec.path(split)
    where = f"{source.rstrip('/')}/{rel}"
    data = read_source(source, rel, timeout_s)
    expected = SHA256.get(rel)
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise InputError(f"{where}: sha256 mismatch (expected {expected}, got {actual}); the file is corrupted")
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where}: malformed JSON: {exc}") from None
    if not isinstance(records, list):
        raise InputError(f"{where}: expected a JSON array of records, got {type(records).__name__}")
    rows = [normalise_record(spec.task, r, f"{where} [record {i}]") for i, r in enumerate(records)]
    ids = [r["ID"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{where}: duplicate record ID {dup!r}")
    for row in rows:
        row["split"] = split
    return rows


@stage("acquire", retries=3, unkeyed=("timeout_s", "source"))
def acquire(
    out: Path,
    *,
    dataset: str,
    source: str,
    checksums: dict[str, str | None],
    limit: int | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Write `<split>.parquet` for the four splits of `dataset`, plus `meta.json` (task, counts)."""
    counts = {}
    for split in SPLITS:
        rows = load_split(source, dataset, split, timeout_s)
        if limit is not None:
            rows = rows[:limit]
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / f"{split}.parquet")
        counts[split] = len(rows)
    spec = get_spec(dataset)
    meta = {"dataset": dataset, "task": spec.task, "slug": spec.slug, "counts": counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


@acquire.configure
def params(cfg: dict[str, Any], *, dataset: str) -> dict[str, Any]:
    """The dataset, its pinned checksums and the row limit make the key; where the files are read
    from (`source`) does not when every file is pinned: verified content is the same from any mirror.
    """
    spec = get_spec(dataset)
    checksums = {spec.path(split): SHA256.get(spec.path(split)) for split in SPLITS}
    data = cfg["data"]
    keyed_source = any(v is None for v in checksums.values())
    return {
        "dataset": dataset,
        "source": data["source"],
        "checksums": {**checksums, **({"source": data["source"]} if keyed_source else {})},
        "limit": data["limit"],
        "timeout_s": data["timeout_s"],
    }


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The `meta.json` of an acquired dataset."""
    return json.loads((Path(folder) / "meta.json").read_text())
