"""The whole flow on a 2-worker Dask cluster against the thread runner in one process, back to back.

    python -m perf.bench_runner [--only=thread|--only=dask] [OVERRIDE ...]   # default: the default job

Runs `fsa-distill run OVERRIDES` twice, each in a fresh workdir: `runner=thread` (the default: one
process, training one at a time) and `runner=dask runner.workers=2` (a local Dask cluster of two
worker processes, one training per worker). Prints each run's wall time, its stage table (ran,
cached, wall time, and where each stage ran: `flow process` or `worker N`) and the ratio. Extra
overrides apply to both runs, e.g. `data.limit=200` for a quicker comparison. Data comes from
FSA_DATA_SOURCE, FSA_REVIEWS_ROOT and FSA_SENTIMENT_SOURCE, as for `fsa-distill run`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(workdir: Path, overrides: list[str]) -> tuple[float, dict]:
    env = dict(os.environ, FSA_PROGRESS="plain")
    command = [sys.executable, "-m", "fsa_distill.cli", "run", f"workdir={workdir}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from fsa_distill.flows.pipeline import format_summary

    extra = sys.argv[1:]
    only = None
    if extra and extra[0].startswith("--only="):  # one runner, e.g. to rerun it after a change
        only, extra = extra[0].split("=", 1)[1], extra[1:]
    root = Path(tempfile.mkdtemp(prefix="bench-runner-"))
    runs = {
        "thread (1 process)": ["runner=thread", *extra],
        "dask (2 worker processes)": ["runner=dask", "runner.workers=2", *extra],
    }
    if only:
        runs = {name: overrides for name, overrides in runs.items() if name.startswith(only)}
    times = {}
    print(f"overrides: {' '.join(extra) or '(the default job)'}; {platform.machine()}, {os.cpu_count()} cores")
    for i, (name, overrides) in enumerate(runs.items()):
        seconds, result = _run(root / f"run{i}", overrides)
        times[name] = seconds
        print(f"\n{name}: {seconds / 60:.1f} min\n{format_summary(result['stages'])}", flush=True)
    if len(times) == 2:
        thread, dask = times.values()
        print(f"\ndask / thread wall time: {dask / thread:.2f}x")


if __name__ == "__main__":
    main()
