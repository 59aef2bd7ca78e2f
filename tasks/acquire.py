"""Stage `acquire`: fetch one benchmark dataset, verify its checksums, normalise it to Parquet.

Reading, verifying and validating the files is the benchmark's own (`fsa_distill.benchmark.records`): a
built-in is pinned by sha256, a user dataset (`data.custom.<name>`) is keyed by its files' content and always
validated record by record. All splits are read and validated before anything is written, and the stage writes
into a folder that is published only on success, so a bad record leaves no output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsa_distill.benchmark.records import SCHEMA, load_split, load_user_dataset
from fsa_distill.benchmark.specs import (
    DATASETS,
    SHA256,
    SPLITS,
    UserDatasetSpec,
    get_spec,
    is_url,
)
from fsa_distill.tasks.stage import stage

from fsa_distill.errors import InputError


@stage("acquire", retries=3, unkeyed=("timeout_s", "source"))
def acquire(
    out: Path,
    *,
    dataset: str,
    source: str | dict[str, str],
    checksums: dict[str, str | None],
    limit: int | None = None,
    timeout_s: float = 60.0,
    custom: dict[str, Any] | None = None,
) -> None:
    """Write `<split>.parquet` for the four splits of `dataset`, plus `meta.json` (task, counts).

    A user dataset (`custom`: how its files are read; `source`: split -> location) without a hard_test
    gets an empty `hard_test.parquet`, so every consumer sees the same four splits.
    """
    if custom is None:
        spec = get_spec(dataset)
        loaded = {split: load_split(str(source), dataset, split, timeout_s) for split in SPLITS}
        meta: dict[str, Any] = {"dataset": dataset, "task": spec.task, "slug": spec.slug}
    else:
        assert isinstance(source, dict)
        user = UserDatasetSpec(
            name=dataset,
            task=custom["task"],
            files=source,
            formats=custom["formats"],
            layouts=custom["layouts"],
            columns=custom["columns"],
            delimiter=custom["delimiter"],
            sha256={split: digest for split, digest in checksums.items() if digest},
        )
        loaded, digests = load_user_dataset(user, timeout_s)
        absent = [split for split in SPLITS if split not in loaded]
        meta = {"dataset": dataset, "task": user.task, "slug": user.slug, "custom": True, "sha256": digests}
        meta["absent_splits"] = absent
    counts = {}
    for split in SPLITS:
        rows = loaded.get(split, [])
        if limit is not None:
            rows = rows[:limit]
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / f"{split}.parquet")
        counts[split] = len(rows)
    meta["counts"] = counts
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _file_sha256(path: Path, setting: str) -> str:
    if not path.is_file():
        raise InputError(f"{path}: file not found (check {setting})")
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _user_params(data: dict[str, Any], spec: UserDatasetSpec) -> dict[str, Any]:
    """A user dataset is keyed by how it is read and by its files' content: the pinned sha256, else the
    local file's hash (read now); an unpinned URL by the URL itself. Where the files are is unkeyed."""
    source: dict[str, str] = {}
    checksums: dict[str, str | None] = {}
    unverified: dict[str, str] = {}
    for split, location in spec.files.items():
        pinned = spec.sha256.get(split)
        if is_url(location):
            source[split] = location
            checksums[split] = pinned
            if pinned is None:
                unverified[split] = location
        else:
            path = Path(location).expanduser().resolve()
            source[split] = str(path)
            checksums[split] = pinned or _file_sha256(path, f"data.custom.{spec.name}.files.{split}")
    return {
        "dataset": spec.name,
        "source": source,
        "checksums": checksums,
        "custom": {**spec.reading(), "unverified": unverified},
        "limit": data["limit"],
        "timeout_s": data["timeout_s"],
    }


@acquire.configure
def params(cfg: dict[str, Any], *, dataset: str) -> dict[str, Any]:
    """The dataset, its pinned checksums and the row limit make the key; where the files are read
    from (`source`) does not when every file is pinned: verified content is the same from any mirror.
    A user dataset (`data.custom`) is keyed by its reading settings and its files' content hashes.
    """
    data = cfg["data"]
    if dataset not in DATASETS:
        user = get_spec(dataset, data.get("custom"))
        assert isinstance(user, UserDatasetSpec)
        return _user_params(data, user)
    spec = DATASETS[dataset]
    checksums = {spec.path(split): SHA256.get(spec.path(split)) for split in SPLITS}
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
