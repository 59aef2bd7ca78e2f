"""Label scoring on tiny random models: batched, padded, length-sorted results equal a hand computation."""

from __future__ import annotations

import pytest
import torch
from fsa_distill.tasks.student import train_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from fsa_distill.lmscore import (
    argmax,
    causal_label_scores,
    first_token_ids,
    label_target_ids,
    seq2seq_label_loglik,
)

CORPUS = [
    "Sentence: the film was a delight\nLabel: positive",
    "Sentence: a dull , lifeless mess\nLabel: negative",
    "Sentence: it is a movie about a man\nLabel: neutral",
    "Please perform Sentiment Analysis task. Given the sentence, assign a sentiment polarity label.",
] * 20
PROMPTS = [
    "Classify.\n\nSentence: a delight\nLabel:",
    "Classify.\n\nSentence: the film was a dull , lifeless mess about a man and a movie\nLabel:",
    "Classify.\n\nSentence: it is a movie\nLabel:",
    "Classify.\n\nSentence: the movie was a delight , a film about a man\nLabel:",
    "Classify.\n\nSentence: dull , dull , dull\nLabel:",
]
LABELS = ["negative", "positive", "neutral"]


@pytest.fixture(scope="module")
def causal_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE as SmolLM2/GPT-2/Llama-3: ' positive' becomes one token 'Ġpositive'."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_causal(kind: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()


class TestCausal:
    def test_label_words_are_single_leading_space_tokens(self, causal_tokenizer):
        ids = first_token_ids(causal_tokenizer, LABELS)
        assert causal_tokenizer.convert_ids_to_tokens(ids) == ["Ġnegative", "Ġpositive", "Ġneutral"]
        assert first_token_ids(causal_tokenizer, [" negative"]) == ids[:1]

    def test_shared_first_token_is_an_error(self, causal_tokenizer):
        # 'q' and 'x' never follow a space in the corpus: both words start with the bare 'Ġ' token,
        # as ' positive' can start with a bare '▁' in SentencePiece tokenizers.
        with pytest.raises(ValueError, match="share a first token"):
            first_token_ids(causal_tokenizer, ["qqq", "xqq"])

    @pytest.mark.parametrize("kind", ["llama", "gpt2"])
    @pytest.mark.parametrize("sort_by_length", [True, False])
    def test_left_padded_batches_equal_one_prompt_at_a_time(self, causal_tokenizer, kind, sort_by_length):
        model = tiny_causal(kind, len(causal_tokenizer))
        ids = first_token_ids(causal_tokenizer, LABELS)
        lengths = {len(causal_tokenizer(p)["input_ids"]) for p in PROMPTS}
        assert len(lengths) == len(PROMPTS)  # every batch is padded
        scores = causal_label_scores(
            model, causal_tokenizer, PROMPTS, LABELS, batch_size=3, sort_by_length=sort_by_length
        )
        for prompt, row in zip(PROMPTS, scores, strict=True):
            alone = torch.tensor([causal_tokenizer(prompt)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=alone).logits[0, -1]
            assert row == pytest.approx(logits[ids].tolist(), abs=1e-4)
        assert argmax(scores) == [int(torch.tensor(r).argmax()) for r in scores]


@pytest.fixture(scope="module")
def t5():
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)  # the student tokenizer: appends </s>
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval(), tokenizer


class TestSeq2seq:
    def test_targets_end_with_eos(self, t5):
        _, tokenizer = t5
        targets = label_target_ids(tokenizer, [" positive", "negative"])
        assert all(t[-1] == tokenizer.eos_token_id and len(t) >= 2 for t in targets)
        assert targets[0] == tokenizer(text_target="positive")["input_ids"]

    @pytest.mark.parametrize("sort_by_length", [True, False])
    def test_rank_classification_equals_hand_computed_loglik(self, t5, sort_by_length):
        model, tokenizer = t5
        labels = [*LABELS, "a dull movie"]  # a multi-token label: the sum runs over all its tokens
        scores = seq2seq_label_loglik(model, tokenizer, PROMPTS, labels, batch_size=2, sort_by_length=sort_by_length)
        for prompt, row in zip(PROMPTS, scores, strict=True):
            source = torch.tensor([tokenizer(prompt)["input_ids"]])
            expected = []
            for word in labels:
                target = tokenizer(text_target=word)["input_ids"]
                decoder_input = torch.tensor([[model.config.decoder_start_token_id, *target[:-1]]])
                with torch.no_grad():
                    logits = model(input_ids=source, decoder_input_ids=decoder_input).logits[0]
                logprobs = torch.log_softmax(logits, dim=-1)
                expected.append(sum(float(logprobs[t, tok]) for t, tok in enumerate(target)))
            assert row == pytest.approx(expected, abs=1e-4)
        assert argmax(scores) == [max(range(len(r)), key=r.__getitem__) for r in scores]


def test_argmax_ties_go_to_the_first_label():
    assert argmax([[1.0, 1.0, 0.5], [0.0, 2.0, 2.0], [-3.0, -1.0, -2.0]]) == [0, 1, 1]


def test_long_prompts_keep_the_instruction_and_the_label_slot():
    from fsa_distill.lmscore import keep_ends

    ids = list(range(1000))
    cut = keep_ends(ids, 128)
    assert len(cut) == 128 and cut[:32] == list(range(32)) and cut[-96:] == list(range(904, 1000))
    assert keep_ends(ids[:100], 128) == ids[:100] and keep_ends(ids, None) == ids
