"""MLflow bookkeeping for a flow run: one parent run, one child run per (dataset, seed).

Everything goes through an explicit `MlflowClient` and explicit run ids: MLflow's "active run"
is thread-local and Prefect runs tasks in threads. Fine-tuned students are logged as folders and
registered with `create_model_version` (T5 cannot go through mlflow.transformers under
transformers 5). A model whose content hash already has a registered version is not uploaded
again: the new run is tagged with that version instead, which keeps cached reruns fast.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fsa_distill import ROOT


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
    """Nested config -> {"finetune.learning_rate": "0.001", ...} for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list) else str(value)}


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The entries of `values` that are numbers (not bools, not None): what MLflow metrics can hold."""
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class Tracker:
    """Thin wrapper over MlflowClient with the project's run layout."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = artifact_root.resolve().as_uri() if artifact_root and not uri.startswith("http") else None
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # created concurrently by another process
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = found.experiment_id

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
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
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
