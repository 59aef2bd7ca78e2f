"""Stage `clean`: turn raw teacher generations into a training corpus, streaming by row group.

The rules are classes in `rules.py`, applied in the order of its `RULES`: trim whitespace; cut
chatty preambles ("Sure, here is ...:") and trailers ("Note: ...", "Confidence: 90%"); drop
refusals; drop truncated outputs; drop analysis outputs with no well-formed `Opinion Target /
Aspect / Sentiment / Reasoning` block; drop outputs outside the length bounds; drop rows whose
review overlaps a benchmark dev/test/hard_test sentence (decontamination, `decontam.py`); drop exact
duplicates (same prompt, same normalised output); drop near duplicates (MinHash LSH over word
n-gram shingles, candidates verified by estimated Jaccard, `minhash.py`).

A row is compared only with earlier rows that passed every rule before the dedup rule, so the
result is the same for any row-group size, and a contaminated row never suppresses a clean
duplicate; rows of different prompts are never duplicates of each other. Memory stays flat as the
corpus grows except for the dedup indexes, which hold hashes, never texts.

The output is content only: `corpus.parquet`, `quarantine.parquet` (dropped rows with `rule` and
`detail`) and `stats.json` (counts), byte-identical for the same inputs. Input columns that are
measurements (`latency_s`) are not carried over; wall times go to `measured/timing.json`, outside
the content hash.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsa_distill.tasks.clean.decontam import BENCHMARK_SPLITS, BenchmarkSentence, Decontaminator, benchmark_sentences
from fsa_distill.tasks.clean.minhash import (
    MinHasher,
    NearDupIndex,
    SortedRuns,
    band_keys,
    exact_keys,
    mix64,
    ngram_hashes,
    prompt_salt,
    word_hashes,
)
from fsa_distill.tasks.clean.rules import (
    ANALYSIS_PROMPT,
    DROP_RULES,
    MODIFY_RULES,
    RULES,
    Batch,
    DropRule,
    ModifyRule,
    Row,
    Rule,
    RuleInputs,
    positive_int,
)
from fsa_distill.tasks.clean.text import (
    cut_preamble,
    cut_trailers,
    has_analysis_block,
    is_refusal,
    is_truncated,
    normalise,
    parse_analysis,
)
from fsa_distill.tasks.stage import stage
from fsa_distill.tasks.teachers.common import GENERATIONS

from fsa_distill.artifacts import MEASURED, Artifact
from fsa_distill.errors import InputError
from fsa_distill.progress import Progress

__all__ = [
    "ANALYSIS_PROMPT",
    "BENCHMARK_SPLITS",
    "CORPUS_SCHEMA",
    "DROP_RULES",
    "GENERATIONS_SCHEMA",
    "INPUT_SCHEMA",
    "MEASURED_COLUMNS",
    "MODIFY_RULES",
    "QUARANTINE_SCHEMA",
    "RULES",
    "Batch",
    "BenchmarkSentence",
    "Cleaner",
    "Decontaminator",
    "DropRule",
    "MinHasher",
    "ModifyRule",
    "NearDupIndex",
    "Row",
    "Rule",
    "RuleInputs",
    "SortedRuns",
    "band_keys",
    "benchmark_sentences",
    "clean",
    "cut_preamble",
    "cut_trailers",
    "exact_keys",
    "has_analysis_block",
    "is_refusal",
    "is_truncated",
    "iter_generations",
    "mix64",
    "ngram_hashes",
    "normalise",
    "params",
    "parse_analysis",
    "prompt_salt",
    "read_corpus",
    "word_hashes",
]

# --------------------------------------------------------------------------------------------
# Schemas

#: The generate stage's output contract (tasks/teachers/common.py), the input of cleaning.
GENERATIONS_SCHEMA = GENERATIONS
#: Generation columns that are measurements, not content: never read, never carried into the corpus.
MEASURED_COLUMNS = ("latency_s",)
#: The columns read from generations.parquet and carried into the corpus and the quarantine.
INPUT_SCHEMA = pa.schema([f for f in GENERATIONS_SCHEMA if f.name not in MEASURED_COLUMNS])
CORPUS_SCHEMA = INPUT_SCHEMA.append(pa.field("raw_output", pa.string()))
QUARANTINE_SCHEMA = INPUT_SCHEMA.append(pa.field("rule", pa.string())).append(pa.field("detail", pa.string()))


def iter_generations(generations: Sequence[Artifact], batch_size: int) -> Iterator[pa.Table]:
    """Row groups of every generations.parquet in INPUT_SCHEMA (measurement columns left out); bad files raise."""
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
        missing = [n for n in INPUT_SCHEMA.names if n not in pf.schema_arrow.names]
        if missing:
            raise InputError(f"{path}: missing columns {missing}; the columns are {pf.schema_arrow.names}")
        for batch in pf.iter_batches(batch_size=batch_size, columns=INPUT_SCHEMA.names):
            table = pa.Table.from_batches([batch])
            try:
                yield table.cast(INPUT_SCHEMA)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InputError(f"{path}: columns do not match the generations schema: {exc}") from None


# --------------------------------------------------------------------------------------------
# The rules over a stream of row groups


class Cleaner:
    """One instance of every rule in `RULES` (with their indexes); feed row groups in input order."""

    def __init__(self, cfg: dict[str, Any], sentences: Sequence[BenchmarkSentence]) -> None:
        inputs = RuleInputs(sentences=sentences)
        self.rules: list[Rule] = [cls.from_config(cfg, inputs) for cls in RULES]
        self.seen = 0
        self.generated: Counter[str] = Counter()  # prompt -> rows
        self.kept: Counter[str] = Counter()
        self.tokens_kept = 0
        self.review_chars_kept = 0
        self.seconds: Counter[str] = Counter()  # rule -> wall time (a measurement: never in stats.json)

    def batch(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Clean one row group: (kept rows in CORPUS_SCHEMA, dropped rows in QUARANTINE_SCHEMA)."""
        n = table.num_rows
        batch = Batch.from_table(table, self.seen)
        self.seen += n
        self.generated.update(batch.prompt)
        live = list(range(n))
        for rule in self.rules:
            if not live:
                break
            start = time.perf_counter()
            live = rule.run(batch, live)
            self.seconds[rule.name] += time.perf_counter() - start

        keep = pa.array(live, pa.int64())
        drop_rows = [i for i in range(n) if batch.rule[i] is not None]
        drop = pa.array(drop_rows, pa.int64())
        tokens = table.column("output_tokens").to_pylist()
        review_chars = pc.utf8_length(batch.review).to_pylist()
        for i in live:
            self.kept[batch.prompt[i]] += 1
            self.tokens_kept += int(tokens[i] or 0)
            self.review_chars_kept += review_chars[i]
        kept = table.take(keep)
        kept = kept.set_column(
            kept.schema.get_field_index("output"), "output", pa.array([batch.text[i] for i in live], pa.string())
        ).append_column("raw_output", table.column("output").take(keep))
        dropped = (
            table.take(drop)
            .append_column("rule", pa.array([batch.rule[i] for i in drop_rows], pa.string()))
            .append_column("detail", pa.array([batch.detail[i] for i in drop_rows], pa.string()))
        )
        return kept.cast(CORPUS_SCHEMA), dropped.cast(QUARANTINE_SCHEMA)

    def summary(self) -> dict[str, Any]:
        """stats.json: totals, per-rule counts and the same per prompt (deterministic counts only)."""
        prompts = sorted(self.generated)

        def block(select: list[str]) -> dict[str, Any]:
            return {
                "generated": sum(self.generated[p] for p in select),
                "kept": sum(self.kept[p] for p in select),
                "dropped": {r.name: sum(r.counts[p] for p in select) for r in self.rules if r.kind == "drop"},
                "modified": {r.name: sum(r.counts[p] for p in select) for r in self.rules if r.kind == "modify"},
            }

        out = {
            **block(prompts),
            "output_tokens_kept": self.tokens_kept,
            "review_chars_kept": self.review_chars_kept,
            "per_prompt": {p: block([p]) for p in prompts},
            "rules": [r.name for r in self.rules],
        }
        for rule in self.rules:
            out.update(rule.stats())
        return out

    def timing(self, seconds: float) -> dict[str, Any]:
        """measured/timing.json: wall time of the whole stage and of each rule."""
        return {
            "seconds": round(seconds, 3),
            "rows": self.seen,
            "rows_per_s": round(self.seen / seconds, 1) if seconds > 0 else None,
            "rule_seconds": {r.name: round(self.seconds[r.name], 3) for r in self.rules},
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


# --------------------------------------------------------------------------------------------
# The stage


def _n_rows(generations: Sequence[Artifact]) -> int | None:
    """Rows of all inputs from their Parquet footers (for progress lines); None when one is unreadable,
    which `iter_generations` then reports properly."""
    try:
        return sum(pq.read_metadata(Path(art.path) / "generations.parquet").num_rows for art in generations)
    except (OSError, pa.ArrowInvalid):
        return None


@stage("clean")
def clean(out: Path, *, generations: list[Artifact], datasets: list[Artifact], clean: dict[str, Any]) -> None:
    """Write `corpus.parquet`, `quarantine.parquet` and `stats.json` from teacher generations.

    `datasets` are the acquired benchmark datasets whose dev/test/hard_test sentences must not
    leak into the corpus. Reads each generations.parquet by row groups of `clean.row_group_size`
    rows and writes the outputs as it goes; only the dedup indexes grow with the corpus.
    """
    cfg = clean
    size = positive_int("row_group_size", cfg.get("row_group_size"))
    cleaner = Cleaner(cfg, benchmark_sentences(datasets))
    start = time.perf_counter()
    corpus = _BufferedWriter(out / "corpus.parquet", CORPUS_SCHEMA, size)
    quarantine = _BufferedWriter(out / "quarantine.parquet", QUARANTINE_SCHEMA, size)
    progress = Progress("clean", _n_rows(generations), "rows")
    try:
        with progress:
            for table in iter_generations(generations, size):
                kept, dropped = cleaner.batch(table)
                corpus.write(kept)
                quarantine.write(dropped)
                progress.update(table.num_rows, kept=sum(cleaner.kept.values()))
    finally:
        corpus.close()
        quarantine.close()
    (out / "stats.json").write_text(json.dumps(cleaner.summary(), indent=1))
    (out / MEASURED).mkdir(exist_ok=True)
    (out / MEASURED / "timing.json").write_text(json.dumps(cleaner.timing(time.perf_counter() - start), indent=1))


@clean.configure
def params(cfg: dict[str, Any], *, generations: list[Artifact], datasets: list[Artifact]) -> dict[str, Any]:
    """The clean stage's parameters: its own config section and its inputs."""
    return {"generations": generations, "datasets": datasets, "clean": cfg["clean"]}


def read_corpus(folder: str | Path) -> pa.Table:
    """The `corpus.parquet` of a clean artifact."""
    return pq.read_table(Path(folder) / "corpus.parquet")
