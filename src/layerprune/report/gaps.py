"""What pruning cost and what healing gave back, per measure: "gap closed" = (final - pruned) / (original -
pruned), the same formula for measures where higher is better (accuracy, ROUGE-L) and lower is better
(perplexity, KL): 0 = no recovery, 1 = back to the original, negative = worse than before healing."""

from __future__ import annotations

MIN_GAP = 1e-9  # a measure pruning did not move has no gap to close


def eval_measures(record: dict | None) -> dict[str, float]:
    """{measure: value} of an eval.json: task accuracies, perplexities, instruction-following KL and ROUGE-L."""
    if not record:
        return {}
    values = {}
    for task, scores in sorted(record.get("tasks", {}).items()):
        if "acc" in scores:
            values[f"{task} acc"] = scores["acc"]
    for text, scores in sorted(record.get("perplexity", {}).items()):
        values[f"{text} ppl"] = scores["ppl"]
    follow = record.get("instruction_following")
    if follow:
        values["instruction KL"] = follow["kl"]
        values["greedy ROUGE-L"] = follow["rouge_l"]
    return values


def gap_closed(original: float | None, pruned: float | None, final: float | None) -> float | None:
    if original is None or pruned is None or final is None or abs(original - pruned) < MIN_GAP:
        return None
    return (final - pruned) / (original - pruned)


def gap_table(original: dict | None, pruned: dict | None, final: dict | None) -> list[dict]:
    """One row per measure the three evaluations share: the three values and the gap closed."""
    o, p, f = eval_measures(original), eval_measures(pruned), eval_measures(final)
    rows = []
    for name in o:
        if name in p and name in f:
            rows.append({"measure": name, "original": o[name], "pruned": p[name], "final": f[name],
                         "gap_closed": gap_closed(o[name], p[name], f[name])})
    return rows


def gap_summary(rows: list[dict]) -> dict[str, float | None]:
    """Mean gap closed over the task accuracies, the perplexities, and instruction following (KL, ROUGE-L)."""
    def mean(kind) -> float | None:
        picked = [r["gap_closed"] for r in rows if kind(r["measure"]) and r["gap_closed"] is not None]
        return sum(picked) / len(picked) if picked else None

    return {"tasks": mean(lambda m: m.endswith(" acc")), "perplexity": mean(lambda m: m.endswith(" ppl")),
            "instruction following": mean(lambda m: m in ("instruction KL", "greedy ROUGE-L"))}


def gap_markdown(rows: list[dict]) -> list[str]:
    """The table as markdown lines, then one line of means."""
    if not rows:
        return []
    lines = ["What healing gave back (gap closed = (final - pruned) / (original - pruned)):", "",
             "| measure | original | pruned | final | gap closed |", "|---|---|---|---|---|"]
    for r in rows:
        closed = "-" if r["gap_closed"] is None else f"{r['gap_closed']:.0%}"
        lines.append(f"| {r['measure']} | {_value(r['original'])} | {_value(r['pruned'])} | {_value(r['final'])} | "
                     f"{closed} |")
    means = {k: v for k, v in gap_summary(rows).items() if v is not None}
    if means:
        lines += ["", "Mean gap closed: " + ", ".join(f"{k} {v:.0%}" for k, v in means.items()) + "."]
    return lines + [""]


def _value(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 10 else f"{value:.4f}"
