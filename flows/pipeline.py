"""The fsa-distill flow: wiring only. Stages live in `tasks/`; this file passes artifact references
between them, picks the task runner and writes MLflow runs.

acquire (per dataset) -> student ──────────────────────────────────────────┐ baseline
reviews -> generate (per shard) -> clean -> pretrain (per objective) ─────┤ distill, span_corruption
                                                                          ├─> zeroshot (arm x sentiment set x seed)
                                                                          └─> finetune (arm x dataset x seed)
                                                                              -> evaluate ─┐
acquire -> teacher_fsa (dataset x k x seed) ───────────────────────────────────────────────┤
sentiment sets -> teacher_sentiment (set x seed) ──────────────────────────────────────────┴─> report
"""

import contextvars
import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import yaml
from fsa_distill.benchmark.specs import slug
from fsa_distill.flows.runs import RunTree
from fsa_distill.flows.tracking import Tracker, flatten
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.clean import clean
from fsa_distill.tasks.evaluate import evaluate
from fsa_distill.tasks.finetune import finetune
from fsa_distill.tasks.generate import generate_shard, import_released, shard_ranges
from fsa_distill.tasks.pretrain import pretrain
from fsa_distill.tasks.report import report
from fsa_distill.tasks.reviews import reviews
from fsa_distill.tasks.stage import RAN_ON, Stage
from fsa_distill.tasks.student import init_student
from fsa_distill.tasks.teacher_fsa import teacher_fsa
from fsa_distill.tasks.teacher_sentiment import teacher_sentiment
from fsa_distill.tasks.zeroshot import zeroshot
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from fsa_distill import CONF_DIR
from fsa_distill.artifacts import Artifact
from fsa_distill.config import absolute_sources, compose_config, display_name, merge_overrides, seeds
from fsa_distill.redact import redact_config, redact_text
from fsa_distill.store import open_store, store_url


def make_runner(runner: dict[str, Any], torch_threads: int = 0) -> Any:
    """The configured Prefect task runner: threads, a local Dask cluster of worker processes, or
    the running Dask scheduler at `runner.address`.

    Each local Dask worker gets `torch_threads` torch threads, or by default its share of this
    machine's (torch's thread count / `runner.workers`, at least 1): busy workers then fill the cores
    without oversubscribing them. Dask's nanny would start every worker with `OMP_NUM_THREADS=1`,
    which leaves most cores idle on a machine with more cores than workers. (Measured on 2 cores:
    two workers of 2 threads each put 4 threads on 2 cores and ran the default job far slower.)
    """
    if runner["kind"] == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.get("address"):
            _check_reachable_api(runner["address"])
            return DaskTaskRunner(address=runner["address"])
        return DaskTaskRunner(
            cluster_class=local_cluster,
            cluster_kwargs={
                "n_workers": runner["workers"],
                "torch_threads": torch_threads or max(1, _torch_threads() // max(1, runner["workers"])),
            },
        )
    return ThreadPoolTaskRunner(max_workers=runner["workers"])


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def local_cluster(n_workers: int, torch_threads: int, **kwargs: Any) -> Any:
    """A local Dask cluster of `n_workers` single-task worker processes with `torch_threads` threads each.

    The thread count goes into the nanny's pre-spawn environment: a worker process imports torch as it
    starts, so variables set after the spawn (LocalCluster's `env`) come too late.
    """
    import dask
    from distributed import LocalCluster

    threads = str(torch_threads)
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    before = {name: os.environ.get(name) for name in names}
    # the nanny prefers this process's variables to its config (and leaves its own values behind)
    os.environ.update({name: threads for name in names})
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": threads for name in names}):
            return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, **kwargs)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def gpu_limit(runner: dict[str, Any]) -> None:
    """Set the Prefect concurrency limit of the GPU tag to `runner.gpu_limit` slots (if set).

    The limit lives on the Prefect server, shared by every flow run there: parallel runs on one
    machine (a sweep's deployment runs) never start more GPU stages than it has GPUs.
    """
    if runner.get("gpu_limit") is None:
        return
    if int(runner["gpu_limit"]) < 1:
        raise ValueError("runner.gpu_limit must be at least 1 (Prefect aborts, not delays, runs at a limit of 0)")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=runner["gpu_tag"], concurrency_limit=int(runner["gpu_limit"]))


def _check_reachable_api(address: str) -> None:
    """A scheduler on another machine needs a Prefect API its workers can reach: the temporary one a
    run starts without `PREFECT_API_URL` listens on this machine's loopback only."""
    from urllib.parse import urlparse

    host = urlparse(address if "://" in address else f"tcp://{address}").hostname or ""
    local = host in ("localhost", "::1") or host.startswith("127.")
    if not local and not os.environ.get("PREFECT_API_URL"):
        raise ValueError(
            f"runner.address={address}: its workers report to Prefect, so set PREFECT_API_URL to a "
            "Prefect server they can reach (the temporary local API serves this machine only)"
        )


def _names(group: str) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


class Choices(BaseModel):
    """The common choices of a run, as form fields in the Prefect UI; anything else goes in `overrides`."""

    teacher: Literal[_names("teacher")] | None = Field(None, description="teacher config (conf/teacher/)")  # type: ignore[valid-type]
    student: Literal[_names("student")] | None = Field(None, description="student config (conf/student/)")  # type: ignore[valid-type]
    experiment: Literal[_names("experiment")] | None = Field(None, description="experiment (conf/experiment/)")  # type: ignore[valid-type]
    seeds: list[int] | None = Field(None, description="fine-tuning seeds, e.g. [42, 52, 62]")
    run_name: str | None = Field(None, description="names the Prefect flow run and the MLflow parent run")

    def overrides(self) -> list[str]:
        """The Hydra overrides these choices stand for."""
        out = [
            f"{group}={getattr(self, group)}" for group in ("teacher", "student", "experiment") if getattr(self, group)
        ]
        if self.seeds:
            out.append("finetune.seeds=[" + ",".join(str(s) for s in self.seeds) + "]")
        if self.run_name:
            out.append(f"run_name={json.dumps(self.run_name)}")
        return out


def composed_overrides(parameters: dict[str, Any]) -> list[str]:
    """A flow run's overrides: the deployment's served ones, then the form's choices, then the run's own."""
    choices = parameters.get("choices")
    if isinstance(choices, dict):
        choices = Choices(**choices)
    return merge_overrides(
        list(parameters.get("base_overrides") or []),
        choices.overrides() if choices is not None else [],
        list(parameters.get("overrides") or []),
    )


def _flow_run_name() -> str:
    """`<run_name> <overrides that change what runs>` instead of Prefect's random words."""
    from prefect.runtime import flow_run

    parameters = dict(flow_run.parameters or {})
    try:
        overrides = composed_overrides(parameters)
        config = parameters.get("config")
        run_name = config["run_name"] if isinstance(config, dict) else compose_config(overrides)["run_name"]
        return display_name(run_name, overrides)
    except Exception:  # a broken override fails the run itself, with its own message; the name must not
        return "fsa-distill"


@flow(name="fsa-distill", flow_run_name=_flow_run_name)
def fsa_distill(
    overrides: list[str] | None = None,
    choices: Choices | None = None,
    base_overrides: list[str] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every stage for one config and track it in MLflow.

    A deployment composes `base_overrides + choices + overrides` (later wins) exactly as
    `fsa-distill run` would; the CLI passes its resolved `config` (then `overrides` only name and
    record the run). Stages go to the task runner named in `runner`, chosen per run.

    Args:
        overrides: Hydra overrides for this run, e.g. ["finetune.learning_rate=0.002"]; they win over
            the deployment's served overrides and the choices.
        choices: the common choices (teacher, student, experiment, seeds, run name).
        base_overrides: the overrides the deployment was served with (`fsa-distill serve ... OVERRIDES`).
        config: a resolved config (the CLI); leave empty in the UI.
    """
    composed = composed_overrides({"overrides": overrides, "choices": choices, "base_overrides": base_overrides})
    # stages may run elsewhere (Dask or Prefect workers): relative source folders mean this directory
    cfg = absolute_sources(config if config is not None else compose_config(composed))
    if cfg["torch_threads"]:  # here rather than in the CLI, so deployment runs honour it too
        import torch

        torch.set_num_threads(cfg["torch_threads"])
    logger = get_run_logger()
    started = time.monotonic()
    name = display_name(cfg["run_name"], composed)
    logger.info("Overrides: %s", " ".join(redact_text(o) for o in composed) or "(none: the default job)")
    workdir = Path(cfg["workdir"]).resolve()
    store = store_url(cfg)
    # MLflow's artifacts follow the store: a remote store keeps them at `<url>/mlflow` (a server's
    # own artifact destination wins for tracking=server)
    mlartifacts = f"{store}/mlflow" if open_store(store).remote else workdir / "mlartifacts"
    tracker = Tracker(cfg["tracking"]["uri"], cfg["tracking"]["experiment"], mlartifacts)
    gpu_limit(cfg["runner"])
    parent = tracker.start(name, flatten("", cfg), _parent_tags(cfg, composed))
    ui = redact_text(cfg["tracking"]["ui"])
    parent_url = tracker.ui_url(ui, parent)
    logger.info("MLflow parent run %s: %s", parent, parent_url)
    create_link_artifact(
        key="mlflow-parent-run",
        link=parent_url,
        link_text=f"MLflow run {name}",
        description="The MLflow parent run of this flow run (start the MLflow UI to open it)",
    )
    shown = "\n".join(redact_text(o) for o in composed)
    create_markdown_artifact(
        key="fsa-overrides", markdown=f"```\n{shown}\n```", description="The composed overrides this run ran with"
    )
    ok = False
    wiring: Wiring | None = None
    try:
        tracker.client.log_text(parent, yaml.safe_dump(redact_config(cfg), sort_keys=False), "config.yaml")
        with make_runner(cfg["runner"], cfg["torch_threads"]) as runner:
            wiring = Wiring(cfg, runner, store, RunTree(cfg, tracker, parent))
            result = wiring.run()
        ok = True
    finally:
        tracker.end(parent, ok)
        if wiring is not None:  # also after a failure: what ran, what was cached, what failed
            stages = wiring.summary()
            elapsed = _duration(time.monotonic() - started)
            logger.info("Stages (wall time summed over each stage's tasks; the run took %s):\n%s", elapsed,
                        format_summary(stages))  # fmt: skip
            create_table_artifact(key="fsa-stages", table=stages, description="Stages: ran or cached, wall time")
        logger.info("MLflow parent run: %s", parent_url)
    logger.info("Report: %s", result["report"])
    return {**result, "stages": stages, "mlflow_url": parent_url}


def _parent_tags(cfg: dict[str, Any], composed: list[str]) -> dict[str, str]:
    """The parent run's tags: kind, student, teacher, overrides and the Prefect flow run it belongs to."""
    from prefect.runtime import flow_run

    tags = {"kind": "flow", "student": cfg["student"]["name"], "teacher": cfg["teacher"]["name"],
            "run_name": cfg["run_name"], "overrides": json.dumps([redact_text(o) for o in composed])}  # fmt: skip
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
    url = flow_run.ui_url
    if url:
        tags["prefect.flow_run_url"] = url
    return tags


def format_summary(table: list[dict[str, Any]]) -> str:
    """The end-of-run table: one line per stage with how many ran, how many were cached, wall time,
    and where the ones that ran were computed."""
    lines = [f"{'stage':<18} {'ran':>4} {'cached':>6} {'failed':>6} {'wall':>9}  where"]
    for row in table:
        counts = f"{row['ran']:>4} {row['cached']:>6} {row['failed']:>6}"
        lines.append(f"{row['stage']:<18} {counts} {_duration(row['wall_s']):>9}  {row.get('where', '')}".rstrip())
    return "\n".join(lines)


def _where(artifact: Artifact) -> str:
    """Where an output was computed, from its `measured/ran_on.json`: a Dask worker, this process,
    or another process (host:pid); "" for an output written before it was recorded."""
    try:
        found = json.loads((Path(artifact.path) / RAN_ON).read_text())
    except (OSError, ValueError):
        return ""
    if found.get("dask_worker") is not None:
        return f"worker {found['dask_worker']}"
    if found.get("pid") == os.getpid() and found.get("host") == socket.gethostname():
        return "flow process"
    return f"{found.get('host')}:{found.get('pid')}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


_log = logging.getLogger("fsa_distill.flow")


class _Cancelled(Exception):
    """Another branch of the DAG failed: work not yet submitted is not started."""


class Wiring:
    """Submits each stage as soon as its inputs exist; flows only wire, stages own their params.

    Every branch of the DAG (a dataset's acquisition, the teacher corpus, one fine-tuning and its
    evaluation) runs in a driver thread that waits only for its own inputs. Slots, not locks in
    worker threads, decide what is submitted: at most `runner.workers` stages in flight, trainings
    one at a time with the thread runner (transformers' Trainer state is per process) and one per
    worker with Dask, and teacher generation on at most `workers - 1` of them, so a baseline
    fine-tuning starts while the teacher is still generating. A worker thread never waits on a lock
    while runnable work waits behind it.
    """

    def __init__(self, cfg: dict[str, Any], runner: Any, store: str, tree: RunTree) -> None:
        self.cfg, self.runner, self.store, self.tree = cfg, runner, store, tree
        self.records: list[tuple[str, str, str, float]] = []  # (stage, label, final state, wall seconds)
        workers = max(1, int(cfg["runner"]["workers"]))
        self.slots = threading.BoundedSemaphore(workers)
        self.train_slots = threading.BoundedSemaphore(workers if cfg["runner"]["kind"] == "dask" else 1)
        self.generate_slots = threading.BoundedSemaphore(max(1, workers - 1))
        self.failed = threading.Event()
        self.error: BaseException | None = None  # the first real failure, raised by the flow
        self._lock = threading.Lock()
        # Driver threads mostly wait: the pool must never be the limit (a thread blocked on an
        # upstream result must not keep the stage it waits for from starting).
        self.pool = ThreadPoolExecutor(max_workers=100_000, thread_name_prefix="fsa-dag")
        self.futures: list[Future] = []

    def spawn(self, fn: Any, *args: Any) -> Future:
        """Run a DAG branch in a driver thread that sees the flow run's context."""
        ctx = contextvars.copy_context()

        def guarded() -> Any:
            try:
                return ctx.run(fn, *args)
            except _Cancelled:
                raise
            except BaseException as exc:
                with self._lock:
                    if self.error is None:
                        self.error = exc
                        _log.error("%s: %s; stages not yet started are cancelled", type(exc).__name__, exc)
                self.failed.set()
                raise

        future = self.pool.submit(guarded)
        self.futures.append(future)
        return future

    def wait(self) -> None:
        """Wait for every branch; on the first failure, raise it (never a branch cancelled because of it)."""
        while True:
            pending = [f for f in self.futures if not f.done()]
            if self.failed.is_set() or not pending:
                break
            wait(pending, return_when=FIRST_EXCEPTION)
        if self.error is not None:
            raise self.error

    def call(self, stage: Stage, label: str, lane: threading.Semaphore | None = None, **inputs: Any) -> Artifact:
        """Submit one stage when a slot (and its lane's slot) is free; its output, bound to the store."""
        return self.call_live(stage, label, lane, None, **inputs)[0]

    def call_live(
        self,
        stage: Stage,
        label: str,
        lane: threading.Semaphore | None,
        live: Callable[[], str] | None,
        **inputs: Any,
    ) -> tuple[Artifact, str | None]:
        """`call`, and when the stage will really run, first `live()`: an MLflow run it streams into."""
        params = stage.params(self.cfg, **inputs)
        with lane or nullcontext(), self.slots:
            if self.failed.is_set():
                raise _Cancelled(f"{stage.name}[{label}] not started: another stage failed")
            run_id = live() if live is not None and stage.cached(self.store, params) is None else None
            start = time.monotonic()
            try:
                future = stage.submit(
                    self.runner, self.store, params, label=label, observe=self.tree.observe(run_id),
                    tags=self._tags(stage),
                )  # fmt: skip
                artifact = open_store(self.store).local(future.result())
            except BaseException:
                self.tree.fail(run_id)
                self._record(stage.name, label, "Failed", time.monotonic() - start)
                raise
            state = future.state.name
            where = "" if state == "Cached" else _where(artifact)
            self._record(stage.name, label, state, time.monotonic() - start, where)
        return artifact, run_id

    def _tags(self, stage: Stage) -> list[str]:
        """The GPU tag for stages that use an accelerator: training, the student's inference, and a
        teacher that runs here (transformers, vLLM); never an API teacher or a data stage."""
        local_teacher = self.cfg["teacher"]["backend"] in ("transformers", "vllm")
        teacher_stages = {generate_shard.name, teacher_fsa.name, teacher_sentiment.name}
        students = {pretrain.name, finetune.name, evaluate.name, zeroshot.name}
        uses_gpu = stage.name in students or (local_teacher and stage.name in teacher_stages)
        return [self.cfg["runner"]["gpu_tag"]] if uses_gpu else []

    def _record(self, stage: str, label: str, state: str, wall_s: float, where: str = "") -> None:
        with self._lock:
            self.records.append((stage, label, state, wall_s, where))

    def summary(self) -> list[dict[str, Any]]:
        """Per stage, in the order stages first finished: how many ran, were cached or failed, wall
        time, and where the ones that ran were computed (`worker 0 x3, worker 1 x2`)."""
        rows: dict[str, dict[str, Any]] = {}
        places: dict[str, Counter[str]] = {}
        with self._lock:
            records = list(self.records)
        for stage, _label, state, wall_s, where in records:
            row = rows.setdefault(stage, {"stage": stage, "ran": 0, "cached": 0, "failed": 0, "wall_s": 0.0})
            kind = "cached" if state == "Cached" else "failed" if state == "Failed" else "ran"
            row[kind] += 1
            row["wall_s"] += wall_s
            if where:
                places.setdefault(stage, Counter())[where] += 1
        return [
            {**row, "wall_s": round(row["wall_s"], 1),
             "where": ", ".join(f"{w} x{n}" for w, n in sorted(places.get(name, Counter()).items()))}
            for name, row in rows.items()
        ]  # fmt: skip

    def run(self) -> dict[str, Any]:
        """Wire the whole DAG, wait for it, then report; MLflow children are written as results land."""
        try:
            return self._run()
        finally:
            self.failed.set()  # whatever ended the run (an error, Ctrl-C), start nothing more
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        datasets = cfg["data"]["datasets"]
        acquired = {d: self.spawn(lambda d=d: self.call(acquire, slug(d), dataset=d)) for d in datasets}

        def data() -> list[Artifact]:
            return [acquired[d].result() for d in datasets]

        student = self.spawn(lambda: self.call(init_student, cfg["student"]["name"], datasets=data()))
        arms: dict[str, Future] = {"baseline": student}
        corpus: Future | None = None
        if cfg["distill"]["enabled"]:
            corpus = self.spawn(self._corpus, data)
            for objective in cfg["pretrain"]["objectives"]:
                arms[objective] = self.spawn(self._pretrain, student, corpus, objective)
        runs = [(arm, name, seed) for arm in arms for name in datasets for seed in seeds(cfg)]
        jobs = {run: self.spawn(self._finetune_and_evaluate, arms[run[0]], acquired[run[1]], *run) for run in runs}
        teacher_jobs, sentiment_jobs = self._evaluations(arms, acquired, corpus)
        self.wait()
        done = {run: job.result() for run, job in jobs.items()}
        teacher_done = {run: job.result() for run, job in teacher_jobs.items()}
        sentiment_done = {run: job.result() for run, job in sentiment_jobs.items()}
        built = corpus.result() if corpus is not None else None
        arm_models = {arm: future.result() for arm, future in arms.items()}

        evaluations = {run: pair[1] for run, pair in done.items()} | teacher_done
        results = [{"student": m, "dataset": d, "seed": s, "evaluation": ev} for (m, d, s), ev in evaluations.items()]
        sentiment = [
            {"student": m, "dataset": d, "seed": s, "evaluation": ev} for (m, d, s), ev in sentiment_done.items()
        ]
        summary_art = self.call(
            report, "summary", results=results, corpus=built["corpus"] if built else None, sentiment=sentiment
        )
        self.tree.finish(Path(summary_art.path))
        return {
            "parent_run_id": self.tree.parent,
            "report": summary_art.path,
            "evaluations": {_label(*run): done[run][1].path for run in runs},
            "arms": {arm: art.path for arm, art in arm_models.items()},
            "reused_runs": dict(self.tree.reused),
        }

    def _evaluations(
        self, arms: dict[str, Future], acquired: dict[str, Future], corpus: Future | None
    ) -> tuple[dict[tuple[str, str, int], Future], dict[tuple[str, str, int], Future]]:
        """The teacher in context on the benchmark, and every model on the sentiment sets.

        Students are classified zero-shot as soon as their arm exists (after pretraining, before
        fine-tuning). The teacher's evaluations use the generation lane after the teacher has
        generated the corpus, so they never delay the distillation path.
        """
        cfg, te, zs = self.cfg, self.cfg["teacher_eval"], self.cfg["zeroshot"]
        has_teacher = cfg["teacher"]["backend"] != "released"  # released outputs come without a model

        def after_corpus() -> None:
            if corpus is not None:
                corpus.result()

        def teacher_fsa_job(name: str, k: int, seed: int) -> Artifact:
            after_corpus()
            data = acquired[name].result()
            art = self.call(teacher_fsa, f"k{k}-{slug(name)}-{seed}", self.generate_slots, data=data, k=k, seed=seed)
            self.tree.teacher(f"teacher-k{k}", name, seed, data, art)
            return art

        def teacher_sentiment_job(dataset: str, seed: int) -> Artifact:
            after_corpus()
            return self.call(teacher_sentiment, f"{dataset}-{seed}", self.generate_slots, dataset=dataset, seed=seed)

        def zeroshot_job(arm: str, dataset: str, seed: int) -> Artifact:
            return self.call(zeroshot, f"{arm}-{dataset}-{seed}", model=arms[arm].result(), dataset=dataset, seed=seed)

        teacher: dict[tuple[str, str, int], Future] = {}
        sentiment: dict[tuple[str, str, int], Future] = {}
        if te["enabled"] and has_teacher:
            for name in cfg["data"]["datasets"]:
                for k in te["k"]:
                    for seed in te["seeds"]:
                        teacher[(f"teacher-k{k}", name, seed)] = self.spawn(teacher_fsa_job, name, k, seed)
        if zs["enabled"]:
            for dataset in zs["datasets"]:
                for seed in zs["seeds"]:
                    for arm in arms:
                        sentiment[(arm, dataset, seed)] = self.spawn(zeroshot_job, arm, dataset, seed)
                    if zs["teacher"] and has_teacher:
                        key = (f"teacher-k{zs['k']}", dataset, seed)
                        sentiment[key] = self.spawn(teacher_sentiment_job, dataset, seed)
        by_model: dict[str, dict[tuple[str, str, int], Future]] = {}
        for key, future in sentiment.items():
            by_model.setdefault(key[0], {})[key] = future
        for jobs in by_model.values():  # a model's zero-shot child as soon as its sets are scored
            self.spawn(lambda jobs=jobs: self.tree.zeroshot({key: future.result() for key, future in jobs.items()}))
        return teacher, sentiment

    def _pretrain(self, student: Future, corpus: Future, objective: str) -> Artifact:
        built = corpus.result()["corpus"]
        params, tags = self.tree.pretrain_tags(objective)
        model, run_id = self.call_live(
            pretrain, objective, self.train_slots,
            lambda: self.tree.live("pretrain", f"pretrain-{objective}", params, tags),
            student=student.result(), corpus=built, objective=objective,
        )  # fmt: skip
        self.tree.pretrain(objective, built, model, run_id, streamed=run_id is not None)
        return model

    def _finetune_and_evaluate(
        self, arm_model: Future, data: Future, arm: str, name: str, seed: int
    ) -> tuple[Artifact, Artifact]:
        label = _label(arm, name, seed)
        dataset = data.result()
        params, tags = self.tree.finetune_tags(arm, name, seed)
        model, run_id = self.call_live(
            finetune, label, self.train_slots, lambda: self.tree.live("finetune", label, params, tags),
            data=dataset, student=arm_model.result(), seed=seed,
        )  # fmt: skip
        try:
            evaluation = self.call(evaluate, label, model=model, data=dataset)
        except BaseException:
            self.tree.fail(run_id)
            raise
        self.tree.finetune(label, arm, name, seed, dataset, model, evaluation, run_id, streamed=run_id is not None)
        return model, evaluation

    def _corpus(self, data: Any) -> dict[str, Any]:
        """reviews -> teacher generation (sharded) -> clean, or the released outputs -> clean."""
        cfg, teacher = self.cfg, self.cfg["teacher"]
        raw = None
        if teacher["backend"] == "released":
            generations = [self.call(import_released, teacher["name"])]
        else:
            raw = self.call(reviews, "mirror")
            ranges = shard_ranges(Path(raw.path) / "reviews.parquet", cfg["prompts"], teacher)
            shards = [
                self.spawn(
                    lambda k=k, r=r: self.call(
                        generate_shard, f"{teacher['name']}-{k}", self.generate_slots, reviews=raw, pairs=r
                    )
                )
                for k, r in enumerate(ranges)
            ]
            generations = [future.result() for future in shards]
        corpus = self.call(clean, "corpus", generations=generations, datasets=data())
        self.tree.corpus(generations, corpus, raw)
        return {"corpus": corpus, "generations": generations, "reviews": raw}


def _label(arm: str, dataset: str, seed: int) -> str:
    return f"{arm}-{slug(dataset)}-{seed}"
