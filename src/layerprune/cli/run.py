"""`layerprune run`: the whole pipeline (or a study grid of pipelines) from one YAML."""

from __future__ import annotations

from typing import Optional

import typer

from layerprune.cli.app import app, console, user_errors
from layerprune.config import load_run_config, read_yaml_mapping


@app.command()
@user_errors
def run(
    config: str = typer.Argument(..., help="Run YAML (see examples/)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder (overrides the YAML's out)."),
    sets: Optional[list[str]] = typer.Option(
        None, "--set", help="Override a setting: --set model=smollm2-135m --set heal.0.learning_rate=1e-4 (repeatable)."),
) -> None:
    """Run score -> select -> prune -> heal -> eval -> bench -> report from one YAML; reruns resume.

    A YAML with a `grid:` of lists is a study: one run per combination, sharing work, ending in
    study.md/.csv/.html and plots."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.runs.pipeline import run_pipeline
    from layerprune.runs.study import is_study, load_study

    if is_study(read_yaml_mapping(config)):
        _run_study(load_study(config, {"out": out} if out else None, sets))
        return
    run_config = load_run_config(config, {"out": out} if out else None, sets)
    console.print(f"run folder: [bold]{run_config.out}[/]")
    summary = run_pipeline(run_config, log=lambda message: console.print(f"[dim]»[/] {message}", highlight=False))
    from pathlib import Path

    console.print(Path(run_config.out, "report.md").read_text(), highlight=False, markup=False, soft_wrap=True)
    console.print(f"done in {summary['wall_time_s']:.0f} s; final model: [bold]{summary['final_model']}[/]")


def _run_study(study) -> None:
    from pathlib import Path

    console.print(f"study folder: [bold]{study.out}[/] ({len(study.settings)} settings)")
    record = study.execute(log=lambda message: console.print(f"[dim]»[/] {message}", highlight=False))
    console.print(Path(study.out, "study.md").read_text(), highlight=False, markup=False, soft_wrap=True)
    console.print(f"done in {record['wall_time_s']:.0f} s; tables: study.md, study.csv, study.html; "
                  f"plots in {Path(study.out, 'plots')}")
