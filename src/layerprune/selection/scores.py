"""Score runs: several metrics with the fewest passes, written as files, and the stability study."""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path

from layerprune.common.config_base import comma_list
from layerprune.data.calibration import load_calibration
from layerprune.errors import LayerpruneError
from layerprune.importance import LayerScores, available_metrics, compute_many, get_metric
from layerprune.importance.plots import plot_angular_heatmap, plot_scores
from layerprune.importance.registry import Cut
from layerprune.importance.scores_file import write_scores_json
from layerprune.models.surgery import kept_layers
from layerprune.selection.ranking import Selection, select_layers


def parse_metrics(text: str) -> list[str]:
    """'all' (every whole-layer metric), 'none' (experts only: `score --expert-metric`) or a comma list;
    unknown names fail here, before any model loads."""
    if text.strip() == "none":
        return []
    if text.strip() == "all":
        names = [n for n in available_metrics() if "block" in get_metric(n).granularities]
    else:
        names = comma_list(text)
    if not names:
        raise LayerpruneError("no metric given")
    for name in names:
        get_metric(name)
    return names


def metric_requests(names: list[str], n_layers: int, *, seed: int = 0, block_size: int = 1) -> dict[str, dict]:
    """Each metric's default parameters for a cut of `block_size` layers (see MetricSpec.default_params)."""
    cut = Cut(n_layers=n_layers, n_drop=block_size, seed=seed)
    return {name: get_metric(name).default_params(cut) for name in names}


def prune_metric_requests(config, n_layers: int, n_drop: int | None) -> dict[str, dict]:
    """{metric: params} of a PruneConfig: the metrics' defaults for this cut, overlaid with its metric_params."""
    # with a parameter/latency target the count is not known yet: block metrics score every size from 1 up
    requests = metric_requests(config.metrics, n_layers, seed=config.calibration.seed, block_size=n_drop or 1)
    for name, params in config.metric_params.items():
        if name not in requests:
            raise LayerpruneError(f"metric_params names {name!r}, which is not a metric of this prune "
                                  f"({', '.join(config.metrics)})")
        requests[name].update(params)
    return requests


def select_for_each(all_scores: dict[str, LayerScores], n_drop: int) -> dict[str, Selection]:
    """The layers each metric would drop (block metrics: the best block of its own size)."""
    selections = {}
    for name, scores in all_scores.items():
        k = int(scores.params["block_size"]) if scores.params.get("block_size") else n_drop
        selections[name] = select_layers(scores, num_layers=k)
    return selections


def write_score_files(
    out: Path, all_scores: dict[str, LayerScores], selections: dict[str, Selection], model_ref: str
) -> list[Path]:
    """scores.json, scores.csv (layer x metric), scores.md, scores.png, angular.png; returns the paths."""
    write_scores_json(out / "scores.json", model_ref, all_scores, selections)
    (out / "scores.csv").write_text(scores_csv(all_scores))
    (out / "scores.md").write_text(scores_markdown(all_scores, selections))
    paths = [out / "scores.json", out / "scores.csv", out / "scores.md"]
    paths.append(plot_scores(all_scores, out / "scores.png", {n: s.dropped for n, s in selections.items()}))
    if "angular" in all_scores:
        heatmap = plot_angular_heatmap(all_scores["angular"], out / "angular.png")
        if heatmap:
            paths.append(heatmap)
    return paths


def scores_csv(all_scores: dict[str, LayerScores]) -> str:
    names = list(all_scores)
    layers = next(iter(all_scores.values())).layers
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["layer", *names])
    for pos, layer in enumerate(layers):
        writer.writerow([layer, *(all_scores[n].values[pos] for n in names)])
    return buffer.getvalue()


def scores_markdown(all_scores: dict[str, LayerScores], selections: dict[str, Selection]) -> str:
    lines = ["| metric | dropped (original indices) | least important first |", "|---|---|---|"]
    for name, scores in all_scores.items():
        ranking = [layer for layer in scores.ranking() if scores.as_dict()[layer] == scores.as_dict()[layer]]
        lines.append(f"| {name} | {','.join(map(str, selections[name].dropped))} | {' '.join(map(str, ranking))} |")
    return "\n".join(lines) + "\n"


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def stability_study(
    model,
    tokenizer,
    names: list[str],
    *,
    sources: list[str],
    n_samples_list: list[int],
    seeds: int,
    seq_len: int,
    n_drop: int,
    block_size: int = 1,
    progress=None,
) -> dict:
    """How much the selected layers depend on the calibration set (Table 6 of arXiv 2411.15558, Reassessing
    Layer Pruning).

    For every (source, n_samples, seed) setting, score with each data-driven metric and select
    `n_drop` layers; report each setting's selection and its mean Jaccard overlap with the others.
    """
    data_metrics = [n for n in names if get_metric(n).needs_calibration]
    if not data_metrics:
        raise LayerpruneError("the stability study needs at least one data-driven metric")
    n_layers = len(kept_layers(model))
    settings = list(itertools.product(sources, n_samples_list, range(seeds)))
    rows = []
    for source, n_samples, seed in settings:
        calibration = load_calibration(tokenizer, source, n_samples=n_samples, seq_len=seq_len, seed=seed)
        requests = metric_requests(data_metrics, n_layers, block_size=block_size)
        selections = select_for_each(compute_many(model, requests, calibration), n_drop)
        rows.append(
            {"source": source, "n_samples": n_samples, "seed": seed,
             "dropped": {name: sel.dropped for name, sel in selections.items()}}
        )
        if progress:
            progress()
    for row in rows:
        row["mean_jaccard"] = {
            name: _mean([jaccard(row["dropped"][name], other["dropped"][name]) for other in rows if other is not row])
            for name in data_metrics
        }
    return {"metrics": data_metrics, "n_drop": n_drop, "seq_len": seq_len, "settings": rows}


def stability_markdown(study: dict) -> str:
    names = study["metrics"]
    header = "| calibration | samples | seed | " + " | ".join(f"{n}: dropped (mean Jaccard)" for n in names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    for row in study["settings"]:
        cells = [f"{','.join(map(str, row['dropped'][n]))} ({row['mean_jaccard'][n]:.2f})" for n in names]
        lines.append(f"| {row['source']} | {row['n_samples']} | {row['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 1.0
