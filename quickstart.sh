#!/usr/bin/env bash
# Set up layerprune and run the main job on the embedded default model (SmolLM2-135M-Instruct):
# examples/quickstart.yaml = score layers on calibration text, compare candidate drop-sets before healing,
# drop 25% of the layers, heal toward the unpruned model (distillation on general C4 text), evaluate on a
# reserved C4 slice and WikiText-2, benchmark, report (12-14 minutes after setup on 2 CPU cores, with or
# without native bf16: healing has an 11-minute budget and prints its plan first).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/layerprune run examples/quickstart.yaml "$@"
