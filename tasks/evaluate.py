"""Stage `evaluate`: greedy generation over length-sorted batches, parsed and scored per test type."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from fsa_distill.benchmark.predictions import read_test_rows, write_scored
from fsa_distill.tasks.stage import stage
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fsa_distill.artifacts import Artifact
from fsa_distill.models import load_seq2seq
from fsa_distill.progress import Progress


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 100,
    num_beams: int = 1,
    sort_by_length: bool = True,
    max_source_length: int = 512,
) -> list[str]:
    """Greedy (or beam) generation in batches; outputs come back in the order of `texts`.

    Sorting by token length puts sentences of similar length together, so batches carry little
    padding and finish decoding at about the same step (see perf/bench_evaluate.py).
    Progress (sentences done, ETA) goes to the `fsa_distill.progress` log.
    """
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_source_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i]) if sort_by_length else list(range(len(texts)))
    outputs: list[str] = [""] * len(texts)
    dev = model.device
    with Progress("evaluate", len(texts), "sentences") as progress:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_source_length,
            ).to(dev)
            generated = model.generate(
                **batch, max_new_tokens=max_new_tokens, max_length=None, num_beams=num_beams, do_sample=False
            )
            for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True):
                outputs[i] = text.strip()
            progress.update(len(idx))
    return outputs


def load_model(folder: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved student and its tokenizer, on the best available device, in eval mode."""
    model, tokenizer = load_seq2seq(folder)
    return model.to(device()).eval(), tokenizer


@stage("evaluate")
def evaluate(
    out: Path, *, model: Artifact, data: Artifact, evaluate: dict[str, Any], max_source_length: int = 512
) -> None:
    """Write `predictions.parquet` (test + hard_test) and `metrics.json` ({test_type: P/R/F1}).

    Inputs are truncated at `max_source_length`, the length the model was fine-tuned and selected on.
    """
    task, rows = read_test_rows(data.path)
    net, tokenizer = load_model(model.path)
    predictions = generate(
        net,
        tokenizer,
        [r["sentence"] for r in rows],
        batch_size=evaluate["batch_size"],
        max_new_tokens=evaluate["max_new_tokens"],
        num_beams=evaluate["num_beams"],
        sort_by_length=evaluate["sort_by_length"],
        max_source_length=max_source_length,
    )
    write_scored(out, task, rows, predictions, evaluate["test_types"])


@evaluate.configure
def params(cfg: dict[str, Any], *, model: Artifact, data: Artifact) -> dict[str, Any]:
    """Decoding settings, and the input length of fine-tuning, so test inputs match dev selection."""
    return {
        "model": model,
        "data": data,
        "evaluate": cfg["evaluate"],
        "max_source_length": cfg["finetune"]["max_source_length"],
    }


def read_metrics(folder: str | Path) -> dict[str, dict[str, float]]:
    """The `metrics.json` of an evaluation."""
    return json.loads((Path(folder) / "metrics.json").read_text())
