"""Stage `zeroshot`: a seq2seq student classifies a sentiment set by rank classification.

The prompt (benchmark/classify.py, the same as the teacher's) is the encoder input; each label
word is scored by its summed log-likelihood as the decoder target, and the highest wins
(fsa_distill/lmscore.py). Every student arm is scored after pretraining and before fine-tuning.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from fsa_distill.benchmark import classify
from fsa_distill.tasks.stage import stage

from fsa_distill.artifacts import Artifact
from fsa_distill.lmscore import argmax, seq2seq_label_loglik
from fsa_distill.models import load_seq2seq


@stage("zeroshot", unkeyed=("settings.source",))
def zeroshot(out: Path, *, model: Artifact, dataset: str, seed: int, settings: dict[str, Any]) -> None:
    """Sentiment predictions of a student, with every label word's log-likelihood kept as its score."""
    began = time.perf_counter()
    spec, rows, prompts = classify.inputs(settings, dataset, seed)
    net, tokenizer = load_seq2seq(model.path)
    net = net.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    scores = seq2seq_label_loglik(net, tokenizer, prompts, list(spec.labels), batch_size=settings["batch_size"],
                                  max_source_length=settings["max_source_length"])  # fmt: skip
    predictions = [spec.labels[i] for i in argmax(scores)]
    extra = {"method": "rank_classification", "k": settings["k"], "seed": seed, "sample": settings["sample"]}
    classify.write(out, spec, rows, predictions, predictions, scores, extra)
    (out / "measured").mkdir(exist_ok=True)
    (out / "measured" / "timing.json").write_text(json.dumps({"wall_s": round(time.perf_counter() - began, 3)}))


@zeroshot.configure
def params(cfg: dict[str, Any], *, model: Artifact, dataset: str, seed: int) -> dict[str, Any]:
    """The student (by content), the set and its draw, and the students' batch and input length."""
    zs = cfg["zeroshot"]
    settings = {**classify.settings(cfg, dataset), "batch_size": zs["batch_size"],
                "max_source_length": zs["max_source_length"]}  # fmt: skip
    return {"model": model, "dataset": dataset, "seed": seed, "settings": settings}
