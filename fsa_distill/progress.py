"""Progress lines, live training metrics and task-run logging for stages that run for minutes.

A run must show that it is alive (the teacher generating, a student training) without flooding
the console or slowing the work: `Progress` writes rate-limited INFO lines (done/total, rate,
ETA) on the `fsa_distill.progress` logger, every `FSA_PROGRESS_INTERVAL_S` seconds (default 30)
and once when it finishes. On a terminal (`FSA_PROGRESS=auto`, the default; `live` or `plain`
force either) a `Board` also shows one row per running `Progress`, redrawn in place under the
log: stages run in parallel threads, so one owner draws every row, and Prefect's console
handlers print through that owner while it is live (their lines land above the rows instead of
through them). The periodic lines are then left off the console only: Prefect's API and any
other handler still get them. Off a terminal (CI, a log file) there are only the plain lines
(docs: /work/shared/design/watch-and-compare.md, section 2).

Stage code calls only this module, never Prefect or MLflow. What watches a stage is an
`Observer` set for the duration of the stage by the runner (`tasks/stage.py`, with `observing`):
`metrics()` sends live training metrics to it (the runner forwards them to MLflow) and every
progress line reaches it as well (the runner drives a Prefect progress artifact). Without an
observer, `metrics()` does nothing. Nothing here touches an output's content: times that a
stage keeps (`write_log_times`) go under `measured/`, outside the content hash.

`install_stage_logging()` makes the records of every `fsa_distill.*` logger (stages, flows and
teachers included) that are emitted inside a Prefect task run go through Prefect's task-run logger, so
the console shows `Task run 'finetune[...]' - ...` and the UI shows them on that task run; emitted
in the flow itself (outside any task run), they go through the flow run's logger. Prefect is imported
only there, lazily: importing this module costs the standard library only.

`ProgressCallback` (a `transformers.TrainerCallback`, built on first access so that transformers
is imported only by the code that trains) turns the Trainer's logs into progress lines and live
metrics, and records when each log-history entry was made.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

#: The logger of every progress line.
LOGGER = "fsa_distill.progress"
#: Seconds between two progress lines of one `Progress` (environment variable, default 30).
INTERVAL_ENV = "FSA_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0
#: How progress shows (environment variable): `auto` (live rows on a terminal, plain lines
#: otherwise, the default), `live` or `plain`.
MODE_ENV = "FSA_PROGRESS"
#: Rates (and so ETAs) are shown once this many seconds have passed: a first instant says nothing.
MIN_RATE_S = 1.0
#: The folder of an output whose files are outside its content hash (`fsa_distill.artifacts.MEASURED`).
MEASURED = "measured"
#: `<out>/measured/log_times.json`: a training stage's log-history entry times (`write_log_times`).
LOG_TIMES = "log_times.json"

log = logging.getLogger(LOGGER)


def default_interval_s() -> float:
    """The configured seconds between progress lines (`FSA_PROGRESS_INTERVAL_S`; invalid or unset: 30)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if math.isfinite(value) and value >= 0 else DEFAULT_INTERVAL_S


# ------------------------------------------------------------------------------------------------
# Observers: who watches the running stage


class Observer(Protocol):
    """What watches a running stage; set by the runner with `observing`, never by stage code."""

    def metrics(self, values: Mapping[str, float], step: int, timestamp: float) -> None:
        """Live metrics at `step`, measured at `timestamp` (Unix seconds)."""

    def progress(self, info: Mapping[str, Any]) -> None:
        """A progress line's `record.progress` (what, done, total, fraction, ...)."""


_OBSERVER: ContextVar[Observer | None] = ContextVar("fsa_distill_observer", default=None)
#: The `Progress`es opened while a stage runs (`observing`): those still open when it ends are closed.
_OPEN: ContextVar[list[Any] | None] = ContextVar("fsa_distill_open_progress", default=None)


@contextmanager
def observing(observer: Observer | None) -> Iterator[Observer | None]:
    """Make `observer` the one `metrics()` and progress lines report to, in this context only.

    A context variable, not a global: stages running at once in threads each see their own.
    Threads a stage starts itself do not inherit it (their metrics are dropped, their lines still print).
    """
    token, opened = _OBSERVER.set(observer), _OPEN.set([])
    try:
        yield observer
    finally:
        # a stage that failed mid-way (a training that raised) gets its "stopped after" line, and
        # leaves no row behind on the board
        for left in _OPEN.get() or []:
            if not left.closed:
                left.close()
        _OPEN.reset(opened)
        _OBSERVER.reset(token)


def _notify(method: str, *args: Any) -> None:
    """Call the active observer; its failure is a warning, never the stage's failure."""
    observer = _OBSERVER.get()
    if observer is None:
        return
    try:
        getattr(observer, method)(*args)
    except Exception as exc:
        log.warning("progress observer failed in %s: %s: %s", method, type(exc).__name__, exc)


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries of `values` that metrics can hold: numbers, not bools, None or NaN (inf is kept)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        number = float(value)
        if not math.isnan(number):
            out[str(key)] = number
    return out


def metrics(values: Mapping[str, Any], step: int, timestamp: float | None = None) -> None:
    """Send live metrics at `step` (measured at `timestamp`, Unix seconds; default now) to the observer.

    A no-op when nothing observes the stage. Non-numeric values, bools, None and NaN are left out.
    """
    if _OBSERVER.get() is None:
        return
    clean = numeric(values)
    if clean:
        _notify("metrics", clean, int(step), time.time() if timestamp is None else float(timestamp))


def timestamp_ms(seconds: float) -> int:
    """MLflow's metric timestamp for a Unix time in seconds: how live and replayed points agree exactly,
    so a SQL tracking store recognises a replayed point as the same row."""
    return int(seconds * 1000)


# ------------------------------------------------------------------------------------------------
# Progress lines


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=max(0, round(seconds))))


def _rate(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2g}"


def _field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Rate-limited progress lines for `total` units of work (None when unknown).

    `update(n, **fields)` adds `n` done units; `set(done, **fields)` sets the count (a Trainer's
    global step). Fields named in `rates` are amounts added up and shown per second (`tokens`:
    `212 tokens/s`); any other field is shown with its latest value (`loss 0.53`). A line is written
    at most every `interval_s` seconds (default `FSA_PROGRESS_INTERVAL_S`) and always once at the
    end (done reaches total, or `close`/leaving the `with` block), with the elapsed time. `initial`
    is work done before this run (a resumed training): rates and ETA count only what this run did.
    `clock` (monotonic seconds) is injectable for tests.
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str = "items",
        *,
        rates: tuple[str, ...] = (),
        initial: int = 0,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self.what = what
        self.total = None if total is None else int(total)
        self.unit = unit
        self.done = int(initial)
        self.initial = int(initial)
        self.amounts: dict[str, float] = {name: 0.0 for name in rates}
        self.fields: dict[str, Any] = {}
        self.interval_s = default_interval_s() if interval_s is None else max(0.0, float(interval_s))
        self._clock = clock
        self._logger = logger or log
        self._start = clock()
        self._last = self._start
        self._closed = False
        self._lock = threading.Lock()
        self._board = board()
        self._board_at = -math.inf
        opened = _OPEN.get()
        if opened is not None:
            opened.append(self)
        if self._board is not None:
            self._board.add(self, _row_label(what))

    @property
    def closed(self) -> bool:
        """Whether the final line was written."""
        return self._closed

    def update(self, n: int = 1, **fields: Any) -> None:
        """`n` more units done; `fields` as described in the class docstring."""
        with self._lock:
            line = self._advance(self.done + int(n), fields)
        self._write(line)

    def set(self, done: int, **fields: Any) -> None:
        """`done` units done in all (including `initial`)."""
        with self._lock:
            line = self._advance(int(done), fields)
        self._write(line)

    def close(self) -> None:
        """Write the final line (once), whether or not all the work was done."""
        with self._lock:
            line = None if self._closed else self._finish(self._clock())
        self._write(line)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _advance(self, done: int, fields: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        if self._closed:
            return None
        self.done = done
        for key, value in fields.items():
            if key in self.amounts:
                self.amounts[key] += float(value)
            else:
                self.fields[key] = value
        now = self._clock()
        if self.total is not None and done >= self.total:
            return self._finish(now)
        if self._board is not None and now - self._board_at >= BOARD_INTERVAL_S:
            self._board_at = now
            self._board.update(self, *self._line(now, final=False))
        if now - self._last >= self.interval_s:
            self._last = now
            return self._line(now, final=False)
        return None

    def _finish(self, now: float) -> tuple[str, dict[str, Any]]:
        self._closed = True
        self._last = now
        if self._board is not None:
            self._board.remove(self)
        return self._line(now, final=True)

    def _line(self, now: float, *, final: bool) -> tuple[str, dict[str, Any]]:
        """The text of a progress line and its `record.progress`."""
        elapsed = max(0.0, now - self._start)
        fraction = None
        if self.total is not None:
            fraction = 1.0 if self.total <= 0 else min(1.0, max(0.0, self.done / self.total))
        parts = []
        if self.total is None:
            parts.append(f"{self.done} {self.unit}")
        else:
            parts.append(f"{self.done}/{self.total} {self.unit} ({int(100 * (fraction or 0.0))}%)")
        made = self.done - self.initial
        eta = None
        if elapsed >= MIN_RATE_S and made > 0:
            rate = made / elapsed
            parts.append(f"{_rate(rate)} {self.unit}/s")
            if self.total is not None and not final:
                eta = max(0, self.total - self.done) / rate
        if elapsed >= MIN_RATE_S:
            parts += [f"{_rate(amount / elapsed)} {name}/s" for name, amount in self.amounts.items() if amount]
        parts += [f"{key} {_field(value)}" for key, value in self.fields.items() if value is not None]
        if final:
            complete = self.total is None or self.done >= self.total
            parts.append(f"{'done in' if complete else 'stopped after'} {_hms(elapsed)}")
        elif eta is not None:
            parts.append(f"ETA {_hms(eta)}")
        info = {
            "what": self.what,
            "done": self.done,
            "total": self.total,
            "fraction": fraction,
            "unit": self.unit,
            "elapsed_s": round(elapsed, 3),
            "eta_s": None if eta is None else round(eta, 3),
            "final": final,
        }
        return f"{self.what}: " + ", ".join(parts), info

    def _write(self, line: tuple[str, dict[str, Any]] | None) -> None:
        """Log a line (outside the lock: a handler may send it over the network) and tell the observer."""
        if line is None:
            return
        text, info = line
        self._logger.info(text, extra={"progress": info})
        _notify("progress", info)


# ------------------------------------------------------------------------------------------------
# The live board: one row per running Progress on a terminal

#: Seconds between two redraws of a row's text (rich redraws the screen at its own rate).
BOARD_INTERVAL_S = 0.25


def live_wanted() -> bool:
    """Whether progress shows as live rows: `FSA_PROGRESS` is `live`, or `auto` (default) on a terminal.

    `auto` means stderr is a terminal and `CI` is unset, as tqdm and rich decide: CI logs and files
    get plain lines. An unknown value counts as `auto`. Never in a worker process (a Dask worker, a
    multiprocessing child): one process owns the screen, and several live displays on one terminal
    would draw over each other; workers print plain lines.
    """
    if _in_worker():
        return False
    mode = os.environ.get(MODE_ENV, "auto").strip().lower()
    if mode in ("plain", "live"):
        return mode == "live"
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        terminal = False
    return terminal and not os.environ.get("CI")


def _in_worker() -> bool:
    """Whether this process works for another one: a multiprocessing child or a Dask worker."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return True
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker

            get_worker()
            return True
        except ValueError:  # not in a worker
            return False
    return False


def _row_label(what: str) -> str:
    """A row's label: the Prefect task run's name (`finetune[distill-atsa-rest14-42]`) and `what`."""
    if "prefect" not in sys.modules:
        return what
    from prefect.context import TaskRunContext

    name = _given_task_run_name(TaskRunContext.get())
    return f"{name} {what}" if name and name != what else what


class _HideRunningLines(logging.Filter):
    """On a console handler while the board is live: drop the periodic progress lines its rows show."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = getattr(record, "progress", None)
        return not (isinstance(info, dict) and not info.get("final"))


class Board:
    """The rows of the running `Progress`es, redrawn in place on one rich console (`console`, default stderr).

    Live while it has rows (the rows vanish when the last one ends: each stage's final line is in
    the log). While live, every logging handler that prints through a rich console on a terminal
    (Prefect's `PrefectConsoleHandler`) prints through this board's console instead, so its lines
    go above the rows, and leaves out the periodic progress lines the rows already show.
    """

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as Rows

        self.console = console if console is not None else Console(stderr=True)
        self._rows = Rows(
            TextColumn("{task.description}", markup=False),  # `finetune[...]` is a name, not markup
            BarColumn(bar_width=16),
            TextColumn("{task.fields[status]}", markup=False),
            console=self.console,
            transient=True,
            refresh_per_second=4,
            redirect_stdout=False,
        )
        self._ids: dict[int, Any] = {}
        self._lock = threading.RLock()
        self._swapped: list[tuple[logging.Handler, Any]] = []
        self._filter = _HideRunningLines()
        self._at_exit = False

    @property
    def live(self) -> bool:
        """Whether the rows are on screen."""
        return bool(self._ids)

    def add(self, progress: Progress, label: str) -> None:
        """Show a row for `progress`, labelled `label`; the first row starts the board."""
        with self._lock:
            if not self._ids:
                self._start()
            self._ids[id(progress)] = self._rows.add_task(label, total=progress.total, status="starting")

    def update(self, progress: Progress, text: str, info: Mapping[str, Any]) -> None:
        """Redraw `progress`'s row from its line (`text` without the `what:` prefix)."""
        with self._lock:
            task = self._ids.get(id(progress))
            if task is not None:
                status = text.split(": ", 1)[-1]
                self._rows.update(task, completed=info["done"], total=info["total"], status=status)

    def remove(self, progress: Progress) -> None:
        """Drop `progress`'s row; the last row stops the board."""
        with self._lock:
            task = self._ids.pop(id(progress), None)
            if task is None:
                return
            self._rows.remove_task(task)
            if not self._ids:
                self._stop()

    def _start(self) -> None:
        import atexit

        from rich.console import Console

        if not self._at_exit:  # once: a row left by a crash must not leave the terminal's cursor hidden
            atexit.register(self.stop)
            self._at_exit = True

        for handler in _all_handlers():
            console = getattr(handler, "console", None)
            if isinstance(console, Console) and console.is_terminal and console is not self.console:
                self._swapped.append((handler, console))
                handler.console = _PrintAbove(console, self.console)  # type: ignore[attr-defined]
                handler.addFilter(self._filter)
        self._rows.start()

    def stop(self) -> None:
        """Drop every row and stop drawing (at exit, or after a stage that failed mid-way)."""
        with self._lock:
            for task in list(self._ids.values()):
                self._rows.remove_task(task)
            if self._ids:
                self._ids.clear()
                self._stop()

    def _stop(self) -> None:
        self._rows.stop()
        for handler, console in self._swapped:
            handler.console = console  # type: ignore[attr-defined]
            handler.removeFilter(self._filter)
        self._swapped.clear()


class _PrintAbove:
    """A handler's rich console while the board is live: renders exactly as that console would
    (its markup, highlighter and theme: Prefect's colours), then prints above the rows."""

    def __init__(self, own: Any, board: Any) -> None:
        self._own, self._board = own, board

    def print(self, *objects: Any, **kwargs: Any) -> None:
        from rich.text import Text

        with self._own.capture() as captured:
            self._own.print(*objects, **kwargs)
        self._board.print(Text.from_ansi(captured.get(), end=""), soft_wrap=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._own, name)


def _all_handlers() -> list[logging.Handler]:
    """Every handler on the root logger and on each logger created so far, once each."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [x for x in list(logging.Logger.manager.loggerDict.values()) if isinstance(x, logging.Logger)]
    seen: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in logger.handlers:
            seen.setdefault(id(handler), handler)
    return list(seen.values())


_BOARD: Board | None = None
_BOARD_LOCK = threading.Lock()
_BOARD_OVERRIDE: ContextVar[Board | None] = ContextVar("fsa_distill_board", default=None)


def board() -> Board | None:
    """The board new `Progress` rows go to: the one `showing` set, else the process's when
    `live_wanted()`, else None (plain lines only)."""
    global _BOARD
    chosen = _BOARD_OVERRIDE.get()
    if chosen is not None:
        return chosen
    if not live_wanted():
        return None
    with _BOARD_LOCK:
        if _BOARD is None:
            _BOARD = Board()
        return _BOARD


@contextmanager
def showing(chosen: Board) -> Iterator[Board]:
    """Use `chosen` as the board in this context (tests: a board on a console they read)."""
    token = _BOARD_OVERRIDE.set(chosen)
    try:
        yield chosen
    finally:
        _BOARD_OVERRIDE.reset(token)


# ------------------------------------------------------------------------------------------------
# Training: the Trainer's logs as progress lines and live metrics

#: The Trainer's log keys under the names MLflow shows them (live here, replayed by `flows/tracking.py`).
RENAMES = {"loss": "train_loss", "learning_rate": "lr", "eval_loss": "dev_loss"}


def history_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one Trainer log-history entry, named as the tracker names them.

    `loss` -> `train_loss`, `learning_rate` -> `lr`, `eval_*` -> `dev_*`; `step` and `epoch` are
    not metrics; the closing summary (it has `train_runtime`) gives only `train_loss_mean`, since
    its `train_loss` is the run's mean, not a step's.
    """
    if "train_runtime" in entry:
        return numeric({"train_loss_mean": entry.get("train_loss")})
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key in ("step", "epoch"):
            continue
        name = RENAMES.get(key, key)
        values[name.replace("eval_", "dev_", 1) if name.startswith("eval_") else name] = value
    return numeric(values)


def write_log_times(out: Path, times: list[float]) -> None:
    """Write `<out>/measured/log_times.json`: one Unix time (seconds) per log-history entry, in order.

    A measurement (outside the content hash): replaying the curves later to MLflow uses the times
    the points were really logged.
    """
    folder = Path(out) / MEASURED
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOG_TIMES).write_text(json.dumps(times))


def read_log_times(folder: str | Path) -> list[float] | None:
    """The times `write_log_times` wrote for an output folder, or None when it has none."""
    try:
        times = json.loads((Path(folder) / MEASURED / LOG_TIMES).read_text())
    except (OSError, ValueError):
        return None
    return times if isinstance(times, list) else None


def _progress_callback_class() -> type:
    """Build `ProgressCallback` on first use, so that only training code imports transformers."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Progress lines, live metrics and log-entry times for a `transformers` Trainer.

        Replaces `PrinterCallback` (raw dicts on stdout, which Prefect does not capture): a
        `Progress` over the optimizer steps (loss and lr of the last log as fields), one over each
        evaluation's batches and a line with its dev metrics; every log-history entry goes to
        `metrics()` under the tracker's names, stamped with the time it was logged.
        `times(history)` gives those times aligned with the Trainer's log history, for
        `write_log_times`. The times of entries made before a resume are read back from
        `<output_dir>/log_times.json`, which `on_save` writes beside the checkpoints.
        """

        def __init__(
            self,
            what: str = "train",
            *,
            clock: Callable[[], float] = time.monotonic,
            wall: Callable[[], float] = time.time,
            interval_s: float | None = None,
        ) -> None:
            self.what = what
            self._clock, self._wall, self._interval_s = clock, wall, interval_s
            self._times: dict[int, float] = {}
            self._began: float | None = None
            self._fields: dict[str, Any] = {}
            self.progress: Progress | None = None
            self._eval: Progress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._began = self._wall()
            known = _read_times(Path(args.output_dir) / LOG_TIMES) if args.output_dir else []
            self._times = {i: t for i, t in enumerate(known[: len(state.log_history or [])]) if t is not None}
            self.progress = Progress(
                self.what,
                state.max_steps or None,
                "steps",
                initial=state.global_step,
                interval_s=self._interval_s,
                clock=self._clock,
            )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.progress is not None:
                self.progress.set(state.global_step, **self._fields)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            history = state.log_history or []
            if not history:
                return
            now = self._wall()
            self._times[len(history) - 1] = now
            entry = history[-1]  # the Trainer appends the entry, then calls on_log
            if "loss" in entry:
                self._fields["loss"] = entry["loss"]
            if "learning_rate" in entry:
                self._fields["lr"] = entry["learning_rate"]
            if "tokens_per_second" in entry:  # pretraining: non-pad tokens/s and MFU next to it
                self._fields["tokens/s"] = round(entry["tokens_per_second"])
            if "mfu" in entry:
                self._fields["MFU"] = f"{entry['mfu']:.1%}"
            metrics(history_metrics(entry), int(entry.get("step", state.global_step)), now)

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # an evaluation that generates (dev F1) can take minutes: its batches get their own lines
            if self._eval is None:
                loader = kwargs.get("eval_dataloader")
                try:
                    total = len(loader) if loader is not None else None
                except TypeError:  # an iterable without a length
                    total = None
                # the first batch ran before this call: it counts as done, but not towards the rate
                self._eval = Progress(
                    f"{self.what} evaluation",
                    total,
                    "batches",
                    initial=1,
                    interval_s=self._interval_s,
                    clock=self._clock,
                )
                self._eval.set(1)
            else:
                self._eval.update()

        def _end_evaluation(self) -> None:
            if self._eval is not None:
                self._eval.close()
                self._eval = None

        def on_predict(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._end_evaluation()

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._end_evaluation()
            values = history_metrics(kwargs.get("metrics") or {})
            shown = {k: v for k, v in values.items() if not k.endswith(("_runtime", "_per_second"))}
            text = ", ".join(f"{k} {_field(v)}" for k, v in sorted(shown.items()))
            epoch = f", epoch {state.epoch:.3g}" if state.epoch is not None else ""
            log.info("%s: evaluated at step %d/%d%s: %s", self.what, state.global_step, state.max_steps, epoch, text)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not args.output_dir:
                return
            try:
                path = Path(args.output_dir) / LOG_TIMES
                path.write_text(json.dumps(self.times(state.log_history or [])))
            except OSError as exc:  # only a resumed run's older times would be missing
                log.warning("%s: could not keep log times beside the checkpoints: %s", self.what, exc)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.progress is not None:
                self.progress.close()

        def times(self, history: list[Any]) -> list[float]:
            """One Unix time per entry of `history`: when it was logged. An entry from before a resume
            whose time was not kept gets the time this training (re)started, which it cannot be later than."""
            fallback = self._began if self._began is not None else self._wall()
            return [self._times.get(i, fallback) for i in range(len(history))]

    return ProgressCallback


def _read_times(path: Path) -> list[float | None]:
    """The times `ProgressCallback.on_save` kept beside the checkpoints (None where one is not a number)."""
    try:
        times = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(times, list):
        return []
    return [float(t) if isinstance(t, int | float) and not isinstance(t, bool) else None for t in times]


def __getattr__(name: str) -> Any:
    if name == "ProgressCallback":
        cls = _progress_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# Logging inside Prefect task runs

_PACKAGE = "fsa_distill"
_INSTALL_LOCK = threading.Lock()
_FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s"


def _run_logger() -> logging.LoggerAdapter | None:
    """Prefect's logger for the task run active in this context, else for the flow run, else None
    (neither, or Prefect not loaded)."""
    if "prefect" not in sys.modules:  # no run can be active without Prefect imported
        return None
    from prefect.context import FlowRunContext, TaskRunContext

    task_context = TaskRunContext.get()
    if task_context is None and FlowRunContext.get() is None:
        return None
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    name = _given_task_run_name(task_context)
    if name and isinstance(getattr(logger, "extra", None), dict):
        logger.extra["task_run_name"] = name  # type: ignore[index]
    return logger  # type: ignore[return-value]


def _given_task_run_name(context: Any) -> str | None:
    """The name a task run was given (`task_run_name`, as `Stage.submit` sets: `finetune[...]`).

    The context's task run object is not always the one Prefect renames (it can be replaced when the
    run is created on the server), so its `name` may still be the task's; the name given is not.
    """
    if context is None:
        return None
    given = getattr(context.task, "task_run_name", None)
    if isinstance(given, str) and "{" not in given:
        return given
    return getattr(context.task_run, "name", None)


class _Stderr(logging.StreamHandler):
    """A stream handler on whatever `sys.stderr` is when a record comes (as `logging.lastResort`):
    a stream captured at install time may be long closed or redirected by then."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


class StageLogHandler(logging.Handler):
    """On the `fsa_distill` logger (which then stops propagating): where its records go.

    Inside a Prefect task run, a record is re-emitted through the task run's logger: Prefect's
    console format names the task run and its API handler stores the line on that run; in a flow
    run outside any task, through the flow run's logger. Outside both, the record goes to the root
    logger's handlers as plain propagation would (pytest's caplog, Hydra's or Prefect's console),
    or to stderr when the root logger has none. Each record is printed once either way.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fallback = _Stderr()
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):  # a record logged while re-emitting one: print it plainly
            self._fallback.handle(record)
            return
        self._local.busy = True
        try:
            run_logger = _run_logger()
            if run_logger is not None:
                extra: dict[str, Any] = {"fsa_logger": record.name}
                if hasattr(record, "progress"):
                    extra["progress"] = record.progress
                run_logger.log(
                    record.levelno,
                    record.getMessage(),
                    exc_info=record.exc_info,
                    stack_info=record.stack_info,
                    extra=extra,
                )
                return
            self._propagate(record)
        except Exception:
            self.handleError(record)
        finally:
            self._local.busy = False

    def _propagate(self, record: logging.LogRecord) -> None:
        """Hand `record` to the root logger's handlers, as propagation would, except those it already
        passed on its way here (pytest attaches its capture to non-propagating loggers as well)."""
        root = logging.getLogger()
        if not root.handlers:
            self._fallback.handle(record)
            return
        if root.disabled or not root.filter(record):
            return
        seen: set[logging.Handler] = set()
        node: logging.Logger | None = logging.getLogger(record.name)
        while node is not None and node is not root:
            seen.update(node.handlers)
            if node.name == _PACKAGE or not node.propagate:
                break
            node = node.parent
        for handler in root.handlers:
            if handler not in seen and record.levelno >= handler.level:
                handler.handle(record)


def install_stage_logging() -> None:
    """Route `fsa_distill.*` records through `StageLogHandler` and let INFO through (idempotent).

    The `fsa_distill` logger gets the handler and stops propagating (the handler does the
    propagating itself, so a record re-emitted in a run is not printed a second time). Its
    level is set to INFO when it has none, since the root logger's default (WARNING) would hide
    progress lines; a level someone set explicitly is kept.
    """
    package = logging.getLogger(_PACKAGE)
    with _INSTALL_LOCK:
        if not any(isinstance(h, StageLogHandler) for h in package.handlers):
            package.addHandler(StageLogHandler())
        package.propagate = False
        if package.level == logging.NOTSET:
            package.setLevel(logging.INFO)
