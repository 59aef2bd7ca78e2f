"""The teacher and the students on the same questions: in-context FSA, zero-shot sentiment."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fsa_distill.benchmark.classify import match_label
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.student import init_student
from fsa_distill.tasks.teacher_fsa import teacher_fsa
from fsa_distill.tasks.teacher_sentiment import teacher_sentiment
from fsa_distill.tasks.zeroshot import zeroshot

from fsa_distill.config import compose_config
from tests.conftest import shrunk


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    store = tmp_path_factory.mktemp("teacher-eval")
    cfg = compose_config(
        [*shrunk(store), "teacher_eval.sample=4", "teacher_eval.max_new_tokens=24", "zeroshot.sample=12",
         "teacher.batch_size=4"]
    )  # fmt: skip
    data = acquire.run(store, acquire.params(cfg, dataset="atsa/rest14"))
    student = init_student.run(store, init_student.params(cfg, datasets=[data]))
    return store, cfg, data, student


def test_teacher_in_context_fsa_is_scored_like_a_student(setup):
    store, cfg, data, _ = setup
    art = teacher_fsa.run(store, teacher_fsa.params(cfg, data=data, k=2, seed=42))
    metrics = json.loads((Path(art.path) / "metrics.json").read_text())
    assert set(metrics) == {"normal", "implicit", "mams", "hard"}
    assert metrics["normal"]["n_sentences"] == 4  # the seeded sample
    table = pq.read_table(Path(art.path) / "predictions.parquet")
    assert table.num_rows == 4 and {"prediction", "pairs", "gold"} <= set(table.column_names)
    # another seed draws other demonstrations: another key; the sample of sentences stays the same
    other = teacher_fsa.params(cfg, data=data, k=2, seed=52)
    assert teacher_fsa.key(other) != teacher_fsa.key(teacher_fsa.params(cfg, data=data, k=2, seed=42))


def test_teacher_and_student_classify_the_same_sentiment_sample(setup):
    store, cfg, _, student = setup
    teacher_art = teacher_sentiment.run(store, teacher_sentiment.params(cfg, dataset="sst2", seed=42))
    student_art = zeroshot.run(store, zeroshot.params(cfg, model=student, dataset="sst2", seed=42))
    teacher_m = json.loads((Path(teacher_art.path) / "metrics.json").read_text())
    student_m = json.loads((Path(student_art.path) / "metrics.json").read_text())
    assert teacher_m["method"] == "first_token_logit" and student_m["method"] == "rank_classification"
    assert teacher_m["n"] == student_m["n"] == 12
    for m in (teacher_m, student_m):
        assert 0.0 <= m["macro_f1"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0 and m["invalid"] == 0
    ids = [
        pq.read_table(Path(a.path) / "predictions.parquet").column("ID").to_pylist() for a in (teacher_art, student_art)
    ]
    assert ids[0] == ids[1]


def test_moving_the_sentiment_data_does_not_rekey(setup, tmp_path):
    _, cfg, _, student = setup
    import shutil

    shutil.copytree(Path(cfg["sentiment"]["source"]) / "sst2", tmp_path / "sst2")
    moved = compose_config([*shrunk(tmp_path), "zeroshot.sample=12", f"sentiment.source={tmp_path}"])
    assert zeroshot.key(zeroshot.params(moved, model=student, dataset="sst2", seed=42)) == zeroshot.key(
        zeroshot.params(cfg, model=student, dataset="sst2", seed=42)
    )


def test_generated_answers_are_matched_to_label_words():
    labels = ("negative", "positive", "neutral")
    assert match_label("Positive.\nSentence: next", labels) == "positive"
    assert match_label("  \nLabel: negative, mostly", labels) == "negative"
    assert match_label("I cannot tell", labels) == "i cannot tell"
