"""The whole flow on a shrunk copy of the real config: MLflow records, caching, recomputation."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fsa_distill.flows.pipeline import fsa_distill
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tests.conftest import shrunk

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _run(overrides):
    state = fsa_distill(overrides=overrides, return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


def _task_runs(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _task_states(flow_run_id, timeout_s: float = 30.0) -> dict[str, str]:
    """Task-run name -> final state name; Prefect records task states asynchronously, so wait for them."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = _task_runs(flow_run_id)
        if all(run.state is not None and run.state.is_final() for run in runs) or time.monotonic() > deadline:
            return {run.name: run.state.name if run.state else "None" for run in runs}
        time.sleep(0.5)


def _output_with_sha(workdir: Path, stage: str, sha: str) -> Path:
    for folder in (Path(workdir) / "artifacts" / stage).iterdir():
        manifest = folder / "_manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text())["sha256"] == sha:
            return folder
    raise AssertionError(f"no {stage} output with content hash {sha}")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("flow")
    overrides = shrunk(workdir)
    result, run_id = _run(overrides)
    return workdir, overrides, result, run_id


def test_flow_tracks_parent_children_metrics_and_models(first_run):
    workdir, _, result, run_id = first_run
    states = _task_states(run_id)
    assert sorted({name.split("[")[0] for name in states}) == [
        "acquire", "evaluate", "finetune", "report", "student", "teacher_fsa", "teacher_sentiment", "zeroshot"
    ]  # fmt: skip
    assert set(states.values()) == {"Completed"}

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["finetune.epochs"] == "1"
    assert "mlflow.source.git.commit" in parent.data.tags
    assert any(k.endswith("normal.f1_mean") for k in parent.data.metrics)
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "report"} <= parent_files

    # the leaderboard: the teacher in context and the baseline student on FSA and on sentiment
    board = pd.read_csv(Path(result["report"]) / "leaderboard.csv")
    assert list(board.model) == ["teacher-k0", "teacher-k4", "baseline"]
    assert {"atsa/rest14 normal", "atsa/rest14 hard", "acsa/rest16 normal", "sst2 macro-F1"} <= set(board.columns)
    assert "leaderboard.json" in parent_files
    assert "teacher-k4.atsa-rest14.normal.f1_mean" in parent.data.metrics
    assert "baseline.sst2.macro_f1_mean" in parent.data.metrics

    exp = parent.info.experiment_id
    # the UI opens on the runs table; the source column links a real commit
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    commit = parent.data.tags["mlflow.source.git.commit"]
    assert commit == "unknown" or (len(commit) == 40 and "dirty" not in commit)
    assert parent.info.run_name.startswith("smoke")  # named after its config, not "default"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.kind = 'finetune'")
    assert sorted(c.data.tags["dataset"] for c in children) == ["acsa/rest16", "atsa/rest14"]
    for child in children:
        metrics = child.data.metrics
        # its data (Dataset column), the model it made (Models column), predictions the UI previews
        inputs = {d.dataset.name: d.dataset.digest for d in child.inputs.dataset_inputs}
        dataset = child.data.tags["dataset"]
        assert {f"{dataset}:train", f"{dataset}:dev", f"{dataset}:test"} <= set(inputs) and all(inputs.values())
        assert "evaluation/predictions.json" in {f.path for f in client.list_artifacts(child.info.run_id, "evaluation")}
        # created before its training started and fed while it ran: curve points carry real times
        model_dir = _output_with_sha(workdir, "finetune", child.data.tags["model_sha256"])
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert history and child.info.start_time <= min(m.timestamp for m in history) <= child.info.end_time
        assert child.info.start_time < (model_dir / "train_log.json").stat().st_mtime * 1000
        for test_type in ("normal", "implicit", "mams", "hard"):
            assert 0.0 <= metrics[f"test_{test_type}_f1"] <= 1.0
        assert "dev_best_f1" in metrics
        assert client.get_metric_history(child.info.run_id, "train_loss")
        name, version = child.data.tags["model_version"].split("/")
        mv = client.get_model_version(name, version)
        assert mv.run_id == child.info.run_id and mv.tags["sha256"] == child.data.tags["model_sha256"]
        assert str(client.get_model_version_by_alias(name, "best").version) == version  # one version: the best
        assert child.info.run_id in mv.description
        local = mlflow.artifacts.download_artifacts(
            run_id=child.info.run_id, artifact_path="evaluation/predictions.parquet", tracking_uri=client.tracking_uri
        )
        table = pq.read_table(local)
        assert {"ID", "sentence", "gold", "prediction", "pairs"} <= set(table.column_names)
        assert table.num_rows == 24  # 12 test + 12 hard_test sentences (data.limit=12)


def test_unchanged_rerun_is_fully_cached(first_run):
    workdir, overrides, result, _ = first_run
    again, run_id = _run(overrides)
    states = _task_states(run_id)
    assert states and set(states.values()) == {"Cached"}, states
    assert again["report"] == result["report"]
    assert {row["stage"] for row in again["stages"]} >= {"acquire", "finetune", "evaluate", "report"}
    assert all(row["ran"] == 0 and row["cached"] > 0 for row in again["stages"]), again["stages"]

    # MLflow: one parent tagged cached that links to the runs that made the results, no duplicate tree
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    parent = client.get_run(again["parent_run_id"])
    assert parent.data.tags["cached"] == "true"
    exp = parent.info.experiment_id
    assert not client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    first_children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert set(again["reused_runs"].values()) == {c.info.run_id for c in first_children}


def test_changed_finetune_setting_reruns_only_what_depends_on_it(first_run):
    _, overrides, _, _ = first_run
    _, run_id = _run([*overrides, "finetune.learning_rate=0.002"])
    states = _task_states(run_id)
    by_stage: dict[str, set[str]] = {}
    for name, state in states.items():
        by_stage.setdefault(name.split("[")[0], set()).add(state)
    assert by_stage["acquire"] == {"Cached"} and by_stage["student"] == {"Cached"}
    assert by_stage["finetune"] == {"Completed"} and by_stage["evaluate"] == {"Completed"}


def test_deleted_artifact_is_recomputed(first_run):
    _, overrides, result, _ = first_run
    victim = Path(next(iter(result["evaluations"].values())))
    shutil.rmtree(victim)
    _, run_id = _run(overrides)
    states = _task_states(run_id)
    recomputed = [name for name, state in states.items() if state != "Cached"]
    assert len(recomputed) == 1 and recomputed[0].startswith("evaluate[")
    assert (victim / "predictions.parquet").is_file()


def test_moved_workdir_rerun_is_fully_cached_and_reads_only_the_new_location(tmp_path):
    old, new = tmp_path / "fsa-work", tmp_path / "fsa-moved"
    _run(shrunk(old))
    shutil.move(old, new)
    result, run_id = _run(shrunk(new))
    states = _task_states(run_id)
    assert states and set(states.values()) == {"Cached"}, states
    assert not old.exists()  # nothing was read from, or recreated at, the old location
    assert Path(result["report"]).is_relative_to(new)
    client = MlflowClient(f"sqlite:///{new}/mlflow.db")
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.artifact_uri.startswith(new.as_uri())
    assert {f.path for f in client.list_artifacts(parent.info.run_id)} >= {"config.yaml", "report"}


def test_a_failing_stage_fails_the_flow_with_its_own_error(tmp_path):
    from fsa_distill.errors import InputError

    state = fsa_distill(overrides=shrunk(tmp_path, f"sentiment.source={tmp_path / 'nowhere'}"), return_state=True)
    assert state.is_failed()
    with pytest.raises(InputError, match="nowhere/sst2"):  # the cause, not a branch cancelled because of it
        state.result()
