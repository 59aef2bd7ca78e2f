"""A workdir moved or copied elsewhere keeps its MLflow SQLite store usable, and the old path is not recreated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fsa_distill.flows.tracking import MARKER, Tracker, location_path, sqlite_path
from mlflow.tracking import MlflowClient

EXPERIMENT = "fsa-distill"
MODEL = "fsa-move-test"


def uri(workdir: Path) -> str:
    """The tracking URI conf/tracking/sqlite.yaml gives for `workdir`."""
    return f"sqlite:///{workdir}/mlflow.db"


def tracker(workdir: Path) -> Tracker:
    """A Tracker built the way flows/pipeline.py builds it."""
    return Tracker(uri(workdir), EXPERIMENT, workdir / "mlartifacts")


def populate(workdir: Path, scratch: Path) -> dict[str, str]:
    """A parent run with a file, a child run and a registered model version, as a flow run leaves them."""
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "note.txt").write_text("parent note")
    model = scratch / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"d_model": 8}')
    t = tracker(workdir)
    parent = t.start("parent", {"a": "1"}, {})
    t.files(parent, scratch / "note.txt")
    with t.child("child", {"b": "2"}, {}, parent) as child:
        version = t.register(child, model, MODEL, "sha-1")
    t.end(parent, True)
    return {"parent": parent, "child": child, "version": version}


def files_under(path: Path) -> set[Path]:
    """Every file below `path`, relative to it."""
    return {p.relative_to(path) for p in path.rglob("*") if p.is_file()}


def check_moved(old: Path, new: Path, ids: dict[str, str], scratch: Path) -> Tracker:
    """Log into `new` and check that old runs, the model version and new files all live under `new`."""
    old_files = files_under(old) if old.exists() else None
    t = tracker(new)
    run = t.start("rerun", {}, {})
    (scratch / "again.txt").write_text("after the move")
    t.files(run, scratch / "again.txt")
    t.end(run, True)
    client = MlflowClient(uri(new), registry_uri=uri(new))
    # nothing new at the old location (gone after a move, unchanged after a copy)
    assert (files_under(old) if old.exists() else None) == old_files
    root = (new / "mlartifacts").resolve()
    assert client.get_experiment(t.experiment_id).artifact_location == root.as_uri()
    assert Path(client.get_run(run).info.artifact_uri.removeprefix("file://")).is_relative_to(root)
    assert list(root.rglob("again.txt"))
    for run_id in (ids["parent"], ids["child"], run):
        assert client.get_run(run_id).info.artifact_uri.startswith(root.as_uri() + "/")
    got = Path(client.download_artifacts(ids["parent"], "note.txt", str(scratch / "dl")))
    assert got.read_text() == "parent note"
    version = client.get_model_version(MODEL, ids["version"])
    # the version's source is its logged model's folder, which moved with the workdir
    assert version.source.startswith(root.as_uri() + "/")
    assert version.source == client.get_logged_model(version.tags["model_id"]).artifact_location
    model = location_path(version.source)
    assert (model / "config.json").read_text() == '{"d_model": 8}'
    assert (root / MARKER).read_text().strip() == str(root)
    return t


@pytest.mark.parametrize("transfer", [shutil.move, shutil.copytree], ids=["move", "copy"])
def test_moved_workdir_logs_into_the_new_location(tmp_path, transfer):
    old, new = tmp_path / "fsa-work", tmp_path / "fsa-moved"
    ids = populate(old, tmp_path / "scratch")
    transfer(str(old), str(new))
    t = check_moved(old, new, ids, tmp_path / "scratch")
    # registering the same content again reuses the relocated version
    again = t.start("again", {}, {})
    assert t.register(again, tmp_path / "scratch" / "model", MODEL, "sha-1") == ids["version"]
    # a second Tracker on the moved workdir finds nothing left to relocate
    tracker(new)
    check_moved(old, new, ids, tmp_path / "scratch")
    if transfer is shutil.copytree:  # the original workdir still points at itself
        client = MlflowClient(uri(old), registry_uri=uri(old))
        assert client.get_run(ids["parent"]).info.artifact_uri.startswith((old / "mlartifacts").as_uri() + "/")


def test_workdir_moved_twice(tmp_path):
    first, second, third = tmp_path / "a" / "fsa-work", tmp_path / "b" / "fsa-work", tmp_path / "fsa-third"
    ids = populate(first, tmp_path / "scratch")
    shutil.move(str(first), str(second))
    check_moved(first, second, ids, tmp_path / "scratch")
    shutil.move(str(second), str(third))
    check_moved(second, third, ids, tmp_path / "scratch")
    assert not first.exists() and not second.exists()


def test_workdir_from_before_the_marker_is_relocated(tmp_path):
    old, new = tmp_path / "fsa-work", tmp_path / "fsa-moved"
    ids = populate(old, tmp_path / "scratch")
    (old / "mlartifacts" / MARKER).unlink(missing_ok=True)  # as a workdir made before the marker
    shutil.move(str(old), str(new))
    check_moved(old, new, ids, tmp_path / "scratch")


def test_locations_outside_the_root_are_left_alone(tmp_path):
    old, new, elsewhere = tmp_path / "fsa-work", tmp_path / "fsa-moved", (tmp_path / "chosen").resolve()
    ids = populate(old, tmp_path / "scratch")
    client = MlflowClient(uri(old))
    other = client.create_experiment("chosen-by-user", artifact_location=elsewhere.as_uri())
    shutil.move(str(old), str(new))
    check_moved(old, new, ids, tmp_path / "scratch")
    assert MlflowClient(uri(new)).get_experiment(other).artifact_location == elsewhere.as_uri()


def test_user_chosen_experiment_location_is_kept(tmp_path):
    old, new, elsewhere = tmp_path / "fsa-work", tmp_path / "fsa-moved", (tmp_path / "chosen").resolve()
    old.mkdir()
    experiment = MlflowClient(uri(old)).create_experiment(EXPERIMENT, artifact_location=elsewhere.as_uri())
    tracker(old)
    shutil.move(str(old), str(new))
    t = tracker(new)
    assert t.experiment_id == experiment
    assert MlflowClient(uri(new)).get_experiment(experiment).artifact_location == elsewhere.as_uri()
    assert not (new / "mlartifacts").exists()


def test_shared_database_is_not_pointed_at_another_workdir(tmp_path):
    db_uri = f"sqlite:///{tmp_path}/shared.db"
    first, second = tmp_path / "first", tmp_path / "second"
    t = Tracker(db_uri, EXPERIMENT, first / "mlartifacts")
    run = t.start("r", {}, {})
    (tmp_path / "note.txt").write_text("first")
    t.files(run, tmp_path / "note.txt")
    Tracker(db_uri, EXPERIMENT, second / "mlartifacts")  # another workdir, same database
    location = MlflowClient(db_uri).get_experiment(t.experiment_id).artifact_location
    assert location == (first / "mlartifacts").resolve().as_uri()


def test_only_local_sqlite_stores_are_rewritten():
    assert sqlite_path("http://127.0.0.1:5000") is None
    assert sqlite_path("https://mlflow.example/x") is None
    assert sqlite_path("sqlite://") is None
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("sqlite:////abs/mlflow.db") == Path("/abs/mlflow.db")
    assert sqlite_path("sqlite:///fsa-work/mlflow.db") == Path("fsa-work/mlflow.db")
