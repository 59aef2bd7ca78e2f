"""Stage caching and retries: content-keyed, never trusting deleted or edited outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fsa_distill.tasks.stage import Stage
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fsa_distill.artifacts import Artifact
from fsa_distill.errors import InputError

CALLS: list[str] = []


def _double(out: Path, *, source: Artifact, factor: int) -> None:
    CALLS.append("double")
    value = json.loads((Path(source.path) / "value.json").read_text())
    (out / "value.json").write_text(json.dumps(value * factor))


def _seed(out: Path, *, value: int) -> None:
    CALLS.append("seed")
    (out / "value.json").write_text(json.dumps(value))


seed_stage = Stage("t-seed", _seed)
double_stage = Stage("t-double", _double)


def test_rerun_reuses_and_changed_params_recompute(tmp_path):
    CALLS.clear()
    a = seed_stage.run(tmp_path, {"value": 3})
    b = double_stage.run(tmp_path, {"source": a, "factor": 2})
    assert seed_stage.run(tmp_path, {"value": 3}) == a
    assert double_stage.run(tmp_path, {"source": a, "factor": 2}) == b
    assert CALLS == ["seed", "double"]
    c = double_stage.run(tmp_path, {"source": a, "factor": 5})
    assert c.path != b.path and json.loads((Path(c.path) / "value.json").read_text()) == 15


def test_key_follows_input_content_not_path(tmp_path):
    a1 = seed_stage.run(tmp_path / "one", {"value": 3})
    a2 = seed_stage.run(tmp_path / "two", {"value": 3})
    assert a1.sha256 == a2.sha256
    assert double_stage.key({"source": a1, "factor": 2}) == double_stage.key({"source": a2, "factor": 2})
    a3 = seed_stage.run(tmp_path, {"value": 4})
    assert double_stage.key({"source": a3, "factor": 2}) != double_stage.key({"source": a1, "factor": 2})


def test_unkeyed_settings_do_not_change_the_key():
    stage = Stage("t-unkeyed", _seed, unkeyed=("timeout_s", "cfg.retries"))
    base = stage.key({"value": 1, "timeout_s": 5, "cfg": {"retries": 1, "lr": 0.1}})
    assert stage.key({"value": 1, "timeout_s": 50, "cfg": {"retries": 9, "lr": 0.1}}) == base
    assert stage.key({"value": 1, "timeout_s": 5, "cfg": {"retries": 1, "lr": 0.2}}) != base


def test_an_unkeyed_path_that_does_not_resolve_is_an_error():
    stage = Stage("t-typo", _seed, unkeyed=("cfg.retires",))
    with pytest.raises(KeyError, match=r"cfg\.retires"):
        stage.key({"value": 1, "cfg": {"retries": 1}})


def test_measurements_are_verified_but_outside_the_content_hash(tmp_path):
    calls = iter([0.5, 7.25])

    def timed(out: Path, *, value: int) -> None:
        (out / "value.json").write_text(json.dumps(value))
        (out / "measured").mkdir()
        (out / "measured" / "timing.json").write_text(json.dumps({"wall_s": next(calls)}))

    stage = Stage("t-timed", timed)
    first = stage.run(tmp_path / "one", {"value": 1})
    second = stage.run(tmp_path / "two", {"value": 1})
    assert first.sha256 == second.sha256  # different wall times, same content
    (Path(first.path) / "measured" / "timing.json").write_text("{}")
    assert stage.cached(tmp_path / "one", {"value": 1}) is None  # an edited measurement is still noticed


def test_a_moved_store_is_read_where_it_is_now(tmp_path):
    CALLS.clear()
    a = seed_stage.run(tmp_path / "old", {"value": 3})
    b = double_stage.run(tmp_path / "old", {"source": a, "factor": 2})
    (tmp_path / "old").rename(tmp_path / "new")
    # `a` still carries the old absolute path: the stage reads its input from the store it runs in
    moved = double_stage.run(tmp_path / "new", {"source": a, "factor": 5})
    assert json.loads((Path(moved.path) / "value.json").read_text()) == 15
    assert Path(moved.path).is_relative_to(tmp_path / "new") and not (tmp_path / "old").exists()
    assert double_stage.run(tmp_path / "new", {"source": a, "factor": 2}).rel == b.rel
    assert CALLS == ["seed", "double", "double"]


def test_deleted_or_edited_output_is_recomputed(tmp_path):
    CALLS.clear()
    a = seed_stage.run(tmp_path, {"value": 3})
    (Path(a.path) / "value.json").write_text("999")
    assert seed_stage.cached(tmp_path, {"value": 3}) is None
    again = seed_stage.run(tmp_path, {"value": 3})
    assert json.loads((Path(again.path) / "value.json").read_text()) == 3
    (Path(a.path) / "value.json").unlink()
    seed_stage.run(tmp_path, {"value": 3})
    assert CALLS == ["seed", "seed", "seed"]


def test_failure_leaves_no_output(tmp_path):
    def broken(out: Path, *, value: int) -> None:
        (out / "half.json").write_text("{")
        raise InputError("row 3: bad")

    stage = Stage("t-broken", broken)
    with pytest.raises(InputError):
        stage.run(tmp_path, {"value": 1})
    assert not stage.output_dir(tmp_path, {"value": 1}).exists()
    assert list((tmp_path / "t-broken").iterdir()) == []


ATTEMPTS: dict[str, int] = {}


def _flaky(out: Path, *, kind: str) -> None:
    ATTEMPTS[kind] = ATTEMPTS.get(kind, 0) + 1
    if ATTEMPTS[kind] == 1:
        raise ConnectionError("reset by peer") if kind == "transient" else InputError("bad row")
    (out / "ok").write_text("ok")


flaky_stage = Stage("t-flaky", _flaky, retries=1)


@flow
def _flaky_flow(store: str, kind: str):
    with ThreadPoolTaskRunner(max_workers=1) as runner:
        return flaky_stage.submit(runner, store, {"kind": kind}).result(raise_on_failure=False)


@pytest.mark.usefixtures("prefect_harness")
def test_transient_errors_are_retried_bad_input_is_not(tmp_path):
    ATTEMPTS.clear()
    assert isinstance(_flaky_flow(str(tmp_path), "transient"), Artifact)
    assert ATTEMPTS["transient"] == 2
    result = _flaky_flow(str(tmp_path), "bad-input")
    assert isinstance(result, InputError) and ATTEMPTS["bad-input"] == 1
