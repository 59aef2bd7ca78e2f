"""Sweeps as parallel deployment runs: the work behind `hydra/launcher=prefect`, and `fsa-distill deploy`.

A multirun launched with `hydra/launcher=prefect` runs nothing in the calling process. Every job
becomes one flow run of a Prefect deployment (`run_deployment(..., timeout=0, as_subflow=False)`)
with the job's overrides as the run's `overrides`; the deployment's `base_overrides` stay under
them, exactly as for any other run of the deployment. Workers polling the deployment's work pool
run the jobs in parallel. The command prints each flow run's id; with `wait` it then follows the
runs to their end, prints each one's MLflow parent run, and fails naming every run that did not
complete. Every job is composed here first (the deployment's overrides + the job's), so a typo
fails the sweep before any run is submitted.

The sweep report (`fsa_distill.sweep.SweepReport`) gets the same job callbacks as with Hydra's
basic launcher, but only with `wait`: when all runs are final, each job's result (the flow's own
return value, read from Prefect's result storage, else the MLflow link the flow attached to its
run) is written to `<job dir>/result.json` and the job's `on_job_start`/`on_job_end` fire then.
Without `wait` there are no results to report: the jobs' folders hold `flow_run.json` only.

`deploy` registers the flow on a work pool with a module-path entrypoint (no image, no code
storage: the worker machines have the project installed). Flow runs a worker starts never pass
through the CLI's environment set-up (`fsa_distill.env.configure`), so the deployment carries
what it sets as job variables (`env`), the workdir as an absolute override, and the directory the
deployment was made in as the runs' working directory.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import CompactHydraException

from fsa_distill.config import merge_overrides

if TYPE_CHECKING:
    from hydra.core.utils import JobReturn
    from omegaconf import DictConfig
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import DeploymentResponse

    from hydra_plugins.fsa_distill_launcher.prefect_launcher import PrefectLauncher

#: Overrides naming local folders: sent as absolute paths, so they mean on a worker (another working
#: directory, maybe another machine) what they meant where the sweep was started.
PATH_KEYS = ("workdir", "data.source", "reviews.root", "sentiment.source")
#: Environment variables a deployment passes to its runs besides `configure`'s defaults...
PASSED_PREFIXES = ("FSA_", "HF_", "MLFLOW_", "FSSPEC_", "PREFECT_LOGGING_")
#: The data folders set by environment (as `data.source` and friends): made absolute for the runs.
SOURCE_VARIABLES = ("FSA_DATA_SOURCE", "FSA_REVIEWS_ROOT", "FSA_SENTIMENT_SOURCE")
#: ...except credentials: job variables are stored in Prefect's database and shown in its UI.
SECRET_NAME = re.compile(
    r"(^|_)(KEYS?|APIKEY|SECRETS?|TOKENS?|PASSWORD|PASS|CREDENTIALS?|AUTH|KWARGS|CONNECTION_STRING)(_|$)"
    # fsspec reads a whole protocol's keywords, credentials included, from FSSPEC_<PROTOCOL> (JSON)
    r"|^FSSPEC_[A-Z0-9]+$",
    re.IGNORECASE,
)
#: A URL with a password in it (`https://user:pass@host`), e.g. in MLFLOW_TRACKING_URI.
SECRET_VALUE = re.compile(r"://[^/@\s]+:[^/@\s]+@")
#: The link artifact the flow attaches to its run (flows/pipeline.py): the fallback for its result.
PARENT_LINK_KEY = "mlflow-parent-run"


class LaunchError(CompactHydraException):
    """The sweep cannot be submitted or followed (no server, no deployment, a timeout).

    A compact Hydra error: the command prints the message, not a traceback through Hydra.
    """


class FlowRunsFailed(CompactHydraException):
    """Some flow runs of the sweep ended in a state other than Completed; the message names them all."""


@dataclass
class Job:
    """One job of the sweep: what was sent, where its Hydra folder is, and its flow run."""

    num: int
    overrides: list[str]  # as Hydra expanded them
    sent: list[str]  # as sent to the deployment (local folders absolute)
    config: DictConfig  # the job's Hydra config, composed here as the basic launcher would
    facts: dict[str, Any]  # workdir and tracking as the deployment composes them
    flow_run_id: Any = None
    url: str | None = None
    final: FlowRun | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        from hydra.core.utils import filter_overrides

        return f"#{self.num} {' '.join(filter_overrides(self.overrides)) or '(no overrides)'}"

    @property
    def out_dir(self) -> Path:
        sweep = self.config.hydra.sweep
        return Path(str(sweep.dir)) / str(sweep.subdir)


def require_api() -> str:
    """The Prefect API URL; workers can reach only a real server, never a per-process temporary one."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise LaunchError(
            "hydra/launcher=prefect and `fsa-distill deploy` need a Prefect server that the workers also use: "
            "set PREFECT_API_URL (e.g. `prefect server start --host 127.0.0.1` then "
            "PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    return url


def read_deployment(client: SyncPrefectClient, name: str) -> DeploymentResponse:
    """The deployment `<flow>/<deployment>`, or an error that lists the ones there are."""
    from prefect.exceptions import ObjectNotFound

    if name.count("/") != 1:
        raise LaunchError(f"hydra.launcher.deployment={name!r}: give <flow>/<deployment>, e.g. fsa-distill/default")
    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        pass
    except Exception as exc:  # the server is down or unreachable: say where we looked
        raise LaunchError(f"cannot read deployment {name!r} from the Prefect API at {client.api_url}: {exc}") from exc
    flows = {f.id: f.name for f in client.read_flows()}
    known = sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())
    deployment = name.split("/", 1)[1]
    raise LaunchError(
        f"deployment {name!r} not found on the Prefect API at {client.api_url} "
        f"(there: {', '.join(known) or 'none'}); create it with "
        f"`fsa-distill deploy --pool POOL --name {deployment}` or name another one with "
        "hydra.launcher.deployment=<flow>/<deployment>"
    )


def _quote(value: str) -> str:
    """A Hydra override value: quoted unless plainly safe."""
    if re.fullmatch(r"[\w./~-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sent_overrides(overrides: Sequence[str], cwd: Path | None = None) -> list[str]:
    """The job's overrides as sent to the deployment: relative local folders (`PATH_KEYS`) made absolute.

    A flow run on a worker starts in another directory, maybe on another machine: `workdir=runs`
    must name the folder it named where the sweep was started. URLs and `${...}` are left alone.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    base = Path.cwd() if cwd is None else cwd
    out = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        value = override.value()
        if (
            override.key_or_group in PATH_KEYS
            and override.type != OverrideType.DEL
            and isinstance(value, str)
            and value
            and "://" not in value
            and "${" not in value
            and not Path(value).expanduser().is_absolute()
        ):
            path = (base / Path(value).expanduser()).resolve()
            out.append(f"{override.get_key_element()}={_quote(str(path))}")
        else:
            out.append(override.input_line or "")
    return out


def _compose(launcher: PrefectLauncher, overrides: list[str]) -> DictConfig:
    """A job's config as Hydra composes it in this multirun (the hydra node included)."""
    assert launcher.hydra_context is not None and launcher.config is not None
    return launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)


def _facts(launcher: PrefectLauncher, base: list[str], sent: list[str]) -> dict[str, Any]:
    """Compose the job as the deployment will (its base overrides, then the job's) and validate it.

    Runs before anything is submitted: an unknown key or dataset fails the sweep, not N flow runs.
    """
    from omegaconf import open_dict

    from fsa_distill.config import to_plain

    composed = _compose(launcher, merge_overrides(base, sent))
    with open_dict(composed):
        del composed["hydra"]
    plain = to_plain(composed)
    return {
        "workdir": str(Path(plain["workdir"]).expanduser().resolve()),
        "tracking_uri": plain["tracking"]["uri"],
        "experiment": plain["tracking"]["experiment"],
    }


def _warn_without_workers(client: SyncPrefectClient, deployment: DeploymentResponse) -> None:
    """Runs on a pool with no worker stay Scheduled: say so now rather than wait in silence."""
    pool = deployment.work_pool_name
    if not pool:
        return  # a served deployment (`fsa-distill serve`): its serve process runs it
    try:
        workers = client.read_workers_for_work_pool(pool)
    except Exception:  # a pool we cannot read is the server's problem to report on submission
        return
    if not any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers):
        print(
            f"warning: no worker is polling work pool {pool!r}: the runs stay Scheduled until one starts "
            f"(`prefect worker start --pool {pool}`)",
            file=sys.stderr,
        )


def launch(launcher: PrefectLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Submit every job as a flow run of `launcher.deployment`; with `launcher.wait`, collect them."""
    from hydra.core.utils import setup_globals
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    setup_globals()
    require_api()
    with get_client(sync_client=True) as client:
        deployment = read_deployment(client, launcher.deployment)
        base = list((deployment.parameters or {}).get("base_overrides") or [])
        jobs = []
        for offset, overrides in enumerate(job_overrides):
            num = initial_job_idx + offset
            sent = sent_overrides(overrides)
            try:
                facts = _facts(launcher, base, sent)
            except (ValueError, OmegaConfBaseException) as exc:  # validate()'s checks; Hydra's own are compact
                shown = " ".join(merge_overrides(base, sent))
                raise LaunchError(f"job #{num} ({shown}) cannot run, nothing was submitted: {exc}") from exc
            config = _compose(launcher, list(overrides))
            with open_dict(config):
                config.hydra.job.id = num
                config.hydra.job.num = num
            jobs.append(Job(num, list(overrides), sent, config, facts))
        _warn_without_workers(client, deployment)
        pool = f" on work pool {deployment.work_pool_name!r}" if deployment.work_pool_name else ""
        print(f"Submitting {len(jobs)} flow runs of deployment {launcher.deployment}{pool}", file=sys.stderr)
        for job in jobs:
            flow_run = run_deployment(
                launcher.deployment,
                parameters={"overrides": job.sent},
                timeout=0,
                as_subflow=False,
                job_variables=dict(launcher.job_variables) or None,
            )
            job.flow_run_id, job.url = flow_run.id, _ui_url(flow_run)
            job.out_dir.mkdir(parents=True, exist_ok=True)
            (job.out_dir / "flow_run.json").write_text(json.dumps(_row(job), indent=1))
            print(f"{job.label}: flow run {flow_run.id}" + (f" {job.url}" if job.url else ""), flush=True)
        if not launcher.wait:
            print(json.dumps({"flow_runs": [_row(job) for job in jobs]}), flush=True)
            print(
                "Submitted; not waiting (add --wait, or hydra.launcher.wait=true, to wait for the MLflow runs "
                "and the sweep report). Follow them with `prefect flow-run inspect ID` or in the Prefect UI.",
                file=sys.stderr,
            )
            return [_submitted_return(job) for job in jobs]
        _wait(client, jobs, launcher.poll_s, launcher.timeout_s)
        returns = _collect(launcher, jobs)
    print(json.dumps({"flow_runs": [_row(job) for job in jobs]}), flush=True)
    return returns


def _submitted_return(job: Job) -> JobReturn:
    """A job that was only submitted: it "completed" as far as Hydra is concerned, returning its flow run."""
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=job.overrides, cfg=job.config, status=JobStatus.COMPLETED)
    ret.return_value = {"flow_run_id": str(job.flow_run_id), "url": job.url}
    return ret


def _ui_url(flow_run: FlowRun) -> str | None:
    from prefect.utilities.urls import url_for

    try:
        return url_for(flow_run)
    except Exception:  # no UI configured
        return None


def _state(job: Job) -> str:
    if job.final is not None and job.final.state is not None:
        return job.final.state.type.value
    return "SCHEDULED"


def _row(job: Job) -> dict[str, Any]:
    """A job's line in the `{"flow_runs": [...]}` summary the command prints last."""
    row = {
        "job": job.num,
        "overrides": job.overrides,
        "flow_run_id": str(job.flow_run_id) if job.flow_run_id else None,
        "flow_run_url": job.url,
        "state": _state(job),
    }
    if job.final is not None:
        row["flow_run_name"] = job.final.name
        row.update({k: job.result.get(k) for k in ("parent_run_id", "mlflow_url", "report")})
    return row


def _wait(client: SyncPrefectClient, jobs: list[Job], poll_s: float, timeout_s: float | None) -> None:
    """Poll the flow runs until all are final, printing each one (and its MLflow parent run) as it ends."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    pending = {job.flow_run_id: job for job in jobs}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while pending:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending))))
            for run in runs:
                if run.state is None or not run.state.is_final():
                    continue
                job = pending.pop(run.id)
                job.final = run
                job.result = flow_result(client, run)
                _print_final(job)
            if not pending:
                return
            if deadline is not None and time.monotonic() > deadline:
                left = ", ".join(f"{job.label} ({job.flow_run_id})" for job in pending.values())
                raise LaunchError(f"hydra.launcher.timeout_s={timeout_s} passed; still running (they go on): {left}")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        left = " ".join(str(job.flow_run_id) for job in pending.values())
        print(f"\nStopped waiting; the flow runs go on. Cancel them with `prefect flow-run cancel ID`: {left}",
              file=sys.stderr)  # fmt: skip
        raise


def _print_final(job: Job) -> None:
    assert job.final is not None and job.final.state is not None
    state = job.final.state
    took = job.final.total_run_time.total_seconds() if job.final.total_run_time else 0.0
    line = f"{job.label}: {state.name} after {took:.0f} s (flow run {job.flow_run_id})"
    if job.result.get("parent_run_id"):
        line += f"; MLflow parent run {job.result['parent_run_id']}: {job.result.get('mlflow_url')}"
    elif not state.is_completed() and state.message:
        line += f": {state.message}"
    print(line, flush=True)


def flow_result(client: SyncPrefectClient, flow_run: FlowRun) -> dict[str, Any]:
    """What a finished run returned: `parent_run_id`, `mlflow_url`, `report`, `stages` where readable.

    The flow's return value is read from Prefect's result storage (on a shared filesystem or a
    remote store); where this machine cannot read it, the MLflow link the flow attached to its run
    (artifact `mlflow-parent-run`) still gives the parent run. A `report` folder that is not on
    this machine is dropped: the sweep report reads its files.
    """
    result: dict[str, Any] = {}
    state = flow_run.state
    if state is not None and state.is_completed():
        try:
            value = state.result(raise_on_failure=False, retry_result_failure=False)
        except Exception as exc:  # not readable here: stored on the workers' machines
            print(f"note: flow run {flow_run.id}'s result is not readable here ({exc})", file=sys.stderr)
        else:
            if isinstance(value, dict):
                result = {k: value[k] for k in ("parent_run_id", "mlflow_url", "report", "stages") if k in value}
    if not result.get("parent_run_id"):
        result.update(_parent_link(client, flow_run.id))
    if result.get("report") and not Path(result["report"]).is_dir():
        print(f"note: report {result['report']} (flow run {flow_run.id}) is not on this machine", file=sys.stderr)
        result["report"] = None
    return result


def _parent_link(client: SyncPrefectClient, flow_run_id: Any) -> dict[str, Any]:
    """The MLflow parent run from the link artifact the flow created (it exists once the flow started)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    try:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PARENT_LINK_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    except Exception:
        return {}
    for artifact in artifacts:
        link = re.search(r"\]\((\S+?)\)", str(artifact.data or ""))
        if link:
            run = re.search(r"/runs/([0-9a-f]{32})", link.group(1))
            return {"mlflow_url": link.group(1), "parent_run_id": run.group(1) if run else None}
    return {}


def _failure_message(launcher: PrefectLauncher, failed: list[Job], total: int) -> str:
    lines = [f"{len(failed)} of {total} flow runs of deployment {launcher.deployment} did not complete:"]
    for job in failed:
        assert job.final is not None and job.final.state is not None
        state = job.final.state
        why = f": {state.message}" if state.message else ""
        where = f" {job.url}" if job.url else ""
        lines.append(f"  {job.label}: flow run {job.flow_run_id} ended {state.name}{why}{where}")
    lines.append("Their logs: `prefect flow-run logs ID` or the Prefect UI.")
    return "\n".join(lines)


def _collect(launcher: PrefectLauncher, jobs: list[Job]) -> list[JobReturn]:
    """Each finished run as a Hydra job: its folder, `result.json`, the job callbacks (the sweep report)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job

    assert launcher.hydra_context is not None
    failed = [job for job in jobs if job.final is None or job.final.state is None or not job.final.state.is_completed()]
    error = FlowRunsFailed(_failure_message(launcher, failed, len(jobs))) if failed else None
    returns = {}
    # completed jobs first: the sweep report written when a failed job ends then has all of them
    for job in sorted(jobs, key=lambda job: job in failed):

        def collect(_cfg: Any, job: Job = job) -> dict[str, Any]:
            out_dir = Path(HydraConfig.get().runtime.output_dir)
            # the flow's facts (where its MLflow runs are), so the sweep report logs beside them
            record = {**job.result, **job.facts, "flow_run_id": str(job.flow_run_id), "state": _state(job)}
            (out_dir / "result.json").write_text(json.dumps(record, default=str))
            if job in failed:
                assert error is not None
                raise error
            return record

        returns[job.num] = run_job(
            hydra_context=launcher.hydra_context,
            task_function=collect,
            config=job.config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    return [returns[job.num] for job in jobs]


def flow_env(workdir: Path) -> dict[str, str]:
    """The environment a deployment gives its flow runs: what `fsa_distill.env.configure` sets for the CLI.

    Runs a worker starts never go through the CLI, so `configure`'s defaults (results under the
    workdir, no telemetry, the hub offline) are computed here in a scratch environment; a value set
    in this process wins, as it would with the CLI. `FSA_*`, `HF_*`, `MLFLOW_*` and `FSSPEC_*`
    settings of this process go along too, credentials never (job variables are stored in Prefect's
    database): give workers those in their own environment.
    """
    import subprocess

    # in a fresh process with an empty environment, so this one's stays as it is; PREFECT_API_URL
    # set so that `configure` leaves PREFECT_HOME (a per-process temporary folder) alone
    script = (
        "import json, os, sys; from fsa_distill.env import configure; before = dict(os.environ); "
        "configure(sys.argv[1]); print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(workdir)],
        env={"PREFECT_API_URL": "http://127.0.0.1/api"},
        capture_output=True,
        text=True,
        check=True,
    )
    defaults = json.loads(out.stdout.strip().splitlines()[-1])
    env = {key: os.environ.get(key, value) for key, value in defaults.items()}
    for key, value in os.environ.items():
        if key.startswith(PASSED_PREFIXES) and not SECRET_NAME.search(key) and not SECRET_VALUE.search(value):
            env[key] = value
    for key in SOURCE_VARIABLES:  # runs start in another directory: a relative folder means this one
        if env.get(key) and "://" not in env[key] and not Path(env[key]).is_absolute():
            env[key] = str(Path(env[key]).resolve())
    return env


def deploy(
    pool: str,
    name: str,
    overrides: list[str],
    working_dir: Path | None,
    env: dict[str, str] | None = None,
    image: str | None = None,
    job_variables: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register the flow as deployment `fsa-distill/<name>` on work pool `pool`; return what was registered.

    The entrypoint is the module path `fsa_distill.flows.pipeline.fsa_distill`: no code storage,
    the workers (or the pool's `image`, one of `docker/`) have the project installed. `overrides`
    become the deployment's `base_overrides`, with the workdir pinned as an absolute path; `env`
    adds environment variables; `image` and `job_variables` (e.g. `network_mode`, `volumes` for a
    Docker pool) are checked against the pool's job template, so a typo fails here, not in a run.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound

    from fsa_distill.config import compose_config

    api = require_api()
    cfg = compose_config(overrides)  # fails here, not in every run, on a typo
    workdir = Path(cfg["workdir"]).expanduser().resolve()
    base = merge_overrides(sent_overrides(overrides), [f"workdir={_quote(str(workdir))}"])
    with get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(pool)
        except ObjectNotFound:
            raise LaunchError(
                f"work pool {pool!r} not found on the Prefect API at {api}: create it with "
                f"`prefect work-pool create {pool} --type process`, then start workers with "
                f"`prefect worker start --pool {pool}`"
            ) from None
    variables: dict[str, Any] = {"env": {**flow_env(workdir), **(env or {})}, **(job_variables or {})}
    if image is not None:
        variables["image"] = image
    known = set((work_pool.base_job_template.get("variables") or {}).get("properties") or {})
    unknown = sorted(set(variables) - known - {"env"})
    if unknown:
        raise LaunchError(
            f"work pool {pool!r} ({work_pool.type}) has no job variable {', '.join(unknown)}; "
            f"its job variables: {', '.join(sorted(known))}"
        )
    if working_dir is not None:
        if work_pool.type == "process":
            variables["working_dir"] = str(working_dir.resolve())
        else:
            print(f"note: work pool {pool!r} is of type {work_pool.type}: no working directory set", file=sys.stderr)
    from fsa_distill.flows.pipeline import fsa_distill

    runner_deployment = fsa_distill.to_deployment(
        name,
        work_pool_name=pool,
        parameters={"base_overrides": base},
        job_variables=variables,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    deployment_id = runner_deployment.apply()
    return {
        "deployment": f"{fsa_distill.name}/{name}",
        "id": str(deployment_id),
        "work_pool": pool,
        "pool_type": work_pool.type,
        "entrypoint": runner_deployment.entrypoint,
        "base_overrides": base,
        "job_variables": variables,
    }
