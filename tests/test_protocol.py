"""The benchmark protocol must equal the paper's evaluation code, rule by rule."""

from __future__ import annotations

import random

import pytest
from fsa_distill.benchmark.protocol import (
    acsa_target,
    atsa_target,
    in_test_type,
    is_implicit,
    is_mams,
    micro_prf,
    parse_pairs,
    score_rows,
)


def asp(target, polarity, start=None, end=None, category=None, opinions="x"):
    return {"target": target, "polarity": polarity, "from": start, "to": end, "category": category,
            "opinion_words": opinions}  # fmt: skip


class TestTargets:
    def test_atsa_orders_by_numeric_span_start(self):
        # "10" < "9" as strings: the order must follow numbers.
        aspects = [asp("wine", "positive", "10", "14"), asp("food", "negative", "9", "13"), asp("tea", "neutral", 2, 5)]
        assert atsa_target(aspects) == "tea | neutral ; food | negative ; wine | positive"

    def test_atsa_skips_implicit_targets(self):
        aspects = [asp(None, "positive"), asp("NULL", "negative"), asp("staff", "positive", 0, 5)]
        assert atsa_target(aspects) == "staff | positive"

    def test_atsa_deduplicates_by_term_polarity_span(self):
        aspects = [asp("food", "positive", 0, 4), asp("food", "positive", 0, 4), asp("food", "positive", 20, 24)]
        assert atsa_target(aspects) == "food | positive ; food | positive"

    def test_acsa_lowercases_replaces_hash_dedups_in_order(self):
        aspects = [
            asp(None, "negative", category="SERVICE#GENERAL"),
            asp("x", "positive", category="FOOD#QUALITY"),
            asp("y", "negative", category="SERVICE#GENERAL"),
        ]
        assert acsa_target(aspects) == "service general | negative ; food quality | positive"

    def test_no_pairs_is_empty_string(self):
        assert atsa_target([]) == "" and acsa_target([]) == ""
        assert atsa_target([asp(None, "positive")]) == ""


class TestParsing:
    sentence = "The Food was great but the service slow"

    def test_valid_pieces(self):
        assert parse_pairs("atsa", "Food | positive ; service | negative", self.sentence) == [
            ("Food", "positive"),
            ("service", "negative"),
        ]

    @pytest.mark.parametrize(
        "text",
        [
            "Food positive",  # no |
            "Food | positive | x",  # two |
            "Food | great",  # not a polarity
            "Food | Positive",  # polarity is case-sensitive
            "food | positive",  # term must match case-sensitively
            "pizza | positive",  # term not in the sentence
        ],
    )
    def test_invalid_pieces_are_dropped(self, text):
        assert parse_pairs("atsa", text, self.sentence) == []

    def test_invalid_piece_does_not_drop_valid_ones(self):
        assert parse_pairs("atsa", "pizza | positive ; Food | conflict", self.sentence) == [("Food", "conflict")]

    def test_acsa_has_no_substring_rule(self):
        assert parse_pairs("acsa", "food quality | positive", "no category words here") == [
            ("food quality", "positive")
        ]


class TestScore:
    def test_repetition_counts(self):
        gold = [[("a", "positive")]]
        pred = [[("a", "positive"), ("a", "positive")]]
        # both predictions are found in the gold list; the gold pair is found once
        assert micro_prf(gold, pred) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
        gold2 = [[("a", "positive"), ("a", "positive")]]
        pred2 = [[("a", "positive"), ("b", "negative")]]
        result = micro_prf(gold2, pred2)
        assert result["precision"] == 0.5 and result["recall"] == 1.0

    def test_pairs_only_match_within_their_sentence(self):
        gold = [[("a", "positive")], []]
        pred = [[], [("a", "positive")]]
        assert micro_prf(gold, pred) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}

    def test_no_predictions_means_precision_one(self):
        assert micro_prf([[("a", "positive")]], [[]]) == {"precision": 1.0, "recall": 0.0, "f1": 0.0}

    def test_no_gold_means_recall_one(self):
        result = micro_prf([[]], [[("a", "positive")]])
        assert result["recall"] == 1.0 and result["precision"] == 0.0

    def test_matches_the_papers_list_based_reference(self):
        """Random cases against a transliteration of the paper's F1Measure (lists of (idx, pair))."""
        rng = random.Random(0)
        pool = [(t, p) for t in "abc" for p in ("positive", "negative")]
        for _ in range(200):
            n = rng.randint(1, 5)
            gold = [[rng.choice(pool) for _ in range(rng.randint(0, 3))] for _ in range(n)]
            pred = [[rng.choice(pool) for _ in range(rng.randint(0, 3))] for _ in range(n)]
            true_list = [(i, g) for i, gs in enumerate(gold) for g in gs]
            pred_list = [(i, p) for i, ps in enumerate(pred) for p in ps]
            precision = sum(p in true_list for p in pred_list) / len(pred_list) if pred_list else 1
            recall = sum(t in pred_list for t in true_list) / len(true_list) if true_list else 1
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0
            assert micro_prf(gold, pred) == pytest.approx({"precision": precision, "recall": recall, "f1": f1})


class TestTestTypes:
    def test_implicit_means_some_aspect_without_opinion_words(self):
        for empty in (None, "", [], "MISSING"):
            a = asp("x", "positive", opinions=empty)
            if empty == "MISSING":
                a.pop("opinion_words")
            assert is_implicit([asp("y", "negative"), a])
        assert not is_implicit([asp("y", "negative", opinions=[{"opinion": "bad"}])])
        assert not is_implicit([])

    def test_mams_means_more_than_one_distinct_polarity(self):
        assert is_mams([asp("a", "positive"), asp(None, "negative")])
        assert not is_mams([asp("a", "positive"), asp("b", "positive")])

    def test_membership(self):
        assert in_test_type("normal", "test", False, False) and in_test_type("normal", "hard_test", False, False)
        assert not in_test_type("normal", "dev", True, True)
        assert in_test_type("hard", "hard_test", False, False) and not in_test_type("hard", "test", True, True)
        assert in_test_type("implicit", "test", True, False) and not in_test_type("implicit", "test", False, True)
        assert in_test_type("mams", "hard_test", False, True)
        with pytest.raises(ValueError, match="unknown test type"):
            in_test_type("easy", "test", False, False)

    def test_score_rows_splits_by_type(self):
        rows = [
            {"sentence": "food ok", "gold": "food | positive", "prediction": "food | positive", "split": "test",
             "implicit": False, "mams": False},
            {"sentence": "bad tea", "gold": "tea | negative", "prediction": "", "split": "hard_test",
             "implicit": True, "mams": False},
        ]  # fmt: skip
        scores = score_rows("atsa", rows)
        assert scores["normal"]["f1"] == pytest.approx(2 / 3)
        assert scores["hard"]["recall"] == 0.0 and scores["hard"]["precision"] == 1.0
        assert scores["implicit"]["n_sentences"] == 1 and scores["mams"]["n_sentences"] == 0
