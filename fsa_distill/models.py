"""Loading and training seq2seq models safely from several Prefect worker threads.

transformers 5 builds models under a process-wide "meta device" context while loading; two
threads loading at once can leave one model's weights on the meta device ("Cannot copy out of
meta tensor"). One lock around model construction avoids that; loading is short next to training.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

MODEL_LOCK = threading.Lock()
#: transformers' Trainer keeps accelerate state in a process-wide singleton, so two Trainers in
#: threads of one process corrupt each other. Trainings in one process take turns; run them in
#: parallel with the Dask runner (worker processes) instead.
TRAIN_LOCK = threading.Lock()


def load_seq2seq(folder: str | Path, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A seq2seq model and its tokenizer from a folder or hub id."""
    with MODEL_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, **kwargs)
    return model, tokenizer
