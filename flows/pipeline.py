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

from __future__ import annotations

import contextvars
import json
import logging
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml
from fsa_distill.benchmark.specs import slug
from fsa_distill.flows.tracking import Tracker, flatten, git_commit, numeric
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.clean import clean
from fsa_distill.tasks.evaluate import evaluate, read_metrics
from fsa_distill.tasks.finetune import finetune
from fsa_distill.tasks.generate import generate_shard, import_released, shard_ranges
from fsa_distill.tasks.pretrain import pretrain
from fsa_distill.tasks.report import report
from fsa_distill.tasks.reviews import reviews
from fsa_distill.tasks.stage import Stage
from fsa_distill.tasks.student import init_student
from fsa_distill.tasks.teacher_fsa import teacher_fsa
from fsa_distill.tasks.teacher_sentiment import teacher_sentiment
from fsa_distill.tasks.zeroshot import zeroshot
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from fsa_distill.artifacts import Artifact
from fsa_distill.config import compose_config, seeds
from fsa_distill.models import read_log
from fsa_distill.redact import redact_config


def make_runner(runner: dict[str, Any]) -> Any:
    """The configured Prefect task runner: threads, or a local Dask cluster of worker processes."""
    if runner["kind"] == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(
            cluster_kwargs={"n_workers": runner["workers"], "threads_per_worker": 1, "processes": True}
        )
    return ThreadPoolTaskRunner(max_workers=runner["workers"])


@flow(name="fsa-distill")
def fsa_distill(overrides: list[str] | None = None, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every stage for one config and track it in MLflow.

    The CLI passes the resolved `config`; a deployment passes Hydra `overrides` and the flow
    composes them, so both run exactly the same thing. Stages go to the task runner named in
    `runner` (threads or a Dask cluster), chosen per run rather than per deployment.
    """
    cfg = config if config is not None else compose_config(overrides)
    if cfg["torch_threads"]:  # here rather than in the CLI, so deployment runs honour it too
        import torch

        torch.set_num_threads(cfg["torch_threads"])
    logger = get_run_logger()
    workdir = Path(cfg["workdir"]).resolve()
    store = workdir / "artifacts"
    tracker = Tracker(cfg["tracking"]["uri"], cfg["tracking"]["experiment"], workdir / "mlartifacts")
    parent = tracker.start(
        cfg["run_name"],
        flatten("", cfg),
        {"mlflow.source.git.commit": git_commit(), "student": cfg["student"]["name"], "kind": "flow"},
    )
    ok = False
    try:
        tracker.client.log_text(parent, yaml.safe_dump(redact_config(cfg), sort_keys=False), "config.yaml")
        with make_runner(cfg["runner"]) as runner:
            result = Wiring(cfg, runner, store).run(tracker, parent)
        ok = True
        logger.info("MLflow parent run %s; report in %s", parent, result["report"])
        return result
    finally:
        tracker.end(parent, ok)


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

    def __init__(self, cfg: dict[str, Any], runner: Any, store: Path) -> None:
        self.cfg, self.runner, self.store = cfg, runner, store
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
        params = stage.params(self.cfg, **inputs)
        with lane or nullcontext(), self.slots:
            if self.failed.is_set():
                raise _Cancelled(f"{stage.name}[{label}] not started: another stage failed")
            artifact = stage.submit(self.runner, self.store, params, label=label).result()
        return artifact.at(self.store)

    def run(self, tracker: Tracker, parent: str) -> dict[str, Any]:
        """Wire the whole DAG, wait for it, then track and report."""
        try:
            return self._run(tracker, parent)
        finally:
            self.failed.set()  # whatever ended the run (an error, Ctrl-C), start nothing more
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, tracker: Tracker, parent: str) -> dict[str, Any]:
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

        if built is not None:
            _track_corpus(cfg, tracker, parent, built["generations"], built["corpus"])
            if built.get("reviews") is not None:
                _track_reviews(tracker, parent, built["reviews"])
        for objective in cfg["pretrain"]["objectives"] if built is not None else []:
            _track_pretrain(cfg, tracker, parent, objective, arm_models[objective])
        evaluations = {run: pair[1] for run, pair in done.items()} | teacher_done
        results = [{"student": m, "dataset": d, "seed": s, "evaluation": ev} for (m, d, s), ev in evaluations.items()]
        sentiment = [
            {"student": m, "dataset": d, "seed": s, "evaluation": ev} for (m, d, s), ev in sentiment_done.items()
        ]
        summary_art = self.call(
            report, "summary", results=results, corpus=built["corpus"] if built else None, sentiment=sentiment
        )
        for run in runs:
            _track_child(cfg, tracker, parent, *run, *done[run])
        for run, art in teacher_done.items():
            _track_teacher(cfg, tracker, parent, *run, art)
        _track_zeroshot(tracker, parent, sentiment_done)
        _track_report(tracker, parent, Path(summary_art.path))
        return {
            "parent_run_id": parent,
            "report": summary_art.path,
            "evaluations": {_label(*run): done[run][1].path for run in runs},
            "arms": {arm: art.path for arm, art in arm_models.items()},
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
            return self.call(teacher_fsa, f"k{k}-{slug(name)}-{seed}", self.generate_slots, data=data, k=k,
                             seed=seed)  # fmt: skip

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
        return teacher, sentiment

    def _pretrain(self, student: Future, corpus: Future, objective: str) -> Artifact:
        return self.call(
            pretrain, objective, self.train_slots, student=student.result(), corpus=corpus.result()["corpus"],
            objective=objective,
        )  # fmt: skip

    def _finetune_and_evaluate(
        self, arm_model: Future, data: Future, arm: str, name: str, seed: int
    ) -> tuple[Artifact, Artifact]:
        label = _label(arm, name, seed)
        model = self.call(finetune, label, self.train_slots, data=data.result(), student=arm_model.result(), seed=seed)
        evaluation = self.call(evaluate, label, model=model, data=data.result())
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
        return {"corpus": corpus, "generations": generations, "reviews": raw}


def _label(arm: str, dataset: str, seed: int) -> str:
    return f"{arm}-{slug(dataset)}-{seed}"


def _track_child(
    cfg: dict[str, Any], tracker: Tracker, parent: str, arm: str, name: str, seed: int, model: Artifact, ev: Artifact
) -> None:
    short = slug(name)
    student = cfg["student"]["name"]
    tags = {"kind": "finetune", "dataset": name, "seed": str(seed), "student": student, "arm": arm,
            "model_sha256": model.sha256}  # fmt: skip
    with tracker.child(
        _label(arm, name, seed),
        {"dataset": name, "seed": str(seed), "student": student, "arm": arm, **flatten("finetune", cfg["finetune"])},
        tags,
        parent=parent,
    ) as child:
        model_dir, ev_dir = Path(model.path), Path(ev.path)
        tracker.history(child, read_log(model_dir, "train_log.json"))
        dev = read_log(model_dir, "dev_metrics.json")
        tracker.metrics(child, {f"dev_best_{k}": v for k, v in numeric(dev).items()})
        test = read_metrics(ev_dir)
        tracker.metrics(
            child,
            {f"test_{tt}_{m}": v for tt, vals in test.items() for m, v in vals.items() if m != "n_sentences"},
        )
        for file in ("predictions.parquet", "metrics.json"):
            tracker.files(child, ev_dir / file, "evaluation")
        tracker.files(child, model_dir / "train_log.json", "training")
        if cfg["tracking"]["register_models"]:
            model_name = f"{cfg['tracking']['model_prefix']}-{short}-{student}-{arm}"
            tracker.register(child, model_dir, model_name, model.sha256)


def _track_teacher(
    cfg: dict[str, Any], tracker: Tracker, parent: str, model: str, name: str, seed: int, ev: Artifact
) -> None:
    """A child run per in-context evaluation of the teacher, with the students' metric names."""
    teacher = cfg["teacher"]
    with tracker.child(
        f"{model}-{slug(name)}-{seed}",
        {"dataset": name, "seed": str(seed), "model": model, **flatten("teacher_eval", cfg["teacher_eval"]),
         "teacher.name": teacher["name"], "teacher.backend": teacher["backend"]},
        {"kind": "teacher-eval", "dataset": name, "seed": str(seed), "model": model, "teacher": teacher["name"]},
        parent=parent,
    ) as child:  # fmt: skip
        test = read_metrics(ev.path)
        tracker.metrics(
            child, {f"test_{tt}_{m}": v for tt, vals in test.items() for m, v in vals.items() if m != "n_sentences"}
        )
        for file in ("predictions.parquet", "metrics.json"):
            tracker.files(child, Path(ev.path) / file, "evaluation")


def _track_zeroshot(tracker: Tracker, parent: str, done: dict[tuple[str, str, int], Artifact]) -> None:
    """A child run per model (teacher and each arm) with `<set>_macro_f1` / `<set>_accuracy`, seeds averaged."""
    by_model: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (model, dataset, _seed), art in done.items():
        metrics = json.loads((Path(art.path) / "metrics.json").read_text())
        by_model.setdefault(model, {}).setdefault(dataset, []).append(metrics)
    for model, sets in by_model.items():
        method = next(iter(sets.values()))[0].get("method", "")
        with tracker.child(
            f"zeroshot-{model}", {"model": model, "method": method}, {"kind": "zeroshot", "model": model}, parent
        ) as child:
            values = {}
            for dataset, runs in sets.items():
                values[f"{dataset}_macro_f1"] = sum(r["macro_f1"] for r in runs) / len(runs)
                values[f"{dataset}_accuracy"] = sum(r["accuracy"] for r in runs) / len(runs)
            tracker.metrics(child, values)


def _track_report(tracker: Tracker, parent: str, report_dir: Path) -> None:
    import pandas as pd

    summary = pd.read_csv(report_dir / "summary.csv")
    tracker.files(parent, report_dir, "report")
    tracker.metrics(
        parent,
        {f"{r.student}.{slug(r.dataset)}.{r.test_type}.f1_mean": r.f1_mean for r in summary.itertuples()},
    )
    sentiment = pd.read_csv(report_dir / "sentiment.csv")
    if len(sentiment):
        means = sentiment.groupby(["student", "dataset"]).macro_f1.mean()
        tracker.metrics(parent, {f"{m}.{d}.macro_f1_mean": 100 * v for (m, d), v in means.items()})
    board = pd.read_csv(report_dir / "leaderboard.csv")
    tracker.client.log_table(parent, data=board, artifact_file="leaderboard.json")
    create_table_artifact(key="fsa-leaderboard", table=board.to_dict(orient="records"),
                          description="Teacher and students: FSA test F1 and sentiment macro-F1 (%)")  # fmt: skip
    create_table_artifact(
        key="fsa-report",
        table=summary.round(2).to_dict(orient="records"),
        description="Test precision/recall/F1 (%), mean and std over seeds",
    )
    create_markdown_artifact(key="fsa-report-f1", markdown=(report_dir / "summary.md").read_text())


def _track_reviews(tracker: Tracker, parent: str, raw: Artifact) -> None:
    tracker.files(parent, Path(raw.path) / "stats.json", "reviews")


def _track_corpus(
    cfg: dict[str, Any], tracker: Tracker, parent: str, generations: list[Artifact], corpus: Artifact
) -> None:
    """A child run for the teacher corpus: generation settings, per-rule cleaning counts, quarantine."""
    teacher = cfg["teacher"]
    with tracker.child(
        f"corpus-{teacher['name']}",
        {**flatten("teacher", teacher), **flatten("clean", cfg["clean"]),
         **{f"prompt.{k}": v["version"] for k, v in cfg["prompts"].items()}},
        {"kind": "corpus", "teacher": teacher["name"], "corpus_sha256": corpus.sha256},
        parent=parent,
    ) as child:  # fmt: skip
        tracker.metrics(child, {f"generation.{k}": v for k, v in generation_totals(generations).items()})
        stats = json.loads((Path(corpus.path) / "stats.json").read_text())
        tracker.metrics(child, numeric(stats))
        tracker.metrics(child, {f"dropped.{rule}": n for rule, n in stats.get("dropped", {}).items()})
        tracker.files(child, Path(corpus.path) / "stats.json")
        tracker.files(child, Path(corpus.path) / "quarantine.parquet", "quarantine")
    rows = [{"rule": rule, "dropped": n} for rule, n in stats.get("dropped", {}).items()]
    rows.append({"rule": "kept", "dropped": stats.get("kept", 0)})
    create_table_artifact(key="fsa-clean", table=rows, description=f"Cleaning of {stats.get('generated')} outputs")


def generation_totals(generations: list[Artifact]) -> dict[str, float]:
    """Teacher generation summed over shards: pairs, tokens, wall time, errors, retries, finish reasons."""
    totals: dict[str, float] = {}
    for art in generations:
        path = Path(art.path) / "stats.json"
        if not path.is_file():  # imported (released) outputs have no generation statistics
            continue
        stats = json.loads(path.read_text())
        timing = Path(art.path) / "measured" / "timing.json"  # wall time: a measurement, outside the content
        if timing.is_file():
            stats = {**stats, **json.loads(timing.read_text())}
        for key in ("pairs", "output_tokens", "wall_s", "errors", "retries", "malformed"):
            totals[key] = totals.get(key, 0.0) + float(stats.get(key) or 0)
        for reason, n in stats.get("finish_reasons", {}).items():
            totals[f"finish_{reason}"] = totals.get(f"finish_{reason}", 0.0) + n
    if totals.get("wall_s"):
        totals["output_tokens_per_s"] = totals["output_tokens"] / totals["wall_s"]
    return totals


def _track_pretrain(cfg: dict[str, Any], tracker: Tracker, parent: str, objective: str, model: Artifact) -> None:
    """A child run per pretraining arm with its loss curve."""
    log = read_log(model.path, "pretrain_log.json")
    with tracker.child(
        f"pretrain-{objective}",
        {"objective": objective, **flatten("pretrain", cfg["pretrain"])},
        {"kind": "pretrain", "objective": objective, "model_sha256": model.sha256},
        parent=parent,
    ) as child:
        tracker.history(child, log["history"])
        tracker.metrics(child, {f"corpus_{k}": v for k, v in numeric(log["stats"]).items()})
