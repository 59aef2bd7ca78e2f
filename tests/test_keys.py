"""Stage keys are right by construction: code versions are computed, params come from each stage module.

The code tests edit real project files and restore them, so they prove what a user's edit does.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fsa_distill.tasks.stage import Stage

from fsa_distill import codehash
from fsa_distill.artifacts import Artifact
from fsa_distill.config import compose_config

STAGE_MODULES = [
    "fsa_distill.tasks.acquire",
    "fsa_distill.tasks.student",
    "fsa_distill.tasks.reviews",
    "fsa_distill.tasks.generate",
    "fsa_distill.tasks.teachers.released",
    "fsa_distill.tasks.clean",
    "fsa_distill.tasks.pretrain",
    "fsa_distill.tasks.finetune",
    "fsa_distill.tasks.evaluate",
    "fsa_distill.tasks.report",
    "fsa_distill.tasks.teacher_fsa",
    "fsa_distill.tasks.teacher_sentiment",
    "fsa_distill.tasks.zeroshot",
]


def stages() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    for name in STAGE_MODULES:
        for value in vars(importlib.import_module(name)).values():
            if isinstance(value, Stage):
                found[value.name] = value
    return found


def versions() -> dict[str, str]:
    return {name: s.code_version for name, s in stages().items()}


@contextmanager
def edited(module: str, transform) -> Iterator[None]:
    """Rewrite a project module's source for the duration of the block."""
    path = Path(importlib.import_module(module).__file__)
    original = path.read_text(encoding="utf-8")
    try:
        path.write_text(transform(original), encoding="utf-8")
        yield
    finally:
        path.write_text(original, encoding="utf-8")


def test_every_stage_has_a_params_function():
    assert set(stages()) >= {"acquire", "student", "reviews", "generate", "released", "clean", "pretrain"}
    for stage in stages().values():
        assert stage._params is not None, f"{stage.name} has no @{stage.name}.configure params function"


def test_model_loading_and_teacher_records_are_in_the_closures_that_use_them():
    closures = {name: s.code_closure for name, s in stages().items()}
    for name in ("finetune", "evaluate", "pretrain", "student"):
        assert "fsa_distill.models" in closures[name], name
    assert "fsa_distill.tasks.teachers.common" in closures["clean"]
    assert "fsa_distill.benchmark.protocol" in closures["evaluate"]
    # only the code a stage runs: the teacher's backends are keyed by name (backend_code), students'
    # model loading is not the teacher's code
    for name in ("zeroshot", "teacher_fsa", "teacher_sentiment", "generate"):
        assert "fsa_distill.tasks.teachers.openai_compat" not in closures[name], name
        assert "fsa_distill.tasks.teachers.hf" not in closures[name], name
    assert "fsa_distill.models" not in closures["teacher_fsa"]
    # the runner is no stage's logic: editing it must not drop every cache
    assert all("fsa_distill.tasks.stage" not in c for c in closures.values())


def test_editing_a_dependency_rekeys_exactly_the_stages_that_import_it():
    before = versions()
    importers = {name for name, s in stages().items() if "fsa_distill.models" in s.code_closure}
    with edited("fsa_distill.models", lambda src: src + "\n\ndef _probe() -> int:\n    return 1\n"):
        after = versions()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == importers
    assert "acquire" not in changed and "reviews" not in changed
    assert versions() == before


def test_comment_and_docstring_edits_rekey_nothing():
    before = versions()

    def cosmetic(src: str) -> str:
        src = src.replace('"""', '"""Reworded. ', 1)  # the module docstring
        return "# a new comment\n" + src.replace("\n\n\n", "\n\n\n# another comment\n", 1)

    with edited("fsa_distill.benchmark.protocol", cosmetic):
        assert versions() == before


def test_a_code_dependency_no_import_shows_is_declared():
    assert "fsa_distill.tasks.vllm_worker" in codehash.closure(["fsa_distill.tasks.teachers.vllm"])


@pytest.fixture(scope="module")
def cfg() -> dict:
    return compose_config([])


def test_student_checkpoint_is_keyed_by_content_not_path(tmp_path, cfg):
    from fsa_distill.tasks.student import init_student

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"d_model": 8}')
    keys = [
        init_student.key(
            init_student.params({**cfg, "student": {**cfg["student"], "pretrained": str(tmp_path / n)}}, datasets=[])
        )
        for n in ("one", "two")
    ]
    assert keys[0] == keys[1]
    (tmp_path / "two" / "config.json").write_text('{"d_model": 16}')
    changed = init_student.params(
        {**cfg, "student": {**cfg["student"], "pretrained": str(tmp_path / "two")}}, datasets=[]
    )
    assert init_student.key(changed) != keys[0]


def test_pretraining_arms_key_only_their_own_recipe(cfg):
    from fsa_distill.tasks.pretrain import pretrain

    art = Artifact(path="/x", sha256="0" * 64)

    def key(objective: str, **changes) -> str:
        c = {**cfg, "pretrain": {**cfg["pretrain"], **changes}}
        return pretrain.key(pretrain.params(c, student=art, corpus=art, objective=objective))

    assert key("distill") == key("distill", noise_density=0.3, mean_span_length=5.0, objectives=["distill"])
    assert key("span_corruption") != key("span_corruption", noise_density=0.3)
    assert key("distill") == key("distill", save_steps=7)


def test_evaluation_reads_inputs_at_the_fine_tuning_length(cfg):
    from fsa_distill.tasks.evaluate import evaluate

    art = Artifact(path="/x", sha256="0" * 64)
    params = evaluate.params(cfg, model=art, data=art)
    assert params["max_source_length"] == cfg["finetune"]["max_source_length"]
    longer = evaluate.params({**cfg, "finetune": {**cfg["finetune"], "max_source_length": 512}}, model=art, data=art)
    assert evaluate.key(longer) != evaluate.key(params)


def test_the_benchmark_mirror_location_is_not_in_the_key(cfg):
    from fsa_distill.tasks.acquire import acquire

    moved = {**cfg, "data": {**cfg["data"], "source": "/somewhere/else"}}
    assert acquire.key(acquire.params(cfg, dataset="atsa/rest14")) == acquire.key(
        acquire.params(moved, dataset="atsa/rest14")
    )


def test_the_benchmark_imports_no_stage():
    for module in ("protocol", "scoring", "specs", "records", "sentiment", "icl"):
        imported = codehash.closure([f"fsa_distill.benchmark.{module}"])
        assert not [m for m in imported if m.startswith("fsa_distill.tasks")], module


def test_every_package_folder_installs_under_the_project_namespace():
    import tomllib

    from fsa_distill import ROOT

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setup["package-dir"]
    # the one exception: Hydra finds launcher plugins only in its `hydra_plugins` namespace, under a
    # name of our own (and never with a `hydra_plugins/__init__.py`, which would hide other plugins)
    assert all(name.startswith(("fsa_distill", "hydra_plugins.fsa_distill_")) for name in setup["packages"])
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists()
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == set(setup["packages"])  # a new sub-package that is not listed would not install
