"""The artifact store: a local folder or any fsspec URL (`s3://bucket/prefix`), one code path.

Stages write their output into a local folder (`fsa_distill.tasks.stage`); the store publishes it,
checks later that it is still complete and unedited, and gives readers a local path to it.

* **Local folder** (the default, `<workdir>/artifacts`): an output is `<store>/<stage>/<key>/`
  with its manifest; publication is one rename (`publish`); readers read it in place.
* **Object storage** (any other fsspec URL): an output's files go under an immutable generation
  prefix `<url>/<stage>/<key>/<gen>/`, then its manifest `<url>/<stage>/<key>/_manifest.json` is
  created by an exclusive put (first writer wins). The manifest holds the content hash, per-file
  sha256 and each object's size and ETag, so the deleted-or-edited check is one listing, not a
  download. Readers trust only the manifest: a reader never sees half an output, and the loser of
  a publication race deletes its generation and returns the winner's output.

Stages read local files (Parquet, model folders, a vLLM or torchrun child). For a remote store,
`bind` gives each input artifact a local copy, fetched once per machine into a cache addressed by
content hash and verified against the manifest: `FSA_STORE_CACHE` (default
`~/.cache/fsa-distill/store`), bounded by `FSA_STORE_CACHE_GB` (default 50; least recently used
copies go first, but never one used in the last `FSA_STORE_CACHE_GRACE_S` seconds, default 900,
since a stage on this machine may be reading it). Outputs computed here are kept there too. The
cache is a property of each machine, so it is set in its environment, not in the run's config;
so are credentials and endpoints (`AWS_*`, `FSSPEC_S3_ENDPOINT_URL`): the config names only the URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsa_distill.artifacts import MANIFEST, Artifact, _split, file_hashes, tree_hash, verify
from fsa_distill.locks import LeaseLockManager, is_url, lock_manager

if TYPE_CHECKING:
    from prefect.filesystems import WritableFileSystem

log = logging.getLogger(__name__)
#: Protocols whose exclusive create (`mode="create"`) is one atomic request: S3 (`If-None-Match`),
#: and the in-memory filesystem. fsspec's generic create elsewhere is a look, then a write.
ATOMIC_CREATE = ("s3", "s3a", "memory")

#: `<store>/.locks`: the lock files of the outputs being computed (`fsa_distill.locks`).
LOCKS = ".locks"
#: `<store>/.prefect`: Prefect's cache records and results, for a remote store.
RECORDS = ".prefect"
_COMPLETE = ".complete"


class StoreError(RuntimeError):
    """An output the store should hold is missing or does not match its content hash."""


class Store:
    """A local artifact store: `<root>/<stage>/<key>/` folders (see the module doc)."""

    remote = False

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.fspath(root).removeprefix("file://")).expanduser().resolve()
        self.url = str(self.root)

    def __str__(self) -> str:
        return self.url

    def location(self, rel: str) -> str:
        """Where the output `rel` (`<stage>/<key>`) lives, as this store names it."""
        return str(self.root / rel)

    def verify(self, rel: str) -> str | None:
        """The content hash of output `rel` if it is complete and unedited, else None."""
        return verify(self.root / rel)

    def work_dir(self, rel: str) -> Path:
        """A local folder for the scratch and temporary folders of output `rel` (same filesystem)."""
        path = (self.root / rel).parent
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, tmp: Path, rel: str) -> str:
        """Publish the sealed folder `tmp` as output `rel` (first writer wins); its content hash."""
        out = self.root / rel
        publish_folder(tmp, out)
        digest = verify(out)
        if digest is None:  # pragma: no cover - would mean the filesystem lost our rename
            raise StoreError(f"output {out} failed verification after writing")
        return digest

    def bind(self, value: Any) -> Any:
        """`value` with every stage output inside (dicts, lists, tuples) at a local path."""
        if isinstance(value, Artifact):
            return self.local(value)
        if isinstance(value, dict):
            return {k: self.bind(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.bind(v) for v in value)
        return value

    def local(self, art: Artifact) -> Artifact:
        """`art` at a local path: in this store's folder (a moved store resolves where it is now)."""
        return art.at(self.root) if art.rel else art

    def locks(self) -> LeaseLockManager:
        """The lock manager every process that shares this store uses."""
        return lock_manager(self.root / LOCKS)

    def result_storage(self) -> WritableFileSystem | None:
        """Where Prefect keeps this store's cache records: None for Prefect's local default."""
        return None


class RemoteStore(Store):
    """An artifact store at an fsspec URL (see the module doc)."""

    remote = True

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")  # type: ignore[assignment]
        self.cache = Path(os.environ.get("FSA_STORE_CACHE", "~/.cache/fsa-distill/store")).expanduser().resolve()
        self.cache_bytes = int(float(os.environ.get("FSA_STORE_CACHE_GB", "50")) * 1e9)
        self.grace_s = float(os.environ.get("FSA_STORE_CACHE_GRACE_S", "900"))
        self._fetching: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._blocks: dict[str, WritableFileSystem] = {}  # Prefect API URL -> the block saved there
        self._saving = threading.Lock()
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if not set(protocols) & set(ATOMIC_CREATE):
            log.warning(
                "store %s: %s has no atomic exclusive create, so two writers of one output (or lock) at the "
                "same instant are not told apart; use it from one run at a time, or use S3",
                self.url, "/".join(protocols),
            )  # fmt: skip

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def location(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    # -- manifests --------------------------------------------------------------------------------

    def manifest(self, rel: str) -> dict[str, Any] | None:
        """The published manifest of output `rel`, read fresh (never from a cached listing)."""
        path = self._path(f"{rel}/{MANIFEST}")
        self.fs.invalidate_cache(path)
        try:
            found = json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return None
        return found if isinstance(found, dict) and "gen" in found else None

    def _objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        """name -> size and ETag of every object under `prefix`, from one fresh listing."""
        self.fs.invalidate_cache(prefix)
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        start = len(prefix.rstrip("/")) + 1
        return {
            name[start:]: {"size": int(info.get("size") or 0), "etag": _etag(info)}
            for name, info in sorted(found.items())
            if info.get("type", "file") == "file"
        }

    def verify(self, rel: str) -> str | None:
        """The content hash of output `rel` if its manifest's generation is complete and unedited
        (object names, sizes and ETags match), else None. Reads no file content."""
        manifest = self.manifest(rel)
        if manifest is None:
            return None
        if self._objects(self._path(f"{rel}/{manifest['gen']}")) != manifest.get("objects"):
            return None
        return manifest.get("sha256")

    # -- publication ------------------------------------------------------------------------------

    def work_dir(self, rel: str) -> Path:
        path = self.cache / "work" / rel.split("/")[0]
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, tmp: Path, rel: str) -> str:
        """Upload `tmp` under a fresh generation, then create the manifest (first writer wins).

        The loser of a race deletes its generation and returns the winner's hash; a stale
        manifest (its files deleted or edited) is replaced. `tmp` is consumed: it becomes this
        machine's cached copy when ours is the published output.
        """
        local = json.loads((tmp / MANIFEST).read_text())
        try:
            while True:
                gen = uuid.uuid4().hex[:16]
                prefix = self._path(f"{rel}/{gen}")
                names = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
                names = [n for n in names if n != MANIFEST]
                try:
                    if names:
                        self.fs.put([str(tmp / n) for n in names], [f"{prefix}/{n}" for n in names])
                    manifest = {**local, "gen": gen, "objects": self._objects(prefix)}
                    if set(manifest["objects"]) != set(names):
                        raise StoreError(f"{self.location(rel)}: upload of generation {gen} is incomplete")
                except BaseException:
                    self._drop(prefix)  # no orphaned generation in the bucket
                    raise
                if not create_object(self.fs, self._path(f"{rel}/{MANIFEST}"), json.dumps(manifest).encode()):
                    self._drop(prefix)
                    winner = self.verify(rel)
                    if winner is not None:
                        return winner
                    self._remove_stale(rel)
                    continue
                self._adopt(tmp, local["sha256"])
                return local["sha256"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _drop(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(prefix, recursive=True)

    def _remove_stale(self, rel: str) -> None:
        """Remove a manifest whose files are gone or edited, and what is left of its generation.

        It is read again just before: a manifest another writer published meanwhile (a new
        generation, complete) is left alone.
        """
        manifest = self.manifest(rel)
        if manifest is None or self.verify(rel) is not None:
            return
        again = self.manifest(rel)
        if again is None or again.get("gen") != manifest.get("gen"):
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(f"{rel}/{MANIFEST}"))
        self._drop(self._path(f"{rel}/{manifest['gen']}"))

    # -- local copies -----------------------------------------------------------------------------

    def _cached_copy(self, sha256: str) -> Path:
        return self.cache / "objects" / sha256

    def _adopt(self, folder: Path, sha256: str) -> None:
        """Keep a just-published folder as this machine's copy of content `sha256`."""
        final = self._cached_copy(sha256)
        if (final / _COMPLETE).exists():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = final.parent / f".{sha256}.{uuid.uuid4().hex}.tmp"
        os.rename(folder, staged)
        (staged / _COMPLETE).touch()
        try:
            os.rename(staged, final)
        except OSError:  # another copy landed first
            shutil.rmtree(staged, ignore_errors=True)
        self._evict(keep=final)

    def local(self, art: Artifact) -> Artifact:
        """`art` at a local path: this machine's verified copy, fetched on first use."""
        if not art.rel:
            return art
        final = self._cached_copy(art.sha256)
        with self._guard:
            lock = self._fetching.setdefault(art.sha256, threading.Lock())
        with lock:  # two stages needing one input fetch it once
            while True:
                with self._cache_lock(fcntl.LOCK_SH):  # no eviction between the look and the touch
                    try:
                        os.utime(final / _COMPLETE)  # recently used: evicted last
                        break
                    except FileNotFoundError:
                        pass
                self._fetch(art, final)
        return art.model_copy(update={"path": str(final)})

    @contextlib.contextmanager
    def _cache_lock(self, mode: int) -> Any:
        """The cache's lock across processes: shared to use a copy, exclusive to evict."""
        root = self.cache / "objects"
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".evict.lock", "a") as handle:
            fcntl.flock(handle, mode)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _fetch(self, art: Artifact, final: Path) -> None:
        manifest = self.manifest(art.rel)
        where = self.location(art.rel)
        if manifest is None or manifest.get("sha256") != art.sha256:
            found = "no output" if manifest is None else f"content {str(manifest.get('sha256'))[:12]}"
            raise StoreError(
                f"{where}: the store has {found}, not the content {art.sha256[:12]} this run expects "
                "(deleted or replaced since it was computed: rerun to recompute it)"
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{art.sha256}.", suffix=".tmp"))
        try:
            names = list(manifest["objects"])
            prefix = self._path(f"{art.rel}/{manifest['gen']}")
            for name in names:
                (staged / name).parent.mkdir(parents=True, exist_ok=True)
            if names:
                self.fs.get([f"{prefix}/{n}" for n in names], [str(staged / n) for n in names])
            files, measured = _split(file_hashes(staged))
            expected = (manifest["files"], manifest.get("measured", {}))
            if (files, measured) != expected or tree_hash(files) != art.sha256:
                raise StoreError(f"{where}: the downloaded files do not match their manifest (edited in the store?)")
            local = {k: manifest[k] for k in ("sha256", "files", "measured") if k in manifest}
            (staged / MANIFEST).write_text(json.dumps(local, indent=1))
            (staged / _COMPLETE).touch()
            try:
                os.rename(staged, final)
            except OSError:  # another process fetched it first
                shutil.rmtree(staged, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        self._evict(keep=final)

    def _evict(self, keep: Path) -> None:
        """Remove least recently used copies until the cache is within its bound (see module doc).

        Under the cache's exclusive lock (processes that share the cache take turns, and no copy is
        touched meanwhile); a copy is renamed aside before it is removed, so no reader finds half.
        """
        root = self.cache / "objects"
        with self._cache_lock(fcntl.LOCK_EX):
            entries = []
            for entry in root.iterdir():
                if entry.name.startswith("."):
                    continue
                try:
                    used = (entry / _COMPLETE).stat().st_mtime
                    size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
                except FileNotFoundError:  # half fetched, or going
                    continue
                entries.append((used, size, entry))
            total = sum(size for _, size, _ in entries)
            now = time.time()
            for used, size, entry in sorted(entries):
                if total <= self.cache_bytes:
                    return
                if entry == keep or now - used < self.grace_s:
                    continue
                aside = root / f".{entry.name}.{uuid.uuid4().hex}.evicted"
                try:
                    os.rename(entry, aside)
                except FileNotFoundError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
                total -= size

    def locks(self) -> LeaseLockManager:
        return lock_manager(self.location(LOCKS))

    def result_storage(self) -> WritableFileSystem:
        """Prefect's cache records and results beside the outputs, so every machine finds them.

        Prefect takes only a block saved on its server (it names the block in each record), so it
        is saved once per process as `fsa-store-<hash of the URL>`; it holds the URL, never
        credentials (each machine's environment has those).
        """
        from prefect.settings import get_current_settings

        api = str(get_current_settings().api.url or "ephemeral")
        with self._saving:  # once per Prefect API this process talks to (a block id is per server)
            if api not in self._blocks:
                import hashlib

                from prefect.filesystems import RemoteFileSystem

                block = RemoteFileSystem(basepath=self.location(RECORDS))
                name = "fsa-store-" + hashlib.sha256(self.url.encode()).hexdigest()[:16]
                block.save(name, overwrite=True)
                self._blocks[api] = block
            return self._blocks[api]


def create_object(fs: Any, path: str, data: bytes) -> bool:
    """Create `path` with `data` unless it exists (one conditional PUT on S3); False when it existed.

    S3 answers a lost race with 412 (FileExistsError in s3fs), or, for two conditional writes in
    flight at once, 409 ConditionalRequestConflict: also a lost race.
    """
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:
        if "ConditionalRequestConflict" in str(exc) or "409" in str(exc):
            return False
        raise
    return True


def _etag(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "md5", "checksum"):
        if info.get(key):
            return str(info[key])
    return None


def publish_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`: first writer wins, readers never see half an output.

    A complete output (its manifest verifies) already at `out` is kept and `tmp` is dropped: another
    run published the same key first, and replacing it would pull files from under its readers.
    An incomplete or edited one is moved aside first (one rename), then removed.
    """
    import errno

    while True:
        try:
            os.rename(tmp, out)  # an absent (or empty) `out` only
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if verify(out) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = out.with_name(f".{out.name}.{uuid.uuid4().hex}.old")
        try:
            os.rename(out, aside)
        except FileNotFoundError:
            continue
        shutil.rmtree(aside, ignore_errors=True)


_STORES: dict[str, Store] = {}
_STORES_GUARD = threading.Lock()


def open_store(location: str | os.PathLike[str] | Store) -> Store:
    """The store at a folder or URL (one instance per location in a process)."""
    if isinstance(location, Store):
        return location
    text = os.fspath(location)
    with _STORES_GUARD:
        if text not in _STORES:
            _STORES[text] = RemoteStore(text) if is_url(text) else Store(text)
        return _STORES[text]


def store_url(cfg: dict[str, Any]) -> str:
    """The run's store: `store.url`, or `<workdir>/artifacts`; a local folder made absolute."""
    url = (cfg.get("store") or {}).get("url")
    if url and is_url(url):
        return str(url).rstrip("/")
    return str(Path(url or Path(cfg["workdir"]) / "artifacts").expanduser().resolve())
