"""Plots that compare settings: metric vs layers removed, layer maps, healing loss curves, CKA similarity.

Each function takes plain data (no folders), writes one PNG and returns its path.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from layerprune.errors import LayerpruneError
from layerprune.files.plotting import pyplot, save_png

# Drop kinds of a layer map, in the order they win when one layer is listed twice.
_KINDS = (("block", "tab:red", "whole layer"), ("attention", "tab:orange", "attention only"),
          ("mlp", "tab:blue", "MLP only"))


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def plot_metric_vs_removed(rows: list[dict], value_key: str, path: str | Path, *, log_y: bool | None = None,
                           title: str | None = None) -> Path:
    """One line per metric: value_key (accuracy, perplexity, ...) over the number of layers removed.

    rows: {"metric": str, "layers_removed": int, value_key: float}; rows without a value are skipped.
    Perplexity (a key containing "ppl" or "perplexity") gets a log y-axis unless log_y says otherwise.
    """
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row.get(value_key) is not None:
            lines[str(row["metric"])].append((int(row["layers_removed"]), float(row[value_key])))
    if not lines:
        raise LayerpruneError(f"no rows with a {value_key!r} value to plot")
    if log_y is None:
        log_y = "ppl" in value_key.lower() or "perplexity" in value_key.lower()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=metric)
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layers removed")
    ax.set_ylabel(value_key)
    ax.set_title(title or f"{value_key} vs layers removed")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _drops(setting, name: str) -> dict[str, list[int]]:
    """A setting's drops by kind: a plain list means whole layers."""
    if isinstance(setting, dict):
        unknown = set(setting) - {kind for kind, _, _ in _KINDS}
        if unknown:
            raise LayerpruneError(f"layer map {name!r}: unknown drop kind(s) {sorted(unknown)}; use block, "
                                  "attention, mlp")
        return {kind: list(setting.get(kind) or []) for kind, _, _ in _KINDS}
    return {"block": list(setting), "attention": [], "mlp": []}


def plot_layer_map(settings: dict[str, list[int] | dict[str, list[int]]], n_layers: int, path: str | Path) -> Path:
    """Rows = settings, columns = ORIGINAL layer index, coloured where the setting dropped the layer.

    A setting is a list of dropped layers, or {"block": [...], "attention": [...], "mlp": [...]} for
    sub-layer removal (each kind its own colour).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if not settings:
        raise LayerpruneError("no settings to draw in the layer map")
    names = list(settings)
    grid = [[0] * n_layers for _ in names]
    used = set()
    for row, name in enumerate(names):
        drops = _drops(settings[name], name)
        for code, (kind, _, _) in reversed(list(enumerate(_KINDS, 1))):  # block painted last, so it wins
            for layer in drops[kind]:
                if not 0 <= layer < n_layers:
                    raise LayerpruneError(f"layer map {name!r}: layer {layer} is outside 0..{n_layers - 1}")
                grid[row][layer] = code
                used.add(kind)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * n_layers + 2), max(2, 0.35 * len(names) + 1.2)))
    colors = ["whitesmoke"] + [color for _, color, _ in _KINDS]
    ax.imshow(grid, cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1, aspect="auto")
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6, rotation=90)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xticks([x - 0.5 for x in range(1, n_layers)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(names))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("original layer")
    ax.set_title("layers each setting dropped")
    handles = [Patch(color=color, label=label) for kind, color, label in _KINDS if kind in used]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, plt, path)


def read_loss_csv(path: str | Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a heal folder's loss.csv (as finetune.trainer.write_loss_curve writes it)."""
    path = Path(path)
    if not path.is_file():
        raise LayerpruneError(f"no loss curve at {path}")
    with open(path, newline="") as f:
        return [(int(float(row["step"])), float(row["loss"])) for row in csv.DictReader(f) if row.get("loss")]


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """Healing loss over optimizer steps, one line per setting (empty curves are left out)."""
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        raise LayerpruneError("no loss curves to plot")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("healing loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def plot_similarity(names: list[str], matrix: list[list[float]], path: str | Path) -> Path:
    """Heatmap of pairwise similarity (linear CKA of final hidden states), values written in the cells."""
    n = len(names)
    if n == 0 or len(matrix) != n or any(len(row) != n for row in matrix):
        raise LayerpruneError(f"similarity matrix must be {n} x {n} for {n} names")
    low = min(min(row) for row in matrix)
    low = low if low < 1 else 0.0  # all ones: keep a colour range
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * n + 2), max(3.5, 0.7 * n + 1.5)))
    image = ax.imshow(matrix, cmap="viridis", vmin=low, vmax=1.0)
    ax.set_xticks(range(n), names, fontsize=7, rotation=45, ha="right")
    ax.set_yticks(range(n), names, fontsize=7)
    for i in range(n):
        for j in range(n):
            bright = (matrix[i][j] - low) / (1.0 - low) > 0.5  # viridis is light at the top
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if bright else "white")
    ax.set_title("linear CKA of final hidden states")
    fig.colorbar(image, ax=ax)
    return _save(fig, plt, path)
