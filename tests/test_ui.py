"""Seen in a real browser: after a smoke run, the MLflow UI and the Prefect UI show what a user looks for.

A `prefect server` and an `mlflow server` are started on 127.0.0.1, `fsa-distill run experiment=smoke`
runs against them, the servers' REST APIs are checked for what the pages render (parent run,
children with live-logged curves, the `best` alias, Prefect progress and table artifacts), and
headless Chromium (Debian's `chromium` package) renders both pages: the screenshots go under the
report folder (`<report>/screenshots/`), and the DOM must carry the run's name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import shrunk_distill
from tests.servers import background, free_port, wait_http

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _post(url: str, body: dict) -> dict | list:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _browse(url: str, screenshot: Path) -> str:
    """Render `url` in headless Chromium: save a screenshot, return the DOM after its scripts ran."""
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--hide-scrollbars", "--window-size=1440,1000", "--virtual-time-budget=20000"]  # fmt: skip
    # one launch does both (each launch of an MLflow or Prefect page costs 2.5-6 s here)
    dom = subprocess.run([*common, f"--screenshot={screenshot}", "--dump-dom", url], check=True, capture_output=True,
                         text=True, timeout=180)  # fmt: skip
    return dom.stdout


def _not_blank(png: Path) -> bool:
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)
    return png.stat().st_size > 10_000 and float(pixels.std()) > 0.01


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("FSA_REQUIRE_BROWSER"),
    reason="needs Debian's chromium (README set-up: apt-get install chromium); CI sets FSA_REQUIRE_BROWSER=1",
)
def test_mlflow_and_prefect_pages_show_the_run(tmp_path):
    assert CHROMIUM is not None, "chromium not found (apt-get install chromium)"
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    workdir = tmp_path / "work"
    workdir.mkdir()
    db = f"sqlite:///{workdir}/mlflow.db"
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"),
               FSA_PROGRESS_INTERVAL_S="1")  # fmt: skip
    bin_dir = os.path.dirname(sys.executable)
    prefect_cmd = [
        os.path.join(bin_dir, "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(prefect_port),
    ]
    mlflow_cmd = [os.path.join(bin_dir, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                  "--backend-store-uri", db, "--workers", "1"]  # fmt: skip
    ui = f"http://127.0.0.1:{mlflow_port}"
    with (
        background(prefect_cmd, env, tmp_path / "prefect.log") as prefect,
        background(mlflow_cmd, env, tmp_path / "mlflow.log") as mlflow_server,
    ):
        wait_http(f"{api}/health", 120, prefect, tmp_path / "prefect.log")
        wait_http(f"{ui}/health", 120, mlflow_server, tmp_path / "mlflow.log")
        run = subprocess.run(
            [sys.executable, "-m", "fsa_distill.cli", "run", *shrunk_distill(workdir, f"tracking.ui={ui}")],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-4000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        parent_id = result["parent_run_id"]
        assert result["mlflow_url"].startswith(f"{ui}/#/experiments/")

        # MLflow, through the REST API the UI reads
        parent = _get(f"{ui}/api/2.0/mlflow/runs/get?run_id={parent_id}")["run"]
        tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        experiment_id = parent["info"]["experiment_id"]
        flow_run_id = tags["prefect.flow_run_id"]
        children = _post(f"{ui}/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment_id], "filter": f"tags.mlflow.parentRunId = '{parent_id}'", "max_results": 100
        })["runs"]  # fmt: skip
        kinds = sorted({t["value"] for c in children for t in c["data"]["tags"] if t["key"] == "kind"})
        assert kinds == ["corpus", "finetune", "pretrain", "teacher-eval", "zeroshot"]
        pretrain = next(c for c in children if {"key": "kind", "value": "pretrain"} in c["data"]["tags"])
        curve = _get(
            f"{ui}/api/2.0/mlflow/metrics/get-history?run_id={pretrain['info']['run_id']}&metric_key=train_loss"
        )
        assert curve["metrics"], "no live-logged pretraining curve"
        finetune_tags = next(
            {t["key"]: t["value"] for t in c["data"]["tags"]}
            for c in children
            if {"key": "kind", "value": "finetune"} in c["data"]["tags"]
        )
        model_name = finetune_tags["model_version"].split("/")[0]
        alias = _get(f"{ui}/api/2.0/mlflow/registered-models/alias?name={model_name}&alias=best")
        assert alias["model_version"]["name"] == model_name

        # Prefect: the flow run has its name, table artifacts and progress artifacts from the stages
        flow_run = _get(f"{api}/flow_runs/{flow_run_id}")
        assert flow_run["name"].startswith("smoke")
        artifacts = _post(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        types = {a["type"] for a in artifacts}
        keys = {a["key"] for a in artifacts if a.get("key")}
        assert {"progress", "table"} <= types, types
        assert {"fsa-leaderboard", "fsa-stages", "mlflow-parent-run"} <= keys, keys

        # the pages themselves, in a real browser
        shots = Path(result["report"]) / "screenshots"
        shots.mkdir(exist_ok=True)
        mlflow_dom = _browse(result["mlflow_url"], shots / "mlflow-run.png")  # the link the run printed
        # the experiment's link (the run's link up to the experiment, as `Tracker.ui_url` makes it)
        # opens on its runs table, not on an empty GenAI overview of traces: the parent is listed
        experiment_url = result["mlflow_url"].split("/runs/")[0] + "/runs?workflowType=machine_learning"
        experiment_dom = _browse(experiment_url, shots / "mlflow-experiment.png")
        prefect_dom = _browse(
            f"http://127.0.0.1:{prefect_port}/runs/flow-run/{flow_run_id}", shots / "prefect-flow-run.png"
        )
        assert parent["info"]["run_name"] in mlflow_dom
        assert parent["info"]["run_name"] in experiment_dom, "the experiment page does not list the runs"
        assert flow_run["name"] in prefect_dom
        pngs = sorted(p.name for p in shots.iterdir())
        assert pngs == ["mlflow-experiment.png", "mlflow-run.png", "prefect-flow-run.png"], pngs
        for png in shots.iterdir():
            assert _not_blank(png), png
        keep = os.environ.get("FSA_SCREENSHOTS_DIR")  # to refresh the README's copies
        if keep:
            shutil.copytree(shots, keep, dirs_exist_ok=True)
