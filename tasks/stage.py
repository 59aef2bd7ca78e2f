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

import copy
import errno
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsa_distill.tasks.observe import StageObserver

from fsa_distill.artifacts import Artifact, bind, canonical_json, seal, verify
from fsa_distill.codehash import closure, code_version
from fsa_distill.errors import is_transient
from fsa_distill.locks import lock_manager
from fsa_distill.progress import install_stage_logging, observing

if TYPE_CHECKING:  # Prefect is imported only where tasks are built, so `Stage.run` works without it
    from prefect import Task
    from prefect.futures import PrefectFuture
    from prefect.task_runners import TaskRunner

StageFn = Callable[..., None]
#: `<store>/.locks`: the lock files of the outputs being computed (`fsa_distill.locks`).
LOCKS = ".locks"


def publish(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`: first writer wins, readers never see half an output.

    A complete output (its manifest verifies) already at `out` is kept and `tmp` is dropped: another
    run published the same key first, and replacing it would pull files from under its readers.
    An incomplete or edited one is moved aside first (one rename), then removed.
    """
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


def forget_record(task: Task, key: str) -> bool:
    """Delete Prefect's cache record `key` of `task`, so that the task runs (under its lock) instead of
    returning a result whose files are gone. False when the records are not in a local folder."""
    from prefect.results import get_result_store

    store = get_result_store().update_for_task(task)
    storage = store.metadata_storage or store.result_storage
    basepath = getattr(storage, "basepath", None)
    if type(storage).__name__ != "LocalFileSystem" or not basepath:
        return False
    (Path(str(basepath)).expanduser() / key).unlink(missing_ok=True)
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
        """Where this stage's output for `params` lives."""
        return Path(store) / self.name / self.key(params)

    def _artifact(self, store: str | Path, key: str, digest: str) -> Artifact:
        return Artifact(
            path=str(Path(store) / self.name / key), sha256=digest, stage=self.name, rel=f"{self.name}/{key}"
        )

    def cached(self, store: str | Path, params: dict[str, Any]) -> Artifact | None:
        """The existing output for `params` if it is complete and unmodified, else None."""
        key = self.key(params)
        digest = verify(Path(store) / self.name / key)
        return self._artifact(store, key, digest) if digest else None

    def run(self, store: str | Path, params: dict[str, Any]) -> Artifact:
        """Produce (or reuse) the output for `params`, without Prefect: the plain function path.

        Input artifacts are bound to `store` first, so outputs cached in a moved or copied store
        are read from where the store is now.
        """
        params = bind(params, store)
        existing = self.cached(store, params)
        if existing is not None:
            return existing
        key = self.key(params)
        # Another process may be writing this output (its scratch folder too): wait for it, then reuse.
        locks = lock_manager(Path(store) / LOCKS)
        lock, holder = f"write-{self.name}-{key}", uuid.uuid4().hex
        locks.acquire_lock(lock, holder)
        try:
            existing = self.cached(store, params)
            if existing is not None:
                return existing
            return self._compute(store, key, params)
        finally:
            locks.release_lock(lock, holder)

    def _compute(self, store: str | Path, key: str, params: dict[str, Any]) -> Artifact:
        out = Path(store) / self.name / key
        out.parent.mkdir(parents=True, exist_ok=True)
        kwargs = dict(params)
        if self.resumable:
            scratch = out.with_name(out.name + ".scratch")
            scratch.mkdir(parents=True, exist_ok=True)
            kwargs["scratch"] = scratch
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            self.fn(tmp, **kwargs)
            seal(tmp)
            publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.resumable:
            shutil.rmtree(out.with_name(out.name + ".scratch"), ignore_errors=True)
        digest = verify(out)
        if digest is None:  # pragma: no cover - would mean the filesystem lost our rename
            raise RuntimeError(f"stage {self.name}: output {out} failed verification after writing")
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
        store: str | Path,
        params: dict[str, Any],
        label: str = "",
        observe: dict[str, Any] | None = None,
    ) -> PrefectFuture:
        """Submit to `runner` (an entered task runner) from inside a flow run.

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
        policy = self.task.cache_policy.configure(  # type: ignore[union-attr]
            lock_manager=lock_manager(Path(store) / LOCKS), isolation_level="SERIALIZABLE"
        )
        task = self.task.with_options(cache_policy=policy, task_run_name=run_name)
        if self.cached(store, params) is None and not self._forget(task, store, params):
            task = task.with_options(refresh_cache=True)
        return runner.submit(task, {"store": str(store), "params": params, "observe": observe})

    def _forget(self, task: Task, store: str | Path, params: dict[str, Any]) -> bool:
        """Forget the cache record of an output found stale, unless another run is computing it
        right now (it holds the lock, and its commit writes a fresh record): the check and the
        deletion happen under the same lock the task takes. False when the record is not local."""
        key = self._cache_key(None, {"params": params})
        locks = lock_manager(Path(store) / LOCKS)
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
