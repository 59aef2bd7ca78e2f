"""Sentiment sets: built-ins as upstream, user sets by YAML only, validation errors, macro-F1, scoring."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsa_distill.benchmark.sentiment import (
    accuracy,
    get_dataset,
    load_split,
    macro_f1,
    score_sentiment_file,
    spec_from_config,
    write_dataset,
)

from fsa_distill import ROOT
from fsa_distill.config import compose_config
from fsa_distill.errors import InputError

SOURCE = ROOT.parent / "shared" / "data" / "sentiment"
BINARY = (
    "Please perform Sentiment Analysis task. Given the sentence, assign a sentiment polarity label from "
    "['negative', 'positive']. Return label only without any other text."
)
TERNARY = (
    "Please perform Sentiment Analysis task. Given the sentence, assign a sentiment polarity label from "
    "['negative', 'positive', 'neutral']. Return label only without any other text."
)
SIZES = {"sst2": 1821, "imdb": 1000, "yelp2": 1000, "twitter": 1000}


@pytest.fixture(scope="module")
def sentiment_cfg() -> dict:
    """The composed `sentiment` group with the built-ins pointed at the local mirror."""
    return compose_config([f"sentiment.source={SOURCE}"])["sentiment"]


def _entry(**kw) -> dict:
    """A user dataset entry as composition would produce it."""
    base = {"labels": ["negative", "positive"], "instruction": "Classify.", "files": {}}
    return {**base, **kw}


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- built-ins --------------------------------------------------------------------------------------------------


def test_builtins_hold_upstream_instructions_and_label_words(sentiment_cfg):
    datasets = sentiment_cfg["datasets"]
    assert list(datasets) == ["sst2", "imdb", "yelp2", "twitter"]
    for name in ("sst2", "imdb", "yelp2"):
        spec = get_dataset(sentiment_cfg, name)
        assert spec.instruction == BINARY and spec.labels == ("negative", "positive")
    twitter = get_dataset(sentiment_cfg, "twitter")
    assert twitter.instruction == TERNARY and twitter.labels == ("negative", "positive", "neutral")


def test_env_var_sets_the_builtins_source(monkeypatch, tmp_path):
    monkeypatch.setenv("FSA_SENTIMENT_SOURCE", str(tmp_path))
    cfg = compose_config([])["sentiment"]
    assert cfg["source"] == str(tmp_path) and cfg["datasets"]["imdb"]["source"] == f"{tmp_path}/imdb"


@pytest.mark.parametrize("name", list(SIZES))
def test_builtin_test_splits_load_with_bom_and_pinned_checksums(sentiment_cfg, name):
    spec = get_dataset(sentiment_cfg, name)
    rows = load_split(spec, "test")
    assert len(rows) == SIZES[name]
    assert [r["ID"] for r in rows[:3]] == [0, 1, 2]
    assert {r["label"] for r in rows} == set(spec.labels)


def test_unknown_dataset_lists_the_known_ones(sentiment_cfg):
    with pytest.raises(ValueError, match=r"unknown sentiment dataset 'sst5'; known: sst2, imdb, yelp2, twitter"):
        get_dataset(sentiment_cfg, "sst5")


def test_checksum_mismatch_names_the_file_and_key(tmp_path, sentiment_cfg):
    (tmp_path / "sst2").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / "sst2" / f"{split}.json").write_text('[{"sentence": "ok", "label": "positive"}]')
    cfg = compose_config([f"sentiment.source={tmp_path}"])["sentiment"]
    with pytest.raises(InputError, match=r"test\.json: sha256 .* \(sentiment\.datasets\.sst2\.sha256\.test"):
        load_split(get_dataset(cfg, "sst2"), "test")


# --- user datasets by YAML only ------------------------------------------------------------------------------------


def _user_data(tmp_path: Path) -> dict[str, Path]:
    """The same three rows as CSV, JSONL and Parquet (with 0/1 labels mapped by label_map in Parquet)."""
    rows = [("Great food", "positive"), ('Slow, "rude" staff', "negative"), ("Fine.\nReally", "positive")]
    csv_path = tmp_path / "data" / "reviews.csv"
    csv_path.parent.mkdir()
    import csv

    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "stars", "extra"])
        writer.writerows([(t, lab, "x") for t, lab in rows])
    jsonl = _write_jsonl(tmp_path / "data" / "reviews.jsonl", [{"review": t, "stars": lab} for t, lab in rows])
    parquet = tmp_path / "data" / "reviews.parquet"
    pq.write_table(pa.table({"review": [t for t, _ in rows], "stars": [int(lab == "positive") for _, lab in rows]}),
                   parquet)  # fmt: skip
    return {"csv": csv_path, "jsonl": jsonl, "parquet": parquet}


def test_user_datasets_of_each_format_through_config_only(tmp_path):
    files = _user_data(tmp_path)
    conf = tmp_path / "myconf" / "sentiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(
        f"""
defaults:
  - default
  - _self_
datasets:
  mine_csv:
    files: {{train: {files["csv"]}, test: {files["csv"]}}}
    text_column: review
    label_column: stars
    labels: [negative, positive]
    instruction: Rate the review.
  mine_jsonl:
    source: {files["jsonl"].parent}
    files: {{test: reviews.jsonl}}
    text_column: review
    label_column: stars
    labels: [negative, positive]
    instruction: Rate the review.
  mine_parquet:
    files: {{test: {files["parquet"]}}}
    format: parquet
    text_column: review
    label_column: stars
    labels: [negative, positive]
    label_map: {{0: negative, 1: positive}}
    instruction: Rate the review.
"""
    )
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "sentiment=mine"])["sentiment"]
    assert {"sst2", "mine_csv", "mine_jsonl", "mine_parquet"} <= set(cfg["datasets"])
    expected = [
        {"ID": 0, "text": "Great food", "label": "positive"},
        {"ID": 1, "text": 'Slow, "rude" staff', "label": "negative"},
        {"ID": 2, "text": "Fine.\nReally", "label": "positive"},
    ]
    for name in ("mine_csv", "mine_jsonl", "mine_parquet"):
        spec = get_dataset(cfg, name)
        assert spec.instruction == "Rate the review."
        assert load_split(spec, "test") == expected, name
    # ... and they score like the built-ins
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"ID": i, "prediction": "positive"} for i in range(3)])
    result = score_sentiment_file(get_dataset(cfg, "mine_jsonl"), preds)
    assert result["accuracy"] == pytest.approx(2 / 3) and result["n"] == 3
    assert result["macro_f1"] == pytest.approx((0 + 0.8) / 2)


def test_write_dataset_validates_every_split_before_writing(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"sentence": "a", "label": "positive"}])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"sentence": "a", "label": "meh"}])
    out = tmp_path / "out"
    spec = spec_from_config("x", _entry(files={"train": str(good), "test": str(bad)}))
    with pytest.raises(InputError, match="unknown label 'meh'"):
        write_dataset(spec, out)
    assert not out.exists() or not any(out.iterdir())
    spec = spec_from_config("x", _entry(files={"train": str(good), "test": str(good)}))
    written = write_dataset(spec, out)
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]
    assert pq.read_table(written["test"]).to_pylist() == [{"ID": 0, "text": "a", "label": "positive"}]


# --- validation errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("t.json", '[{"sentence": "a", "label": "positive"},\n {"sentence": "b", "label": }]',
         r"t\.json: malformed JSON at line 2, column 29"),
        ("t.json", '{"sentence": "a", "label": "positive"}', r"t\.json: expected a JSON array.*set format: jsonl"),
        ("t.json", '[{"sentence": "a", "label": "positive"}, "b"]', r"t\.json, record 1: record is a str"),
        ("t.json", '[{"label": "positive"}]', r"t\.json, record 0: text column 'sentence' is missing"),
        ("t.json", '[{"sentence": "  ", "label": "positive"}]', r"record 0: text column 'sentence' is empty"),
        ("t.json", '[{"sentence": 3, "label": "positive"}]', r"record 0: text column 'sentence' is not a string"),
        ("t.json", '[{"sentence": "a"}]', r"t\.json, record 0: missing label \(column 'label'\)"),
        ("t.json", '[{"sentence": "a", "label": "Positive"}]',
         r"t\.json, record 0: unknown label 'Positive'; allowed: negative, positive"),
        ("t.json", "", r"t\.json: empty file"),
        ("t.json", "\ufeff[]", r"t\.json: no records"),
        ("t.jsonl", '{"sentence": "a", "label": "positive"}\n\n{"sentence": "b", "label": "positive"\n',
         r"t\.jsonl, record 1 \(line 3\): malformed JSON"),
        ("t.jsonl", '{"sentence": "a", "label": "positive"}\n{"sentence": "b", "label": "good"}\n',
         r"t\.jsonl, record 1 \(line 2\): unknown label 'good'; allowed: negative, positive"),
        ("t.jsonl", "\n  \n", r"t\.jsonl: empty file"),
        ("t.csv", 'sentence,label\na,positive\n"b,negative\n', r"t\.csv, line \d+: malformed CSV"),
        ("t.csv", "sentence,label\na,positive\nb,negative,extra\n",
         r"t\.csv, record 1 \(line 3\): malformed CSV: 3 fields, the header has 2"),
        ("t.csv", "text,label\na,positive\n", r"t\.csv, record 0 \(line 2\): text column 'sentence' is missing"),
        ("t.csv", "sentence,label\n", r"t\.csv: no records"),
        ("t.csv", "sentence,label\n,positive\n", r"t\.csv, record 0 \(line 2\): text column 'sentence' is empty"),
        ("t.parquet", "PAR1 not really", r"t\.parquet: malformed Parquet"),
    ],
)  # fmt: skip
def test_bad_records_name_file_record_and_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    spec = spec_from_config("x", _entry(files={"test": str(path)}))
    with pytest.raises(InputError, match=message):
        load_split(spec, "test")


def test_parquet_unknown_label_and_missing_file(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"sentence": ["a", "b"], "label": [1, 2]}), path)
    spec = spec_from_config("x", _entry(files={"test": str(path)}, label_map={"1": "positive", "0": "negative"}))
    with pytest.raises(InputError, match=r"t\.parquet, record 1: unknown label 2; allowed: negative, positive \(or"):
        load_split(spec, "test")
    spec = spec_from_config("x", _entry(files={"test": str(tmp_path / "nope.csv")}))
    with pytest.raises(InputError, match=r"nope\.csv: file not found"):
        load_split(spec, "test")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (_entry(files={"train": "a.json"}), r"sentiment\.datasets\.x\.files must name a `test` split"),
        (_entry(labels=[], files={"test": "a.json"}), r"sentiment\.datasets\.x\.labels is empty"),
        (_entry(labels=["a", "a"], files={"test": "a.json"}), r"labels has duplicates"),
        (_entry(files={"test": "a.txt"}), r"files\.test: cannot tell the format of 'a\.txt'"),
        (_entry(files={"test": "a.json"}, format="xml"), r"format 'xml' is not one of json, jsonl, csv, parquet"),
        (_entry(files={"test": "a.json"}, instruction=""), r"instruction is missing or empty"),
        (_entry(files={"test": "a.json"}, label_map={"1": "good"}), r"label_map maps to words that are not labels"),
        (_entry(files={"test": "a.json"}, name="y"), r"name is 'y'; it must equal the key 'x'"),
    ],
)
def test_bad_dataset_config_names_the_key(entry, message):
    with pytest.raises(InputError, match=message):
        spec_from_config("x", entry)


# --- metrics -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_macro_f1_matches_sklearn_on_random_labels(seed):
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(seed)
    labels = ["negative", "positive", "neutral"][: rng.choice([2, 3])]
    n = rng.randint(1, 60)
    gold = [rng.choice(labels) for _ in range(n)]
    pred = [rng.choice([*labels, "", "Positive", "maybe"]) for _ in range(n)]  # invalid predictions included
    expected = f1_score(gold, pred, average="macro", labels=labels, zero_division=0)
    assert macro_f1(gold, pred, labels) == pytest.approx(expected)
    assert accuracy(gold, pred) == pytest.approx(accuracy_score(gold, pred))


def test_invalid_prediction_is_a_false_negative_of_no_class():
    # gold positive predicted "maybe": positive loses recall, no class gains a false positive
    assert macro_f1(["positive", "negative"], ["maybe", "negative"], ["negative", "positive"]) == pytest.approx(0.5)


# --- scoring and the CLI -------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fsa_distill.cli", "score", "--task", "sentiment", *args],
        capture_output=True, text=True,
    )  # fmt: skip


def test_cli_scores_sst2_gold_and_flipped(tmp_path, sentiment_cfg):
    rows = load_split(get_dataset(sentiment_cfg, "sst2"), "test")
    flip = {"positive": "negative", "negative": "positive"}
    preds = _write_jsonl(
        tmp_path / "p.jsonl",
        [{"ID": r["ID"], "prediction": r["label"] if r["ID"] % 4 else flip[r["label"]]} for r in rows],
    )
    out = _cli("--dataset", "sst2", "--predictions", str(preds), "--source", str(SOURCE))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["dataset"] == "sst2" and result["n"] == 1821 and result["invalid"] == 0
    assert result["accuracy"] == pytest.approx(sum(1 for r in rows if r["ID"] % 4) / 1821)
    assert 0.7 < result["macro_f1"] < 0.8


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"ID": i, "prediction": "positive"} for i in range(1, 1000)], r"1 of 1000 test IDs have no prediction"),
        ([{"ID": i, "prediction": "positive"} for i in [*range(1000), 5]], r"p\.jsonl:1001: duplicate ID '5'"),
        ([{"ID": i, "prediction": "positive"} for i in range(1001)],
         r"1 IDs are not row indices of imdb test \(0\.\.999\) \(e\.g\. \['1000'\]\)"),
        (None, r"p\.jsonl:2: malformed JSON"),
    ],
)  # fmt: skip
def test_cli_exits_2_on_bad_predictions(tmp_path, records, message):
    preds = tmp_path / "p.jsonl"
    if records is None:
        preds.write_text('{"ID": 0, "prediction": "positive"}\n{"ID": 1, \n')
    else:
        _write_jsonl(preds, records)
    out = _cli("--dataset", "imdb", "--predictions", str(preds), "--source", str(SOURCE))
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and re.search(message, out.stderr), out.stderr


def test_cli_unknown_sentiment_dataset_exits_2(tmp_path):
    out = _cli("--dataset", "sst5", "--predictions", str(tmp_path / "p.jsonl"), "--source", str(SOURCE))
    assert out.returncode == 2 and "unknown sentiment dataset 'sst5'" in out.stderr
