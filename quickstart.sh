#!/usr/bin/env bash
# Set up layerprune and run the main job on the embedded default model (SmolLM2-135M-Instruct):
# score its 30 layers on calibration text, drop the 25% least important, save a stock checkpoint,
# and show parameters and a generation sample before and after.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/layerprune prune smollm2-135m --ratio 0.25 --metric block-influence \
  --out runs/quickstart/smollm2-pruned --overwrite \
  --sample "What is the capital of France?" --sample "Give three tips for staying healthy." "$@"
