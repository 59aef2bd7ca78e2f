"""Locks that processes on one or many machines share through a folder: who computes a stage.

Two flow runs that need the same stage output (a parallel sweep, two deployment runs, two
`fsa-distill run` started together) must compute it once: the first takes the stage's lock, the
other waits and then reads the first one's cache record. Prefect does the waiting and reading
(SERIALIZABLE cache isolation); this module is its lock manager (`prefect.locking.protocol.LockManager`).

Prefect's own `FileSystemLockManager` is the model, with two changes that matter here:

* a lock file appears complete or not at all (written beside it, then hard-linked into place,
  which fails when the name exists), so a reader never parses half a file;
* a lock is a lease: the holder touches the file every `lease_s / 4` seconds, and a lock whose
  file a waiter has seen untouched for `lease_s` (by its own clock: machines' clocks may differ)
  belongs to a process that died (killed, machine lost). The waiter takes it over instead of
  waiting forever, as a lock without expiry would have it. A lock whose holder was a process of
  the waiter's own machine (same host name, boot and pid namespace) that no longer exists is
  taken over at once.

A live holder that stalls for longer than the lease (suspended, swapped out) can lose its lock to
a waiter; the stage then runs twice, and the store's first-writer-wins publication keeps one
output (`fsa_distill.tasks.stage`). The folder must support hard links and atomic rename: local
disks and NFSv3+ do. On object storage, `ObjectLeaseLockManager` keeps the same leases with
exclusive puts (see its caveat); Prefect's Redis lock manager is the alternative (README).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

#: Seconds without a heartbeat after which a lock counts as abandoned.
DEFAULT_LEASE_S = 60.0
#: Seconds between two looks at a lock someone else holds.
POLL_S = 0.2


class LeaseLockManager:
    """A Prefect lock manager over `<directory>/<key>.lock` files, with renewed leases (see module doc)."""

    def __init__(self, directory: str | Path, lease_s: float = DEFAULT_LEASE_S, poll_s: float = POLL_S) -> None:
        self.directory = Path(directory).expanduser().resolve()
        self.lease_s = float(lease_s)
        self.poll_s = float(poll_s)
        self._held: dict[str, str] = {}  # key -> holder, for the locks this process holds
        self._guard = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        # key -> (lock file mtime, local monotonic time it was first seen): a lease is judged by how
        # long *this* process has seen the file unchanged, never by comparing another machine's
        # clock (the file server's mtime) with ours
        self._seen: dict[str, tuple[float, float]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a task sent to a Dask worker) as its folder: each process has its own heartbeat."""
        return (_restore, (str(self.directory), self.lease_s, self.poll_s))

    # -- files ----------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The lock file of `key` (a cache key may hold characters a file name must not)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:100]
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self.directory / f"{safe}-{digest}.lock"

    def _load(self, key: str) -> tuple[dict[str, Any], Any] | None:
        """The lock's content and a token that changes with every heartbeat (here: the file's
        mtime), or None when there is no lock."""
        path = self.path(key)
        try:
            return json.loads(path.read_bytes()), path.stat().st_mtime
        except (FileNotFoundError, ValueError):
            return None

    def _exists(self, key: str) -> bool:
        return self.path(key).exists()

    def _read(self, key: str) -> dict[str, Any] | None:
        """The lock's holder and how long this process has seen it without a heartbeat (`age_s`),
        or None when there is no lock (or it just went away)."""
        loaded = self._load(key)
        if loaded is None:
            return None
        info, token = loaded
        now = time.monotonic()
        with self._guard:
            seen_token, since = self._seen.get(key, (None, now))
            if seen_token != token:
                since = now
            self._seen[key] = (token, since)
        info["age_s"] = now - since
        return info

    def _create(self, key: str, holder: str) -> bool:
        """Create the lock file with its content in one step; False when it exists already."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(_content(holder)))
        try:
            os.link(tmp, self.path(key))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _break(self, key: str) -> None:
        """Move an abandoned lock out of the way (a rename succeeds for one process only).

        Two waiters can both see the same abandoned lock; if the other one already replaced it with
        its own fresh lock, the rename moved a live lock: it is put back (a rename keeps the mtime),
        unless its holder is a process of this host that no longer exists.
        """
        path = self.path(key)
        aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.expired")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            try:
                dead = _dead_here(json.loads(aside.read_bytes()))
            except ValueError:
                dead = False
            if not dead and time.time() - aside.stat().st_mtime <= self.lease_s / 2:  # touched just now: live
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
        finally:
            aside.unlink(missing_ok=True)

    def _touch(self, key: str, holder: str) -> None:
        """Renew `holder`'s lease (a heartbeat)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(key))

    def _delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    # -- heartbeat ------------------------------------------------------------------------------

    def _beat(self) -> None:
        while True:
            time.sleep(self.lease_s / 4)
            with self._guard:
                held = dict(self._held)
                if not held:
                    self._heartbeat = None
                    return
            for key, holder in held.items():
                info = self._read(key)
                if info is not None and info.get("holder") == holder:
                    self._touch(key, holder)

    def _hold(self, key: str, holder: str) -> None:
        with self._guard:
            self._held[key] = holder
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name="fsa-lock-heartbeat", daemon=True)
                self._heartbeat.start()

    # -- the LockManager protocol ---------------------------------------------------------------

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        """Take the lock for `holder`, waiting up to `acquire_timeout` seconds (None: as long as it takes).

        Re-entrant for the same holder. `hold_timeout` is not used: the lease, renewed while this
        process lives, bounds how long a dead holder can block others.
        """
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            # look before creating: a waiter would otherwise write and delete a file every poll
            if not self._exists(key) and self._create(key, holder):
                self._hold(key, holder)
                return True
            info = self._read(key)
            if info is not None:
                if info.get("holder") == holder:
                    self._hold(key, holder)
                    return True
                if info["age_s"] > self.lease_s or _dead_here(info):
                    self._break(key)
                    continue
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        """`acquire_lock` in a worker thread."""
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        """Release `holder`'s lock; ValueError when `holder` does not hold it (as Prefect's managers do)."""
        info = self._read(key)
        with self._guard:
            if self._held.get(key) == holder:  # another holder in this process keeps its heartbeat
                del self._held[key]
        if info is None or info.get("holder") != holder:
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        self._delete(key)

    def is_locked(self, key: str) -> bool:
        """Whether a live holder has the lock."""
        info = self._read(key)
        return info is not None and info["age_s"] <= self.lease_s

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether `holder` has the lock."""
        info = self._read(key)
        return info is not None and info.get("holder") == holder and info["age_s"] <= self.lease_s

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds the lock; False after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """`wait_for_lock` in a worker thread."""
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


@functools.cache
def machine_id() -> str:
    """Where this process's pid means something: host name, boot id and pid namespace. Containers
    that share a host name (host networking) have their own pid namespaces, and a pid of a past
    boot means nothing now."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        parts.append("?")
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("?")
    return "|".join(parts)


def _dead_here(info: dict[str, Any]) -> bool:
    """Whether the lock's holder was a process of this machine (same host, boot and pid namespace)
    that no longer exists: a run that was killed (Ctrl-C, OOM) need not block the next one for a
    whole lease. Anywhere else, only the lease decides."""
    if info.get("machine") != machine_id() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by someone else
        return False
    return False


def _content(holder: str, beat: int = 0) -> dict[str, Any]:
    return {"holder": holder, "host": socket.gethostname(), "machine": machine_id(), "pid": os.getpid(), "beat": beat}


class ObjectLeaseLockManager(LeaseLockManager):
    """The same leases on object storage (any fsspec URL, e.g. `s3://bucket/prefix/.locks`).

    A lock is an object created with an exclusive put (S3's `If-None-Match: *`, which s3fs sends
    for `mode="create"`): of two creators, one gets it. The holder's heartbeat rewrites the object
    with a higher `beat`, and a waiter that has seen the same beat for `lease_s` deletes it.
    Object stores have no rename, so breaking a lock is a look then a delete: two waiters that
    break the same dead lock at the same moment can both go on, and the stage then runs twice;
    publication keeps the first output (`fsa_distill.store`). Prefect's Redis lock manager
    (prefect-redis) has no such window, and needs a Redis server.
    """

    def __init__(self, url: str, lease_s: float = DEFAULT_LEASE_S, poll_s: float = POLL_S) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.directory = Path(self.root)  # for messages only: never a local folder
        self.lease_s = float(lease_s)
        self.poll_s = float(poll_s)
        self._held = {}
        self._guard = threading.Lock()
        self._heartbeat = None
        self._seen = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self.url, self.lease_s, self.poll_s))

    def object(self, key: str) -> str:
        """The lock object of `key`."""
        return f"{self.root}/{self.path(key).name}"

    def _load(self, key: str) -> tuple[dict[str, Any], Any] | None:
        try:
            info = json.loads(self.fs.cat_file(self.object(key)))
        except (FileNotFoundError, ValueError):
            return None
        return info, (info.get("holder"), info.get("beat"))

    def _exists(self, key: str) -> bool:
        return self._load(key) is not None

    def _create(self, key: str, holder: str) -> bool:
        from fsa_distill.store import create_object

        return create_object(self.fs, self.object(key), json.dumps(_content(holder)).encode())

    def _touch(self, key: str, holder: str) -> None:
        loaded = self._load(key)
        if loaded is not None and loaded[0].get("holder") == holder:
            beat = int(loaded[0].get("beat", 0)) + 1
            self.fs.pipe_file(self.object(key), json.dumps(_content(holder, beat)).encode())

    def _break(self, key: str) -> None:
        seen = self._seen.get(key)
        loaded = self._load(key)
        if loaded is not None and seen is not None and loaded[1] == seen[0]:  # still the dead one
            self._delete(key)

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.object(key))


_MANAGERS: dict[str, LeaseLockManager] = {}
_MANAGERS_GUARD = threading.Lock()


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether `location` is an fsspec URL other than a local file (`s3://...`, `memory://...`)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def lock_manager(
    directory: str | os.PathLike[str], lease_s: float = DEFAULT_LEASE_S, poll_s: float = POLL_S
) -> LeaseLockManager:
    """The process's lock manager for a folder or an object-store URL (one each, so one heartbeat each)."""
    if is_url(directory):
        name = os.fspath(directory).rstrip("/")
        with _MANAGERS_GUARD:
            if name not in _MANAGERS:
                _MANAGERS[name] = ObjectLeaseLockManager(name, lease_s, poll_s)
            return _MANAGERS[name]
    text = os.fspath(directory)
    path = Path(text.removeprefix("file://")).expanduser().resolve()
    with _MANAGERS_GUARD:
        if str(path) not in _MANAGERS:
            _MANAGERS[str(path)] = LeaseLockManager(path, lease_s, poll_s)
        return _MANAGERS[str(path)]


def _restore(directory: str, lease_s: float, poll_s: float) -> LeaseLockManager:
    return lock_manager(directory, lease_s, poll_s)
