"""Sweeps as parallel deployment runs: `hydra/launcher=prefect` and `fsa-distill deploy`.

The slow test runs it for real: a `prefect server` on 127.0.0.1, a process work pool, two
`prefect worker start` processes whose environment has none of the CLI's settings (only what the
deployment passes reaches a run), the deployment made by `fsa-distill deploy`, and a two-value
sweep submitted with `--wait`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from fsa_distill import ROOT
from tests.conftest import shrunk
from tests.servers import background

#: What keeps the flow small: no teacher evaluations, one dataset (each run ~15 s of flow time).
SMALL = ["teacher_eval.enabled=false", "zeroshot.enabled=false", "data.datasets=[acsa/rest16]"]
PREFECT = shutil.which("prefect") or os.path.join(os.path.dirname(sys.executable), "prefect")


# ---- fast: argument and override handling ----------------------------------------------------


def test_sent_overrides_make_local_folders_absolute_and_keep_the_rest(tmp_path):
    from fsa_distill.launcher import sent_overrides

    sent = sent_overrides(
        [
            "finetune.seed=42",
            "workdir=runs/a",
            "data.source=https://example.org/raw",
            "reviews.root=/abs/reviews",
            "sentiment.source='my sets'",
            "+run_name=x",
            "workdir=${oc.env:HOME}/w",
        ],
        cwd=tmp_path,
    )
    assert sent == [
        "finetune.seed=42",
        f"workdir={tmp_path / 'runs' / 'a'}",
        "data.source=https://example.org/raw",
        "reviews.root=/abs/reviews",
        f"sentiment.source='{tmp_path / 'my sets'}'",
        "+run_name=x",
        "workdir=${oc.env:HOME}/w",
    ]


def test_wait_flag_needs_the_prefect_launcher():
    from fsa_distill.cli import launcher_args

    assert launcher_args(["-m", "a=1,2"]) == ["-m", "a=1,2"]
    assert launcher_args(["-m", "a=1,2", "--wait", "hydra/launcher=prefect"]) == [
        "-m",
        "a=1,2",
        "hydra/launcher=prefect",
        "hydra.launcher.wait=true",
    ]
    with pytest.raises(ValueError, match="hydra/launcher=prefect"):
        launcher_args(["-m", "a=1,2", "--wait"])
    with pytest.raises(ValueError, match="add -m"):  # Hydra would run the one job right here
        launcher_args(["a=1", "hydra/launcher=prefect"])


def test_launcher_config_composes_into_the_plugin():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fsa_distill.cli import _register_launcher
    from fsa_distill.config import register

    register()
    _register_launcher()
    overrides = ["hydra/launcher=prefect", "hydra.launcher.deployment=fsa-distill/ci", "hydra.launcher.wait=true"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__module__ == "hydra_plugins.fsa_distill_launcher.prefect_launcher"
    assert (launcher.deployment, launcher.wait, launcher.timeout_s) == ("fsa-distill/ci", True, None)


def test_hydra_plugin_scan_imports_the_launcher():
    """What Hydra does with an installed (non-editable) copy: import every module under `hydra_plugins`."""
    from hydra.core.plugins import Plugins

    portion = types.SimpleNamespace(__path__=[str(ROOT / "hydra_plugins")], __name__="hydra_plugins")
    found, _ = Plugins._scan_all_plugins(modules=[portion])
    assert [c.__name__ for c in found] == ["PrefectLauncher"]
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists()  # a namespace package, shared with other plugins


def test_flow_env_carries_the_cli_settings_but_no_credentials(tmp_path, monkeypatch):
    from fsa_distill.launcher import flow_env

    monkeypatch.delenv("PREFECT_LOCAL_STORAGE_PATH", raising=False)
    monkeypatch.setenv("FSA_REVIEWS_ROOT", "/data/reviews")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # set here: wins over the default, as with the CLI
    secrets = ("HF_TOKEN", "OPENAI_API_KEY", "MLFLOW_TRACKING_PASSWORD", "FSSPEC_S3_SECRET", "FSA_API_KEY",
               "FSA_APIKEY", "FSSPEC_S3_CLIENT_KWARGS", "FSSPEC_ABFS_CONNECTION_STRING")  # fmt: skip
    for secret in secrets:
        monkeypatch.setenv(secret, "s3cr3t")
    monkeypatch.setenv("FSSPEC_S3", '{"key": "k", "secret": "s3cr3t"}')  # fsspec: a protocol's keywords as JSON
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:s3cr3t@mlflow.example")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = flow_env(tmp_path)
    assert env["PREFECT_LOCAL_STORAGE_PATH"] == str(tmp_path / "prefect" / "results")
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["FSA_REVIEWS_ROOT"] == "/data/reviews" and env["HF_HUB_OFFLINE"] == "0"
    assert not [value for value in env.values() if "s3cr3t" in value]
    assert env["FSSPEC_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"  # not a credential: it goes along
    assert "PREFECT_HOME" not in env and "PREFECT_API_URL" not in env


def test_a_missing_deployment_fails_before_anything_is_submitted(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs())
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "fsa_distill.cli", "run", "-m", "finetune.seed=42,52", f"workdir={tmp_path / 'w'}",
           "hydra/launcher=prefect", "hydra.launcher.deployment=fsa-distill/nope", "--wait"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "deployment 'fsa-distill/nope' not found" in out.stderr and "fsa-distill deploy --pool" in out.stderr
    assert "Traceback" not in out.stderr  # a message, not a stack through Hydra
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == before

    # no server at all: said at once, not after a connection timeout per job
    env.pop("PREFECT_API_URL")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "set PREFECT_API_URL" in out.stderr, out.stderr[-3000:]


@pytest.mark.slow  # imports the flow to deploy it
def test_without_wait_the_jobs_are_submitted_with_their_overrides_and_left_to_the_workers(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    from fsa_distill.launcher import deploy

    api = PREFECT_API_URL.value()
    _create_process_pool("fsa-nowait", api)
    made = deploy("fsa-nowait", "nowait", [*shrunk(tmp_path / "w"), *SMALL], working_dir=tmp_path)
    assert made["entrypoint"] == "fsa_distill.flows.pipeline.fsa_distill"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "fsa_distill.cli", "run", "-m", "finetune.seed=42,52", "workdir=local",
           "hydra/launcher=prefect", "hydra.launcher.deployment=fsa-distill/nowait"]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no worker is polling work pool 'fsa-nowait'" in out.stderr and "sweep report: none" in out.stderr
    rows = json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"flow_runs"')))["flow_runs"]
    # a job that cannot run (validated as the deployment will compose it) stops the sweep before any submission
    bad = subprocess.run([*cmd, "data.datasets=[atsa/nope]"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 1 and "unknown dataset 'atsa/nope'" in bad.stderr, bad.stderr[-3000:]
    assert "nothing was submitted" in bad.stderr and "Traceback" not in bad.stderr
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("fsa-distill/nowait")
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        try:
            assert sorted(str(r.id) for r in runs) == sorted(row["flow_run_id"] for row in rows)
            assert all(r.state.is_scheduled() for r in runs) and [row["state"] for row in rows] == ["SCHEDULED"] * 2
            # each run gets its job's overrides (local folders absolute) on top of the deployment's base
            sent = sorted(r.parameters["overrides"] for r in runs)
            assert sent == [["finetune.seed=42", f"workdir={tmp_path / 'local'}"],
                            ["finetune.seed=52", f"workdir={tmp_path / 'local'}"]]  # fmt: skip
            assert f"workdir={tmp_path / 'w'}" in deployment.parameters["base_overrides"]
            assert (tmp_path / "local" / "hydra").is_dir()  # the jobs' Hydra folders, with their flow run ids
        finally:
            for run in runs:  # no worker will ever take them
                client.delete_flow_run(run.id)


# ---- slow: the real thing ----------------------------------------------------------------------


def _clean_env(tmp_path: Path, name: str, api: str) -> dict[str, str]:
    """A process environment without the CLI's or the test session's settings (PREFECT_*, FSA_*, HF_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FSA_", "HF_", "MLFLOW_"))}
    env.update(
        PREFECT_API_URL=api,
        PREFECT_HOME=str(tmp_path / f"home-{name}"),  # one per process: no SQLite locks between them
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",  # workers pick up the runs within a second
        DO_NOT_TRACK="1",
    )
    return env


@pytest.mark.slow
def test_sweep_runs_as_parallel_flow_runs_of_a_deployment_on_two_workers(tmp_path, harness_env):
    started = time.monotonic()
    api = harness_env["PREFECT_API_URL"]  # a real server, the session's (a start of its own costs ~15 s)
    pool = "fsa-test"
    _create_process_pool(pool, api)
    logs = [tmp_path / f"worker{i}.log" for i in (1, 2)]
    worker_cmd = [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"]
    with (
        background([*worker_cmd, "--name", "w1"], _clean_env(tmp_path, "w1", api), logs[0], cwd=tmp_path),
        background([*worker_cmd, "--name", "w2"], _clean_env(tmp_path, "w2", api), logs[1], cwd=tmp_path),
    ):
        # the deployment, made where the user works: a relative workdir is pinned absolute
        cli_env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "home-cli")}
        cli_env.pop("PREFECT_LOCAL_STORAGE_PATH", None)  # the deployment's default: <workdir>/prefect/results
        cli_env.pop("FSA_WORKDIR", None)
        # runner.gpu_limit=1: one GPU here, so at most one gpu-tagged stage at a time across both runs
        # (a tag of this test's own: the limit stays on the session's server)
        base = [*shrunk(Path("work")), *SMALL, "runner.gpu_limit=1", f"runner.gpu_tag={GPU_TAG}"]
        deploy = subprocess.run(
            [sys.executable, "-m", "fsa_distill.cli", "deploy", "--pool", pool, "--name", "launcher-ci", *base],
            cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        _wait_for_workers(pool, api, 2, logs)
        deployed = time.monotonic()
        sweep = subprocess.run(
            [sys.executable, "-m", "fsa_distill.cli", "run", "-m", "finetune.seed=42,52", "workdir=work",
             "hydra/launcher=prefect", "hydra.launcher.deployment=fsa-distill/launcher-ci", "hydra.launcher.poll_s=1",
             "--wait"],
            cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        swept = time.monotonic()
        worker_logs = [log.read_text() for log in logs]
        assert sweep.returncode == 0, sweep.stderr[-3000:] + "\n".join(w[-2000:] for w in worker_logs)
        deployment, runs, claimed, gpu_tasks, gpu_limit = _deployment_and_runs("fsa-distill/launcher-ci", api)
        # a run that fails (its student checkpoint does not exist) is named, with its flow run; the other completes
        failing = subprocess.run(
            [sys.executable, "-m", "fsa_distill.cli", "run", "-m", "finetune.seed=42", "workdir=work",
             f"student.pretrained={tmp_path / 'no-such-model'},null",
             "hydra/launcher=prefect", "hydra.launcher.deployment=fsa-distill/launcher-ci", "hydra.launcher.poll_s=1",
             "--wait"],
            cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        failed_at = time.monotonic()
    _, all_runs, *_ = _deployment_and_runs("fsa-distill/launcher-ci", api)

    workdir = tmp_path / "work"
    # the deployment: module-path entrypoint, the pool, the workdir pinned, the CLI's settings as job env
    assert deployment.entrypoint == "fsa_distill.flows.pipeline.fsa_distill"
    assert deployment.work_pool_name == pool
    assert f"workdir={workdir}" in deployment.parameters["base_overrides"]
    env = deployment.job_variables["env"]
    assert env["PREFECT_LOCAL_STORAGE_PATH"] == str(workdir / "prefect" / "results")
    assert env["HF_HUB_OFFLINE"] == "1" and deployment.job_variables["working_dir"] == str(tmp_path)

    # printed: each flow run id at submission, then one summary line with the MLflow parent runs
    summary = json.loads(next(line for line in sweep.stdout.splitlines() if line.startswith('{"flow_runs"')))
    printed = summary["flow_runs"]
    assert [row["overrides"] for row in printed] == [["finetune.seed=42", "workdir=work"],
                                                     ["finetune.seed=52", "workdir=work"]]  # fmt: skip
    for row in printed:
        assert re.search(rf"^#{row['job']} .*: flow run {row['flow_run_id']}", sweep.stdout, re.M), sweep.stdout
        assert row["state"] == "COMPLETED" and row["parent_run_id"] in sweep.stdout
        assert Path(row["report"]).is_dir()  # read from the flow's result (stored under the workdir)

    # two flow runs of the deployment, both completed, overlapping in time, one per worker
    assert sorted(str(r.id) for r in runs) == sorted(row["flow_run_id"] for row in printed)
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    # in a worker's hands (claimed: Pending, its process starting; then Running) at the same time. The
    # Running spans alone are a few seconds each here, shorter than the skew of two processes importing
    # torch on two busy cores, so they need not overlap; claimed-to-end spans do unless run one by one.
    spans = [(claimed[run.id], run.end_time) for run in runs]
    assert max(start for start, _ in spans) < min(end for _, end in spans), f"ran one after the other: {spans}"
    seeds_seen = [set(re.findall(r"Overrides: .*finetune\.seed=(\d+)", log)) for log in worker_logs]
    assert sorted(seeds_seen, key=sorted) == [{"42"}, {"52"}], seeds_seen
    assert any((workdir / "prefect" / "results").iterdir())  # results where the deployment's env put them

    # the GPU gate: the GPU tag's limit is 1 and no two gpu-tagged stages ran at once, in any run
    assert gpu_limit == 1
    ran = sorted((t.start_time, t.end_time, t.name, t.flow_run_id) for t in gpu_tasks if t.start_time and t.end_time)
    assert {flow_run_id for *_, flow_run_id in ran} == {r.id for r in runs}, ran  # both runs had GPU stages
    for earlier, later in itertools.pairwise(ran):
        assert earlier[1] <= later[0], f"gpu stages overlapped: {earlier} and {later}"

    # the MLflow parent runs, with the swept values, tagged with their flow runs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("fsa-distill")
    ids = {row["flow_run_id"] for row in printed}  # not the failing sweep's
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'flow'")
    parents = [p for p in parents if p.data.tags.get("prefect.flow_run_id") in ids]
    assert sorted(p.data.params["finetune.seed"] for p in parents) == ["42", "52"]
    assert all(p.info.status == "FINISHED" for p in parents)
    by_run = {p.data.tags["prefect.flow_run_id"]: p.info.run_id for p in parents}
    assert by_run == {row["flow_run_id"]: row["parent_run_id"] for row in printed}

    # the sweep report, from the runs' results, logged beside them
    report = tmp_path / json.loads(next(x for x in sweep.stdout.splitlines() if '"sweep_report"' in x))["sweep_report"]
    assert (report / "sweep.csv").is_file() and report.is_relative_to(workdir / "hydra")
    assert client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")

    assert failing.returncode == 1, failing.stderr[-3000:]
    failed = [r for r in all_runs if r.state.is_failed()]
    assert len(all_runs) == 4 and len(failed) == 1, [r.state for r in all_runs]
    message = failing.stderr.split("1 of 2 flow runs of deployment fsa-distill/launcher-ci did not complete:", 1)[-1]
    named = re.search(rf"#0 .*student\.pretrained={tmp_path / 'no-such-model'}: flow run {failed[0].id} ended Failed",
                      message)  # fmt: skip
    assert named, failing.stderr[-3000:]
    assert "#1 " not in message  # the run that completed is not named...
    assert "partial sweep report (a job failed)" in failing.stderr  # ...and is in the sweep report
    took = {"setup and deploy": deployed - started, "sweep": swept - deployed, "failing sweep": failed_at - swept}
    print(
        "\ntimings:",
        ", ".join(f"{k} {v:.0f} s" for k, v in took.items()),
        f"(total {time.monotonic() - started:.0f} s)",
    )


def _create_process_pool(name: str, api: str) -> None:
    """`prefect work-pool create NAME --type process`, in process (the CLI takes seconds to import)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        template = ProcessWorker.get_default_base_job_template()
        client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))


def _wait_for_workers(pool: str, api: str, count: int, logs: list[Path], timeout_s: float = 60) -> None:
    """Until `count` workers poll `pool`: a sweep submitted earlier would start on one worker only."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout_s
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            workers = client.read_workers_for_work_pool(pool)
            if sum(str(w.status.value).upper() == "ONLINE" for w in workers) >= count:
                return
            time.sleep(0.5)
    raise TimeoutError("workers did not come online:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


GPU_TAG = "gpu-launcher-test"


def _deployment_and_runs(name: str, api: str) -> tuple:
    """The deployment, its flow runs, when a worker took each run (its Pending state), their task runs
    tagged `gpu`, and the `gpu` tag's concurrency limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterTags,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        claimed = {
            run.id: min((s.timestamp for s in client.read_flow_run_states(run.id) if s.is_pending()), default=None)
            for run in runs
        }
        gpu_tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in runs])),
            task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[GPU_TAG])),
        )
        limit = client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit
    return deployment, runs, claimed, gpu_tasks, limit
