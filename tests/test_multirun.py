"""Hydra multirun from the command line runs every combination and shares cached stages."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import shrunk

pytestmark = pytest.mark.slow


def test_multirun_sweeps_seeds_and_shares_stages(tmp_path, harness_env):
    workdir = tmp_path / "work"
    overrides = [o for o in shrunk(workdir) if not o.startswith("finetune.seeds")]
    out = subprocess.run(
        [sys.executable, "-m", "fsa_distill.cli", "run", "-m", "finetune.seed=42,52", *overrides],
        capture_output=True, text=True, timeout=600, env=harness_env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert log.count("Finished in state Cached") >= 3  # job 2 reuses acquire x2 and student
    # Prefect's own format: every line of a stage names its task run (Hydra's logging is off)
    assert "Task run 'finetune[baseline-atsa-rest14-52]' - Finished in state Completed()" in log
    assert "[prefect.task_runs][INFO] - Finished" not in log
    # and each job ends with its stage table and where its report and MLflow run are
    assert log.count("Stages (wall time summed") == 2 and "MLflow parent run:" in log
    # one report across the jobs, printed: mean ± std over the two seeds it ran
    table = out.stderr.split("sweep report:", 1)[1]
    assert re.search(r"baseline\s+mean\s+\d+\.\d\d ± \d+\.\d\d\s+2\b", table), table
    store = workdir / "artifacts"
    assert len(list((store / "acquire").iterdir())) == 2
    assert len(list((store / "student").iterdir())) == 1
    assert len(list((store / "finetune").iterdir())) == 4  # 2 datasets x 2 seeds
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("fsa-distill")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'flow'")
    assert sorted(p.data.params["finetune.seed"] for p in parents) == ["42", "52"]
