"""Near-duplicate removal at scale: our numpy MinHash LSH (tasks/clean/minhash.py) vs datasketch, one run.

    python -m perf.bench_clean [--rows 1000000] [--datasketch-rows 200000] [--workdir DIR]

1. Builds a generations-format Parquet corpus of --rows rows from the 500 real Mixtral outputs:
   every base row is a source output with about a quarter of its lower-case words replaced by
   random words of the same outputs (two base rows of one source share ~7% of their 5-gram
   shingles, so they are distinct), and --planted (5%) of the rows are copies of an earlier row
   (one of 50,000 remembered base rows, randomly replaced as the corpus grows) with 1-2 small
   edits (a word replaced or inserted). The exact shingle Jaccard of every planted pair is recorded.
2. Runs each contender in its own subprocess (so peak RSS is its own) on the same file:
   - ours: the clean stage's near-dup step alone (read by row groups, shingle, MinHash, LSH,
     verify) over all rows, and over the first --datasketch-rows rows;
   - datasketch: MinHash(num_perm) + MinHashLSH(params=(bands, rows per band)), the same
     shingles (the same words, joined), one index per prompt, candidates verified by estimated
     Jaccard >= threshold, only kept rows inserted: the same semantics as ours. It runs on the
     first --datasketch-rows rows (default 200,000: at 1M rows its Python dicts would take many
     GB) and its time is extrapolated linearly to --rows, which the printout says;
   - ours, the whole clean stage over all rows (every rule, decontamination against the four
     benchmark datasets).
3. Prints rows/s, peak RSS, RSS after imports and planted-duplicate recall (all planted copies,
   and those whose true Jaccard is >= the threshold) for each, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsa_distill.tasks.clean import GENERATIONS_SCHEMA

from fsa_distill.config import compose_config

DATA_SOURCE = os.environ.get(
    "FSA_DATA_SOURCE", str(Path(__file__).resolve().parents[2] / "shared/data/fsa-distillation")
)
MIXTRAL = "prompting/test/mixtral/test_500_4m8d.json"
DATASETS = ["atsa/rest14", "atsa/laptop14", "acsa/rest16", "acsa/laptop16"]
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’–—…«»¡¿·•"
CLEAN = compose_config([])["clean"]  # the real default config


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB (ru_maxrss is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def shingle_set(text: str, n: int) -> set[str]:
    """The same shingles as the clean stage: lower-cased whitespace tokens, punctuation trimmed, word n-grams."""
    words = [w.strip(PUNCTUATION) for w in text.replace("\u00a0", " ").lower().split()]
    words = [w for w in words if w]
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


# ---------------------------------------------------------------------------------------------
# corpus


def build_corpus(path: Path, rows: int, planted: float, seed: int, ngram: int) -> dict[str, Any]:
    """Write the perturbed corpus; return the planted pairs (copy row, original row, true Jaccard)."""
    records = [json.loads(x) for x in (Path(DATA_SOURCE) / MIXTRAL).read_text(encoding="utf-8-sig").splitlines()]
    sources = []
    vocab: set[str] = set()
    for r in records:
        tokens = np.array(r["mixtral_response"].strip().split(" "), dtype=object)
        mutable = np.array([i for i, t in enumerate(tokens) if t.isalpha() and t.islower()], dtype=np.int64)
        vocab.update(tokens[mutable].tolist())
        prompt = "analysis" if "Opinion Target 1" in r["mixtral_response"] else "rewriting"
        sources.append((tokens, mutable, prompt, r["Text"], str(r["ID"])))
    words = np.array(sorted(vocab), dtype=object)
    rng = np.random.default_rng(seed)
    window = 50_000
    recent: list[tuple[np.ndarray, np.ndarray, int, int]] = []  # tokens, mutable, source, row
    copies, originals, jaccard = [], [], []
    writer = pq.ParquetWriter(path, GENERATIONS_SCHEMA)
    chunk: dict[str, list[Any]] = {name: [] for name in GENERATIONS_SCHEMA.names}

    def flush() -> None:
        writer.write_table(pa.Table.from_pydict(chunk, schema=GENERATIONS_SCHEMA), row_group_size=10_000)
        for values in chunk.values():
            values.clear()

    for row in range(rows):
        if recent and rng.random() < planted:
            base_tokens, mutable, src, original = recent[int(rng.integers(len(recent)))]
            tokens = base_tokens.copy()
            candidates = mutable[:-1] if len(mutable) > 1 else mutable
            edits = min(int(rng.integers(1, 3)), len(candidates))
            for pos in rng.choice(candidates, size=edits, replace=False):
                if rng.random() < 0.5:
                    tokens[pos] = words[int(rng.integers(len(words)))]
                else:
                    tokens[pos] = f"{tokens[pos]} {words[int(rng.integers(len(words)))]}"
            copies.append(row)
            originals.append(original)
            text = " ".join(tokens)
            a, b = shingle_set(" ".join(base_tokens), ngram), shingle_set(text, ngram)
            jaccard.append(len(a & b) / len(a | b))
        else:
            src = int(rng.integers(len(sources)))
            tokens, mutable = sources[src][0].copy(), sources[src][1]
            hit = mutable[rng.random(len(mutable)) < 0.25]
            tokens[hit] = words[rng.integers(len(words), size=len(hit))]
            text = " ".join(tokens)
            recent.append((tokens, mutable, src, row))
            if len(recent) > window:
                recent[int(rng.integers(window))] = recent.pop()
        _, _, prompt, review, rid = sources[src]
        for name, value in (
            ("review_id", f"{rid}-{row}"),
            ("prompt", prompt),
            ("template_version", f"{prompt}-v1"),
            ("teacher", "mixtral-perturbed"),
            ("model", "bench"),
            ("sampling", "{}"),
            ("prompt_sha256", prompt),
            ("review", review),
            ("output", text),
            ("finish_reason", "stop"),
            ("prompt_tokens", len(review.split())),
            ("output_tokens", len(text.split())),
            ("latency_s", 0.0),  # a measurement: written only while the generations contract has it
        ):
            if name in chunk:
                chunk[name].append(value)
        if len(chunk["output"]) == 10_000:
            flush()
    if chunk["output"]:
        flush()
    writer.close()
    return {"copies": np.array(copies), "originals": np.array(originals), "jaccard": np.array(jaccard)}


# ---------------------------------------------------------------------------------------------
# contenders (each runs in its own process)


def child_ours(path: Path, limit: int, cfg: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.compute as pc
    from fsa_distill.tasks.clean import MinHasher, NearDupIndex, prompt_salt

    base = rss_mb()
    hasher = MinHasher(cfg["minhash_perm"], cfg["minhash_ngram"])
    index = NearDupIndex(cfg["minhash_perm"], cfg["minhash_bands"], cfg["near_dup_threshold"])
    flagged, trace, seen = [], [], 0
    start = time.perf_counter()
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(
        batch_size=cfg["row_group_size"], columns=["prompt", "output"]
    ):
        batch = batch.slice(0, limit - seen)
        sig = hasher.signatures(pc.utf8_trim_whitespace(batch.column("output")))
        dup, _, _ = index.add_batch(sig, prompt_salt(batch.column("prompt").to_pylist()), seen + np.arange(len(sig)))
        flagged.extend((np.nonzero(dup)[0] + seen).tolist())
        seen += batch.num_rows
        if seen % max(limit // 10, 1) < batch.num_rows:
            trace.append((seen, round(rss_mb())))
        if seen >= limit:
            break
    seconds = time.perf_counter() - start
    return {"rows": seen, "seconds": seconds, "rss_base_mb": base, "flagged": flagged, "trace": trace}


def child_datasketch(path: Path, limit: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """datasketch as its docs suggest: MinHash.generator (shared permutations) + MinHashLSH query/insert."""
    from datasketch import MinHash, MinHashLSH

    base = rss_mb()
    perm, bands, thr = cfg["minhash_perm"], cfg["minhash_bands"], cfg["near_dup_threshold"]
    indexes: dict[str, MinHashLSH] = {}
    stored: dict[int, np.ndarray] = {}  # hash values of kept rows, for verification
    flagged, trace, seen = [], [], 0
    start = time.perf_counter()
    batches = pq.ParquetFile(path, pre_buffer=False).iter_batches(
        batch_size=cfg["row_group_size"], columns=["prompt", "output"]
    )
    for batch in batches:
        batch = batch.slice(0, limit - seen)
        texts = batch.column("output").to_pylist()
        shingles = ([s.encode() for s in shingle_set(t.strip(), cfg["minhash_ngram"])] for t in texts)
        minhashes = MinHash.generator(shingles, num_perm=perm)  # lazily, one row at a time
        for prompt, mh in zip(batch.column("prompt").to_pylist(), minhashes, strict=True):
            lsh = indexes.get(prompt)
            if lsh is None:
                lsh = indexes[prompt] = MinHashLSH(threshold=thr, num_perm=perm, params=(bands, perm // bands))
            if any(np.mean(mh.hashvalues == stored[key]) >= thr for key in lsh.query(mh)):
                flagged.append(seen)
            else:
                lsh.insert(seen, mh, check_duplication=False)
                stored[seen] = mh.hashvalues
            seen += 1
            if seen % max(limit // 10, 1) == 0:
                trace.append((seen, round(rss_mb())))
        if seen >= limit:
            break
    seconds = time.perf_counter() - start
    return {"rows": seen, "seconds": seconds, "rss_base_mb": base, "flagged": flagged, "trace": trace}


def child_clean(path: Path, limit: int, cfg: dict[str, Any], bench_store: Path) -> dict[str, Any]:
    from fsa_distill.tasks.acquire import acquire
    from fsa_distill.tasks.clean import clean

    from fsa_distill.artifacts import Artifact

    acquire_cfg = {"data": {"source": DATA_SOURCE, "limit": None, "timeout_s": 60.0}}
    datasets = [acquire.run(bench_store, acquire.params(acquire_cfg, dataset=d)) for d in DATASETS]
    base = rss_mb()
    out = Path(tempfile.mkdtemp(dir=path.parent, prefix="clean-out-"))
    start = time.perf_counter()
    clean.fn(out, generations=[Artifact(path=str(path.parent), sha256="bench")], datasets=datasets, clean=cfg)
    seconds = time.perf_counter() - start
    stats = json.loads((out / "stats.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": stats["generated"], "seconds": seconds, "rss_base_mb": base, "stats": stats, "flagged": []}


def run_child(kind: str, path: Path, limit: int, workdir: Path) -> dict[str, Any]:
    result = workdir / f"{kind}-{limit}.json"
    cmd = [sys.executable, "-m", "perf.bench_clean", "--child", kind, "--input", str(path)]
    cmd += ["--limit", str(limit), "--result", str(result), "--workdir", str(workdir)]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------


def recall(result: dict[str, Any], truth: dict[str, Any], limit: int, threshold: float) -> tuple[float, float, int]:
    """(recall over planted copies, recall over planted copies with true Jaccard >= threshold, other flags)."""
    flagged = np.zeros(limit, bool)
    flagged[np.array(result["flagged"], dtype=np.int64)] = True
    inside = truth["copies"] < limit
    copies, jac = truth["copies"][inside], truth["jaccard"][inside]
    strong = jac >= threshold
    planted = np.zeros(limit, bool)
    planted[copies] = True
    return (
        float(flagged[copies].mean()) if len(copies) else float("nan"),
        float(flagged[copies[strong]].mean()) if strong.any() else float("nan"),
        int((flagged & ~planted).sum()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--datasketch-rows", type=int, default=200_000, help="datasketch runs on the first N rows")
    parser.add_argument("--planted", type=float, default=0.05, help="share of rows that are edited copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the corpus is written (default: a temporary folder, removed)")
    parser.add_argument("--skip-clean", action="store_true", help="do not time the whole clean stage")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        path, workdir = Path(args.input), Path(args.workdir)
        if args.child == "ours":
            out = child_ours(path, args.limit, CLEAN)
        elif args.child == "datasketch":
            out = child_datasketch(path, args.limit, CLEAN)
        else:
            out = child_clean(path, args.limit, CLEAN, workdir / "bench-store")
        out["rss_peak_mb"] = peak_rss_mb()
        Path(args.result).write_text(json.dumps(out))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-clean-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus_dir = workdir / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    path = corpus_dir / "generations.parquet"
    ds_rows = min(args.datasketch_rows, args.rows)
    import datasketch

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, datasketch {datasketch.__version__}, "
        f"{os.cpu_count()} CPUs; num_perm={CLEAN['minhash_perm']} bands={CLEAN['minhash_bands']} "
        f"shingles={CLEAN['minhash_ngram']}-word threshold={CLEAN['near_dup_threshold']}",
        flush=True,
    )
    start = time.perf_counter()
    truth = build_corpus(path, args.rows, args.planted, args.seed, CLEAN["minhash_ngram"])
    print(
        f"corpus: {args.rows:,} rows, {len(truth['copies']):,} planted near-duplicates "
        f"(true Jaccard: median {np.median(truth['jaccard']):.2f}, "
        f"{(truth['jaccard'] >= CLEAN['near_dup_threshold']).mean():.1%} >= threshold), "
        f"{path.stat().st_size / 1e6:.0f} MB Parquet, built in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    runs = [("ours near-dup", "ours", args.rows)]
    if ds_rows < args.rows:
        runs.append(("ours near-dup", "ours", ds_rows))
    runs.append(("datasketch", "datasketch", ds_rows))
    if not args.skip_clean:
        runs.append(("ours whole clean", "clean", args.rows))
    results = {}
    header = f"{'contender':<18}{'rows':>10}{'seconds':>9}{'rows/s':>10}{'peak RSS':>10}{'base RSS':>10}"
    header += f"{'recall':>8}{'recall J>=thr':>15}{'other flags':>13}"
    lines = [header]
    for label, kind, limit in runs:
        res = run_child(kind, path, limit, workdir)
        results[(kind, limit)] = res
        rate = res["rows"] / res["seconds"]
        line = f"{label:<18}{res['rows']:>10,}{res['seconds']:>9.1f}{rate:>10,.0f}"
        line += f"{res['rss_peak_mb']:>8.0f}MB{res['rss_base_mb']:>8.0f}MB"
        if kind != "clean":
            r_all, r_strong, other = recall(res, truth, limit, CLEAN["near_dup_threshold"])
            line += f"{r_all:>8.1%}{r_strong:>15.1%}{other:>13,}"
        else:
            stats = res["stats"]
            line += f"   kept {stats['kept']:,}, dropped {json.dumps(stats['dropped'])}"
        lines.append(line)
        print(line, flush=True)
        if res.get("trace"):
            print(f"{'':<18}RSS (MB) by rows done: {res['trace']}", flush=True)
    print()
    print("\n".join(lines))
    ours_small, ds = results[("ours", ds_rows)], results[("datasketch", ds_rows)]
    a, b = set(ours_small["flagged"]), set(ds["flagged"])
    print(
        f"\nFlagged rows, ours vs datasketch on the same {ds_rows:,} rows: {len(a & b):,} both, {len(a - b):,} only "
        f"ours, {len(b - a):,} only datasketch (MinHash estimates near the threshold differ by hash family). "
        "'other flags' are rows flagged that were not planted: variants of source outputs with few replaceable "
        "words (e.g. an answer of empty template fields), which really are near-duplicates."
    )
    ours_rate, ds_rate = ours_small["rows"] / ours_small["seconds"], ds["rows"] / ds["seconds"]
    print(
        f"\nAt {ds_rows:,} rows (same input): ours {ours_rate:,.0f} rows/s vs datasketch {ds_rate:,.0f} rows/s "
        f"= {ours_rate / ds_rate:.1f}x; peak RSS ours {ours_small['rss_peak_mb']:.0f} MB vs datasketch "
        f"{ds['rss_peak_mb']:.0f} MB (growth over the run: ours "
        f"{ours_small['rss_peak_mb'] - ours_small['rss_base_mb']:.0f} MB, mostly the per-row-group working set; "
        f"datasketch {ds['rss_peak_mb'] - ds['rss_base_mb']:.0f} MB)."
    )
    if ds_rows < args.rows:
        full = results[("ours", args.rows)]
        print(
            f"datasketch ran on the first {ds_rows:,} of {args.rows:,} rows only; extrapolated linearly it would "
            f"take ~{args.rows / ds_rate:,.0f} s for {args.rows:,} rows (ours measured: {full['seconds']:,.0f} s, "
            f"{args.rows / full['seconds'] / ds_rate:.1f}x faster). Its index grows with every kept row "
            f"(RSS {ds['rss_base_mb']:.0f} -> {ds['rss_peak_mb']:.0f} MB over {ds_rows:,} rows); extrapolated "
            f"linearly its peak RSS at {args.rows:,} rows would be "
            f"~{ds['rss_base_mb'] + (ds['rss_peak_mb'] - ds['rss_base_mb']) * args.rows / ds_rows:,.0f} MB "
            f"(not measured; ours measured: {full['rss_peak_mb']:,.0f} MB)."
        )
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
