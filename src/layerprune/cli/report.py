"""`layerprune report DIR`: rebuild report.md and the plots of a run or study folder from its files."""

from __future__ import annotations

from pathlib import Path

import typer

from layerprune.cli.app import app, console, user_errors


@app.command("report")
@user_errors
def report_command(
    folder: Path = typer.Argument(..., help="A run folder (config.yaml) or a study folder (study.json)."),
) -> None:
    """Rebuild report.md and the plots of a run or study folder from the files its stages wrote."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.report.rebuild import rebuild_report

    written = rebuild_report(folder)
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    console.print(f"report rebuilt in [bold]{folder}[/]")
