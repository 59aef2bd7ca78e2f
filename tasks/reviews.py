"""Stage `reviews`: read raw review corpora into one table, quarantining bad rows instead of failing.

Every configured source (a known layout or a user file in CSV, JSON lines, Parquet or a hub
dataset) becomes rows of one `reviews.parquet` (id, text, rating, domain, source). A row that
cannot be used (empty text, invalid UTF-8, too long, no numeric rating, no or duplicate id, an
unparseable line) goes to `quarantine.parquet` with its reason; a file that cannot be used at all
(missing, not CSV / JSON lines / Parquet, no text column) is an `InputError` naming it. The cache
key follows the content of the input files through `source_fingerprints`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsa_distill.tasks.stage import stage

from fsa_distill.artifacts import sha256_file
from fsa_distill.errors import InputError, TransientError

KINDS = ("yelp", "amazon_multidomain", "alexa", "csv", "jsonl", "parquet", "hf")
REASONS = (
    "malformed_record",  # a line / row that does not parse (bad JSON, wrong number of CSV fields)
    "invalid_utf8",  # the text is not valid UTF-8
    "empty_text",  # text missing, empty or whitespace-only
    "too_long",  # text longer than max_bytes bytes of UTF-8
    "bad_rating",  # rating missing, not a number, or not finite
    "missing_id",  # the id column is empty for this row
    "duplicate_id",  # a second row with the id of an earlier kept row of the same source
)
QUARANTINE_TEXT_CHARS = 1000

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("rating", pa.float64(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("file", pa.string()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("reason", pa.string()),
        ("text", pa.string()),
    ]
)


@dataclass(frozen=True)
class Layout:
    """How to read one source: the reader and the columns that hold text, rating, id and domain."""

    reader: str  # csv | jsonl | parquet | hf
    text: str
    rating: str | None
    id: str | None
    domain_column: str | None
    delimiter: str | None = None  # csv only; None: tab for .tsv files, else comma
    suffixes: tuple[str, ...] = ()


_GENERIC_SUFFIXES = {
    "csv": (".csv", ".tsv"),
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "parquet": (".parquet",),
}


def layout(src: dict[str, Any]) -> Layout:
    """The reading recipe of a source: fixed for the known layouts, from its *_column settings otherwise."""
    kind = src.get("kind")
    if kind == "yelp":
        return Layout("csv", "text", "stars", "review_id", None, ",", (".csv",))
    if kind == "amazon_multidomain":
        return Layout("jsonl", "review_text", "rating", "unique_id", "domain", None, (".jsonl",))
    if kind == "alexa":
        return Layout("csv", "verified_reviews", "rating", None, None, "\t", (".tsv",))
    if kind in ("csv", "jsonl", "parquet", "hf"):
        return Layout(
            kind,
            src.get("text_column") or "text",
            src.get("rating_column"),
            src.get("id_column"),
            src.get("domain_column"),
            src.get("delimiter"),
            _GENERIC_SUFFIXES.get(kind, ()),
        )
    raise InputError(f"reviews.sources[{src.get('name')!r}]: unknown kind {kind!r}; known: {', '.join(KINDS)}")


def _check_sources(reviews_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    sources = list(reviews_cfg.get("sources") or [])
    if not sources:
        raise InputError("reviews.sources is empty: configure at least one review source")
    names = [s.get("name") for s in sources]
    for name in names:
        if not name or names.count(name) > 1:
            raise InputError(f"reviews.sources: source names must be non-empty and unique, got {names}")
    for src in sources:
        layout(src)
    return sources


def _root(reviews_cfg: dict[str, Any]) -> Path:
    return Path(str(reviews_cfg.get("root") or ".")).expanduser()


def _resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _key(root: Path, name: str, path: Path) -> str:
    """A location-independent label for a file: relative to the root when it lies below it."""
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = str(path)
    return f"{name}:{rel}"


def source_files(root: Path, src: dict[str, Any]) -> list[Path]:
    """The files of a local source: the file itself, or the matching files of a folder (sorted)."""
    lay = layout(src)
    path = _resolve(root, src["path"])
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in lay.suffixes)
        if not files:
            raise InputError(f"{path}: folder of source {src['name']!r} holds no {'/'.join(lay.suffixes)} files")
        return files
    raise InputError(f"{path}: file not found (source {src['name']!r}, reviews.root = {str(root)!r})")


def source_fingerprints(reviews_cfg: dict[str, Any]) -> dict[str, str]:
    """sha256 of every input file (and exclude-ids file), so the stage's cache key follows file content.

    Keys are `<source>:<path relative to root>`; an `hf` source is identified by its dataset name
    and split, since its content is not on disk.
    """
    root = _root(reviews_cfg)
    prints: dict[str, str] = {}
    for src in _check_sources(reviews_cfg):
        if layout(src).reader == "hf":
            prints[f"{src['name']}:hf"] = f"hf:{src['path']}:{src.get('split') or 'train'}"
            continue
        for path in source_files(root, src):
            prints[_key(root, src["name"], path)] = sha256_file(path)
        if src.get("exclude_ids"):
            path = _resolve(root, src["exclude_ids"])
            if not path.is_file():
                raise InputError(f"{path}: exclude_ids file of source {src['name']!r} not found")
            prints[_key(root, src["name"], path) + "#exclude_ids"] = sha256_file(path)
    return prints


@dataclass
class Raw:
    """The cells of one file before validation; text is bytes (decoded per row) or str."""

    file: str
    rows: list[int] = field(default_factory=list)
    texts: list[Any] = field(default_factory=list)
    ratings: list[Any] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    domains: list[Any] = field(default_factory=list)
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (row, raw text) of unparseable records


def _column(table: pa.Table, name: str | None) -> list[Any]:
    if name is None:
        return [None] * table.num_rows
    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = col.cast(pa.large_binary())  # decoded per cell, so one bad cell does not fail the file
    return col.to_pylist()


def _require(table: pa.Table, lay: Layout, where: str) -> None:
    for role, name in (("text", lay.text), ("rating", lay.rating), ("id", lay.id), ("domain", lay.domain_column)):
        if name is not None and name not in table.column_names:
            raise InputError(f"{where}: no {role} column {name!r}; the columns are {table.column_names}")


def _from_table(table: pa.Table, lay: Layout, where: str) -> Raw:
    _require(table, lay, where)
    raw = Raw(file=where, rows=list(range(1, table.num_rows + 1)))
    raw.texts = _column(table, lay.text)
    raw.ratings = _column(table, lay.rating)
    raw.ids = _column(table, lay.id)
    raw.domains = _column(table, lay.domain_column)
    return raw


def read_csv(data: bytes, lay: Layout, where: str) -> Raw:
    """A CSV/TSV file (BOM allowed, quoted newlines allowed); rows with a wrong field count are quarantined."""
    if not data.strip():
        raise InputError(f"{where}: empty file, not CSV")
    delimiter = lay.delimiter or ("\t" if where.lower().endswith(".tsv") else ",")
    header = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8-sig", errors="replace")
    names = next(csv.reader([header], delimiter=delimiter))
    malformed: list[tuple[int, str]] = []

    def on_invalid(row: Any) -> str:
        malformed.append((int(row.number or 0) - 1, row.text))  # number counts the header line
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 26),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, newlines_in_values=True, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                check_utf8=False,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, ValueError) as exc:
        raise InputError(f"{where}: not parseable as CSV (delimiter {delimiter!r}): {exc}") from None
    total = table.num_rows + len(malformed)
    if malformed and len(malformed) * 2 > total:
        raise InputError(
            f"{where}: not parseable as CSV (delimiter {delimiter!r}): {len(malformed)} of {total} rows have "
            f"a different number of fields than the header ({len(names)}), e.g. row {malformed[0][0]}"
        )
    raw = _from_table(table, lay, where)
    # Record numbers count every data row, including the malformed ones that the parser skipped.
    bad = {r for r, _ in malformed}
    raw.rows = [n for n in range(1, total + 1) if n not in bad]
    raw.malformed = malformed
    return raw


def read_jsonl(data: bytes, lay: Layout, where: str) -> Raw:
    """JSON lines, one object per line; a bad line is quarantined, a file with no object line is an error."""
    raw = Raw(file=where)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    parsed = 0
    has_text = False
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        # Invalid bytes become lone surrogates: the record still parses, and only a field that holds
        # them (the text: quarantined as invalid_utf8) is affected.
        text = line.decode("utf-8", errors="surrogateescape")
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raw.malformed.append((number, text))
            continue
        parsed += 1
        has_text = has_text or lay.text in record
        raw.rows.append(number)
        raw.texts.append(record.get(lay.text))
        raw.ratings.append(record.get(lay.rating) if lay.rating else None)
        raw.ids.append(record.get(lay.id) if lay.id else None)
        raw.domains.append(record.get(lay.domain_column) if lay.domain_column else None)
    if parsed == 0:
        raise InputError(f"{where}: not parseable as JSON lines (no line is a JSON object)")
    if not has_text:
        raise InputError(f"{where}: no record has the text field {lay.text!r}")
    return raw


def read_parquet(data: bytes, lay: Layout, where: str) -> Raw:
    """A Parquet file; the configured columns must exist."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where}: not a readable Parquet file: {exc}") from None
    return _from_table(table, lay, where)


def read_hf(src: dict[str, Any], lay: Layout) -> Raw:
    """A dataset from the Hugging Face hub (needs hub access or a local datasets cache)."""
    path, split = src["path"], src.get("split") or "train"
    where = f"hf:{path}[{split}]"
    try:
        import datasets

        table = datasets.load_dataset(path, split=split).with_format("arrow")[:]
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")
        hint = (
            "HF_HUB_OFFLINE is set, so only a locally cached copy can be used; set HF_HUB_OFFLINE=0 for hub access"
            if offline
            else "check the dataset name, split and hub access"
        )
        message = f"{where}: cannot load hub dataset {path!r} split {split!r} ({type(exc).__name__}: {exc}); {hint}"
        if not offline and isinstance(exc, ConnectionError | TimeoutError):
            raise TransientError(message) from exc
        raise InputError(message) from exc
    return _from_table(table, lay, where)


def _as_text(value: Any) -> tuple[str | None, str | None]:
    """(text, problem) of a cell: bytes are decoded strictly, lone surrogates are invalid too."""
    if value is None:
        return None, None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None, "invalid_utf8"
        return value, None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value), None
    return None, "malformed_record"


def _lossy(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    else:
        text = str(value).encode("utf-8", errors="replace").decode("utf-8")
    return text[:QUARANTINE_TEXT_CHARS]


def _rating(value: Any) -> float | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, bool) or value is None:
        return None
    try:
        rating = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return rating if math.isfinite(rating) else None


def _plain(value: Any) -> str | None:
    """An id or domain cell as a stripped string (None when empty)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).encode("utf-8", errors="replace").decode("utf-8").strip()
    return text or None


def sample_key(seed: int, review_id: str) -> int:
    """The rank of a review in per-domain sampling: a seeded hash of its id, independent of file order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{review_id}".encode(), digest_size=8).digest(), "big")


@stage("reviews", retries=2, unkeyed=("reviews.root",))
def reviews(out: Path, *, reviews: dict[str, Any], fingerprints: dict[str, str]) -> None:
    """Write `reviews.parquet`, `quarantine.parquet` and `stats.json` for the configured sources.

    `fingerprints` is `source_fingerprints(reviews)`: it is part of the cache key and is checked
    again here, so an output never belongs to files other than the ones its key names.
    """
    cfg = reviews
    root = _root(cfg)
    sources = _check_sources(cfg)
    now = source_fingerprints(cfg)
    if now != dict(fingerprints):
        changed = sorted(k for k in set(now) | set(fingerprints) if now.get(k) != fingerprints.get(k))
        raise InputError(f"review files changed since their fingerprints were taken: {changed[:5]}; rerun the stage")
    max_bytes = int(cfg.get("max_bytes") or 0) or None
    per_domain = cfg.get("per_domain")
    seed = int(cfg.get("seed") or 0)

    kept: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    quarantine: dict[str, list[Any]] = {name: [] for name in QUARANTINE_SCHEMA.names}
    stats: dict[str, Any] = {"sources": {}}

    def reject(source: str, file: str, row: int, rid: str | None, reason: str, text: Any) -> None:
        for key, value in zip(QUARANTINE_SCHEMA.names, (source, file, row, rid, reason, _lossy(text)), strict=True):
            quarantine[key].append(value)

    for src in sources:
        name = src["name"]
        lay = layout(src)
        excluded_ids: set[str] = set()
        if src.get("exclude_ids"):
            lines = _resolve(root, src["exclude_ids"]).read_text(encoding="utf-8-sig").splitlines()
            excluded_ids = {line.strip() for line in lines if line.strip()}
        counts: Counter[str] = Counter()
        seen_excluded: set[str] = set()
        seen_ids: set[str] = set()
        files: dict[str, int] = {}
        if lay.reader == "hf":
            raws = [read_hf(src, lay)]
        else:
            raws = []
            for path in source_files(root, src):
                reader = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet}[lay.reader]
                raw = reader(path.read_bytes(), lay, str(path))
                raw.file = _key(root, name, path).split(":", 1)[1]  # portable: relative to the root
                raws.append(raw)
        for raw in raws:
            files[raw.file] = len(raw.rows) + len(raw.malformed)
            counts["read"] += files[raw.file]
            for row, text in raw.malformed:
                reject(name, raw.file, row, None, "malformed_record", text)
                counts["malformed_record"] += 1
            for row, cell, rating_cell, id_cell, domain_cell in zip(
                raw.rows, raw.texts, raw.ratings, raw.ids, raw.domains, strict=True
            ):
                raw_id = _plain(id_cell) if lay.id else f"row{row}"
                rid = f"{name}:{raw_id}" if raw_id is not None else None
                if raw_id is not None and raw_id in excluded_ids:
                    counts["excluded"] += 1
                    seen_excluded.add(raw_id)
                    continue
                text, problem = _as_text(cell)
                rating = _rating(rating_cell) if lay.rating else math.nan
                if problem is None:
                    text = (text or "").strip()
                    if not text:
                        problem = "empty_text"
                    elif max_bytes is not None and len(text.encode("utf-8")) > max_bytes:
                        problem = "too_long"
                    elif rating is None:
                        problem = "bad_rating"
                    elif rid is None:
                        problem = "missing_id"
                    elif rid in seen_ids:
                        problem = "duplicate_id"
                if problem is not None:
                    reject(name, raw.file, row, rid, problem, cell if text is None else text)
                    counts[problem] += 1
                    continue
                seen_ids.add(rid)
                domain = src.get("domain") or _plain(domain_cell) or name
                for key, value in zip(SCHEMA.names, (rid, text, rating, domain, name), strict=True):
                    kept[key].append(value)
                counts["kept"] += 1
        stats["sources"][name] = {
            "kind": src["kind"],
            "files": files,
            "read": counts["read"],
            "kept": counts["kept"],
            "excluded": counts["excluded"],
            "exclude_ids_not_found": len(excluded_ids - seen_excluded),
            "quarantined": {r: counts[r] for r in REASONS if counts[r]},
        }

    table = pa.Table.from_pydict(kept, schema=SCHEMA)
    if per_domain is not None:
        keys = [sample_key(seed, rid) for rid in kept["id"]]
        by_domain: dict[str, list[int]] = {}
        for i, domain in enumerate(kept["domain"]):
            by_domain.setdefault(domain, []).append(i)
        ranked = [sorted(idx, key=lambda j: (keys[j], kept["id"][j])) for idx in by_domain.values()]
        chosen = sorted(i for idx in ranked for i in idx[: int(per_domain)])
        dropped = Counter(kept["source"]) - Counter(kept["source"][i] for i in chosen)
        table = table.take(pa.array(chosen, type=pa.int64()))
        for name, entry in stats["sources"].items():
            entry["sampled_out"] = dropped.get(name, 0)
            entry["kept"] -= entry["sampled_out"]
    else:
        for entry in stats["sources"].values():
            entry["sampled_out"] = 0
    domains = Counter(table.column("domain").to_pylist())
    stats["domains"] = dict(sorted(domains.items()))
    totals: Counter[str] = Counter()
    for entry in stats["sources"].values():
        for key in ("read", "kept", "excluded", "sampled_out"):
            totals[key] += entry[key]
        totals["quarantined"] += sum(entry["quarantined"].values())
    stats["total"] = dict(totals)
    stats["per_domain"] = per_domain
    stats["seed"] = seed
    stats["max_bytes"] = max_bytes
    pq.write_table(table, out / "reviews.parquet")
    pq.write_table(pa.Table.from_pydict(quarantine, schema=QUARANTINE_SCHEMA), out / "quarantine.parquet")
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=False))


@reviews.configure
def params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The sources' settings and the content hash of every input file; not where the mirror lives."""
    return {"reviews": cfg["reviews"], "fingerprints": source_fingerprints(cfg["reviews"])}


def read_reviews(folder: str | Path) -> pa.Table:
    """The `reviews.parquet` of a reviews artifact."""
    return pq.read_table(Path(folder) / "reviews.parquet")
