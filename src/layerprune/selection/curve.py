"""The trade-off curve: how many layers, and which. Validation perplexity against layers removed.

For k = 0..K, each metric's own drop-set of size k (a block metric such as angular: its best block of
k) and the greedy search path (search.py) are measured on held-out calibration text, the text select
auto and select search judge on. All work is shared: the metrics are scored once, one DropSetLosses
runs the intact model once and resumes every candidate from cached hidden states, and a drop-set that
two selections share is measured once. k = 0 is the unpruned model.

The knee of a selection is the largest k before its loss first rises by more than `knee_slope` nats
for one more layer; with a quality target, the chosen k is the largest k before its loss first exceeds
the target (the rule `prune --max-loss-increase / --max-ppl-ratio` uses).

With `select_objective` kl or tasks (objectives.py), each row's "loss" is that objective's value (the KL to
the unpruned model, or the gold answers' loss on task documents) and "perplexity" its exponential.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

from torch import nn

from layerprune.data.calibration import load_calibration_for
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import atomic_output_dir, write_json
from layerprune.files.plotting import pyplot, save_png
from layerprune.importance import compute_many, get_metric
from layerprune.models.provenance_labels import get_objective
from layerprune.models.surgery import kept_layers
from layerprune.selection.budgets import most_within
from layerprune.selection.config import SEARCH
from layerprune.selection.drop_set_losses import DropSetLosses
from layerprune.selection.objectives import objective_validation
from layerprune.selection.scores import metric_requests
from layerprune.selection.search import MetricPath, SearchPath, allowed_positions


def max_drop_count(max_drop: float, n_layers: int, protect_first: int = 0, protect_last: int = 0) -> int:
    """K, the most layers removed: a fraction of the layers (rounded) or a count; at least one layer stays."""
    if not math.isfinite(max_drop) or max_drop > 10 * n_layers:  # inf, or 1e308: no count, no 309-digit message
        raise LayerpruneError(f"max_drop {max_drop:.6g} is not below the model's {n_layers} layers; give a fraction "
                              "below 1 or a count of layers that leaves at least one")
    count = round(n_layers * max_drop) if max_drop < 1 else int(max_drop)
    allowed = n_layers - protect_first - protect_last
    if count < 1 or count >= n_layers or count > allowed:
        raise LayerpruneError(f"max_drop {max_drop:g} means {count} of {n_layers} layers; it must leave at least one "
                              f"layer and stay within the {allowed} unprotected ones")
    return count


def knee(losses: list[float], slope: float) -> int:
    """The largest k before losses[k] - losses[k-1] first exceeds `slope` (losses[0]: the unpruned model)."""
    for k in range(1, len(losses)):
        if losses[k] - losses[k - 1] > slope:
            return k - 1
    return len(losses) - 1


def trade_off_curve(model: nn.Module, config, *, calibration, validation, log=print) -> dict:
    """The curve of a CurveConfig on an in-memory model: every selection's drop-set and validation loss for
    k = 0..K, knees, chosen counts and the work done (block forwards, seconds)."""
    started = time.perf_counter()
    layers = kept_layers(model)
    n = len(layers)
    top = max_drop_count(config.max_drop, n, config.protect_first, config.protect_last)
    names = config.selections
    metrics = [name for name in names if name != SEARCH]
    scores = {}
    if metrics:  # one scoring pass for all metrics; angular's table covers every block size
        log(f"scoring {len(layers)} layers with {', '.join(metrics)}")
        scores = compute_many(model, metric_requests(metrics, n, seed=config.calibration.seed), calibration)
    scored = time.perf_counter()
    objective = get_objective(config.select_objective)
    losses = DropSetLosses(model, validation, measure=objective.measure)
    paths = {name: MetricPath(losses, scores[name], protect_first=config.protect_first,
                              protect_last=config.protect_last) for name in metrics}
    if SEARCH in names:
        allowed = allowed_positions(n, config.protect_first, config.protect_last)
        paths[SEARCH] = SearchPath(losses, allowed, layers, beam=config.search_beam, log=log, judged_by=objective.label)
    base = losses.intact_loss
    quality = config.quality_target()
    curves, knees, chosen = {}, {}, {}
    for name in sorted(names, key=lambda x: x != SEARCH):  # the search first: its steps' states serve the metrics
        points = [path_point for k in range(1, top + 1) if (path_point := paths[name].at(k)) is not None]
        rows = [{"k": 0, "dropped": [], "loss": base}] + [
            {"k": p.k, "dropped": sorted(layers[q] for q in p.positions), "loss": p.loss} for p in points]
        for row in rows:
            row.update(perplexity=math.exp(row["loss"]), ppl_ratio=math.exp(row["loss"] - base))
        curves[name] = rows
        knees[name] = knee([row["loss"] for row in rows], config.knee_slope)
        if quality is not None:
            k, _ = most_within(lambda k: rows[k]["loss"] if k < len(rows) else None,
                               base + quality.allowed_increase, len(rows))
            chosen[name] = {"k": k, "dropped": rows[k]["dropped"], "ppl_ratio": rows[k]["ppl_ratio"]}
        log(f"{name}: knee at {knees[name]} layers" + (f", {quality.describe()} allows {chosen[name]['k']}"
                                                        if quality else ""))
    curves = {name: curves[name] for name in names}
    return {
        "layers": len(layers), "max_drop": top, "objective": objective.name, "unpruned_loss": base,
        "unpruned_perplexity": math.exp(base),
        "validation": validation.description, "calibration": getattr(calibration, "description", None),
        "knee_slope": config.knee_slope, "knees": knees,
        "target": {"name": quality.describe(), "allowed_loss_increase": quality.allowed_increase} if quality else None,
        "chosen": chosen,
        "curves": curves, "metric_params": {name: s.params for name, s in scores.items()},
        "search": {"beam": config.search_beam, "path": paths[SEARCH].steps} if SEARCH in paths else None,
        "block_forwards": losses.block_forwards, "naive_block_forwards": losses.naive_block_forwards,
        "seconds": {"scoring": scored - started, "curve": time.perf_counter() - scored},
    }


def curve_for_loaded(loaded, config, log=print) -> dict:
    """trade_off_curve on a LoadedModel: calibration text from config.calibration, validation text from the
    same source with select auto's held-out seed."""
    needs_scores = any(name != SEARCH and get_metric(name).needs_calibration for name in config.selections)
    calibration = load_calibration_for(loaded, config.calibration) if needs_scores else None
    validation = objective_validation(config, loaded.tokenizer, held_out_text=lambda: load_calibration_for(
        loaded, config.calibration, validation=True))()
    record = trade_off_curve(loaded.model, config, calibration=calibration, validation=validation, log=log)
    return {"model": loaded.ref, "config": config.model_dump(mode="json"), **record}


# ---------------------------------------------------------------- files


def curve_csv(record: dict) -> str:
    """One row per (selection, k); `dropped` lists original layer indices separated by spaces."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["selection", "k", "loss", "perplexity", "ppl_ratio", "dropped"])
    for name, rows in record["curves"].items():
        for row in rows:
            writer.writerow([name, row["k"], f"{row['loss']:.6f}", f"{row['perplexity']:.4f}",
                             f"{row['ppl_ratio']:.4f}", " ".join(map(str, row["dropped"]))])
    return buffer.getvalue()


# What a curve's "perplexity" column is, per objective (a record without one: the validation perplexity).
CURVE_MEASURES = {"loss": "validation perplexity", "kl": "exp(KL to the unpruned model)",
                  "tasks": "answer perplexity on task documents"}


def curve_measure(record: dict) -> str:
    return CURVE_MEASURES.get(record.get("objective", "loss"), CURVE_MEASURES["loss"])


# The y axis stops at this multiple of the unpruned perplexity: past it a drop-set is broken anyway, and
# a few broken selections would otherwise squash the curves that matter.
PLOT_CLIP = 100


def plot_curve(record: dict, path: str | Path) -> Path:
    """Validation perplexity (log scale) against layers removed: one line per selection (the search in
    black), a circle at each knee (also in the legend), a dashed line at the quality target."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10" if len(record["curves"]) <= 11 else "tab20").colors
    base = record["unpruned_perplexity"]
    top = 0.0
    metrics = [name for name in record["curves"] if name != SEARCH]
    for name, rows in record["curves"].items():
        ks, ppl = [r["k"] for r in rows], [r["perplexity"] for r in rows]
        at = record["knees"][name]
        search = name == SEARCH
        color = "black" if search else colors[metrics.index(name) % len(colors)]
        ax.plot(ks, ppl, marker=".", color=color, linewidth=2.2 if search else 1.2, zorder=3 if search else 2,
                label=f"{name} (knee {at})")
        ax.plot([at], [ppl[at]], "o", markersize=10, markerfacecolor="none", color=color, zorder=4)
        top = max(top, max(ppl))
    target = record.get("target")
    limit = base * math.exp(target["allowed_loss_increase"]) if target else None
    if target:
        ax.axhline(limit, linestyle="--", color="gray", linewidth=1, label=target["name"])
    ax.set_yscale("log")
    clip = max(base * PLOT_CLIP, 2 * (limit or 0))
    clipped = top > clip
    if clipped:
        ax.set_ylim(top=clip)
    ax.set_xlabel("layers removed")
    ax.set_ylabel(curve_measure(record) + (f" (clipped at {PLOT_CLIP}x unpruned)" if clipped else ""))
    ax.set_title(f"{record.get('model', 'model')}: {record['layers']} layers, unpruned {base:.1f}; knee = last k "
                 "before "
                 f"+{record['knee_slope']:g} nats for one more layer", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    save_png(fig, path)
    plt.close(fig)
    return path


def write_curve_files(out: str | Path, record: dict, overwrite: bool = False, inputs=()) -> list[Path]:
    """curve.json, curve.csv and curve.png in `out`, written atomically (never over one of `inputs`)."""
    with atomic_output_dir(out, overwrite, inputs) as tmp:
        tmp = Path(tmp)
        write_json(tmp / "curve.json", record)
        (tmp / "curve.csv").write_text(curve_csv(record))
        plot_curve(record, tmp / "curve.png")
    return [Path(out) / name for name in ("curve.json", "curve.csv", "curve.png")]
