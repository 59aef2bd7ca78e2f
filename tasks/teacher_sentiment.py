"""Stage `teacher_sentiment`: the teacher classifies a sentiment set (benchmark/classify.py).

With the transformers backend it reads the next-token logits after `Label:` (raw text, as
upstream `icl_multifaced.py`) and picks the label word whose first token scores highest
(`first_token_logit`). The openai backend asks the server for the first answer token's top
logprobs and picks the best-scoring label word (`logprobs`); prompts whose reply has no logprobs
(or no label among the top tokens) are answered and matched instead, like every vllm prompt: the
first label word in the answer is taken (`generate_match`). The metrics record which method ran.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from fsa_distill.benchmark import classify
from fsa_distill.tasks.stage import stage
from fsa_distill.tasks.teachers import prompted

from fsa_distill.lmscore import argmax, causal_label_scores


@stage("teacher_sentiment", retries=2, unkeyed=(*prompted.UNKEYED, "settings.source"))
def teacher_sentiment(
    out: Path,
    *,
    dataset: str,
    seed: int,
    settings: dict[str, Any],
    teacher: dict[str, Any],
    model_fingerprint: str,
    backend_code: str,
) -> None:
    """Sentiment predictions of the teacher: label logits (transformers), logprobs (openai) or answer matching."""
    module = prompted.backend(teacher, backend_code)
    began = time.perf_counter()
    spec, rows, prompts = classify.inputs(settings, dataset, seed)
    labels = list(spec.labels)
    counts: dict[str, int] = {}  # how many sentences each method classified, where it varies
    if teacher["backend"] == "transformers":
        model, tokenizer = module.cached_model(teacher["model"])
        scores = causal_label_scores(model, tokenizer, prompts, labels, batch_size=teacher["batch_size"])
        predictions = [spec.labels[i] for i in argmax(scores)]
        answers, method = predictions, "first_token_logit"
    else:
        scores = [[] for _ in rows]
        answers, predictions = [""] * len(rows), [""] * len(rows)
        fallback = list(range(len(rows)))
        if teacher["backend"] == "openai":
            got, stats = module.label_logprobs(prompts, teacher, labels)
            # no logprobs, or no label word among the top tokens (an argmax of -infs would pick the first label)
            fallback = [i for i, s in enumerate(got) if s is None or max(s) == -math.inf]
            for i in sorted(set(range(len(rows))) - set(fallback)):
                scores[i] = got[i]
                answers[i] = predictions[i] = spec.labels[argmax([got[i]])[0]]
            counts = {"n_logprobs": len(rows) - len(fallback), "n_generate_match": len(fallback),
                      "n_no_logprobs": sum(s is None for s in got)}  # fmt: skip
            (out / "measured").mkdir(exist_ok=True)
            (out / "measured" / "label_logprobs.json").write_text(json.dumps(stats, indent=1))
        if fallback:
            generated, counts["n_errors"] = prompted.answers(
                module, teacher, [prompts[i] for i in fallback], 8, f"sentiment-{dataset}"
            )
            for i, answer in zip(fallback, generated, strict=True):
                answers[i], predictions[i] = answer, classify.match_label(answer, spec.labels)
        method = ("generate_match" if len(fallback) == len(rows) else "logprobs" if not fallback
                  else "logprobs+generate_match")  # fmt: skip
    extra = {"method": method, **counts, "k": settings["k"], "seed": seed, "sample": settings["sample"]}
    classify.write(out, spec, rows, predictions, answers, scores, extra)
    prompted.write_timing(out, began, len(rows))


@teacher_sentiment.configure
def params(cfg: dict[str, Any], *, dataset: str, seed: int) -> dict[str, Any]:
    """The set and its draw, and the teacher: the same sentences and prompts as the students'."""
    return {
        "dataset": dataset,
        "seed": seed,
        "settings": classify.settings(cfg, dataset),
        **prompted.teacher_params(cfg),
    }
