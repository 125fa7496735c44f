"""Study grids: a run YAML plus a `grid:` of lists -> one run per combination, sharing work, -> paper tables.

    grid:
      metric: [reverse-order, taylor]        # prune.metric
      heal_method: [lora, partial]          # heal[0].method ("none" = no healing)
      strategy: [one-shot, "1:4:8", "1:1:8"]

Any dotted key of the run config also works (`calibration.n_samples`, `heal.0.learning_rate`). Every
setting is validated before anything runs. Settings live in `<out>/settings/<name>/` (ordinary run
folders); scores (once per metric), pruned models (once per selection) and the original's evaluation
are made once in `<out>/shared/` and linked in. The end product is `study.md/.csv/.html` (rows =
settings, columns = tasks, Avg Acc, perplexities, parameters, decode speedup) and plots.
"""

from __future__ import annotations

import copy
import csv
import html
import io
import itertools
import json
import re
import time
from pathlib import Path

from layerprune.config import RunConfig, apply_sets, build_config, read_yaml_mapping, set_dotted
from layerprune.errors import LayerpruneError
from layerprune.outputs import write_json

# Short names for the axes the papers vary; anything else is a dotted path into the run config.
GRID_ALIASES = {
    "metric": "prune.metric",
    "ratio": "prune.ratio",
    "num_layers": "prune.num_layers",
    "select": "prune.select",
    "granularity": "prune.granularity",
    "calibration_size": "calibration.n_samples",
    "calibration_source": "calibration.source",
    "heal_method": "heal.0.method",
    "heal_data": "heal.0.data",
    "learning_rate": "heal.0.learning_rate",
    "seed": "seed",
}
STRATEGY_AXIS = "strategy"  # one-shot | "1:k:N" / "k:N" (iterative); sets prune.strategy and prune.schedule
STUDY_KEYS = {"grid", "report"}
REPORT_OPTIONS = {"similarity"}


def _apply(base: dict, axis: str, value) -> None:
    if axis == STRATEGY_AXIS:
        prune = base.setdefault("prune", {})
        if value == "one-shot":
            prune.update(strategy="one-shot", schedule=None)
        else:
            prune.update(strategy="iterative", schedule=str(value))
        return
    path = GRID_ALIASES.get(axis, axis)
    if path == "heal.0.method" and value in ("none", None):
        base["heal"] = []
        return
    set_dotted(base, path, value)


def setting_name(values: dict) -> str:
    """A folder name that says what the setting is: metric-taylor__heal_method-lora__strategy-1-4-8."""
    parts = []
    for axis, value in values.items():
        text = re.sub(r"[^A-Za-z0-9.\-]+", "_", str(value).replace(":", "-")).strip("_") or "none"
        parts.append(f"{axis.split('.')[-1]}-{text}")
    return "__".join(parts)


class Study:
    def __init__(self, data: dict, source: str = "study"):
        data = copy.deepcopy(data)
        self.source = source
        grid = data.pop("grid", None)
        report = data.pop("report", None) or {}
        if not isinstance(grid, dict) or not grid:
            raise LayerpruneError(f"{source}: grid must map axes to lists of values")
        unknown = set(report) - REPORT_OPTIONS
        if unknown:
            raise LayerpruneError(f"{source}: report.{sorted(unknown)[0]} is not an option (known: similarity)")
        self.report_options = report
        for axis, values in grid.items():
            if not isinstance(values, list) or not values:
                raise LayerpruneError(f"{source}: grid.{axis} must be a non-empty list")
            if len(set(map(json.dumps, values))) != len(values):
                raise LayerpruneError(f"{source}: grid.{axis} lists a value twice")
        self.grid = grid
        self.out = Path(data.pop("out", None) or Path("runs") / Path(source).stem)
        self.base = data
        self.settings = self._expand()

    def _expand(self) -> list[dict]:
        """Every combination, validated as a run config now (errors name the setting and key)."""
        settings = []
        axes = list(self.grid)
        for combo in itertools.product(*(self.grid[a] for a in axes)):
            values = dict(zip(axes, combo))
            name = setting_name(values)
            if any(s["name"] == name for s in settings):  # values that only differ in punctuation
                name = f"{name}__{len(settings)}"
            data = copy.deepcopy(self.base)
            for axis, value in values.items():
                _apply(data, axis, value)
            data["out"] = str(self.out / "settings" / name)
            config = build_config(RunConfig, data, where_prefix=f"{self.source}: setting {name}: ")
            settings.append({"name": name, "values": values, "config": config})
        return settings

    def execute(self, log=print) -> dict:
        from layerprune.pipeline import Run

        self.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        status = {}
        for number, setting in enumerate(self.settings, 1):
            name = setting["name"]
            log(f"[{number}/{len(self.settings)}] {name}")
            run = Run(setting["config"], log=lambda m, n=number: log(f"  {m}"), shared_dir=self.out / "shared")
            try:
                run.execute()
                status[name] = "done"
            except Exception as err:  # one failed setting must not lose the others; rerun retries it
                status[name] = f"failed: {type(err).__name__}: {err}"
                log(f"  setting {name} failed: {err}")
            self._write_index(status)
        record = rebuild_study_report(self.out)
        record["wall_time_s"] = round(time.perf_counter() - started, 1)
        write_json(self.out / "study.json", record)
        failed = [n for n, s in status.items() if s != "done"]
        if failed:
            raise LayerpruneError(f"{len(failed)} of {len(status)} settings failed ({', '.join(failed)}); "
                                  "see their messages above, fix and rerun (finished settings are kept)")
        return record

    def _write_index(self, status: dict) -> None:
        write_json(self.out / "study.json", {
            "source": self.source, "axes": list(self.grid),
            "settings": [{"name": s["name"], "values": s["values"], "dir": f"settings/{s['name']}",
                          "status": status.get(s["name"], "pending")} for s in self.settings],
            "report": self.report_options,
        })


def is_study(data: dict) -> bool:
    return "grid" in data


def load_study(path: str | Path, overrides: dict | None = None, sets: list[str] | None = None) -> Study:
    data = read_yaml_mapping(path)
    data.update(overrides or {})
    apply_sets(data, sets or [])
    return Study(data, source=str(path))


# ---------------------------------------------------------------------------------------------- tables
def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def study_rows(study_dir: Path) -> tuple[list[str], list[dict]]:
    """(axes, one row per setting) from the files the settings' runs wrote; missing numbers are None."""
    index = _read(study_dir / "study.json")
    if index is None:
        raise LayerpruneError(f"{study_dir} is not a study folder (no study.json)")
    rows = []
    original = None
    for setting in index["settings"]:
        run = study_dir / setting["dir"]
        final = _read(run / "eval-final" / "eval.json")
        original = original or _read(run / "eval-original" / "eval.json")
        selection = _read(run / "selection.json")
        rounds = sorted((run / "rounds").glob("round-*/done.json"), key=lambda p: int(p.parent.name.split("-")[1]))
        dropped = selection["dropped"] if selection else sorted(d for p in rounds for d in _read(p)["dropped"])
        row = {"setting": setting["name"], **{a: setting["values"][a] for a in index["axes"]},
               "status": setting.get("status", "?"), "dropped": dropped, "run_dir": str(run)}
        row.update(_eval_cells(final))
        bench = _read(run / "bench" / "bench.json")
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
    return cells


def _decode_speedup(bench: dict | None) -> float | None:
    if not bench:
        return None
    for row in bench.get("comparison", {}).get("rows", []):
        if row["key"].startswith("gen_latency"):
            return row["gain"]
    return None


def table_columns(axes: list[str], rows: list[dict]) -> list[str]:
    fixed = ["setting", *axes, "layers", "parameters"]
    metrics = sorted({k for r in rows for k in r} - set(fixed) - {"status", "dropped", "run_dir", "Avg Acc",
                                                                   "decode speedup"})
    tasks = [m for m in metrics if not m.endswith(" ppl")]
    ppls = [m for m in metrics if m.endswith(" ppl")]
    extra = (["Avg Acc"] if any("Avg Acc" in r for r in rows) else []) + ppls
    return fixed + tasks + extra + ["decode speedup", "status"]


def _fmt(column: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
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
    paths["md"].write_text("\n".join(md) + "\n")
    paths["csv"].write_text(buffer.getvalue())
    paths["html"].write_text(_html(study_dir.name, columns, cells))
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


def rebuild_study_report(study_dir: str | Path, similarity: bool | None = None) -> dict:
    """Tables and plots of a study folder from its files alone (what `layerprune report DIR` calls)."""
    study_dir = Path(study_dir)
    axes, rows = study_rows(study_dir)
    write_tables(study_dir, axes, rows)
    index = _read(study_dir / "study.json")
    if similarity is None:
        similarity = bool((index.get("report") or {}).get("similarity"))
    plots = study_plots(study_dir, axes, rows, similarity=similarity)
    return {**index, "rows": rows, "plots": [str(p) for p in plots]}


def study_plots(study_dir: Path, axes: list[str], rows: list[dict], similarity: bool = False) -> list[Path]:
    from layerprune.report import study_plots as sp

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
    if similarity:
        made.append(_similarity_plot(study_dir, settings, out / "similarity.png"))
    return made


def _similarity_plot(study_dir: Path, settings: list[dict], path: Path) -> Path:
    """Linear CKA between the final hidden states of every setting's final model (the seed's Figure B)."""
    from layerprune.report import study_plots as sp
    from layerprune.report.similarity import hidden_state_similarity
    from layerprune.pipeline import Run

    final = {}
    for r in settings:
        summary = _read(Path(r["run_dir"]) / "run.json")
        if summary and summary.get("final_model"):
            final[r["setting"]] = summary["final_model"]
    if not final:
        raise LayerpruneError("no finished setting to compare")
    config = RunConfig.model_validate(read_yaml_mapping(Path(settings[0]["run_dir"]) / "config.yaml"))
    run = Run(config)
    first = run.load(config.model)
    calibration = run.calibration(first.tokenizer, seed_offset=2000)
    # loaders, not models: hidden_state_similarity loads one model at a time
    models = {"original": lambda: first.model}
    models.update({name: (lambda ref=ref: run.load(ref, first).model) for name, ref in final.items()})
    names, matrix = hidden_state_similarity(models, calibration)
    write_json(study_dir / "similarity.json", {"names": names, "cka": matrix})
    return sp.plot_similarity(names, matrix, path)
