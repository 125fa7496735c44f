#!/usr/bin/env bash
# Set up layerprune and run the main job on the embedded default model (SmolLM2-135M-Instruct):
# examples/quickstart.yaml = score layers on calibration text, compare candidate drop-sets before healing,
# drop 25% of the layers, heal toward the unpruned model (distillation on C4 text and Dolly instructions),
# evaluate on ARC-e/PIQA/HellaSwag, reserved instructions, a reserved C4 slice and WikiText-2, benchmark,
# report the share of each gap that healing closed (healing has an
# 11-minute budget on any CPU and prints its plan first; docs/results.md has the measured total).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/layerprune run examples/quickstart.yaml "$@"
