"""User FSA datasets by YAML only: acquired like the built-ins, keyed by content, every bad record a clear error."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsa_distill.benchmark.records import load_test_rows
from fsa_distill.benchmark.scoring import score_file
from fsa_distill.benchmark.specs import user_spec
from fsa_distill.tasks.acquire import acquire, read_meta

from fsa_distill.config import compose_config
from fsa_distill.errors import InputError

SPLITS = ("train", "dev", "test")


def _aspect(sentence: str, term: str, polarity: str, **extra) -> dict:
    """An ATSA aspect with upstream-style string offsets of `term` in `sentence`."""
    start = sentence.index(term)
    return {"from": str(start), "to": str(start + len(term)), "target": term, "polarity": polarity, **extra}


S1 = "The fish was great but the service was slow."
S2 = "We came back twice."
S3 = "Lovely terrace."
ATSA = {
    "train": [
        {"ID": "t1", "sentence": S1, "aspects": [_aspect(S1, "fish", "positive"), _aspect(S1, "service", "negative")]},
        {"ID": "t2", "sentence": S2, "aspects": []},
    ],
    "dev": [{"ID": "d1", "sentence": S3, "aspects": [_aspect(S3, "terrace", "positive")]}],
    "test": [
        {"ID": "x1", "sentence": S1,
         "aspects": [_aspect(S1, "service", "negative", opinion_words="slow"),
                     _aspect(S1, "fish", "positive", opinion_words=[{"from": 13, "to": 18, "opinion": "great"}])]},
        {"ID": "x2", "sentence": S3, "aspects": [_aspect(S3, "terrace", "positive")]},  # no opinion words: implicit
        {"ID": "x3", "sentence": S2},  # no aspects at all
    ],
    "hard_test": [
        {"ID": "h1", "sentence": S3, "aspects": [_aspect(S3, "terrace", "positive", opinion_words="Lovely")]}
    ],
}  # fmt: skip
# ACSA, one row per aspect (renamed columns); a row with no category and no polarity: a sentence without aspects
ACSA_HEADER = ["sid", "text", "aspect", "label"]
ACSA = {
    "train": [["1", "Great pasta, rude staff.", "FOOD#QUALITY", "positive"],
              ["1", "Great pasta, rude staff.", "SERVICE#GENERAL", "negative"],
              ["2", "Nothing to add.", "", ""]],
    "dev": [["3", "Cheap wine.", "DRINKS#PRICES", "positive"]],
    "test": [["4", "Pricey, but the view!", "RESTAURANT#PRICES", "negative"],
             ["5", "Okay.", "RESTAURANT#GENERAL", "neutral"],
             ["4", "Pricey, but the view!", "AMBIENCE#GENERAL", "positive"]],
}  # fmt: skip


def _write_json(path: Path, records, bom: bool = True) -> Path:
    path.write_text(("\ufeff" if bom else "") + json.dumps(records, indent=1), encoding="utf-8")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    """The ATSA set as benchmark JSON (with hard_test) and the ACSA set as flat CSV (without)."""
    atsa, acsa = tmp_path / "data" / "atsa", tmp_path / "data" / "acsa"
    atsa.mkdir(parents=True)
    acsa.mkdir(parents=True)
    for split, records in ATSA.items():
        _write_json(atsa / f"{split}.json", records)
    for split, rows in ACSA.items():
        _write_csv(acsa / f"{split}.csv", ACSA_HEADER, rows)
    return {"atsa": atsa, "acsa": acsa}


ATSA_YAML = """
  atsa/mine:
    task: atsa
    source: {atsa}
    files: {{train: train.json, dev: dev.json, test: test.json, hard_test: hard_test.json}}
"""
ACSA_YAML = """
  acsa/mine:
    task: acsa
    source: {acsa}
    files: {{train: train.csv, dev: dev.csv, test: test.csv}}
    columns: {{ID: sid, sentence: text, category: aspect, polarity: label}}
"""


def _compose(tmp_path: Path, custom: str, datasets: str = "[atsa/mine, acsa/mine]", name: str = "mine") -> dict:
    """Compose the real config with a user `data` group file, as a user would (no code, no overrides of dicts)."""
    conf = tmp_path / "myconf" / "data"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / f"{name}.yaml").write_text(f"defaults:\n  - fsa\n  - _self_\ndatasets: {datasets}\ncustom:{custom}")
    return compose_config([f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", f"data={name}"])


def _cfg(tmp_path: Path, data: dict[str, Path], extra: str = "") -> dict:
    return _compose(tmp_path, ATSA_YAML.format(**data) + ACSA_YAML.format(**data) + extra)


def _rows(folder: str | Path, split: str) -> list[dict]:
    return pq.read_table(Path(folder) / f"{split}.parquet").to_pylist()


# --- acquired through config only ------------------------------------------------------------------------------


def test_json_and_csv_user_datasets_are_acquired_like_the_builtins(tmp_path, data):
    cfg = _cfg(tmp_path, data)
    assert cfg["data"]["datasets"] == ["atsa/mine", "acsa/mine"]
    assert "atsa/rest14" not in cfg["data"]["custom"] and set(cfg["data"]["custom"]) == {"atsa/mine", "acsa/mine"}
    store = tmp_path / "store"

    atsa = acquire.run(store, acquire.params(cfg, dataset="atsa/mine"))
    meta = read_meta(atsa.path)
    assert meta["task"] == "atsa" and meta["slug"] == "atsa-mine" and meta["custom"] is True
    assert meta["counts"] == {"train": 2, "dev": 1, "test": 3, "hard_test": 1} and meta["absent_splits"] == []
    test = {r["ID"]: r for r in _rows(atsa.path, "test")}
    assert list(test) == ["x1", "x2", "x3"]
    assert test["x1"]["target"] == "fish | positive ; service | negative"  # ordered by span start
    assert test["x1"]["aspects"][1]["opinion_words"] == ["great"] and test["x1"]["mams"]
    assert not test["x1"]["implicit"] and test["x2"]["implicit"]
    assert test["x3"]["target"] == "" and test["x3"]["aspects"] == []
    assert _rows(atsa.path, "train")[1]["target"] == ""  # sentences without aspects are kept
    assert [r["split"] for r in _rows(atsa.path, "hard_test")] == ["hard_test"]

    acsa = acquire.run(store, acquire.params(cfg, dataset="acsa/mine"))
    meta = read_meta(acsa.path)
    assert meta["task"] == "acsa" and meta["counts"] == {"train": 2, "dev": 1, "test": 2, "hard_test": 0}
    assert meta["absent_splits"] == ["hard_test"]
    train = _rows(acsa.path, "train")
    assert [(r["ID"], r["target"]) for r in train] == [
        ("1", "food quality | positive ; service general | negative"),
        ("2", ""),
    ]
    test = _rows(acsa.path, "test")  # rows grouped by ID, in order of first appearance
    assert [(r["ID"], r["target"], r["mams"]) for r in test] == [
        ("4", "restaurant prices | negative ; ambience general | positive", True),
        ("5", "restaurant general | neutral", False),
    ]
    assert test[0]["implicit"]  # no opinion-words column: every aspect is implicit
    assert pq.read_table(Path(acsa.path) / "hard_test.parquet").num_rows == 0


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "flat-jsonl", "flat-parquet", "tsv"])
def test_every_format_and_layout_reads_the_same_rows(tmp_path, data, fmt):
    """The ATSA set as JSON lines / nested Parquet, and flat (one row per aspect) as JSON lines, Parquet, TSV."""
    folder = tmp_path / "other"
    folder.mkdir()
    flat = fmt.startswith("flat") or fmt == "tsv"
    for split in SPLITS:
        records = ATSA[split]
        if flat:
            rows = [
                {"id": r["ID"], "text": r["sentence"], "term": a["target"], "polarity": a["polarity"],
                 "from": int(a["from"]), "to": int(a["to"])}
                for r in records for a in (r.get("aspects") or [None]) if a
            ] + [{"id": r["ID"], "text": r["sentence"], "term": "", "polarity": "", "from": None, "to": None}
                 for r in records if not r.get("aspects")]  # fmt: skip
        else:
            rows = [{"ID": r["ID"], "sentence": r["sentence"], "aspects": [
                {**a, "from": int(a["from"]), "to": int(a["to"]), "opinion_words": None}
                for a in r.get("aspects") or []]} for r in records]  # fmt: skip
        if fmt.endswith("jsonl"):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in rows), encoding="utf-8")
        elif fmt == "tsv":
            keys = list(rows[0])
            with open(folder / f"{split}.tsv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, delimiter="\t")
                writer.writerow(keys)
                writer.writerows([["" if r[k] is None else r[k] for k in keys] for r in rows])
        else:
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")
    ext = {"tsv": "tsv"}.get(fmt, fmt.split("-")[-1])
    columns = "columns: {ID: id, sentence: text, target: term}" if flat else ""
    layout = "layout: flat" if flat and fmt != "tsv" else ""
    cfg = _compose(
        tmp_path,
        f"""
  atsa/other:
    task: atsa
    source: {folder}
    files: {{train: train.{ext}, dev: dev.{ext}, test: test.{ext}}}
    {columns}
    {layout}
""",
        datasets="[atsa/other]",
    )
    art = acquire.run(tmp_path / "store", acquire.params(cfg, dataset="atsa/other"))
    got = {r["ID"]: r["target"] for r in _rows(art.path, "test")}
    assert got == {"x1": "fish | positive ; service | negative", "x2": "terrace | positive", "x3": ""}
    assert read_meta(art.path)["counts"]["train"] == 2


def test_key_follows_content_not_location(tmp_path, data):
    cfg = _cfg(tmp_path, data)
    key = acquire.key(acquire.params(cfg, dataset="atsa/mine"))
    moved = tmp_path / "moved"
    shutil.copytree(data["atsa"], moved)
    cfg_moved = _compose(tmp_path, ATSA_YAML.format(atsa=moved), datasets="[atsa/mine]", name="moved")
    assert acquire.key(acquire.params(cfg_moved, dataset="atsa/mine")) == key
    # the other dataset has its own key
    assert acquire.key(acquire.params(cfg, dataset="acsa/mine")) != key
    # one edited byte in one file: a new key
    dev = moved / "dev.json"
    dev.write_text(dev.read_text(encoding="utf-8").replace("Lovely", "Lively"), encoding="utf-8")
    assert acquire.key(acquire.params(cfg_moved, dataset="atsa/mine")) != key
    # so are reading settings: the same bytes read with another column mapping are another dataset
    renamed = _compose(
        tmp_path, ATSA_YAML.format(**data) + "    columns: {opinion_words: opinions}\n", "[atsa/mine]", "renamed"
    )
    assert acquire.key(acquire.params(renamed, dataset="atsa/mine")) != key


def test_pinned_checksums_key_and_verify(tmp_path, data):
    import hashlib

    digest = hashlib.sha256((data["acsa"] / "test.csv").read_bytes()).hexdigest()
    pinned = ACSA_YAML.format(**data) + f"    sha256: {{test: {digest}}}\n"
    cfg = _compose(tmp_path, pinned, datasets="[acsa/mine]")
    params = acquire.params(cfg, dataset="acsa/mine")
    assert params["checksums"]["test"] == digest
    acquire.run(tmp_path / "store", params)
    wrong = ACSA_YAML.format(**data) + f"    sha256: {{test: '{'0' * 64}'}}\n"
    cfg = _compose(tmp_path, wrong, datasets="[acsa/mine]", name="wrong")
    with pytest.raises(InputError, match=r"test\.csv: sha256 [0-9a-f]{64} does not match 0{64} \(pinned in "
                                         r"data\.custom\.acsa/mine\.sha256\.test"):  # fmt: skip
        acquire.run(tmp_path / "store2", acquire.params(cfg, dataset="acsa/mine"))


def test_a_url_base_is_read_and_keyed_by_url_when_unpinned(tmp_path, data):
    yaml = ATSA_YAML.format(atsa=data["atsa"].as_uri())
    cfg = _compose(tmp_path, yaml, datasets="[atsa/mine]")
    params = acquire.params(cfg, dataset="atsa/mine")
    assert params["custom"]["unverified"]["test"] == f"{data['atsa'].as_uri()}/test.json"
    art = acquire.run(tmp_path / "store", params)
    assert read_meta(art.path)["counts"]["test"] == 3


def test_limit_applies_to_user_datasets(tmp_path, data):
    cfg = _cfg(tmp_path, data)
    cfg["data"]["limit"] = 1
    art = acquire.run(tmp_path / "store", acquire.params(cfg, dataset="atsa/mine"))
    assert read_meta(art.path)["counts"] == {"train": 1, "dev": 1, "test": 1, "hard_test": 1}


# --- scored by `fsa-distill score` -----------------------------------------------------------------------------


def _predictions(path: Path, predictions: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"ID": i, "prediction": p}) + "\n" for i, p in predictions.items()))
    return path


def test_user_datasets_are_scored_on_test_and_hard_test(tmp_path, data):
    cfg = _cfg(tmp_path, data)
    custom = cfg["data"]["custom"]
    gold = {r["ID"]: r["target"] for r in load_test_rows("atsa/mine", cfg["data"]["source"], custom)}
    assert gold == {
        "x1": "fish | positive ; service | negative",
        "x2": "terrace | positive",
        "x3": "",
        "h1": "terrace | positive",
    }
    result = score_file("atsa/mine", _predictions(tmp_path / "atsa.jsonl", gold), cfg["data"]["source"], custom)
    assert set(result) == {"normal", "implicit", "mams", "hard"}
    assert all(v["f1"] == pytest.approx(1.0) for v in result.values())
    # flat CSV without a hard_test: its test rows only (grouped by ID)
    acsa = {"4": "restaurant prices | negative ; ambience general | positive", "5": "restaurant general | neutral"}
    result = score_file("acsa/mine", _predictions(tmp_path / "acsa.jsonl", acsa), cfg["data"]["source"], custom)
    assert result["normal"]["f1"] == pytest.approx(1.0)
    with pytest.raises(InputError, match=r"1 of 2 test/hard_test IDs have no prediction"):
        score_file("acsa/mine", _predictions(tmp_path / "part.jsonl", {"4": ""}), cfg["data"]["source"], custom)
    # a bad test record is the acquire stage's error, naming file and record
    _bad_test_json(data, [GOOD, {"ID": "b2", "aspects": []}])
    with pytest.raises(InputError, match=r"test\.json \[record 1\], record ID 'b2': missing or non-string"):
        score_file("atsa/mine", tmp_path / "atsa.jsonl", cfg["data"]["source"], custom)


def test_cli_scores_a_user_dataset_declared_in_a_config_file(tmp_path, data):
    _cfg(tmp_path, data)  # writes myconf/data/mine.yaml
    preds = _predictions(
        tmp_path / "p.jsonl",
        {"x1": "fish | positive ; service | negative", "x2": "terrace | positive", "x3": "", "h1": ""},
    )
    argv = [sys.executable, "-m", "fsa_distill.cli", "score", "--dataset", "atsa/mine", "--predictions", str(preds)]
    overrides = [f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "data=mine"]
    out = subprocess.run([*argv, *overrides], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["hard"] == {"precision": 1.0, "recall": 0.0, "f1": 0.0}
    assert result["normal"]["precision"] == 1.0 and result["normal"]["recall"] == 0.75  # normal spans hard_test
    # without the config file that declares it, the dataset is unknown: exit 2, every known name listed
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 2 and "unknown dataset 'atsa/mine'; known: atsa/rest14" in out.stderr


# --- bad records: one clear error naming file, record and problem; no output ------------------------------------


def _acquire_fails(tmp_path: Path, data: dict[str, Path], dataset: str, message: str) -> None:
    cfg = _cfg(tmp_path, data)
    store = tmp_path / "store"
    with pytest.raises(InputError, match=message):
        acquire.run(store, acquire.params(cfg, dataset=dataset))
    left = list((store / "acquire").iterdir()) if (store / "acquire").exists() else []
    assert left == [], f"half-written output: {left}"


def _bad_test_json(data, records=None, text=None) -> None:
    path = data["atsa"] / "test.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    else:
        _write_json(path, records)


GOOD = {"ID": "g1", "sentence": S3, "aspects": [_aspect(S3, "terrace", "positive")]}


def _term(term, start=None, end=None, polarity="positive") -> dict:
    aspect = {"target": term, "polarity": polarity}
    return {**aspect, **({} if start is None else {"from": start}), **({} if end is None else {"to": end})}


def _one(*aspects) -> dict:
    return {"ID": "b1", "sentence": S3, "aspects": list(aspects)}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([GOOD, {"ID": "b2", "aspects": []}],
         r"test\.json \[record 1\], record ID 'b2': missing or non-string 'sentence'"),
        ([GOOD, {"ID": "b2", "sentence": "  ", "aspects": []}], r"\[record 1\], record ID 'b2': empty 'sentence'"),
        ([GOOD, {"ID": "b2", "sentence": S3, "aspects": [{**_aspect(S3, "terrace", "positive"), "polarity": "good"}]}],
         r"test\.json \[record 1\], record ID 'b2': aspect 0 has polarity 'good', expected one of \('positive'"),
        ([_one(_term("terrace", 7, 99))],
         r"test\.json \[record 0\], record ID 'b1': aspect 0: span 7:99 is outside the sentence \(length 15\)"),
        ([_one(_term("terrace", -1, 3))],
         r"record ID 'b1': aspect 0: span -1:3 is outside the sentence"),
        ([_one(GOOD["aspects"][0], _term("terrace", 0, 6))],
         r"record ID 'b1': aspect 1: term 'terrace' does not match its span 0:6, which is 'Lovely'"),
        ([_one(_term("garden"))],
         r"record ID 'b1': aspect 0: term 'garden' does not occur in the sentence"),
        ([_one(_term("terrace", 7))],
         r"record ID 'b1': aspect 0: the span has 'from' but no 'to'"),
        ([_one(_term("terrace", "x", 3))],
         r"record ID 'b1': aspect 0: span offset 'x' is not an integer"),
        ([GOOD, "just text"], r"test\.json \[record 1\]: record is a str, not an object"),
        ([GOOD, {**GOOD, "sentence": "Lovely terrace!"}], r"test\.json: duplicate record ID 'g1' \(records 0 and 1\)"),
        ([{"ID": "h1", "sentence": S3, "aspects": []}], r"hard_test\.json: record ID 'h1' is also in .*test\.json"),
        ([{"ID": "b1", "sentence": S3}], r"test\.json: no record has an 'aspects' field"),
    ],
)  # fmt: skip
def test_bad_json_record_names_file_record_and_problem(tmp_path, data, records, message):
    _bad_test_json(data, records)
    _acquire_fails(tmp_path, data, "atsa/mine", message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"ID": "a", "sentence": "ok", "aspects": []},\n {"ID": "b", "sentence": }]',
         r"test\.json: malformed JSON at line 2, column 26"),
        ('{"ID": "a", "sentence": "ok", "aspects": []}', r"test\.json: expected a JSON array.*set format: jsonl"),
        ("", r"test\.json: empty file \(no records\)"),
        ("\ufeff \n", r"test\.json: empty file \(no records\)"),
        ("[]", r"test\.json: no records \(an empty json file\)"),
    ],
)  # fmt: skip
def test_malformed_or_empty_json_file(tmp_path, data, text, message):
    _bad_test_json(data, text=text)
    _acquire_fails(tmp_path, data, "atsa/mine", message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('sid,text,aspect,label\n1,"Open quote,FOOD#QUALITY,positive\n',
         r"test\.csv \[line \d+\]: malformed CSV"),
        ("sid,text,aspect,label\n1,Fine.,FOOD#QUALITY,positive\n2,Bad.,FOOD#QUALITY,negative,extra\n",
         r"test\.csv \[row 1, line 3\]: malformed CSV: 5 fields, the header has 4"),
        ("sid,text,aspect,label\n1,Fine.,FOOD#QUALITY,positive\n2,,FOOD#QUALITY,negative\n",
         r"test\.csv \[row 1, line 3\], record ID '2': missing or empty 'sentence' \(column 'text'\)"),
        ("sid,text,aspect,label\n1,Fine.,FOOD#QUALITY,positive\n1,Fine.,SERVICE#GENERAL,Positive\n",
         r"test\.csv \[record 0\], record ID '1': aspect 1 \(row 1, line 3\) has polarity 'Positive'"),
        ("sid,text,aspect,label\n1,Fine.,,positive\n",
         r"test\.csv \[record 0\], record ID '1': aspect 0 \(row 0, line 2\) has no category"),
        ("sid,text,aspect,label\n1,Fine.,FOOD#QUALITY,positive\n1,Fine!,FOOD#PRICES,positive\n",
         r"test\.csv \[row 1, line 3\], record ID '1': its sentence differs from the one in row 0, line 2"),
        ("sid,text,aspect,label\n,Fine.,FOOD#QUALITY,positive\n",
         r"test\.csv \[row 0, line 2\]: empty ID \(column 'sid'\)"),
        ("sid,sentence,aspect,label\n1,Fine.,FOOD#QUALITY,positive\n",
         r"test\.csv \[row 0, line 2\]: no column 'text' \(sentence; set columns\.sentence\); the row has sid, "),
        ("sid,text,aspect,label\n", r"test\.csv: no records \(an empty csv file\)"),
        ("", r"test\.csv: empty file \(no records\)"),
    ],
)  # fmt: skip
def test_bad_csv_names_file_row_and_problem(tmp_path, data, text, message):
    (data["acsa"] / "test.csv").write_text(text, encoding="utf-8")
    _acquire_fails(tmp_path, data, "acsa/mine", message)


def test_bad_jsonl_and_parquet_files(tmp_path, data):
    folder = tmp_path / "more"
    folder.mkdir()
    for split in ("train", "dev"):
        (folder / f"{split}.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    (folder / "test.jsonl").write_text(json.dumps(GOOD) + "\n\n" + '{"ID": "b", ', encoding="utf-8")
    (folder / "hard_test.parquet").write_bytes(b"PAR1 not really")
    yaml = f"""
  atsa/more:
    task: atsa
    source: {folder}
    files: {{train: train.jsonl, dev: dev.jsonl, test: test.jsonl, hard_test: hard_test.parquet}}
"""
    cfg = _compose(tmp_path, yaml, datasets="[atsa/more]")
    with pytest.raises(InputError, match=r"test\.jsonl \[record 1, line 3\]: malformed JSON at column"):
        acquire.run(tmp_path / "store", acquire.params(cfg, dataset="atsa/more"))
    (folder / "test.jsonl").write_text(json.dumps({**GOOD, "ID": "t"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"hard_test\.parquet: malformed Parquet"):
        acquire.run(tmp_path / "store", acquire.params(cfg, dataset="atsa/more"))
    assert not (tmp_path / "store" / "acquire").exists() or not any((tmp_path / "store" / "acquire").iterdir())


def test_missing_file_is_named_before_anything_runs(tmp_path, data):
    (data["atsa"] / "dev.json").unlink()
    cfg = _cfg(tmp_path, data)
    with pytest.raises(
        InputError, match=r"atsa/dev\.json: file not found \(check data\.custom\.atsa/mine\.files\.dev\)"
    ):
        acquire.params(cfg, dataset="atsa/mine")


# --- bad settings: composition fails naming the key -----------------------------------------------------------


def _entry(**kw) -> dict:
    return {"task": "atsa", "files": {"train": "a.json", "dev": "b.json", "test": "c.json"}, **kw}


@pytest.mark.parametrize(
    ("name", "entry", "message"),
    [
        ("mine", _entry(task="absa"), r"data\.custom\.mine\.task: 'absa' is not one of atsa, acsa"),
        ("mine", _entry(files={"train": "a.json", "test": "c.json"}),
         r"data\.custom\.mine\.files must name train, dev, test \(hard_test is optional\); missing: dev"),
        ("mine", _entry(files={"train": "a.json", "dev": "b.json", "test": "c.json", "val": "d.json"}),
         r"files: unknown split\(s\) \['val'\]"),
        ("mine", _entry(format="xml"), r"data\.custom\.mine\.format: 'xml' is not one of json, jsonl, csv, parquet"),
        ("mine", _entry(files={"train": "a.txt", "dev": "b.json", "test": "c.json"}),
         r"files\.train: cannot tell the format of 'a\.txt'"),
        ("mine", _entry(format="csv", layout="nested"), r"layout: CSV cannot hold nested aspects"),
        ("mine", _entry(layout="wide"), r"layout: 'wide' is not one of nested, flat"),
        ("mine", _entry(columns={"text": "review"}), r"columns: unknown field\(s\) \['text'\]"),
        ("mine", _entry(sha256={"hard_test": "0" * 64}), r"sha256 names splits that have no file: \['hard_test'\]"),
        ("mine", _entry(sha256={"test": "abc"}), r"sha256\.test: 'abc' is not a sha256 hex digest"),
        ("atsa/rest14", _entry(), r"'atsa/rest14' is a built-in dataset"),
        ("a/b/c", _entry(), r"data\.custom\.a/b/c: a dataset name is"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_key(name, entry, message):
    with pytest.raises(InputError, match=message):
        user_spec(name, entry)


def test_composition_checks_settings_and_lists_user_datasets(tmp_path, data):
    with pytest.raises(InputError, match=r"data\.custom\.atsa/mine\.task: 'absa'"):
        _compose(tmp_path, ATSA_YAML.format(**data).replace("task: atsa", "task: absa"), "[atsa/rest14]", "bad")
    with pytest.raises(ValueError, match=r"unknown dataset 'atsa/mien'; known: atsa/rest14, .*, atsa/mine"):
        _compose(tmp_path, ATSA_YAML.format(**data), "[atsa/mien]", "typo")
    # built-ins and user datasets side by side
    cfg = _compose(tmp_path, ATSA_YAML.format(**data), "[atsa/rest14, atsa/mine]", "both")
    assert cfg["data"]["datasets"] == ["atsa/rest14", "atsa/mine"]
