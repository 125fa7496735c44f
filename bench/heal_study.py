"""Healing study on SmolLM2-135M-Instruct minus its block-influence drop-set (layers 12-17, 25, 26).

Each recipe heals the same pruned model within about the same CPU time (its step count is set from a
measured seconds-per-step), then every model is evaluated on text no stage ever trained or calibrated on:
the reserved C4 slice (`c4-heldout`, documents 1200-1499 of the bundled sample), WikiText-2, and the first
N documents of ARC-e / PIQA / HellaSwag (the same documents for every row), plus generation samples.

    flock /tmp/layerprune-heavy.lock .venv/bin/python bench/heal_study.py --out runs/heal-study \
        --recipes none,lora-dolly,distill,distill-lora,replace,replace+distill --minutes 4 \
        --tasks arc_easy --limit 200 --windows 50 --eval-dtype bf16

Every model and evaluation is a folder under --out; rerunning skips what exists. The table is printed and
written to --out/heal-study.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DROP = [12, 13, 14, 15, 16, 17, 25, 26]  # block influence on 10 x 128 tokens of bundled C4
# Recipes: a list of healing stages (HealConfig fields). `steps_per_minute` turns the time budget into
# max_steps; measured on 2 idle cores (bf16 autocast, fp32 master weights).
# Each stage names init "none": the replacement is its own recipe stage here, so every row says what it ran.
RECIPES: dict[str, list[dict]] = {
    "none": [],
    "lora-dolly": [{"method": "lora", "init": "none", "data": "dolly", "max_length": 256, "batch_size": 8, "effective_batch_size": 8,
                    "learning_rate": 1e-4, "warmup_steps": 4}],
    "partial-dolly": [{"method": "partial", "init": "none", "data": "dolly", "max_length": 256, "batch_size": 8,
                       "effective_batch_size": 8, "learning_rate": 1e-4, "warmup_steps": 4}],
    "cpt": [{"method": "cpt", "init": "none", "data": "c4", "max_length": 256, "batch_size": 4, "effective_batch_size": 4,
             "learning_rate": 1e-4, "warmup_steps": 4}],
    "distill": [{"method": "distill", "init": "none", "data": "c4", "max_length": 256, "batch_size": 4, "effective_batch_size": 4,
                 "learning_rate": 1e-4, "warmup_steps": 4, "distill_alpha": 1.0}],  # KL only
    "distill-lora": [{"method": "distill", "init": "none", "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "data": "c4",
                      "max_length": 256, "batch_size": 4, "effective_batch_size": 4, "learning_rate": 5e-4,
                      "warmup_steps": 4, "distill_alpha": 0.5}],
    "replace": [{"method": "replace", "data": "c4", "max_length": 256, "batch_size": 8, "max_samples": 64}],
    "block-local": [{"method": "block-local", "init": "none", "data": "c4", "max_length": 256, "batch_size": 4, "max_samples": 64,
                     "learning_rate": 1e-4}],
}
RECIPES["distill-full-kl"] = [{**RECIPES["distill"][0], "distill_top_k": None}]  # the teacher runs every step
RECIPES["distill-noclip"] = [{**RECIPES["distill"][0], "max_grad_norm": 0.0}]
RECIPES["cpt-noclip"] = [{**RECIPES["cpt"][0], "max_grad_norm": 0.0}]
RECIPES["distill-ce"] = [{**RECIPES["distill"][0], "distill_alpha": 0.5}]  # half KL, half CE on the text
RECIPES["default"] = [{"method": "distill", "max_steps": 150}]  # HealConfig's defaults (what `finetune` runs)
RECIPES["distill-ce-init"] = [{**RECIPES["distill-ce"][0], "init": "replace"}]  # replacement first, then KL + CE
RECIPES["distill-ce-lr3e-4"] = [{**RECIPES["distill-ce"][0], "learning_rate": 3e-4}]
RECIPES["distill-ce-lr6e-4"] = [{**RECIPES["distill-ce"][0], "learning_rate": 6e-4}]
RECIPES["cpt-lr3e-4"] = [{**RECIPES["cpt"][0], "learning_rate": 3e-4}]
RECIPES["distill-lr3e-4"] = [{**RECIPES["distill"][0], "learning_rate": 3e-4}]
RECIPES["replace+distill"] = RECIPES["replace"] + RECIPES["distill"]
RECIPES["block-local+distill"] = RECIPES["block-local"] + RECIPES["distill"]
PROMPTS = ["The capital of France is", "Here is a short poem about the sea:", "To make a cup of tea, first"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def seconds_per_step(stage: dict, model_dir: Path, teacher: str, probe_dir: Path) -> float:
    """Seconds per optimizer step of a stage, from 3 timed steps after 1 warm-up (teacher cache excluded)."""
    from layerprune.api import finetune_model

    times = []
    for steps in (1, 4):
        out = probe_dir / f"probe-{stage['method']}-{steps}"
        result, _ = finetune_model(str(model_dir), out=str(out), overwrite=True,
                                   **{**stage, "max_steps": steps, "warmup_steps": 0, "teacher": teacher})
        times.append(result.seconds - result.notes.get("teacher_targets", {}).get("seconds", 0.0))
    return max((times[1] - times[0]) / 3, 0.05)


def heal_recipe(name: str, pruned: Path, original: str, out: Path, minutes: float,
                steps: int | None = None) -> tuple[Path, dict]:
    from layerprune.api import finetune_model

    ref, info = pruned, {"stages": []}
    for number, stage in enumerate(RECIPES[name], 1):
        target = out / f"{name}" / f"stage-{number}"
        if (target / "heal.json").exists():
            record = json.loads((target / "heal.json").read_text())
        else:
            stage = {**stage, "teacher": original}
            if stage["method"] not in ("replace",) and steps:
                stage["max_steps"] = steps
            elif stage["method"] not in ("replace",):
                per_step = seconds_per_step(stage, ref, original, out / "probes")
                budget = minutes * 60 / max(1, sum(1 for s in RECIPES[name] if s["method"] != "replace"))
                stage["max_steps"] = max(1, int(budget / per_step))
                log(f"{name} stage {number}: {per_step:.2f} s/step -> {stage['max_steps']} steps")
            result, _ = finetune_model(str(ref), out=str(target), overwrite=True, **stage)
            record = json.loads((target / "heal.json").read_text())
        info["stages"].append({"method": record["method"], "steps": record["steps"], "seconds": record["seconds"]})
        ref = target
    return ref, info


def evaluate(model_dir: Path | str, out: Path, args) -> dict:
    from layerprune.evaluation.protocol import plan_eval, run_eval, write_eval
    from layerprune.models.loading import load_model

    if (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    plan = plan_eval(tasks=args.tasks if args.limit else "", ppl="c4-heldout,wikitext2", ppl_windows=args.windows,
                     limit=args.limit or None, samples=True, max_new_tokens=30)
    loaded = load_model(str(model_dir), dtype=args.eval_dtype)
    result = run_eval(loaded, plan)
    write_eval(out, result, plan, overwrite=True)
    return result.record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/heal-study")
    parser.add_argument("--recipes", default="none,lora-dolly,cpt,distill,distill-lora,replace,block-local,"
                                             "replace+distill")
    parser.add_argument("--minutes", type=float, default=5.0, help="CPU minutes of training per recipe")
    parser.add_argument("--steps", type=int, default=None, help="a fixed step count per training stage instead")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag", help="zero-shot tasks")
    parser.add_argument("--limit", type=int, default=500, help="documents per task (0: perplexity only)")
    parser.add_argument("--windows", type=int, default=200, help="128-token perplexity windows per text")
    parser.add_argument("--eval-dtype", default="fp32", help="dtype of the evaluated models (bf16: ~3x faster on CPU)")
    args = parser.parse_args(argv)

    from layerprune.api import prune_model

    out = Path(args.out)
    original = "smollm2-135m"
    pruned = out / "pruned"
    if not pruned.exists():
        prune_model(original, out=str(pruned), drop=DROP, dtype="fp32")
    rows = {"original": evaluate(original, out / "eval-original", args)}
    for name in args.recipes.split(","):
        start = time.perf_counter()
        final, info = heal_recipe(name, pruned, original, out, args.minutes, args.steps)
        record = evaluate(final, out / name / "eval", args)
        record["heal"] = info
        rows[name] = record
        log(f"{name}: done in {time.perf_counter() - start:.0f} s")
    table = markdown(rows)
    (out / "heal-study.md").write_text(table)
    print(table)


def markdown(rows: dict) -> str:
    base = rows["original"]["perplexity"]
    pruned = rows.get("none", {}).get("perplexity")
    texts = list(base)
    tasks = [t for t in rows["original"].get("tasks", {}) if "acc" in rows["original"]["tasks"][t]]
    head = ["recipe", "train s"] + [f"{t} ppl (gap closed)" for t in texts] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, record in rows.items():
        seconds = sum(s["seconds"] for s in record.get("heal", {}).get("stages", []))
        cells = [name, f"{seconds:.0f}" if seconds else "-"]
        for text in texts:
            ppl = record["perplexity"][text]["ppl"]
            closed = ""
            if pruned and name not in ("original", "none"):
                gap = pruned[text]["ppl"] - base[text]["ppl"]
                closed = f" ({100 * (pruned[text]['ppl'] - ppl) / gap:.0f}%)"
            cells.append(f"{ppl:.1f}{closed}")
        cells += [f"{record['tasks'][t]['acc']:.3f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
