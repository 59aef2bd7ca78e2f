"""GPU checks (CUDA only; skipped elsewhere): bf16 pretraining, CUDA fine-tuning and generation.

Run on a GPU machine with `pytest -m gpu`. CI has no GPU, so these are skipped there; the README
records what they measured when run on a lent H100/H200.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.evaluate import evaluate, read_metrics
from fsa_distill.tasks.finetune import finetune
from fsa_distill.tasks.pretrain import pretrain
from fsa_distill.tasks.student import init_student

from fsa_distill.artifacts import Artifact, seal
from fsa_distill.config import compose_config
from fsa_distill.models import read_log
from tests.conftest import DATA_SOURCE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SMALL = ["student.d_model=256", "student.d_ff=1024", "student.num_layers=4", "student.num_decoder_layers=4",
         "student.num_heads=4", "student.d_kv=64", "student.vocab_size=8000"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    store = tmp_path_factory.mktemp("gpu")
    cfg = compose_config(SMALL)
    data = acquire.run(store, acquire.params(cfg, dataset="atsa/rest14"))
    student = init_student.run(store, init_student.params(cfg, datasets=[data]))
    lines = (Path(DATA_SOURCE) / "prompting/test/mixtral/test_500_4m8d.json").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line.lstrip("\ufeff")) for line in lines if line.strip()]
    folder = store / "corpus"
    folder.mkdir()
    table = pa.table({"review": [r["Text"] for r in rows], "output": [r["mixtral_response"] for r in rows]})
    pq.write_table(table, folder / "corpus.parquet")
    return store, cfg, data, student, Artifact(path=str(folder), sha256=seal(folder))


def test_bf16_pretraining_on_cuda(setup):
    store, cfg, _, student, corpus = setup
    params = pretrain.params(cfg, student=student, corpus=corpus, objective="distill")
    params["pretrain"].update(max_steps=150, batch_size=20, grad_accum=5, bf16=True, save_steps=1000)
    model = pretrain.run(store, params)
    log = read_log(model.path, "pretrain_log.json")
    assert log["stats"]["device"] == "cuda" and log["stats"]["bf16"] is True
    losses = [h["loss"] for h in log["history"] if "loss" in h]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    print("bf16 pretrain:", log["stats"], "first/last loss", losses[0], losses[-1])


def test_finetune_and_generation_on_cuda(setup):
    store, cfg, data, student, _ = setup
    params = finetune.params(cfg, data=data, student=student, seed=42)
    params["finetune"].update(epochs=3, bf16=True)
    model = finetune.run(store, params)
    dev = read_log(model.path, "dev_metrics.json")
    assert dev["device"] == "cuda" and dev["bf16"] is True
    ev = evaluate.run(store, evaluate.params(cfg, model=model, data=data))
    metrics = read_metrics(ev.path)
    assert set(metrics) == {"normal", "implicit", "mams", "hard"}
    print("cuda finetune dev:", dev, "test:", {k: round(v["f1"], 4) for k, v in metrics.items()})


def test_teacher_generation_on_cuda(setup, tmp_path):
    """The transformers teacher backend on CUDA (bf16), with SmolLM2's architecture and tokenizer.

    The real weights are too large to carry to a lent GPU, so the model is SmolLM2's config with
    random weights (FSA_GPU_TEACHER_CONFIG: a folder with its config.json and tokenizer files).
    """
    import os

    from fsa_distill.tasks.generate import generate_shard
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = os.environ.get("FSA_GPU_TEACHER_CONFIG")
    if not source:
        pytest.skip("FSA_GPU_TEACHER_CONFIG is not set")
    store, cfg, data, _, _ = setup
    folder = tmp_path / "teacher"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    sentences = pq.read_table(Path(data.path) / "test.parquet").column("sentence").to_pylist()[:64]
    reviews = tmp_path / "reviews"
    reviews.mkdir()
    pq.write_table(
        pa.table(
            {
                "id": [f"r{i}" for i in range(64)],
                "text": sentences,
                "rating": [3.0] * 64,
                "domain": ["restaurants"] * 64,
                "source": ["rest14"] * 64,
            }
        ),
        reviews / "reviews.parquet",
    )
    review_art = Artifact(path=str(reviews), sha256=seal(reviews))
    teacher = {**cfg["teacher"], "model": str(folder), "max_reviews": 64, "shard_size": 128, "batch_size": 32,
               "max_new_tokens": 64}  # fmt: skip
    params = generate_shard.params({**cfg, "teacher": teacher}, reviews=review_art, pairs=(0, 128))
    out = generate_shard.run(store, params)
    stats = json.loads((Path(out.path) / "measured" / "timing.json").read_text())
    rows = pq.read_table(Path(out.path) / "generations.parquet")
    assert rows.num_rows == 128 and stats["device"].startswith("cuda")
    print("cuda teacher generation:", stats)
