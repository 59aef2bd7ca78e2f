"""Scaling and data-scarce studies: nested train subsets, corpus prefixes, the sweep report."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsa_distill.tasks.finetune import finetune, train_subset
from fsa_distill.tasks.pretrain import pretrain
from mlflow.tracking import MlflowClient

from fsa_distill.artifacts import Artifact
from fsa_distill.config import compose_config
from fsa_distill.pretraining import corpus_rows, distill_pairs, unique_reviews
from fsa_distill.sweep import _Tee, swept_keys, write_sweep_report
from tests.conftest import shrunk

DATA = Artifact(path="/nowhere/data", sha256="d" * 64, stage="acquire", rel="acquire/x")
STUDENT = Artifact(path="/nowhere/student", sha256="s" * 64, stage="student", rel="student/x")


# -- nested train subsets -----------------------------------------------------------------------


def test_train_subsets_are_nested_sized_and_fixed_by_the_subset_seed():
    n = 1000
    sizes = {f: len(train_subset(n, f, 0)) for f in (0.01, 0.05, 0.1, 0.25, 1.0)}
    assert sizes == {0.01: 10, 0.05: 50, 0.1: 100, 0.25: 250, 1.0: 1000}
    previous: set[int] = set()
    for fraction in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        subset = set(train_subset(n, fraction, 0))
        assert previous <= subset  # 5% contains 1%, ...
        previous = subset
    assert train_subset(n, 0.1, 0) == train_subset(n, 0.1, 0)  # deterministic
    assert train_subset(n, 0.1, 0) != train_subset(n, 0.1, 1)  # drawn from subset_seed
    assert train_subset(n, 0.1, 0) == sorted(train_subset(n, 0.1, 0))
    assert train_subset(n, 0.1, 0) != list(range(100))  # a random subset, not the head of the file
    assert len(train_subset(7, 0.01, 0)) == 1  # at least one row
    assert len(train_subset(30, 0.1, 0)) == 3  # ceil without float noise (0.1 x 30 = 3.0000000000000004)
    assert len(train_subset(12, 0.5, 0)) == 6
    assert train_subset(5, 1.0, 3) == [0, 1, 2, 3, 4]


def _finetune_key(*overrides: str) -> tuple[dict, str]:
    cfg = compose_config(list(overrides))
    params = finetune.params(cfg, data=DATA, student=STUDENT, seed=42)
    return params, finetune.key(params)


def test_full_train_split_keeps_todays_params_and_key():
    params, key = _finetune_key()
    cfg = compose_config([])
    today = {k: v for k, v in cfg["finetune"].items() if k not in ("seeds", "seed", "train_fraction", "subset_seed")}
    assert params["finetune"] == today  # the recipe before train_fraction existed
    assert "train_fraction" not in params["finetune"] and "subset_seed" not in params["finetune"]
    assert _finetune_key("finetune.train_fraction=1.0")[1] == key
    assert _finetune_key("finetune.subset_seed=7")[1] == key  # irrelevant without a subset


def test_train_fraction_and_subset_seed_are_keyed_below_one():
    _, full = _finetune_key()
    params, half = _finetune_key("finetune.train_fraction=0.5")
    assert params["finetune"]["train_fraction"] == 0.5 and params["finetune"]["subset_seed"] == 0
    assert half != full
    assert _finetune_key("finetune.train_fraction=0.5", "finetune.subset_seed=1")[1] != half
    # the training seed is not the subset seed: other seeds share the subset settings
    assert (
        finetune.params(compose_config(["finetune.train_fraction=0.5"]), data=DATA, student=STUDENT, seed=52)[
            "finetune"
        ]
        == params["finetune"]
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.train_fraction=0", "finetune.train_fraction"),
        ("finetune.train_fraction=1.5", "finetune.train_fraction"),
        ("distill.corpus_size=0", "distill.corpus_size"),
        ("distill.corpus_size=-3", "distill.corpus_size"),
        ("distill.corpus_size=2.5", "distill.corpus_size"),
    ],
)
def test_out_of_range_values_fail_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        compose_config([override])


def test_valid_sizes_compose():
    assert compose_config(["distill.corpus_size=0.25"])["distill"]["corpus_size"] == 0.25
    assert compose_config(["distill.corpus_size=100"])["distill"]["corpus_size"] == 100
    assert compose_config([])["distill"]["corpus_size"] is None
    assert compose_config(["finetune.train_fraction=0.01"])["finetune"]["train_fraction"] == 0.01


# -- corpus prefixes ----------------------------------------------------------------------------


def test_corpus_prefixes_are_nested_and_fixed():
    hundred, fifty = set(corpus_rows(400, 100)), set(corpus_rows(400, 50))
    assert len(hundred) == 100 and len(fifty) == 50 and fifty <= hundred
    assert set(corpus_rows(400, 0.125)) == fifty  # a fraction is the same prefix
    assert corpus_rows(400, 50) == corpus_rows(400, 50) == sorted(fifty)
    assert corpus_rows(400, 50) != list(range(50))  # shuffled, not the head of the file
    assert corpus_rows(400, None) is None and corpus_rows(400, 1.0) is None and corpus_rows(400, 400) is None
    assert corpus_rows(40, 1000) is None  # more than there is: the whole corpus
    assert len(corpus_rows(400, 0.001)) == 1


@pytest.fixture
def corpus(tmp_path) -> Artifact:
    folder = tmp_path / "corpus"
    folder.mkdir()
    reviews = [f"review {i // 2}" for i in range(200)]  # two outputs (analysis, rewrite) per review
    outputs = [f"output {i}\nline two" for i in range(200)]
    pq.write_table(pa.table({"review": reviews, "output": outputs}), folder / "corpus.parquet")
    return Artifact(path=str(folder), sha256="c" * 64, stage="clean", rel="clean/x")


def test_pretraining_reads_the_prefix(corpus):
    path = Path(corpus.path) / "corpus.parquet"
    sources, targets = distill_pairs(path, 100)
    half_sources, half_targets = distill_pairs(path, 50)
    assert len(sources) == 100 and len(half_sources) == 50
    assert set(zip(half_sources, half_targets, strict=True)) <= set(zip(sources, targets, strict=True))
    assert len(distill_pairs(path)[0]) == 200
    assert set(unique_reviews(path, 50)) <= set(unique_reviews(path, 100))
    assert len(unique_reviews(path)) == 100


def test_corpus_size_is_keyed_only_for_a_proper_prefix(corpus):
    def key(*overrides: str) -> tuple[dict, str]:
        params = pretrain.params(compose_config(list(overrides)), student=STUDENT, corpus=corpus, objective="distill")
        return params, pretrain.key(params)

    params, full = key()
    assert set(params) == {"student", "corpus", "objective", "pretrain"}  # today's keys
    assert key("distill.corpus_size=1.0")[1] == full
    assert key("distill.corpus_size=200")[1] == full  # the whole corpus
    assert key("distill.corpus_size=5000")[1] == full
    half, half_key = key("distill.corpus_size=100")
    assert half["corpus_size"] == 100 and half_key != full
    assert key("distill.corpus_size=0.5")[0]["corpus_size"] == 0.5


# -- the sweep report ---------------------------------------------------------------------------


def _job(tmp_path: Path, num: int, overrides: list[str], f1: dict[tuple[str, str, int], float]) -> dict:
    folder = tmp_path / f"report{num}"
    folder.mkdir()
    rows = [
        {"student": s, "dataset": d, "seed": seed, "test_type": t, "precision": v, "recall": v, "f1": v}
        for (s, d, seed), v in f1.items()
        for t in ("normal", "hard")
    ]
    pd.DataFrame(rows).to_csv(folder / "per_seed.csv", index=False)
    return {"num": num, "overrides": overrides, "report": str(folder)}


def test_sweep_report_aggregates_seeds_per_fraction(tmp_path):
    keys = swept_keys(["finetune.train_fraction=0.1,1.0", "finetune.seed=42,52", "data.limit=12"])
    assert keys == ["finetune.train_fraction", "finetune.seed"]
    jobs = []
    for num, (fraction, seed) in enumerate([(0.1, 42), (0.1, 52), (1.0, 42), (1.0, 52)]):
        scores = {
            (arm, d, seed): base * fraction + seed / 1000
            for arm, base in (("baseline", 0.4), ("distill", 0.6), ("teacher", 0.7))
            for d in ("atsa/rest14", "acsa/rest16")
        }
        jobs.append(_job(tmp_path, num, [f"finetune.train_fraction={fraction}", f"finetune.seed={seed}"], scores))
    out = tmp_path / "sweep" / "report"
    summary = write_sweep_report(jobs, keys, out)
    assert (out / "f1_vs_train_fraction.png").stat().st_size > 0
    assert not list(out.glob("f1_vs_seed*"))  # seeds are the error bars, not an axis
    table = pd.read_csv(out / "sweep.csv")
    assert sorted(set(table["finetune.train_fraction"])) == [0.1, 1.0]
    assert set(table.dataset) == {"atsa/rest14", "acsa/rest16", "mean"}
    row = summary[
        (summary["finetune.train_fraction"] == 1.0)
        & (summary.student == "distill")
        & (summary.dataset == "atsa/rest14")
        & (summary.test_type == "normal")
    ].iloc[0]
    assert row.n_seeds == 2
    assert row.f1_mean == pytest.approx(100 * (0.6 + 0.047))
    assert row.f1_std == pytest.approx(100 * pd.Series([0.042, 0.052]).std())
    assert len(pd.read_csv(out / "sweep_per_seed.csv")) == 4 * 3 * 2 * 2


def test_tee_passes_output_through_and_keeps_the_result_line():
    stream = io.StringIO()
    tee = _Tee(stream)
    print("log line", file=tee)
    tee.write('{"parent_run_id": "abc", "rep')
    tee.write('ort": "/x/report"}\nmore')
    assert tee.finish() == {"parent_run_id": "abc", "report": "/x/report"}
    assert stream.getvalue() == 'log line\n{"parent_run_id": "abc", "report": "/x/report"}\nmore'


# -- a real multirun ----------------------------------------------------------------------------


@pytest.mark.slow
def test_train_fraction_multirun_reuses_upstream_stages_and_writes_the_sweep_report(tmp_path, harness_env):
    workdir = tmp_path / "work"
    out = subprocess.run(
        [sys.executable, "-m", "fsa_distill.cli", "run", "-m", "finetune.train_fraction=0.5,1.0", *shrunk(workdir)],
        capture_output=True, text=True, timeout=900, env={**harness_env, "FSA_WORKDIR": str(workdir)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    store = workdir / "artifacts"
    # one acquisition per dataset and one student for both jobs: the second job reused them
    assert len(list((store / "acquire").iterdir())) == 2
    assert len(list((store / "student").iterdir())) == 1
    assert len(list((store / "finetune").iterdir())) == 4  # 2 datasets x 2 fractions
    assert (out.stdout + out.stderr).count("Finished in state Cached") >= 3  # acquire x2 + student in job 2

    printed = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"sweep_report"')]
    assert len(printed) == 1
    report = Path(printed[0]["sweep_report"])
    assert report.parent.parent == workdir / "hydra"
    assert (report / "f1_vs_train_fraction.png").stat().st_size > 0
    table = pd.read_csv(report / "sweep.csv")
    assert sorted(set(table["finetune.train_fraction"])) == [0.5, 1.0]
    students = set(table.student)
    assert "baseline" in students and all(s == "baseline" or s.startswith("teacher") for s in students), students

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("fsa-distill")
    (sweep,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")
    assert json.loads(sweep.data.params["sweep.finetune.train_fraction"]) == [0.5, 1.0]
    logged = {f.path for f in client.list_artifacts(sweep.info.run_id, "sweep_report")}
    assert {"sweep_report/sweep.csv", "sweep_report/f1_vs_train_fraction.png"} <= logged
    flows = client.search_runs([exp.experiment_id], "tags.kind = 'flow'")
    assert sorted(r.data.params["finetune.train_fraction"] for r in flows) == ["0.5", "1.0"]
    assert {sweep.data.tags[f"job.{n}.parent_run_id"] for n in (0, 1)} == {r.info.run_id for r in flows}
