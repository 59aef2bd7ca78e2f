"""Fine-tuning a tiny student on a few real benchmark sentences: what a user sees while it trains."""

from __future__ import annotations

import logging

from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.finetune import finetune
from fsa_distill.tasks.student import init_student

from fsa_distill.config import compose_config
from tests.test_pretrain import TINY


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_dev_evaluation_decodes_without_a_warning_per_batch(tmp_path):
    """Each dev evaluation used to log "Both `max_new_tokens` and `max_length` seem to have been set"
    once per batch after the first (606 lines in one default run): the decoding settings now reach
    the Trainer once, as `generation_max_length`."""
    cfg = compose_config(
        [*TINY, "data.limit=40", "finetune.epochs=2", "finetune.batch_size=8", "evaluate.max_new_tokens=8"]
    )
    cfg["finetune"]["eval_batch_size"] = 4  # several dev batches per evaluation
    data = acquire.run(tmp_path, acquire.params(cfg, dataset="acsa/rest16"))
    student = init_student.run(tmp_path, init_student.params(cfg, datasets=[data]))
    transformers_log = logging.getLogger("transformers")
    records = _Records()
    transformers_log.addHandler(records)
    try:
        model = finetune.run(tmp_path, finetune.params(cfg, data=data, student=student, seed=42))
    finally:
        transformers_log.removeHandler(records)
    assert model.path and (tmp_path / model.rel / "dev_metrics.json").is_file()
    assert not [m for m in records.messages if "seem to have been set" in m], records.messages[:3]
