"""What every teacher backend shares: the pair and generation records, prompt rendering, the schema."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fsa_distill.artifacts import write_text_atomic

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
        ("latency_s", pa.float64()),
    ]
)
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
    """A backend's answer to one pair (`prompt_sha256`: hash of exactly what the model was sent)."""

    prompt_sha256: str
    output: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float


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
    out: Path, pairs: list[Pair], generations: list[Generation], teacher: dict[str, Any], sampling: str
) -> None:
    """Write `generations.parquet`, one row per pair in pair order."""
    rows = [
        {
            "review_id": p.review_id,
            "prompt": p.prompt,
            "template_version": p.version,
            "teacher": teacher["name"],
            "model": teacher["model"],
            "sampling": sampling,
            "prompt_sha256": g.prompt_sha256,
            "review": p.review,
            "output": g.output,
            "finish_reason": g.finish_reason,
            "prompt_tokens": int(g.prompt_tokens),
            "output_tokens": int(g.output_tokens),
            "latency_s": float(g.latency_s),
        }
        for p, g in zip(pairs, generations, strict=True)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS), out / "generations.parquet")


def write_stats(out: Path, stats: dict[str, Any]) -> None:
    """`stats.json` beside the generations: counts of retries, errors, malformed replies, timing."""
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=1, sort_keys=True))


def read_generations(folder: str | Path) -> pa.Table:
    """The `generations.parquet` of a generate (or released) output."""
    return pq.read_table(Path(folder) / "generations.parquet")
