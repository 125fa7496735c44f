"""A study folder's report from its files alone: the table (study_tables.py) and the plots.

What both a study's last step and `layerprune report STUDY_DIR` call; it reads files only (the CKA
matrix comes from similarity.json, written by the study's similarity stage).
"""

from __future__ import annotations

from pathlib import Path

from layerprune.files.outputs import read_json
from layerprune.report import study_plots as sp
from layerprune.report.study_tables import study_rows, write_tables


def rebuild_study_report(study_dir: str | Path) -> dict:
    """Write study.md/.csv/.html and plots/; returns study.json's index plus the rows and the plots written."""
    study_dir = Path(study_dir)
    axes, rows = study_rows(study_dir)
    write_tables(study_dir, axes, rows)
    index = read_json(study_dir / "study.json")
    plots = write_study_plots(study_dir, axes, rows)
    return {**index, "rows": rows, "plots": [str(p) for p in plots]}


def write_study_plots(study_dir: Path, axes: list[str], rows: list[dict]) -> list[Path]:
    out = study_dir / "plots"
    out.mkdir(exist_ok=True)
    settings = [r for r in rows if r["run_dir"]]
    made = []
    n_layers = max((r.get("layers", 0) + len(r["dropped"]) for r in settings if r.get("layers")), default=0)
    if settings and n_layers:
        made.append(sp.plot_layer_map({r["setting"]: r["dropped"] for r in settings}, n_layers,
                                      out / "layer_map.png"))
    metric_axis = "metric" if "metric" in axes else None
    by_removed = [dict(r, metric=r.get(metric_axis, "setting") if metric_axis else "setting",
                       layers_removed=len(r["dropped"])) for r in settings]
    original = next((r for r in rows if r["run_dir"] is None), None)
    if original:  # every line starts at the unpruned model (0 layers removed)
        by_removed += [dict(original, metric=m, layers_removed=0) for m in {r["metric"] for r in by_removed}]
    if len({r["layers_removed"] for r in by_removed if r["run_dir"]}) > 1:
        if any("Avg Acc" in r for r in by_removed):
            made.append(sp.plot_metric_vs_removed([r for r in by_removed if "Avg Acc" in r], "Avg Acc",
                                                  out / "acc_vs_removed.png"))
        ppl = next((c for r in by_removed for c in r if c.endswith(" ppl")), None)
        if ppl:
            made.append(sp.plot_metric_vs_removed([r for r in by_removed if ppl in r], ppl, out / "ppl_vs_removed.png"))
    curves = {}
    for r in settings:
        for loss_csv in sorted(Path(r["run_dir"]).glob("healed-*/loss.csv")):
            curves[f"{r['setting']} {loss_csv.parent.name}"] = sp.read_loss_csv(loss_csv)
    if curves:
        made.append(sp.plot_loss_curves(curves, out / "loss_curves.png"))
    similarity = study_dir / "similarity.json"
    if similarity.exists():
        cka = read_json(similarity)
        made.append(sp.plot_similarity(cka["names"], cka["cka"], out / "similarity.png"))
    return made
