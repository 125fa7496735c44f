#!/usr/bin/env bash
# Every healing method from the CLI on SmolLM2-135M pruned by 8 layers (block-influence's choice),
# same Dolly subset and step budget for all; perplexity (and a few zero-shot tasks for partial vs
# LoRA) before and after. Prints one markdown table. Usage: bash bench/heal_methods.sh [OUT_DIR] [N_SAMPLES]
set -euo pipefail
OUT=${1:-runs/heal-methods}
N=${2:-160}
LP=".venv/bin/layerprune"
EVAL=(--ppl wikitext2 --ppl-windows 50 --no-samples)
TASKS=(--tasks arc_easy,hellaswag,piqa --limit 100)
mkdir -p "$OUT"
[ -d "$OUT/pruned" ] || $LP prune smollm2-135m --drop 12-17,25,26 --out "$OUT/pruned"
[ -f "$OUT/eval-pruned/eval.json" ] || $LP eval "$OUT/pruned" "${EVAL[@]}" "${TASKS[@]}" --out "$OUT/eval-pruned"
COMMON=(--data dolly --max-samples "$N" --max-length 256 --lr 1e-4 --epochs 1 --batch-size 8
        --effective-batch-size 8 --warmup-steps 2)
for method in partial lora qlora full cpt distill; do
  extra=()
  [ "$method" = cpt ] && extra=(--data c4)  # raw text (bundled C4 validation); same number of sequences
  [ "$method" = distill ] && extra=(--teacher smollm2-135m)
  if [ ! -d "$OUT/$method" ]; then
    $LP finetune "$OUT/pruned" --method "$method" "${COMMON[@]}" "${extra[@]}" --out "$OUT/$method"
  fi
  tasks=(--tasks none)
  case $method in partial|lora) tasks=("${TASKS[@]}");; esac
  [ -f "$OUT/eval-$method/eval.json" ] || $LP eval "$OUT/$method" "${EVAL[@]}" "${tasks[@]}" --out "$OUT/eval-$method"
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def ev(name):
    e = json.loads((out / name / "eval.json").read_text())
    acc = {t: v["acc"] for t, v in e.get("tasks", {}).items() if "acc" in v}
    return e["perplexity"]["wikitext2"]["ppl"], acc, e["model"]["parameters"]
ppl, acc, params = ev("eval-pruned")
tasks = sorted(acc)
print("| model | trainable params | steps | time (s) | final loss | wikitext2 ppl | params | " + " | ".join(tasks) + " |")
print("|" + "---|" * (7 + len(tasks)))
print(f"| pruned, not healed | - | - | - | - | {ppl:.1f} | {params/1e6:.1f}M | " + " | ".join(f"{acc[t]:.3f}" for t in tasks) + " |")
for m in ("partial", "lora", "qlora", "full", "cpt", "distill"):
    if not (out / f"eval-{m}" / "eval.json").exists():
        continue
    h = json.loads((out / m / "heal.json").read_text())
    p, a, n = ev(f"eval-{m}")
    print(f"| {m} | {h['trainable_params']/1e6:.2f}M | {h['steps']} | {h['seconds']:.0f} | {h['final_loss']:.3f} | {p:.1f} | {n/1e6:.1f}M | "
          + " | ".join(f"{a[t]:.3f}" if t in a else "-" for t in tasks) + " |")
PY
