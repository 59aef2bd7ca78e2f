"""Turn a plain artifact-to-artifact function into a cached, retryable Prefect task.

A stage function has the signature `fn(out: Path, **params) -> None`: it writes its output into
`out`, a fresh folder that replaces the final one only when the function returns (atomic), and
it never calls Prefect or MLflow. Its cache key is the hash of

* the stage name and its code version (the source of its module and of the modules it names),
* its parameters: config sections, plain values and the *content hash* of input artifacts.

The output lives at `<store>/<stage>/<key>`, sealed with a manifest of per-file hashes. Before a
stage is submitted, `Stage.submit` checks that manifest; a deleted or edited output makes Prefect
refresh its cache entry instead of returning a result that points at missing or changed files.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import shutil
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsa_distill.artifacts import Artifact, atomic_dir, canonical_json, seal, verify
from fsa_distill.errors import is_transient

if TYPE_CHECKING:  # Prefect is imported only where tasks are built, so `Stage.run` works without it
    from prefect import Task
    from prefect.futures import PrefectFuture
    from prefect.task_runners import TaskRunner

StageFn = Callable[..., None]


def _retry_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry only failures that another attempt can fix (network, server 5xx/429)."""
    try:
        state.result()
    except BaseException as exc:  # the state's stored exception is re-raised here
        return is_transient(exc)
    return False


class Stage:
    """A named, cached, idempotent unit of work from artifacts to one output folder."""

    def __init__(
        self,
        name: str,
        fn: StageFn,
        *,
        code: Sequence[str] = (),
        retries: int = 0,
        resumable: bool = False,
        unkeyed: dict[str, tuple[str, ...] | None] | None = None,
    ) -> None:
        self.name = name
        # Parameters (None) or keys of dict parameters (a tuple) that change how a stage runs but not
        # what it produces (timeouts, checkpoint cadence, an interpreter path, where a mirror lives):
        # they stay out of the cache key, so changing them recomputes nothing.
        self.unkeyed = unkeyed or {}
        self.fn = fn
        self.code_modules = (fn.__module__, *code)
        self.retries = retries
        self.resumable = resumable

    @cached_property
    def code_version(self) -> str:
        """Hash of the source of the stage's module and the modules whose logic it depends on."""
        digest = hashlib.sha256()
        for module_name in self.code_modules:
            digest.update(inspect.getsource(importlib.import_module(module_name)).encode())
        return digest.hexdigest()[:16]

    def key(self, params: dict[str, Any]) -> str:
        """Cache key: stage, code version and parameters (input artifacts by content hash)."""
        keyed = {}
        for name, value in params.items():
            if name in self.unkeyed and self.unkeyed[name] is None:
                continue
            drop = self.unkeyed.get(name) or ()
            keyed[name] = {k: v for k, v in value.items() if k not in drop} if drop else value
        payload = canonical_json({"stage": self.name, "code": self.code_version, "params": keyed})
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def output_dir(self, store: str | Path, params: dict[str, Any]) -> Path:
        """Where this stage's output for `params` lives."""
        return Path(store) / self.name / self.key(params)

    def cached(self, store: str | Path, params: dict[str, Any]) -> Artifact | None:
        """The existing output for `params` if it is complete and unmodified, else None."""
        out = self.output_dir(store, params)
        digest = verify(out)
        return Artifact(path=str(out), sha256=digest, stage=self.name) if digest else None

    def run(self, store: str | Path, params: dict[str, Any]) -> Artifact:
        """Produce (or reuse) the output for `params`, without Prefect: the plain function path."""
        existing = self.cached(store, params)
        if existing is not None:
            return existing
        out = self.output_dir(store, params)
        kwargs = dict(params)
        if self.resumable:
            scratch = out.with_name(out.name + ".scratch")
            scratch.mkdir(parents=True, exist_ok=True)
            kwargs["scratch"] = scratch
        with atomic_dir(out) as tmp:
            self.fn(tmp, **kwargs)
            seal(tmp)
        if self.resumable:
            shutil.rmtree(out.with_name(out.name + ".scratch"), ignore_errors=True)
        digest = verify(out)
        if digest is None:  # pragma: no cover - would mean the filesystem lost our rename
            raise RuntimeError(f"stage {self.name}: output {out} failed verification after writing")
        return Artifact(path=str(out), sha256=digest, stage=self.name)

    @cached_property
    def task(self) -> Task:
        """The Prefect task: cache key from `key`, results persisted, retries for transient errors."""
        from prefect import task

        def run_stage(store: str, params: dict[str, Any]) -> Artifact:
            return self.run(store, params)

        run_stage.__name__ = self.name
        return task(
            run_stage,
            name=self.name,
            cache_key_fn=lambda _ctx, parameters: f"{self.name}-{self.key(parameters['params'])}",
            persist_result=True,
            retries=self.retries,
            retry_delay_seconds=[2, 10, 30][: max(self.retries, 1)],
            retry_condition_fn=_retry_transient,
        )

    def submit(self, runner: TaskRunner, store: str | Path, params: dict[str, Any], label: str = "") -> PrefectFuture:
        """Submit to `runner` (an entered task runner) from inside a flow run.

        Prefect's cache entry is refreshed when the output files are gone or changed, so a
        cached result never points at missing or edited files.
        """
        stale = self.cached(store, params) is None
        run_name = f"{self.name}[{label}]" if label else self.name
        task = self.task.with_options(refresh_cache=stale, task_run_name=run_name)
        return runner.submit(task, {"store": str(store), "params": params})


def stage(
    name: str,
    *,
    code: Sequence[str] = (),
    retries: int = 0,
    resumable: bool = False,
    unkeyed: dict[str, tuple[str, ...] | None] | None = None,
) -> Callable[[StageFn], Stage]:
    """Decorator form of `Stage`."""

    def wrap(fn: StageFn) -> Stage:
        return Stage(name, fn, code=code, retries=retries, resumable=resumable, unkeyed=unkeyed)

    return wrap
