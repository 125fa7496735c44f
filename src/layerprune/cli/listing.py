"""`layerprune metrics` and `layerprune models`: what is built in."""

from __future__ import annotations

from rich.table import Table

from layerprune.cli.app import app, console
from layerprune.models.builtin import BUILTIN_MODELS


@app.command()
def metrics() -> None:
    """List the importance metrics."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.importance import available_metrics, get_metric

    table = Table("metric", "needs data", "what it scores")
    for name in available_metrics():
        spec = get_metric(name)
        table.add_row(name, "yes" if spec.needs_calibration else "no", spec.description)
    console.print(table)


@app.command()
def models() -> None:
    """List the built-in model aliases (real small models shipped on PyPI)."""
    table = Table("alias", "model", "licence")
    for alias, spec in BUILTIN_MODELS.items():
        table.add_row(alias, spec.description, spec.license)
    console.print(table)
