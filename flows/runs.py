"""The MLflow run tree of one flow run: a parent, and a child per result, written as each result lands.

* Children appear when their stage finishes, not at the end of the flow, so a failing stage never
  hides the results already there. Trainings get their child *before* they start (`live`), and the
  stage streams its curves into it with real timestamps (`Stage.submit(observe=...)`).
* Every child carries the same tag names for the same things: `kind` (corpus, pretrain, finetune,
  teacher-eval, zeroshot), `model` (the arm or `teacher-k<k>`), `dataset`, `seed`, `student`,
  `teacher`, and `artifact_sha256` (the content hash of what it reports). Search works without
  guessing: `tags.kind = 'finetune' and tags.arm = 'distill'`.
* A result that an earlier FINISHED run of the experiment already reports (same kind, same content
  hash: a cached stage) is not logged again: the parent lists it in `reused_runs.json` and is tagged
  `cached=true` when everything was reused. So a cached rerun is one parent run that links to the
  runs that produced its results, never a duplicate tree.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from fsa_distill.benchmark.specs import slug
from fsa_distill.flows.tracking import Tracker, flatten, numeric
from fsa_distill.tasks.evaluate import read_metrics

from fsa_distill.artifacts import MANIFEST, Artifact
from fsa_distill.models import read_log
from fsa_distill.progress import read_log_times

log = logging.getLogger(__name__)

#: acquired split -> the MLflow dataset context it is used in
SPLIT_CONTEXT = {"train": "train", "dev": "dev", "test": "test", "hard_test": "test"}


def _manifest_files(folder: str | Path) -> dict[str, str]:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError):
        return {}


def split_inputs(dataset: str, data: Artifact, splits: tuple[str, ...] = tuple(SPLIT_CONTEXT)) -> list[dict[str, str]]:
    """MLflow dataset inputs for an acquired benchmark dataset: name `<dataset>:<split>`, file digest, path."""
    files = _manifest_files(data.path)
    out = []
    for split in splits:
        name = f"{split}.parquet"
        if name in files:
            out.append({"name": f"{dataset}:{split}", "digest": files[name][:36],
                        "source": str(Path(data.path) / name), "context": SPLIT_CONTEXT[split]})  # fmt: skip
    return out


class RunTree:
    """A flow run's MLflow runs; every method is safe to call from the flow's driver threads."""

    def __init__(self, cfg: dict[str, Any], tracker: Tracker, parent: str) -> None:
        self.cfg, self.tracker, self.parent = cfg, tracker, parent
        self.reused: dict[str, str] = {}  # child label -> the earlier run that reports the same result
        self.logged: dict[str, str] = {}  # child label -> the run this flow run wrote
        self.finetunes: dict[tuple[str, str, int], tuple[str, dict[str, dict[str, float]]]] = {}

    # -- children -------------------------------------------------------------------------------
    def live(self, kind: str, label: str, params: dict[str, str], tags: dict[str, str]) -> str:
        """A RUNNING child created before its stage starts, so curves appear while it trains."""
        return self.tracker.start(label, params, {**tags, "kind": kind}, parent=self.parent)

    def observe(self, run_id: str | None) -> dict[str, str] | None:
        """What `Stage.submit(observe=...)` needs to stream a stage's metrics into `run_id`."""
        if run_id is None:
            return None
        return {"mlflow_uri": self.cfg["tracking"]["uri"], "mlflow_run_id": run_id}

    def fail(self, run_id: str | None) -> None:
        """Close a live child whose stage failed."""
        if run_id is not None:
            self.tracker.end(run_id, False)

    def child(
        self,
        kind: str,
        label: str,
        sha: str,
        params: dict[str, str],
        tags: dict[str, str],
        fill: Callable[[str], None],
        run_id: str | None = None,
    ) -> str:
        """Write (or complete the live `run_id`) a child reporting the artifact with content hash `sha`.

        Without a live run, a FINISHED run of the experiment reporting the same result is reused.
        """
        if run_id is None:
            found = self.tracker.find_reusable(kind, sha)
            if found is not None:
                self.reused[label] = found
                return found
            run_id = self.tracker.start(label, params, {**tags, "kind": kind}, parent=self.parent)
        ok = False
        try:
            fill(run_id)
            self.tracker.client.set_tag(run_id, "artifact_sha256", sha)
            ok = True
        finally:
            self.tracker.end(run_id, ok)
        self.logged[label] = run_id
        return run_id

    def finetune_tags(self, arm: str, dataset: str, seed: int) -> tuple[dict[str, str], dict[str, str]]:
        """Params and tags of a fine-tuning child (the same names the teacher's children use)."""
        student = self.cfg["student"]["name"]
        common = {"dataset": dataset, "seed": str(seed), "student": student, "arm": arm, "model": arm}
        return {**common, **flatten("finetune", self.cfg["finetune"])}, dict(common)

    def finetune(
        self, label: str, arm: str, dataset: str, seed: int, data: Artifact, model: Artifact, ev: Artifact,
        run_id: str | None, streamed: bool,
    ) -> str:  # fmt: skip
        """The child of one fine-tuning and its evaluation: curves, dev/test metrics, predictions, model."""
        params, tags = self.finetune_tags(arm, dataset, seed)
        test = read_metrics(ev.path)
        tags["model_sha256"] = model.sha256

        def fill(child: str) -> None:
            model_dir, ev_dir = Path(model.path), Path(ev.path)
            for key, value in tags.items():
                self.tracker.client.set_tag(child, key, value)
            if not streamed:  # a cached training replays its curves with their recorded times
                self.tracker.history(child, read_log(model_dir, "train_log.json"), times=read_log_times(model_dir))
            dev = numeric(read_log(model_dir, "dev_metrics.json"))
            self.tracker.metrics(child, {f"dev_best_{k}": v for k, v in dev.items()})
            self.tracker.metrics(child, _test_metrics(test))
            self.tracker.log_datasets(child, split_inputs(dataset, data))
            self._evaluation_files(child, ev_dir)
            self.tracker.files(child, model_dir / "train_log.json", "training")
            if self.cfg["tracking"]["register_models"]:
                name = f"{self.cfg['tracking']['model_prefix']}-{slug(dataset)}-{tags['student']}-{arm}"
                description = (
                    f"Fine-tuned by MLflow run {child} (flow run {self.parent}) on {dataset} "
                    f"(train digest {_manifest_files(data.path).get('train.parquet', '?')[:12]}), "
                    f"seed {seed}, arm {arm}, student {tags['student']}; selected on dev F1."
                )
                self.tracker.register(
                    child, model_dir, name, model.sha256, metric=dev.get("f1"), description=description
                )

        run = self.child("finetune", label, ev.sha256, params, tags, fill, run_id=run_id)
        self.finetunes[(arm, dataset, seed)] = (run, test)
        return run

    def teacher(self, model: str, dataset: str, seed: int, data: Artifact, ev: Artifact) -> str:
        """The child of one in-context evaluation of the teacher, with the students' metric names."""
        teacher = self.cfg["teacher"]
        label = f"{model}-{slug(dataset)}-{seed}"
        common = {"dataset": dataset, "seed": str(seed), "model": model, "teacher": teacher["name"]}
        params = {**common, **flatten("teacher_eval", self.cfg["teacher_eval"]), "teacher.backend": teacher["backend"]}

        def fill(child: str) -> None:
            self.tracker.metrics(child, _test_metrics(read_metrics(ev.path)))
            inputs = split_inputs(dataset, data, ("test", "hard_test"))
            demos = split_inputs(dataset, data, ("train",))
            self.tracker.log_datasets(child, inputs + [{**d, "context": "demonstrations"} for d in demos])
            self._evaluation_files(child, Path(ev.path))

        return self.child("teacher-eval", label, ev.sha256, params, common, fill)

    def zeroshot(self, done: dict[tuple[str, str, int], Artifact]) -> None:
        """A child per model (teacher and each arm) with `<set>_macro_f1` / `<set>_accuracy`, seeds averaged."""
        by_model: dict[str, dict[str, list[Artifact]]] = {}
        for (model, dataset, _seed), art in done.items():
            by_model.setdefault(model, {}).setdefault(dataset, []).append(art)
        for model, sets in by_model.items():
            arts = [a for runs in sets.values() for a in runs]
            sha = hashlib.sha256("".join(sorted(a.sha256 for a in arts)).encode()).hexdigest()
            metrics = {
                d: [json.loads((Path(a.path) / "metrics.json").read_text()) for a in runs] for d, runs in sets.items()
            }
            method = next(iter(metrics.values()))[0].get("method", "")
            tags = {"model": model, "student": self.cfg["student"]["name"], "teacher": self.cfg["teacher"]["name"]}

            def fill(child: str, metrics: dict[str, list[dict[str, Any]]] = metrics) -> None:
                values = {}
                for dataset, runs in metrics.items():
                    values[f"{dataset}_macro_f1"] = sum(r["macro_f1"] for r in runs) / len(runs)
                    values[f"{dataset}_accuracy"] = sum(r["accuracy"] for r in runs) / len(runs)
                self.tracker.metrics(child, values)

            self.child("zeroshot", f"zeroshot-{model}", sha, {"model": model, "method": method}, tags, fill)

    def corpus(self, generations: list[Artifact], corpus: Artifact, raw: Artifact | None) -> str:
        """The teacher corpus: generation settings and totals, per-rule cleaning counts, quarantine."""
        from prefect.artifacts import create_table_artifact

        teacher = self.cfg["teacher"]
        params = {**flatten("teacher", teacher), **flatten("clean", self.cfg["clean"]),
                  **{f"prompt.{k}": v["version"] for k, v in self.cfg["prompts"].items()}}  # fmt: skip
        stats = json.loads((Path(corpus.path) / "stats.json").read_text())

        def fill(child: str) -> None:
            self.tracker.metrics(child, {f"generation.{k}": v for k, v in generation_totals(generations).items()})
            self.tracker.metrics(child, numeric(stats))
            self.tracker.metrics(child, {f"dropped.{rule}": n for rule, n in stats.get("dropped", {}).items()})
            self.tracker.files(child, Path(corpus.path) / "stats.json")
            self.tracker.files(child, Path(corpus.path) / "quarantine.parquet", "quarantine")
            if raw is not None:
                self.tracker.files(child, Path(raw.path) / "stats.json", "reviews")
                digest = _manifest_files(raw.path).get("reviews.parquet", raw.sha256)[:36]
                source = str(Path(raw.path) / "reviews.parquet")
                reviews = {"name": "reviews", "digest": digest, "source": source, "context": "reviews"}
                self.tracker.log_datasets(child, [reviews])

        rows = [{"rule": rule, "dropped": n} for rule, n in stats.get("dropped", {}).items()]
        rows.append({"rule": "kept", "dropped": stats.get("kept", 0)})
        create_table_artifact(key="fsa-clean", table=rows, description=f"Cleaning of {stats.get('generated')} outputs")
        tags = {"teacher": teacher["name"], "model": teacher["name"], "corpus_sha256": corpus.sha256}
        return self.child("corpus", f"corpus-{teacher['name']}", corpus.sha256, params, tags, fill)

    def pretrain_tags(self, objective: str) -> tuple[dict[str, str], dict[str, str]]:
        """Params and tags of a pretraining child."""
        tags = {"objective": objective, "model": objective, "arm": objective, "student": self.cfg["student"]["name"],
                "teacher": self.cfg["teacher"]["name"]}  # fmt: skip
        return {"objective": objective, **flatten("pretrain", self.cfg["pretrain"])}, tags

    def pretrain(self, objective: str, corpus: Artifact, model: Artifact, run_id: str | None, streamed: bool) -> str:
        """A child per pretraining arm with its loss curve and the corpus it read."""
        params, tags = self.pretrain_tags(objective)
        tags["model_sha256"] = model.sha256

        def fill(child: str) -> None:
            logged = read_log(model.path, "pretrain_log.json")
            if not streamed:
                self.tracker.history(child, logged["history"], times=read_log_times(model.path))
            self.tracker.metrics(child, {f"corpus_{k}": v for k, v in numeric(logged["stats"]).items()})
            self.tracker.client.set_tag(child, "model_sha256", model.sha256)
            files = _manifest_files(corpus.path)
            digest = files.get("corpus.parquet", corpus.sha256)[:36]
            self.tracker.log_datasets(child, [{"name": "corpus", "digest": digest, "context": "corpus",
                                               "source": str(Path(corpus.path) / "corpus.parquet")}])  # fmt: skip

        return self.child("pretrain", f"pretrain-{objective}", model.sha256, params, tags, fill, run_id=run_id)

    def _evaluation_files(self, child: str, ev_dir: Path) -> None:
        for file in ("predictions.parquet", "metrics.json"):
            self.tracker.files(child, ev_dir / file, "evaluation")
        table = pd.read_parquet(ev_dir / "predictions.parquet")
        for column in table.columns:  # nested values (pairs) as JSON text, so the UI's table preview shows them
            if table[column].map(lambda v: isinstance(v, list | dict) or hasattr(v, "tolist")).any():
                table[column] = table[column].map(_json_text)
        self.tracker.log_table(child, table, "evaluation/predictions.json")

    # -- parent ---------------------------------------------------------------------------------
    def finish(self, report_dir: Path) -> None:
        """Deltas to the baseline on every student child, and the parent's report, leaderboard and links."""
        for (arm, dataset, seed), (run, test) in self.finetunes.items():
            base = self.finetunes.get(("baseline", dataset, seed))
            if arm == "baseline" or base is None or run in self.reused.values():
                continue
            delta = {
                f"test_{tt}_f1_delta": test[tt]["f1"] - base[1][tt]["f1"]
                for tt in test
                if test[tt].get("f1") is not None and base[1].get(tt, {}).get("f1") is not None
            }
            self.tracker.metrics(run, delta)
        _track_report(self.tracker, self.parent, report_dir)
        if self.reused:
            self.tracker.link_reused(self.parent, dict(sorted(self.reused.items())))
            if not self.logged:
                self.tracker.client.set_tag(self.parent, "cached", "true")


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


def _json_text(value: Any) -> str:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return json.dumps(value, default=str)


def _test_metrics(test: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"test_{tt}_{m}": v for tt, vals in test.items() for m, v in vals.items() if m != "n_sentences"}


def _track_report(tracker: Tracker, parent: str, report_dir: Path) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    summary = pd.read_csv(report_dir / "summary.csv")
    tracker.files(parent, report_dir, "report")
    tracker.metrics(
        parent,
        {f"{r.student}.{slug(r.dataset)}.{r.test_type}.f1_mean": r.f1_mean for r in summary.itertuples()},
    )
    deltas = pd.read_csv(report_dir / "deltas.csv")
    tracker.metrics(
        parent, {f"{r.student}.{slug(r.dataset)}.{r.test_type}.f1_delta": r.f1_delta for r in deltas.itertuples()}
    )
    sentiment = pd.read_csv(report_dir / "sentiment.csv")
    if len(sentiment):
        means = sentiment.groupby(["student", "dataset"]).macro_f1.mean()
        tracker.metrics(parent, {f"{m}.{d}.macro_f1_mean": 100 * v for (m, d), v in means.items()})
    board = pd.read_csv(report_dir / "leaderboard.csv")
    tracker.log_table(parent, board, "leaderboard.json")
    create_table_artifact(key="fsa-leaderboard", table=board.to_dict(orient="records"),
                          description="Teacher and students: FSA test F1 and sentiment macro-F1 (%)")  # fmt: skip
    create_table_artifact(
        key="fsa-report",
        table=summary.round(2).to_dict(orient="records"),
        description="Test precision/recall/F1 (%), mean and std over seeds",
    )
    create_markdown_artifact(key="fsa-report-f1", markdown=(report_dir / "summary.md").read_text())
