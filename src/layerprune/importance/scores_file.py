"""scores.json: the one schema of layer scores on disk, written and read here only.

    {"model": "<model ref>", "scores": {metric: LayerScores.to_json()}, "selections": {metric: Selection}}

`layerprune score` writes it (with each metric's would-be drop-set), a run's prune stage caches its scores
in it (selections empty: the run's choice is selection.json), and `layerprune report` reads both.
"""

from __future__ import annotations

from pathlib import Path

from layerprune.errors import LayerpruneError
from layerprune.files.outputs import read_json, write_json
from layerprune.importance.base import LayerScores


def write_scores_json(path: str | Path, model_ref: str, scores: dict[str, LayerScores],
                      selections: dict | None = None) -> Path:
    """Write scores.json; selections: {metric: Selection or its JSON dict}."""
    chosen = {name: s.to_json() if hasattr(s, "to_json") else s for name, s in (selections or {}).items()}
    write_json(Path(path), {"model": model_ref, "scores": {name: s.to_json() for name, s in scores.items()},
                            "selections": chosen})
    return Path(path)


def read_scores_json(path: str | Path) -> tuple[dict[str, LayerScores], dict[str, dict]]:
    """(scores by metric, selections by metric) of a scores.json; one LayerpruneError for another shape."""
    data = read_json(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
        raise LayerpruneError(f"{path} is not a layerprune scores.json (no 'scores' mapping; files written "
                              "before layerprune 0.1 kept another shape: score again)")
    return ({name: LayerScores.from_json(s) for name, s in data["scores"].items()},
            dict(data.get("selections") or {}))
