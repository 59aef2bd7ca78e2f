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
    """The real config with `experiment=smoke` (conf/experiment/smoke.yaml): a whole run in seconds.

    Distillation is off here; `shrunk_distill` switches it on (two reviews through the teacher).
    """
    return [
        "experiment=smoke",
        f"workdir={workdir}",
        "distill.enabled=false",
        f"data.source={DATA_SOURCE}",
        *extra,
    ]


REVIEWS_ROOT = str(Path(DATA_SOURCE).parent / "reviews")


def shrunk_distill(workdir: Path, *extra: str) -> list[str]:
    """`experiment=smoke` as it is: distillation on, with the local review mirror."""
    return shrunk(workdir, "distill.enabled=true", f"reviews.root={REVIEWS_ROOT}", *extra)


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
