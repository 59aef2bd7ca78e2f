"""`fsa-distill score` scores any model's outputs and explains coverage problems."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fsa_distill.benchmark.records import load_test_rows
from fsa_distill.benchmark.scoring import score_file

from fsa_distill.errors import InputError


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _gold(data_source, dataset):
    return load_test_rows(dataset, data_source)


def test_gold_predictions_score_one_everywhere(tmp_path, data_source):
    rows = _gold(data_source, "acsa/rest16")
    preds = tmp_path / "p.jsonl"
    _write(preds, [{"ID": r["ID"], "prediction": r["target"]} for r in rows])
    result = score_file("acsa/rest16", preds, data_source)
    assert set(result) == {"normal", "implicit", "mams", "hard"}
    assert all(v["f1"] == pytest.approx(1.0) for v in result.values())


def test_cli_prints_json_and_partial_credit(tmp_path, data_source):
    rows = _gold(data_source, "atsa/laptop14")
    preds = tmp_path / "p.jsonl"
    # predict nothing for hard_test sentences: recall on `hard` drops to 0, precision stays 1
    _write(preds, [{"ID": r["ID"], "prediction": r["target"] if r["split"] == "test" else ""} for r in rows])
    out = subprocess.run(
        [sys.executable, "-m", "fsa_distill.cli", "score", "--dataset", "atsa/laptop14", "--predictions", str(preds),
         "--source", data_source],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["hard"] == {"precision": 1.0, "recall": 0.0, "f1": 0.0}
    assert 0 < result["normal"]["recall"] < 1


def test_missing_and_unknown_ids_are_reported_with_counts(tmp_path, data_source):
    rows = _gold(data_source, "atsa/rest14")
    preds = tmp_path / "p.jsonl"
    _write(preds, [{"ID": r["ID"], "prediction": ""} for r in rows[5:]] + [{"ID": "nope", "prediction": ""}])
    with pytest.raises(InputError, match=r"5 of 1140 test/hard_test IDs have no prediction.*1 IDs are not in"):
        score_file("atsa/rest14", preds, data_source)


def test_cli_exits_2_with_message_on_bad_file(tmp_path, data_source):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"ID": 1}\n')
    out = subprocess.run(
        [sys.executable, "-m", "fsa_distill.cli", "score", "--dataset", "atsa/rest14", "--predictions", str(preds),
         "--source", data_source],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and 'p.jsonl:1: expected an object with "ID" and "prediction"' in out.stderr
