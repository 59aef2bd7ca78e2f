"""The real config composes, the paper recipe is what the paper says, and typos fail clearly."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from fsa_distill.config import compose_config, seeds


def test_default_composes_to_the_embedded_default():
    cfg = compose_config([])
    assert cfg["student"]["pretrained"] is None
    assert cfg["data"]["datasets"] == ["atsa/rest14", "atsa/laptop14", "acsa/rest16", "acsa/laptop16"]
    assert cfg["tracking"]["uri"].startswith("sqlite:///")
    assert cfg["runner"]["kind"] == "thread"


def test_paper_experiment_holds_the_paper_recipe():
    cfg = compose_config(["experiment=paper"])
    ft = cfg["finetune"]
    assert cfg["student"]["pretrained"] == "google-t5/t5-base"
    assert (ft["learning_rate"], ft["epochs"], ft["batch_size"], ft["weight_decay"], ft["lr_scheduler"]) == (
        3e-4,
        20,
        16,
        0.01,
        "linear",
    )
    assert seeds(cfg) == [42, 52, 62, 72, 82, 142, 152, 162, 172, 182]
    assert cfg["evaluate"]["num_beams"] == 1 and cfg["evaluate"]["max_new_tokens"] == 100


def test_single_seed_shortcut_for_sweeps():
    assert seeds(compose_config(["finetune.seed=52"])) == [52]


def test_typo_in_override_is_rejected_with_the_key():
    with pytest.raises(ConfigCompositionException, match=r"finetune\.learning_rat"):
        compose_config(["finetune.learning_rat=0.1"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigCompositionException, match="epochs"):
        compose_config(["finetune.epochs=many"])


def test_unknown_group_option_lists_choices():
    with pytest.raises(ConfigCompositionException, match="tiny"):
        compose_config(["student=tinyy"])


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset 'atsa/rest15'"):
        compose_config(["data.datasets=[atsa/rest15]"])


def test_env_var_overrides_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv("FSA_DATA_SOURCE", str(tmp_path))
    assert compose_config([])["data"]["source"] == str(tmp_path)


def test_unknown_pretrain_objective_and_teacher_backend_are_rejected():
    with pytest.raises(ValueError, match=r"pretrain\.objectives: unknown 'mlm'"):
        compose_config(["pretrain.objectives=[distill,mlm]"])
    with pytest.raises(ValueError, match=r"teacher\.backend: 'ollama' is not one of"):
        compose_config(["teacher.backend=ollama"])


def test_served_and_run_overrides_merge_with_the_run_winning():
    from fsa_distill.config import merge_overrides

    served = ["experiment=smoke", "data.limit=40", "finetune.seed=42"]
    run = ["finetune.seed=52", "+extra.key=1"]
    merged = merge_overrides(served, run)
    assert merged == ["experiment=smoke", "data.limit=40", "finetune.seed=52", "+extra.key=1"]
    assert compose_config(["experiment=smoke", "finetune.seed=42", "finetune.seed=52"])["finetune"]["seed"] == 52


def test_run_names_say_what_changed_not_where_things_are():
    from fsa_distill.config import display_name

    overrides = ["workdir=/tmp/w", "data.source=/mirror", "finetune.seed=52", "teacher=vllm", "run_name=x"]
    assert display_name("default", overrides) == "default finetune.seed=52 teacher=vllm"
    assert display_name("default", []) == "default"
    assert len(display_name("d", [f"k{i}=v" for i in range(100)])) == 120


def test_smoke_experiment_shrinks_the_real_config():
    cfg = compose_config(["experiment=smoke"])
    assert cfg["run_name"] == "smoke" and cfg["finetune"]["epochs"] == 1 and cfg["data"]["limit"] == 12
    assert cfg["distill"]["enabled"] and cfg["pretrain"]["max_steps"] == 3
    assert cfg["teacher"]["name"] == compose_config([])["teacher"]["name"]  # the same teacher, fewer reviews


def test_deployment_form_offers_the_common_choices_and_composes_them_in_order():
    from fsa_distill.flows.pipeline import Choices, composed_overrides, fsa_distill
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(fsa_distill.fn).model_dump()
    assert {"overrides", "choices", "base_overrides"} <= set(schema["properties"])
    form = schema["definitions"]["Choices"]["properties"]
    assert "smollm2" in form["teacher"]["anyOf"][0]["enum"] and "smoke" in form["experiment"]["anyOf"][0]["enum"]
    parameters = {
        "base_overrides": ["experiment=smoke", "data.limit=40"],
        "choices": Choices(teacher="released", seeds=[42, 52]),
        "overrides": ["data.limit=20"],
    }
    composed = composed_overrides(parameters)
    assert composed == ["experiment=smoke", "teacher=released", "finetune.seeds=[42,52]", "data.limit=20"]
    cfg = compose_config(composed)
    assert cfg["data"]["limit"] == 20 and cfg["teacher"]["backend"] == "released"
    assert cfg["finetune"]["seeds"] == [42, 52]


def test_relative_source_folders_become_absolute_for_stages_run_elsewhere(tmp_path, monkeypatch):
    """A Dask or Prefect worker runs in its own directory: `../shared/data` must still mean the
    folder it meant where the run started (the Dask cluster test runs the README's relative path)."""
    from fsa_distill.config import absolute_sources

    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["data.source=../data/fsa", "reviews.root=reviews", "sentiment.source=/abs/sentiment"])
    cfg["data"]["custom"] = {"mine": {"source": "https://example.org/fsa"}}
    out = absolute_sources(cfg)
    assert out["data"]["source"] == str((tmp_path / "../data/fsa").resolve())
    assert out["reviews"]["root"] == str(tmp_path / "reviews")
    assert out["sentiment"]["source"] == "/abs/sentiment"
    assert out["sentiment"]["datasets"]["sst2"]["source"] == "/abs/sentiment/sst2"
    assert out["data"]["custom"]["mine"]["source"] == "https://example.org/fsa"  # a URL stays a URL
    assert cfg["data"]["source"] == "../data/fsa"  # the caller's config is not changed
