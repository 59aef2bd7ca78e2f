"""Hydra multirun from the command line runs every combination and shares cached stages."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import shrunk

pytestmark = pytest.mark.slow


def test_multirun_sweeps_seeds_and_shares_stages(tmp_path):
    workdir = tmp_path / "work"
    overrides = [o for o in shrunk(workdir) if not o.startswith("finetune.seeds")]
    out = subprocess.run(
        [sys.executable, "-m", "fsa_distill.cli", "run", "-m", "finetune.seed=42,52", *overrides],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert log.count("Finished in state Cached") >= 3  # job 2 reuses acquire x2 and student
    store = workdir / "artifacts"
    assert len(list((store / "acquire").iterdir())) == 2
    assert len(list((store / "student").iterdir())) == 1
    assert len(list((store / "finetune").iterdir())) == 4  # 2 datasets x 2 seeds
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("fsa-distill")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'flow'")
    assert sorted(p.data.params["finetune.seed"] for p in parents) == ["42", "52"]
