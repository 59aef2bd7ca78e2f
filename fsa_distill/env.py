"""Process environment for the embedded defaults: local Prefect, no telemetry, no network.

Prefect reads its settings when it is first imported, so `configure` runs before any import of
prefect (the CLI and the test suite call it first thing).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def configure(workdir: str | os.PathLike[str]) -> Path:
    """Point Prefect's result storage at `workdir`, switch telemetry off and keep the hub offline.

    Values already set in the environment win, so users can still point at a Prefect server
    (PREFECT_API_URL) or allow hub downloads (HF_HUB_OFFLINE=0).
    """
    root = Path(workdir).resolve()
    (root / "prefect").mkdir(parents=True, exist_ok=True)
    defaults = {
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect" / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "GIT_PYTHON_REFRESH": "quiet",
        # The libraries' own loggers reach the Prefect UI on the task run that logged them (a
        # teacher's warnings, a Trainer's messages); outside a run they only print.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "transformers,accelerate,datasets,vllm,openai",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        # One PREFECT_HOME per process: the temporary local API keeps a SQLite database there,
        # and two processes sharing one lock each other out.
        home = tempfile.mkdtemp(prefix="home-", dir=root / "prefect")
        os.environ["PREFECT_HOME"] = home
        atexit.register(shutil.rmtree, home, ignore_errors=True)
    return root
