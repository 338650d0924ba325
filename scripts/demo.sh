#!/usr/bin/env bash
# The README's first command: a fresh venv, the CPU torch wheel, naruto-lora, then `nlora demo`
# (cache latents -> cache text -> train -> sample --compare on the built-in tiny default).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NLORA_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# Install torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "${NLORA_TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e .
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
nlora demo "$@"
