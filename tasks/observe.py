"""What watches a stage while it runs as a Prefect task: live MLflow metrics, a Prefect progress artifact.

Imported only by the stage runner (`tasks/stage.py`), which no stage's code version includes
(`fsa_distill.codehash.EXCLUDED`): stage code reports through `fsa_distill.progress` alone, and
this module decides where that goes, so neither Prefect nor MLflow leaks into stage code or keys.

* Metrics (`progress.metrics`) go to the MLflow run named by the stage's `observe` argument as
  `Metric(key, value, timestamp_ms, step)`, buffered and written at most every `FLUSH_S` seconds
  and at the end of the stage. The timestamps are the ones the stage measured, converted as the
  flow converts the times it replays (`progress.timestamp_ms`), so a SQL store sees a replayed
  point as the row it already has. A failed write is retried at the next flush and at the end;
  what still cannot be written is a warning, never the stage's failure.
* Progress lines with a total drive one Prefect progress artifact per `what` on the task run
  (created on the first line, updated on later ones; the lines are already rate-limited).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

from fsa_distill.progress import timestamp_ms
from fsa_distill.redact import redact_text

log = logging.getLogger(__name__)

#: Seconds between two writes of buffered metrics to MLflow.
FLUSH_S = 5.0
#: MLflow's limit of metrics per `log_batch`.
MAX_BATCH = 1000
#: Metrics kept while MLflow cannot be written; older ones are dropped past this.
MAX_PENDING = 100_000
#: Seconds waited before each retry of the final write.
FINAL_RETRIES_S = (0.5, 2.0)


def _store_lock(uri: str) -> Any:
    """The flow's process-wide lock for the tracking store at `uri`, when the flow provides one.

    SQLite allows one writer: sharing the flow's lock keeps live metrics from colliding with the
    flow's own writes in the same process. Without it (another process, an older flow) writes
    are retried instead.
    """
    try:
        from fsa_distill.flows import tracking
    except ImportError:
        return nullcontext()
    lock = getattr(tracking, "store_lock", None)
    return lock(uri) if callable(lock) else nullcontext()


class StageObserver:
    """The `fsa_distill.progress.Observer` of one stage run (see the module docstring).

    `observe` is the stage task's `observe` argument: `{"mlflow_uri": str, "mlflow_run_id": str}`
    streams metrics into that run; None or {} streams nothing. Progress artifacts are made only
    inside a Prefect task run.
    """

    def __init__(self, observe: Mapping[str, Any] | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        observe = dict(observe or {})
        self.uri: str | None = observe.get("mlflow_uri") or None
        self.run_id: str | None = observe.get("mlflow_run_id") or None
        if bool(self.uri) != bool(self.run_id):
            log.warning("observe needs both mlflow_uri and mlflow_run_id; live metrics are off for this stage")
            self.uri = self.run_id = None
        self._clock = clock
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending: list[Any] = []
        self._last_flush = clock()
        self._client: Any = None
        self._failing = False
        self._artifacts: dict[str, Any] = {}
        self._artifacts_off = False

    # -- metrics to MLflow -------------------------------------------------------------------
    def metrics(self, values: Mapping[str, float], step: int, timestamp: float) -> None:
        """Buffer metrics for the MLflow run; write the buffer when `FLUSH_S` has passed."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        stamp = timestamp_ms(timestamp)
        with self._lock:
            self._pending.extend(Metric(key, float(value), stamp, int(step)) for key, value in values.items())
            if len(self._pending) > MAX_PENDING:
                dropped = len(self._pending) - MAX_PENDING
                del self._pending[:dropped]
                log.warning(
                    "MLflow run %s: %d live metrics dropped (the store cannot be written)", self.run_id, dropped
                )
            due = self._clock() - self._last_flush >= FLUSH_S
        if due:
            self.flush()

    def flush(self) -> bool:
        """Write the buffered metrics; True when nothing is left unwritten."""
        if self.run_id is None:
            return True
        with self._write_lock:  # one writer per observer; metrics logged meanwhile wait for the next flush
            with self._lock:
                batch, self._pending = self._pending, []
                self._last_flush = self._clock()
            if not batch:
                return True
            sent = 0
            try:
                client = self._mlflow()
                with _store_lock(self.uri or ""):
                    while sent < len(batch):
                        client.log_batch(self.run_id, metrics=batch[sent : sent + MAX_BATCH])
                        sent += MAX_BATCH
                written = True
            except Exception as exc:
                written = False
                with self._lock:
                    self._pending[:0] = batch[sent:]  # keep the unwritten ones, in order, for the next attempt
                if not self._failing:
                    log.warning(
                        "MLflow run %s: live metrics not written yet (%s: %s); retrying later",
                        self.run_id,
                        type(exc).__name__,
                        redact_text(str(exc)),
                    )
                self._failing = True
            else:
                self._failing = False
        return written

    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # -- progress to Prefect -----------------------------------------------------------------
    def progress(self, info: Mapping[str, Any]) -> None:
        """Create or update the task run's progress artifact for `info["what"]` (percent done)."""
        fraction = info.get("fraction")
        if fraction is None or self._artifacts_off:
            return
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        what = str(info.get("what") or "progress")
        percent = round(100.0 * float(fraction), 1)
        try:
            if what not in self._artifacts:
                self._artifacts[what] = create_progress_artifact(percent, description=what, _sync=True)
            else:
                update_progress_artifact(self._artifacts[what], percent, _sync=True)
        except Exception as exc:
            self._artifacts_off = True  # the API is unreachable: say so once, not at every line
            log.warning(
                "Prefect progress artifact not updated (%s: %s); progress lines go on",
                type(exc).__name__,
                redact_text(str(exc)),
            )

    # -- end of the stage --------------------------------------------------------------------
    def close(self) -> None:
        """Write what is left, retrying a couple of times; what still fails is a warning."""
        if self.flush():
            return
        for delay in FINAL_RETRIES_S:
            time.sleep(delay)
            if self.flush():
                return
        with self._lock:
            lost, self._pending = len(self._pending), []
        log.warning("MLflow run %s: %d live metrics could not be written", self.run_id, lost)
