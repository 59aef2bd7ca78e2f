"""Data-parallel training (DDP) for `pretrain` and `finetune`: launched by the stage, in child processes.

With `trainer.devices` x `trainer.nodes` = 1 (the default) a stage trains in its own process, as it
always did, and nothing here runs. Above 1, the stage writes a job file and starts torchrun
(`torch.distributed.run`) as a subprocess, the vLLM worker's pattern: Dask worker processes are
daemonic and may not fork multiprocessing children, and the GPU memory goes with the processes.

    python -m fsa_distill.ddp work JOB.json        (what torchrun runs on every rank)

Every rank imports the stage module and calls its training function (`target` in the job) with the
job's keyword arguments; only global rank 0 writes the stage's output files (the Trainer itself
saves checkpoints from rank 0 only). Rank 0 also sends its Trainer events (steps, log entries,
evaluations) to `events.jsonl`, which the stage replays through a `ProgressCallback`: the
progress lines, live metrics and Prefect progress artifact look as they do in-process.

The configured batch stays the global one: per-process batch = batch_size / world size
(`per_device_batch`), so the same recipe with more processes sees the same examples per optimizer
step. Single node: `--standalone` (a free port, so parallel launches never clash). Several nodes:
static rendezvous at `trainer.rdzv_endpoint`; the stage's machine is node 0 and logs the command
the others run (the store must be a shared filesystem: they read the job, the inputs and the
checkpoints from it). A killed stage takes its torchrun and workers with it (parent-death signals),
so a rerun resuming from the scratch folder's checkpoints never races an orphan.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fsa_distill.tasks.stage import Stage

log = logging.getLogger(__name__)
#: This module's import name (torchrun runs it as `__main__`, whose globals are not the importers').
MODULE = "fsa_distill.ddp"

BACKENDS = ("auto", "gloo", "nccl")
#: The `trainer` settings in a training stage's key: only the world size changes what is trained
#: (the per-process batch, the length-grouped sampler's mega-batches, each rank's dropout stream).
KEYED = ("world_size",)
#: Characters of the launcher's log carried by a `DistributedTrainingError`.
LOG_TAIL = 6000
#: Seconds between two polls of the running launcher (events are replayed as they come).
POLL_S = 0.5
#: Seconds between two step events from rank 0 (log entries and evaluations are always sent).
STEP_EVENT_S = 0.5
#: Set by `work` in a rank-0 child: the events file of `relay_callbacks`.
_EVENTS: Path | None = None


class DistributedTrainingError(RuntimeError):
    """The torchrun launch failed; the message carries the end of its log."""


# ------------------------------------------------------------------------------------------------
# Configuration


def world_size(trainer: Mapping[str, Any] | None) -> int:
    """Processes a training runs in: devices x nodes (1 without a `trainer` block)."""
    if not trainer:
        return 1
    return int(trainer.get("devices", 1)) * int(trainer.get("nodes", 1))


def per_device_batch(batch: int, trainer: Mapping[str, Any] | None, key: str) -> int:
    """The per-process batch for the global batch `batch` (config key `key`): the global batch must
    split evenly, or the effective batch (and so the recipe) would silently change."""
    world = world_size(trainer)
    if batch % world:
        devices, nodes = (trainer or {}).get("devices", 1), (trainer or {}).get("nodes", 1)
        raise ValueError(
            f"{key}={batch} is the global batch, split over trainer.devices x trainer.nodes = {devices} x {nodes} "
            f"= {world} processes, and {batch} is not a multiple of {world}: change {key}, trainer.devices or "
            "trainer.nodes"
        )
    return batch // world


def check_trainer(cfg: Mapping[str, Any]) -> None:
    """Config checks for `trainer` (called by `fsa_distill.config.validate`); messages name the keys."""
    trainer = cfg.get("trainer") or {}
    for key in ("devices", "nodes"):
        if int(trainer.get(key, 1)) < 1:
            raise ValueError(f"trainer.{key} must be >= 1, got {trainer.get(key)}")
    if trainer.get("backend", "auto") not in BACKENDS:
        raise ValueError(f"trainer.backend: {trainer.get('backend')!r} is not one of {', '.join(BACKENDS)}")
    if int(trainer.get("timeout_s", 1800)) <= 0:
        raise ValueError(f"trainer.timeout_s must be > 0, got {trainer.get('timeout_s')}")
    if int(trainer.get("nodes", 1)) > 1:
        url = (cfg.get("store") or {}).get("url") or ""
        if "://" in url and not url.startswith("file://"):
            raise ValueError(
                f"trainer.nodes > 1 needs the store on a filesystem every node mounts at the same path "
                f"(the nodes read the job, the inputs and the checkpoints there); store.url={url} is not one"
            )
        endpoint = trainer.get("rdzv_endpoint") or ""
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"trainer.rdzv_endpoint must be host:port on the stage's machine (node 0) when trainer.nodes > 1, "
                f"got {endpoint!r}"
            )
    if world_size(trainer) > 1:
        per_device_batch(int(cfg["pretrain"]["batch_size"]), trainer, "pretrain.batch_size")
        per_device_batch(int(cfg["finetune"]["batch_size"]), trainer, "finetune.batch_size")


def check_teacher_parallel(teacher: Mapping[str, Any]) -> None:
    """`teacher.vllm_args.tensor_parallel_size` / `data_parallel_size`: whole numbers >= 1."""
    args = teacher.get("vllm_args") or {}
    for key in ("tensor_parallel_size", "data_parallel_size"):
        size = args.get(key, 1)
        if size is None or int(size) < 1:
            raise ValueError(f"teacher.vllm_args.{key} must be a whole number >= 1, got {size}")


def distributed(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `trainer` param of a training stage: None for one process (its params stay as they were),
    else the launch settings with the world size, which is all of it that its key holds."""
    trainer = dict(cfg.get("trainer") or {})
    world = world_size(trainer)
    if world == 1:
        return None
    return {**trainer, "world_size": world}


class TrainingStage(Stage):
    """A `Stage` whose optional `trainer` param (present only when training is distributed) is keyed
    by its world size alone: where the ranks meet, the backend and timeouts say how it runs, not what
    it trains. (A plain `unkeyed` path must resolve in every params, and one-process params have none.)"""

    def keyed(self, params: dict[str, Any]) -> dict[str, Any]:
        keyed = super().keyed(params)
        trainer = keyed.get("trainer")
        if isinstance(trainer, dict):
            keyed["trainer"] = {k: trainer[k] for k in KEYED if k in trainer}
        return keyed


def training_stage(
    name: str, *, retries: int = 0, resumable: bool = False, unkeyed: Sequence[str] = ()
) -> Callable[[Callable[..., None]], TrainingStage]:
    """Decorator form of `TrainingStage` (as `fsa_distill.tasks.stage.stage`)."""

    def wrap(fn: Callable[..., None]) -> TrainingStage:
        return TrainingStage(name, fn, retries=retries, resumable=resumable, unkeyed=unkeyed)

    return wrap


# ------------------------------------------------------------------------------------------------
# In the ranks


def resolved_backend(trainer: Mapping[str, Any]) -> str:
    """`trainer.backend` with auto resolved on this machine: nccl with CUDA, else gloo."""
    backend = trainer.get("backend", "auto")
    if backend != "auto":
        return str(backend)
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def training_arguments(trainer: Mapping[str, Any] | None) -> dict[str, Any]:
    """Extra `Seq2SeqTrainingArguments` of a rank (none in-process). gloo trains on the CPU; it is
    passed explicitly, since accelerate would pick mpi where MPI is installed."""
    if trainer is None:
        return {}
    backend = resolved_backend(trainer)
    return {
        "ddp_backend": backend,
        "use_cpu": backend == "gloo",
        "ddp_timeout": int(trainer.get("timeout_s", 1800)),
        "ddp_find_unused_parameters": False,  # every T5 weight gets a gradient: skip the extra graph walk
    }


def relay_callbacks() -> list[Any]:
    """The Trainer callbacks a training function adds: on rank 0 of a distributed run, the one that
    sends its events to the stage; in-process (or on another rank), none."""
    if _EVENTS is None:
        return []
    return [_relay_class()(_EVENTS)]


def _relay_class() -> type:
    from transformers import TrainerCallback

    class Relay(TrainerCallback):
        """Rank 0's Trainer events as JSON lines, for `Replay` in the stage's process."""

        def __init__(self, path: Path) -> None:
            self.path = path
            self._last = 0.0

        def _send(self, event: dict[str, Any]) -> None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event, default=str) + "\n")

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._send({"on": "train_begin", "max_steps": state.max_steps, "global_step": state.global_step,
                        "log_history": state.log_history or []})  # fmt: skip

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.monotonic()
            if now - self._last >= STEP_EVENT_S or state.global_step >= state.max_steps:
                self._last = now
                self._send({"on": "step_end", "global_step": state.global_step})

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if state.log_history:
                self._send({"on": "log", "global_step": state.global_step, "entry": state.log_history[-1]})

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            loader = kwargs.get("eval_dataloader")
            try:
                total = len(loader) if loader is not None else None
            except TypeError:
                total = None
            self._send({"on": "prediction_step", "total": total})

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._send({"on": "evaluate", "global_step": state.global_step, "epoch": state.epoch,
                        "metrics": kwargs.get("metrics") or {}})  # fmt: skip

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._send({"on": "train_end", "global_step": state.global_step})

    return Relay


def _die_with_parent(sig: int, parent: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux); exit now if it already has."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def work(job_path: str) -> None:
    """One rank: run the job's training function (`module:function`) with its keyword arguments."""
    import importlib

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    _die_with_parent(signal.SIGKILL, os.getppid())  # torchrun gone: never train on as an orphan
    rank = int(os.environ.get("RANK", "0"))
    # rank 0's progress lines reach the launcher's log (shown when a launch fails); the others stay quiet
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s [rank " + str(rank) + "] %(name)s - %(message)s")  # fmt: skip
    if rank == 0 and job.get("events"):
        importlib.import_module(MODULE)._EVENTS = Path(job["events"])  # what the training function sees
    module, name = job["target"].split(":")
    function = getattr(importlib.import_module(module), name)
    try:
        function(**job["kwargs"])
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# In the stage's process


def _threads_per_process(devices: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // devices)


def torchrun_args(trainer: Mapping[str, Any], job: Path, node_rank: int = 0) -> list[str]:
    """torchrun's arguments for `job` on node `node_rank` (the stage's machine is node 0)."""
    devices, nodes = int(trainer.get("devices", 1)), int(trainer.get("nodes", 1))
    args = ["--nproc-per-node", str(devices), "--max-restarts", "0"]
    if nodes == 1:
        args.append("--standalone")  # a free port per launch: parallel stages never clash on 29500
    else:
        args += ["--nnodes", str(nodes), "--node-rank", str(node_rank), "--rdzv-backend", "static",
                 "--rdzv-endpoint", str(trainer["rdzv_endpoint"])]  # fmt: skip
    return [*args, "-m", MODULE, "work", str(job)]


def join_command(trainer: Mapping[str, Any], job: Path, node_rank: int) -> str:
    """The command node `node_rank` (> 0) runs to join the stage's training."""
    return " ".join([sys.executable, "-m", "torch.distributed.run", *torchrun_args(trainer, job, node_rank)])


def train_stage(
    what: str, train: Callable[..., None], job: dict[str, Any], trainer: Mapping[str, Any] | None, scratch: Path
) -> None:
    """A training stage's `train(**job)`: in this process without a `trainer`, else on every rank of a
    torchrun launch. Either way one training at a time per process (the Trainer's state is per
    process, and launches on one machine would share its devices)."""
    if trainer is None:
        train(**job)
        return
    from fsa_distill.models import TRAIN_LOCK

    with TRAIN_LOCK:
        launch(what, f"{train.__module__}:{train.__name__}", {**job, "trainer": trainer}, trainer, scratch / "ddp")


def launch(what: str, target: str, kwargs: dict[str, Any], trainer: Mapping[str, Any], folder: Path) -> None:
    """Train `target(**kwargs)` on every rank of a torchrun launch and wait for it.

    `folder` (in the stage's scratch folder) gets the job, the events and the launcher's log. Rank
    0's Trainer events are replayed here while it runs; a failed launch raises
    `DistributedTrainingError` with the end of its log.
    """
    folder.mkdir(parents=True, exist_ok=True)
    job, events, logfile = folder / "job.json", folder / "events.jsonl", folder / "launch.log"
    job.write_text(json.dumps({"target": target, "kwargs": kwargs, "events": str(events)}), encoding="utf-8")
    events.write_text("")
    backend = resolved_backend(trainer)
    devices, nodes = int(trainer.get("devices", 1)), int(trainer.get("nodes", 1))
    if backend == "nccl":
        import torch

        if torch.cuda.device_count() < devices:
            raise DistributedTrainingError(
                f"trainer.devices={devices} with nccl needs {devices} GPUs here; {torch.cuda.device_count()} visible"
            )
    env = dict(os.environ)
    if backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(_threads_per_process(devices))  # one share of the cores per rank
    command = [sys.executable, "-m", MODULE, "launch", str(os.getpid()), *torchrun_args(trainer, job)]
    log.info("%s: training on %d x %d processes (%s), log %s", what, nodes, devices, backend, logfile)
    for rank in range(1, nodes):
        log.info("%s: node %d joins with: %s", what, rank, join_command(trainer, job, rank))
    replay = Replay(what)
    with open(logfile, "wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        try:
            offset = 0
            while proc.poll() is None:
                time.sleep(POLL_S)
                offset = replay.feed(events, offset)
            replay.feed(events, offset)
        except BaseException:
            proc.terminate()  # the launcher stops its ranks on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            proc.kill()
            raise
        finally:
            replay.close()
    if proc.returncode != 0:
        tail = logfile.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
        raise DistributedTrainingError(
            f"{what}: torchrun ({nodes} x {devices} processes, {backend}) exited with code {proc.returncode}; "
            f"end of its log ({logfile}):\n{tail}"
        )


class Replay:
    """Rank 0's Trainer events fed to a `ProgressCallback` in the stage's process, so progress lines,
    live metrics and the progress artifact are those of an in-process training."""

    def __init__(self, what: str) -> None:
        from fsa_distill.progress import ProgressCallback

        self.callback = ProgressCallback(what)
        self.args = SimpleNamespace(output_dir=None)  # the times of entries are rank 0's to keep
        self.state = SimpleNamespace(max_steps=0, global_step=0, log_history=[], epoch=None)
        self.begun = False

    def feed(self, path: Path, offset: int) -> int:
        """Apply the complete lines of `path` after byte `offset`; the new offset."""
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return offset
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if line.strip():
                try:
                    self._apply(json.loads(line))
                except Exception as exc:  # watching must never fail the training
                    log.debug("ddp replay: %s", exc)
        return offset + end

    def _apply(self, event: dict[str, Any]) -> None:
        on, state, cb = event["on"], self.state, self.callback
        state.global_step = event.get("global_step", state.global_step)
        if on == "train_begin":
            state.max_steps, state.log_history = event["max_steps"], list(event["log_history"])
            cb.on_train_begin(self.args, state, None)
            self.begun = True
        elif on == "step_end":
            cb.on_step_end(self.args, state, None)
        elif on == "log":
            state.log_history.append(event["entry"])
            cb.on_log(self.args, state, None, logs=event["entry"])
        elif on == "prediction_step":
            cb.on_prediction_step(self.args, state, None, eval_dataloader=_Sized(event.get("total")))
        elif on == "evaluate":
            state.epoch = event.get("epoch")
            cb.on_evaluate(self.args, state, None, metrics=event["metrics"])
        elif on == "train_end":
            cb.on_step_end(self.args, state, None)  # the last step, with the last loss, in the final line
            cb.on_train_end(self.args, state, None)
            self.begun = False

    def close(self) -> None:
        """End the progress of a launch that stopped before its last event (its final line)."""
        if self.begun:
            self.callback.on_train_end(self.args, self.state, None)
            self.begun = False


class _Sized:
    """What `ProgressCallback.on_prediction_step` takes the number of evaluation batches from."""

    def __init__(self, total: int | None) -> None:
        self.total = total

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("unknown length")
        return int(self.total)


def _launcher(argv: list[str]) -> int:
    """`launch PARENT_PID TORCHRUN_ARGS...`: torchrun, stopped (SIGTERM: it stops its ranks) when the
    stage's process dies, even by SIGKILL."""
    _die_with_parent(signal.SIGTERM, int(argv[0]))
    from torch.distributed.run import main as torchrun

    torchrun(argv[1:])
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: `work JOB.json` (a rank, under torchrun) or `launch PID ARGS...` (the stage's torchrun)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "work":
        work(argv[1])
        return 0
    if len(argv) >= 2 and argv[0] == "launch":
        return _launcher(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
