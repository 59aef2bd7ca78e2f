"""Test set-up: a private workdir and Prefect home per test session, data from the local mirror.

Prefect reads its settings on first import, so the environment is configured here, before any
test module imports prefect.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsa_distill import ROOT
from fsa_distill.env import configure

SESSION_DIR = Path(tempfile.mkdtemp(prefix="fsa-tests-"))
atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)
os.environ.setdefault("FSA_DATA_SOURCE", str((ROOT.parent / "shared" / "data" / "fsa-distillation").resolve()))
os.environ.setdefault("FSA_SENTIMENT_SOURCE", str((ROOT.parent / "shared" / "data" / "sentiment").resolve()))
for _key in ("FSA_DATA_SOURCE", "FSA_SENTIMENT_SOURCE"):  # tests start runs in other directories
    os.environ[_key] = str(Path(os.environ[_key]).resolve())
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


@pytest.fixture
def harness_env(prefect_harness) -> dict[str, str]:
    """This process's environment pointed at the session's Prefect API, for the CLI runs a test
    starts: each would otherwise start a temporary server of its own (about 15 s on 2 cores)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, for the session.

    Its endpoint and dummy credentials go into this process's environment, as a user sets them
    on every machine (`FSSPEC_S3_ENDPOINT_URL`, `AWS_*`), so subprocesses started by tests see them.
    """
    import sys

    import fsspec.config

    from tests.servers import background, free_port, wait_http

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    log = SESSION_DIR / "moto.log"
    with background([moto, "-H", "127.0.0.1", "-p", str(port)], dict(os.environ), log) as server:
        wait_http(f"{endpoint}/moto-api/", 60, server, log)
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            FSSPEC_S3_ENDPOINT_URL=endpoint,
            MLFLOW_S3_ENDPOINT_URL=endpoint,
        )
        fsspec.config.set_conf_env(fsspec.config.conf)
        yield endpoint


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """A fresh bucket on the session's S3 server, as the store URL `s3://<bucket>/store`."""
    import uuid

    import fsspec

    bucket = f"fsa-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/store"
