"""The `transformers` backend: batched generation with any HF causal LM that has a chat template."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from fsa_distill.tasks.teachers.common import Generation, Pair, apply_chat_template, sha256_text

from fsa_distill.llm import load_causal_lm, resolve_model
from fsa_distill.progress import Progress

_LOADED: dict[str, tuple[Any, Any]] = {}
_LOADED_LOCK = threading.Lock()


def cached_model(model: str) -> tuple[Any, Any]:
    """Load a teacher once per process: a worker that runs several shards reuses it."""
    key = resolve_model(model)
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED[key] = load_causal_lm(model)
        return _LOADED[key]


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a generation (generation_config may list several)."""
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


@torch.inference_mode()
def generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    sort_by_length: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[tuple[str, str, int, int, float]]:
    """(text, finish_reason, prompt_tokens, output_tokens, batch latency) per prompt, in input order.

    Prompts are already chat-formatted text, so no special tokens are added. Batches are left
    padded; sorting by length keeps padding small and lets a batch finish at about the same step.
    Progress (pairs done, output tokens/s, ETA) goes to the `fsa_distill.progress` log.
    """
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort_by_length else list(range(len(ids)))
    stop = eos_ids(model, tokenizer)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "max_length": None}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=None)
    else:  # the model's generation_config may carry sampling defaults that greedy decoding warns about
        options.update(temperature=None, top_p=None, top_k=None)
    results: list[tuple[str, str, int, int, float]] = [("", "error", 0, 0, 0.0)] * len(ids)
    progress = Progress("generate", len(ids), "pairs", rates=("tokens",))
    with progress, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, padding=True, return_tensors="pt")
            batch = batch.to(model.device)
            began = time.perf_counter()
            generated = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **options)
            latency = time.perf_counter() - began
            new_tokens = generated[:, batch["input_ids"].shape[1] :].tolist()
            for i, tokens in zip(idx, new_tokens, strict=True):
                end = next((k for k, t in enumerate(tokens) if t in stop), None)
                if end is None:  # no EOS: ran into max_new_tokens (only padding follows an EOS)
                    kept, reason, count = tokens, "length", len(tokens)
                else:
                    kept, reason, count = tokens[:end], "stop", end + 1
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                results[i] = (text, reason, len(ids[i]), count, latency)
            progress.update(len(idx), tokens=sum(results[i][3] for i in idx))
    return results


def generate(pairs: list[Pair], teacher: dict[str, Any]) -> tuple[list[Generation], dict[str, Any]]:
    """Generate every pair with the configured causal LM; returns generations and stats."""
    model, tokenizer = cached_model(teacher["model"])
    prompts = [apply_chat_template(tokenizer, p) for p in pairs]
    first = pairs[0].index if pairs else 0
    outputs = generate_batched(
        model,
        tokenizer,
        prompts,
        max_new_tokens=teacher["max_new_tokens"],
        batch_size=teacher["batch_size"],
        do_sample=teacher["do_sample"],
        temperature=teacher["temperature"],
        top_p=teacher["top_p"],
        seed=teacher["seed"] + first,  # per shard: shards sample independently, reruns reproduce
    )
    generations = [
        Generation(sha256_text(prompt), text, reason, n_in, n_out, latency)
        for prompt, (text, reason, n_in, n_out, latency) in zip(prompts, outputs, strict=True)
    ]
    return generations, {"device": str(model.device), "threads": torch.get_num_threads()}
