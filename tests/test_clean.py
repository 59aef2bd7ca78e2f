"""Corpus cleaning: every rule on crafted cases and on the 500 real Mixtral outputs, dedup, decontamination,
streaming by row group, byte-identical outputs and the stage cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.clean import (
    CORPUS_SCHEMA,
    DROP_RULES,
    GENERATIONS_SCHEMA,
    INPUT_SCHEMA,
    QUARANTINE_SCHEMA,
    RULES,
    Batch,
    BenchmarkSentence,
    MinHasher,
    Row,
    RuleInputs,
    clean,
    cut_preamble,
    cut_trailers,
    mix64,
    ngram_hashes,
    parse_analysis,
)
from fsa_distill.tasks.clean.rules import (
    Contaminated,
    ExactDup,
    Length,
    NearDup,
    Preamble,
    Refusal,
    Trailer,
    Trim,
    Truncated,
    Unparseable,
)

from fsa_distill.artifacts import Artifact, sha256_file
from fsa_distill.config import compose_config
from fsa_distill.errors import InputError

DATASETS = ["atsa/rest14", "atsa/laptop14", "acsa/rest16", "acsa/laptop16"]
MIXTRAL = Path(os.environ["FSA_DATA_SOURCE"]) / "prompting/test/mixtral/test_500_4m8d.json"
CFG: dict[str, Any] = compose_config([])["clean"]  # the real default config
# A real rest14 hard_test sentence (ID 4466396:0); the Mixtral file's review 4466396 starts with it.
BENCH_SENTENCE = (
    "The menu is nice and the decor is amazing however that didn't make up for the horrible experience "
    "I received at this restaurant."
)
REWRITE = (
    "I was thrilled with this blender: it crushes ice in seconds, the jar is sturdy and easy to clean, "
    "and although the motor is louder than I expected, I would happily buy it again."
)
ANALYSIS = (
    'Opinion Target 1: "blender"\nAspect: "Performance"\nSentiment: Strongly Positive\n'
    "Reasoning: The reviewer says it crushes ice in seconds.\n\n"
    'Opinion Target 2: "motor"\nAspect: "Noise"\nSentiment: Mildly Negative\n'
    "Reasoning: The motor is louder than expected, which implies mild annoyance."
)


def row(output: str, prompt: str = "rewriting", review: str = "A fine blender that crushes ice.", **extra: Any) -> dict:
    """A generations-format row (the contract of the generate stage)."""
    base = {
        "review_id": "r0",
        "prompt": prompt,
        "template_version": f"{prompt}-v1",
        "teacher": "test",
        "model": "test-model",
        "sampling": "{}",
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "review": review,
        "output": output,
        "finish_reason": "stop",
        "prompt_tokens": 10,
        "output_tokens": len(output.split()),
        "latency_s": 0.1,
    }
    base.update(extra)
    return base


@pytest.fixture(scope="module")
def mixtral_rows() -> list[dict]:
    """The 500 real Mixtral outputs in the generations schema (analysis if they hold 'Opinion Target 1')."""
    records = [json.loads(line) for line in MIXTRAL.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    assert len(records) == 500
    return [
        row(
            r["mixtral_response"],
            prompt="analysis" if "Opinion Target 1" in r["mixtral_response"] else "rewriting",
            review=r["Text"],
            review_id=str(r["ID"]),
        )
        for r in records
    ]


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory, data_source) -> list[Artifact]:
    store = tmp_path_factory.mktemp("bench")
    cfg = {"data": {"source": data_source, "limit": None, "timeout_s": 60.0}}
    # acquired in a store of their own: passed as external files (no `rel`), so any clean store finds them
    arts = [acquire.run(store, acquire.params(cfg, dataset=d)) for d in DATASETS]
    return [Artifact(path=a.path, sha256=a.sha256) for a in arts]


def generations(folder: Path, rows: list[dict]) -> Artifact:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "generations.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA), path)
    return Artifact(path=str(folder), sha256=sha256_file(path))


def run(tmp_path: Path, rows: list[dict], benchmark: list[Artifact], **cfg: Any) -> tuple[Path, dict]:
    gen = generations(tmp_path / f"gen-{len(list(tmp_path.glob('gen-*')))}", rows)
    art = clean.run(tmp_path / "store", {"generations": [gen], "datasets": benchmark, "clean": {**CFG, **cfg}})
    return Path(art.path), json.loads((Path(art.path) / "stats.json").read_text())


def corpus(folder: Path) -> list[dict]:
    return pq.read_table(folder / "corpus.parquet").to_pylist()


def quarantine(folder: Path) -> list[dict]:
    return pq.read_table(folder / "quarantine.parquet").to_pylist()


# ---------------------------------------------------------------------------------------------
# one test per rule


def test_trim_keeps_raw_output(tmp_path, benchmark):
    out, stats = run(tmp_path, [row(f"  \n {REWRITE} \n\n")], benchmark)
    [kept] = corpus(out)
    assert kept["output"] == REWRITE
    assert kept["raw_output"] == f"  \n {REWRITE} \n\n"
    assert stats["modified"]["trim"] == 1 and stats["kept"] == 1


def test_chatty_preambles_are_cut():
    assert cut_preamble(f"Sure! Here's the rewritten review:\n\n{REWRITE}") == REWRITE
    assert cut_preamble(f'Here is the rewritten review: "{REWRITE}"') == REWRITE
    assert cut_preamble(f"Sure, here is my analysis:\n{ANALYSIS}") == ANALYSIS
    assert cut_preamble(f"Rewritten review:\n{REWRITE}") == REWRITE
    # ordinary openings are left alone
    for text in ("Here's the thing: the pasta was cold.", "As a night shift ICU RN, I love this lamp.", REWRITE):
        assert cut_preamble(text) == text


def test_preamble_rule_in_the_stage(tmp_path, benchmark):
    out, stats = run(tmp_path, [row(f"Certainly! Here is the rewritten review:\n{REWRITE}")], benchmark)
    assert [r["output"] for r in corpus(out)] == [REWRITE]
    assert stats["modified"]["preamble"] == 1


def test_trailers_are_cut():
    assert cut_trailers(f"{REWRITE}\n\nConfidence: 90%") == REWRITE
    assert cut_trailers(f"{ANALYSIS}\n\nConfidence Rating: 89.7%") == ANALYSIS
    assert cut_trailers(f"{REWRITE}\nNote: this rewrite keeps every fact of the review.") == REWRITE
    assert cut_trailers(f"{ANALYSIS}\n\n(NOTE: There is no Implicit Sentiment asked in this prompt)") == ANALYSIS
    assert cut_trailers(f"{ANALYSIS}\n\nReference(s):\nopinion-extractor https://example.org") == ANALYSIS
    assert cut_trailers(f"{REWRITE}\n\n---\n\nConfidence: 75%") == REWRITE
    # a final paragraph that merely starts with such a word is content
    for content in ("Note that the jar is glass.", "Total cost was fifty dollars.", "Sources of noise: none."):
        assert cut_trailers(f"{REWRITE}\n\n{content}") == f"{REWRITE}\n\n{content}"
    # a note in the middle is content, and a text that is only a note is not emptied
    middle = f"{REWRITE}\n\nNote: the jar is glass.\n\nI would buy it again."
    assert cut_trailers(middle) == middle
    assert cut_trailers("Note: only this.") == "Note: only this."


def test_real_confidence_and_note_trailers_are_cut(tmp_path, mixtral_rows, benchmark):
    with_trailer = [r for r in mixtral_rows if re.search(r"\n\s*(Confidence|Note|NOTE)\b", r["output"])]
    assert len(with_trailer) >= 10
    out, stats = run(tmp_path, mixtral_rows, benchmark)
    kept = corpus(out)
    assert stats["modified"]["trailer"] >= 15
    assert not [r for r in kept if re.search(r"(?im)^\s*confidence( rating)?:\s*[\d.]+%\s*$", r["output"])]
    gaming = next(r for r in kept if r["output"].startswith("The gaming case I received"))
    assert gaming["raw_output"].endswith("Confidence: 90%")
    assert gaming["output"].endswith("when purchasing a gaming case.")


def test_refusals_are_dropped(tmp_path, benchmark):
    refusals = [
        "I'm sorry, but I can't help with rewriting this review.",
        "As an AI language model, I do not have personal opinions about blenders.",
        "I cannot fulfill this request because the review is empty.",
        "I'm sorry, but the review you provided does not contain any opinion.",
    ]
    fine = [
        "I can't help but love this blender: it crushes ice in seconds.",
        "Unfortunately, I cannot recommend this blender: the jar cracked in a week.",
        "I'm sorry to say the soup was cold, and I will not return to this place.",
    ]
    out, stats = run(tmp_path, [row(t) for t in refusals + fine], benchmark)
    assert sorted(r["output"] for r in quarantine(out) if r["rule"] == "refusal") == sorted(refusals)
    assert sorted(r["output"] for r in corpus(out)) == sorted(fine)
    assert stats["dropped"]["refusal"] == 4


def test_truncated_outputs_are_dropped(tmp_path, benchmark):
    cases = {
        "cut": row("I was thrilled with this blender because it crushes ice and the"),
        "length": row(REWRITE, finish_reason="length"),
        "error": row(REWRITE, finish_reason="error"),
        "quote": row('I loved it and, in my words, it is "the best blender I have owned"'),
        "paren": row("I loved it (and so did my kids.)"),
    }
    out, stats = run(tmp_path, list(cases.values()), benchmark)
    dropped = {(r["output"], r["finish_reason"]): r["detail"] for r in quarantine(out) if r["rule"] == "truncated"}
    assert len(dropped) == 3 and stats["dropped"]["truncated"] == 3
    assert dropped[(REWRITE, "length")] == "finish_reason length"
    assert dropped[(cases["cut"]["output"], "stop")] == "no terminal punctuation"
    assert {r["output"] for r in corpus(out)} == {cases["quote"]["output"], cases["paren"]["output"]}


def test_real_truncated_outputs(tmp_path, mixtral_rows, benchmark):
    out, _ = run(tmp_path, mixtral_rows, benchmark)
    truncated = [r for r in quarantine(out) if r["rule"] == "truncated"]
    assert 30 <= len(truncated) <= 60  # the data README: about 54 cut off mid-sentence
    assert any(r["output"].endswith('Reasoning: The phrase "easy to') for r in truncated)


def test_analysis_without_a_well_formed_block_is_dropped(tmp_path, benchmark):
    free_text = "The reviewer loves the blender, which crushes ice, but dislikes the noisy motor."
    placeholders = (
        'Opinion Target 1: "blender"\nAspect:\nSentiment:\nReasoning:\n\nOpinion Target 2: "motor"\nAspect: x.'
    )
    rows = [row(free_text, prompt="analysis"), row(placeholders, prompt="analysis"), row(ANALYSIS, prompt="analysis")]
    rows.append(row(free_text))  # the same free text is a fine rewriting answer
    out, stats = run(tmp_path, rows, benchmark)
    assert stats["dropped"]["unparseable"] == 2
    assert sorted((r["prompt"], r["output"]) for r in corpus(out)) == [("analysis", ANALYSIS), ("rewriting", free_text)]


def test_parse_analysis_fields():
    blocks = parse_analysis(ANALYSIS)
    assert blocks == [
        {
            "index": 1,
            "target": "blender",
            "aspect": "Performance",
            "sentiment": "Strongly Positive",
            "reasoning": "The reviewer says it crushes ice in seconds.",
        },
        {
            "index": 2,
            "target": "motor",
            "aspect": "Noise",
            "sentiment": "Mildly Negative",
            "reasoning": "The motor is louder than expected, which implies mild annoyance.",
        },
    ]
    # aspects listed under one target inherit it; a placeholder reasoning is not well-formed
    text = (
        'Opinion Target 1: "speakers"\nAspect: Size\nSentiment: Positive\nReasoning: They are small.\n\n'
        "Aspect: Sound\nSentiment: Negative\nReasoning: [to be filled in by a human]"
    )
    assert [(b["target"], b["aspect"]) for b in parse_analysis(text)] == [("speakers", "Size")]
    assert parse_analysis("I love it.") == []


def test_parse_analysis_on_real_mixtral_outputs(mixtral_rows):
    analyses = [r["output"] for r in mixtral_rows if r["prompt"] == "analysis"]
    assert len(analyses) == 234
    parsed = [parse_analysis(text) for text in analyses]
    assert sum(bool(p) for p in parsed) >= 225
    first = parsed[0][0]
    assert first["target"] == "wireless adapter" and first["aspect"] == "Signal Strength"
    assert first["sentiment"] == "Negative" and first["reasoning"].startswith("The user's mention")
    assert len(parsed[0]) == 4
    # the answer whose fields are all empty has no well-formed block
    empty = next(t for t in analyses if 'Opinion Target 3: "touch-pad"\nAspect:\nSentiment:' in t)
    assert parse_analysis(empty) == []


def test_length_bounds(tmp_path, benchmark):
    rows = [row("Loved it."), row(REWRITE), row(REWRITE + " " + "It is great. " * 30)]
    out, stats = run(tmp_path, rows, benchmark, min_chars=20, max_chars=300)
    assert [r["output"] for r in corpus(out)] == [REWRITE]
    assert stats["dropped"]["length"] == 2
    assert {r["detail"].split(",")[1].strip() for r in quarantine(out)} == {"bounds 20..300"}


def test_exact_duplicates_need_the_same_prompt(tmp_path, benchmark):
    variant = "  " + REWRITE.upper().replace(" ", "   ")
    rows = [row(REWRITE, review_id="a"), row(variant, review_id="b"), row(REWRITE, prompt="other", review_id="c")]
    out, _ = run(tmp_path, rows, benchmark)
    assert [r["review_id"] for r in corpus(out)] == ["a", "c"]
    [dup] = quarantine(out)
    assert dup["review_id"] == "b" and dup["rule"] == "exact_dup" and dup["detail"] == "exact duplicate of input row 0"


def _edit(text: str, rng: np.random.Generator, edits: int) -> str:
    words = text.split()
    for _ in range(edits):
        i = int(rng.integers(len(words) - 1))  # not the last word: the text still ends a sentence
        words[i] = "zebra" if rng.random() < 0.5 else words[i] + " indeed"
    return " ".join(words)


def test_near_duplicates_of_real_outputs(tmp_path, mixtral_rows, benchmark):
    rewrites = [r for r in mixtral_rows if r["prompt"] == "rewriting"]
    rng = np.random.default_rng(0)
    long_ones = [r for r in rewrites if len(r["output"].split()) >= 120][:10]
    # one edit in 120+ words: a true Jaccard of about 0.92, well above the 0.8 threshold
    copies = [dict(r, review_id=r["review_id"] + "-copy", output=_edit(r["output"], rng, 1)) for r in long_ones]
    out, _ = run(tmp_path, rewrites + copies, benchmark)
    near = [r for r in quarantine(out) if r["rule"] == "near_dup"]
    # every edited copy is caught, and none of the 266 distinct real rewrites is
    assert sorted(r["review_id"] for r in near) == sorted(r["review_id"] for r in copies)
    first = {r["review_id"]: i for i, r in enumerate(rewrites)}
    for r in near:
        original = first[r["review_id"].removesuffix("-copy")]
        assert re.fullmatch(rf"near duplicate of input row {original} \(estimated Jaccard [01]\.\d\d\)", r["detail"])


def test_ngram_hashes_match_a_plain_python_reference():
    """Vectorised n-gram hashing equals a per-row loop: whole-row grams for short rows, none when skipped."""
    mask = (1 << 64) - 1

    def reference(words: np.ndarray, offsets: np.ndarray, n: int, short: str) -> tuple[list[int], list[int]]:
        out, goff = [], [0]
        for r in range(len(offsets) - 1):
            w = [int(x) for x in words[offsets[r] : offsets[r + 1]]]
            grams = [w[i : i + n] for i in range(len(w) - n + 1)] if len(w) >= n else ([w] if short == "whole" else [])
            for gram in grams:
                acc = 0
                for x in gram:
                    acc = (acc * 0x9E3779B97F4A7C15 + x) & mask
                out.append(acc ^ ((len(gram) * 0xD6E8FEB86659FD93) & mask))
            goff.append(len(out))
        return out, goff

    rng = np.random.default_rng(0)
    for _ in range(100):
        lengths = rng.integers(0, 12, size=int(rng.integers(1, 8)))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        words = rng.integers(0, 2**63, size=int(offsets[-1]), dtype=np.uint64)
        for n in (1, 3, 5):
            for short in ("whole", "skip"):
                got, goff = ngram_hashes(words, offsets, n, short=short)
                want, want_off = reference(words, offsets, n, short)
                assert goff.tolist() == want_off
                assert got.tolist() == mix64(np.array(want, dtype=np.uint64)).tolist()


def test_minhash_estimates_jaccard(mixtral_rows):
    hasher = MinHasher(128, 5)
    rng = np.random.default_rng(1)
    texts = [r["output"] for r in mixtral_rows if r["prompt"] == "rewriting" and len(r["output"].split()) > 100][:20]
    pairs = [(t, _edit(t, rng, 3)) for t in texts]

    def shingles(text: str) -> set:
        words = [w.strip("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’–—…").lower() for w in text.split()]
        words = [w for w in words if w]
        return {tuple(words[i : i + 5]) for i in range(len(words) - 4)}

    errors = []
    for a, b in pairs:
        sig = hasher.signatures([a, b])
        estimate = float((sig[0] == sig[1]).mean())
        truth = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
        errors.append(estimate - truth)
    assert abs(np.mean(errors)) < 0.05 and np.max(np.abs(errors)) < 0.2
    unrelated = hasher.signatures(texts[:2])
    assert (unrelated[0] == unrelated[1]).mean() < 0.2


def test_decontamination_with_a_real_benchmark_sentence(tmp_path, mixtral_rows, benchmark):
    base = "We came for brunch on a Sunday. "
    outputs = [r["output"] for r in mixtral_rows if r["prompt"] == "rewriting"][:4]  # distinct, not near duplicates
    rows = [
        row(outputs[0], review=base + BENCH_SENTENCE + " We will not be back.", review_id="embedded"),
        row(outputs[1], review=base + BENCH_SENTENCE.upper(), review_id="upper"),
        # more than half of the sentence's 8-grams, but not all of it
        row(outputs[2], review=base + BENCH_SENTENCE.replace("horrible", "awful"), review_id="edited"),
        # a short generic benchmark sentence ("The food was good.") is no leak
        row(outputs[3], review="The food was good. The service was slow.", review_id="generic"),
    ]
    out, _ = run(tmp_path, rows, benchmark)
    bad = {r["review_id"]: r["detail"] for r in quarantine(out) if r["rule"] == "contaminated"}
    assert set(bad) == {"embedded", "upper", "edited"}
    assert bad["embedded"] == "benchmark sentence atsa/rest14/hard_test/4466396:0 (n-gram overlap 1.00)"
    assert re.search(r"overlap 0\.\d\d\)$", bad["edited"])
    assert [r["review_id"] for r in corpus(out)] == ["generic"]
    # the real Mixtral review 4466396 opens with that same hard_test sentence
    out, _ = run(tmp_path, mixtral_rows, benchmark)
    assert "4466396" in {r["review_id"] for r in quarantine(out) if r["rule"] == "contaminated"}


# ---------------------------------------------------------------------------------------------
# the stage as a whole


def _mixed(mixtral_rows: list[dict]) -> list[dict]:
    """Real outputs plus duplicates and rule cases spread through the input."""
    rng = np.random.default_rng(7)
    rows = list(mixtral_rows)
    rewrites = [r for r in mixtral_rows if r["prompt"] == "rewriting" and len(r["output"].split()) > 120]
    for k, r in enumerate(rewrites[:15]):
        rows.insert(int(rng.integers(len(rows))), dict(r, review_id=f"near{k}", output=_edit(r["output"], rng, 1)))
        rows.insert(int(rng.integers(len(rows))), dict(r, review_id=f"exact{k}", output=r["output"] + "  "))
    rows.insert(3, row("I'm sorry, but I can't help with that."))
    rows.insert(250, row(REWRITE, finish_reason="length"))
    return rows


def test_quarantine_and_stats_account_for_every_row(tmp_path, mixtral_rows, benchmark):
    rows = _mixed(mixtral_rows)
    out, stats = run(tmp_path, rows, benchmark)
    kept, dropped = corpus(out), quarantine(out)
    assert pq.read_schema(out / "corpus.parquet").equals(CORPUS_SCHEMA)
    assert pq.read_schema(out / "quarantine.parquet").equals(QUARANTINE_SCHEMA)
    assert stats["generated"] == len(rows) == len(kept) + len(dropped)
    assert stats["kept"] == len(kept)
    assert stats["dropped"] == {rule: sum(r["rule"] == rule for r in dropped) for rule in DROP_RULES}
    assert stats["dropped"]["exact_dup"] >= 15 and stats["dropped"]["near_dup"] >= 12
    assert stats["dropped"]["refusal"] == 1
    for prompt, block in stats["per_prompt"].items():
        assert block["generated"] == block["kept"] + sum(block["dropped"].values())
        assert block["kept"] == sum(r["prompt"] == prompt for r in kept)
    assert stats["output_tokens_kept"] == sum(r["output_tokens"] for r in kept)
    assert stats["review_chars_kept"] == sum(len(r["review"]) for r in kept)
    assert [r.name for r in RULES] == stats["rules"]
    # quarantined rows keep the input unchanged (the raw output) and say why
    by_key = {(r["review_id"], r["output"]) for r in rows}
    assert all((r["review_id"], r["output"]) in by_key and r["rule"] in DROP_RULES for r in dropped)
    assert all(r["output"] == r["raw_output"].strip() or r["output"] in r["raw_output"] for r in kept)


def test_streaming_by_small_row_groups_gives_the_same_result(tmp_path, mixtral_rows, benchmark):
    rows = _mixed(mixtral_rows)
    one, stats_one = run(tmp_path / "one", rows, benchmark, row_group_size=10_000)
    many, stats_many = run(tmp_path / "many", rows, benchmark, row_group_size=7)
    assert pq.ParquetFile(many / "corpus.parquet").metadata.num_row_groups > 50
    assert pq.ParquetFile(one / "corpus.parquet").metadata.num_row_groups == 1
    assert corpus(one) == corpus(many)
    assert quarantine(one) == quarantine(many)
    assert stats_one == stats_many


def test_cached_rerun_is_idempotent_and_deterministic(tmp_path, mixtral_rows, benchmark):
    gen = generations(tmp_path / "gen", mixtral_rows[:100])
    params = {"generations": [gen], "datasets": benchmark, "clean": CFG}
    first = clean.run(tmp_path / "store", params)
    stamp = (Path(first.path) / "corpus.parquet").stat().st_mtime_ns
    again = clean.run(tmp_path / "store", params)
    assert again == first and (Path(again.path) / "corpus.parquet").stat().st_mtime_ns == stamp
    # the same inputs in another store give byte-identical outputs
    other = clean.run(tmp_path / "other", params)
    assert other.sha256 == first.sha256
    changed = clean.run(tmp_path / "store", {**params, "clean": {**CFG, "min_chars": 30}})
    assert changed.path != first.path


def test_bad_generations_file_names_the_file(tmp_path, benchmark):
    folder = tmp_path / "gen"
    folder.mkdir()
    table = pa.Table.from_pylist([row(REWRITE)], schema=GENERATIONS_SCHEMA).drop_columns(["output"])
    pq.write_table(table, folder / "generations.parquet")
    gen = Artifact(path=str(folder), sha256=sha256_file(folder / "generations.parquet"))
    with pytest.raises(InputError, match=r"gen/generations\.parquet: missing columns \['output'\]"):
        clean.run(tmp_path / "store", {"generations": [gen], "datasets": benchmark, "clean": CFG})
    assert not list((tmp_path / "store").rglob("corpus.parquet"))
    with pytest.raises(InputError, match=r"multiple of clean\.minhash_bands"):
        run(tmp_path, [row(REWRITE)], benchmark, minhash_perm=60)


# ---------------------------------------------------------------------------------------------
# decontamination before dedup


def test_a_contaminated_row_does_not_suppress_its_duplicates(tmp_path, mixtral_rows, benchmark):
    """A row dropped as contaminated never enters a dedup index: its clean duplicates are kept."""
    leak = "We came for brunch on a Sunday. " + BENCH_SENTENCE
    fine = "We came for brunch on a Sunday and the pancakes were superb."
    long_one = next(r["output"] for r in mixtral_rows if r["prompt"] == "rewriting" and len(r["output"].split()) > 120)
    near_copy = _edit(long_one, np.random.default_rng(3), 1)
    rows = [
        row(REWRITE, review=leak, review_id="leak-exact"),
        row(REWRITE, review=fine, review_id="clean-exact"),  # the same output, a clean review
        row(long_one, review=leak, review_id="leak-near"),
        row(near_copy, review=fine, review_id="clean-near"),  # a near duplicate of it, a clean review
    ]
    for size in (10_000, 1):
        out, stats = run(tmp_path / str(size), rows, benchmark, row_group_size=size)
        assert {r["review_id"]: r["rule"] for r in quarantine(out)} == {
            "leak-exact": "contaminated",
            "leak-near": "contaminated",
        }
        assert [r["review_id"] for r in corpus(out)] == ["clean-exact", "clean-near"]
        assert stats["dropped"]["contaminated"] == 2
        assert stats["dropped"]["exact_dup"] == stats["dropped"]["near_dup"] == 0


def test_rules_apply_decontamination_before_dedup():
    names = [r.name for r in RULES]
    assert names == [
        "trim",
        "preamble",
        "trailer",
        "refusal",
        "truncated",
        "unparseable",
        "length",
        "contaminated",
        "exact_dup",
        "near_dup",
    ]
    assert len(set(names)) == len(names)
    assert tuple(r.name for r in RULES if r.kind == "drop") == DROP_RULES


# ---------------------------------------------------------------------------------------------
# the corpus is content: deterministic bytes, no measurements


def _generations_with_latency(folder: Path, rows: list[dict], latency: float) -> Artifact:
    """A generations file that carries a `latency_s` column (whether the contract still has it or not)."""
    schema = (
        GENERATIONS_SCHEMA
        if "latency_s" in GENERATIONS_SCHEMA.names
        else INPUT_SCHEMA.append(pa.field("latency_s", pa.float64()))
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "generations.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, latency_s=latency + i) for i, r in enumerate(rows)], schema), path)
    return Artifact(path=str(folder), sha256=sha256_file(path))


def test_same_inputs_give_byte_identical_outputs(tmp_path, mixtral_rows, benchmark):
    gen = generations(tmp_path / "gen", _mixed(mixtral_rows)[:200])
    params = {"generations": [gen], "datasets": benchmark, "clean": CFG}
    first = clean.run(tmp_path / "one", params)
    second = clean.run(tmp_path / "two", params)
    assert first.path != second.path and first.sha256 == second.sha256
    for name in ("corpus.parquet", "quarantine.parquet", "stats.json"):
        assert (Path(first.path) / name).read_bytes() == (Path(second.path) / name).read_bytes()
    # wall times are measurements: outside stats.json and outside the content hash
    stats = json.loads((Path(first.path) / "stats.json").read_text())
    assert not [k for k in json.dumps(stats).split('"') if re.search(r"second|_per_s|latency|time", k)]
    timing = json.loads((Path(first.path) / "measured" / "timing.json").read_text())
    assert timing["rows"] == 200 and set(timing["rule_seconds"]) == {r.name for r in RULES}
    manifest = json.loads((Path(first.path) / "_manifest.json").read_text())
    assert "measured/timing.json" in manifest["measured"] and "measured/timing.json" not in manifest["files"]


def test_latency_does_not_reach_the_corpus(tmp_path, mixtral_rows, benchmark):
    rows = _mixed(mixtral_rows)[:100]
    slow = _generations_with_latency(tmp_path / "slow", rows, latency=5.0)
    fast = _generations_with_latency(tmp_path / "fast", rows, latency=0.1)
    assert slow.sha256 != fast.sha256  # the inputs differ (only in latency_s)...
    a = clean.run(tmp_path / "store", {"generations": [slow], "datasets": benchmark, "clean": CFG})
    b = clean.run(tmp_path / "store", {"generations": [fast], "datasets": benchmark, "clean": CFG})
    assert a.path != b.path
    assert a.sha256 == b.sha256  # ...the corpus does not
    for art in (a, b):
        assert "latency_s" not in pq.read_schema(Path(art.path) / "corpus.parquet").names
        assert "latency_s" not in pq.read_schema(Path(art.path) / "quarantine.parquet").names
    assert (Path(a.path) / "corpus.parquet").read_bytes() == (Path(b.path) / "corpus.parquet").read_bytes()


def test_generations_without_latency_are_accepted(tmp_path, benchmark):
    folder = tmp_path / "gen"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([row(REWRITE)], schema=INPUT_SCHEMA), folder / "generations.parquet")
    gen = Artifact(path=str(folder), sha256=sha256_file(folder / "generations.parquet"))
    art = clean.run(tmp_path / "store", {"generations": [gen], "datasets": benchmark, "clean": CFG})
    assert [r["output"] for r in corpus(Path(art.path))] == [REWRITE]


def test_params_are_the_clean_section_and_the_inputs(benchmark):
    cfg = compose_config([])
    gen = Artifact(path="/nowhere", sha256="0" * 64)
    params = clean.params(cfg, generations=[gen], datasets=benchmark)
    assert params == {"generations": [gen], "datasets": benchmark, "clean": cfg["clean"]}
    assert clean.key(params) == clean.key(clean.params(cfg, generations=[gen], datasets=list(benchmark)))


# ---------------------------------------------------------------------------------------------
# rules one at a time


def _batch(texts: list[str], prompts: list[str] | None = None, reviews: list[str] | None = None, first: int = 0):
    n = len(texts)
    return Batch(
        text=list(texts),
        prompt=prompts or ["rewriting"] * n,
        finish_reason=["stop"] * n,
        review=pa.array(reviews or ["A review."] * n, pa.large_string()),
        ordinal=np.arange(first, first + n, dtype=np.int64),
    )


def test_modify_rules_rewrite_and_count():
    batch = _batch([f"  {REWRITE} ", f"Sure! Here's the rewritten review:\n{REWRITE}\n\nConfidence: 90%", REWRITE])
    rules = [Trim(), Preamble(), Trailer()]
    live = [0, 1, 2]
    for rule in rules:
        assert rule.kind == "modify" and rule.run(batch, live) == live
    assert batch.text == [REWRITE] * 3
    assert [r.counts["rewriting"] for r in rules] == [1, 1, 1]


def test_per_row_drop_rules():
    def r(text: str, prompt: str = "rewriting", finish: str | None = "stop") -> Row:
        return Row(text, prompt, finish, "A review.")

    assert Refusal().filter(r("I'm sorry, but I can't help with that.")) == (False, "")
    assert Refusal().filter(r(REWRITE)) is True
    assert Truncated().filter(r(REWRITE, finish="length")) == (False, "finish_reason length")
    assert Truncated().filter(r("It crushes ice and the")) == (False, "no terminal punctuation")
    assert Truncated().filter(r(REWRITE)) is True
    assert Unparseable().filter(r("I love it.", prompt="analysis"))[0] is False
    assert Unparseable().filter(r(ANALYSIS, prompt="analysis")) is True
    assert Unparseable().filter(r("I love it.")) is True
    length = Length(min_chars=5, max_chars=10)
    assert length.filter(r("Fine.")) is True
    assert length.filter(r("Far too long.")) == (False, "13 chars, bounds 5..10")


def test_drop_rules_see_only_live_rows_and_count_per_prompt():
    batch = _batch(["I'm sorry, but I can't do that.", "Fine, thanks.", "I cannot rewrite this."], first=10)
    batch.prompt[2] = "analysis"
    rule = Refusal()
    assert rule.run(batch, [1, 2]) == [1]  # row 0 is not live: not looked at
    assert batch.rule == [None, None, "refusal"] and rule.counts == {"analysis": 1}


def test_exact_dup_index_spans_batches():
    rule = ExactDup()
    first = _batch([REWRITE, "Another answer."], first=0)
    assert rule.run(first, [0, 1]) == [0, 1]
    second = _batch(
        ["  " + REWRITE.upper(), REWRITE, "Another answer."], prompts=["rewriting", "rewriting", "x"], first=2
    )
    assert rule.run(second, [0, 1, 2]) == [2]  # another prompt is never a duplicate
    assert second.detail[:2] == ["exact duplicate of input row 0"] * 2


def test_near_dup_rule_spans_batches(mixtral_rows):
    text = next(r["output"] for r in mixtral_rows if r["prompt"] == "rewriting" and len(r["output"].split()) > 120)
    rule = NearDup.from_config(CFG, RuleInputs())
    assert rule.run(_batch([text], first=0), [0]) == [0]
    batch = _batch([_edit(text, np.random.default_rng(0), 1), REWRITE], first=1)
    assert rule.run(batch, [0, 1]) == [1]
    assert batch.detail[0].startswith("near duplicate of input row 0 (estimated Jaccard")


def test_contaminated_rule_checks_reviews():
    sentences = [BenchmarkSentence("bench/test/1", BENCH_SENTENCE)]
    rule = Contaminated.from_config(CFG, RuleInputs(sentences=sentences))
    batch = _batch([REWRITE, REWRITE, REWRITE], reviews=["Nice.", "So: " + BENCH_SENTENCE, "So: " + BENCH_SENTENCE])
    assert rule.run(batch, [0, 1, 2]) == [0]
    assert batch.detail[1] == "benchmark sentence bench/test/1 (n-gram overlap 1.00)"
    assert rule.stats() == {"benchmark_sentences": 1, "benchmark_sentences_skipped_short": 0}


def test_rule_config_checks_name_the_key():
    with pytest.raises(InputError, match=r"clean\.min_chars must be a non-negative integer"):
        Length.from_config({**CFG, "min_chars": -1}, RuleInputs())
    with pytest.raises(InputError, match=r"clean\.near_dup_threshold must be between 0 and 1"):
        NearDup.from_config({**CFG, "near_dup_threshold": 1.5}, RuleInputs())
    with pytest.raises(InputError, match=r"clean\.max_chars is missing \(read by the length rule\)"):
        Length.from_config({k: v for k, v in CFG.items() if k != "max_chars"}, RuleInputs())
    assert Contaminated.from_config({k: v for k, v in CFG.items() if k != "decontam_min_words"}, RuleInputs())


def test_every_clean_key_is_read_by_a_rule_or_the_stage():
    read = {key for rule in RULES for key in rule.keys} | {"row_group_size"}
    assert read == set(CFG)
