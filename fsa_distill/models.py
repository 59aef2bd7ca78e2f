"""Loading and training seq2seq models safely from several Prefect worker threads.

transformers 5 builds models under a process-wide "meta device" context while loading; two
threads loading at once can leave one model's weights on the meta device ("Cannot copy out of
meta tensor"). One lock around model construction avoids that; loading is short next to training.
"""

from __future__ import annotations

import json
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


def _is_timing(key: str) -> bool:
    return key.endswith(("_runtime", "_per_second")) or key in ("resumed_from", "train_runtime_s")


def write_log(out: Path, name: str, log: Any) -> None:
    """Write a training log as content (`out/name`) and its timings as measurements (`out/measured/name`).

    Runtimes and throughputs differ on every run; keeping them out of the content hash means the
    same data, recipe and code give the same model artifact hash, so nothing after it re-keys.
    """

    def split(value: Any) -> tuple[Any, Any]:
        if isinstance(value, dict):
            content, measured = {}, {}
            for key, sub in value.items():
                if _is_timing(key):
                    measured[key] = sub
                else:
                    content[key], inner = split(sub)
                    if inner not in (None, {}, []):
                        measured[key] = inner
            if measured and isinstance(value.get("step"), int):
                measured["step"] = value["step"]
            return content, measured
        if isinstance(value, list):
            pairs = [split(v) for v in value]
            return [c for c, _ in pairs], [m for _, m in pairs]
        return value, None

    content, measured = split(log)
    (out / name).write_text(json.dumps(content, indent=1))
    (out / "measured").mkdir(exist_ok=True)
    (out / "measured" / name).write_text(json.dumps(measured, indent=1))


def read_log(folder: str | Path, name: str) -> Any:
    """A training log with its measurements merged back (for tracking and reports)."""

    def merge(content: Any, measured: Any) -> Any:
        if isinstance(content, dict) and isinstance(measured, dict):
            return {**content, **{k: merge(content.get(k), v) for k, v in measured.items()}}
        if isinstance(content, list) and isinstance(measured, list):
            return [merge(c, m) for c, m in zip(content, measured, strict=False)]
        return content if measured is None else measured

    folder = Path(folder)
    content = json.loads((folder / name).read_text())
    path = folder / "measured" / name
    return merge(content, json.loads(path.read_text())) if path.is_file() else content


def last_checkpoint(scratch: str | Path) -> str | None:
    """The newest *complete* Trainer checkpoint under `scratch` (it has `trainer_state.json`), or None.

    A process killed while saving leaves a `checkpoint-N` folder without its state; transformers'
    `get_last_checkpoint` would pick it and the resume would fail. The one before it is used instead.
    """
    found = []
    for path in Path(scratch).glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        if step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return str(max(found)[1]) if found else None
