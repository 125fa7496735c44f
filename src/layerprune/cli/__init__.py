"""The `layerprune` command line: a thin typer layer over the Python API."""

# Each command module registers its commands on `app` when imported; this order is the order of `--help`.
from layerprune.cli import info, prune, score, curve, finetune, run, listing  # noqa: F401
from layerprune.cli import bench, eval, export, report, env, plan  # noqa: F401
from layerprune.cli.app import app


def main() -> None:  # console-script entry point
    app()
