"""What users notice after pruning and healing SmolLM2-135M-Instruct: task accuracy, instruction following
and held-out perplexity, each as the share of the pruning gap that healing closed.

Every setting is (selection, healing recipe): the selection chooses 25% of the layers (8 of 30) as the
quickstart does, the recipe heals within the quickstart's time budget (a timed step fits the steps into
`max_minutes`), and every model is judged the same way on data nothing trained, calibrated or selected on:
the first 1,000 documents of ARC-e, PIQA and HellaSwag (acc), instruction following on 100 held-out Dolly
prompts (response KL to the unpruned model, greedy ROUGE-L; `dolly-heldout`, never trained on), and
perplexity on the reserved C4 slice and WikiText-2 (60 windows of 128 tokens).

    flock /tmp/layerprune-heavy.lock .venv/bin/python bench/users_notice.py --out runs/users-notice \\
        --settings auto-loss/default,auto-loss/mix31

Each model and evaluation is a folder under --out; a rerun skips what exists. The table is printed and
written to --out/users-notice.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ORIGINAL = "smollm2-135m"
METRICS = ["block-influence", "relative-magnitude", "angular", "reverse-order"]
CALIBRATION = {"source": "c4", "n_samples": 10, "seq_len": 128}
# How the 8 layers are chosen (PruneConfig fields); "auto-loss" is the quickstart's.
SELECTIONS: dict[str, dict] = {
    "auto-loss": {"metric": METRICS, "select": "auto"},
    "auto-kl": {"metric": METRICS, "select": "auto", "select_objective": "kl"},
    "search-loss": {"select": "search"},
    "search-kl": {"select": "search", "select_objective": "kl"},
    "auto-tasks": {"metric": METRICS, "select": "auto", "select_objective": "tasks"},
    "search-tasks": {"select": "search", "select_objective": "tasks"},
    "block-influence": {"metric": "block-influence", "select": "metric"},
}
# Healing recipes (HealConfig fields over the quickstart's healing stage).
QUICKSTART_HEAL = {"method": "distill", "data": "c4", "distill_alpha": 0.5, "max_steps": 150, "max_minutes": 11,
                   "batch_size": 4, "effective_batch_size": 4, "learning_rate": 3e-4}
RECIPES: dict[str, dict] = {
    "none": {},
    "default": {},
    "mix31": {"data": "c4:3+dolly:1"},  # a quarter of the rows are instructions with the chat template
    "mix11": {"data": "c4:1+dolly:1"},
    "hidden1": {"distill_hidden": 1.0},  # + the hidden states at the cuts (Minitron)
    "mix31-hidden1": {"data": "c4:3+dolly:1", "distill_hidden": 1.0},  # the healing defaults since 2026-12-07
    # + the instruction examples answered by the unpruned model (generated inside the time budget)
    "mix31-hidden1-teacher": {"data": "c4:3+dolly:1", "distill_hidden": 1.0, "responses": "teacher"},
    # the default recipe with fewer weights training, so more steps fit the budget
    "freeze-embeddings": {"data": "c4:3+dolly:1", "distill_hidden": 1.0, "freeze": "embeddings"},
    "freeze-prefix": {"data": "c4:3+dolly:1", "distill_hidden": 1.0, "freeze": "prefix"},
    # examples/thorough.yaml's healing: the default recipe for 40 minutes (up to 600 steps)
    "thorough": {"data": "c4:3+dolly:1", "distill_hidden": 1.0, "max_steps": 600, "max_minutes": 40},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def pruned_model(out: Path, selection: str) -> Path:
    from layerprune.api import prune_model

    folder = out / f"pruned-{selection}"
    if not (folder / "config.json").exists():
        prune_model(ORIGINAL, out=str(folder), dtype="fp32", ratio=0.25, calibration=CALIBRATION,
                    **SELECTIONS[selection])
    return folder


def healed_model(out: Path, pruned: Path, selection: str, recipe: str) -> tuple[Path, dict | None]:
    from layerprune.api import finetune_model

    if recipe == "none":
        return pruned, None
    folder = out / f"{selection}-{recipe}"
    if not (folder / "heal.json").exists():
        finetune_model(str(pruned), out=str(folder), overwrite=True, teacher=ORIGINAL,
                       **{**QUICKSTART_HEAL, **RECIPES[recipe]})
    return folder, json.loads((folder / "heal.json").read_text())


def evaluate(model: Path | str, out: Path, args) -> dict:
    from layerprune.evaluation.protocol import plan_eval, run_eval, write_eval
    from layerprune.models.loading import load_model

    if (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    plan = plan_eval(tasks=args.tasks, limit=args.limit, ppl="c4-heldout,wikitext2", ppl_windows=args.windows,
                     follow=args.follow, samples=False)
    result = run_eval(load_model(str(model), dtype=args.eval_dtype), plan)
    write_eval(out, result, plan, overwrite=True)
    return result.record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/users-notice")
    parser.add_argument("--settings", default="auto-loss/default", help="selection/recipe, comma separated")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    parser.add_argument("--limit", type=int, default=1000, help="documents per task")
    parser.add_argument("--windows", type=int, default=60, help="128-token perplexity windows per text")
    parser.add_argument("--follow", type=int, default=100, help="held-out instruction prompts")
    parser.add_argument("--eval-dtype", default="bf16", help="dtype of the evaluated models")
    args = parser.parse_args(argv)

    from layerprune.report.gaps import gap_summary, gap_table

    out = Path(args.out)
    original = evaluate(ORIGINAL, out / "original", args)
    rows = []
    for setting in args.settings.split(","):
        selection, recipe = setting.split("/")
        start = time.perf_counter()
        pruned = pruned_model(out, selection)
        before = evaluate(pruned, pruned / "eval", args)
        final_model, heal = healed_model(out, pruned, selection, recipe)
        final = evaluate(final_model, final_model / "eval", args) if heal else before
        gaps = gap_table(original, before, final)
        rows.append({"setting": setting, "dropped": json.loads((pruned / "config.json").read_text())
                     ["layerprune"]["dropped_layers"], "heal": _heal_cells(heal), "gaps": gaps,
                     "summary": gap_summary(gaps)})
        log(f"{setting}: done in {time.perf_counter() - start:.0f} s")
    (out / "users-notice.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (out / "users-notice.md").write_text(table)
    print(table)


def _heal_cells(heal: dict | None) -> dict | None:
    if heal is None:
        return None
    budget = (heal.get("notes") or {}).get("time_budget") or {}
    return {"steps": heal["steps"], "wanted": budget.get("steps_wanted"), "seconds": round(heal["seconds"]),
            "data": heal["data"]["source"]}


def markdown(rows: list[dict]) -> str:
    """One row per setting: each measure's final value with the gap closed, then the means."""
    measures = [g["measure"] for g in rows[0]["gaps"]] if rows else []
    head = ["setting", "dropped", "steps"] + measures + [f"gap closed: {k}" for k in rows[0]["summary"]] if rows \
        else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if rows:
        lines.append("| original | - | - | " + " | ".join(_number(g["original"]) for g in rows[0]["gaps"])
                     + " | | | |")
    for row in rows:
        heal = row["heal"]
        steps = "-" if heal is None else f"{heal['steps']} of {heal['wanted']}" if heal["wanted"] else str(heal["steps"])
        cells = [row["setting"], ",".join(map(str, row["dropped"])), steps]
        for gap in row["gaps"]:
            closed = "" if gap["gap_closed"] is None or heal is None else f" ({gap['gap_closed']:.0%})"
            cells.append(_number(gap["final"]) + closed)
        cells += ["-" if v is None or heal is None else f"{v:.0%}" for v in row["summary"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
