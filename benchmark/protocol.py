"""The paper's evaluation protocol: target sequences, parsing, micro-F1 and test subsets.

Everything here must reproduce HITSZ-HLT/FSA-Distillation's evaluation code; the rules are
spelled out in the README ("The benchmark protocol") and each one has a test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

POLARITIES: tuple[str, ...] = ("positive", "negative", "neutral", "conflict")
TASKS: tuple[str, ...] = ("atsa", "acsa")
TEST_TYPES: tuple[str, ...] = ("normal", "implicit", "mams", "hard")

Pair = tuple[str, str]


def _span_start(value: Any) -> int:
    """Span offsets are strings, ints or null in the released files; null sorts first (as 0)."""
    if value is None or value == "":
        return 0
    return int(value)


def atsa_target(aspects: Sequence[Mapping[str, Any]]) -> str:
    """`term | polarity ; ...`: explicit targets only, deduplicated by (term, polarity, span), by span start."""
    seen: set[tuple[str, str, int, int]] = set()
    items: list[tuple[int, int, str, str]] = []
    for aspect in aspects:
        term = aspect.get("target")
        if term in (None, "NULL"):
            continue
        start, end = _span_start(aspect.get("from")), _span_start(aspect.get("to"))
        key = (term, aspect["polarity"], start, end)
        if key in seen:
            continue
        seen.add(key)
        items.append((start, end, term, aspect["polarity"]))
    items.sort(key=lambda it: (it[0], it[1]))
    return " ; ".join(f"{term} | {polarity}" for _, _, term, polarity in items)


def category_label(category: str) -> str:
    """`FOOD#QUALITY` -> `food quality`, as the paper's ACSA target format."""
    return category.lower().replace("#", " ")


def acsa_target(aspects: Sequence[Mapping[str, Any]]) -> str:
    """`category | polarity ; ...`: deduplicated, in order of appearance."""
    pieces: list[str] = []
    for aspect in aspects:
        piece = f"{category_label(aspect['category'])} | {aspect['polarity']}"
        if piece not in pieces:
            pieces.append(piece)
    return " ; ".join(pieces)


def make_target(task: str, aspects: Sequence[Mapping[str, Any]]) -> str:
    """Target sequence of one sentence for `task` (atsa or acsa)."""
    if task == "atsa":
        return atsa_target(aspects)
    if task == "acsa":
        return acsa_target(aspects)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def parse_pairs(task: str, text: str, sentence: str) -> list[Pair]:
    """Parse a generated sequence into (term-or-category, polarity) pairs, dropping invalid pieces.

    A piece needs exactly one `|`, a polarity among POLARITIES and, for ATSA, a term that is a
    case-sensitive substring of the sentence. Repeated pairs are kept: the score counts them.
    """
    pairs: list[Pair] = []
    for piece in text.split(";"):
        piece = piece.strip()
        if piece.count("|") != 1:
            continue
        left, polarity = (part.strip() for part in piece.split("|"))
        if polarity not in POLARITIES:
            continue
        if task == "atsa" and left not in sentence:
            continue
        pairs.append((left, polarity))
    return pairs


def micro_prf(gold: Sequence[Sequence[Pair]], pred: Sequence[Sequence[Pair]]) -> dict[str, float]:
    """Micro precision/recall/F1 over (sentence, pair), counted with repetition as the paper's code.

    precision = predicted pairs found in the gold list / predicted pairs (1 when nothing is predicted),
    recall = gold pairs found among the predictions / gold pairs (1 when there is no gold).
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold rows but {len(pred)} predicted rows")
    n_pred = n_gold = tp_pred = tp_gold = 0
    for gold_pairs, pred_pairs in zip(gold, pred, strict=True):
        gold_list, pred_list = list(gold_pairs), list(pred_pairs)
        n_pred += len(pred_list)
        n_gold += len(gold_list)
        tp_pred += sum(p in gold_list for p in pred_list)
        tp_gold += sum(g in pred_list for g in gold_list)
    precision = tp_pred / n_pred if n_pred else 1.0
    recall = tp_gold / n_gold if n_gold else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def is_implicit(aspects: Sequence[Mapping[str, Any]]) -> bool:
    """Some aspect has no opinion words (missing, null, empty string or empty list)."""
    return any(not aspect.get("opinion_words") for aspect in aspects)


def is_mams(aspects: Sequence[Mapping[str, Any]]) -> bool:
    """The sentence's aspects carry more than one distinct polarity."""
    return len({aspect["polarity"] for aspect in aspects}) > 1


def in_test_type(test_type: str, split: str, implicit: bool, mams: bool) -> bool:
    """Whether a test or hard_test row belongs to a test type (normal = test + hard_test)."""
    if split not in ("test", "hard_test"):
        return False
    if test_type == "normal":
        return True
    if test_type == "implicit":
        return implicit
    if test_type == "mams":
        return mams
    if test_type == "hard":
        return split == "hard_test"
    raise ValueError(f"unknown test type {test_type!r}; expected one of {TEST_TYPES}")


def score_rows(
    task: str,
    rows: Iterable[Mapping[str, Any]],
    test_types: Sequence[str] = TEST_TYPES,
) -> dict[str, dict[str, float | None]]:
    """Score rows with keys sentence, gold (target string), prediction, split, implicit, mams.

    A test type that selects no sentence gets None for precision, recall and F1 (the paper's
    convention of 1 for an empty list would report a perfect score for nothing).
    """
    rows = list(rows)
    out: dict[str, dict[str, float]] = {}
    for test_type in test_types:
        chosen = [r for r in rows if in_test_type(test_type, r["split"], r["implicit"], r["mams"])]
        if not chosen:  # no sentence of this type (a set without hard_test, a small sample): no score, not 100%
            out[test_type] = {"precision": None, "recall": None, "f1": None, "n_sentences": 0.0}
            continue
        gold = [parse_pairs(task, r["gold"], r["sentence"]) for r in chosen]
        pred = [parse_pairs(task, r["prediction"], r["sentence"]) for r in chosen]
        out[test_type] = {**micro_prf(gold, pred), "n_sentences": float(len(chosen))}
    return out
