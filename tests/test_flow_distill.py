"""The distillation flow end to end on a shrunk real config: corpus -> pretrain arms -> compared students."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import shrunk_distill
from tests.test_flow import _run, _task_runs, _task_states

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def released_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("distill-released")
    overrides = shrunk_distill(workdir, "teacher=released", "teacher.max_reviews=null", "data.datasets=[atsa/rest14]")
    result, run_id = _run(overrides)
    return workdir, overrides, result, run_id


def test_report_compares_baseline_span_corruption_and_distilled(released_run):
    _, _, result, run_id = released_run
    assert set(result["arms"]) == {"baseline", "distill", "span_corruption"}
    report = Path(result["report"])
    summary = pd.read_csv(report / "summary.csv")
    assert set(summary.student) == {"baseline", "distill", "span_corruption"}
    assert set(summary.test_type) == {"normal", "implicit", "mams", "hard"}
    deltas = pd.read_csv(report / "deltas.csv")
    assert set(deltas.student) == {"distill", "span_corruption"}
    text = (report / "summary.md").read_text()
    assert "Distillation corpus" in text and "generated" in text and "dropped:" in text
    stats = json.loads((report / "corpus_stats.json").read_text())
    assert stats["generated"] == 500 and 0 < stats["kept"] < 500

    states = _task_states(run_id)
    stages = {name.split("[")[0] for name in states}
    assert {"released", "clean", "pretrain", "finetune", "evaluate", "report"} <= stages
    assert "generate" not in stages  # released outputs are imported, not generated


def test_mlflow_has_corpus_and_pretrain_runs(released_run):
    workdir, _, result, _ = released_run
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    kinds = [c.data.tags.get("kind", "finetune") for c in children]
    assert kinds.count("corpus") == 1 and kinds.count("pretrain") == 2 and kinds.count("finetune") == 3
    corpus = next(c for c in children if c.data.tags.get("kind") == "corpus")
    assert corpus.data.metrics["generated"] == 500
    assert any(k.startswith("dropped.") for k in corpus.data.metrics)
    pretrain_run = next(c for c in children if c.data.tags.get("objective") == "distill")
    assert client.get_metric_history(pretrain_run.info.run_id, "train_loss")
    arms = {c.data.tags["arm"] for c in children if "arm" in c.data.tags}
    assert arms == {"baseline", "distill", "span_corruption"}


def test_distillation_rerun_is_fully_cached(released_run):
    _, overrides, result, _ = released_run
    again, run_id = _run(overrides)
    states = _task_states(run_id)
    assert set(states.values()) == {"Cached"}, states
    assert again["report"] == result["report"]


def test_default_teacher_path_generates_cleans_and_pretrains(tmp_path):
    """reviews -> SmolLM2 (the embedded teacher, for real) -> clean -> pretrain, on a handful of reviews."""
    overrides = shrunk_distill(tmp_path, "data.datasets=[acsa/rest16]", "teacher.max_new_tokens=160")
    result, run_id = _run(overrides)
    states = _task_states(run_id)
    generated = [name for name in states if name.startswith("generate[")]
    assert len(generated) == 2  # 2 reviews x 2 prompts in shards of 2
    stats = json.loads((Path(result["report"]) / "corpus_stats.json").read_text())
    assert stats["generated"] == 4 and stats["kept"] + sum(stats["dropped"].values()) == 4
    assert set(result["arms"]) == {"baseline", "distill", "span_corruption"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(result["parent_run_id"])
    (corpus,) = client.search_runs([parent.info.experiment_id], "tags.kind = 'corpus'")
    assert corpus.data.metrics["generation.pairs"] == 4 and corpus.data.metrics["generation.output_tokens"] > 0

    # The DAG waits for nothing: baseline fine-tuning needs only the student, so it starts while
    # the teacher is still generating (before, it waited for generation, cleaning and pretraining).
    runs = _task_runs(run_id)
    generation_end = max(r.end_time for r in runs if r.name.startswith("generate["))
    baseline_start = min(r.start_time for r in runs if r.name.startswith("finetune[baseline-"))
    assert baseline_start < generation_end
