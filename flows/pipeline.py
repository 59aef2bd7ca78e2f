"""The fsa-distill flow: wiring only. Stages live in `tasks/`; this file passes artifact references
between them, picks the task runner and writes MLflow runs.

acquire (per dataset) -> student ──────────────────────────────────────────┐ baseline
reviews -> generate (per shard) -> clean -> pretrain (per objective) ─────┤ distill, span_corruption
                                                                          └─> finetune (arm x dataset x seed)
                                                                              -> evaluate -> report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from fsa_distill.benchmark.specs import get_spec
from fsa_distill.flows.tracking import Tracker, flatten, git_commit, numeric
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.clean import clean
from fsa_distill.tasks.evaluate import evaluate, read_metrics
from fsa_distill.tasks.finetune import finetune
from fsa_distill.tasks.generate import count_shards, generate_shard, import_released, released_params
from fsa_distill.tasks.pretrain import pretrain
from fsa_distill.tasks.report import report
from fsa_distill.tasks.reviews import reviews, source_fingerprints
from fsa_distill.tasks.student import init_student
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from fsa_distill.artifacts import Artifact, fingerprint
from fsa_distill.config import compose_config, seeds


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
        tracker.client.log_text(parent, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
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
    if student_cfg["pretrained"]:  # a checkpoint: keyed by its name and, for a local folder, its content
        student_params = {"student": {"name": student_cfg["name"], "pretrained": student_cfg["pretrained"]},
                          "datasets": [], "fingerprint": fingerprint(student_cfg["pretrained"])}  # fmt: skip
    else:  # built from the config, with a tokenizer trained on the run's text
        student_params = {"student": student_cfg, "datasets": [data[d] for d in datasets], "fingerprint": ""}
    student = init_student.submit(runner, store, student_params, label=student_cfg["name"]).result()

    # The arms compared in the report: the student as initialised, then one per pretraining objective.
    arms: dict[str, Artifact] = {"baseline": student}
    corpus = None
    if cfg["distill"]["enabled"]:
        corpus = _distillation_corpus(cfg, runner, store, tracker, parent, [data[d] for d in datasets])
        # The list of objectives is not part of an arm's recipe: dropping one arm must not retrain the other.
        pt_cfg = {k: v for k, v in cfg["pretrain"].items() if k != "objectives"}
        pretrained = {
            objective: pretrain.submit(
                runner,
                store,
                {"student": student, "corpus": corpus, "objective": objective, "pretrain": pt_cfg},
                label=objective,
            )
            for objective in cfg["pretrain"]["objectives"]
        }
        for objective, future in pretrained.items():
            arms[objective] = future.result()
            _track_pretrain(cfg, tracker, parent, objective, arms[objective])

    ft_cfg = {k: v for k, v in cfg["finetune"].items() if k not in ("seeds", "seed")}
    generation = {k: cfg["evaluate"][k] for k in ("max_new_tokens", "num_beams")}
    runs = [(arm, name, seed) for arm in arms for name in datasets for seed in seeds(cfg)]
    tuned = {
        run: finetune.submit(
            runner,
            store,
            {
                "data": data[run[1]],
                "student": arms[run[0]],
                "seed": run[2],
                "finetune": ft_cfg,
                "generation": generation,
            },
            label=_label(*run),
        )
        for run in runs
    }
    models, evaluated = {}, {}
    for run in runs:  # each evaluation starts as soon as its model is ready
        models[run] = tuned[run].result()
        evaluated[run] = evaluate.submit(
            runner,
            store,
            {"model": models[run], "data": data[run[1]], "evaluate": cfg["evaluate"]},
            label=_label(*run),
        )
    evaluations = {run: future.result() for run, future in evaluated.items()}

    results = [
        {"student": arm, "dataset": name, "seed": seed, "evaluation": evaluations[(arm, name, seed)]}
        for arm, name, seed in runs
    ]
    summary_art = report.submit(runner, store, {"results": results, "corpus": corpus}, label="summary").result()

    for run in runs:
        _track_child(cfg, tracker, parent, *run, models[run], evaluations[run])
    _track_report(tracker, parent, Path(summary_art.path))
    return {
        "parent_run_id": parent,
        "report": summary_art.path,
        "evaluations": {_label(*run): evaluations[run].path for run in runs},
        "arms": {arm: art.path for arm, art in arms.items()},
    }


def _label(arm: str, dataset: str, seed: int) -> str:
    return f"{arm}-{get_spec(dataset).slug}-{seed}"


def _distillation_corpus(
    cfg: dict[str, Any], runner: Any, store: Path, tracker: Tracker, parent: str, benchmark: list[Artifact]
) -> Artifact:
    """reviews -> teacher generation (sharded) -> clean, or the released outputs -> clean."""
    teacher = cfg["teacher"]
    if teacher["backend"] == "released":
        generations = [import_released.submit(runner, store, released_params(teacher), label=teacher["name"]).result()]
    else:
        reviews_cfg = cfg["reviews"]
        raw = reviews.submit(
            runner, store, {"reviews": reviews_cfg, "fingerprints": source_fingerprints(reviews_cfg)}, label="mirror"
        ).result()
        model_print = fingerprint(teacher["model"])
        n_shards = count_shards(Path(raw.path) / "reviews.parquet", cfg["prompts"], teacher)
        shards = [
            generate_shard.submit(
                runner,
                store,
                {"reviews": raw, "shard": k, "prompts": cfg["prompts"], "teacher": teacher, "fingerprint": model_print},
                label=f"{teacher['name']}-{k}",
            )
            for k in range(n_shards)
        ]
        generations = [future.result() for future in shards]
        _track_reviews(tracker, parent, raw)
    corpus = clean.submit(
        runner, store, {"generations": generations, "benchmark": benchmark, "clean": cfg["clean"]}, label="corpus"
    ).result()
    _track_corpus(cfg, tracker, parent, generations, corpus)
    return corpus


def _track_child(
    cfg: dict[str, Any], tracker: Tracker, parent: str, arm: str, name: str, seed: int, model: Artifact, ev: Artifact
) -> None:
    slug = get_spec(name).slug
    student = cfg["student"]["name"]
    tags = {"dataset": name, "seed": str(seed), "student": student, "arm": arm, "model_sha256": model.sha256}
    with tracker.child(
        _label(arm, name, seed),
        {"dataset": name, "seed": str(seed), "student": student, "arm": arm, **flatten("finetune", cfg["finetune"])},
        tags,
        parent=parent,
    ) as child:
        model_dir, ev_dir = Path(model.path), Path(ev.path)
        tracker.history(child, json.loads((model_dir / "train_log.json").read_text()))
        dev = json.loads((model_dir / "dev_metrics.json").read_text())
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
            model_name = f"{cfg['tracking']['model_prefix']}-{slug}-{student}-{arm}"
            tracker.register(child, model_dir, model_name, model.sha256)


def _track_report(tracker: Tracker, parent: str, report_dir: Path) -> None:
    import pandas as pd

    summary = pd.read_csv(report_dir / "summary.csv")
    tracker.files(parent, report_dir, "report")
    tracker.metrics(
        parent,
        {f"{r.student}.{get_spec(r.dataset).slug}.{r.test_type}.f1_mean": r.f1_mean for r in summary.itertuples()},
    )
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
        for key in ("pairs", "output_tokens", "wall_s", "errors", "retries", "malformed"):
            totals[key] = totals.get(key, 0.0) + float(stats.get(key) or 0)
        for reason, n in stats.get("finish_reasons", {}).items():
            totals[f"finish_{reason}"] = totals.get(f"finish_{reason}", 0.0) + n
    if totals.get("wall_s"):
        totals["output_tokens_per_s"] = totals["output_tokens"] / totals["wall_s"]
    return totals


def _track_pretrain(cfg: dict[str, Any], tracker: Tracker, parent: str, objective: str, model: Artifact) -> None:
    """A child run per pretraining arm with its loss curve."""
    log = json.loads((Path(model.path) / "pretrain_log.json").read_text())
    with tracker.child(
        f"pretrain-{objective}",
        {"objective": objective, **flatten("pretrain", cfg["pretrain"])},
        {"kind": "pretrain", "objective": objective, "model_sha256": model.sha256},
        parent=parent,
    ) as child:
        tracker.history(child, log["history"])
        tracker.metrics(child, {f"corpus_{k}": v for k, v in numeric(log["stats"]).items()})
