"""A flow on a Dask cluster that was already running (`runner.address`), as on a real cluster.

A real `dask scheduler` and two `dask worker` processes are started on 127.0.0.1, each worker in
its own working directory with its own HOME (so its own local copies of the store's outputs), so
that what they share is the store the flow names: a bucket on a local S3 server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shrunk
from servers import background, free_port

SMALL = ["teacher_eval.enabled=false", "zeroshot.enabled=false", "data.datasets=[acsa/rest16]"]


def _start(config: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fsa_distill.cli", "run", *config],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(run: subprocess.Popen) -> dict:
    out, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _f1(result: dict) -> str:
    """The report's table of F1 per model, dataset and test type (mean and std over the seeds)."""
    return (Path(result["report"]) / "summary.csv").read_text()


@pytest.mark.slow
def test_the_flow_runs_on_a_running_dask_cluster_and_its_workers_share_the_cache(tmp_path, s3_url, harness_env):
    import fsspec
    from distributed import Client

    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # a Prefect server the flows and workers report to, as on a cluster (the session's, started once)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_API_URL"] = harness_env["PREFECT_API_URL"]
    env["FSA_PROGRESS_INTERVAL_S"] = "60"
    env["FSA_STORE_CACHE"] = str(tmp_path / "flow-cache")  # the flow's machine: its own copies too
    scheduler = [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
    workers = []
    for name in ("w1", "w2"):
        (tmp_path / name / "home").mkdir(parents=True)
        own = {k: v for k, v in env.items() if k != "FSA_STORE_CACHE"} | {"HOME": str(tmp_path / name / "home")}
        workers.append(([dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--name", name,
                         "--local-directory", str(tmp_path / name / "dask")], own, tmp_path / name))  # fmt: skip

    workdir = tmp_path / "work"
    config = shrunk(
        workdir, *SMALL, "finetune.seeds=[42,52]", "runner=dask", f"runner.address={address}", f"store.url={s3_url}"
    )
    with (
        background(scheduler, env, tmp_path / "scheduler.log"),
        background(*workers[0][:2], tmp_path / "w1.log", cwd=workers[0][2]),
        background(*workers[1][:2], tmp_path / "w2.log", cwd=workers[1][2]),
    ):
        client = Client(address, timeout=120)
        client.wait_for_workers(2, timeout=120)
        client.get_task_stream()  # starts recording which worker ran what
        started = time.time()
        # the flow on the cluster and the same config on the thread runner, side by side
        threads = _start(shrunk(tmp_path / "threads", *SMALL, "finetune.seeds=[42,52]"), env)
        first = _result(_start(config, env))
        stream = client.get_task_stream(start=started)
        again = _result(_start(config, env))  # the rerun, on the cluster
        threads = _result(threads)
        client.close()

    ran_on = {record["worker"] for record in stream}
    assert len(ran_on) == 2, f"every stage ran on one worker: {ran_on}"
    # the run's own stage table says where each stage ran: both workers, never the flow's process
    places = " ".join(row["where"] for row in first["stages"])
    assert "worker w1" in places and "worker w2" in places and "flow process" not in places, first["stages"]
    assert all(row["where"] == f"flow process x{row['ran']}" for row in threads["stages"] if row["ran"])
    assert all(row["ran"] > 0 for row in first["stages"] if row["stage"] in ("finetune", "evaluate"))
    # the second run's tasks land on either worker: each finds the other's records and outputs
    assert all(row["ran"] == 0 and row["cached"] > 0 for row in again["stages"]), again["stages"]

    assert _f1(threads) == _f1(first), "the Dask cluster and the thread runner disagree"
    # everything went through the bucket: outputs and Prefect's records there, none in the workdir
    fs, root = fsspec.core.url_to_fs(s3_url)
    # (and MLflow's artifacts: the experiment was made with the store remote)
    assert {"acquire", "finetune", "evaluate", "report", ".prefect", "mlflow"} <= {Path(p).name for p in fs.ls(root)}
    assert not (workdir / "artifacts").exists()
    for name in ("w1", "w2"):  # each worker read its inputs from its own copies
        assert any((tmp_path / name / "home" / ".cache" / "fsa-distill" / "store" / "objects").iterdir())


def test_a_scheduler_elsewhere_needs_a_prefect_api_its_workers_reach(monkeypatch):
    from fsa_distill.flows.pipeline import make_runner

    from fsa_distill.config import compose_config, validate

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ValueError, match="PREFECT_API_URL"):
        make_runner({"kind": "dask", "workers": 2, "address": "tcp://10.1.2.3:8786"})
    assert make_runner({"kind": "dask", "workers": 2, "address": "tcp://127.0.0.1:8786"})  # connects on entry
    monkeypatch.setenv("PREFECT_API_URL", "http://10.1.2.4:4200/api")
    assert make_runner({"kind": "dask", "workers": 2, "address": "tcp://10.1.2.3:8786"})
    with pytest.raises(ValueError, match="a Dask scheduler address needs runner=dask"):
        validate(compose_config(["runner.address=tcp://127.0.0.1:8786"]))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_local_dask_workers_get_the_torch_threads_of_a_thread_runner_stage():
    """Dask's nanny starts workers with OMP_NUM_THREADS=1: one worker on a machine of several cores
    would use one of them. By default each worker gets its share of the cores; `torch_threads` wins."""
    from distributed import Client
    from fsa_distill.flows.pipeline import make_runner

    cores = _torch_threads()
    assert cores > 1, "this test needs a machine with 2 or more cores"
    for threads, workers, expected in ((1, 1, 1), (0, 1, cores), (0, 2, max(1, cores // 2))):
        runner = make_runner({"kind": "dask", "workers": workers, "address": None}, torch_threads=threads)
        cluster = runner.cluster_class(**runner.cluster_kwargs, dashboard_address=None)
        with cluster, Client(cluster) as client:
            assert set(client.run(_torch_threads).values()) == {expected}
