"""Scoring label words with a language model: zero/few-shot sentiment classification.

- Causal LMs, as upstream (HITSZ-HLT/Sentiment-Distillation `icl_multifaced.py`): the class is the
  label word whose FIRST token has the highest next-token score after the prompt (which ends in
  `Label:`). Label words are scored with a leading space (`' positive'`), as upstream's verbalizer.
  Upstream reads `generate(...).scores[0]`, the scores after the generation config's logits
  processors (a `repetition_penalty` there would change them); here the raw logits of a plain
  forward pass are used, so the result does not depend on a checkpoint's generation defaults.
- Seq2seq students (the project's own protocol: upstream has none): the prompt is the encoder
  input and each label word is scored by its summed log-likelihood as the decoder target (rank
  classification).

Both run over batches sorted by token length (little padding) and return rows in input order. Both
report progress (sentences scored, ETA) on the `fsa_distill.progress` log.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from fsa_distill.progress import Progress


def argmax(scores: Sequence[Sequence[float]]) -> list[int]:
    """Index of the best label per row; a tie goes to the first index, as `torch.argmax` upstream."""
    return [max(range(len(row)), key=lambda j: (row[j], -j)) for row in scores]


def _order(lengths: Sequence[int], sort_by_length: bool) -> list[int]:
    """Longest first, so the first batch shows at once whether the longest inputs fit in memory."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort_by_length else list(range(len(lengths)))


def _accepts(model: Any, name: str) -> bool:
    """Whether the model's forward takes a keyword (position_ids, logits_to_keep vary by architecture)."""
    return name in inspect.signature(model.forward).parameters


def _pad_id(tokenizer: Any) -> int:
    """The pad id, else EOS (upstream sets pad = eos), else 0; padded positions are masked anyway."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def first_token_ids(tokenizer: Any, label_words: Sequence[str]) -> list[int]:
    """The first token id of each label word with a leading space (`' positive'`), all distinct.

    A word that already starts with whitespace is used as is. SentencePiece tokenizers can split
    `' positive'` into a bare `▁` plus the word, so every label would get the same id and the
    argmax would always pick the first class: that is an error, not a silent constant prediction.
    """
    ids: list[int] = []
    for word in label_words:
        text = word if word[:1].isspace() else f" {word}"
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"label word {word!r} encodes to no tokens")
        ids.append(int(tokens[0]))
    clashes = {i: [w for w, j in zip(label_words, ids, strict=True) if j == i] for i in ids if ids.count(i) > 1}
    if clashes:
        shown = "; ".join(f"{words} -> id {i} ({tokenizer.convert_ids_to_tokens(i)!r})" for i, words in clashes.items())
        raise ValueError(
            f"label words share a first token, so next-token scoring cannot tell them apart: {shown}. "
            "Use other label words or a tokenizer that keeps ' word' as one leading token."
        )
    return ids


def keep_ends(ids: list[int], limit: int | None, head: int = 64) -> list[int]:
    """`ids` cut to `limit` tokens by dropping the middle: the first `head` (at most a quarter of the
    limit) and the last ones are kept, so the instruction and the end of the prompt both remain."""
    if not limit or len(ids) <= limit:
        return ids
    first = min(head, limit // 4)
    return ids[:first] + ids[len(ids) - (limit - first) :]


def _padded(rows: Sequence[Sequence[int]], pad: int, *, left: bool, device: Any) -> tuple[Any, Any]:
    """(ids, attention mask) of a batch padded to its longest row: on the left for decoder-only
    models (the next token follows the last real one), on the right for encoders."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, span] = 1
    return input_ids.to(device), mask.to(device)


@torch.inference_mode()
def causal_label_scores(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    label_words: Sequence[str],
    batch_size: int = 8,
    sort_by_length: bool = True,
) -> list[list[float]]:
    """Raw next-token logits of each label word's first token after each prompt, in prompt order.

    Prompts are raw text (no chat template) tokenized with the tokenizer's special tokens (a BOS
    where the model uses one), as upstream. Batches are left padded, with position ids counted
    from each prompt's first real token, so a padded row scores as it would alone.
    """
    ids = first_token_ids(tokenizer, label_words)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = _order([len(e) for e in encoded], sort_by_length)
    pad = _pad_id(tokenizer)
    dev = model.device
    options: dict[str, Any] = {"use_cache": False}
    if _accepts(model, "logits_to_keep"):
        options["logits_to_keep"] = 1  # only the last position's logits: not seq x vocab per row
    with_positions = _accepts(model, "position_ids")
    label_index = torch.tensor(ids, device=dev)
    scores: list[list[float]] = [[] for _ in prompts]
    with Progress("label scoring", len(prompts), "sentences") as progress:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = _padded([encoded[i] for i in idx], pad, left=True, device=dev)
            if with_positions:
                options["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids, attention_mask=mask, **options).logits[:, -1, :]
            chosen = logits.float().index_select(-1, label_index).cpu().tolist()
            for i, row_scores in zip(idx, chosen, strict=True):
                scores[i] = row_scores
            progress.update(len(idx))
    return scores


def label_target_ids(tokenizer: Any, label_words: Sequence[str]) -> list[list[int]]:
    """Decoder target ids of each label word: `tokenizer(text_target=word)`, as in fine-tuning.

    Words are stripped (a student's targets start without a space). The ids include the EOS the
    tokenizer appends (T5 tokenizers and the project's student tokenizer do), so a word is scored
    as the complete answer `word</s>`, not as a prefix of a longer output.
    """
    targets = [list(tokenizer(text_target=word.strip())["input_ids"]) for word in label_words]
    empty = [w for w, t in zip(label_words, targets, strict=True) if not t]
    if empty:
        raise ValueError(f"label words encode to no tokens: {empty}")
    return targets


@torch.inference_mode()
def seq2seq_label_loglik(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    label_words: Sequence[str],
    batch_size: int = 16,
    sort_by_length: bool = True,
    max_source_length: int | None = None,
) -> list[list[float]]:
    """Summed log-likelihood of each label word (decoder target) given each prompt (encoder input).

    Each batch runs the encoder once and the decoder on every (prompt, label) pair, so a batch of
    `batch_size` prompts makes `batch_size * len(label_words)` decoder rows. Log-probabilities are
    taken in float32. `max_source_length` bounds the encoder input (None: no bound, as upstream).
    A longer prompt loses its middle (`keep_ends`): its start holds the instruction and its end the
    test sentence's last words and `Label:`, and both must survive for the question to be asked.
    """
    targets = label_target_ids(tokenizer, label_words)
    n_labels = len(targets)
    encoded = [keep_ends(tokenizer(p)["input_ids"], max_source_length) for p in prompts]
    order = _order([len(e) for e in encoded], sort_by_length)
    pad = _pad_id(tokenizer)
    start_id = model.config.decoder_start_token_id
    if start_id is None:
        start_id = pad
    dev = model.device

    # The label block is the same for every batch: decoder inputs are the targets shifted right.
    t_len = max(len(t) for t in targets)
    label_ids = torch.full((n_labels, t_len), pad, dtype=torch.long)
    label_mask = torch.zeros((n_labels, t_len), dtype=torch.bool)
    decoder_ids = torch.full((n_labels, t_len), pad, dtype=torch.long)
    for j, t in enumerate(targets):
        label_ids[j, : len(t)] = torch.tensor(t)
        label_mask[j, : len(t)] = True
        decoder_ids[j, : len(t)] = torch.tensor([start_id, *t[:-1]])
    label_ids, label_mask, decoder_ids = label_ids.to(dev), label_mask.to(dev), decoder_ids.to(dev)
    encoder = model.get_encoder()

    scores: list[list[float]] = [[] for _ in prompts]
    with Progress("label scoring", len(prompts), "sentences") as progress:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = _padded([encoded[i] for i in idx], pad, left=False, device=dev)
            hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
            # Row r * n_labels + j: prompt r with label j.
            hidden = hidden.repeat_interleave(n_labels, dim=0)
            mask_rep = mask.repeat_interleave(n_labels, dim=0)
            dec = decoder_ids.repeat(len(idx), 1)
            out = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                attention_mask=mask_rep,
                decoder_input_ids=dec,
                use_cache=False,
            )
            logprobs = torch.log_softmax(out.logits.float(), dim=-1)
            gold = logprobs.gather(-1, label_ids.repeat(len(idx), 1).unsqueeze(-1)).squeeze(-1)
            gold = torch.where(label_mask.repeat(len(idx), 1), gold, torch.zeros_like(gold))  # padding adds 0
            summed = gold.sum(-1).view(len(idx), n_labels).cpu().tolist()
            for i, row_scores in zip(idx, summed, strict=True):
                scores[i] = row_scores
            progress.update(len(idx))
    return scores
