"""GPU stages carry a Prefect tag whose concurrency limit (`runner.gpu_limit`) they never exceed."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
from fsa_distill.flows.pipeline import Wiring, gpu_limit
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.finetune import finetune
from fsa_distill.tasks.generate import generate_shard
from fsa_distill.tasks.stage import Stage
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fsa_distill.config import compose_config, validate


def _busy(out: Path, *, n: int) -> None:
    """Holds the 'device' for a moment and says when (a measurement, outside the content hash)."""
    start = time.time()
    time.sleep(0.8)
    (out / "n.json").write_text(json.dumps(n))
    (out / "measured").mkdir()
    (out / "measured" / "span.json").write_text(json.dumps([start, time.time()]))


busy = Stage("g-busy", _busy)


@flow
def _three_at_once(store: str, tag: str) -> list[str]:
    with ThreadPoolTaskRunner(max_workers=3) as runner:
        futures = [busy.submit(runner, store, {"n": n}, tags=[tag]) for n in range(3)]
        return [f.result().path for f in futures]


@pytest.mark.usefixtures("prefect_harness")
def test_stages_with_the_gpu_tag_never_run_more_at_once_than_its_limit(tmp_path):
    from prefect.client.orchestration import get_client

    tag = f"gpu-{tmp_path.name}"
    gpu_limit({"gpu_tag": tag, "gpu_limit": 2})
    gpu_limit({"gpu_tag": tag, "gpu_limit": 1})  # set again: the new value wins
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag(tag).concurrency_limit == 1
    paths = _three_at_once(str(tmp_path), tag)
    spans = sorted(json.loads((Path(p) / "measured" / "span.json").read_text()) for p in paths)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.05, f"two tagged stages overlapped: {spans}"


def test_which_stages_take_a_gpu_slot():
    cfg = compose_config([])
    wiring = Wiring.__new__(Wiring)
    wiring.cfg = cfg
    assert wiring._tags(finetune) == ["gpu"] and wiring._tags(acquire) == []
    assert wiring._tags(generate_shard) == ["gpu"]  # the embedded teacher runs here
    wiring.cfg = compose_config(["teacher=openai"])
    assert wiring._tags(generate_shard) == []  # a teacher behind an API uses no GPU here
    with pytest.raises(ValueError, match="gpu_limit"):
        validate(compose_config(["runner.gpu_limit=0"]))
