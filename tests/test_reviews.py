"""The reviews stage: the real review mirror, deterministic sampling, row quarantine and whole-file errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from fsa_distill.tasks.reviews import QUARANTINE_SCHEMA, SCHEMA, reviews, source_fingerprints

from fsa_distill.errors import InputError

MIRROR = Path(os.environ["FSA_DATA_SOURCE"]).parent / "reviews"
MIRROR_SOURCES = [
    {
        "name": "yelp",
        "kind": "yelp",
        "path": "yelp/yelp.csv",
        "exclude_ids": "yelp/review_ids_overlapping_yelp_eval_sets.txt",
    },
    {"name": "amazon-multidomain", "kind": "amazon_multidomain", "path": "amazon-multidomain"},
    {"name": "amazon-alexa", "kind": "alexa", "path": "amazon-alexa/amazon_alexa.tsv"},
]


def config(root: Path, sources: list[dict], **extra: Any) -> dict[str, Any]:
    return {"root": str(root), "sources": sources, "per_domain": None, "seed": 0, "max_bytes": 100_000, **extra}


def run(store: Path, cfg: dict[str, Any]) -> tuple[Path, pa.Table, list[dict], dict]:
    art = reviews.run(store, {"reviews": cfg, "fingerprints": source_fingerprints(cfg)})
    out = Path(art.path)
    return (
        out,
        pq.read_table(out / "reviews.parquet"),
        pq.read_table(out / "quarantine.parquet").to_pylist(),
        json.loads((out / "stats.json").read_text()),
    )


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> tuple[pa.Table, list[dict], dict, float]:
    """The whole real mirror, unsampled."""
    if not MIRROR.is_dir():
        pytest.fail(f"review mirror not found at {MIRROR}")
    start = time.perf_counter()
    _, table, quarantined, stats = run(tmp_path_factory.mktemp("mirror"), config(MIRROR, MIRROR_SOURCES))
    return table, quarantined, stats, time.perf_counter() - start


def test_real_mirror_counts(mirror):
    table, quarantined, stats, seconds = mirror
    assert table.schema.equals(SCHEMA)
    src = stats["sources"]
    assert (src["yelp"]["read"], src["yelp"]["excluded"], src["yelp"]["kept"]) == (10_000, 12, 9_988)
    assert src["amazon-multidomain"]["kept"] == 8_000 and src["amazon-multidomain"]["quarantined"] == {}
    assert src["amazon-multidomain"]["files"]["amazon-multidomain/books.jsonl"] == 2_000
    assert (src["amazon-alexa"]["read"], src["amazon-alexa"]["kept"]) == (3_150, 3_071)
    assert stats["domains"] == {
        "amazon-alexa": 3_071,
        "books": 2_000,
        "dvd": 2_000,
        "electronics": 2_000,
        "kitchen": 2_000,
        "yelp": 9_988,
    }
    assert stats["total"]["read"] == 21_150 == table.num_rows + len(quarantined) + stats["total"]["excluded"]
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids) == 21_059
    ratings = table.column("rating").to_pylist()
    assert set(ratings) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert seconds < 20  # about half a second here; a loose bound for a busy 2-core machine


def test_excluded_yelp_ids_are_absent(mirror):
    table, _, stats, _ = mirror
    excluded = (MIRROR / "yelp/review_ids_overlapping_yelp_eval_sets.txt").read_text().split()
    assert len(excluded) == 12 and stats["sources"]["yelp"]["exclude_ids_not_found"] == 0
    ids = set(table.column("id").to_pylist())
    assert not ids & {f"yelp:{i}" for i in excluded}
    assert "yelp:fWKvX83p0-ka4JS3dc6E5A" in ids


def test_alexa_blank_reviews_are_quarantined_and_one_character_reviews_kept(mirror):
    table, quarantined, stats, _ = mirror
    blank = [q for q in quarantined if q["source"] == "amazon-alexa"]
    assert len(blank) == 79 and {q["reason"] for q in blank} == {"empty_text"}
    assert stats["sources"]["amazon-alexa"]["quarantined"] == {"empty_text": 79}
    assert all(q["file"] == "amazon-alexa/amazon_alexa.tsv" and q["id"] == f"amazon-alexa:row{q['row']}" for q in blank)
    alexa = [r for r in table.to_pylist() if r["source"] == "amazon-alexa"]
    assert [r["text"] for r in alexa if len(r["text"]) == 1] == ["😍", "😍"]
    assert alexa[0] == {
        "id": "amazon-alexa:row1",
        "text": "Love my Echo!",
        "rating": 5.0,
        "domain": "amazon-alexa",
        "source": "amazon-alexa",
    }


def test_per_domain_sampling_is_deterministic(tmp_path):
    cfg = config(MIRROR, MIRROR_SOURCES, per_domain=10, seed=3)
    _, first, _, stats = run(tmp_path / "a", cfg)
    _, again, _, _ = run(tmp_path / "b", cfg)
    assert first.equals(again)
    assert stats["domains"] == dict.fromkeys(["amazon-alexa", "books", "dvd", "electronics", "kitchen", "yelp"], 10)
    assert stats["sources"]["yelp"]["sampled_out"] == 9_978
    _, other_seed, _, _ = run(tmp_path / "c", {**cfg, "seed": 4})
    assert set(other_seed.column("id").to_pylist()) != set(first.column("id").to_pylist())


def test_per_domain_sample_does_not_depend_on_file_order(tmp_path):
    lines = (MIRROR / "amazon-multidomain/books.jsonl").read_bytes().splitlines(keepends=True)
    for name, content in (("forward", lines), ("reversed", lines[::-1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "books.jsonl").write_bytes(b"".join(content))
    samples = []
    for name in ("forward", "reversed"):
        source = {"name": "books", "kind": "amazon_multidomain", "path": name}
        _, table, _, _ = run(tmp_path / f"store-{name}", config(tmp_path, [source], per_domain=25))
        samples.append(set(table.column("id").to_pylist()))
    assert samples[0] == samples[1] and len(samples[0]) == 25


BIG = "Great blender. " * 70_000  # a 1 MB review


def test_every_quarantine_reason_in_a_csv(tmp_path):
    rows = [
        b"review_id,body,stars",
        b"good1,The jar is sturdy and the motor is strong.,5",
        b"empty,,4",
        b'blank,"   ",4',
        b"badutf8,Caf\xe9 au lait was \xff\xfe lovely,4",
        b"huge," + BIG.encode() + b",2",
        b"norating,Nice enough.,",
        b"words,Nice enough.,five",
        b"toomany,a,b,c,d",
        b",No id here.,3",
        b"good1,Same id again.,3",
        b"good2,\xc3\xa9clair was fine (valid UTF-8).,4",
    ]
    (tmp_path / "user.csv").write_bytes(b"\n".join(rows) + b"\n")
    source = {"name": "u", "kind": "csv", "path": "user.csv", "text_column": "body"}
    source |= {"rating_column": "stars", "id_column": "review_id"}
    out, table, quarantined, stats = run(tmp_path / "store", config(tmp_path, [source]))
    assert table.column("id").to_pylist() == ["u:good1", "u:good2"]
    assert table.column("text").to_pylist()[1] == "éclair was fine (valid UTF-8)."
    reasons = {q["row"]: (q["id"], q["reason"]) for q in quarantined}
    assert reasons == {
        2: ("u:empty", "empty_text"),
        3: ("u:blank", "empty_text"),
        4: ("u:badutf8", "invalid_utf8"),
        5: ("u:huge", "too_long"),
        6: ("u:norating", "bad_rating"),
        7: ("u:words", "bad_rating"),
        8: (None, "malformed_record"),
        9: (None, "missing_id"),
        10: ("u:good1", "duplicate_id"),
    }
    by_reason = {q["reason"]: q for q in quarantined}
    assert by_reason["invalid_utf8"]["text"] == "Caf� au lait was �� lovely"
    assert len(by_reason["too_long"]["text"]) == 1000 and by_reason["too_long"]["file"] == "user.csv"
    assert stats["sources"]["u"]["quarantined"] == {
        "malformed_record": 1,
        "invalid_utf8": 1,
        "empty_text": 2,
        "too_long": 1,
        "bad_rating": 2,
        "missing_id": 1,
        "duplicate_id": 1,
    }
    assert pq.read_schema(out / "quarantine.parquet").equals(QUARANTINE_SCHEMA)


def test_every_quarantine_reason_in_json_lines(tmp_path):
    records = [
        json.dumps({"id": 1, "review": "Sturdy and quiet.", "score": 4, "cat": "kitchen"}).encode(),
        json.dumps({"id": 2, "review": "", "score": 4}).encode(),
        json.dumps({"id": 3, "score": 4}).encode(),
        b'{"id": 4, "review": "bad \xff bytes", "score": 3, "cat": "kitchen"}',
        json.dumps({"id": 5, "review": BIG, "score": 2}).encode(),
        json.dumps({"id": 6, "review": "No score."}).encode(),
        json.dumps({"id": 7, "review": "Infinite score.", "score": "inf"}).encode(),
        b'{"id": 8, "review": "cut off',
        b"",
        json.dumps({"id": 9, "review": "Works great.", "score": "5", "cat": None}).encode(),
    ]
    (tmp_path / "user.jsonl").write_bytes(b"\n".join(records) + b"\n")
    source = {"name": "j", "kind": "jsonl", "path": "user.jsonl", "text_column": "review", "rating_column": "score"}
    source |= {"id_column": "id", "domain_column": "cat"}
    out, table, quarantined, _ = run(tmp_path / "store", config(tmp_path, [source], max_bytes=50_000))
    assert table.to_pylist() == [
        {"id": "j:1", "text": "Sturdy and quiet.", "rating": 4.0, "domain": "kitchen", "source": "j"},
        {"id": "j:9", "text": "Works great.", "rating": 5.0, "domain": "j", "source": "j"},
    ]
    assert {q["row"]: q["reason"] for q in quarantined} == {
        2: "empty_text",
        3: "empty_text",
        4: "invalid_utf8",
        5: "too_long",
        6: "bad_rating",
        7: "bad_rating",
        8: "malformed_record",
    }
    assert pq.read_schema(out / "quarantine.parquet").equals(QUARANTINE_SCHEMA)


def test_user_corpus_in_csv_jsonl_and_parquet(tmp_path):
    rows = [
        {"rid": "a1", "body": "The battery lasts two days.", "stars": 5, "category": "phones"},
        {"rid": "a2", "body": 'Screen scratches easily, "sadly".', "stars": 2, "category": "phones"},
        {"rid": "b1", "body": "Line one.\nLine two, with a comma.", "stars": 3, "category": "tablets"},
    ]
    table = pa.Table.from_pylist(rows)
    (tmp_path / "csv").mkdir()
    (tmp_path / "pq").mkdir()
    pacsv.write_csv(table, tmp_path / "csv" / "part1.csv")
    (tmp_path / "user.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(table.slice(0, 2), tmp_path / "pq" / "a.parquet")
    pq.write_table(table.slice(2), tmp_path / "pq" / "b.parquet")
    columns = {"text_column": "body", "rating_column": "stars", "id_column": "rid", "domain_column": "category"}
    results = []
    for kind, path in (("csv", "csv"), ("jsonl", "user.jsonl"), ("parquet", "pq")):
        source = {"name": "mine", "kind": kind, "path": path, **columns}
        _, out, quarantined, _ = run(tmp_path / f"store-{kind}", config(tmp_path, [source]))
        assert quarantined == []
        results.append(out.to_pylist())
    assert results[0] == results[1] == results[2]
    assert [r["text"] for r in results[0]] == [r["body"] for r in rows]
    assert [r["domain"] for r in results[0]] == ["phones", "phones", "tablets"]


def test_source_without_rating_or_id_columns(tmp_path):
    (tmp_path / "plain.tsv").write_text("text\nFirst review.\nSecond review.\n")
    source = {"name": "p", "kind": "csv", "path": "plain.tsv", "rating_column": None, "domain": "misc"}
    _, table, _, _ = run(tmp_path / "store", config(tmp_path, [source]))
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["p:row1", "p:row2"] and {r["domain"] for r in rows} == {"misc"}
    assert all(math.isnan(r["rating"]) for r in rows)


@pytest.mark.parametrize(
    ("name", "kind", "content", "message"),
    [
        (
            "nocol.csv",
            "csv",
            b"id,body\n1,hello\n",
            r"nocol\.csv: no text column 'text'; the columns are \['id', 'body'\]",
        ),
        (
            "notcsv.csv",
            "csv",
            b'{"text": "a", "b": 1, "c": 2}\n{"text": "b"}\n{"x": 1, "y": [1, 2, 3]}\n',
            "not parseable as CSV",
        ),
        ("empty.csv", "csv", b"", r"empty\.csv: empty file, not CSV"),
        ("table.jsonl", "jsonl", b"text,rating\nnice,5\n", r"table\.jsonl: not parseable as JSON lines"),
        (
            "notext.jsonl",
            "jsonl",
            b'{"body": "x", "rating": 1}\n',
            r"notext\.jsonl: no record has the text field 'text'",
        ),
        ("junk.parquet", "parquet", b"PAR1 but not really", r"junk\.parquet: not a readable Parquet file"),
    ],
)
def test_unusable_files_raise_input_error_naming_them(tmp_path, name, kind, content, message):
    (tmp_path / name).write_bytes(content)
    cfg = config(tmp_path, [{"name": "bad", "kind": kind, "path": name}])
    with pytest.raises(InputError, match=message):
        run(tmp_path / "store", cfg)
    assert not list((tmp_path / "store").rglob("*.parquet"))


def test_missing_file_and_bad_config(tmp_path):
    with pytest.raises(InputError, match=r"nope\.csv: file not found \(source 'x'"):
        source_fingerprints(config(tmp_path, [{"name": "x", "kind": "csv", "path": "nope.csv"}]))
    with pytest.raises(InputError, match="unknown kind 'xml'"):
        source_fingerprints(config(tmp_path, [{"name": "x", "kind": "xml", "path": "a.xml"}]))
    (tmp_path / "a.csv").write_text("text\nhi\n")
    twice = [{"name": "x", "kind": "csv", "path": "a.csv"}] * 2
    with pytest.raises(InputError, match="unique"):
        source_fingerprints(config(tmp_path, twice))


def test_cache_key_follows_file_content(tmp_path):
    shutil.copytree(MIRROR / "amazon-alexa", tmp_path / "amazon-alexa")
    cfg = config(tmp_path, [MIRROR_SOURCES[2]])
    prints = source_fingerprints(cfg)
    assert list(prints) == ["amazon-alexa:amazon-alexa/amazon_alexa.tsv"]
    first = reviews.run(tmp_path / "store", {"reviews": cfg, "fingerprints": prints})
    assert reviews.run(tmp_path / "store", {"reviews": cfg, "fingerprints": prints}) == first
    tsv = tmp_path / "amazon-alexa/amazon_alexa.tsv"
    tsv.chmod(0o644)
    tsv.write_bytes(tsv.read_bytes().replace(b"Love my Echo!", b"Like my Echo!", 1))
    # fingerprints taken before the edit are refused when the stage runs: no output under a stale key
    with pytest.raises(InputError, match="changed since their fingerprints were taken"):
        reviews.run(tmp_path / "fresh", {"reviews": cfg, "fingerprints": prints})
    second = reviews.run(tmp_path / "store", {"reviews": cfg, "fingerprints": source_fingerprints(cfg)})
    assert second.path != first.path
    assert pq.read_table(Path(second.path) / "reviews.parquet").column("text")[0].as_py() == "Like my Echo!"


def test_hub_source_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = {"name": "hub", "kind": "hf", "path": "no-such-user/no-such-reviews", "split": "train"}
    cfg = config(tmp_path, [source])
    assert source_fingerprints(cfg) == {"hub:hf": "hf:no-such-user/no-such-reviews:train"}
    with pytest.raises(InputError, match=r"cannot load hub dataset 'no-such-user/no-such-reviews'.*HF_HUB_OFFLINE"):
        run(tmp_path / "store", cfg)


def test_hf_source_goes_through_datasets_load_dataset(tmp_path):
    """`kind: hf` loads with datasets.load_dataset, which takes a hub name or, as here offline, a local
    dataset folder: the same code path a user with hub access takes, minus the download."""
    folder = tmp_path / "my-reviews"
    folder.mkdir()
    table = pa.table({"body": ["Great pasta, rude waiter.", "  ", "Loved it."], "stars": [4, 2, None]})
    pq.write_table(table, folder / "train-00000.parquet")
    source = {"name": "hub", "kind": "hf", "path": str(folder), "split": "train", "text_column": "body",
              "rating_column": "stars"}  # fmt: skip
    _, kept, quarantined, _ = run(tmp_path / "store", config(tmp_path, [source]))
    assert kept.column("text").to_pylist() == ["Great pasta, rude waiter."]
    assert sorted(q["reason"] for q in quarantined) == ["bad_rating", "empty_text"]
