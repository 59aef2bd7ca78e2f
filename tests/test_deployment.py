"""A Prefect deployment of the flow, served for real against a `prefect server` on 127.0.0.1."""

from __future__ import annotations

import json
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import shrunk
from tests.servers import background

pytestmark = pytest.mark.slow


def test_deployment_run_adds_its_overrides_to_the_served_ones(tmp_path, harness_env):
    api = harness_env["PREFECT_API_URL"]  # a real server: the session's (a start of its own costs ~15 s)
    env = dict(harness_env)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"))
    workdir = tmp_path / "work"
    serve_cmd = [sys.executable, "-m", "fsa_distill.cli", "serve", "--name", "ci", *shrunk(workdir)]
    with background(serve_cmd, env, tmp_path / "serve.log") as serve, temporary_settings({PREFECT_API_URL: api}):
        from prefect.deployments import run_deployment

        _wait_for_deployment("fsa-distill/ci", serve, tmp_path / "serve.log")
        # the run sends only what it changes; the served (smoke) overrides stay, the run's win
        parameters = {"overrides": ["finetune.learning_rate=0.002"], "choices": {"run_name": "from-deployment"}}
        flow_run = run_deployment("fsa-distill/ci", parameters=parameters, timeout=600)
        log = (tmp_path / "serve.log").read_text()
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log[-4000:]}"
        # named from its config, not random words; the form offers the common choices
        assert flow_run.name.startswith("from-deployment") and "finetune.learning_rate=0.002" in flow_run.name
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("fsa-distill/ci")
        form = deployment.parameter_openapi_schema["properties"]
        assert {"overrides", "choices", "base_overrides"} <= set(form)

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("fsa-distill")
    parents = client.search_runs([exp.experiment_id], "tags.run_name = 'from-deployment' and tags.kind = 'flow'")
    assert len(parents) == 1 and parents[0].data.params["finetune.learning_rate"] == "0.002"
    assert parents[0].info.run_name == flow_run.name  # MLflow parent and Prefect flow run: one name
    assert parents[0].data.params["data.limit"] == "12"  # served with experiment=smoke: kept
    assert parents[0].info.status == "FINISHED"
    recorded = json.loads(parents[0].data.tags["overrides"])
    assert "experiment=smoke" in recorded and recorded[-1] == "finetune.learning_rate=0.002"
    assert parents[0].data.tags["prefect.flow_run_id"] == str(flow_run.id)
    query = f"tags.mlflow.parentRunId = '{parents[0].info.run_id}' and tags.kind = 'finetune'"
    children = client.search_runs([exp.experiment_id], query)
    assert len(children) == 2


def _wait_for_deployment(name, proc, log, timeout_s=120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited:\n{log.read_text()[-3000:]}")
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
    raise TimeoutError(f"deployment {name} never appeared:\n{log.read_text()[-3000:]}")
