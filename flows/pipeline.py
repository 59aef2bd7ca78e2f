"""The fsa-distill flow: wiring only. Stages live in `tasks/`; this file passes artifact references
between them, picks the task runner and writes MLflow runs.

acquire (per dataset) -> student -> finetune (per dataset x seed) -> evaluate -> report
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from benchmark.specs import get_spec
from flows.tracking import Tracker, flatten, git_commit
from fsa_distill.config import compose_config, seeds
from tasks.acquire import acquire
from tasks.evaluate import evaluate, read_metrics
from tasks.finetune import finetune
from tasks.report import report
from tasks.student import init_student


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
    logger = get_run_logger()
    workdir = Path(cfg["workdir"]).resolve()
    store = workdir / "artifacts"
    tracker = Tracker(cfg["tracking"]["uri"], cfg["tracking"]["experiment"], workdir / "mlartifacts")
    parent = tracker.start(
        cfg["run_name"],
        flatten("", cfg),
        {"mlflow.source.git.commit": git_commit(), "student": cfg["student"]["name"], "kind": "flow"},
    )
    tracker.client.log_text(parent, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
    ok = False
    try:
        with make_runner(cfg["runner"]) as runner:
            result = _stages(cfg, runner, store, tracker, parent)
        ok = True
        logger.info("MLflow parent run %s; report in %s", parent, result["report"])
        return result
    finally:
        tracker.end(parent, ok)


def _stages(cfg: dict[str, Any], runner: Any, store: Path, tracker: Tracker, parent: str) -> dict[str, Any]:
    data_cfg, student_cfg = cfg["data"], cfg["student"]
    datasets = data_cfg["datasets"]
    acquired = {
        name: acquire.submit(
            runner,
            store,
            {
                "dataset": name,
                "source": data_cfg["source"],
                "limit": data_cfg["limit"],
                "timeout_s": data_cfg["timeout_s"],
            },
            label=get_spec(name).slug,
        )
        for name in datasets
    }
    data = {name: future.result() for name, future in acquired.items()}
    student = init_student.submit(
        runner, store, {"student": student_cfg, "datasets": [data[d] for d in datasets]}, label=student_cfg["name"]
    ).result()

    ft_cfg = {k: v for k, v in cfg["finetune"].items() if k not in ("seeds", "seed")}
    generation = {k: cfg["benchmark"][k] for k in ("max_new_tokens", "num_beams")}
    runs = [(name, seed) for name in datasets for seed in seeds(cfg)]
    tuned = {
        (name, seed): finetune.submit(
            runner,
            store,
            {
                "data": data[name],
                "student": student,
                "seed": seed,
                "finetune": ft_cfg,
                "generation": generation,
            },
            label=f"{get_spec(name).slug}-{seed}",
        )
        for name, seed in runs
    }
    models, evaluated = {}, {}
    for name, seed in runs:  # each evaluation starts as soon as its model is ready
        models[(name, seed)] = tuned[(name, seed)].result()
        evaluated[(name, seed)] = evaluate.submit(
            runner,
            store,
            {"model": models[(name, seed)], "data": data[name], "benchmark": cfg["benchmark"]},
            label=f"{get_spec(name).slug}-{seed}",
        )
    evaluations = {run: future.result() for run, future in evaluated.items()}

    results = [
        {
            "student": student_cfg["name"],
            "dataset": name,
            "seed": seed,
            "evaluation": evaluations[(name, seed)],
        }
        for name, seed in runs
    ]
    summary_art = report.submit(runner, store, {"results": results}).result()

    for name, seed in runs:
        _track_child(cfg, tracker, parent, name, seed, models[(name, seed)], evaluations[(name, seed)])
    _track_report(tracker, parent, Path(summary_art.path))
    return {
        "parent_run_id": parent,
        "report": summary_art.path,
        "evaluations": {f"{get_spec(n).slug}/{s}": evaluations[(n, s)].path for n, s in runs},
    }


def _track_child(cfg: dict[str, Any], tracker: Tracker, parent: str, name: str, seed: int, model: Any, ev: Any) -> None:
    import json

    slug = get_spec(name).slug
    student = cfg["student"]["name"]
    child = tracker.start(
        f"{slug}-seed{seed}",
        {"dataset": name, "seed": str(seed), "student": student, **flatten("finetune", cfg["finetune"])},
        {"dataset": name, "seed": str(seed), "student": student, "model_sha256": model.sha256},
        parent=parent,
    )
    model_dir, ev_dir = Path(model.path), Path(ev.path)
    tracker.history(child, json.loads((model_dir / "train_log.json").read_text()))
    dev = json.loads((model_dir / "dev_metrics.json").read_text())
    tracker.metrics(child, {f"dev_best_{k}": v for k, v in dev.items() if isinstance(v, int | float)})
    test = read_metrics(ev_dir)
    tracker.metrics(
        child,
        {f"test_{tt}_{m}": v for tt, vals in test.items() for m, v in vals.items() if m != "n_sentences"},
    )
    for file in ("predictions.parquet", "metrics.json"):
        tracker.files(child, ev_dir / file, "evaluation")
    tracker.files(child, model_dir / "train_log.json", "training")
    if cfg["tracking"]["register_models"]:
        tracker.register(child, model_dir, f"{cfg['tracking']['model_prefix']}-{slug}-{student}", model.sha256)
    tracker.end(child, True)


def _track_report(tracker: Tracker, parent: str, report_dir: Path) -> None:
    import pandas as pd

    summary = pd.read_csv(report_dir / "summary.csv")
    tracker.files(parent, report_dir, "report")
    tracker.metrics(
        parent,
        {f"{get_spec(r.dataset).slug}.{r.test_type}.f1_mean": r.f1_mean for r in summary.itertuples()},
    )
    create_table_artifact(
        key="fsa-report",
        table=summary.round(2).to_dict(orient="records"),
        description="Test precision/recall/F1 (%), mean and std over seeds",
    )
    create_markdown_artifact(key="fsa-report-f1", markdown=(report_dir / "summary.md").read_text())
