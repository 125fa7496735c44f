"""`layerprune env`: versions, CPU, GPUs, memory and cache, to paste into a bug report."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from layerprune.cli.app import app, console, user_errors


@app.command()
@user_errors
def env(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts and issue forms)."),
) -> None:
    """Show versions, CPU (instruction sets, native bf16), GPUs, memory and cache: what a bug report needs."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.hardware.env import environment_report, format_report

    report = environment_report()
    if as_json:
        print(json.dumps(report, indent=2))  # plain print: rich would wrap and colour it, and break the JSON
        return
    table = Table(title="layerprune environment", show_header=False)
    for label, value in format_report(report):
        table.add_row(label, value)
    console.print(table)
