"""Resume and scale-out of `generate`: a run killed with SIGKILL loses at most the shard in flight,
and a Prefect flow maps shards over Dask worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fsa_distill.tasks.generate import generate_shard
from fsa_distill.tasks.teachers import hf
from prefect import flow
from prefect_dask import DaskTaskRunner

from fsa_distill import ROOT
from fsa_distill.artifacts import MANIFEST, Artifact
from fsa_distill.llm import SMOLLM2, resolve_model
from tests.test_generate import PROMPTS, all_rows, ranges, reviews_artifact, shard_params, teacher, yelp_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> str:
    """The converted SmolLM2 folder (cached after the first conversion)."""
    return resolve_model(SMOLLM2)


RUN_SHARDS = """
import json, sys
from fsa_distill.artifacts import Artifact
from fsa_distill.tasks.generate import generate_shard
job = json.load(open(sys.argv[1]))
reviews = Artifact(**job["reviews"])
cfg = {"prompts": job["prompts"], "teacher": job["teacher"]}
for k, pairs in enumerate(job["ranges"]):
    generate_shard.run(job["store"], generate_shard.params(cfg, reviews=reviews, pairs=pairs))
    print("done", k, flush=True)
"""


def expected_pairs(rows: list[dict], n_reviews: int) -> list[tuple[str, str]]:
    return [(r["id"], p) for r in rows[:n_reviews] for p in sorted(PROMPTS)]


def test_killed_run_resumes_with_only_the_missing_shards(tmp_path, smollm2, monkeypatch):
    rows = yelp_rows(5)
    art = reviews_artifact(tmp_path / "reviews", rows)
    cfg = teacher(smollm2, shard_size=2, max_new_tokens=24, max_reviews=4)
    layout = ranges(art, cfg)
    n = len(layout)
    assert n == 4
    store = tmp_path / "store"
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {"store": str(store), "reviews": art.model_dump(), "prompts": PROMPTS, "teacher": cfg, "ranges": layout}
        )
    )
    script = tmp_path / "run_shards.py"
    script.write_text(RUN_SHARDS)
    proc = subprocess.Popen([sys.executable, str(script), str(job)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # let two shards finish, then kill -9 while the third is generating
            if line.strip() == "done 1":
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9

    def params(k: int) -> dict:
        return shard_params(art, layout[k], cfg)

    done = {k: generate_shard.cached(store, params(k)) for k in range(n)}
    finished = sorted(k for k, a in done.items() if a is not None)
    assert finished[:2] == [0, 1] and len(finished) < n, finished
    stamps = {k: (Path(done[k].path) / MANIFEST).stat().st_mtime_ns for k in finished}

    generated: list[int] = []
    real = hf.generate

    def counting(pairs, teacher_cfg):  # the real backend, counting what it is asked for
        generated.extend(p.index for p in pairs)
        return real(pairs, teacher_cfg)

    monkeypatch.setattr(hf, "generate", counting)
    results = [generate_shard.run(store, params(k)) for k in range(n)]
    missing = [k for k in range(n) if k not in finished]
    assert generated == [i for k in missing for i in range(2 * k, 2 * k + 2)]
    for k in finished:
        assert results[k] == done[k] and (Path(results[k].path) / MANIFEST).stat().st_mtime_ns == stamps[k]
    union = [(r["review_id"], r["prompt"]) for r in all_rows(results)]
    assert union == expected_pairs(rows, 4) and len(set(union)) == len(union)


@flow
def _sharded(store: str, reviews: Artifact, teacher_cfg: dict, layout: list[tuple[int, int]]) -> list[Artifact]:
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    cfg = {"teacher": teacher_cfg, "prompts": PROMPTS}
    with runner:
        futures = [
            generate_shard.submit_for(runner, store, cfg, label=f"{first}-{last}", reviews=reviews, pairs=(first, last))
            for first, last in layout
        ]
        return [f.result() for f in futures]


@pytest.mark.usefixtures("prefect_harness")
def test_dask_flow_maps_shards_over_worker_processes(tmp_path, smollm2):
    rows = yelp_rows(3)
    art = reviews_artifact(tmp_path / "reviews", rows)
    cfg = teacher(smollm2, shard_size=2, max_new_tokens=8)
    layout = ranges(art, cfg)
    assert layout == [(0, 2), (2, 4), (4, 6)]
    began = time.perf_counter()
    results = _sharded(str(tmp_path / "store"), art, cfg, layout)
    assert [generate_shard.cached(tmp_path / "store", shard_params(art, r, cfg)) for r in layout] == results
    union = [(r["review_id"], r["prompt"]) for r in all_rows(results)]
    assert union == expected_pairs(rows, 3)
    assert all(r["finish_reason"] in ("stop", "length") and r["output"] for r in all_rows(results))
    # a second flow run is served from the cache: same artifacts, nothing regenerated
    again = _sharded(str(tmp_path / "store"), art, cfg, layout)
    assert again == results, time.perf_counter() - began
