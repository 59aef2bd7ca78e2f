"""In-context prompts and label extraction: upstream's layout and sampling, the benchmark's target format."""

from __future__ import annotations

import random

import pytest
from fsa_distill.benchmark.icl import (
    DEFAULT_TEMPLATES,
    build_prompt,
    extract_label,
    fsa_instruction,
    fsa_prompts,
    load_templates,
    sample_demos,
    sentiment_prompts,
)
from fsa_distill.benchmark.protocol import parse_pairs, score_rows


def asp(target, polarity, start, end, category="FOOD#QUALITY"):
    return {"target": target, "polarity": polarity, "from": start, "to": end, "category": category}


# A hand-made FSA train pool: random.Random(42).sample(POOL, 2) draws [0, 4] for the first test
# example and [2, 1] for the second.
POOL = [
    {"sentence": "The sushi was great.", "aspects": [asp("sushi", "positive", "4", "9")]},
    {"sentence": "Slow service, tasty wine.",
     "aspects": [asp("wine", "positive", "20", "24", "DRINKS#QUALITY"),
                 asp("service", "negative", "5", "12", "SERVICE#GENERAL")]},
    {"sentence": "We went on a Sunday.", "aspects": []},
    {"sentence": "Nice view.", "aspects": [asp("view", "positive", "5", "9", "LOCATION#GENERAL")]},
    {"sentence": "The staff ignored us.", "aspects": [asp("staff", "negative", "4", "9", "SERVICE#GENERAL")]},
]  # fmt: skip
TESTS = [{"sentence": "The fish was fresh."}, {"sentence": "Too loud."}]
INSTRUCTION = "Extract pairs."


class TestPrompts:
    def test_exact_fsa_prompt_for_seed_42_k_2(self):
        prompts = fsa_prompts(INSTRUCTION, "atsa", TESTS, POOL, k=2, seed=42)
        assert prompts[0] == (
            "Extract pairs.\n\n"
            "Sentence: The sushi was great.\nLabel: sushi | positive\n\n"
            "Sentence: The staff ignored us.\nLabel: staff | negative\n\n"
            "Sentence: The fish was fresh.\nLabel:"
        )
        # Demos are ordered by span start (the benchmark's target), and an empty target is a bare `Label:`.
        assert prompts[1] == (
            "Extract pairs.\n\n"
            "Sentence: We went on a Sunday.\nLabel:\n\n"
            "Sentence: Slow service, tasty wine.\nLabel: service | negative ; wine | positive\n\n"
            "Sentence: Too loud.\nLabel:"
        )

    def test_acsa_labels_are_categories(self):
        prompts = fsa_prompts(INSTRUCTION, "acsa", TESTS, POOL, k=2, seed=42)
        assert (
            "Sentence: Slow service, tasty wine.\nLabel: drinks quality | positive ; service general | negative\n"
            in (prompts[1])
        )

    def test_k_0_is_instruction_and_test_sentence(self):
        assert fsa_prompts(INSTRUCTION, "atsa", TESTS, POOL, k=0, seed=42) == [
            "Extract pairs.\n\nSentence: The fish was fresh.\nLabel:",
            "Extract pairs.\n\nSentence: Too loud.\nLabel:",
        ]

    def test_sentiment_prompt_lowercases_labels(self):
        pool = [{"sentence": "good", "label": "Positive"}, {"sentence": "bad", "label": "negative"}]
        (prompt,) = sentiment_prompts("Classify.", [{"sentence": "fine"}], pool, k=2, seed=0)
        demos = sample_demos(pool, 1, 2, 0)[0]
        expected = "Classify.\n\n" + "".join(
            f"Sentence: {d['sentence']}\nLabel: {d['label'].lower()}\n\n" for d in demos
        )
        assert prompt == expected + "Sentence: fine\nLabel:"
        assert "Label: positive\n" in prompt
        assert sentiment_prompts("Classify.", [{"sentence": "fine"}], pool) == ["Classify.\n\nSentence: fine\nLabel:"]

    def test_build_prompt_layout(self):
        assert build_prompt("I", [("s1", "l1"), ("s2", "l2")], "t") == (
            "I\n\nSentence: s1\nLabel: l1\n\nSentence: s2\nLabel: l2\n\nSentence: t\nLabel:"
        )


class TestSampling:
    def test_same_stream_as_upstreams_global_random(self):
        pool = list(range(50))
        random.seed(42)
        upstream = [random.sample(pool, k=4) for _ in range(20)]
        assert sample_demos(pool, 20, 4, 42) == upstream

    def test_same_seed_same_demos_other_seed_other_demos(self):
        pool = list(range(50))
        assert sample_demos(pool, 10, 4, 42) == sample_demos(pool, 10, 4, 42)
        assert sample_demos(pool, 10, 4, 42) != sample_demos(pool, 10, 4, 52)
        assert fsa_prompts(INSTRUCTION, "atsa", TESTS, POOL, 2, 42) != fsa_prompts(
            INSTRUCTION, "atsa", TESTS, POOL, 2, 52
        )

    def test_no_repeat_inside_a_prompt(self):
        assert all(len(set(d)) == 8 for d in sample_demos(list(range(10)), 30, 8, 62))

    def test_bad_k(self):
        with pytest.raises(ValueError, match="pool has only 5"):
            sample_demos(POOL, 1, 6, 42)
        with pytest.raises(ValueError, match=">= 0"):
            sample_demos(POOL, 1, -1, 42)


class TestExtraction:
    @pytest.mark.parametrize(
        ("continuation", "label"),
        [
            (" sushi | positive", "sushi | positive"),
            # extra lines after the label: a made-up next demonstration, an explanation
            (" sushi | positive\n\nSentence: The wine was sour.\nLabel: wine | negative", "sushi | positive"),
            (" sushi | positive\nThe reviewer liked the sushi.", "sushi | positive"),
            # trailing text on the label line: cut at `Sentence:` only, as upstream
            (" sushi | positive Sentence: next one", "sushi | positive"),
            (" sushi | positive  \r\n", "sushi | positive"),
            # missing `Label:` with the answer on a later line: the first non-empty line
            ("\n\n  sushi | positive\nmore", "sushi | positive"),
            # `Label:` repeated by the model on its answer line
            (" Label: sushi | positive", "sushi | positive"),
            (" Label: Label: sushi | positive\nLabel: x | negative", "sushi | positive"),
            (" Label: sushi | positive Sentence: x Label: y | negative", "sushi | positive"),
            # empty: nothing, blank lines, or straight on to a new demonstration
            ("", ""),
            ("\n \n", ""),
            ("\n\nSentence: Another one.\nLabel: view | positive", ""),
        ],
    )
    def test_crafted_generations(self, continuation, label):
        assert extract_label(continuation) == label

    def test_extracted_label_scores_with_the_protocol(self):
        sentence = "The sushi was great but the wine was sour."
        prediction = extract_label(" sushi | positive ; wine | negative ; pizza | positive\nSentence: x")
        assert parse_pairs("atsa", prediction, sentence) == [("sushi", "positive"), ("wine", "negative")]
        row = {"sentence": sentence, "gold": "sushi | positive ; wine | negative", "prediction": prediction,
               "split": "hard_test", "implicit": False, "mams": True}  # fmt: skip
        scores = score_rows("atsa", [row])
        assert scores["hard"]["f1"] == 1.0 and scores["normal"]["n_sentences"] == 1.0


class TestTemplates:
    def test_versioned_templates_load(self):
        templates = load_templates()
        assert DEFAULT_TEMPLATES.name == "v1.yaml"
        assert templates["version"] == "icl-v1"
        assert "|" in templates["fsa"]["atsa"] and "{categories}" in templates["fsa"]["acsa"]

    def test_acsa_categories_come_from_the_pool(self):
        text = fsa_instruction(load_templates()["fsa"]["acsa"], POOL)
        assert "from ['drinks quality', 'food quality', 'location general', 'service general']," in text
        assert fsa_instruction("no placeholder", POOL) == "no placeholder"

    def test_missing_task_is_an_error(self, tmp_path):
        path = tmp_path / "bad.yaml"
        path.write_text("version: x\nfsa:\n  atsa: hi\n")
        with pytest.raises(ValueError, match="acsa"):
            load_templates(path)


def test_a_marker_alone_on_its_line_is_followed_to_the_answer():
    assert extract_label("Label:\nfood | positive\nSentence: x") == "food | positive"
    assert extract_label("Label:\n\n") == ""
