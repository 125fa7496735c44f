#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): prune + heal + eval of SmolLM2 on CUDA, QLoRA, the fast scorer vs
# stock HFLM, and an FSDP heal on 2 GPUs where there are 2; one table at the end, JSON in runs/gpu-check*.
# On a fresh GPU machine: bash scripts/setup.sh first (TORCH_SPEC / PIP_EXTRA_INDEX_URL for a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
out="runs/gpu-check-$(date +%Y%m%d-%H%M%S)"
exec .venv/bin/python bench/gpu_check.py --out "$out" "$@"
