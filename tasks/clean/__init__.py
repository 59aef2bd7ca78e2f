"""Stage `clean`: turn raw teacher generations into a training corpus, streaming by row group.

Rules, in this order (`RULES`): trim whitespace; cut chatty preambles ("Sure, here is ...:") and
trailers ("Note: ...", "Confidence: 90%"); drop refusals; drop truncated outputs; drop analysis
outputs with no well-formed `Opinion Target / Aspect / Sentiment / Reasoning` block; drop outputs
outside the length bounds; drop exact duplicates (same prompt, same normalised output); drop near
duplicates (MinHash LSH over word n-gram shingles, candidates verified by estimated Jaccard);
drop rows whose review overlaps a benchmark dev/test/hard_test sentence (decontamination).

A row is compared only with *earlier kept* rows, so the result is the same for any row-group
size; rows of different prompts are never duplicates of each other. Memory stays flat as the
corpus grows except for the dedup indexes, which hold 64-bit hashes, band keys and 16-bit
MinHash values (about 340 bytes per kept row with the defaults), never texts. MinHash is
computed here with numpy, vectorised over a row group (benchmark/bench_clean.py compares it
with datasketch: 7-10x the rows/s at a fraction of the memory).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsa_distill.tasks.stage import stage
from fsa_distill.tasks.teachers.common import GENERATIONS

from fsa_distill.artifacts import Artifact
from fsa_distill.errors import InputError

# --------------------------------------------------------------------------------------------
# Schemas and rule names

#: The generate stage's output contract (tasks/teachers/common.py), the input of cleaning.
GENERATIONS_SCHEMA = GENERATIONS
CORPUS_SCHEMA = GENERATIONS_SCHEMA.append(pa.field("raw_output", pa.string()))
QUARANTINE_SCHEMA = GENERATIONS_SCHEMA.append(pa.field("rule", pa.string())).append(pa.field("detail", pa.string()))

MODIFY_RULES = ("trim", "preamble", "trailer")  # rewrite the output, never drop it
DROP_RULES = ("refusal", "truncated", "unparseable", "length", "exact_dup", "near_dup", "contaminated")
RULES = MODIFY_RULES + DROP_RULES  # the order in which they are applied
ANALYSIS_PROMPT = "analysis"
BENCHMARK_SPLITS = ("dev", "test", "hard_test")

# --------------------------------------------------------------------------------------------
# Text rules

_CHATTY = r"(?:sure|certainly|of course|absolutely|okay|ok|alright)"
# "here is the rewritten review", "below is my analysis": an announcement names what follows
_ANNOUNCE = (
    r"(?:here(?:'s| is| are)|below is|below are|this is)\b[^\n:]{0,80}?"
    r"\b(?:rewrit\w*|re-written|revis\w*|review|version|analysis|output|answer|response|result|breakdown)s?\b"
    r"[^\n:]{0,60}?"
)
_LABEL = r"(?:output|answer|response|rewrite|rewritten review|revised review|rewritten version|analysis)"
_PREAMBLES = [
    # a whole first line that announces the answer: "Sure, here is the rewritten review:", "Output:"
    re.compile(
        rf"\A[ \t]*(?:{_CHATTY}\b[^\n]{{0,80}}?|(?:{_CHATTY}[,!.]?[ \t]+)?{_ANNOUNCE}|{_LABEL}[ \t]*|review[ \t]*)"
        r":[ \t]*(?:\n|\Z)",
        re.IGNORECASE,
    ),
    # the same announcement inline: "Here's the rewritten review: I ...", "Rewritten review: I ..."
    re.compile(rf"\A[ \t]*(?:(?:{_CHATTY}[,!.]?[ \t]+)?{_ANNOUNCE}|{_LABEL}[ \t]*):[ \t]*", re.IGNORECASE),
    # a bare "Sure!" / "Certainly." before the answer
    re.compile(rf"\A[ \t]*{_CHATTY}[!.][ \t]*\n?", re.IGNORECASE),
]
_CONFIDENCE_LINE = re.compile(
    r"^[ \t]*[(\[]?[ \t]*\**confidence(?:[ \t]+(?:rating|level|score))?\**[ \t]*[:=-][ \t]*\d{1,3}(?:\.\d+)?[ \t]*%"
    r"[ \t]*[)\]]?[ \t]*$\n?",
    re.IGNORECASE | re.MULTILINE,
)
# Single words count only as a label ("Note:", "Confidence: 90%"); "Note that ..." is content.
_TRAILER_MARKER = (
    r"(?:(?:notes?|nb|n\.b\.|disclaimer|references?|reference\(s\)|sources?|confidence(?: rating| level| score)?"
    r"|response(?: format)?|explanation|corrections?|total)\**[ \t]*:"
    r"|note\b[^\n:]{0,40}:|please note\b|i hope (?:this|that) helps\b|let me know\b|feel free\b)"
)
# A line starting with a trailer marker, and the rest of its paragraph, at the very end of the text.
_TRAILER = re.compile(
    rf"\n[ \t]*(?:[(\[*_#>-]+[ \t]*)?{_TRAILER_MARKER}[^\n]*(?:\n(?![ \t]*\n)[^\n]*)*\s*\Z", re.IGNORECASE
)
_SEPARATOR_TAIL = re.compile(r"\n[ \t]*[-*=_.~#]{3,}[ \t]*\s*\Z")
_QUOTES = {'"': '"', "“": "”", "'": "'"}

_TASK_VERB = (
    r"(?:fulfill|comply|complete|assist|help(?! but)|provide|perform|process|analy[sz]e|rewrite|generate|create|"
    r"write|answer|do that|do this|engage|support|continue)"
)
_SORRY = r"(?:(?:i'?m|i am) sorry|sorry|i apologi[sz]e)"
_CANNOT = r"(?:cannot|can't|can not|am unable to|'m unable to|am not able to|won't be able to|will not|won't)"
_REFUSALS = [
    # "I'm sorry, but I can't fulfill ...", "Unfortunately, I am unable to provide ..."
    re.compile(
        rf"\A\W*(?:{_SORRY}|unfortunately)\b[^.!?\n]{{0,60}}?\bi {_CANNOT} {_TASK_VERB}\b",
        re.IGNORECASE,
    ),
    # "I'm sorry, but the review you provided ..."
    re.compile(
        rf"\A\W*{_SORRY},? but (?:the|this|your) (?:review|text|request|input|prompt)\b",
        re.IGNORECASE,
    ),
    re.compile(rf"\A\W*i {_CANNOT} {_TASK_VERB}\b", re.IGNORECASE),
]
# anywhere in the text; searched only when a cheap substring test finds "an ai" or "language model"
_AI_SELF = re.compile(r"\bas an ai\b(?!-)|\bas a(?:n ai)? language model\b|\bi(?:'m| am) an ai\b(?!-)", re.IGNORECASE)
_TERMINAL = re.compile(r"(?:[.!?…](?:[\"'”’)\]*_]*)|\S[\"”])\s*\Z")

_FIELD = re.compile(
    r"^[ \t]*(?:[-*•+][ \t]*|\d+[.)][ \t]*)?\**[ \t]*(opinion[ \t]+target|target|aspect|sentiment|reasoning)s?"
    r"(?:[ \t]*\d+)?[ \t]*\**[ \t]*:[ \t]*\**[ \t]*(.*)$",
    re.IGNORECASE,
)
_PLACEHOLDER = re.compile(
    r"^[\[(<{].*(?:fill|your own|insert|to be|placeholder|todo|tbd).*[\])>}]$|^<[^>]*>$", re.IGNORECASE
)
_MAX_SENTIMENT_CHARS = 60


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]] and text[0] not in text[1:-1]:
        return text[1:-1].strip()
    return text


def cut_preamble(text: str) -> str:
    """The text without a chatty opening ("Sure! Here's the rewritten review:") and its wrapping quotes."""
    cut = text
    for _ in range(3):
        before = cut
        for pattern in _PREAMBLES:
            match = pattern.match(cut)
            if match and match.end() < len(cut):
                cut = cut[match.end() :].lstrip()
                break
        if cut == before:
            break
    return _unquote(cut) if cut != text else text


def cut_trailers(text: str) -> str:
    """The text without `Confidence: 90%` lines and trailing notes, references and separators."""
    cut = _CONFIDENCE_LINE.sub("", text).rstrip()
    while True:
        match = _TRAILER.search(cut) or _SEPARATOR_TAIL.search(cut)
        if not match or not cut[: match.start()].strip():
            return cut
        cut = cut[: match.start()].rstrip()


def is_refusal(text: str) -> bool:
    """Whether the output declines the task ("I'm sorry, but I can't", "As an AI language model")."""
    if any(p.search(text) for p in _REFUSALS):
        return True
    low = text.lower()
    return ("an ai" in low or "language model" in low) and _AI_SELF.search(text) is not None


def is_truncated(text: str, finish_reason: str | None) -> bool:
    """Whether generation stopped early: a length/error finish, or no terminal punctuation or closing quote."""
    return finish_reason in ("length", "error") or not _TERMINAL.search(text.rstrip()[-12:])


def _field_value(value: str) -> str:
    value = value.strip().strip("*").strip()
    return _unquote(value)


_BLOCK_FIELDS = ("target", "aspect", "sentiment", "reasoning")


def _well_formed(block: dict[str, str]) -> dict[str, str] | None:
    fields = {k: block.get(k, "").strip() for k in _BLOCK_FIELDS}
    if (
        all(fields.values())
        and len(fields["sentiment"]) <= _MAX_SENTIMENT_CHARS
        and not any(_PLACEHOLDER.match(v) for v in fields.values())
    ):
        return fields
    return None


def _iter_blocks(text: str) -> Iterator[dict[str, str]]:
    """The well-formed blocks of an analysis answer, lazily (the rule stops at the first one)."""
    current: dict[str, str] = {}
    target = ""
    last: str | None = None
    for line in text.splitlines():
        match = _FIELD.match(line)
        if match:
            key = match.group(1).lower()
            key = "target" if key.endswith("target") else key
            value = _field_value(match.group(2))
            if key == "target" or (key == "aspect" and "aspect" in current) or not current:
                if current and (block := _well_formed(current)):
                    yield block
                target = value if key == "target" else target
                current = {"target": target, key: value}
            else:
                current[key] = value
            last = key
        elif not line.strip():
            last = None
        elif last is not None and current:
            current[last] = f"{current.get(last, '')} {line.strip()}".strip()
    if current and (block := _well_formed(current)):
        yield block


def parse_analysis(text: str) -> list[dict[str, Any]]:
    """The well-formed blocks of an analysis answer: dicts with index, target, aspect, sentiment, reasoning.

    A block starts at `Opinion Target N:` (or at an `Aspect:` line, which then inherits the last
    target); a field may continue on the next lines until a blank line. A block is well-formed when
    all four fields are non-empty, the sentiment is a short label and no field is a template
    placeholder such as "(your own analysis here)". Malformed blocks are left out.
    """
    return [{"index": i, **block} for i, block in enumerate(_iter_blocks(text), start=1)]


def has_analysis_block(text: str) -> bool:
    """Whether an analysis answer has at least one well-formed block (what the `unparseable` rule asks)."""
    return next(_iter_blocks(text), None) is not None


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace-collapsed text: what exact dedup compares."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# --------------------------------------------------------------------------------------------
# Hashing: words -> n-gram hashes -> MinHash signatures -> LSH band keys (numpy, per row group)

_U64 = np.uint64
_MUL = _U64(0x9E3779B97F4A7C15)
_LEN_TAG = _U64(0xD6E8FEB86659FD93)
_BAND_TAG = _U64(0xA0761D6478BD642F)
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’–—…«»¡¿·•"


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the 64 output bits (in place on a copy)."""
    x = x.astype(_U64, copy=True)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def word_hashes(texts: pa.Array | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of every text, and the row offsets into them.

    A word is a whitespace-separated token, lower-cased, with surrounding punctuation trimmed
    ("Great!" and "great" are the same word). Tokens are split by pyarrow and hashed once per
    distinct word of the batch (pandas' SipHash with a fixed key), so a word's hash depends only
    on its characters: the same in every batch and every process.
    """
    arr = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(list(texts), pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    arr = pc.replace_substring(pc.utf8_lower(arr), "\u00a0", " ")  # no-break space: the one common non-ASCII space
    parts = pc.ascii_split_whitespace(arr)
    offsets = parts.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    flat = pc.utf8_trim(pc.list_flatten(parts), characters=_PUNCTUATION)
    keep = pc.binary_length(flat).to_numpy(zero_copy_only=False) > 0
    cumulative = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    offsets = cumulative[offsets]
    flat = flat.filter(pa.array(keep))
    if len(flat) == 0:
        return np.zeros(0, _U64), offsets
    encoded = pc.dictionary_encode(flat)
    vocab = encoded.dictionary.to_numpy(zero_copy_only=False).astype(object)
    return pd.util.hash_array(vocab, categorize=False)[encoded.indices.to_numpy()], offsets


def _length_tag(n: int) -> np.uint64:
    return _U64((n * int(_LEN_TAG)) % (1 << 64))


def ngram_hashes(
    words: np.ndarray, offsets: np.ndarray, n: int, *, short: str = "whole"
) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every contiguous word n-gram of every row, and their row offsets.

    A row with fewer than n words gives one gram of all its words (`short="whole"`; an empty row
    gives one constant gram) or none (`short="skip"`). A gram's hash depends only on its words
    and their number, so the same word sequence hashes the same in any row or batch.
    """
    lengths = np.diff(offsets)
    long_rows = lengths >= n
    count = np.where(long_rows, lengths - n + 1, 1 if short == "whole" else 0)
    goff = np.concatenate([[0], np.cumsum(count, dtype=np.int64)])
    out = np.empty(goff[-1], _U64)
    short_rows = np.nonzero(~long_rows & (count > 0))[0]
    is_short = np.zeros(goff[-1], bool)
    is_short[goff[short_rows]] = True
    # Long rows: every window of the flat word array, computed with slices; a window is kept when
    # it starts at least n-1 words before the end of its row (so never in a short row either).
    if long_rows.any():
        windows = np.zeros(len(words) - n + 1, _U64)
        for k in range(n):
            windows *= _MUL
            windows += words[k : len(words) - n + 1 + k]
        windows ^= _length_tag(n)
        valid = np.ones(len(windows) + n, bool)
        ends = offsets[1:]
        for k in range(1, n):
            valid[(ends - k)[lengths >= k]] = False
        out[~is_short] = windows[valid[: len(windows)]]
    # Short rows (whole mode): one gram of all their words.
    if len(short_rows):
        length = lengths[short_rows]
        acc = np.zeros(len(short_rows), _U64)
        padded = np.concatenate([words, np.zeros(n, _U64)])
        for k in range(n - 1):
            acc = np.where(k < length, acc * _MUL + padded[offsets[short_rows] + k], acc)
        acc ^= length.astype(_U64) * _LEN_TAG
        out[is_short] = acc
    return mix64(out), goff


class MinHasher:
    """MinHash signatures of word n-gram shingle sets, computed for a whole row group at once.

    Permutation j maps a shingle hash x to the top 32 bits of (a_j * x + b_j) mod 2^64 (a_j odd):
    multiply-shift hashing. The minimum over a row's shingles is taken with `np.minimum.reduceat`
    on chunks of about `chunk` shingles, so the temporary (permutations x shingles) matrix stays small.
    """

    ROWS = 2048  # texts per pass: bounds the temporary word and shingle arrays

    def __init__(self, num_perm: int, ngram: int, seed: int = 1, chunk: int = 1 << 15) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.ngram = ngram
        self.a = rng.integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64, endpoint=True) | _U64(1)
        self.b = rng.integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64, endpoint=True)
        self.chunk = chunk

    def shingles(self, texts: pa.Array | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of every text and their row offsets."""
        words, offsets = word_hashes(texts)
        return ngram_hashes(words, offsets, self.ngram, short="whole")

    def signatures(self, texts: pa.Array | Sequence[str]) -> np.ndarray:
        """(rows, num_perm) uint32 MinHash signatures, computed ROWS rows at a time (bounded memory)."""
        arr = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(list(texts), pa.large_string())
        parts = [self._signatures(arr.slice(i, self.ROWS)) for i in range(0, len(arr), self.ROWS)]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_perm), np.uint32)

    def _signatures(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        shingles, goff = self.shingles(texts)
        n_rows = len(goff) - 1
        sig = np.empty((n_rows, self.num_perm), np.uint32)
        # (permutations x shingles) layout: reduceat along the contiguous axis is several times
        # faster than along the other one.
        buf = np.empty((self.num_perm, min(self.chunk, len(shingles)) or 1), _U64)
        r0 = 0
        while r0 < n_rows:
            r1 = int(np.searchsorted(goff, goff[r0] + self.chunk, side="right")) - 1
            r1 = min(max(r1, r0 + 1), n_rows)
            x = shingles[goff[r0] : goff[r1]]
            block = buf[:, : len(x)] if len(x) <= buf.shape[1] else np.empty((self.num_perm, len(x)), _U64)
            np.multiply(self.a[:, None], x[None, :], out=block)
            block += self.b[:, None]
            # min of the 64-bit values, then their top 32 bits == min of the top 32 bits
            sig[r0:r1] = (np.minimum.reduceat(block, goff[r0:r1] - goff[r0], axis=1) >> _U64(32)).T
            r0 = r1
        return sig


def band_keys(sig: np.ndarray, bands: int, salt: np.ndarray | None = None) -> np.ndarray:
    """(rows, bands) uint64 LSH keys: each band's rows of the signature hashed with the band index (and salt)."""
    n, perm = sig.shape
    rows = perm // bands
    view = sig.reshape(n, bands, rows).astype(_U64)
    acc = np.zeros((n, bands), _U64)
    for j in range(rows):
        acc = acc * _MUL + view[:, :, j]
    acc ^= (np.arange(bands, dtype=_U64) + _U64(1)) * _BAND_TAG
    if salt is not None:
        acc ^= salt.astype(_U64)[:, None]
    return mix64(acc)


def _expand_ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [lo_i, hi_i): (i repeated per element, every element) without a Python loop."""
    count = hi - lo
    which = np.repeat(np.arange(len(lo)), count)
    first = np.concatenate([[0], np.cumsum(count)])[:-1]
    return which, lo[which] + (np.arange(count.sum()) - first[which])


class SortedRuns:
    """A growing multimap from uint64 keys to integer values: sorted runs merged like a binary counter.

    Adding is amortised O(log n) per key, a merge needs only the two runs and their result, and a
    lookup is one `searchsorted` of the sorted queries per run (sorted queries keep it cache-friendly).
    Only the keys and values are held, as flat numpy arrays.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs)

    def nbytes(self) -> int:
        """Memory held by the keys and values."""
        return sum(k.nbytes + v.nbytes for k, v in self.runs)

    @staticmethod
    def _merge(old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        (k_old, v_old), (k_new, v_new) = old, new
        at = np.searchsorted(k_old, k_new, side="right") + np.arange(len(k_new))  # after equal older keys
        size = len(k_old) + len(k_new)
        keys, values = np.empty(size, k_old.dtype), np.empty(size, v_old.dtype)
        old_slots = np.ones(size, bool)
        old_slots[at] = False
        keys[at], values[at] = k_new, v_new
        keys[old_slots], values[old_slots] = k_old, v_old
        return keys, values

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Store (key, value) pairs."""
        if len(keys) == 0:
            return
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], values[order]))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            new = self.runs.pop()
            self.runs.append(self._merge(self.runs.pop(), new))

    def lookup(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query index, value) for every stored entry whose key equals a query."""
        order = np.argsort(queries, kind="stable")
        ordered = queries[order]
        qs, vs = [], []
        for keys, values in self.runs:
            lo = np.searchsorted(keys, ordered, side="left")
            hit = np.nonzero(keys[np.minimum(lo, len(keys) - 1)] == ordered)[0]
            hi = np.searchsorted(keys, ordered[hit], side="right")
            which, pos = _expand_ranges(lo[hit], hi)
            qs.append(order[hit[which]])
            vs.append(values[pos])
        if not qs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(qs), np.concatenate(vs)


class NearDupIndex:
    """Streaming near-duplicate removal: a row is a near duplicate when it shares an LSH band with an
    earlier kept row and their estimated Jaccard (fraction of equal MinHash values) is >= threshold.

    Only kept rows are indexed: their band keys (uint64 + an int32 id), the top 16 bits of their
    signature values (b-bit MinHash: the Jaccard estimate moves by at most (1 - J) / 65536, and
    half the memory) and their input ordinal (for the quarantine detail), the latter two in
    fixed-size blocks so growth never copies. That is 16 x 12 + 2 x num_perm + 8 bytes per kept
    row: 328 bytes with the defaults. Band keys use the full 32-bit values.
    """

    BLOCK = 1 << 16

    def __init__(self, num_perm: int, bands: int, threshold: float) -> None:
        if bands <= 0 or num_perm % bands:
            raise InputError(f"clean.minhash_perm ({num_perm}) must be a multiple of clean.minhash_bands ({bands})")
        self.num_perm, self.bands, self.threshold = num_perm, bands, threshold
        self.keys = SortedRuns()
        self.blocks: list[np.ndarray] = []
        self.origin: list[np.ndarray] = []
        self.size = 0

    def _similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Estimated Jaccard of row pairs: the share of equal signature values."""
        return np.count_nonzero(a == b, axis=1) / self.num_perm

    @staticmethod
    def _gather(blocks: list[np.ndarray], ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), *blocks[0].shape[1:]) if blocks else (0,), blocks[0].dtype if blocks else np.int64)
        block = ids // NearDupIndex.BLOCK
        for b in np.unique(block):
            sel = block == b
            out[sel] = blocks[b][ids[sel] % NearDupIndex.BLOCK]
        return out

    def _append(self, sig: np.ndarray, origin: np.ndarray) -> np.ndarray:
        ids = np.arange(self.size, self.size + len(sig), dtype=np.int64)
        done = 0
        while done < len(sig):
            if self.size % self.BLOCK == 0:
                self.blocks.append(np.empty((self.BLOCK, self.num_perm), np.uint16))
                self.origin.append(np.empty(self.BLOCK, np.int64))
            at = self.size % self.BLOCK
            take = min(self.BLOCK - at, len(sig) - done)
            self.blocks[-1][at : at + take] = sig[done : done + take]
            self.origin[-1][at : at + take] = origin[done : done + take]
            self.size += take
            done += take
        return ids

    def add_batch(
        self, sig: np.ndarray, salt: np.ndarray | None = None, origin: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check a batch (in order) against earlier kept rows and itself; index the kept ones.

        Returns (duplicate mask, input ordinal of the matched earlier row or -1, estimated Jaccard).
        """
        m = len(sig)
        origin = np.arange(m, dtype=np.int64) if origin is None else origin
        keys = band_keys(sig, self.bands, salt)
        if self.size + m >= 2**31:
            raise InputError("the near-duplicate index holds at most 2^31 rows")
        sig = (sig >> np.uint32(16)).astype(np.uint16)  # what verification compares, in every path
        flat = keys.ravel()
        flat_row = np.repeat(np.arange(m), self.bands)
        best_j = np.zeros(m)
        match = np.full(m, -1, np.int64)  # index id (earlier batches) or -(batch row)-2 (this batch)
        # 1. earlier batches: the best verified match per row (ties: the earliest kept row)
        q, owner = self.keys.lookup(flat)
        if len(q):
            packed = np.unique((flat_row[q].astype(np.int64) << 32) | owner.astype(np.int64))
            pairs = np.stack([packed >> 32, packed & 0xFFFFFFFF], axis=1)
            sim = self._similarity(sig[pairs[:, 0]], self._gather(self.blocks, pairs[:, 1]))
            good = sim >= self.threshold
            pairs, sim = pairs[good], sim[good]
            order = np.lexsort((pairs[:, 1], -sim, pairs[:, 0]))
            pairs, sim = pairs[order], sim[order]
            first = np.concatenate([[True], pairs[1:, 0] != pairs[:-1, 0]]) if len(pairs) else np.zeros(0, bool)
            best_j[pairs[first, 0]] = sim[first]
            match[pairs[first, 0]] = pairs[first, 1]
        dup = match >= 0
        # 2. within the batch: pairs (i < j) that share a band key, resolved in row order
        order = np.lexsort((flat_row, flat))
        sk, sr = flat[order], flat_row[order]
        new_group = np.concatenate([[True], sk[1:] != sk[:-1]])
        group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(sk)), 0))
        rank = np.arange(len(sk)) - group_start
        which, earlier = _expand_ranges(group_start, group_start + rank)
        i_rows, j_rows = sr[earlier], sr[which]
        valid = i_rows < j_rows
        if valid.any():
            packed = np.unique(i_rows[valid].astype(np.int64) * m + j_rows[valid])
            pairs = np.stack([packed // m, packed % m], axis=1)
            sim = self._similarity(sig[pairs[:, 0]], sig[pairs[:, 1]])
            good = sim >= self.threshold
            # In order of the later row j: every pair (k, i) with i < j is settled before j is
            # looked at, so whether i is kept is final; a dropped i does not count.
            for j, i, s in sorted(zip(pairs[good, 1], pairs[good, 0], sim[good], strict=True)):
                if dup[i]:
                    continue
                if not dup[j] or s > best_j[j]:
                    best_j[j], match[j] = s, -int(i) - 2
                dup[j] = True
        kept = np.nonzero(~dup)[0]
        ids = self._append(sig[kept], origin[kept])
        self.keys.add(keys[kept].ravel(), np.repeat(ids.astype(np.int32), self.bands))
        matched = np.full(m, -1, np.int64)
        earlier_batch = match >= 0
        matched[earlier_batch] = self._gather(self.origin, match[earlier_batch])
        this_batch = match < -1
        matched[this_batch] = origin[-match[this_batch] - 2]
        return dup, matched, best_j


# --------------------------------------------------------------------------------------------
# Decontamination


@dataclass
class BenchmarkSentence:
    """One benchmark sentence that must not leak into the corpus."""

    label: str  # "<dataset>/<split>/<ID>"
    text: str


class Decontaminator:
    """Flags reviews that contain a benchmark sentence or share most of its word n-grams.

    A sentence of at least n words is represented by its distinct word n-grams; a shorter one by
    the single gram of all its words (so it matches only when the review contains it whole);
    sentences of fewer than `min_words` words are too generic to identify a leak and are skipped.
    A review is contaminated by a sentence when it holds all the sentence's grams (containment)
    or more than `threshold` of them.
    """

    def __init__(self, sentences: Sequence[BenchmarkSentence], n: int, threshold: float, min_words: int) -> None:
        self.n, self.threshold = n, threshold
        unique: dict[str, int] = {}
        labels: list[str] = []
        texts: list[str] = []
        for s in sentences:
            key = normalise(s.text)
            if key not in unique:
                unique[key] = len(texts)
                labels.append(s.label)
                texts.append(s.text)
        words, offsets = word_hashes(texts)
        lengths = np.diff(offsets)
        use = np.nonzero(lengths >= max(min_words, 1))[0]
        self.skipped = int(len(texts) - len(use))
        self.labels = [labels[i] for i in use]
        self.sentences = len(texts)
        sub_words = np.concatenate([words[offsets[i] : offsets[i + 1]] for i in use]) if len(use) else words[:0]
        sub_offsets = np.concatenate([[0], np.cumsum(lengths[use])]).astype(np.int64)
        grams, goff = ngram_hashes(sub_words, sub_offsets, n, short="whole")
        sid = np.repeat(np.arange(len(use)), np.diff(goff))
        pairs = np.unique(np.stack([grams.view(np.int64), sid], axis=1), axis=0) if len(grams) else np.zeros((0, 2))
        self.gram_keys = pairs[:, 0].astype(np.int64).view(_U64)
        self.gram_sid = pairs[:, 1].astype(np.int64)
        order = np.argsort(self.gram_keys, kind="stable")
        self.gram_keys, self.gram_sid = self.gram_keys[order], self.gram_sid[order]
        self.grams_per_sentence = np.bincount(self.gram_sid, minlength=len(use))
        self.lengths = sorted({int(min(x, n)) for x in lengths[use]})

    def check(self, reviews: pa.Array | Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(contaminated mask, detail per row naming the closest benchmark sentence and the overlap)."""
        words, offsets = word_hashes(reviews)
        n_rows = len(offsets) - 1
        rows_hit, grams_hit = [], []
        for k in self.lengths:
            grams, goff = ngram_hashes(words, offsets, k, short="skip")
            lo = np.searchsorted(self.gram_keys, grams, side="left")
            hit = np.nonzero(lo < len(self.gram_keys))[0]
            hit = hit[self.gram_keys[lo[hit]] == grams[hit]]
            rows_hit.append(np.searchsorted(goff, hit, side="right") - 1)
            grams_hit.append(grams[hit])
        flagged = np.zeros(n_rows, bool)
        details = [""] * n_rows
        if not rows_hit or not sum(len(r) for r in rows_hit):
            return flagged, details
        row_gram = np.unique(np.stack([np.concatenate(rows_hit), np.concatenate(grams_hit).view(np.int64)], 1), axis=0)
        gram = row_gram[:, 1].view(_U64)
        lo = np.searchsorted(self.gram_keys, gram, side="left")
        hi = np.searchsorted(self.gram_keys, gram, side="right")
        which, pos = _expand_ranges(lo, hi)
        row_sid, counts = np.unique(np.stack([row_gram[which, 0], self.gram_sid[pos]], 1), axis=0, return_counts=True)
        total = self.grams_per_sentence[row_sid[:, 1]]
        overlap = counts / total
        bad = (counts == total) | (overlap > self.threshold)
        best: dict[int, tuple[float, int]] = {}
        for row, sid, share in zip(row_sid[bad, 0], row_sid[bad, 1], overlap[bad], strict=True):
            if int(row) not in best or share > best[int(row)][0]:
                best[int(row)] = (float(share), int(sid))
        for row, (share, sid) in best.items():
            flagged[row] = True
            details[row] = f"benchmark sentence {self.labels[sid]} (n-gram overlap {share:.2f})"
        return flagged, details


def benchmark_sentences(benchmark: Sequence[Artifact]) -> list[BenchmarkSentence]:
    """The dev, test and hard_test sentences of acquired benchmark datasets."""
    out: list[BenchmarkSentence] = []
    for art in benchmark:
        folder = Path(art.path)
        meta_path = folder / "meta.json"
        name = json.loads(meta_path.read_text()).get("dataset", folder.name) if meta_path.is_file() else folder.name
        for split in BENCHMARK_SPLITS:
            path = folder / f"{split}.parquet"
            if not path.is_file():
                raise InputError(f"{path}: benchmark split missing (needed for decontamination)")
            table = pq.read_table(path)
            if "sentence" not in table.column_names:
                raise InputError(f"{path}: no 'sentence' column; the columns are {table.column_names}")
            ids = table.column("ID").to_pylist() if "ID" in table.column_names else range(table.num_rows)
            for rid, sentence in zip(ids, table.column("sentence").to_pylist(), strict=True):
                if sentence:
                    out.append(BenchmarkSentence(f"{name}/{split}/{rid}", sentence))
    return out


# --------------------------------------------------------------------------------------------
# The stage


def prompt_salt(prompts: Sequence[str]) -> np.ndarray:
    """Per-row salt so that rows of different prompts never share an LSH band."""
    cache: dict[str, int] = {}
    for p in set(prompts):
        cache[p] = int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
    return np.array([cache[p] for p in prompts], dtype=_U64)


def _exact_key(prompt: str, text: str) -> int:
    digest = hashlib.blake2b(f"{prompt}\0{normalise(text)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def iter_generations(generations: Sequence[Artifact], batch_size: int) -> Iterator[pa.Table]:
    """Row groups of every generations.parquet, in the contract's schema; bad files raise InputError."""
    for art in generations:
        path = Path(art.path) / "generations.parquet"
        if not path.is_file():
            raise InputError(f"{path}: generations file missing")
        try:
            # pre_buffer=False: with pre-buffering, iter_batches keeps every row group read so far
            # in memory until the file is done (measured: +1 row group per batch), which is not flat.
            pf = pq.ParquetFile(path, pre_buffer=False)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file: {exc}") from None
        missing = [n for n in GENERATIONS_SCHEMA.names if n not in pf.schema_arrow.names]
        if missing:
            raise InputError(f"{path}: missing columns {missing}; the columns are {pf.schema_arrow.names}")
        for batch in pf.iter_batches(batch_size=batch_size, columns=GENERATIONS_SCHEMA.names):
            table = pa.Table.from_batches([batch])
            try:
                yield table.cast(GENERATIONS_SCHEMA)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InputError(f"{path}: columns do not match the generations schema: {exc}") from None


def check_config(cfg: dict[str, Any]) -> None:
    """Reject settings the rules cannot work with, naming the key (an InputError: retrying cannot help)."""
    positive = ("max_chars", "minhash_perm", "minhash_bands", "minhash_ngram", "decontam_ngram", "row_group_size")
    for key in (*positive, "min_chars", "decontam_min_words"):
        value = cfg.get(key, 8 if key == "decontam_min_words" else None)
        if not isinstance(value, int) or value < (1 if key in positive else 0):
            raise InputError(
                f"clean.{key} must be a {'positive' if key in positive else 'non-negative'} integer, got {value!r}"
            )
    for key in ("near_dup_threshold", "decontam_threshold"):
        if not 0.0 <= float(cfg[key]) <= 1.0:
            raise InputError(f"clean.{key} must be between 0 and 1, got {cfg[key]!r}")
    if cfg["minhash_perm"] % cfg["minhash_bands"]:
        perm, bands = cfg["minhash_perm"], cfg["minhash_bands"]
        raise InputError(f"clean.minhash_perm ({perm}) must be a multiple of clean.minhash_bands ({bands})")


class Cleaner:
    """The rules with their state (dedup indexes, decontamination index); feed row groups in order."""

    def __init__(self, cfg: dict[str, Any], sentences: Sequence[BenchmarkSentence]) -> None:
        check_config(cfg)
        self.min_chars = int(cfg["min_chars"])
        self.max_chars = int(cfg["max_chars"])
        self.hasher = MinHasher(int(cfg["minhash_perm"]), int(cfg["minhash_ngram"]))
        self.near = NearDupIndex(int(cfg["minhash_perm"]), int(cfg["minhash_bands"]), float(cfg["near_dup_threshold"]))
        self.exact = SortedRuns()
        self.decontam = Decontaminator(
            sentences,
            int(cfg["decontam_ngram"]),
            float(cfg["decontam_threshold"]),
            int(cfg.get("decontam_min_words", 8)),
        )
        self.seen = 0
        self.stats: Counter[tuple[str, str]] = Counter()  # (prompt, event) -> n
        self.tokens_kept = 0
        self.review_chars_kept = 0

    def rules(self, raw: str | None, prompt: str, finish: str | None) -> tuple[str, str | None, list[str], str]:
        """(cleaned text, dropping rule or None, modifying rules that applied, detail) for one output."""
        mods = []
        text = (raw or "").strip()
        if text != (raw or ""):
            mods.append("trim")
        cut = cut_preamble(text)
        if cut != text:
            mods.append("preamble")
        text = cut
        cut = cut_trailers(text)
        if cut != text:
            mods.append("trailer")
        text = cut
        if is_refusal(text):
            return text, "refusal", mods, ""
        if is_truncated(text, finish):
            why = f"finish_reason {finish}" if finish in ("length", "error") else "no terminal punctuation"
            return text, "truncated", mods, why
        if prompt == ANALYSIS_PROMPT and not has_analysis_block(text):
            return text, "unparseable", mods, "no well-formed Opinion Target/Aspect/Sentiment/Reasoning block"
        if not self.min_chars <= len(text) <= self.max_chars:
            return text, "length", mods, f"{len(text)} chars, bounds {self.min_chars}..{self.max_chars}"
        return text, None, mods, ""

    def batch(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Clean one row group: (kept rows in CORPUS_SCHEMA, dropped rows in QUARANTINE_SCHEMA)."""
        n = table.num_rows
        raw = table.column("output").to_pylist()
        prompts = [p or "" for p in table.column("prompt").to_pylist()]
        finish = table.column("finish_reason").to_pylist()
        cleaned: list[str] = [""] * n
        rule: list[str | None] = [None] * n
        detail: list[str] = [""] * n
        for i in range(n):
            cleaned[i], rule[i], mods, detail[i] = self.rules(raw[i], prompts[i], finish[i])
            self.stats[(prompts[i], "generated")] += 1
            for mod in mods:
                self.stats[(prompts[i], f"modified:{mod}")] += 1
        ordinal = np.arange(self.seen, self.seen + n, dtype=np.int64)
        self.seen += n

        # exact duplicates (an earlier row with the same prompt and normalised output)
        alive = [i for i in range(n) if rule[i] is None]
        if alive:
            keys = np.array([_exact_key(prompts[i], cleaned[i]) for i in alive], np.int64).view(_U64)
            q, first = self.exact.lookup(keys)
            known = {int(keys[qi]): int(origin) for qi, origin in zip(q, first, strict=True)}
            new = []
            for pos, i in enumerate(alive):
                origin = known.setdefault(int(keys[pos]), int(ordinal[i]))
                if origin != ordinal[i]:
                    rule[i], detail[i] = "exact_dup", f"exact duplicate of input row {origin}"
                else:
                    new.append(pos)
            self.exact.add(keys[new], ordinal[[alive[p] for p in new]])

        # near duplicates (MinHash LSH, verified by estimated Jaccard)
        alive = [i for i in range(n) if rule[i] is None]
        if alive:
            sig = self.hasher.signatures(pa.array([cleaned[i] for i in alive], pa.large_string()))
            dup, matched, sim = self.near.add_batch(sig, prompt_salt([prompts[i] for i in alive]), ordinal[alive])
            for pos in np.nonzero(dup)[0]:
                i = alive[pos]
                rule[i] = "near_dup"
                detail[i] = f"near duplicate of input row {matched[pos]} (estimated Jaccard {sim[pos]:.2f})"

        # decontamination (the review holds a benchmark sentence), once per distinct review
        alive = [i for i in range(n) if rule[i] is None]
        if alive:
            reviews = pc.fill_null(table.column("review"), "").take(pa.array(alive)).combine_chunks()
            encoded = pc.dictionary_encode(reviews)
            flagged, details = self.decontam.check(encoded.dictionary)
            for pos, code in enumerate(encoded.indices.to_numpy()):
                if flagged[code]:
                    rule[alive[pos]], detail[alive[pos]] = "contaminated", details[code]

        keep = [i for i in range(n) if rule[i] is None]
        drop = [i for i in range(n) if rule[i] is not None]
        tokens = table.column("output_tokens").to_pylist()
        reviews_text = table.column("review").to_pylist()
        for i in keep:
            self.stats[(prompts[i], "kept")] += 1
            self.tokens_kept += int(tokens[i] or 0)
            self.review_chars_kept += len(reviews_text[i] or "")
        for i in drop:
            self.stats[(prompts[i], f"dropped:{rule[i]}")] += 1
        kept = table.take(pa.array(keep, pa.int64()))
        kept = kept.set_column(
            kept.schema.get_field_index("output"), "output", pa.array([cleaned[i] for i in keep], pa.string())
        ).append_column("raw_output", table.column("output").take(pa.array(keep, pa.int64())))
        dropped = (
            table.take(pa.array(drop, pa.int64()))
            .append_column("rule", pa.array([rule[i] for i in drop], pa.string()))
            .append_column("detail", pa.array([detail[i] for i in drop], pa.string()))
        )
        return kept.cast(CORPUS_SCHEMA), dropped.cast(QUARANTINE_SCHEMA)

    def summary(self) -> dict[str, Any]:
        """stats.json: totals, per-rule counts and the same per prompt."""
        prompts = sorted({p for p, _ in self.stats})

        def block(select: list[str]) -> dict[str, Any]:
            count = Counter()
            for (p, event), n in self.stats.items():
                if p in select:
                    count[event] += n
            return {
                "generated": count["generated"],
                "kept": count["kept"],
                "dropped": {r: count[f"dropped:{r}"] for r in DROP_RULES},
                "modified": {r: count[f"modified:{r}"] for r in MODIFY_RULES},
            }

        total = block(prompts)
        return {
            **total,
            "output_tokens_kept": self.tokens_kept,
            "review_chars_kept": self.review_chars_kept,
            "per_prompt": {p: block([p]) for p in prompts},
            "rules": list(RULES),
            "benchmark_sentences": self.decontam.sentences,
            "benchmark_sentences_skipped_short": self.decontam.skipped,
        }


class _BufferedWriter:
    """A ParquetWriter that writes full row groups of `size` rows (the last one may be shorter)."""

    def __init__(self, path: Path, schema: pa.Schema, size: int) -> None:
        self.writer = pq.ParquetWriter(path, schema)
        self.schema, self.size = schema, size
        self.pending: list[pa.Table] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.rows += table.num_rows
        while self.rows >= self.size:
            merged = pa.concat_tables(self.pending)
            self.writer.write_table(merged.slice(0, self.size), row_group_size=self.size)
            rest = merged.slice(self.size)
            self.pending, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.rows:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.size)
        self.writer.close()


@stage("clean")
def clean(out: Path, *, generations: list[Artifact], benchmark: list[Artifact], clean: dict[str, Any]) -> None:
    """Write `corpus.parquet`, `quarantine.parquet` and `stats.json` from teacher generations.

    Reads each generations.parquet by row groups of `clean.row_group_size` rows and writes the
    outputs as it goes; only the dedup and decontamination indexes grow with the corpus.
    """
    cfg = clean
    cleaner = Cleaner(cfg, benchmark_sentences(benchmark))
    size = int(cfg["row_group_size"])
    corpus = _BufferedWriter(out / "corpus.parquet", CORPUS_SCHEMA, size)
    quarantine = _BufferedWriter(out / "quarantine.parquet", QUARANTINE_SCHEMA, size)
    try:
        for table in iter_generations(generations, size):
            kept, dropped = cleaner.batch(table)
            corpus.write(kept)
            quarantine.write(dropped)
    finally:
        corpus.close()
        quarantine.close()
    (out / "stats.json").write_text(json.dumps(cleaner.summary(), indent=1))


def read_corpus(folder: str | Path) -> pa.Table:
    """The `corpus.parquet` of a clean artifact."""
    return pq.read_table(Path(folder) / "corpus.parquet")
