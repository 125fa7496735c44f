"""`layerprune curve`: validation perplexity against layers removed, per metric and for the search."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from layerprune.cli.app import MODEL_HELP, app, console, user_errors
from layerprune.cli.options import CALIBRATION_OPTIONS, config_from_options, config_option
from layerprune.common.config_base import DEFAULT_DTYPE
from layerprune.files.outputs import check_output_dir
from layerprune.selection.config import CalibrationConfig, CurveConfig, curve_selections

V = CurveConfig
C = CalibrationConfig


@app.command()
@user_errors
def curve(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Folder for curve.json, curve.csv and curve.png."),
    metric: Optional[str] = config_option(V, "metric"),
    max_drop: Optional[float] = config_option(V, "max_drop"),
    search_beam: Optional[int] = config_option(V, "search_beam"),
    select_objective: Optional[str] = config_option(V, "select_objective"),
    select_tasks_docs: Optional[int] = config_option(V, "select_tasks_docs"),
    knee_slope: Optional[float] = config_option(V, "knee_slope"),
    max_loss_increase: Optional[float] = config_option(V, "max_loss_increase"),
    max_ppl_ratio: Optional[float] = config_option(V, "max_ppl_ratio"),
    protect_first: Optional[int] = config_option(V, "protect_first"),
    protect_last: Optional[int] = config_option(V, "protect_last"),
    calib: Optional[str] = config_option(C, "source", option="calib"),
    calib_field: Optional[str] = config_option(C, "field", option="calib_field"),
    n_samples: Optional[int] = config_option(C, "n_samples"),
    seq_len: Optional[int] = config_option(C, "seq_len"),
    seed: Optional[int] = config_option(C, "seed"),
    dtype: str = typer.Option(DEFAULT_DTYPE, help="auto | bf16 | fp16 | fp32"),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder that layerprune wrote."),
) -> None:
    """How many layers, and which: validation perplexity for k = 0..max-drop layers removed, per selection."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.hardware.speed import announced, measure_speed
    from layerprune.models.loading import load_model
    from layerprune.planning.run_time import curve_seconds
    from layerprune.selection.curve import curve_for_loaded, write_curve_files

    config = config_from_options(CurveConfig, locals(), convert={"metric": curve_selections},
                                 nested={"calibration": CALIBRATION_OPTIONS})
    inputs = [model, config.calibration.source]
    check_output_dir(out, overwrite, inputs)
    loaded = load_model(model, dtype=dtype, for_compute=True)
    say = lambda message: console.print(f"[dim]»[/] {message}", highlight=False)  # noqa: E731
    with announced("the curve", curve_seconds(loaded.model, config, measure_speed(loaded.model)), say):
        record = curve_for_loaded(loaded, config, log=say)
    written = write_curve_files(out, record, overwrite=overwrite, inputs=inputs)
    _print_curve(record)
    console.print(f"wrote {', '.join(p.name for p in written)} to [bold]{out}[/]")


def _print_curve(record: dict) -> None:
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.selection.curve import curve_measure

    names = list(record["curves"])
    kl = record.get("objective") == "kl"  # the KL itself reads better than exp(KL): 0 for the unpruned model
    title = "KL to the unpruned model (nats) by layers removed" if kl else \
        f"{curve_measure(record)} by layers removed (unpruned {record['unpruned_perplexity']:.2f})"
    table = Table(title=title)
    table.add_column("k", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for k in range(record["max_drop"] + 1):
        cells = []
        for name in names:
            rows = record["curves"][name]
            mark = "*" if record["knees"][name] == k else ""
            value = f"{rows[k]['loss']:.4f}" if kl else f"{rows[k]['perplexity']:.2f}"
            cells.append(f"{value}{mark}" if k < len(rows) else "-")
        table.add_row(str(k), *cells)
    console.print(table)
    console.print("* = knee (the last k before the loss rises by more than "
                  f"{record['knee_slope']:g} nats for one more layer)")
    target = record.get("target")
    for name, chosen in (record.get("chosen") or {}).items():
        console.print(f"{name}: {target['name']} allows {chosen['k']} layers "
                      f"({','.join(map(str, chosen['dropped'])) or 'none'}; perplexity x{chosen['ppl_ratio']:.3f})")
