"""How close `layerprune plan`'s peak-memory estimates come to the measured peaks, in memory, on real models.

For each model (default: the embedded SmolLM2-135M, and Gemma-3-270M) and each stage — block-influence
scores, healing with full weights, LoRA and distillation (a few steps: the peak is reached in the first),
and a WikiText-2 perplexity evaluation — a `layerprune` command runs in its own process (peak RSS = its
ru_maxrss), next to what `layerprune plan --json` predicts for the same settings. Target: within 25%.
Times name the CPU; the models are pruned by 25% first (on disk, not measured).

    python bench/plan_accuracy.py [--models smollm2-135m,gemma3-270m] [--workdir /tmp/layerprune-plan-acc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import cpu_kind  # noqa: E402  (bench/ is on sys.path when run as a script)

GiB = 2**30
HEAL = ["--max-steps", "3", "--batch-size", "4", "--max-length", "256", "--warmup-steps", "0"]


def layerprune(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "layerprune", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"layerprune {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def measure(args: list[str]) -> dict:
    """Wall time and peak RSS of one command, run from a fresh driver process (ru_maxrss of children)."""
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one(args: list[str]) -> None:
    start = time.perf_counter()
    layerprune(*args)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GiB
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_gib": peak}))


def planned(model: str, *extra: str) -> dict[str, float]:
    plan = json.loads(layerprune("plan", model, "--num-layers", "0", "--json", "--batch-size", "4",
                                 "--max-length", "256", *extra))
    return {row["stage"]: row["peak_gib"] for row in plan["stages"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--workdir", default="/tmp/layerprune-plan-acc")
    parser.add_argument("--one", default=None)
    parser.add_argument("--report", action="store_true", help="the last measurement against a fresh plan")
    args = parser.parse_args()
    if args.one:
        one(json.loads(args.one))
        return
    work = Path(args.workdir)
    if args.report:
        report(json.loads((work / "measured.json").read_text()), work)
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    for alias in args.models.split(","):
        pruned = work / f"{alias}-pruned"
        layerprune("prune", alias, "--ratio", "0.25", "--metric", "reverse-order", "--out", str(pruned))
        cases = [
            ("score", alias, ["score", alias, "--metric", "block-influence", "--n-samples", "10", "--seq-len", "256",
                              "--out", str(work / "s")],
             planned(alias)["score"]),
            ("heal: full", str(pruned), ["finetune", str(pruned), "--method", "full", "--data", "c4", *HEAL],
             planned(str(pruned), "--method", "full", "--adapter", "none")["heal"]),
            ("heal: LoRA", str(pruned), ["finetune", str(pruned), "--method", "lora", "--data", "c4", *HEAL],
             planned(str(pruned), "--method", "full", "--adapter", "lora")["heal"]),
            ("heal: distill", str(pruned), ["finetune", str(pruned), "--method", "distill", "--teacher", alias, *HEAL],
             max(planned(str(pruned), "--method", "distill", "--adapter", "none")["heal"],
                 planned(alias)["teacher pass"])),
            ("eval", str(pruned), ["eval", str(pruned), "--tasks", "none", "--ppl", "wikitext2", "--ppl-windows",
                                   "40", "--no-samples"], planned(str(pruned))["eval"]),
        ]
        for stage, _, command, estimate in cases:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            result = measure([*command, "--out", str(out)] if "--out" not in command else command)
            shutil.rmtree(work / "s", ignore_errors=True)
            rows.append({"model": alias, "stage": stage, **result, "plan_gib": estimate, "cpu": cpu_kind()})
            print(json.dumps(rows[-1]), flush=True)
    (work / "measured.json").write_text(json.dumps(rows, indent=2))
    print_table(rows)


def report(rows: list[dict], work: Path) -> None:
    """Re-plan every measured row (the pruned models are still in `work`) and print the table."""
    for row in rows:
        alias, pruned = row["model"], str(work / f"{row['model']}-pruned")
        row["plan_gib"] = {
            "score": lambda: planned(alias)["score"],
            "heal: full": lambda: planned(pruned, "--method", "full", "--adapter", "none")["heal"],
            "heal: LoRA": lambda: planned(pruned, "--method", "full", "--adapter", "lora")["heal"],
            "heal: distill": lambda: max(planned(pruned, "--method", "distill", "--adapter", "none")["heal"],
                                         planned(pruned, "--method", "distill")["teacher pass"]),
            "eval": lambda: planned(pruned)["eval"],
        }[row["stage"]]()
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print(f"\nCPU: {rows[0].get('cpu') or cpu_kind()}")
    print("| model | stage | wall | peak RSS | plan | plan / measured |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['seconds']:.0f} s | {r['peak_gib']:.2f} GiB | {r['plan_gib']:.2f} GiB "
              f"| {r['plan_gib'] / r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
