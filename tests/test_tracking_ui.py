"""What the MLflow UI shows of a flow: experiment kind, source, datasets, logged models, times, reuse, threads.

Fast: no Prefect, no training; one SQLite store for the module (migrations run once), an experiment per test.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest
from fsa_distill.flows.tracking import (
    BEST_ALIAS,
    CUSTOM_MODEL_DEVELOPMENT,
    EXPERIMENT_KIND,
    Tracker,
    git_commit,
    location_path,
    source_tags,
)
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """A tracking URI and artifact root shared by the module's tests."""
    base = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{base}/mlflow.db", base / "mlartifacts"


@pytest.fixture
def tracker(store, request) -> Tracker:
    """A Tracker on the shared store, in an experiment of its own."""
    uri, root = store
    return Tracker(uri, f"exp-{request.node.name}", root)


def client(t: Tracker) -> MlflowClient:
    """A separate client on the tracker's store, as the UI would read it."""
    uri = t.client.tracking_uri
    return MlflowClient(uri, registry_uri=uri)


def aliases(c: MlflowClient, name: str) -> dict[str, str]:
    """The registered model's aliases, versions as strings (SQL stores give ints, servers strings)."""
    return {alias: str(version) for alias, version in c.get_registered_model(name).aliases.items()}


def model_folder(path: Path, content: str) -> Path:
    """A one-file stand-in for a saved student."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(content)
    return path


def test_experiment_is_custom_model_development(store):
    uri, root = store
    fresh = Tracker(uri, "exp-kind-fresh", root)
    assert client(fresh).get_experiment(fresh.experiment_id).tags[EXPERIMENT_KIND] == CUSTOM_MODEL_DEVELOPMENT
    old_id = MlflowClient(uri).create_experiment("exp-kind-old", root.resolve().as_uri())  # made without the tag
    old = Tracker(uri, "exp-kind-old", root)
    assert old.experiment_id == old_id
    assert client(old).get_experiment(old_id).tags[EXPERIMENT_KIND] == CUSTOM_MODEL_DEVELOPMENT
    assert old.ui_url("http://127.0.0.1:5000/") == (
        f"http://127.0.0.1:5000/#/experiments/{old_id}/runs?workflowType=machine_learning"
    )
    assert old.ui_url("http://h:5000", "abc") == (
        f"http://h:5000/#/experiments/{old_id}/runs/abc?workflowType=machine_learning"
    )


def test_runs_carry_source_tags(tracker):
    sha = git_commit()
    if sha == "unknown":
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    run = tracker.start("r", {}, {"mlflow.source.name": "mine"})
    tags = client(tracker).get_run(run).data.tags
    assert tags["mlflow.source.git.commit"] == sha
    assert tags["mlflow.source.git.dirty"] in ("true", "false")
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == "mine"  # the caller's tag wins
    assert source_tags()["mlflow.source.name"]  # the origin URL or the checkout path


def test_datasets_are_run_inputs(tracker, tmp_path):
    run = tracker.start("r", {}, {})
    tracker.log_datasets(
        run,
        [
            {
                "name": "atsa/rest14:train",
                "digest": "a" * 64,
                "source": str(tmp_path / "train.json"),
                "context": "train",
            },
            {"name": "atsa/rest14:test", "digest": "b1", "source": "https://example.org/test.json", "context": "test"},
        ],
    )
    inputs = client(tracker).get_run(run).inputs.dataset_inputs
    got = {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"]) for d in inputs}
    assert got == {"atsa/rest14:train": ("a" * 36, "train"), "atsa/rest14:test": ("b1", "test")}


def test_register_logs_a_model_reuses_it_and_tracks_the_best(tracker, tmp_path):
    c, name = client(tracker), "fsa-ui-test"
    first = tracker.start("first", {}, {})
    v1 = tracker.register(
        first, model_folder(tmp_path / "a", "A"), name, "sha-a", metric=0.5, description="fine-tuned by first"
    )
    mv = c.get_model_version(name, v1)
    assert mv.run_id == first and mv.tags["sha256"] == "sha-a" and mv.tags["dev_f1"] == "0.5"
    assert mv.description == "fine-tuned by first"
    model = c.get_logged_model(mv.tags["model_id"])
    assert model.source_run_id == first and model.status == LoggedModelStatus.READY
    assert mv.source == model.artifact_location
    assert (location_path(mv.source) / "config.json").read_text() == "A"
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": name, "version": v1}]
    assert [o.model_id for o in c.get_run(first).outputs.model_outputs] == [model.model_id]
    assert aliases(c, name) == {BEST_ALIAS: v1}

    # the same content again: no new version, no upload, but the second run shows the model too
    second = tracker.start("second", {}, {})
    assert tracker.register(second, tmp_path / "missing", name, "sha-a", metric=0.5) == v1
    assert c.get_run(second).data.tags["model_version"] == f"{name}/{v1}"
    assert [o.model_id for o in c.get_run(second).outputs.model_outputs] == [model.model_id]
    assert len(c.search_model_versions(f"name='{name}'")) == 1

    # better dev F1 takes the alias; a worse one (or a tie, later) does not
    v2 = tracker.register(tracker.start("b", {}, {}), model_folder(tmp_path / "b", "B"), name, "sha-b", metric=0.7)
    assert aliases(c, name) == {BEST_ALIAS: v2}
    tracker.register(tracker.start("c", {}, {}), model_folder(tmp_path / "c", "C"), name, "sha-c", metric=0.6)
    tracker.register(tracker.start("d", {}, {}), model_folder(tmp_path / "d", "D"), name, "sha-d", metric=0.7)
    tracker.register(tracker.start("e", {}, {}), model_folder(tmp_path / "e", "E"), name, "sha-e")
    assert aliases(c, name) == {BEST_ALIAS: v2}
    best = c.get_model_version_by_alias(name, BEST_ALIAS)
    assert (location_path(best.source) / "config.json").read_text() == "B"


def test_metrics_keep_their_times(tracker):
    c = client(tracker)
    run = tracker.start("r", {}, {})
    tracker.metrics(run, {"dev_best_f1": 0.5, "skipped": None}, step=3, timestamp_ms=1_700_000_000_123)
    [point] = c.get_metric_history(run, "dev_best_f1")
    assert (point.timestamp, point.step, point.value) == (1_700_000_000_123, 3, 0.5)
    # 1200 metrics: more than one log_batch may hold
    log = [{"loss": 1.0 / (i + 1), "learning_rate": 1e-3, "step": i} for i in range(600)]
    log.append({"train_runtime": 9.0, "train_loss": 0.25, "step": 600})
    times = [1_700_000_000.0 + i for i in range(len(log))]
    tracker.history(run, log, times)
    loss = sorted(c.get_metric_history(run, "train_loss"), key=lambda m: m.step)
    assert len(loss) == 600
    assert [m.timestamp for m in loss[:3]] == [1_700_000_000_000, 1_700_000_001_000, 1_700_000_002_000]
    assert len(c.get_metric_history(run, "lr")) == 600
    [mean] = c.get_metric_history(run, "train_loss_mean")
    assert (mean.value, mean.timestamp) == (0.25, 1_700_000_600_000)
    other = tracker.start("mismatched", {}, {})
    tracker.history(other, log[:2], times[:1])  # times that do not match are dropped, the curve is kept
    assert all(m.timestamp > 1_700_000_600_000 for m in c.get_metric_history(other, "train_loss"))


def test_find_reusable_by_kind_and_sha(tracker, monkeypatch):
    searches = []
    search = MlflowClient.search_runs
    monkeypatch.setattr(MlflowClient, "search_runs", lambda *a, **k: searches.append(1) or search(*a, **k))
    with tracker.child("ok", {}, {"kind": "finetune", "artifact_sha256": "s1"}, tracker.start("p", {}, {})):
        pass
    failed = tracker.start("bad", {}, {"kind": "finetune", "artifact_sha256": "s2"})
    tracker.end(failed, False)
    failed_later = tracker.start("bad-too", {}, {"kind": "finetune", "artifact_sha256": "s1"})
    tracker.end(failed_later, False)
    other = tracker.start("other", {}, {"kind": "teacher-eval", "artifact_sha256": "s1"})
    tracker.end(other, True)
    ok = tracker.find_reusable("finetune", "s1")
    assert ok is not None and ok != failed_later and client(tracker).get_run(ok).info.run_name == "ok"
    assert tracker.find_reusable("finetune", "s2") is None  # only FAILED
    assert tracker.find_reusable("finetune", "nope") is None
    # a run this tracker finishes later is found without searching again, and is the newest
    newer = tracker.start("newer", {}, {"kind": "finetune", "artifact_sha256": "s1"})
    tracker.end(newer, True)
    assert tracker.find_reusable("finetune", "s1") == newer
    late = tracker.start("late", {}, {"kind": "finetune"})  # the hash is known only once the run is filled
    tracker.client.set_tag(late, "artifact_sha256", "s3")
    tracker.end(late, True)
    assert tracker.find_reusable("finetune", "s3") == late
    assert tracker.find_reusable("teacher-eval", "s1") == other
    assert len(searches) == 2  # one per kind
    # another Tracker on the store finds the newest one too
    uri = tracker.client.tracking_uri
    name = client(tracker).get_experiment(tracker.experiment_id).name
    assert Tracker(uri, name).find_reusable("finetune", "s1") == newer


def test_link_reused_and_log_table(tracker, tmp_path):
    c = client(tracker)
    parent = tracker.start("p", {}, {})
    tracker.link_reused(parent, {"distill-rest14-42": "abc", "distill-rest14-43": "def"})
    tags = c.get_run(parent).data.tags
    assert (tags["reused_runs"], tags["cached"]) == ("2", "true")
    got = Path(c.download_artifacts(parent, "reused_runs.json", str(tmp_path)))
    assert json.loads(got.read_text()) == {"distill-rest14-42": "abc", "distill-rest14-43": "def"}
    tracker.log_table(parent, pd.DataFrame({"sentence": ["a", "b"], "gold": ["pos", "neg"]}), "evaluation/p.json")
    table = json.loads(Path(c.download_artifacts(parent, "evaluation/p.json", str(tmp_path))).read_text())
    assert table["columns"] == ["sentence", "gold"] and len(table["data"]) == 2


def test_concurrent_writes_all_land(tracker, tmp_path):
    parent = tracker.start("parent", {}, {})
    (tmp_path / "note.txt").write_text("x")
    errors: list[BaseException] = []

    def child(i: int) -> None:
        try:
            with tracker.child(f"c{i}", {"i": str(i)}, {"kind": "finetune", "artifact_sha256": f"t{i}"}, parent) as run:
                tracker.history(run, [{"loss": 1.0, "step": s} for s in range(20)])
                tracker.metrics(run, {"test_f1": float(i)})
                tracker.log_datasets(run, [{"name": f"d{i}", "digest": "d", "source": "/x", "context": "train"}])
                tracker.files(run, tmp_path / "note.txt", "notes")
                tracker.client.log_text(run, f"run {i}", "text.txt")
                tracker.register(run, tmp_path / "model", "fsa-ui-threads", "same-model", metric=i / 10)
        except BaseException as exc:
            errors.append(exc)

    model_folder(tmp_path / "model", "M")
    threads = [threading.Thread(target=child, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    c = client(tracker)
    runs = c.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.metrics["test_f1"] for r in runs} == {float(i) for i in range(8)}
    assert all(len(c.get_metric_history(r.info.run_id, "train_loss")) == 20 for r in runs)
    assert len(c.search_model_versions("name='fsa-ui-threads'")) == 1
    assert {tracker.find_reusable("finetune", f"t{i}") for i in range(8)} == {r.info.run_id for r in runs}


def test_moved_workdir_keeps_its_logged_models(tmp_path):
    old, new = tmp_path / "fsa-work", tmp_path / "fsa-moved"
    t = Tracker(f"sqlite:///{old}/mlflow.db", "fsa-distill", old / "mlartifacts")
    run = t.start("r", {}, {})
    version = t.register(run, model_folder(tmp_path / "m", "M"), "fsa-ui-move", "sha-m", metric=0.1)
    shutil.move(str(old), str(new))
    moved = Tracker(f"sqlite:///{new}/mlflow.db", "fsa-distill", new / "mlartifacts")
    c = client(moved)
    mv = c.get_model_version("fsa-ui-move", version)
    root = (new / "mlartifacts").resolve().as_uri() + "/"
    assert mv.source.startswith(root) and c.get_logged_model(mv.tags["model_id"]).artifact_location == mv.source
    assert (location_path(mv.source) / "config.json").read_text() == "M"
