"""Label-scoring throughput: batched, length-sorted scoring vs one sentence at a time, same models, one run.

    python -m perf.bench_labelscore [--n 300] [--batch-size 32] [--k 0] [--threads 1]

Real SST-2 test sentences (`<data>/sentiment/sst2/test.json`, demonstrations from its train split
when --k > 0) become upstream's zero/few-shot prompts (fsa_distill.benchmark.icl). Two models with
random weights, built from configs on a byte-level tokenizer trained on the SST-2 train split:
a tiny Llama-style causal LM (next-token logits of ' negative'/' positive') and a tiny T5
(summed log-likelihood of each label word as the decoder target). Prints sentences/s of each
way, the ratio batched/one-at-a-time, and checks that both ways predict the same labels.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from fsa_distill.benchmark.icl import sentiment_prompts
from fsa_distill.tasks.student import train_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from fsa_distill import ROOT
from fsa_distill.lmscore import argmax, causal_label_scores, seq2seq_label_loglik

#: Upstream's SST-2 instruction (Sentiment-Distillation `icl_multifaced.py`), for this benchmark only:
#: the evaluated instructions are versioned with the sentiment datasets.
INSTRUCTION = (
    "Please perform Sentiment Analysis task. Given the sentence, assign a sentiment polarity label from "
    "['negative', 'positive']. Return label only without any other text."
)
LABELS = ["negative", "positive"]


def read_json(path: Path) -> list[dict[str, str]]:
    """A JSON array with a BOM, as the upstream sentiment files."""
    return json.loads(path.read_text(encoding="utf-8-sig"))


def causal_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no added special tokens, like GPT-2/SmolLM2: ' positive' is one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def timed(fn: Callable[[], list[list[float]]]) -> tuple[list[list[float]], float]:
    """The result and the wall time of one call."""
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


Scorer = Callable[[list[str], int, bool], list[list[float]]]


def compare(name: str, score: Scorer, prompts: list[str], batch_size: int) -> None:
    """Warm up, then time batched+sorted and one-at-a-time scoring; print rates, ratio, agreement."""
    n = len(prompts)
    score(prompts[:batch_size], batch_size, True)  # warm-up: allocator, kernels, lazy init
    batched, t_batched = timed(lambda: score(prompts, batch_size, True))
    single, t_single = timed(lambda: score(prompts, 1, False))
    diff = max(abs(a - b) for ra, rb in zip(batched, single, strict=True) for a, b in zip(ra, rb, strict=True))
    same = argmax(batched) == argmax(single)
    print(
        f"{name:7s} batched+sorted (bs {batch_size}): {n / t_batched:8.1f} sent/s   "
        f"one at a time: {n / t_single:8.1f} sent/s   ratio {t_single / t_batched:5.2f}x   "
        f"same argmax: {same}   max |diff| {diff:.2e}"
    )
    if not same:
        raise SystemExit(f"{name}: batched and one-at-a-time predictions differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--n", type=int, default=300, help="test sentences")
    parser.add_argument("--k", type=int, default=0, help="demonstrations per prompt")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.data / "sentiment" / "sst2"
    tests, pool = read_json(folder / "test.json")[: args.n], read_json(folder / "train.json")
    prompts = sentiment_prompts(INSTRUCTION, tests, pool, k=args.k, seed=args.seed)
    corpus = [row["sentence"] for row in pool] + [INSTRUCTION, "Sentence: Label: negative positive"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads = max(1, args.hidden // 32)
    torch.manual_seed(0)

    ctok = causal_tokenizer(corpus, args.vocab)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(ctok),
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=8192,
        )
    )
    llama = llama.to(dev).eval()
    stok = train_tokenizer(corpus, args.vocab)
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(stok),
            d_model=args.hidden,
            d_kv=32,
            d_ff=4 * args.hidden,
            num_layers=args.layers,
            num_decoder_layers=args.layers,
            num_heads=heads,
            pad_token_id=stok.pad_token_id,
            eos_token_id=stok.eos_token_id,
            decoder_start_token_id=stok.pad_token_id,
        )
    )
    t5 = t5.to(dev).eval()

    lengths = [len(ctok(p)["input_ids"]) for p in prompts]
    print(
        f"{len(prompts)} SST-2 prompts (k={args.k}), {min(lengths)}-{max(lengths)} tokens (mean "
        f"{sum(lengths) / len(lengths):.0f}); device {dev}, threads {torch.get_num_threads()}, "
        f"hidden {args.hidden}, layers {args.layers}, vocab {len(ctok)}/{len(stok)}"
    )
    compare(
        "causal",
        lambda ps, bs, srt: causal_label_scores(llama, ctok, ps, LABELS, batch_size=bs, sort_by_length=srt),
        prompts,
        args.batch_size,
    )
    compare(
        "seq2seq",
        lambda ps, bs, srt: seq2seq_label_loglik(t5, stok, ps, LABELS, batch_size=bs, sort_by_length=srt),
        prompts,
        args.batch_size,
    )


if __name__ == "__main__":
    main()
