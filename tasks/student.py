"""Stage `student`: the initial student folder that fine-tuning (and, later, pretraining) starts from.

Either a pretrained HF seq2seq checkpoint (hub id or local folder) copied into the artifact store,
or a T5 built from the student config with a byte-level BPE tokenizer trained on the run's text.
Byte-level BPE is lossless, so a decoded aspect term matches the sentence exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from fsa_distill.tasks.stage import stage
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from fsa_distill.artifacts import Artifact, fingerprint
from fsa_distill.models import MODEL_LOCK, load_seq2seq

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
#: Newline marker of teacher outputs in pretraining targets (as the paper).
NEWLINE_TOKEN = "[NL]"
#: T5's span-corruption sentinels, so the span_corruption control arm shares the baseline's vocabulary.
SENTINELS = [f"<extra_id_{i}>" for i in range(100)]


def corpus_texts(datasets: list[Artifact]) -> list[str]:
    """Sentences and target sequences of the train splits: the text the tokenizer learns from."""
    texts: list[str] = []
    for art in datasets:
        table = pq.read_table(Path(art.path) / "train.parquet", columns=["sentence", "target"])
        texts.extend(table.column("sentence").to_pylist())
        texts.extend(t for t in table.column("target").to_pylist() if t)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with T5's special-token ids (pad 0, eos 1, unk 2) that appends </s>."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK, NEWLINE_TOKEN, *SENTINELS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[NEWLINE_TOKEN, *SENTINELS],
    )


def build_t5(student: dict[str, Any], tokenizer: PreTrainedTokenizerFast) -> T5ForConditionalGeneration:
    """A randomly initialised T5 (seeded) sized by the student config."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=student["d_model"],
        d_ff=student["d_ff"],
        d_kv=student["d_kv"],
        num_layers=student["num_layers"],
        num_decoder_layers=student["num_decoder_layers"],
        num_heads=student["num_heads"],
        dropout_rate=student["dropout_rate"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(student["init_seed"])
    return T5ForConditionalGeneration(config)


@stage("student", unkeyed=("student.name", "student.pretrained"))
def init_student(out: Path, *, student: dict[str, Any], datasets: list[Artifact], fingerprint: str = "") -> None:
    """Save the initial student (model + tokenizer) into `out`.

    `fingerprint` is the content hash of a local `student.pretrained` folder (or the hub id): it
    stands in the key for the path, so moving the folder re-keys nothing.
    """
    if student.get("pretrained"):
        model, tokenizer = load_seq2seq(student["pretrained"])
    else:
        tokenizer = train_tokenizer(corpus_texts(datasets), student["vocab_size"])
        with MODEL_LOCK:
            model = build_t5(student, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@init_student.configure
def params(cfg: dict[str, Any], *, datasets: list[Artifact]) -> dict[str, Any]:
    """A checkpoint is keyed by its content; a built T5 by its config and the text its tokenizer learns."""
    student = cfg["student"]
    if student["pretrained"]:
        return {
            "student": {"name": student["name"], "pretrained": student["pretrained"]},
            "datasets": [],
            "fingerprint": fingerprint(student["pretrained"]),
        }
    return {"student": student, "datasets": list(datasets), "fingerprint": ""}
