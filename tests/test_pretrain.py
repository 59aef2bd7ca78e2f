"""Student pretraining: the two objectives' examples, a real training run, and resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsa_distill.tasks.acquire import acquire
from fsa_distill.tasks.pretrain import pretrain
from fsa_distill.tasks.student import NEWLINE_TOKEN, init_student

from fsa_distill.artifacts import Artifact, seal
from fsa_distill.config import compose_config
from fsa_distill.models import load_seq2seq, read_log
from fsa_distill.pretraining import build_dataset, newline_tokens, random_spans_mask, span_corrupt
from tests.conftest import DATA_SOURCE

TINY = [
    "student.vocab_size=600", "student.d_model=32", "student.d_ff=64", "student.d_kv=8", "student.num_heads=2",
    "student.num_layers=1", "student.num_decoder_layers=1",
]  # fmt: skip


def mixtral_rows(n: int) -> list[dict]:
    path = Path(DATA_SOURCE) / "prompting/test/mixtral/test_500_4m8d.json"
    lines = path.read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line.lstrip("\ufeff")) for line in lines]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny student and a corpus of real teacher outputs (the paper's released Mixtral answers)."""
    store = tmp_path_factory.mktemp("pretrain")
    cfg = compose_config(TINY)
    data = acquire.run(store, acquire.params(compose_config([*TINY, "data.limit=50"]), dataset="atsa/rest14"))
    student = init_student.run(store, init_student.params(cfg, datasets=[data]))
    folder = store / "corpus"
    folder.mkdir()
    rows = mixtral_rows(24)
    table = pa.table({"review": [r["Text"] for r in rows], "output": [r["mixtral_response"] for r in rows]})
    pq.write_table(table, folder / "corpus.parquet")
    corpus = Artifact(path=str(folder), sha256=seal(folder))
    return store, cfg, student, corpus


def test_span_corruption_hides_spans_and_target_restores_them():
    rng = np.random.default_rng(0)
    ids = list(range(10, 110))
    sentinels = [1000 + i for i in range(100)]
    source, target = span_corrupt(ids, sentinels, eos=1, density=0.15, mean_span=3.0, rng=rng)
    assert source[-1] == 1 and target[-1] == 1
    # Re-inserting each target span at its sentinel gives back the original sequence.
    spans: dict[int, list[int]] = {}
    current = None
    for token in target[:-1]:
        if token in sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    restored = [t for s in source[:-1] for t in (spans[s] if s in sentinels else [s])]
    assert restored == ids
    hidden = sum(len(v) for v in spans.values())
    assert hidden == 15 and 3 <= len(spans) - 1 <= 6  # ~15% noise, spans of ~3 (+ closing sentinel)


def test_noise_mask_is_seeded():
    a = random_spans_mask(50, 0.15, 3.0, np.random.default_rng(7))
    b = random_spans_mask(50, 0.15, 3.0, np.random.default_rng(7))
    assert (a == b).all() and a.sum() == 8


def test_distill_examples_mark_newlines(setup):
    _, cfg, student, corpus = setup
    assert newline_tokens("a\n\nb ") == f"a {NEWLINE_TOKEN}  {NEWLINE_TOKEN} b"
    _, tokenizer = load_seq2seq(student.path)
    data = build_dataset("distill", Path(corpus.path) / "corpus.parquet", tokenizer, cfg["pretrain"])
    nl = tokenizer.convert_tokens_to_ids(NEWLINE_TOKEN)
    assert len(data) == 24 and any(nl in labels for labels in data["labels"])
    assert all(n == len(x) + len(y) for n, x, y in zip(data["length"], data["input_ids"], data["labels"], strict=True))
    # batch_rebalance sorts by the targets here: the teacher's texts are longer than the reviews
    assert data["rebalance_length"] == [len(y) for y in data["labels"]]
    spans = build_dataset("span_corruption", Path(corpus.path) / "corpus.parquet", tokenizer, cfg["pretrain"])
    assert spans["rebalance_length"] == [len(x) for x in spans["input_ids"]]  # masked reviews outweigh their spans


@pytest.mark.parametrize("objective", ["distill", "span_corruption"])
def test_pretrain_trains_and_saves_a_loadable_student(setup, objective):
    store, cfg, student, corpus = setup
    params = {"student": student, "corpus": corpus, "objective": objective,
              "pretrain": {**cfg["pretrain"], "max_steps": 3, "batch_size": 4, "max_target_length": 64}}  # fmt: skip
    model = pretrain.run(store, params)
    log = read_log(model.path, "pretrain_log.json")
    assert log["stats"]["objective"] == objective and log["stats"]["resumed_from"] is None
    assert [h["loss"] for h in log["history"] if "loss" in h]
    net, tok = load_seq2seq(model.path)
    assert net.config.vocab_size >= len(tok)


KILL_SCRIPT = """
import sys, json
from fsa_distill.tasks.pretrain import pretrain
from fsa_distill.artifacts import Artifact
params = json.loads(sys.argv[2])
params["student"] = Artifact(**params["student"]); params["corpus"] = Artifact(**params["corpus"])
pretrain.run(sys.argv[1], params)
"""


@pytest.mark.slow
def test_killed_pretrain_resumes_from_last_checkpoint(setup):
    store, cfg, student, corpus = setup
    params = {"student": student, "corpus": corpus, "objective": "distill",
              "pretrain": {**cfg["pretrain"], "max_steps": 60, "save_steps": 4, "batch_size": 8,
                           "max_target_length": 256}}  # fmt: skip
    scratch = pretrain.output_dir(store, params).with_name(pretrain.output_dir(store, params).name + ".scratch")
    payload = json.dumps({**params, "student": student.model_dump(), "corpus": corpus.model_dump()})
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(store), payload], env=dict(os.environ))
    deadline = time.monotonic() + 240
    # save_total_limit keeps only the newest checkpoints, so wait for any past step 8, not for one name
    while time.monotonic() < deadline and not any(int(p.name.split("-")[1]) >= 8 for p in scratch.glob("checkpoint-*")):
        assert proc.poll() is None, "the training process ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not pretrain.output_dir(store, params).exists()
    last = max(int(p.name.split("-")[1]) for p in scratch.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    model = pretrain.run(store, params)
    log = read_log(model.path, "pretrain_log.json")
    assert log["stats"]["resumed_from"] == f"checkpoint-{last}"
    assert not scratch.exists()


def test_resume_skips_a_checkpoint_killed_while_saving(tmp_path):
    from fsa_distill.models import last_checkpoint

    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    assert last_checkpoint(tmp_path / "none") is None
