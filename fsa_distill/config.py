"""Typed (structured) configuration: the schema every composed config is checked against.

The YAML groups under `conf/` fill these dataclasses; a key that is not declared here (a typo)
fails composition with Hydra's "Key 'x' not in 'FinetuneConfig'" message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from fsa_distill import CONF_DIR


@dataclass
class DataConfig:
    """Where the benchmark comes from and which datasets a run uses."""

    source: str = MISSING
    datasets: list[str] = field(
        default_factory=lambda: ["atsa/rest14", "atsa/laptop14", "acsa/rest16", "acsa/laptop16"]
    )
    limit: int | None = None  # keep the first N rows of every split (shrunk runs and tests)
    timeout_s: float = 60.0


@dataclass
class StudentConfig:
    """A seq2seq student: a pretrained checkpoint (hub id or folder) or a T5 built from this config."""

    name: str = MISSING
    pretrained: str | None = None
    vocab_size: int = 4000
    d_model: int = 128
    d_ff: int = 512
    d_kv: int = 32
    num_layers: int = 2
    num_decoder_layers: int = 2
    num_heads: int = 4
    dropout_rate: float = 0.1
    init_seed: int = 0


@dataclass
class FinetuneConfig:
    """Fine-tuning recipe (Seq2SeqTrainer); one run per seed, best dev-F1 checkpoint kept."""

    seeds: list[int] = field(default_factory=lambda: [42, 52])
    seed: int | None = None  # a single seed, for sweeps: `-m finetune.seed=42,52`
    learning_rate: float = 1e-3
    epochs: int = 6
    batch_size: int = 16
    weight_decay: float = 0.01
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    max_source_length: int = 128
    max_target_length: int = 100
    eval_batch_size: int = 64
    bf16: bool = False


@dataclass
class BenchmarkConfig:
    """Evaluation: greedy generation over length-sorted batches, scored per test type."""

    test_types: list[str] = field(default_factory=lambda: ["normal", "implicit", "mams", "hard"])
    batch_size: int = 64
    max_new_tokens: int = 100
    num_beams: int = 1
    sort_by_length: bool = True


@dataclass
class TrackingConfig:
    """MLflow: where runs go and how fine-tuned students are registered."""

    uri: str = MISSING
    experiment: str = "fsa-distill"
    register_models: bool = True
    model_prefix: str = "fsa"


@dataclass
class RunnerConfig:
    """The Prefect task runner that maps stages: `thread` (default) or `dask` (prefect-dask)."""

    kind: str = "thread"
    workers: int = 2


@dataclass
class Config:
    """The whole run configuration."""

    workdir: str = MISSING
    run_name: str = "default"
    torch_threads: int = 0  # 0: torch's default
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)


def register() -> None:
    """Register the schema so that `conf/config.yaml` can name it in its defaults list."""
    ConfigStore.instance().store(name="schema", node=Config)


def compose_config(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose `conf/config.yaml` with overrides and return the resolved, validated plain dict.

    This is the one place outside the CLI where composition happens: a Prefect deployment passes
    overrides and gets exactly what `fsa-distill run` with the same overrides would run.
    """
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    return to_plain(cfg)


def to_plain(cfg: Any) -> dict[str, Any]:
    """Resolve interpolations, check against the schema and return a plain dict."""
    schema = OmegaConf.structured(Config)
    merged = OmegaConf.merge(schema, cfg)
    container = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    validate(container)
    return container


def validate(cfg: dict[str, Any]) -> None:
    """Checks the schema's types cannot express; each message names the key and the choices."""
    from benchmark.protocol import TEST_TYPES
    from benchmark.specs import DATASETS

    for name in cfg["data"]["datasets"]:
        if name not in DATASETS:
            raise ValueError(f"data.datasets: unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    for test_type in cfg["benchmark"]["test_types"]:
        if test_type not in TEST_TYPES:
            raise ValueError(f"benchmark.test_types: unknown {test_type!r}; known: {', '.join(TEST_TYPES)}")
    if cfg["runner"]["kind"] not in ("thread", "dask"):
        raise ValueError(f"runner.kind: {cfg['runner']['kind']!r} is not one of thread, dask")
    if not seeds(cfg):
        raise ValueError("finetune.seeds is empty")


def seeds(cfg: dict[str, Any]) -> list[int]:
    """The fine-tuning seeds of a run: `finetune.seed` when set, else `finetune.seeds`."""
    ft = cfg["finetune"]
    return [ft["seed"]] if ft.get("seed") is not None else list(ft["seeds"])
