"""report.md of a run folder, built only from the files the stages wrote."""

from __future__ import annotations

from pathlib import Path

from layerprune.files.outputs import read_json
from layerprune.models.provenance_labels import describe_quality_target, objective_label
from layerprune.report.gaps import gap_markdown, gap_summary, gap_table

ROWS = (("original", "eval-original"), ("pruned, before healing", "eval-pruned"), ("final", "eval-final"))


def _granularity(run_dir: Path) -> str:
    import yaml

    config = run_dir / "config.yaml"
    data = yaml.safe_load(config.read_text()) if config.exists() else None
    return ((data or {}).get("prune") or {}).get("granularity") or "block"


def _expert_lines(experts) -> list[str]:
    """Mixture-of-experts runs: the experts each MoE layer lost (ORIGINAL indices)."""
    if not isinstance(experts, dict) or not isinstance(experts.get("dropped"), dict):
        return []
    per_layer = "; ".join(f"layer {layer}: {', '.join(map(str, gone))}" for layer, gone in experts["dropped"].items())
    return [f"Removed **{experts.get('experts_per_layer')} experts** from every MoE layer (chosen by "
            f"{experts.get('chosen_by')}; original indices): {per_layer}.", ""]


def run_report(run_dir: Path, final_ref: str | None = None) -> tuple[str, dict]:
    """(markdown, summary dict) from selection.json, eval-*/eval.json, healed-*/heal.json, bench/bench.json."""
    run_dir = Path(run_dir)
    lines = [f"# layerprune run: {run_dir.name}", ""]
    summary: dict = {"run": str(run_dir), "final_model": final_ref}
    selection = read_json(run_dir / "selection.json", missing_ok=True)
    if selection:
        what = {"attention": "Removed the attention of", "mlp": "Removed the MLP of"}.get(
            _granularity(run_dir), "Dropped")
        if selection["dropped"]:
            lines += [f"{what} original layers **{', '.join(map(str, selection['dropped']))}** "
                      f"(chosen by {selection['chosen_by']}).", ""]
        summary["dropped"] = selection["dropped"]
        lines += _expert_lines(selection.get("experts"))
        if selection.get("candidates"):
            label = objective_label((selection.get("validation") or {}).get("objective"))
            lines += [f"Candidates compared before healing ({label} on {_judged_on(selection)}):", "",
                      f"| metric | would drop | {label} |", "|---|---|---|"]
            for name, c in sorted(selection["candidates"].items(), key=lambda kv: kv[1]["validation_loss"]):
                lines.append(f"| {name} | {','.join(map(str, c['dropped']))} | {c['validation_loss']:.4f} |")
            lines.append("")
        lines += _search_lines(selection)
    rounds = sorted((run_dir / "rounds").glob("round-*/done.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if rounds:
        lines += ["Iterative rounds: " + "; ".join(
            f"{p.parent.name}: {','.join(map(str, read_json(p)['dropped']))}" for p in rounds), ""]
        summary["rounds"] = [read_json(p)["dropped"] for p in rounds]
    evals = {label: read_json(run_dir / folder / "eval.json", missing_ok=True) for label, folder in ROWS}
    evals = {label: e for label, e in evals.items() if e}
    if evals:
        texts = sorted({t for e in evals.values() for t in e.get("perplexity", {})})
        tasks = sorted({t for e in evals.values() for t in e.get("tasks", {})})
        header = ["model", "layers", "parameters", *(f"{t} ppl" for t in texts),
                  *("HumanEval pass@1" if t == "humaneval" else t for t in tasks)]
        if tasks:
            header.append("Avg Acc")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        summary["eval"] = {}
        for label, e in evals.items():
            m = e["model"]
            cells = [label, str(m["layers"]), f"{m['parameters']:,}"]
            cells += [f"{e['perplexity'][t]['ppl']:.4g}" if t in e.get("perplexity", {}) else "-" for t in texts]
            cells += [f"{e['tasks'][t].get('acc', e['tasks'][t].get('pass@1')):.4f}" if t in e.get("tasks", {})
                      else "-" for t in tasks]
            if tasks:
                avg = (e.get("average") or {}).get("value")
                cells.append(f"{avg:.4f}" if avg is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
            summary["eval"][label] = {"ppl": {t: e["perplexity"][t]["ppl"] for t in e.get("perplexity", {})},
                                      "avg_acc": (e.get("average") or {}).get("value"), "layers": m["layers"],
                                      "parameters": m["parameters"]}
        lines.append("")

        gaps = gap_table(*(evals.get(label) for label, _ in ROWS))
        lines += gap_markdown(gaps)
        if gaps:
            summary["gap_closed"] = {"measures": {r["measure"]: r["gap_closed"] for r in gaps}, **gap_summary(gaps)}
    heals = sorted(run_dir.glob("healed-*/heal.json"))
    if heals:
        lines += ["| healing stage | method | data | steps | trainable params | time (s) | computed in | final loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for path in heals:
            h = read_json(path)
            notes = h.get("notes") or {}
            lines.append(f"| {path.parent.name} | {h['method']} | {h['data']['source']} | {_steps(h)} | "
                         f"{h['trainable_params']:,} | {h['seconds']:.0f} | {notes.get('compute', {}).get('dtype', '-')} | "
                         f"{'-' if h['final_loss'] is None else format(h['final_loss'], '.4f')} |")
        lines.append("")
    bench_md = run_dir / "bench" / "bench.md"
    if bench_md.exists():
        lines += ["## Efficiency (original vs final)", "", bench_md.read_text(), ""]
    lines += ["Files: config.yaml, versions.json, scores.json, selection.json, pruned/, healed-*/ (model, heal.json, "
              "loss.csv/png), eval-*/ (eval.json, eval.md, samples.json), bench/ (bench.json/md/png), run.json.", ""]
    return "\n".join(lines), summary


def _judged_on(selection: dict) -> str:
    """The text a selection's candidates were judged on, in words."""
    source = ((selection.get("validation") or {}).get("data") or {}).get("source")
    return "task documents that evaluation does not read" if source == "tasks" else "held-out calibration text"


def _steps(heal: dict) -> str:
    """The steps a heal ran, and under a time budget how many were wanted."""
    budget = (heal.get("notes") or {}).get("time_budget")
    if not budget:
        return str(heal["steps"])
    return f"{heal['steps']} of {budget['steps_wanted']} ({budget['minutes']:.3g}-min budget)"


def _search_lines(selection: dict) -> list[str]:
    """The drop-set search's path (select search) and the quality target, as markdown lines."""
    lines = []
    validation = selection.get("validation") or {}
    constraints = selection.get("constraints") or {}
    target = describe_quality_target(constraints)
    if target:
        lines += [f"Quality target: {target}; the largest drop-set within it removes {constraints.get('num_layers')} "
                  f"layers (perplexity ratio {constraints.get('validation_ppl_ratio', float('nan')):.3f}).", ""]
    search = selection.get("search")
    if not search:
        return lines
    unpruned = validation.get("unpruned", validation.get("unpruned_loss"))
    label = objective_label(validation.get("objective"))
    lines += [f"Drop-set search (beam {search.get('beam', 1)}{', swap pass' if search.get('swap') else ''}): each step "
              f"removes the layer whose removal raises the {label} least"
              + (f" (unpruned {unpruned:.4f})" if unpruned is not None else "") + ".", "",
              f"| step | drop-set | {label} | candidates |", "|---|---|---|---|"]
    for step in search.get("path", []):
        lines.append(f"| {step['k']} | {','.join(map(str, step['dropped']))} | {step['loss']:.4f} | "
                     f"{len(step.get('candidates', []))} |")
    for swap in search.get("swaps", []):
        lines.append(f"| swap | layer {swap['restored']} back, {swap['removed']} out | {swap['loss']:.4f} | "
                     f"{swap.get('tried', '')} |")
    if validation.get("block_forwards"):
        lines.append(f"\n{validation['block_forwards']:,} block forwards ({validation.get('naive_block_forwards', 0):,} "
                     "for a search without cached states).")
    return lines + [""]
