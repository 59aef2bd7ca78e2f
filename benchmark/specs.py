"""The FSA benchmark's datasets: where they come from and what their bytes must hash to.

The four built-ins are pinned below; a user's own datasets are declared in YAML (`data.custom.<name>`) and
checked here by `user_spec` (settings only: the files are read and validated by the acquire stage).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsa_distill.benchmark.files import FORMATS, format_of

from fsa_distill.errors import InputError

#: HITSZ-HLT/FSA-Distillation, the paper's code release, pinned to one commit.
UPSTREAM_COMMIT = "c38bdfc80cf871ffd53e14f9441fcc33d968defd"
DEFAULT_SOURCE = f"https://raw.githubusercontent.com/HITSZ-HLT/FSA-Distillation/{UPSTREAM_COMMIT}"
SPLITS: tuple[str, ...] = ("train", "dev", "test", "hard_test")

#: sha256 of every benchmark file at UPSTREAM_COMMIT, by path inside the repository.
SHA256: dict[str, str] = {
    "fsa_datasets/w_hard/acsa/laptop16/dev.json": "74785156c40899fddbf6f323daaa4301be06c12db13221593b74a8908834213e",
    "fsa_datasets/w_hard/acsa/laptop16/hard_test.json": "f13dd7971991a1b5b6a69890b6c082a649cd9b8b145c34b33ebfe88aec36897b",  # noqa: E501
    "fsa_datasets/w_hard/acsa/laptop16/test.json": "6b2148317d1d132b84809b947e2598d587c234e326d236e4dcba6654e8c134cd",
    "fsa_datasets/w_hard/acsa/laptop16/train.json": "042ca71863e13d0b16fbb00c45c2d183dc43802fe70b159b1ef9f066984f6b33",
    "fsa_datasets/w_hard/acsa/rest16/dev.json": "35304ce547ad9ca015341c8ff5e67644867fc67dbbf331b531c5ff2ef0331a89",
    "fsa_datasets/w_hard/acsa/rest16/hard_test.json": "dc3684267fd4e656f8f0c6037dea89b5200bb27de7e61e1452f383976480afa0",  # noqa: E501
    "fsa_datasets/w_hard/acsa/rest16/test.json": "10d89d3dae1aa1d037fae29e09ffdbff01460f63499aae524379fc1388c1f8d9",
    "fsa_datasets/w_hard/acsa/rest16/train.json": "55c5fc70a120d996138c8df386a878215ea3ea75c38ab9de9507d9cf560651e4",
    "fsa_datasets/w_hard/atsa/laptop14/dev.json": "f9123858f82731641ebfacc2bbf3e880cfba3957d604dd47150f27d7b90439ee",
    "fsa_datasets/w_hard/atsa/laptop14/hard_test.json": "f13dd7971991a1b5b6a69890b6c082a649cd9b8b145c34b33ebfe88aec36897b",  # noqa: E501
    "fsa_datasets/w_hard/atsa/laptop14/test.json": "59b22e85d3a4ffff9d964b5d908cca2e3ab20abec03544ce3406c91c0bf49cf2",
    "fsa_datasets/w_hard/atsa/laptop14/train.json": "3ed4987d4428f6a4b820a8da32f6e0a1748ab2dea98b99380cd1572eb5fccf90",
    "fsa_datasets/w_hard/atsa/rest14/dev.json": "3573db15d08ba652a3516459aa277640d2508663686116c051bb78be6bd7a243",
    "fsa_datasets/w_hard/atsa/rest14/hard_test.json": "3cffd2e3808261a8a5b448a400898cf99d8e40f04e9877f5ab2ab65062d345cb",  # noqa: E501
    "fsa_datasets/w_hard/atsa/rest14/test.json": "c892fa55877de9efe1732e8a0d3c885c5e81f9d5c489d5dcbddd1463e247c83c",
    "fsa_datasets/w_hard/atsa/rest14/train.json": "c4e7f6908e0e0c1128ee8d74f18882fa72c4d762871d95570a898003d0fd1978",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark dataset: its name (`atsa/rest14`), task and upstream folder."""

    name: str
    task: str
    folder: str

    @property
    def slug(self) -> str:
        """File- and metric-safe name: `atsa-rest14`."""
        return self.name.replace("/", "-")

    def path(self, split: str) -> str:
        """Upstream path of one split's JSON file."""
        return f"{self.folder}/{split}.json"


DATASETS: dict[str, DatasetSpec] = {
    name: DatasetSpec(name=name, task=name.split("/")[0], folder=f"fsa_datasets/w_hard/{name}")
    for name in ("atsa/rest14", "atsa/laptop14", "acsa/rest16", "acsa/laptop16")
}


def slug(name: str) -> str:
    """File- and metric-safe form of any dataset name, built-in or user: `atsa/mine` -> `atsa-mine`."""
    return name.replace("/", "-")


# --- user datasets, declared in YAML only (`data.custom.<name>`) -------------------------------------------------

REQUIRED_SPLITS: tuple[str, ...] = ("train", "dev", "test")
LAYOUTS: tuple[str, ...] = ("nested", "flat")
#: The benchmark record's fields: what `columns` may rename. ID/sentence/aspects are a record's (nested) or a
#: row's (flat, minus aspects) fields; the rest are an aspect's.
FIELDS: tuple[str, ...] = ("ID", "sentence", "aspects", "target", "category", "polarity", "from", "to", "opinion_words")
_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")


def is_url(location: str) -> bool:
    """Whether a data location is a URL (base) rather than a local path."""
    return urllib.parse.urlparse(str(location)).scheme in ("http", "https", "file")


@dataclass(frozen=True)
class UserDatasetSpec:
    """One user FSA dataset from `data.custom.<name>`, checked: where each split is and how to read it.

    `files` maps split -> location (a URL, or a local path as given: relative paths are relative to the
    working directory). `hard_test` may be absent: acquisition then writes an empty hard_test split.
    """

    name: str
    task: str
    files: Mapping[str, str]
    formats: Mapping[str, str]
    layouts: Mapping[str, str]
    columns: Mapping[str, str]  # every field in FIELDS -> its column name
    delimiter: str | None = None
    sha256: Mapping[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """File- and metric-safe name: `atsa-mine`."""
        return slug(self.name)

    def reading(self) -> dict[str, Any]:
        """How the files are read (not where they are): part of the acquire key."""
        return {
            "task": self.task,
            "formats": dict(self.formats),
            "layouts": dict(self.layouts),
            "columns": dict(self.columns),
            "delimiter": self.delimiter,
        }


def _locate(source: str | None, rel: str) -> str:
    """A split file's location: a URL or absolute path as given, else relative to `source` (URL base or folder)."""
    if is_url(rel):
        return rel
    if source is not None and is_url(source):
        return f"{source.rstrip('/')}/{rel.lstrip('/')}"
    base = Path(source).expanduser() if source is not None else Path()
    return str(base / Path(rel).expanduser())


def user_spec(name: str, entry: Mapping[str, Any]) -> UserDatasetSpec:
    """Check one `data.custom.<name>` entry (plain dict; no file is read), so each error names its key."""
    from fsa_distill.benchmark.protocol import TASKS

    where = f"data.custom.{name}"
    if not _NAME.fullmatch(name):
        raise InputError(f"{where}: a dataset name is letters, digits, _ . - and at most one '/' (e.g. atsa/mine)")
    if name in DATASETS:
        raise InputError(f"{where}: {name!r} is a built-in dataset; give yours another name")
    task = entry.get("task")
    if task not in TASKS:
        raise InputError(f"{where}.task: {task!r} is not one of {', '.join(TASKS)}")
    files = {str(k): str(v) for k, v in (entry.get("files") or {}).items()}
    missing = [s for s in REQUIRED_SPLITS if s not in files]
    if missing:
        raise InputError(
            f"{where}.files must name {', '.join(REQUIRED_SPLITS)} (hard_test is optional); "
            f"missing: {', '.join(missing)}"
        )
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise InputError(f"{where}.files: unknown split(s) {unknown}; splits are {', '.join(SPLITS)}")
    columns = dict(entry.get("columns") or {})
    bad = sorted(set(columns) - set(FIELDS))
    if bad:
        raise InputError(f"{where}.columns: unknown field(s) {bad}; renameable fields: {', '.join(FIELDS)}")
    if any(not isinstance(v, str) or not v for v in columns.values()):
        raise InputError(f"{where}.columns: every column name must be a non-empty string, got {columns}")
    sha256 = {str(k): str(v).lower() for k, v in (entry.get("sha256") or {}).items()}
    unpinned = sorted(set(sha256) - set(files))
    if unpinned:
        raise InputError(f"{where}.sha256 names splits that have no file: {unpinned}")
    for split, digest in sha256.items():
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise InputError(f"{where}.sha256.{split}: {digest!r} is not a sha256 hex digest")
    if entry.get("format") is not None and entry["format"] not in FORMATS:
        raise InputError(f"{where}.format: {entry['format']!r} is not one of {', '.join(FORMATS)}")
    layout = entry.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise InputError(f"{where}.layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    source = entry.get("source")
    ordered = [s for s in SPLITS if s in files]
    locations = {s: _locate(source, files[s]) for s in ordered}
    formats = {s: format_of(locations[s], entry.get("format"), f"{where}.files.{s}") for s in ordered}
    layouts = {s: layout or ("flat" if formats[s] == "csv" else "nested") for s in ordered}
    for split in ordered:
        if formats[split] == "csv" and layouts[split] == "nested":
            raise InputError(f"{where}.layout: CSV cannot hold nested aspects ({files[split]}); use layout: flat")
    return UserDatasetSpec(
        name=name,
        task=task,
        files=locations,
        formats=formats,
        layouts=layouts,
        columns={f: str(columns.get(f, f)) for f in FIELDS},
        delimiter=entry.get("delimiter"),
        sha256=sha256,
    )


def get_spec(name: str, custom: Mapping[str, Any] | None = None) -> DatasetSpec | UserDatasetSpec:
    """A built-in dataset, or a user one from `custom` (the composed `data.custom`), with every known name
    in the error."""
    if name in DATASETS:
        return DATASETS[name]
    if custom and name in custom:
        return user_spec(name, custom[name])
    known = [*DATASETS, *(custom or {})]
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known)}")
