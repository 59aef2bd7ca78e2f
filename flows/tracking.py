"""MLflow bookkeeping for a flow run: one parent run, one child run per (dataset, seed).

Everything goes through an explicit `MlflowClient` and explicit run ids: MLflow's "active run"
is thread-local and Prefect runs tasks in threads. Fine-tuned students are logged as folders and
registered with `create_model_version` (T5 cannot go through mlflow.transformers under
transformers 5). A model whose content hash already has a registered version is not uploaded
again: the new run is tagged with that version instead, which keeps cached reruns fast.

A workdir can be moved or copied (`mv fsa-work fsa-moved`). MLflow keeps absolute artifact URIs in
its database, so with a local SQLite store the Tracker first points the URIs that lead into the
artifact root's previous location at its current one (see `relocate`).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fsa_distill import ROOT

log = logging.getLogger(__name__)

# The artifact root's own absolute path when a Tracker last used it; it travels with the root, so a
# value other than the root's current path means the root was moved or copied from there.
MARKER = ".location"

# (table, column, tag key or None): where MLflow 3.17's SQL stores keep absolute artifact locations.
# Tables or columns an older or newer schema lacks are skipped.
LOCATION_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("experiments", "artifact_location", None),
    ("runs", "artifact_uri", None),
    ("model_versions", "source", None),
    ("model_versions", "storage_location", None),
    ("logged_models", "artifact_location", None),
    ("workspaces", "default_artifact_root", None),
    ("trace_tags", "value", "mlflow.artifactLocation"),
)


def git_commit() -> str:
    """The checkout's commit (with `-dirty` when it has uncommitted changes), or `unknown`."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> {"finetune.learning_rate": "0.001", ...} for MLflow params.

    Every value is redacted (`fsa_distill.redact`): a URL's userinfo and secret query values
    (`tracking.uri`, `teacher.base_url`) become `***`, so MLflow params never hold credentials.
    """
    from fsa_distill.redact import redact_text

    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: redact_text(json.dumps(value) if isinstance(value, list) else str(value))}


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The entries of `values` that are numbers (not bools, not None): what MLflow metrics can hold."""
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local `sqlite:///` tracking URI; None otherwise, so servers are never rewritten."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def location_path(location: str | None) -> Path | None:
    """The local path of a stored artifact location (`file://` URI or bare path); None when it is remote."""
    if not location:
        return None
    if location.startswith("file:"):
        parsed = urlparse(location)
        return Path(url2pathname(parsed.path)) if parsed.netloc in ("", "localhost") else None
    return Path(location) if location.startswith("/") else None


def spellings(old: Path, new: Path) -> list[tuple[str, str]]:
    """Each way MLflow may have written `old` into the database, paired with the same spelling of `new`."""
    pairs = [
        (old.as_uri(), new.as_uri()),
        (f"file://{old}", f"file://{new}"),
        (f"file:{old}", f"file:{new}"),
        (str(old), str(new)),
    ]
    return list(dict.fromkeys(pairs))


def relocate(db: Path, old: Path, new: Path) -> int:
    """Rewrite stored locations under `old` to lie under `new`, in one transaction; returns the rows changed.

    Only values equal to `old` or below it change, so a location the user chose elsewhere is left alone.
    Comparisons use `substr`, not LIKE: percent-encoded URIs and `_` would be wildcards there.
    """
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")  # one writer at a time: concurrent Trackers see all or nothing
        changed = 0
        try:
            for table, column, key in LOCATION_COLUMNS:
                columns = {row[1] for row in con.execute(f'PRAGMA table_info("{table}")')}
                if column not in columns or (key is not None and "key" not in columns):
                    continue
                for before, after in spellings(old, new):
                    sql = (
                        f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                        f'WHERE ("{column}" = ? OR substr("{column}", 1, ?) = ?)'
                    )
                    args: list[Any] = [after, len(before) + 1, before, len(before) + 1, before + "/"]
                    if key is not None:
                        sql += ' AND "key" = ?'
                        args.append(key)
                    changed += con.execute(sql, args).rowcount
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return changed
    finally:
        con.close()


def previous_root(db: Path, experiment: str, root: Path) -> Path | None:
    """Where the artifact root lived when the database last wrote locations into it, if not at `root` now.

    The marker inside the root answers directly. A root without one (made before the marker existed)
    counts as moved from the experiment's stored location when that location is a same-named folder and
    is gone, or when artifacts the database places there are found under `root`: a database shared by
    several workdirs is then never pointed away from artifacts that still live where it says.
    """
    marker = root / MARKER
    recorded = Path(marker.read_text().strip()) if marker.is_file() else None
    if recorded is not None and recorded.is_absolute():  # a damaged marker falls back to the inference below
        return recorded if recorded != root else None
    con = sqlite3.connect(db, timeout=60)
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"experiments", "runs"} <= tables:
            return None
        row = con.execute(
            "SELECT experiment_id, artifact_location FROM experiments WHERE name = ? ORDER BY experiment_id",
            (experiment,),
        ).fetchone()
        if row is None:
            return None
        old = location_path(row[1])
        if old is None or old == root or old.name != root.name:
            return None
        if not old.exists():
            return old
        for (uri,) in con.execute("SELECT artifact_uri FROM runs WHERE experiment_id = ?", (row[0],)):
            path = location_path(uri)
            if path is not None and path.is_relative_to(old) and (root / path.relative_to(old)).exists():
                return old
        return None
    finally:
        con.close()


def write_marker(root: Path) -> None:
    """Record `root`'s current absolute path inside it (atomically), for the next `previous_root`."""
    marker = root / MARKER
    if marker.is_file() and marker.read_text().strip() == str(root):
        return
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=MARKER, dir=root)
    with os.fdopen(fd, "w") as out:
        out.write(f"{root}\n")
    os.replace(tmp, marker)


class Tracker:
    """Thin wrapper over MlflowClient with the project's run layout."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        """Open (or create) `experiment`; a moved workdir's SQLite store is first pointed at its new root."""
        db = sqlite_path(uri)
        root = artifact_root.resolve() if artifact_root is not None else None
        if db is not None and root is not None and db.is_file():
            old = previous_root(db, experiment, root)
            if old is not None:
                changed = relocate(db, old, root)
                log.info("MLflow locations moved from %s to %s (%d rows)", old, root, changed)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = root.as_uri() if root is not None and not uri.startswith("http") else None
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # created concurrently by another process
                found = self.client.get_experiment_by_name(experiment)
                self.experiment_id = found.experiment_id
            else:
                found = self.client.get_experiment(self.experiment_id)
        else:
            self.experiment_id = found.experiment_id
        if db is not None and root is not None and location_path(found.artifact_location) == root:
            write_marker(root)

    def start(self, name: str, params: dict[str, str], tags: dict[str, str], parent: str | None = None) -> str:
        """Create a run (a child when `parent` is given) and log its params."""
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        items = list(params.items())
        for i in range(0, len(items), 100):
            from mlflow.entities import Param

            self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 100]])
        return run_id

    def metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        """Log a dict of metrics at one step."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and float(v) == float(v)]
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i : i + 500])

    def history(self, run_id: str, log_history: list[dict[str, Any]]) -> None:
        """Training curves from the Trainer's log history: train loss, lr and dev metrics by step."""
        renames = {"loss": "train_loss", "learning_rate": "lr", "eval_loss": "dev_loss"}
        for entry in log_history:
            if "train_runtime" in entry:  # the closing summary: its train_loss is the run's mean, not a step's
                self.metrics(run_id, {"train_loss_mean": entry.get("train_loss")}, int(entry.get("step", 0)))
                continue
            step = int(entry.get("step", 0))
            values = {}
            for key, value in entry.items():
                if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                name = renames.get(key, key)
                values[name.replace("eval_", "dev_", 1) if name.startswith("eval_") else name] = float(value)
            self.metrics(run_id, values, step)

    def files(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder as run artifacts."""
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def register(self, run_id: str, model_dir: Path, name: str, sha256: str) -> str:
        """Register `model_dir` as a version of `name`, reusing a version with the same content hash."""
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        for version in self.client.search_model_versions(f"name='{name}'"):
            if version.tags.get("sha256") == sha256:
                self.client.set_tag(run_id, "model_version", f"{name}/{version.version}")
                return version.version
        self.files(run_id, model_dir, "model")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(name, source=source, run_id=run_id, tags={"sha256": sha256})
        self.client.set_tag(run_id, "model_version", f"{name}/{version.version}")
        return version.version

    @contextmanager
    def child(self, name: str, params: dict[str, str], tags: dict[str, str], parent: str) -> Iterator[str]:
        """A child run that ends FINISHED, or FAILED if logging into it raises (never left RUNNING)."""
        run_id = self.start(name, params, tags, parent=parent)
        ok = False
        try:
            yield run_id
            ok = True
        finally:
            self.end(run_id, ok)

    def end(self, run_id: str, ok: bool) -> None:
        """Close a run as FINISHED or FAILED."""
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(run_id, status=status)
