"""Rebuild a run folder's report.md and plots from its files alone (`layerprune report RUN_DIR`)."""

from __future__ import annotations

from pathlib import Path

from layerprune.errors import LayerpruneError, first_line
from layerprune.files.outputs import MARKER, is_layerprune_output, read_json, write_text
from layerprune.importance.base import LayerScores
from layerprune.importance.plots import plot_angular_heatmap, plot_scores
from layerprune.importance.scores_file import read_scores_json
from layerprune.report import study_plots
from layerprune.report.run_report import run_report
from layerprune.report.study_report import rebuild_study_report


def _round_number(path: Path) -> int:
    return int(path.name.split("-")[1])


def _scores(path: Path) -> dict[str, LayerScores]:
    """The scores of a scores.json (importance/scores_file.py), or none when the file is missing."""
    return read_scores_json(path)[0] if path.exists() else {}


def _candidate_drops(selection: dict | None) -> dict[str, list[int]]:
    """Each metric's drop-set of a selection.json (select: auto keeps them all)."""
    if not selection:
        return {}
    drops = {name: c["dropped"] for name, c in (selection.get("candidates") or {}).items()}
    chosen = str(selection.get("chosen_by", "")).removeprefix("auto:")
    drops.setdefault(chosen, selection["dropped"])
    return drops


def _score_plots(folder: Path, selection: dict | None) -> list[Path]:
    all_scores = _scores(folder / "scores.json")
    if not all_scores:
        return []
    made = [plot_scores(all_scores, folder / "scores.png", _candidate_drops(selection))]
    if "angular" in all_scores:
        heatmap = plot_angular_heatmap(all_scores["angular"], folder / "angular.png")
        made += [heatmap] if heatmap else []
    return made


def _original_layers(run_dir: Path, fallback: list[int]) -> int:
    """Layer count of the unpruned model: from a pruned model's provenance, else the scores, else the drops."""
    for record in [run_dir / "pruned" / "layerprune.json",
                   *sorted((run_dir / "rounds").glob("round-*/pruned/layerprune.json"))]:
        data = read_json(record, missing_ok=True)
        if data and data.get("original_num_layers"):
            return int(data["original_num_layers"])
    for scores_path in [run_dir / "scores.json", run_dir / "rounds" / "round-1" / "scores.json"]:
        scores = _scores(scores_path) if scores_path.exists() else {}
        if scores:
            return len(next(iter(scores.values())).layers)
    return max(fallback, default=0) + 1


def _layer_map_rows(run_dir: Path, selection: dict | None) -> dict[str, list[int]]:
    """One-shot: every candidate and the chosen drop-set; iterative: each round and all rounds together."""
    rows: dict[str, list[int]] = {}
    rounds = sorted((run_dir / "rounds").glob("round-*/selection.json"), key=lambda p: _round_number(p.parent))
    if rounds:
        for path in rounds:
            rows[path.parent.name] = read_json(path)["dropped"]
        rows["all rounds"] = sorted({i for dropped in rows.values() for i in dropped})
    elif selection:
        rows = {f"candidate: {name}": c["dropped"] for name, c in (selection.get("candidates") or {}).items()}
        rows[f"dropped ({selection['chosen_by']})"] = selection["dropped"]
    return rows


def _loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    paths = sorted(run_dir.glob("healed-*/loss.csv")) + sorted(
        run_dir.glob("rounds/round-*/healed-*/loss.csv"), key=lambda p: _round_number(p.parent.parent))
    return {str(p.parent.relative_to(run_dir)): study_plots.read_loss_csv(p) for p in paths}


def write_run_report(run_dir: str | Path, final_ref: str | None = None) -> tuple[dict, list[Path]]:
    """Write report.md (run_report's tables plus the plots) and the plots; returns (summary, files written).

    Plots: scores.png and angular.png from scores.json (and each round's), loss_curves.png from the heal
    stages' loss.csv, layer_map.png from the selections.
    """
    run_dir = Path(run_dir)
    if final_ref is None:
        final_ref = _mapping(run_dir, "run.json").get("final_model")
    selection = read_json(run_dir / "selection.json", missing_ok=True)
    text, summary = run_report(run_dir, final_ref)  # reads every file the text needs before any plot is written
    made = _score_plots(run_dir, selection)
    for round_dir in sorted((run_dir / "rounds").glob("round-*"), key=_round_number):
        made += _score_plots(round_dir, read_json(round_dir / "selection.json", missing_ok=True))
    curves = {name: points for name, points in _loss_curves(run_dir).items() if points}
    if curves:
        made.append(study_plots.plot_loss_curves(curves, run_dir / "loss_curves.png"))
    rows = _layer_map_rows(run_dir, selection)
    if rows:
        n_layers = _original_layers(run_dir, [i for drop in rows.values() for i in drop])
        made.append(study_plots.plot_layer_map(rows, n_layers, run_dir / "layer_map.png"))
    images = [p for p in made if p.parent == run_dir]
    if images:
        text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    write_text(run_dir / "report.md", text)  # atomic, never through a symlink: the run folder is filled in place
    return summary, [run_dir / "report.md", *made]


def _mapping(folder: Path, name: str) -> dict:
    """A JSON run file that layerprune writes as an object ({} when absent); anything else is refused."""
    value = read_json(folder / name, missing_ok=True)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LayerpruneError(f"{folder / name} holds a JSON {type(value).__name__}, not the object layerprune "
                              "writes; restore it or rerun the stage that wrote it")
    return value


def _check_run_files(folder: Path) -> None:
    """The top level of the run files report reads: objects, and the selection's dropped layers a list of
    layer numbers."""
    for name in ("run.json", "stages.json", "selection.json", "eval-original/eval.json", "eval-final/eval.json"):
        _mapping(folder, name)
    dropped = _mapping(folder, "selection.json").get("dropped", [])
    if not (isinstance(dropped, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in dropped)):
        raise LayerpruneError(f"{folder / 'selection.json'}: dropped is {str(dropped)[:40]!r}, not a list of layer "
                              "numbers; restore it or rerun the prune stage")


def rebuild_report(folder: str | Path) -> list[Path]:
    """`layerprune report DIR`: a study folder (study.json) or a run folder (config.yaml); returns the files written."""
    folder = Path(folder)
    if ((folder / "study.json").is_file() or (folder / "config.yaml").is_file()) and not is_layerprune_output(folder):
        # the round-2 rule: layerprune rewrites only what it made (a run or study folder it claimed carries the
        # marker); a folder of the user's own with a config.yaml keeps its report.md, study.md, study.csv...
        raise LayerpruneError(f"{folder} was not made by layerprune (it has no {MARKER} file); report rebuilds "
                              "only the run and study folders layerprune made, and leaves your report.md and "
                              "study files as they are")
    try:
        if (folder / "study.json").is_file():
            return [Path(p) for p in rebuild_study_report(folder)["plots"]]
        if (folder / "config.yaml").is_file():
            _check_run_files(folder)
            return write_run_report(folder)[1]
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
        # run files are user input here: a hand-edited or damaged one is one line, not a traceback
        raise LayerpruneError(f"{folder}: a run file is not as layerprune wrote it ({type(err).__name__}: "
                              f"{first_line(err)}); restore it or rerun the stage that wrote it") from None
    if not folder.exists():
        raise LayerpruneError(f"{folder} does not exist")
    raise LayerpruneError(f"{folder} is neither a run folder (config.yaml) nor a study folder (study.json)")
