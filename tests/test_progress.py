"""Watching a stage run: rate-limited progress lines, the Trainer's callback, task-run logging, live metrics.

Progress lines are checked with a fake clock; the Prefect tests run real stages as tasks in a flow
and read back what the Prefect API and an MLflow SQLite store recorded for them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fsa_distill.tasks.stage import Stage
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fsa_distill import progress
from fsa_distill.artifacts import MEASURED, seal
from fsa_distill.progress import Progress, install_stage_logging, observing


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    """Collects the records of one private logger."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def texts(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def lines() -> Lines:
    logger = logging.getLogger(f"test_progress.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = Lines()
    logger.addHandler(handler)
    handler.logger = logger  # type: ignore[attr-defined]
    return handler


class Recorder:
    """An observer that remembers what it was told."""

    def __init__(self) -> None:
        self.metrics_seen: list[tuple[dict[str, float], int, float]] = []
        self.progress_seen: list[dict[str, Any]] = []

    def metrics(self, values: dict[str, float], step: int, timestamp: float) -> None:
        self.metrics_seen.append((dict(values), step, timestamp))

    def progress(self, info: dict[str, Any]) -> None:
        self.progress_seen.append(dict(info))


# ------------------------------------------------------------------------------------------------
# Progress lines


def test_lines_are_rate_limited_with_percent_rate_eta_and_always_a_final_line(lines):
    clock = Clock()
    bar = Progress("generate", 128, "pairs", rates=("tokens",), interval_s=30, clock=clock, logger=lines.logger)
    emitted_at = []
    for now, n, tokens in [(10, 8, 100), (20, 8, 0), (31, 24, 520), (40, 8, 0), (60, 8, 0), (61, 8, 0), (70, 64, 0)]:
        clock.now = now
        before = len(lines.records)
        bar.update(n, tokens=tokens)
        if len(lines.records) > before:
            emitted_at.append(now)
    bar.close()  # already finished: no second final line
    assert emitted_at == [31, 61, 70]
    assert lines.texts[0] == "generate: 40/128 pairs (31%), 1.3 pairs/s, 20.0 tokens/s, ETA 0:01:08"
    assert lines.texts[-1].startswith("generate: 128/128 pairs (100%), 1.8 pairs/s")
    assert lines.texts[-1].endswith("done in 0:01:10")
    first, final = lines.records[0].progress, lines.records[-1].progress  # type: ignore[attr-defined]
    assert first["what"] == "generate" and first["done"] == 40 and first["total"] == 128
    assert first["fraction"] == pytest.approx(40 / 128) and first["eta_s"] == pytest.approx(88 / (40 / 31), abs=1e-3)
    assert final["fraction"] == 1.0 and final["final"] is True and bar.closed


def test_a_stop_before_the_end_still_writes_one_final_line(lines):
    clock = Clock()
    with (
        pytest.raises(RuntimeError),
        Progress("clean", 10, "rows", interval_s=30, clock=clock, logger=lines.logger) as bar,
    ):
        clock.now = 4
        bar.update(4, kept=3)
        raise RuntimeError("boom")
    assert lines.texts == ["clean: 4/10 rows (40%), 1 rows/s, kept 3, stopped after 0:00:04"]
    with Progress("scan", None, interval_s=30, clock=clock, logger=lines.logger) as bar:
        bar.update(5)
    assert lines.texts[-1].startswith("scan: 5 items") and lines.records[-1].progress["fraction"] is None


def test_a_resumed_count_rates_only_this_runs_work(lines):
    clock = Clock()
    bar = Progress("finetune", 100, "steps", initial=50, interval_s=10, clock=clock, logger=lines.logger)
    clock.now = 10
    bar.set(60, loss=0.5)
    assert lines.texts == ["finetune: 60/100 steps (60%), 1 steps/s, loss 0.5, ETA 0:00:40"]


def test_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "5")
    assert Progress("x", 1).interval_s == 5
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    assert Progress("x", 1).interval_s == progress.DEFAULT_INTERVAL_S
    monkeypatch.delenv(progress.INTERVAL_ENV)
    assert Progress("x", 1).interval_s == 30


def test_lines_go_to_the_progress_logger_and_the_observer(caplog):
    caplog.set_level(logging.INFO, logger=progress.LOGGER)
    recorder = Recorder()
    with observing(recorder), Progress("evaluate", 2, "sentences", interval_s=0) as bar:
        bar.update()
        bar.update()
    ours = [r for r in caplog.records if r.name == progress.LOGGER]
    assert [r.progress["done"] for r in ours] == [1, 2]  # type: ignore[attr-defined]
    assert [p["fraction"] for p in recorder.progress_seen] == [0.5, 1.0]


def test_metrics_need_an_observer_and_keep_only_numbers():
    progress.metrics({"loss": 1.0}, step=1)  # nothing observes: a no-op
    recorder = Recorder()
    with observing(recorder):
        progress.metrics({"loss": 0.5, "ok": True, "name": "x", "nan": float("nan"), "none": None}, 3, 12.5)
    progress.metrics({"loss": 2.0}, step=2)  # the observer is gone again
    assert recorder.metrics_seen == [({"loss": 0.5}, 3, 12.5)]


def test_a_failing_observer_never_fails_the_work(caplog):
    class Broken:
        def metrics(self, *args: Any) -> None:
            raise ConnectionError("down")

        def progress(self, *args: Any) -> None:
            raise ConnectionError("down")

    with observing(Broken()), Progress("x", 1, interval_s=0) as bar:
        progress.metrics({"loss": 1.0}, 1)
        bar.update()
    assert "progress observer failed" in caplog.text


# ------------------------------------------------------------------------------------------------
# The Trainer's callback


def test_history_metrics_use_the_trackers_names():
    assert progress.history_metrics(
        {"loss": 1.5, "learning_rate": 1e-3, "grad_norm": 2.0, "epoch": 0.5, "step": 5}
    ) == {
        "train_loss": 1.5,
        "lr": 1e-3,
        "grad_norm": 2.0,
    }
    assert progress.history_metrics({"eval_loss": 0.9, "eval_f1": 0.5, "epoch": 1.0, "step": 9}) == {
        "dev_loss": 0.9,
        "dev_f1": 0.5,
    }
    assert progress.history_metrics({"train_runtime": 3.0, "train_loss": 1.2, "step": 9}) == {"train_loss_mean": 1.2}


def _train(callback: Any, args: Any, state: Any, clock: Clock, wall: list[float], until: int) -> None:
    """Drive `callback` as a Trainer does: steps of 1 s, each step's end before its log (every 10
    steps), an evaluation and a checkpoint at step 50, the closing summary when all steps ran."""
    callback.on_train_begin(args, state, None)
    for step in range(state.global_step + 1, until + 1):
        clock.now += 1
        wall[0] += 1
        state.global_step = step
        state.epoch = step / 50
        callback.on_step_end(args, state, None)
        if step % 10 == 0:
            logs = {"loss": round(2.0 - step / 100, 2), "learning_rate": 1e-3, "epoch": state.epoch}
            state.log_history.append({**logs, "step": step})
            callback.on_log(args, state, None, logs=logs)
        if step == 50:
            for _ in range(2):  # the dev set, in two batches
                callback.on_prediction_step(args, state, None, eval_dataloader=[0, 0])
            found = {"eval_loss": 0.9, "eval_f1": 0.5, "eval_runtime": 1.0, "epoch": 1.0}
            state.log_history.append({**found, "step": step})
            callback.on_log(args, state, None, logs=found)
            callback.on_evaluate(args, state, None, metrics=found)
            callback.on_save(args, state, None)
    if until == state.max_steps:
        summary = {"train_runtime": 100.0, "train_loss": 1.4, "epoch": 2.0}
        state.log_history.append({**summary, "step": until})
        callback.on_log(args, state, None, logs=summary)
    callback.on_train_end(args, state, None)


def test_progress_callback_lines_metrics_and_log_times(tmp_path, caplog):
    from transformers import TrainerCallback

    caplog.set_level(logging.INFO, logger=progress.LOGGER)
    clock, wall = Clock(), [1_000.0]
    callback = progress.ProgressCallback("finetune", clock=clock, wall=lambda: wall[0], interval_s=30)
    assert isinstance(callback, TrainerCallback)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(log_history=[], global_step=0, max_steps=100, epoch=0.0)
    recorder = Recorder()
    with observing(recorder):
        _train(callback, args, state, clock, wall, until=100)

    texts = [r.getMessage() for r in caplog.records if r.name == progress.LOGGER]
    steps = [t for t in texts if "steps (" in t]
    assert [t.split(" steps")[0] for t in steps] == ["finetune: 30/100", "finetune: 60/100", "finetune: 90/100",
                                                     "finetune: 100/100"]  # fmt: skip
    assert steps[0] == "finetune: 30/100 steps (30%), 1 steps/s, loss 1.8, lr 0.001, ETA 0:01:10"
    assert steps[-1].endswith("done in 0:01:40")
    assert any(t.startswith("finetune: evaluated at step 50/100") and "dev_f1 0.5" in t for t in texts)
    assert "finetune evaluation: 2/2 batches (100%), done in 0:00:00" in texts

    assert recorder.metrics_seen[0] == ({"train_loss": 1.9, "lr": 1e-3}, 10, 1_010.0)
    assert recorder.metrics_seen[4:6] == [
        ({"train_loss": 1.5, "lr": 1e-3}, 50, 1_050.0),
        ({"dev_loss": 0.9, "dev_f1": 0.5, "dev_runtime": 1.0}, 50, 1_050.0),
    ]
    assert recorder.metrics_seen[-1] == ({"train_loss_mean": 1.4}, 100, 1_100.0)
    times = callback.times(state.log_history)
    assert len(times) == len(state.log_history) == 12
    assert times[:5] == [1_010.0, 1_020.0, 1_030.0, 1_040.0, 1_050.0] and times[-1] == 1_100.0


def test_a_resumed_training_keeps_the_times_of_entries_before_the_checkpoint(tmp_path):
    clock, wall = Clock(), [1_000.0]
    args = SimpleNamespace(output_dir=str(tmp_path))
    first = progress.ProgressCallback("pretrain", clock=clock, wall=lambda: wall[0], interval_s=30)
    state = SimpleNamespace(log_history=[], global_step=0, max_steps=100, epoch=0.0)
    _train(first, args, state, clock, wall, until=60)  # killed after step 60; the checkpoint is at 50
    checkpoint = state.log_history[:6]  # 5 loss entries and the evaluation, as the checkpoint saved them
    assert json.loads((tmp_path / progress.LOG_TIMES).read_text()) == first.times(checkpoint)

    wall[0] = 5_000.0
    again = progress.ProgressCallback("pretrain", clock=clock, wall=lambda: wall[0], interval_s=30)
    resumed = SimpleNamespace(log_history=list(checkpoint), global_step=50, max_steps=100, epoch=1.0)
    _train(again, args, resumed, clock, wall, until=100)
    times = again.times(resumed.log_history)
    assert times[:6] == first.times(checkpoint)  # recorded before the kill
    assert times[6] == 5_010.0 and times == sorted(times)


def test_log_times_are_measurements_outside_the_content_hash(tmp_path):
    assert progress.MEASURED == MEASURED
    for name, times in (("a", [1.0, 2.0]), ("b", [3.0, 4.5])):
        out = tmp_path / name
        out.mkdir()
        (out / "train_log.json").write_text("[]")
        progress.write_log_times(out, times)
        assert progress.read_log_times(out) == times
    assert seal(tmp_path / "a") == seal(tmp_path / "b")
    assert progress.read_log_times(tmp_path) is None


# ------------------------------------------------------------------------------------------------
# Inside Prefect task runs


@pytest.fixture
def console() -> Any:
    """A console on the root logger in Prefect's format (its console handler's stream is fixed at import)."""
    from io import StringIO

    from prefect.logging.formatters import PrefectFormatter

    stream = StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        PrefectFormatter(
            format="%(levelname)s | %(name)s - %(message)s",
            task_run_fmt="%(levelname)s | Task run %(task_run_name)r - %(message)s",
            flow_run_fmt="%(levelname)s | Flow run %(flow_run_name)r - %(message)s",
        )
    )
    root = logging.getLogger()
    root.addHandler(handler)
    yield lambda: stream.getvalue().splitlines()
    root.removeHandler(handler)


def test_stage_logging_outside_a_task_run_prints_each_record_once(caplog, capfd, monkeypatch, console):
    install_stage_logging()
    install_stage_logging()
    package = logging.getLogger("fsa_distill")
    assert sum(isinstance(h, progress.StageLogHandler) for h in package.handlers) == 1
    assert package.getEffectiveLevel() <= logging.INFO and not package.propagate

    logging.getLogger("fsa_distill.test_progress").info("plain %s", "line")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("fsa_distill.test_progress", "plain line")]
    assert console() == ["INFO | fsa_distill.test_progress - plain line"]

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # nothing configured: stderr, once
    capfd.readouterr()
    logging.getLogger("fsa_distill.test_progress").info("bare line")
    assert capfd.readouterr().err.count("fsa_distill.test_progress - bare line") == 1
    assert package.getEffectiveLevel() <= logging.INFO and not package.propagate


def _chatty(out: Path, *, tag: str, steps: int) -> None:
    logging.getLogger("fsa_distill.test_progress").info("hello from %s", tag)
    with Progress("work", steps, "items", interval_s=0) as bar:
        for _ in range(steps):
            bar.update()
    progress.metrics({"loss": 0.5, "flag": True}, step=3, timestamp=1_700_000_000.25)
    progress.metrics({"loss": 0.25}, step=4, timestamp=1_700_000_005.5)
    (out / "value.json").write_text(json.dumps(tag))


chatty_stage = Stage("t-chatty", _chatty)


@flow
def _chatty_flow(store: str, params_list: list[dict[str, Any]], observes: list[dict[str, Any] | None]):
    with ThreadPoolTaskRunner(max_workers=1) as runner:
        futures = []
        for params, observe in zip(params_list, observes, strict=True):
            future = chatty_stage.submit(runner, store, params, label="demo", observe=observe)
            future.wait()
            futures.append(future)
        return [(str(f.task_run_id), f.state.name) for f in futures]


@pytest.mark.usefixtures("prefect_harness")
def test_a_stage_logs_with_its_task_run_name_and_makes_a_progress_artifact(tmp_path, caplog, console):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId, LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogWorker

    caplog.set_level(logging.INFO)
    params = {"tag": f"run-{uuid.uuid4().hex[:8]}", "steps": 3}
    [(task_run_id, state)] = _chatty_flow(str(tmp_path), [params], [None])
    assert state == "Completed"

    # once on the console, with the task run's name, never also as a plain `fsa_distill` line
    assert [line for line in console() if "hello from run-" in line] == [
        f"INFO | Task run 't-chatty[demo]' - hello from {params['tag']}"
    ]
    hello = [r for r in caplog.records if r.name == "prefect.task_runs" and r.getMessage().startswith("hello from")]
    assert len(hello) == 1 and hello[0].task_run_name == "t-chatty[demo]"  # type: ignore[attr-defined]
    work = [r for r in caplog.records if r.name == "prefect.task_runs" and r.getMessage().startswith("work: ")]
    assert len([line for line in console() if "work: " in line]) == 3
    assert [r.progress["done"] for r in work] == [1, 2, 3]  # type: ignore[attr-defined]
    assert all(r.name == "prefect.task_runs" for r in work)

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[uuid.UUID(task_run_id)])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=[uuid.UUID(task_run_id)]))
        )
    messages = [entry.message for entry in logs]
    assert any(m.startswith("hello from run-") for m in messages), messages
    assert any(m.startswith("work: 3/3 items (100%)") for m in messages), messages
    assert [(a.type, a.description, a.data) for a in artifacts] == [("progress", "work", 100.0)]


@pytest.mark.usefixtures("prefect_harness")
def test_observe_streams_metrics_to_mlflow_with_their_timestamps_and_is_not_keyed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("watch")).info.run_id
    params = {"tag": f"run-{uuid.uuid4().hex[:8]}", "steps": 2}
    observe = {"mlflow_uri": uri, "mlflow_run_id": run_id}

    runs = _chatty_flow(str(tmp_path / "store"), [params, params], [observe, {**observe, "mlflow_run_id": "other"}])
    assert [state for _, state in runs] == ["Completed", "Cached"]  # a different observer: the same cache entry
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.value, m.step, m.timestamp) for m in history] == [
        (0.5, 3, 1_700_000_000_250),
        (0.25, 4, 1_700_000_005_500),
    ]
    assert client.get_metric_history(run_id, "flag") == []


# ------------------------------------------------------------------------------------------------
# The runner's observer


class FlakyMlflow:
    """An MlflowClient stand-in whose first `failures` writes raise."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.written: list[tuple[str, str, float, int, int]] = []

    def log_batch(self, run_id: str, metrics: list[Any]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database is locked")
        self.written += [(run_id, m.key, m.value, m.step, m.timestamp) for m in metrics]


def test_the_observer_buffers_retries_and_never_raises(monkeypatch, caplog):
    from fsa_distill.tasks import observe

    monkeypatch.setattr(observe, "FINAL_RETRIES_S", (0.0,))
    clock = Clock()
    observer = observe.StageObserver({"mlflow_uri": "sqlite:///unused.db", "mlflow_run_id": "r1"}, clock=clock)
    observer._client = client = FlakyMlflow(failures=1)
    observer.metrics({"loss": 1.0}, 1, 10.0)
    assert client.written == []  # buffered: less than FLUSH_S since the last write
    clock.now = observe.FLUSH_S
    observer.metrics({"loss": 0.5}, 2, 11.5)  # due, but the write fails: both are kept
    assert client.written == [] and "live metrics not written yet" in caplog.text
    observer.close()
    assert client.written == [("r1", "loss", 1.0, 1, 10_000), ("r1", "loss", 0.5, 2, 11_500)]

    broken = observe.StageObserver({"mlflow_uri": "sqlite:///unused.db", "mlflow_run_id": "r2"}, clock=clock)
    broken._client = FlakyMlflow(failures=99)
    broken.metrics({"loss": 1.0}, 1, 10.0)
    broken.close()  # gives up with a warning
    assert "1 live metrics could not be written" in caplog.text

    half = observe.StageObserver({"mlflow_uri": "sqlite:///unused.db"})
    half.metrics({"loss": 1.0}, 1, 10.0)
    half.close()
    assert "observe needs both mlflow_uri and mlflow_run_id" in caplog.text


def test_the_observer_is_in_no_stages_code_version():
    from fsa_distill import codehash

    for module in (
        "finetune",
        "pretrain",
        "evaluate",
        "clean",
        "teachers.hf",
        "teachers.openai_compat",
        "teachers.vllm",
    ):
        found = codehash.closure([f"fsa_distill.tasks.{module}"])
        assert "fsa_distill.tasks.observe" not in found and "fsa_distill.tasks.stage" not in found, module


# ------------------------------------------------------------------------------------------------
# The live board on a terminal


class _Terminal:
    """A text stream that says it is a terminal."""

    def __init__(self, tty: bool = True) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_live_rows_on_a_terminal_plain_lines_elsewhere(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(progress.MODE_ENV, raising=False)
    monkeypatch.setattr("sys.stderr", _Terminal(True))
    assert progress.live_wanted()
    monkeypatch.setenv("CI", "true")  # a CI log is not watched live, even through a pseudo-terminal
    assert not progress.live_wanted()
    monkeypatch.delenv("CI")
    monkeypatch.setenv(progress.MODE_ENV, "plain")
    assert not progress.live_wanted() and Progress("x", 1)._board is None
    monkeypatch.setattr("sys.stderr", _Terminal(False))
    monkeypatch.setenv(progress.MODE_ENV, "auto")
    assert not progress.live_wanted()
    monkeypatch.setenv(progress.MODE_ENV, "live")
    assert progress.live_wanted()


def _screen() -> tuple[Any, Any]:
    """A rich console that behaves as a terminal, and a function returning what it was sent.

    Without markup, as Prefect's console handler makes its own (`PREFECT_LOGGING_MARKUP`)."""
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    return Console(file=buffer, force_terminal=True, color_system=None, width=160, markup=False), buffer.getvalue


def _slow_chatty(out: Path, *, tag: str, steps: int) -> None:
    logging.getLogger("fsa_distill.test_progress").info("hello from %s", tag)
    with Progress("work", steps, "items", interval_s=0) as bar:
        for step in range(steps):
            time.sleep(0.4)  # rich redraws four times a second: let it draw the row
            bar.update()
            if step == 0:
                logging.getLogger("fsa_distill.test_progress").info("while the row is shown")
    (out / "value.json").write_text(json.dumps(tag))


slow_chatty_stage = Stage("t-slow-chatty", _slow_chatty)


@flow
def _board_flow(store: str, tag: str) -> str:
    with ThreadPoolTaskRunner(max_workers=1) as runner:
        future = slow_chatty_stage.submit(runner, store, {"tag": tag, "steps": 3}, label="demo")
        future.wait()
        return str(future.task_run_id)


@pytest.mark.usefixtures("prefect_harness")
def test_the_board_redraws_one_row_per_stage_with_prefects_lines_above_it(tmp_path, monkeypatch):
    """A stage run in a real flow on a terminal: its row (named after the task run) is redrawn in
    place, Prefect's console handler prints through the board, the periodic lines leave the console
    (the API still stores them) and the final line stays; the handler gets its console back."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogWorker, PrefectConsoleHandler

    handlers = [h for h in progress._all_handlers() if isinstance(h, PrefectConsoleHandler)]
    assert handlers, "Prefect's console handler is configured"
    prefect_screen, prefect_text = _screen()
    for handler in handlers:
        monkeypatch.setattr(handler, "console", prefect_screen)
    board_screen, board_text = _screen()
    tag = f"run-{uuid.uuid4().hex[:8]}"

    with progress.showing(progress.Board(board_screen)) as board:
        task_run_id = _board_flow(str(tmp_path), tag)
    assert not board.live

    screen, log = board_text(), prefect_text()
    assert "t-slow-chatty[demo] work" in screen  # the row, labelled with the task run
    assert screen.count("\r\x1b[2K") >= 3  # the row is erased and redrawn in place, not appended
    assert f"Task run 't-slow-chatty[demo]' - hello from {tag}" in log  # before the board started
    assert "Task run 't-slow-chatty[demo]' - while the row is shown" in screen  # above the row
    assert "while the row is shown" not in log  # not also through the handler's own console
    assert "work: 3/3 items (100%)" in log  # the final line stays in the log, after the row went
    assert "work: 1/3" not in screen + log  # the periodic lines are the row's, not the log's
    assert all(h.console is prefect_screen for h in handlers) and all(not h.filters for h in handlers)

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[uuid.UUID(task_run_id)])))
    assert [m.message.split(",")[0] for m in logs if m.message.startswith("work: ")] == [
        "work: 1/3 items (33%)",
        "work: 2/3 items (66%)",
        "work: 3/3 items (100%)",
    ]


def test_two_rows_at_once_and_the_board_stops_with_the_last():
    screen, text = _screen()
    board = progress.Board(screen)
    with progress.showing(board):
        first = Progress("generate", 4, "pairs", interval_s=60)
        second = Progress("clean", None, "rows", interval_s=60)
        assert board.live
        first.update(2)
        second.update(7)
        time.sleep(0.6)
        first.close()
        assert board.live  # the other row still runs
        second.close()
    assert not board.live
    drawn = text()
    assert "generate" in drawn and "2/4 pairs (50%)" in drawn and "7 rows" in drawn


@flow(name="t-flow-logs")
def _logging_flow() -> str:
    from prefect.context import FlowRunContext

    logging.getLogger("fsa_distill.flows.test_progress").warning("a warning from the wiring")
    logging.getLogger("fsa_distill.flow").info("an info line from the flow")
    return str(FlowRunContext.get().flow_run.id)  # type: ignore[union-attr]


@pytest.mark.usefixtures("prefect_harness")
def test_the_projects_loggers_in_the_flow_itself_reach_the_flow_run(console):
    """Lines logged by the wiring (outside any task run) are the flow run's: named on the console,
    stored on the flow run in the UI, printed once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    install_stage_logging()
    flow_run_id = _logging_flow()
    ours = [line for line in console() if "from the wiring" in line or "from the flow" in line]
    assert len(ours) == 2 and all(" | Flow run '" in line for line in ours), ours
    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
    messages = {m.message for m in logs}
    assert {"a warning from the wiring", "an info line from the flow"} <= messages, messages


def test_a_stage_that_fails_mid_way_gets_its_final_line_and_leaves_no_row(lines):
    screen, _text = _screen()
    board = progress.Board(screen)
    with progress.showing(board), pytest.raises(RuntimeError), observing(None):
        bar = Progress("finetune", 10, "steps", interval_s=60, logger=lines.logger)
        bar.update(3)
        assert board.live
        raise RuntimeError("the training raised")  # no close(), as a Trainer that raises
    assert bar.closed and lines.texts[-1].startswith("finetune: 3/10 steps (30%)")
    assert "stopped after" in lines.texts[-1] and not board.live


def _live_in_child(queue: Any) -> None:
    queue.put(progress.live_wanted())


def test_worker_processes_never_draw_a_board_of_their_own(monkeypatch):
    """A Dask LocalCluster's workers inherit the terminal: only the flow's process draws rows."""
    import multiprocessing

    monkeypatch.setenv(progress.MODE_ENV, "live")
    assert progress.live_wanted()
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_live_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) is False
    child.join(timeout=60)
