"""What every teacher backend shares: the pair and generation records, prompt rendering, the schema.

An output folder holds content (`generations.parquet`, `stats.json`: what later stages read, the
same bytes whenever the same pairs are generated the same way) and, under `measured/`, what the
run measured (`latency.parquet`, `timing.json`: wall time, tokens/s, retries, device), which is
verified but outside the folder's content hash (fsa_distill.artifacts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fsa_distill.artifacts import MEASURED, write_text_atomic

GENERATIONS = pa.schema(
    [
        ("review_id", pa.string()),
        ("prompt", pa.string()),
        ("template_version", pa.string()),
        ("teacher", pa.string()),
        ("model", pa.string()),
        ("sampling", pa.string()),
        ("prompt_sha256", pa.string()),
        ("review", pa.string()),
        ("output", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
    ]
)
#: `measured/latency.parquet`: per pair, what the backend measured (see tasks/generate.py).
LATENCY = pa.schema([("review_id", pa.string()), ("prompt", pa.string()), ("latency_s", pa.float64())])
FINISH_REASONS = ("stop", "length", "error")
PLACEHOLDER = "{review}"


@dataclass(frozen=True)
class Pair:
    """One (review, prompt) request; `index` is its position among all pairs of the run."""

    index: int
    review_id: str
    review: str
    prompt: str
    version: str
    system: str | None
    user: str

    def messages(self) -> list[dict[str, str]]:
        """The chat messages: the optional system message, then the rendered template."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": self.user}]


@dataclass(frozen=True)
class Generation:
    """A backend's answer to one pair (`prompt_sha256`: hash of exactly what the model was sent).

    `latency_s` is a measurement: it goes to `measured/latency.parquet`, never into the content.
    """

    prompt_sha256: str
    output: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float

    def record(self, pair: Pair) -> dict[str, Any]:
        """A JSON-able checkpoint line for this pair's answer (`from_record` reads it back)."""
        return {"index": pair.index, "review_id": pair.review_id, "prompt": pair.prompt, **asdict(self)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Generation:
        """The generation of a checkpoint line written by `record`."""
        return cls(**{f.name: record[f.name] for f in fields(cls)})


def render(template: str, review: str) -> str:
    """Replace `{review}`, the template's only placeholder: str.format would choke on other braces."""
    return template.replace(PLACEHOLDER, review)


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def apply_chat_template(tokenizer: Any, pair: Pair) -> str:
    """The prompt text as the model sees it, system message included, ending with the assistant turn."""
    return tokenizer.apply_chat_template(pair.messages(), tokenize=False, add_generation_prompt=True)


def sampling_settings(teacher: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what is sampled; greedy decoding ignores temperature, top_p and seed."""
    if teacher["do_sample"]:
        return {
            "do_sample": True,
            "max_new_tokens": teacher["max_new_tokens"],
            "temperature": teacher["temperature"],
            "top_p": teacher["top_p"],
            "seed": teacher["seed"],
        }
    return {"do_sample": False, "max_new_tokens": teacher["max_new_tokens"]}


def write_generations(
    out: Path, pairs: list[Pair], generations: list[Generation], teacher: dict[str, Any], sampling: str, model: str
) -> None:
    """Write `generations.parquet` (one row per pair, pair order) and `measured/latency.parquet`.

    `model` is what the `model` column records: the content fingerprint of a local model (never
    its path, which says nothing about the weights and changes when the folder moves) or a hub id.
    """
    rows = [
        {
            "review_id": p.review_id,
            "prompt": p.prompt,
            "template_version": p.version,
            "teacher": teacher["name"],
            "model": model,
            "sampling": sampling,
            "prompt_sha256": g.prompt_sha256,
            "review": p.review,
            "output": g.output,
            "finish_reason": g.finish_reason,
            "prompt_tokens": int(g.prompt_tokens),
            "output_tokens": int(g.output_tokens),
        }
        for p, g in zip(pairs, generations, strict=True)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS), out / "generations.parquet")
    latency = [
        {"review_id": p.review_id, "prompt": p.prompt, "latency_s": float(g.latency_s)}
        for p, g in zip(pairs, generations, strict=True)
    ]
    (out / MEASURED).mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(latency, schema=LATENCY), out / MEASURED / "latency.parquet")


def write_stats(out: Path, stats: dict[str, Any], measured: dict[str, Any] | None = None) -> None:
    """`stats.json`: deterministic counts (pairs, errors, tokens); `measured/timing.json`: the rest.

    What one run measures (wall time, tokens/s, retries, device) must not enter the content: the
    same pairs generated again must give the same artifact hash.
    """
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=1, sort_keys=True))
    if measured is not None:
        write_text_atomic(out / MEASURED / "timing.json", json.dumps(measured, indent=1, sort_keys=True))


def read_generations(folder: str | Path) -> pa.Table:
    """The `generations.parquet` of a generate (or released) output."""
    return pq.read_table(Path(folder) / "generations.parquet")
