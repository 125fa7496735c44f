#!/usr/bin/env bash
# Create .venv (once) and install layerprune with its test extras.
# torch is installed first and pinned in every pip call, so no dependency can pull another build.
# GPU users: TORCH_SPEC="torch==2.13.0" with your CUDA index, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
# LAYERPRUNE_EXTRAS=llamacpp (CI sets it) also builds llama.cpp's Python bindings for `layerprune generate`.
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" -e ".[test${LAYERPRUNE_EXTRAS:+,$LAYERPRUNE_EXTRAS}]"
echo "layerprune installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
