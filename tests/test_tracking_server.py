"""The remote-tracking path: the flow logging to a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from fsa_distill.flows.pipeline import fsa_distill
from mlflow.tracking import MlflowClient

from tests.conftest import shrunk
from tests.servers import background, free_port, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_flow_logs_and_registers_on_a_tracking_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [
        mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "store"),
    ]  # fmt: skip
    with background(cmd, dict(os.environ), tmp_path / "mlflow.log") as server:
        wait_http(f"{url}/health", 120, server, tmp_path / "mlflow.log")
        overrides = shrunk(tmp_path / "work", "tracking=server", f"tracking.uri={url}", "data.datasets=[atsa/rest14]")
        result = fsa_distill(overrides=overrides)
        client = MlflowClient(url)
        parent = client.get_run(result["parent_run_id"])
        assert parent.info.status == "FINISHED"
        query = f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.kind = 'finetune'"
        (child,) = client.search_runs([parent.info.experiment_id], query)
        assert "test_normal_f1" in child.data.metrics
        name, version = child.data.tags["model_version"].split("/")
        mv = client.get_model_version(name, version)
        logged = client.get_logged_model(mv.tags["model_id"])  # the Models column: a logged model of the run
        assert logged.source_run_id == child.info.run_id and mv.source == logged.artifact_location
        files = {f.path for f in client.list_logged_model_artifacts(logged.model_id)}
        assert {"config.json", "model.safetensors"} <= files
    # the artifacts went to the server's store, not to the local workdir
    assert any((tmp_path / "store").rglob("model.safetensors"))
