"""A study folder's paper table: one row per setting (and the original) from the files its runs wrote,
written as study.md, study.csv and study.html."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from layerprune.errors import LayerpruneError
from layerprune.files.outputs import read_json, write_text
from layerprune.report.gaps import gap_summary, gap_table


def study_rows(study_dir: Path) -> tuple[list[str], list[dict]]:
    """(axes, one row per setting) from the files the settings' runs wrote; missing numbers are None."""
    index = read_json(study_dir / "study.json", missing_ok=True)
    if index is None:
        raise LayerpruneError(f"{study_dir} is not a study folder (no study.json)")
    rows = []
    original = None
    for setting in index["settings"]:
        run = study_dir / setting["dir"]
        final = read_json(run / "eval-final" / "eval.json", missing_ok=True)
        original = original or read_json(run / "eval-original" / "eval.json", missing_ok=True)
        selection = read_json(run / "selection.json", missing_ok=True)
        rounds = sorted((run / "rounds").glob("round-*/done.json"), key=lambda p: int(p.parent.name.split("-")[1]))
        dropped = selection["dropped"] if selection else sorted(d for p in rounds for d in read_json(p)["dropped"])
        row = {"setting": setting["name"], **{a: setting["values"][a] for a in index["axes"]},
               "status": setting.get("status", "?"), "dropped": dropped, "run_dir": str(run)}
        row.update(_eval_cells(final))
        row.update(_gap_cells(original, read_json(run / "eval-pruned" / "eval.json", missing_ok=True), final))
        bench = read_json(run / "bench" / "bench.json", missing_ok=True)
        row["decode speedup"] = _decode_speedup(bench)
        rows.append(row)
    if original:
        rows.insert(0, {"setting": "original", **{a: "-" for a in index["axes"]}, "status": "reference",
                        "dropped": [], "run_dir": None, **_eval_cells(original),
                        "decode speedup": 1.0 if any(r["decode speedup"] for r in rows) else None})
    return index["axes"], rows


def _eval_cells(record: dict | None) -> dict:
    if not record:
        return {}
    cells = {"layers": record["model"]["layers"], "parameters": record["model"]["parameters"]}
    for task, scores in sorted(record.get("tasks", {}).items()):
        if "acc" in scores:
            cells[task] = scores["acc"]
    average = (record.get("average") or {}).get("value")
    if average is not None:
        cells["Avg Acc"] = average
    for text, scores in sorted(record.get("perplexity", {}).items()):
        cells[f"{text} ppl"] = scores["ppl"]
    follow = record.get("instruction_following")
    if follow:
        cells["instruction KL"], cells["greedy ROUGE-L"] = follow["kl"], follow["rouge_l"]
    return cells


def _gap_cells(original: dict | None, pruned: dict | None, final: dict | None) -> dict:
    """Mean gap closed over the tasks, the perplexities and instruction following (report/gaps.py)."""
    rows = gap_table(original, pruned, final)
    return {f"gap closed: {k}": v for k, v in gap_summary(rows).items() if v is not None} if rows else {}


def _decode_speedup(bench: dict | None) -> float | None:
    if not bench:
        return None
    for row in bench.get("comparison", {}).get("rows", []):
        if row["key"].startswith("gen_latency"):
            return row["gain"] if row.get("reliable", True) else None  # timed on a busy machine: no figure
    return None


def table_columns(axes: list[str], rows: list[dict]) -> list[str]:
    fixed = ["setting", *axes, "layers", "parameters"]
    metrics = sorted({k for r in rows for k in r} - set(fixed) - {"status", "dropped", "run_dir", "Avg Acc",
                                                                   "decode speedup"})
    gaps = [m for m in metrics if m.startswith("gap closed: ")]
    follow = [m for m in metrics if m in ("instruction KL", "greedy ROUGE-L")]
    ppls = [m for m in metrics if m.endswith(" ppl")]
    tasks = [m for m in metrics if m not in (*gaps, *follow, *ppls)]
    extra = (["Avg Acc"] if any("Avg Acc" in r for r in rows) else []) + ppls + follow + gaps
    return fixed + tasks + extra + ["decode speedup", "status"]


def _fmt(column: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if column.startswith("gap closed: "):
            return f"{value:.0%}"
        if column.endswith(" ppl"):
            return f"{value:.4g}"
        if column == "decode speedup":
            return f"{value:.2f}x"
        return f"{value:.4f}"
    if column == "parameters" and isinstance(value, int):
        return f"{value / 1e6:.1f}M"
    return str(value)


def write_tables(study_dir: Path, axes: list[str], rows: list[dict]) -> dict[str, Path]:
    """study.md, study.csv, study.html: the paper-style table (rows = settings)."""
    columns = table_columns(axes, rows)
    cells = [[_fmt(c, r.get(c)) for c in columns] for r in rows]
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(line) + " |" for line in cells]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns + ["dropped"])
    for r in rows:
        writer.writerow([r.get(c, "") if r.get(c) is not None else "" for c in columns] +
                        [" ".join(map(str, r.get("dropped", [])))])
    paths = {"md": study_dir / "study.md", "csv": study_dir / "study.csv", "html": study_dir / "study.html"}
    write_text(paths["md"], "\n".join(md) + "\n")  # atomic, never through a symlink: the folder is filled in place
    write_text(paths["csv"], buffer.getvalue())
    write_text(paths["html"], _html(study_dir.name, columns, cells))
    return paths


def _html(title: str, columns: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in line) + "</tr>" for line in cells)
    images = "".join(f'<figure><img src="plots/{name}"><figcaption>{name}</figcaption></figure>'
                     for name in ("layer_map.png", "acc_vs_removed.png", "ppl_vs_removed.png", "loss_curves.png",
                                  "similarity.png"))
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 8px;text-align:right}img{max-width:900px}</style>"
            f"<h1>layerprune study: {html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>{images}")
