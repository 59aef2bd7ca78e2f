"""Stages `teacher_fsa` and `teacher_sentiment`: the teacher LLM scored like a student.

`teacher_fsa` prompts the teacher in context on one benchmark dataset (benchmark/icl.py, the
protocol of HITSZ-HLT/Sentiment-Distillation `fsa.py`: an instruction, k demonstrations drawn
with a seed from the train split, each `Sentence: ...\\nLabel: <benchmark target>`, then the test
sentence), decodes greedily through the configured backend (transformers, vllm, openai), takes the
answer's first line as the label, and parses and scores it with the project's own protocol on
every test type, exactly as `evaluate` scores a student. The prompt goes to the backend as one
chat user message, since the backends serve chat models; upstream fed base models raw text.

`teacher_sentiment` classifies a sentiment set (benchmark/sentiment.py). With the transformers
backend it reads the next-token logits after `Label:` (raw text, as upstream) and picks the label
word whose first token scores highest (`first_token_logit`). The openai backend asks the server for
the first answer token's top logprobs and picks the best-scoring label word (`logprobs`); prompts
whose reply has no logprobs (or no label among the top tokens) are answered and matched instead,
like every vllm prompt: the first label word in the answer is taken (`generate_match`). The
metrics record which method ran.

Outputs: `predictions.parquet` and `metrics.json`, as the student stages write them.
"""

from __future__ import annotations

import importlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsa_distill.benchmark.icl import extract_label, fsa_prompts, load_templates, sentiment_prompts
from fsa_distill.benchmark.protocol import parse_pairs, score_rows
from fsa_distill.benchmark.sentiment import get_dataset, load_split
from fsa_distill.benchmark.sentiment import score_rows as score_sentiment
from fsa_distill.tasks.acquire import read_meta
from fsa_distill.tasks.evaluate import PREDICTIONS
from fsa_distill.tasks.generate import BACKENDS
from fsa_distill.tasks.stage import stage
from fsa_distill.tasks.teachers.common import Pair

from fsa_distill.artifacts import Artifact, fingerprint
from fsa_distill.codehash import code_version
from fsa_distill.errors import InputError

#: How the teacher is reached, not what it answers (the model path: its content is keyed).
UNKEYED = tuple(
    f"teacher.{k}"
    for k in (
        "model",
        "python",
        "concurrency",
        "timeout_s",
        "max_retries",
        "backoff_s",
        "retry_budget_s",
        "api_key_env",
    )
)
#: Only these teacher settings can change an in-context answer.
TEACHER_KEYS = (
    "backend", "name", "model", "batch_size", "vllm_args", "base_url",
    "python", "concurrency", "timeout_s", "max_retries", "backoff_s", "retry_budget_s", "api_key_env",
)  # fmt: skip
SAMPLE_SEED = 0  # one sample for every seed, k and model, so they are scored on the same sentences
SENTIMENT_PREDICTIONS = pa.schema(
    [("ID", pa.int64()), ("text", pa.string()), ("gold", pa.string()), ("prediction", pa.string()),
     ("answer", pa.string()), ("scores", pa.list_(pa.float64()))]
)  # fmt: skip


def teacher_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The teacher as far as its answers depend on it: backend and its code, settings, model content."""
    teacher = {k: cfg["teacher"].get(k) for k in TEACHER_KEYS}
    backend = teacher["backend"]
    if backend not in BACKENDS:
        raise InputError(f"teacher.backend={backend!r} cannot be scored in context; use one of {', '.join(BACKENDS)}")
    return {
        "teacher": teacher,
        "model_fingerprint": fingerprint(str(teacher["model"])),
        "backend_code": code_version([BACKENDS[backend]]),
    }


def sample_rows(rows: list[dict[str, Any]], sample: int | None) -> list[dict[str, Any]]:
    """A seeded sample of `sample` rows in their original order (all rows when None or larger)."""
    if sample is None or sample >= len(rows):
        return rows
    keep = sorted(random.Random(SAMPLE_SEED).sample(range(len(rows)), sample))
    return [rows[i] for i in keep]


def _generate(teacher: dict[str, Any], prompts: list[str], max_new_tokens: int, tag: str) -> list[str]:
    """Greedy answers of the teacher's backend, one chat user message per prompt."""
    settings = {**teacher, "max_new_tokens": max_new_tokens, "do_sample": False, "temperature": 0.0,
                "top_p": 1.0, "seed": 0}  # fmt: skip
    pairs = [Pair(i, str(i), prompt, tag, tag, None, prompt) for i, prompt in enumerate(prompts)]
    backend = importlib.import_module(BACKENDS[teacher["backend"]])
    generations, _ = backend.generate(pairs, settings)
    return [g.output for g in generations]


def _write_measured(out: Path, began: float, n: int) -> None:
    (out / "measured").mkdir(exist_ok=True)
    wall = time.perf_counter() - began
    (out / "measured" / "timing.json").write_text(json.dumps({"wall_s": round(wall, 3), "sentences": n}))


@stage("teacher_fsa", retries=2, unkeyed=UNKEYED)
def teacher_fsa(
    out: Path,
    *,
    data: Artifact,
    k: int,
    seed: int,
    templates: dict[str, Any],
    teacher: dict[str, Any],
    model_fingerprint: str,
    backend_code: str,
    max_new_tokens: int,
    sample: int | None,
    test_types: list[str],
) -> None:
    """In-context predictions of the teacher on one dataset's test + hard_test sentences, scored."""
    if backend_code != code_version([BACKENDS[teacher["backend"]]]):
        raise InputError("teacher backend code changed since the params were made; recompute them")
    began = time.perf_counter()
    task = read_meta(data.path)["task"]
    folder = Path(data.path)
    rows = pq.read_table(folder / "test.parquet").to_pylist() + pq.read_table(folder / "hard_test.parquet").to_pylist()
    rows = sample_rows(rows, sample)
    pool = pq.read_table(folder / "train.parquet").to_pylist()
    prompts = fsa_prompts(templates["fsa"][task], task, rows, pool, k=k, seed=seed)
    answers = _generate(teacher, prompts, max_new_tokens, f"icl-{templates['version']}")
    records = []
    for row, answer in zip(rows, answers, strict=True):
        prediction = extract_label(answer)
        pairs = parse_pairs(task, prediction, row["sentence"])
        records.append(
            {"ID": row["ID"], "split": row["split"], "sentence": row["sentence"], "gold": row["target"],
             "prediction": prediction, "pairs": [{"label": a, "polarity": p} for a, p in pairs],
             "implicit": row["implicit"], "mams": row["mams"]}
        )  # fmt: skip
    pq.write_table(pa.Table.from_pylist(records, schema=PREDICTIONS), out / "predictions.parquet")
    metrics = score_rows(task, records, test_types)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "answers.json").write_text(json.dumps(answers, indent=0))
    _write_measured(out, began, len(rows))


@teacher_fsa.configure
def _teacher_fsa_params(cfg: dict[str, Any], *, data: Artifact, k: int, seed: int) -> dict[str, Any]:
    """The dataset, the draw (k, seed), the versioned templates, the teacher and how much is scored."""
    te = cfg["teacher_eval"]
    templates = load_templates(Path(__file__).resolve().parents[1] / "conf" / "icl" / f"{te['templates']}.yaml")
    return {
        "data": data,
        "k": k,
        "seed": seed,
        "templates": templates,
        **teacher_params(cfg),
        "max_new_tokens": te["max_new_tokens"],
        "sample": te["sample"],
        "test_types": cfg["evaluate"]["test_types"],
    }


def sentiment_inputs(settings: dict[str, Any], dataset: str, seed: int) -> tuple[Any, list[dict[str, Any]], list[str]]:
    """(spec, scored rows, prompts) of one sentiment set for `settings` (see `sentiment_settings`)."""
    entry = {**settings["entry"], "source": settings["source"]}
    spec = get_dataset({"datasets": {dataset: entry}}, dataset)
    rows = sample_rows(load_split(spec, "test"), settings["sample"])
    pool = [{"sentence": r["text"], "label": r["label"]} for r in load_split(spec, "train")] if settings["k"] else []
    tests = [{"sentence": r["text"], "label": r["label"]} for r in rows]
    return spec, rows, sentiment_prompts(spec.instruction, tests, pool, k=settings["k"], seed=seed)


def sentiment_settings(cfg: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What a sentiment evaluation depends on: the set's entry and its files' content (not where they
    are: `source` is unkeyed), k, the sample size and the students' input length."""
    from fsa_distill.artifacts import sha256_file

    zs = cfg["zeroshot"]
    spec = get_dataset(cfg["sentiment"], dataset)
    entry = dict(cfg["sentiment"]["datasets"][dataset])
    return {
        "entry": {k: v for k, v in entry.items() if k != "source"},
        "source": entry.get("source"),
        "files": {split: sha256_file(path) for split, path in spec.files.items() if split in ("train", "test")},
        "k": zs["k"],
        "sample": zs["sample"],
        "batch_size": zs["batch_size"],
        "max_source_length": zs["max_source_length"],
    }


def write_sentiment(out: Path, spec: Any, rows: list[dict[str, Any]], predictions: list[str], answers: list[str],
                    scores: list[list[float]], extra: dict[str, Any]) -> None:  # fmt: skip
    """`predictions.parquet` and `metrics.json` (macro-F1 over the set's labels, accuracy, method, size)."""
    records = [
        {"ID": r["ID"], "text": r["text"], "gold": r["label"], "prediction": p, "answer": a, "scores": s}
        for r, p, a, s in zip(rows, predictions, answers, scores, strict=True)
    ]
    pq.write_table(pa.Table.from_pylist(records, schema=SENTIMENT_PREDICTIONS), out / "predictions.parquet")
    metrics = score_sentiment(spec, rows, {str(r["ID"]): p for r, p in zip(rows, predictions, strict=True)})
    (out / "metrics.json").write_text(json.dumps({**metrics, **extra}, indent=1))


def match_label(answer: str, labels: tuple[str, ...]) -> str:
    """The label word that occurs first in a generated answer (case-insensitive), else the answer itself."""
    text = extract_label(answer).lower()
    found = [(text.find(label.lower()), label) for label in labels if label.lower() in text]
    return min(found)[1] if found else text


@stage("teacher_sentiment", retries=2, unkeyed=(*UNKEYED, "settings.source"))
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
    began = time.perf_counter()
    spec, rows, prompts = sentiment_inputs(settings, dataset, seed)
    counts: dict[str, int] = {}  # how many sentences each method classified, where it varies
    if teacher["backend"] == "transformers":
        from fsa_distill.tasks.teachers.hf import cached_model

        from fsa_distill.lmscore import argmax, causal_label_scores

        model, tokenizer = cached_model(teacher["model"])
        scores = causal_label_scores(model, tokenizer, prompts, list(spec.labels), batch_size=teacher["batch_size"])
        predictions = [spec.labels[i] for i in argmax(scores)]
        answers, method = predictions, "first_token_logit"
    else:
        # openai: the first output token's top logprobs where the server returns them (argmax over the
        # label words, as first_token_logit); every other prompt, and vllm: generate and match a label word
        scores = [[] for _ in rows]
        answers, predictions = [""] * len(rows), [""] * len(rows)
        fallback = list(range(len(rows)))
        if teacher["backend"] == "openai":
            from fsa_distill.tasks.teachers.openai_compat import label_logprobs

            from fsa_distill.lmscore import argmax

            got, stats = label_logprobs(prompts, teacher, list(spec.labels))
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
            generated = _generate(teacher, [prompts[i] for i in fallback], 8, f"sentiment-{dataset}")
            for i, answer in zip(fallback, generated, strict=True):
                answers[i], predictions[i] = answer, match_label(answer, spec.labels)
        method = ("generate_match" if len(fallback) == len(rows) else "logprobs" if not fallback
                  else "logprobs+generate_match")  # fmt: skip
    write_sentiment(out, spec, rows, predictions, answers, scores,
                    {"method": method, **counts, "k": settings["k"], "seed": seed,
                     "sample": settings["sample"]})  # fmt: skip
    _write_measured(out, began, len(rows))


@teacher_sentiment.configure
def _teacher_sentiment_params(cfg: dict[str, Any], *, dataset: str, seed: int) -> dict[str, Any]:
    return {"dataset": dataset, "seed": seed, "settings": sentiment_settings(cfg, dataset), **teacher_params(cfg)}


@stage("zeroshot", unkeyed=("settings.source",))
def zeroshot(out: Path, *, model: Artifact, dataset: str, seed: int, settings: dict[str, Any]) -> None:
    """Sentiment predictions of a seq2seq student by rank classification: the prompt is the encoder
    input and the label word with the highest summed log-likelihood as the decoder target wins."""
    from fsa_distill.lmscore import argmax, seq2seq_label_loglik
    from fsa_distill.models import load_seq2seq

    began = time.perf_counter()
    spec, rows, prompts = sentiment_inputs(settings, dataset, seed)
    net, tokenizer = load_seq2seq(model.path)
    net.eval()
    scores = seq2seq_label_loglik(net, tokenizer, prompts, list(spec.labels), batch_size=settings["batch_size"],
                                  max_source_length=settings["max_source_length"])  # fmt: skip
    predictions = [spec.labels[i] for i in argmax(scores)]
    extra = {"method": "rank_classification", "k": settings["k"], "seed": seed, "sample": settings["sample"]}
    write_sentiment(out, spec, rows, predictions, predictions, scores, extra)
    _write_measured(out, began, len(rows))


@zeroshot.configure
def _zeroshot_params(cfg: dict[str, Any], *, model: Artifact, dataset: str, seed: int) -> dict[str, Any]:
    """The student (by content), the set and its draw: the same sentences and prompts as the teacher's."""
    return {"model": model, "dataset": dataset, "seed": seed, "settings": sentiment_settings(cfg, dataset)}
