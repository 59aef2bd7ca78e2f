"""Artifact references, content hashes and atomic writes.

Stages exchange `Artifact`s (a path plus the sha256 of its content), never in-memory objects,
so that Prefect can cache on content and a deleted or edited output is noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

MANIFEST = "_manifest.json"
_CHUNK = 1 << 20


class Artifact(BaseModel):
    """A stage output: a file or folder on disk and the hash of its content."""

    path: str
    sha256: str
    stage: str = ""

    @property
    def p(self) -> Path:
        """The artifact's path as a Path."""
        return Path(self.path)


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


def tree_hash(files: dict[str, str]) -> str:
    """One hash for a folder from its per-file hashes (names included)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def seal(folder: Path) -> str:
    """Write the manifest of a finished output folder and return its content hash."""
    files = file_hashes(folder)
    digest = tree_hash(files)
    write_text_atomic(folder / MANIFEST, json.dumps({"sha256": digest, "files": files}, indent=1))
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
    if file_hashes(folder) != recorded.get("files"):
        return None
    return recorded.get("sha256")


def fingerprint(model: str) -> str:
    """Content hash of a local model folder, else the name itself (a hub id or a built-in name).

    A cache key that held only the path would miss weights replaced in place.
    """
    path = Path(model).expanduser()
    return tree_hash(file_hashes(path)) if path.is_dir() else model


def canonical_json(value: Any) -> str:
    """Stable JSON for hashing: sorted keys, Artifacts reduced to their content hash."""

    def default(obj: Any) -> Any:
        if isinstance(obj, Artifact):
            return {"artifact_sha256": obj.sha256}
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
