"""Runs that share a store compute each output once and never corrupt one another's outputs.

The lock manager is checked on its own (waiting, a dead holder's lease, pickling); `Stage.run`
from two processes at once computes once; publication keeps the first complete output; and two
real `fsa-distill run` processes started together on a fresh workdir with overlapping configs
compute each shared stage exactly once, both finish, and every artifact verifies.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import shrunk
from fsa_distill.tasks.stage import LOCKS, Stage, publish

from fsa_distill.artifacts import seal, verify
from fsa_distill.locks import LeaseLockManager, lock_manager

# ------------------------------------------------------------------------------------------------
# The lock manager


def test_a_held_lock_makes_others_wait_until_it_is_released(tmp_path):
    one, other = LeaseLockManager(tmp_path), LeaseLockManager(tmp_path)  # two processes' managers
    assert one.acquire_lock("k", "a")
    assert one.acquire_lock("k", "a")  # re-entrant for its holder
    assert other.is_locked("k") and not other.is_lock_holder("k", "b")
    assert not other.acquire_lock("k", "b", acquire_timeout=0.3)
    with pytest.raises(ValueError, match="No lock held by b"):
        other.release_lock("k", "b")
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(other.acquire_lock("k", "b")))
    waiter.start()
    time.sleep(0.5)
    assert not got  # still waiting
    one.release_lock("k", "a")
    waiter.join(timeout=10)
    assert got == [True] and other.is_lock_holder("k", "b")
    other.release_lock("k", "b")
    assert not other.is_locked("k") and other.wait_for_lock("k", timeout=0.1)


def test_a_live_holder_keeps_its_lease_and_a_dead_ones_is_taken_over(tmp_path):
    live = LeaseLockManager(tmp_path, lease_s=1.0, poll_s=0.05)
    assert live.acquire_lock("k", "alive")
    late = LeaseLockManager(tmp_path, lease_s=1.0)  # another process's manager
    assert not late.acquire_lock("k", "late", acquire_timeout=2.5)  # 2.5 leases: the heartbeat renews it
    assert live.acquire_lock("k2", "other")
    with pytest.raises(ValueError):  # a release by a non-holder (Prefect's second release) ...
        live.release_lock("k", "not-the-holder")
    assert live._held == {"k": "alive", "k2": "other"}  # ... stops no holder's heartbeat
    live.release_lock("k", "alive")
    live.release_lock("k2", "other")

    dead = LeaseLockManager(tmp_path, lease_s=0.5)
    path = dead.path("k")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"holder": "killed", "host": "gone", "pid": 1}))  # no heartbeat behind it
    os.utime(path, (time.time() - 5, time.time() - 5))
    started = time.monotonic()
    assert dead.acquire_lock("k", "next", acquire_timeout=5)
    # taken over once this process has seen it untouched for a lease (whatever the mtime's clock says)
    assert 0.5 <= time.monotonic() - started < 3 and dead.is_lock_holder("k", "next")
    dead.release_lock("k", "next")


def test_a_lock_whose_holder_was_killed_on_this_host_is_taken_over_at_once(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fsa_distill.locks import LeaseLockManager as M; "
         "M(sys.argv[1]).acquire_lock('k', 'killed'); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    waiter = LeaseLockManager(tmp_path, lease_s=60.0, poll_s=0.05)
    assert not waiter.acquire_lock("k", "next", acquire_timeout=0.5)  # alive: it waits
    # the same host name in another pid namespace (a container with host networking): its pids say
    # nothing here, so only the lease can free its lock
    other = LeaseLockManager(tmp_path / "other")
    path = other.path("k")
    path.parent.mkdir(parents=True)
    info = {"holder": "there", "host": socket.gethostname(), "machine": "elsewhere", "pid": holder.pid + 10**6}
    path.write_text(json.dumps(info))
    assert not LeaseLockManager(tmp_path / "other", poll_s=0.05).acquire_lock("k", "here", acquire_timeout=0.5)
    holder.kill()
    holder.wait()
    started = time.monotonic()
    assert waiter.acquire_lock("k", "next", acquire_timeout=30)
    assert time.monotonic() - started < 5, "waited for the lease though the holder's process is gone"
    waiter.release_lock("k", "next")


def test_a_pickled_manager_comes_back_as_the_processes_own(tmp_path):
    manager = lock_manager(tmp_path / "locks")
    # what a task sent to a Dask worker carries: unpickled, it is that process's manager for the
    # folder (one heartbeat per folder), never a copy with a dead heartbeat thread
    assert pickle.loads(pickle.dumps(manager)) is manager


# ------------------------------------------------------------------------------------------------
# Stage.run and publication


def _slow_write(out: Path, *, value: str, count: str) -> None:
    with open(count, "a") as handle:  # outside the store: one line per computation
        handle.write(f"{os.getpid()}\n")
    time.sleep(1.5)
    (out / "value.txt").write_text(value)


slow_stage = Stage("t-slow-write", _slow_write)


def _run_slow(store: str, count: str, results: multiprocessing.Queue, go: Any) -> None:
    go.wait(60)  # both processes start the stage at the same moment
    artifact = slow_stage.run(store, {"value": "v", "count": count})
    results.put((artifact.path, artifact.sha256))


def test_two_processes_running_one_stage_compute_it_once(tmp_path):
    store, count = tmp_path / "store", tmp_path / "count.txt"
    spawn = multiprocessing.get_context("spawn")
    results, go = spawn.Queue(), spawn.Event()
    workers = [spawn.Process(target=_run_slow, args=(str(store), str(count), results, go)) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(3)  # both imported and waiting
    go.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    got = [results.get(timeout=10) for _ in workers]
    assert got[0] == got[1]
    assert len(count.read_text().splitlines()) == 1, "both processes computed the output"
    assert not list((store / LOCKS).glob("*.lock"))  # released


def test_a_second_writer_never_replaces_a_complete_output(tmp_path):
    out = tmp_path / "stage" / "key"
    out.mkdir(parents=True)
    (out / "value.txt").write_text("first")
    first = seal(out)
    inode = (out / "value.txt").stat().st_ino  # the very file a run may be reading
    late = tmp_path / "stage" / ".key.late.tmp"
    late.mkdir()
    (late / "value.txt").write_text("second")
    seal(late)
    publish(late, out)
    assert verify(out) == first and (out / "value.txt").read_text() == "first"
    assert (out / "value.txt").stat().st_ino == inode and not late.exists()

    (out / "value.txt").write_text("edited")  # a broken output is replaced
    again = tmp_path / "stage" / ".key.again.tmp"
    again.mkdir()
    (again / "value.txt").write_text("third")
    third = seal(again)
    publish(again, out)
    assert verify(out) == third and not list(out.parent.glob(".key.*"))


# ------------------------------------------------------------------------------------------------
# Two real runs at once


@pytest.mark.slow
def test_two_runs_started_together_compute_each_shared_stage_once(tmp_path):
    """As a new user would: the same workdir (fresh, so both also create the MLflow database), two
    overlapping configs, started at the same moment."""
    workdir = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # each its own local API
    env["FSA_PROGRESS_INTERVAL_S"] = "60"
    off = ["teacher_eval.enabled=false", "zeroshot.enabled=false", "data.datasets=[acsa/rest16]"]
    configs = [
        shrunk(workdir, *off, "finetune.seeds=[42]"),
        shrunk(workdir, *off, "finetune.seeds=[42,52]"),
    ]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "fsa_distill.cli", "run", *config],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for config in configs
    ]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (_out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-4000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _err in outputs]

    ran: dict[str, int] = {}
    for result in results:
        for row in result["stages"]:
            ran[row["stage"]] = ran.get(row["stage"], 0) + row["ran"]
    # one dataset and one student, shared; seed 42 is shared and seed 52 is the second run's only
    assert {s: ran.get(s, 0) for s in ("acquire", "student", "finetune", "evaluate")} == {
        "acquire": 1,
        "student": 1,
        "finetune": 2,
        "evaluate": 2,
    }, results
    store = workdir / "artifacts"
    outputs_made = [p for stage in store.iterdir() if not stage.name.startswith(".") for p in stage.iterdir()]
    made = [p for p in outputs_made if not p.name.startswith(".") and not p.name.endswith(".scratch")]
    assert made and all(verify(p) is not None for p in made)
    assert not [p for p in outputs_made if p.name.endswith(".tmp")]  # no half-written output left
