"""Reading dataset files: JSON array, JSON lines, CSV/TSV and Parquet into located records, one implementation.

Both the FSA datasets (`benchmark.records`) and the sentiment sets (`benchmark.sentiment`) read their split files
here: `format_of` tells a file's format from its declared one or its extension, and `read_records` turns a file's
bytes into `(where, record)` pairs, or raises an InputError naming the file, the record or line, and the problem.
The callers keep their own way of naming a record (`Style`). Pure Python + pyarrow; no stage imports.
"""

from __future__ import annotations

import csv
import io
import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from fsa_distill.errors import InputError

FORMATS: tuple[str, ...] = ("json", "jsonl", "csv", "parquet")
EXTENSIONS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Style:
    """How a record's position is spelled (`line`: `{unit}`, `{index}`, `{line}`) and attached to the file
    (`at`: `{location}`, `{pos}`)."""

    line: str
    at: str

    def where(self, location: str, pos: str) -> str:
        return self.at.format(location=location, pos=pos)


#: `train.csv [row 1, line 3]: ...` (the FSA datasets).
BRACKETS = Style(line="{unit} {index}, line {line}", at="{location} [{pos}]")
#: `t.csv, record 1 (line 3): ...` (the sentiment sets).
COMMAS = Style(line="{unit} {index} (line {line})", at="{location}, {pos}")


def _file_name(location: str | os.PathLike[str]) -> PurePosixPath:
    """The file part of a local path or of a URL (without its query)."""
    text = os.fspath(location)
    parsed = urllib.parse.urlparse(text)
    return PurePosixPath(parsed.path if parsed.scheme in ("http", "https", "file") else text.replace("\\", "/"))


def format_of(location: str | os.PathLike[str], declared: str | None, where: str) -> str:
    """The declared format, else the one the file extension implies; an unknown one is an InputError at `where`."""
    if declared is not None:
        if declared not in FORMATS:
            raise InputError(f"{where}: format {declared!r} is not one of {', '.join(FORMATS)}")
        return declared
    name = _file_name(location)
    fmt = EXTENSIONS.get(name.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{where}: cannot tell the format of {name.name!r} from its extension; "
            f"set format to one of {', '.join(FORMATS)}"
        )
    return fmt


def read_records(
    location: str | os.PathLike[str],
    data: bytes,
    fmt: str,
    delimiter: str | None = None,
    unit: str = "record",
    style: Style = BRACKETS,
) -> list[tuple[str, Any]]:
    """(where, record) of every record in a file's bytes; `where` names it (`record 3`, `row 2, line 4`).

    JSON is an array (a UTF-8 BOM is allowed), JSON lines one value per line, CSV/TSV a header row and rows of
    the same field count (blank lines skipped). An empty file, text that is not UTF-8, malformed JSON/CSV/Parquet
    and a file without records are InputErrors naming the file (and the record or line where there is one).
    """
    loc = os.fspath(location)
    if fmt == "parquet":
        if not data.strip():
            raise InputError(f"{loc}: empty file (no records)")
        records = _parquet(loc, data, unit)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InputError(f"{loc}: not UTF-8 text ({exc})") from None
        if not text.strip():
            raise InputError(f"{loc}: empty file (no records)")
        if fmt == "json":
            records = _json(loc, text, unit)
        elif fmt == "jsonl":
            records = _jsonl(loc, text, unit, style)
        else:
            records = _csv(loc, text, delimiter, unit, style)
    if not records:
        raise InputError(f"{loc}: no records (an empty {fmt} file)")
    return records


def _parquet(location: str, data: bytes, unit: str) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a corrupt file
        raise InputError(f"{location}: malformed Parquet: {exc}") from None
    return [(f"{unit} {i}", record) for i, record in enumerate(table.to_pylist())]


def _json(location: str, text: str, unit: str) -> list[tuple[str, Any]]:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{location}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(parsed, list):
        hint = " (JSON lines? set format: jsonl)" if isinstance(parsed, dict) else ""
        raise InputError(f"{location}: expected a JSON array of records, got a {type(parsed).__name__}{hint}")
    return [(f"{unit} {i}", record) for i, record in enumerate(parsed)]


def _jsonl(location: str, text: str, unit: str, style: Style) -> list[tuple[str, Any]]:
    records: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        pos = style.line.format(unit=unit, index=len(records), line=lineno)
        try:
            records.append((pos, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{style.where(location, pos)}: malformed JSON at column {exc.colno}: {exc.msg}") from None
    return records


def _csv(location: str, text: str, delimiter: str | None, unit: str, style: Style) -> list[tuple[str, Any]]:
    sep = delimiter or ("\t" if _file_name(location).suffix.lower() == ".tsv" else ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    records: list[tuple[str, Any]] = []
    header: list[str] | None = None
    try:
        for fields in reader:
            if header is None:
                header = fields
                continue
            if not fields:  # a blank line
                continue
            pos = style.line.format(unit=unit, index=len(records), line=reader.line_num)
            if len(fields) != len(header):
                raise InputError(
                    f"{style.where(location, pos)}: malformed CSV: {len(fields)} fields, the header has {len(header)}"
                )
            records.append((pos, dict(zip(header, fields, strict=True))))
    except csv.Error as exc:
        raise InputError(f"{style.where(location, f'line {reader.line_num}')}: malformed CSV: {exc}") from None
    return records
