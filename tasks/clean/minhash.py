"""Near-duplicate detection: words -> n-gram hashes -> MinHash signatures -> LSH band keys (numpy,
per row group), and the streaming indexes over earlier kept rows (`SortedRuns`, `NearDupIndex`).

MinHash is computed here with numpy, vectorised over a row group (perf/bench_clean.py compares
it with datasketch). The indexes hold 64-bit hashes, band keys and 16-bit MinHash values (about
340 bytes per kept row with the defaults), never texts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from fsa_distill.tasks.clean.text import normalise

from fsa_distill.errors import InputError

U64 = np.uint64
_MUL = U64(0x9E3779B97F4A7C15)
_LEN_TAG = U64(0xD6E8FEB86659FD93)
_BAND_TAG = U64(0xA0761D6478BD642F)
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’–—…«»¡¿·•"


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the 64 output bits (in place on a copy)."""
    x = x.astype(U64, copy=True)
    x ^= x >> U64(30)
    x *= U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
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
        return np.zeros(0, U64), offsets
    encoded = pc.dictionary_encode(flat)
    vocab = encoded.dictionary.to_numpy(zero_copy_only=False).astype(object)
    return pd.util.hash_array(vocab, categorize=False)[encoded.indices.to_numpy()], offsets


def _length_tag(n: int) -> np.uint64:
    return U64((n * int(_LEN_TAG)) % (1 << 64))


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
    out = np.empty(goff[-1], U64)
    short_rows = np.nonzero(~long_rows & (count > 0))[0]
    is_short = np.zeros(goff[-1], bool)
    is_short[goff[short_rows]] = True
    # Long rows: every window of the flat word array, computed with slices; a window is kept when
    # it starts at least n-1 words before the end of its row (so never in a short row either).
    if long_rows.any():
        windows = np.zeros(len(words) - n + 1, U64)
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
        acc = np.zeros(len(short_rows), U64)
        padded = np.concatenate([words, np.zeros(n, U64)])
        for k in range(n - 1):
            acc = np.where(k < length, acc * _MUL + padded[offsets[short_rows] + k], acc)
        acc ^= length.astype(U64) * _LEN_TAG
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
        self.a = rng.integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64, endpoint=True) | U64(1)
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
        buf = np.empty((self.num_perm, min(self.chunk, len(shingles)) or 1), U64)
        r0 = 0
        while r0 < n_rows:
            r1 = int(np.searchsorted(goff, goff[r0] + self.chunk, side="right")) - 1
            r1 = min(max(r1, r0 + 1), n_rows)
            x = shingles[goff[r0] : goff[r1]]
            block = buf[:, : len(x)] if len(x) <= buf.shape[1] else np.empty((self.num_perm, len(x)), U64)
            np.multiply(self.a[:, None], x[None, :], out=block)
            block += self.b[:, None]
            # min of the 64-bit values, then their top 32 bits == min of the top 32 bits
            sig[r0:r1] = (np.minimum.reduceat(block, goff[r0:r1] - goff[r0], axis=1) >> U64(32)).T
            r0 = r1
        return sig


def band_keys(sig: np.ndarray, bands: int, salt: np.ndarray | None = None) -> np.ndarray:
    """(rows, bands) uint64 LSH keys: each band's rows of the signature hashed with the band index (and salt)."""
    n, perm = sig.shape
    rows = perm // bands
    view = sig.reshape(n, bands, rows).astype(U64)
    acc = np.zeros((n, bands), U64)
    for j in range(rows):
        acc = acc * _MUL + view[:, :, j]
    acc ^= (np.arange(bands, dtype=U64) + U64(1)) * _BAND_TAG
    if salt is not None:
        acc ^= salt.astype(U64)[:, None]
    return mix64(acc)


def expand_ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
            which, pos = expand_ranges(lo[hit], hi)
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
        which, earlier = expand_ranges(group_start, group_start + rank)
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


def prompt_salt(prompts: Sequence[str]) -> np.ndarray:
    """Per-row salt so that rows of different prompts never share an LSH band."""
    cache: dict[str, int] = {}
    for p in set(prompts):
        cache[p] = int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
    return np.array([cache[p] for p in prompts], dtype=U64)


def exact_keys(prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """uint64 key per row of (prompt, normalised text): what exact dedup compares."""
    keys = [
        int.from_bytes(hashlib.blake2b(f"{p}\0{normalise(t)}".encode(), digest_size=8).digest(), "little", signed=True)
        for p, t in zip(prompts, texts, strict=True)
    ]
    return np.array(keys, np.int64).view(U64)
