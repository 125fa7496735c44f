"""`layerprune metrics` and `layerprune models`: what is built in."""

from __future__ import annotations

from rich.table import Table

from layerprune.cli.app import app, console


@app.command()
def metrics() -> None:
    """List the importance metrics."""
    from layerprune.importance import get_metric, available_metrics

    table = Table("metric", "needs data", "what it scores")
    for name in available_metrics():
        spec = get_metric(name)
        table.add_row(name, "yes" if spec.needs_calibration else "no", spec.description)
    console.print(table)


@app.command()
def models() -> None:
    """List the built-in model aliases (real small models shipped on PyPI)."""
    from layerprune.models.builtin import BUILTIN_MODELS

    table = Table("alias", "model", "licence")
    for alias, spec in BUILTIN_MODELS.items():
        table.add_row(alias, spec.description, spec.license)
    console.print(table)
