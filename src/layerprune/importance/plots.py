"""Plots of layer scores (bar chart per metric) and the angular distance heatmap."""

from __future__ import annotations

import math
from pathlib import Path

from layerprune.files.plotting import pyplot, save_png
from layerprune.importance.base import LayerScores


def plot_scores(all_scores: dict[str, LayerScores], path: str | Path, dropped: dict[str, list[int]] | None = None) -> Path:
    """One bar chart per metric (layers on x, score on y); layers a selection drops are red."""
    plt = pyplot()
    names = list(all_scores)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        scores = all_scores[name]
        drop = set((dropped or {}).get(name, []))
        values = [v if v == v else 0.0 for v in scores.values]  # NaN (invalid block start) drawn as 0
        colors = ["tab:red" if layer in drop else "tab:blue" for layer in scores.layers]
        ax.bar([str(layer) for layer in scores.layers], values, color=colors)
        ax.set_title(name)
        ax.set_xlabel("original layer")
        ax.tick_params(axis="x", labelsize=6, rotation=90)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("layer importance (higher = keep; red = dropped)")
    fig.tight_layout()
    path = Path(path)
    save_png(fig, path)
    plt.close(fig)
    return path


def plot_angular_heatmap(scores: LayerScores, path: str | Path) -> Path | None:
    """Angular distance d(i, i+m) over start layer i and block size m (the figure of the angular-distance pruning papers, e.g. arXiv 2403.17887)."""
    table = scores.extra.get("distances")
    if not table:
        return None
    plt = pyplot()
    sizes = sorted(int(m) for m in table)
    n = len(scores.layers)
    grid = [[float("nan")] * n for _ in sizes]
    for row, m in enumerate(sizes):
        for start, value in enumerate(table[str(m)]):
            grid[row][start] = value
    fig, ax = plt.subplots(figsize=(max(6, n * 0.3), max(3, len(sizes) * 0.3)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis_r", origin="lower")
    ax.set_xticks(range(n), [str(layer) for layer in scores.layers], fontsize=6, rotation=90)
    ax.set_yticks(range(len(sizes)), [str(m) for m in sizes], fontsize=6)
    ax.set_xlabel("start layer (original index)")
    ax.set_ylabel("block size m")
    ax.set_title("angular distance d(i, i+m); darker = more redundant")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    save_png(fig, path)
    plt.close(fig)
    return path
