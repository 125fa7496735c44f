"""`layerprune metrics` and `layerprune models`: what is built in."""

from __future__ import annotations

from rich.table import Table

from layerprune.cli.app import app, console
from layerprune.models.builtin import BUILTIN_MODELS


@app.command()
def metrics() -> None:
    """List the importance metrics (of layers, and of the experts of mixture-of-experts models)."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.importance import available_metrics, get_metric
    from layerprune.importance.experts.registry import available_expert_metrics, get_expert_metric

    table = Table("metric", "needs data", "what it scores")
    for name in available_metrics():
        spec = get_metric(name)
        table.add_row(name, "yes" if spec.needs_calibration else "no", spec.description)
    console.print(table)
    experts = Table("expert metric", "needs data", "what it scores (mixture-of-experts models: --expert-metric)")
    for name in available_expert_metrics():
        spec = get_expert_metric(name)
        experts.add_row(name, "yes" if spec.needs_calibration else "no", spec.description)
    console.print(experts)


@app.command()
def models() -> None:
    """List the built-in model aliases (real small models shipped on PyPI)."""
    table = Table("alias", "model", "licence")
    for alias, spec in BUILTIN_MODELS.items():
        table.add_row(alias, spec.description, spec.license)
    console.print(table)
