"""The cleaning rules, one small class each, applied in the order of `RULES`.

Like datatrove's formatter and filter blocks, a rule has

* `name`: its key in stats.json and, for a drop rule, the quarantine `rule` value;
* `kind`: "modify" (rewrites the output, never drops a row: `format(text) -> text`) or "drop"
  (`filter(row)` answers True to keep, or `(False, detail)`);
* `keys`: the `clean.*` config keys it reads, checked when the rule is built (an InputError that
  names the key);
* `counts`: its own count of rows modified or dropped, per prompt.

Rules see only the rows still alive, in input order. Vectorised rules (decontamination, exact and
near dedup) override `filter_batch`; dedup keeps its index across row groups, so the result is the
same for any row-group size. Decontamination runs before dedup: a row dropped as contaminated never
enters a dedup index, so it cannot suppress a clean duplicate of itself. Each dedup index holds only
rows that passed every rule before it. Reordering `RULES` is a code change, so it re-keys the stage.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsa_distill.tasks.clean.decontam import BenchmarkSentence, Decontaminator
from fsa_distill.tasks.clean.minhash import MinHasher, NearDupIndex, SortedRuns, exact_keys, prompt_salt
from fsa_distill.tasks.clean.text import (
    cut_preamble,
    cut_trailers,
    has_analysis_block,
    is_refusal,
    is_truncated,
)

from fsa_distill.errors import InputError

ANALYSIS_PROMPT = "analysis"

#: What a drop rule answers for a row: True (keep) or (False, detail).
Verdict = bool | tuple[bool, str]
KEEP: Verdict = True


class Row(NamedTuple):
    """One row as a per-row rule sees it (`text` is the output as rewritten so far)."""

    text: str
    prompt: str
    finish_reason: str | None
    review: str


@dataclass
class Batch:
    """One row group being cleaned: the columns the rules read, and each row's dropping rule."""

    text: list[str]
    prompt: list[str]
    finish_reason: list[str | None]
    review: pa.Array  # large_string, nulls as ""
    ordinal: np.ndarray  # input row number (counted across row groups)
    rule: list[str | None] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rule = self.rule or [None] * len(self.text)
        self.detail = self.detail or [""] * len(self.text)
        self._reviews: list[str] | None = None

    @classmethod
    def from_table(cls, table: pa.Table, first: int) -> Batch:
        """A batch of a generations row group whose first row is input row `first`."""
        n = table.num_rows
        review = pc.fill_null(table.column("review"), "").cast(pa.large_string()).combine_chunks()
        return cls(
            text=[t or "" for t in table.column("output").to_pylist()],
            prompt=[p or "" for p in table.column("prompt").to_pylist()],
            finish_reason=table.column("finish_reason").to_pylist(),
            review=review,
            ordinal=np.arange(first, first + n, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.text)

    def row(self, i: int) -> Row:
        """Row `i` for a per-row rule."""
        if self._reviews is None:
            self._reviews = self.review.to_pylist()
        return Row(self.text[i], self.prompt[i], self.finish_reason[i], self._reviews[i])


@dataclass(frozen=True)
class RuleInputs:
    """What rules need besides their config keys: the benchmark sentences for decontamination."""

    sentences: Sequence[BenchmarkSentence] = ()


# --------------------------------------------------------------------------------------------
# config checks (each names its key)


def positive_int(key: str, value: Any) -> int:
    """`value` if it is an integer >= 1, else an InputError naming `clean.<key>`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"clean.{key} must be a positive integer, got {value!r}")
    return value


def non_negative_int(key: str, value: Any) -> int:
    """`value` if it is an integer >= 0, else an InputError naming `clean.<key>`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"clean.{key} must be a non-negative integer, got {value!r}")
    return value


def fraction(key: str, value: Any) -> float:
    """`value` as a float in [0, 1], else an InputError naming `clean.<key>`."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 <= share <= 1.0:
        raise InputError(f"clean.{key} must be between 0 and 1, got {value!r}")
    return share


# --------------------------------------------------------------------------------------------
# bases


class Rule:
    """A cleaning step with its own counts (rows it modified or dropped, per prompt)."""

    name: ClassVar[str]
    kind: ClassVar[str]
    #: The `clean.*` keys this rule reads; they are passed to the constructor as keyword arguments.
    keys: ClassVar[tuple[str, ...]] = ()
    #: Values for keys that may be absent from the config.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @classmethod
    def settings(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """This rule's keys from the `clean` config section (a missing one raises, naming it)."""
        out = {}
        for key in cls.keys:
            if key in cfg:
                out[key] = cfg[key]
            elif key in cls.defaults:
                out[key] = cls.defaults[key]
            else:
                raise InputError(f"clean.{key} is missing (read by the {cls.name} rule)")
        return out

    @classmethod
    def from_config(cls, cfg: dict[str, Any], inputs: RuleInputs) -> Rule:
        """The rule built from its keys of the `clean` config section."""
        return cls(**cls.settings(cfg))

    def run(self, batch: Batch, live: list[int]) -> list[int]:
        """Apply the rule to the live rows of `batch`; return the rows still alive."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Top-level stats.json entries this rule adds (deterministic counts only)."""
        return {}


class ModifyRule(Rule):
    """Rewrites the output (a formatter); never drops a row."""

    kind = "modify"

    def format(self, text: str) -> str:
        """The rewritten text."""
        raise NotImplementedError

    def run(self, batch: Batch, live: list[int]) -> list[int]:
        """Rewrite the live rows' text in place, counting the rows it changed."""
        for i in live:
            new = self.format(batch.text[i])
            if new != batch.text[i]:
                batch.text[i] = new
                self.counts[batch.prompt[i]] += 1
        return live


class DropRule(Rule):
    """Keeps a row or drops it with a detail (a filter); dropped rows go to the quarantine."""

    kind = "drop"

    def filter(self, row: Row) -> Verdict:
        """True to keep `row`, or (False, detail)."""
        raise NotImplementedError

    def filter_batch(self, batch: Batch, live: list[int]) -> Sequence[Verdict]:
        """A verdict per live row, in order (vectorised rules override this)."""
        return [self.filter(batch.row(i)) for i in live]

    def run(self, batch: Batch, live: list[int]) -> list[int]:
        """Mark the rows this rule drops (rule name and detail) and count them; return the rest."""
        if not live:
            return live
        kept = []
        for i, verdict in zip(live, self.filter_batch(batch, live), strict=True):
            keep, detail = verdict if isinstance(verdict, tuple) else (verdict, "")
            if keep:
                kept.append(i)
            else:
                batch.rule[i], batch.detail[i] = self.name, detail
                self.counts[batch.prompt[i]] += 1
        return kept


# --------------------------------------------------------------------------------------------
# modify rules


class Trim(ModifyRule):
    """Leading and trailing whitespace."""

    name = "trim"

    def format(self, text: str) -> str:
        return text.strip()


class Preamble(ModifyRule):
    """A chatty opening ("Sure! Here's the rewritten review:") and the quotes around the answer."""

    name = "preamble"

    def format(self, text: str) -> str:
        return cut_preamble(text)


class Trailer(ModifyRule):
    """`Confidence: 90%` lines and trailing notes, references and separators."""

    name = "trailer"

    def format(self, text: str) -> str:
        return cut_trailers(text)


# --------------------------------------------------------------------------------------------
# drop rules


class Refusal(DropRule):
    """The output declines the task ("I'm sorry, but I can't", "As an AI language model")."""

    name = "refusal"

    def filter(self, row: Row) -> Verdict:
        return (False, "") if is_refusal(row.text) else KEEP


class Truncated(DropRule):
    """Generation stopped early: a length/error finish, or no terminal punctuation."""

    name = "truncated"

    def filter(self, row: Row) -> Verdict:
        if not is_truncated(row.text, row.finish_reason):
            return KEEP
        finish = row.finish_reason
        return False, f"finish_reason {finish}" if finish in ("length", "error") else "no terminal punctuation"


class Unparseable(DropRule):
    """An analysis answer without a well-formed Opinion Target/Aspect/Sentiment/Reasoning block."""

    name = "unparseable"

    def filter(self, row: Row) -> Verdict:
        if row.prompt == ANALYSIS_PROMPT and not has_analysis_block(row.text):
            return False, "no well-formed Opinion Target/Aspect/Sentiment/Reasoning block"
        return KEEP


class Length(DropRule):
    """The cleaned output is shorter than `min_chars` or longer than `max_chars` characters."""

    name = "length"
    keys = ("min_chars", "max_chars")

    def __init__(self, *, min_chars: int, max_chars: int) -> None:
        super().__init__()
        self.min_chars = non_negative_int("min_chars", min_chars)
        self.max_chars = positive_int("max_chars", max_chars)

    def filter(self, row: Row) -> Verdict:
        if self.min_chars <= len(row.text) <= self.max_chars:
            return KEEP
        return False, f"{len(row.text)} chars, bounds {self.min_chars}..{self.max_chars}"


class Contaminated(DropRule):
    """The review holds a benchmark dev/test/hard_test sentence (checked once per distinct review)."""

    name = "contaminated"
    keys = ("decontam_ngram", "decontam_threshold", "decontam_min_words")
    defaults: ClassVar[dict[str, Any]] = {"decontam_min_words": 8}

    def __init__(
        self,
        *,
        decontam_ngram: int,
        decontam_threshold: float,
        decontam_min_words: int,
        sentences: Sequence[BenchmarkSentence] = (),
    ) -> None:
        super().__init__()
        self.index = Decontaminator(
            sentences,
            positive_int("decontam_ngram", decontam_ngram),
            fraction("decontam_threshold", decontam_threshold),
            non_negative_int("decontam_min_words", decontam_min_words),
        )

    @classmethod
    def from_config(cls, cfg: dict[str, Any], inputs: RuleInputs) -> Rule:
        return cls(**cls.settings(cfg), sentences=inputs.sentences)

    def filter_batch(self, batch: Batch, live: list[int]) -> Sequence[Verdict]:
        encoded = pc.dictionary_encode(batch.review.take(pa.array(live, pa.int64())))
        flagged, details = self.index.check(encoded.dictionary)
        return [(False, details[c]) if flagged[c] else KEEP for c in encoded.indices.to_numpy()]

    def stats(self) -> dict[str, Any]:
        return {
            "benchmark_sentences": self.index.sentences,
            "benchmark_sentences_skipped_short": self.index.skipped,
        }


class ExactDup(DropRule):
    """An earlier row that reached this rule has the same prompt and normalised output."""

    name = "exact_dup"

    def __init__(self) -> None:
        super().__init__()
        self.index = SortedRuns()  # key -> input ordinal of the first row with it

    def filter_batch(self, batch: Batch, live: list[int]) -> Sequence[Verdict]:
        keys = exact_keys([batch.prompt[i] for i in live], [batch.text[i] for i in live])
        ordinal = batch.ordinal[live]
        q, first = self.index.lookup(keys)
        known = {int(keys[qi]): int(origin) for qi, origin in zip(q, first, strict=True)}
        verdicts: list[Verdict] = []
        new = []
        for pos in range(len(live)):
            origin = known.setdefault(int(keys[pos]), int(ordinal[pos]))
            if origin != ordinal[pos]:
                verdicts.append((False, f"exact duplicate of input row {origin}"))
            else:
                verdicts.append(KEEP)
                new.append(pos)
        self.index.add(keys[new], ordinal[new])
        return verdicts


class NearDup(DropRule):
    """MinHash LSH over word n-gram shingles: an earlier row that reached this rule has an estimated
    Jaccard >= `near_dup_threshold` (rows of different prompts are never compared)."""

    name = "near_dup"
    keys = ("minhash_perm", "minhash_bands", "minhash_ngram", "near_dup_threshold")

    def __init__(self, *, minhash_perm: int, minhash_bands: int, minhash_ngram: int, near_dup_threshold: float) -> None:
        super().__init__()
        perm = positive_int("minhash_perm", minhash_perm)
        bands = positive_int("minhash_bands", minhash_bands)
        ngram = positive_int("minhash_ngram", minhash_ngram)
        threshold = fraction("near_dup_threshold", near_dup_threshold)
        if perm % bands:
            raise InputError(f"clean.minhash_perm ({perm}) must be a multiple of clean.minhash_bands ({bands})")
        self.hasher = MinHasher(perm, ngram)
        self.index = NearDupIndex(perm, bands, threshold)

    def filter_batch(self, batch: Batch, live: list[int]) -> Sequence[Verdict]:
        sig = self.hasher.signatures(pa.array([batch.text[i] for i in live], pa.large_string()))
        salt = prompt_salt([batch.prompt[i] for i in live])
        dup, matched, sim = self.index.add_batch(sig, salt, batch.ordinal[live])
        return [
            (False, f"near duplicate of input row {matched[pos]} (estimated Jaccard {sim[pos]:.2f})") if d else KEEP
            for pos, d in enumerate(dup)
        ]


#: The rules in the order they are applied.
RULES: tuple[type[Rule], ...] = (
    Trim,
    Preamble,
    Trailer,
    Refusal,
    Truncated,
    Unparseable,
    Length,
    Contaminated,
    ExactDup,
    NearDup,
)
MODIFY_RULES = tuple(r.name for r in RULES if r.kind == "modify")
DROP_RULES = tuple(r.name for r in RULES if r.kind == "drop")
