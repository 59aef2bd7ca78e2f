"""Artifact references, content hashes and atomic writes.

Stages exchange `Artifact`s (a path plus the sha256 of its content), never in-memory objects,
so that Prefect can cache on content and a deleted or edited output is noticed.

An output folder holds *content* (what later stages read: Parquet, model weights, counts) and,
under `measured/`, *measurements* (wall times, latencies, tokens/s). The manifest records and
verifies both, but only content enters the folder's content hash: the same inputs, config and code
give the same hash however fast the machine was, so a rerun never re-keys what follows it.

Artifacts produced by stages are addressed relative to their store (`rel`, e.g.
`generate/<key>`): `at(store)` gives the path in this process, so a workdir can be moved or
copied and everything cached in it still resolves there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

MANIFEST = "_manifest.json"
#: Sub-folder of an output for measurements (timings): verified, but outside the content hash.
MEASURED = "measured"
_CHUNK = 1 << 20


class Artifact(BaseModel):
    """A stage output: a file or folder on disk and the hash of its content.

    `rel` is the path inside the artifact store for stage outputs ("" for files given from
    outside); `path` is where it is in the process that last bound it (`at`).
    """

    path: str
    sha256: str
    stage: str = ""
    rel: str = ""

    @property
    def p(self) -> Path:
        """The artifact's path as a Path."""
        return Path(self.path)

    def at(self, store: str | os.PathLike[str]) -> Artifact:
        """This artifact as found in `store` (unchanged when it is not a stage output)."""
        if not self.rel:
            return self
        return self.model_copy(update={"path": str(Path(store) / self.rel)})


def bind(value: Any, store: str | os.PathLike[str]) -> Any:
    """`value` with every Artifact inside (dicts, lists, tuples) bound to `store`."""
    if isinstance(value, Artifact):
        return value.at(store)
    if isinstance(value, dict):
        return {k: bind(v, store) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(bind(v, store) for v in value)
    return value


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hash a file in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` (manifest excluded), by relative POSIX path."""
    return {
        str(p.relative_to(folder).as_posix()): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _split(files: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(content files, measurement files under `measured/`)."""
    measured = {k: v for k, v in files.items() if k.startswith(MEASURED + "/")}
    return {k: v for k, v in files.items() if k not in measured}, measured


def tree_hash(files: dict[str, str]) -> str:
    """One hash for a folder from its per-file hashes (names included)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def seal(folder: Path) -> str:
    """Write the manifest of a finished output folder and return its content hash (measurements excluded)."""
    files, measured = _split(file_hashes(folder))
    digest = tree_hash(files)
    manifest = {"sha256": digest, "files": files, "measured": measured}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    return digest


def verify(folder: Path) -> str | None:
    """The folder's content hash if its manifest matches its files exactly, else None."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if _split(file_hashes(folder)) != (recorded.get("files"), recorded.get("measured", {})):
        return None
    return recorded.get("sha256")


def fingerprint(model: str) -> str:
    """Content hash of a local model folder or file, else the name itself (a hub id or a built-in name).

    A key that held the path would miss weights replaced in place and re-key a moved folder; the
    content hash does neither, so keys take the fingerprint *instead of* the path.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
        return "sha256:" + tree_hash({p.relative_to(path).as_posix(): _stat_memo_sha256(p) for p in files})
    if path.is_file():
        return "sha256:" + _stat_memo_sha256(path)
    return model


_MEMO: dict[tuple[str, int, int], str] = {}
_MEMO_LOCKS: dict[str, threading.Lock] = {}
_MEMO_GUARD = threading.Lock()


def _stat_memo_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) in this process.

    The flow fingerprints the teacher once per shard: a paper-scale teacher is ~90 GB, so it is
    read once per process, not once per shard. A replaced file has a new size or mtime.
    """
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _MEMO_GUARD:
        lock = _MEMO_LOCKS.setdefault(key[0], threading.Lock())
    with lock:  # shards fingerprint the teacher at the same moment: one of them reads the file
        if key not in _MEMO:
            _MEMO[key] = sha256_file(path)
    return _MEMO[key]


def canonical_json(value: Any) -> str:
    """Stable JSON for hashing: sorted keys, Artifacts reduced to their content hash."""

    def default(obj: Any) -> Any:
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if isinstance(obj, BaseModel):
            return obj.model_dump()
        raise TypeError(f"cannot hash {type(obj).__name__}")

    def reduce(obj: Any) -> Any:
        if isinstance(obj, Artifact):
            return {"artifact_sha256": obj.sha256}
        if isinstance(obj, dict):
            return {str(k): reduce(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [reduce(v) for v in obj]
        return obj

    return json.dumps(reduce(value), sort_keys=True, default=default)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temp file and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final`, on error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
