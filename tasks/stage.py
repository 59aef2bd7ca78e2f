"""Turn a plain artifact-to-artifact function into a cached, retryable Prefect task.

A stage function has the signature `fn(out: Path, **params) -> None`: it writes its output into
`out`, a fresh folder that replaces the final one only when the function returns (atomic), and
it never calls Prefect or MLflow. Its cache key is the hash of

* the stage name and its code version (the normalised code of its module and of every project
  module it imports, transitively: `fsa_distill.codehash`),
* its parameters, built by the stage module's own `params(cfg, **inputs)`: config values, and
  input artifacts by *content hash* (never by path), minus the stage's `unkeyed` paths.

The output lives at `<store>/<stage>/<key>`, sealed with a manifest of per-file hashes. Before a
stage is submitted, `Stage.submit` checks that manifest; a deleted or edited output makes Prefect
forget its cache record instead of returning a result that points at missing or changed files.

Runs that share a store never compute one output twice, whether they are threads, processes or
machines: a task takes the output's lock before it looks for a cache record (Prefect's
SERIALIZABLE isolation, with the lease locks of `fsa_distill.locks` in `<store>/.locks`), so the
second of two runs waits and then finds the first one's record (a `Cached` state). Without
Prefect, `Stage.run` takes a lock of its own for the same reason. Publication is first-writer-wins:
a complete output already in place is never replaced by a second writer, and a reader never sees
a half-written one.

While a stage runs as a task, `fsa_distill.*` log lines go through the task run's logger (its
name on the console, the lines in the UI: `fsa_distill.progress.install_stage_logging`), and what
the stage reports through `fsa_distill.progress` reaches a `tasks.observe.StageObserver`: a
Prefect progress artifact, and live metrics for the MLflow run given as `observe` (outside the key).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsa_distill.tasks.observe import StageObserver

from fsa_distill.artifacts import MEASURED, Artifact, canonical_json, seal
from fsa_distill.codehash import closure, code_version
from fsa_distill.errors import is_transient
from fsa_distill.progress import install_stage_logging, observing
from fsa_distill.store import LOCKS, Store, open_store, publish_folder

if TYPE_CHECKING:  # Prefect is imported only where tasks are built, so `Stage.run` works without it
    from prefect import Task
    from prefect.futures import PrefectFuture
    from prefect.task_runners import TaskRunner

StageFn = Callable[..., None]
_log = logging.getLogger("fsa_distill.stage")
#: `measured/ran_on.json` in every output: which process computed it (outside the content hash).
RAN_ON = f"{MEASURED}/ran_on.json"
#: `publish` is the store's first-writer-wins move of a finished folder (kept under this name).
publish = publish_folder
__all__ = ["LOCKS", "Stage", "publish", "stage"]


def forget_record(task: Task, key: str) -> bool:
    """Delete Prefect's cache record `key` of `task`, so that the task runs (under its lock) instead of
    returning a result whose files are gone. False when the records are somewhere else than a local
    folder or an fsspec URL (another storage block)."""
    from prefect.results import get_result_store

    store = get_result_store().update_for_task(task)
    storage = store.metadata_storage or store.result_storage
    basepath = getattr(storage, "basepath", None)
    kind = type(storage).__name__
    if not basepath or kind not in ("LocalFileSystem", "RemoteFileSystem"):
        return False
    if kind == "LocalFileSystem":
        (Path(str(basepath)).expanduser() / key).unlink(missing_ok=True)
        return True
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(basepath))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(f"{root.rstrip('/')}/{key}")
    return True


def _retry_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry only failures that another attempt can fix (network, server 5xx/429)."""
    try:
        state.result()
    except BaseException as exc:  # the state's stored exception is re-raised here
        return is_transient(exc)
    return False


class Stage:
    """A named, cached, idempotent unit of work from artifacts to one output folder.

    The stage owns its key: `params(cfg, **inputs)` (registered with `@<stage>.configure` in the
    stage's module) is the only code that reads the config for it; `unkeyed` lists dotted paths
    into those params that change how it runs but not what it writes; the code version is the
    stage module's import closure (`fsa_distill.codehash`).
    """

    def __init__(
        self,
        name: str,
        fn: StageFn,
        *,
        retries: int = 0,
        resumable: bool = False,
        unkeyed: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.fn = fn
        # Dotted paths into the params (`teacher.timeout_s`, `path`) that change how a stage runs but
        # not what it produces: they stay out of the key. Each must resolve (a typo would re-key silently).
        self.unkeyed = tuple(unkeyed)
        self.module = fn.__module__
        self.retries = retries
        self.resumable = resumable
        self._params: Callable[..., dict[str, Any]] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled by reference (its module and name), as functions are: a task sent to a Dask worker
        carries its cache policy, whose key function is this stage's method."""
        return (_stage_by_name, (self.module, self.name))

    def configure(self, fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        """Register the function from (config, input artifacts) to this stage's parameters."""
        self._params = fn
        return fn

    def params(self, cfg: dict[str, Any], **inputs: Any) -> dict[str, Any]:
        """This stage's parameters for the resolved config `cfg` and its input artifacts."""
        if self._params is None:
            raise TypeError(f"stage {self.name}: no params function registered (@{self.name}.configure)")
        return self._params(cfg, **inputs)

    @property
    def code_closure(self) -> dict[str, str]:
        """module -> digest of every project module the stage's code depends on."""
        return closure([self.module])

    @property
    def code_version(self) -> str:
        """One digest of the stage's code closure (docstrings and comments excluded)."""
        return code_version([self.module])

    def keyed(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params with the unkeyed paths removed; a path that does not resolve raises."""
        keyed = copy.deepcopy(params)
        for path in self.unkeyed:
            *parents, leaf = path.split(".")
            node: Any = keyed
            for part in parents:
                if not isinstance(node, dict) or part not in node:
                    raise KeyError(f"stage {self.name}: unkeyed path {path!r} is not in its params")
                node = node[part]
            if not isinstance(node, dict) or leaf not in node:
                raise KeyError(f"stage {self.name}: unkeyed path {path!r} is not in its params")
            del node[leaf]
        return keyed

    def key(self, params: dict[str, Any]) -> str:
        """Cache key: stage, code version and parameters (input artifacts by content hash)."""
        payload = canonical_json({"stage": self.name, "code": self.code_version, "params": self.keyed(params)})
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def output_dir(self, store: str | Path, params: dict[str, Any]) -> Path:
        """Where this stage's output for `params` lives in a local store."""
        return Path(store) / self.name / self.key(params)

    def _artifact(self, store: Store, key: str, digest: str) -> Artifact:
        rel = f"{self.name}/{key}"
        return Artifact(path=store.location(rel), sha256=digest, stage=self.name, rel=rel)

    def cached(self, store: str | Path | Store, params: dict[str, Any]) -> Artifact | None:
        """The existing output for `params` if it is complete and unmodified, else None."""
        st, key = open_store(store), self.key(params)
        digest = st.verify(f"{self.name}/{key}")
        return self._artifact(st, key, digest) if digest else None

    def run(self, store: str | Path | Store, params: dict[str, Any]) -> Artifact:
        """Produce (or reuse) the output for `params`, without Prefect: the plain function path.

        `store` is a folder or an fsspec URL (`fsa_distill.store`). Input artifacts are bound to
        local paths first: in a local store, where it is now (a moved or copied store resolves);
        in a remote one, this machine's verified copy.
        """
        st = open_store(store)
        existing = self.cached(st, params)
        if existing is not None:
            return existing
        key = self.key(params)
        # Another process may be writing this output (its scratch folder too): wait for it, then reuse.
        locks = st.locks()
        lock, holder = f"write-{self.name}-{key}", uuid.uuid4().hex
        locks.acquire_lock(lock, holder)
        try:
            existing = self.cached(st, params)
            if existing is not None:
                return existing
            return self._compute(st, key, st.bind(params))
        finally:
            try:
                locks.release_lock(lock, holder)
            except ValueError:  # taken over while we stalled past the lease: the output is published anyway
                _log.warning("stage %s: lock %s was taken over before it was released", self.name, lock)

    def _compute(self, store: Store, key: str, params: dict[str, Any]) -> Artifact:
        rel = f"{self.name}/{key}"
        work = store.work_dir(rel)
        kwargs = dict(params)
        scratch = work / f"{key}.scratch"
        if self.resumable:
            scratch.mkdir(parents=True, exist_ok=True)
            kwargs["scratch"] = scratch
        tmp = Path(tempfile.mkdtemp(dir=work, prefix=f".{key}.", suffix=".tmp"))
        try:
            self.fn(tmp, **kwargs)
            (tmp / MEASURED).mkdir(exist_ok=True)
            (tmp / RAN_ON).write_text(json.dumps(ran_on()))
            seal(tmp)
            digest = store.publish(tmp, rel)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.resumable:
            shutil.rmtree(scratch, ignore_errors=True)
        return self._artifact(store, key, digest)

    @cached_property
    def task(self) -> Task:
        """The Prefect task: cache key from `key`, results persisted, retries for transient errors.

        The task's `observe` argument (see `submit`) is outside the cache key, which hashes `params`
        only. The cache policy is completed per store by `submit` (its lock folder).
        """
        from prefect import task
        from prefect.cache_policies import CacheKeyFnPolicy

        def run_stage(store: str, params: dict[str, Any], observe: dict[str, Any] | None = None) -> Artifact:
            # `fsa_distill.*` log lines carry the task-run name; progress and metrics reach the observer.
            install_stage_logging()
            observer = StageObserver(observe)
            try:
                with observing(observer):
                    return self.run(store, params)
            finally:
                observer.close()

        run_stage.__name__ = self.name
        return task(
            run_stage,
            name=self.name,
            cache_policy=CacheKeyFnPolicy(cache_key_fn=self._cache_key),
            persist_result=True,
            retries=self.retries,
            retry_delay_seconds=[2, 10, 30][: max(self.retries, 1)],
            retry_condition_fn=_retry_transient,
        )

    def _cache_key(self, _context: Any, parameters: dict[str, Any]) -> str:
        return f"{self.name}-{self.key(parameters['params'])}"

    def submit(
        self,
        runner: TaskRunner,
        store: str | Path | Store,
        params: dict[str, Any],
        label: str = "",
        observe: dict[str, Any] | None = None,
        tags: Sequence[str] = (),
    ) -> PrefectFuture:
        """Submit to `runner` (an entered task runner) from inside a flow run.

        `store` is a folder or an fsspec URL: with a URL, Prefect's cache records and results go
        there too (`<url>/.prefect`), so every machine that shares the store shares its cache.
        `tags` are Prefect tags of the task run: the flow gives the stages that use an accelerator
        the `runner.gpu_tag`, whose concurrency limit bounds how many of them run at once.

        Prefect's cache record is forgotten when the output files are gone or changed, so a
        cached result never points at missing or edited files. The task takes the output's lock
        in `<store>/.locks` before it looks for a record (SERIALIZABLE), so a run that submits an
        output another run is computing waits for it and ends `Cached`.

        `observe` says who watches the run, never what it computes, so it is not in the cache key
        (a cached result is reused whatever it says): `{"mlflow_uri": str, "mlflow_run_id": str}`
        streams the stage's live metrics (`fsa_distill.progress.metrics`, e.g. training curves)
        into that MLflow run while it runs; None streams nothing. It must be picklable (plain
        strings) for runners that send tasks to other processes. In every task run, progress lines
        also drive a Prefect progress artifact (tasks/observe.py).
        """
        run_name = f"{self.name}[{label}]" if label else self.name
        st = open_store(store)
        policy = self.task.cache_policy.configure(  # type: ignore[union-attr]
            lock_manager=st.locks(), isolation_level="SERIALIZABLE"
        )
        options: dict[str, Any] = {"cache_policy": policy, "task_run_name": run_name}
        if st.result_storage() is not None:  # a remote store keeps Prefect's records beside the outputs
            options["result_storage"] = st.result_storage()
        if tags:
            options["tags"] = set(tags)
        task = self.task.with_options(**options)
        if self.cached(st, params) is None and not self._forget(task, st, params):
            task = task.with_options(refresh_cache=True)
        return runner.submit(task, {"store": st.url, "params": params, "observe": observe})

    def _forget(self, task: Task, store: Store, params: dict[str, Any]) -> bool:
        """Forget the cache record of an output found stale, unless another run is computing it
        right now (it holds the lock, and its commit writes a fresh record): the check and the
        deletion happen under the same lock the task takes. False when the record is not in a
        folder or at a URL."""
        key = self._cache_key(None, {"params": params})
        locks = store.locks()
        holder = uuid.uuid4().hex
        if not locks.acquire_lock(key, holder, acquire_timeout=0):
            return True  # being computed: the task will wait for it and find its record
        try:
            return self.cached(store, params) is not None or forget_record(task, key)
        finally:
            locks.release_lock(key, holder)

    def submit_for(
        self,
        runner: TaskRunner,
        store: str | Path,
        cfg: dict[str, Any],
        label: str = "",
        observe: dict[str, Any] | None = None,
        **inputs: Any,
    ) -> PrefectFuture:
        """`submit` with the params this stage derives from `cfg` and its inputs: what flows call."""
        return self.submit(runner, store, self.params(cfg, **inputs), label=label, observe=observe)


def ran_on() -> dict[str, Any]:
    """This process: its host, pid and Dask worker name (None outside a Dask worker)."""
    worker = None
    try:
        from distributed import get_worker

        worker = str(get_worker().name)
    except (ImportError, ValueError):
        pass
    return {"host": socket.gethostname(), "pid": os.getpid(), "dask_worker": worker}


def _stage_by_name(module: str, name: str) -> Stage:
    """The stage called `name` that module `module` defines (how a pickled `Stage` comes back)."""
    import importlib

    for value in vars(importlib.import_module(module)).values():
        if isinstance(value, Stage) and value.name == name:
            return value
    raise LookupError(f"module {module} defines no stage named {name!r}")


def stage(
    name: str,
    *,
    retries: int = 0,
    resumable: bool = False,
    unkeyed: Sequence[str] = (),
) -> Callable[[StageFn], Stage]:
    """Decorator form of `Stage`."""

    def wrap(fn: StageFn) -> Stage:
        return Stage(name, fn, retries=retries, resumable=resumable, unkeyed=unkeyed)

    return wrap
