"""Decontamination: reviews that contain (most of) a benchmark dev/test/hard_test sentence."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsa_distill.tasks.clean.minhash import U64, expand_ranges, ngram_hashes, word_hashes
from fsa_distill.tasks.clean.text import normalise

from fsa_distill.artifacts import Artifact
from fsa_distill.errors import InputError

BENCHMARK_SPLITS = ("dev", "test", "hard_test")


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
        self.gram_keys = pairs[:, 0].astype(np.int64).view(U64)
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
        gram = row_gram[:, 1].view(U64)
        lo = np.searchsorted(self.gram_keys, gram, side="left")
        hi = np.searchsorted(self.gram_keys, gram, side="right")
        which, pos = expand_ranges(lo, hi)
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


def benchmark_sentences(datasets: Sequence[Artifact]) -> list[BenchmarkSentence]:
    """The dev, test and hard_test sentences of acquired benchmark datasets."""
    out: list[BenchmarkSentence] = []
    for art in datasets:
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
