"""Test set-up: a private workdir and Prefect home per test session, data from the local mirror.

Prefect reads its settings on first import, so the environment is configured here, before any
test module imports prefect.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from fsa_distill import ROOT
from fsa_distill.env import configure

SESSION_DIR = Path(tempfile.mkdtemp(prefix="fsa-tests-"))
atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)
os.environ.setdefault("FSA_DATA_SOURCE", str((ROOT.parent / "shared" / "data" / "fsa-distillation").resolve()))
os.environ.setdefault("FSA_SENTIMENT_SOURCE", str((ROOT.parent / "shared" / "data" / "sentiment").resolve()))
os.environ["FSA_WORKDIR"] = str(SESSION_DIR / "work")
configure(SESSION_DIR / "work")

DATA_SOURCE = os.environ["FSA_DATA_SOURCE"]


def shrunk(workdir: Path, *extra: str) -> list[str]:
    """Overrides that shrink the real default config to seconds: few sentences, one epoch, a tiny T5.

    Distillation is off here; `shrunk_distill` switches it on with a tiny teacher corpus.
    """
    return [
        f"workdir={workdir}",
        "distill.enabled=false",
        f"data.source={DATA_SOURCE}",
        "data.limit=12",
        "data.datasets=[atsa/rest14,acsa/rest16]",
        "finetune.epochs=1",
        "finetune.seeds=[42]",
        "finetune.batch_size=4",
        "student.vocab_size=600",
        "student.d_model=32",
        "student.d_ff=64",
        "student.d_kv=8",
        "student.num_heads=2",
        "student.num_layers=1",
        "student.num_decoder_layers=1",
        "evaluate.max_new_tokens=12",
        # the teacher in context and zero-shot sentiment, on a few sentences
        "teacher_eval.seeds=[42]",
        "teacher_eval.sample=3",
        "teacher_eval.max_new_tokens=16",
        "zeroshot.datasets=[sst2]",
        "zeroshot.sample=8",
        *extra,
    ]


REVIEWS_ROOT = str(Path(DATA_SOURCE).parent / "reviews")


def shrunk_distill(workdir: Path, *extra: str) -> list[str]:
    """`shrunk` with distillation on: a handful of reviews, short teacher outputs, a few pretraining steps."""
    return shrunk(
        workdir,
        "distill.enabled=true",
        f"reviews.root={REVIEWS_ROOT}",
        "reviews.per_domain=1",
        "teacher.max_reviews=2",
        "teacher.shard_size=2",
        "teacher.batch_size=4",
        "pretrain.max_steps=3",
        "pretrain.save_steps=2",
        "pretrain.batch_size=4",
        "pretrain.max_target_length=64",
        *extra,
    )


@pytest.fixture(scope="session")
def data_source() -> str:
    """The benchmark mirror (`../shared/data/fsa-distillation` unless FSA_DATA_SOURCE says otherwise)."""
    if not Path(DATA_SOURCE).is_dir():
        pytest.fail(f"benchmark mirror not found at {DATA_SOURCE}; set FSA_DATA_SOURCE")
    return DATA_SOURCE


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
