#!/usr/bin/env bash
# Set up layerprune and run the main job on the embedded default model (SmolLM2-135M-Instruct):
# examples/quickstart.yaml = score layers on calibration text, compare candidate drop-sets before healing,
# drop 25% of the layers, heal (LoRA r=8 merged, lr 1e-4, Dolly subset), evaluate, benchmark, report.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/layerprune run examples/quickstart.yaml "$@"
