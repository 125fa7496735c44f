"""The `layerprune` command line: a thin typer layer over the Python API (layerprune.api).

Start-up: `layerprune --help` builds every command's options from the stage configs, which load no torch; each
command imports the API it calls when it runs (the one kind of import inside functions the CLI has).
"""

# Each command module registers its commands on `app` when imported; this order is the order of `--help`.
from layerprune.cli import info, prune, score, curve, finetune, run, listing  # noqa: F401,I001
from layerprune.cli import bench, eval, export, report, env, plan  # noqa: F401,I001
from layerprune.cli.app import app


def main() -> None:  # console-script entry point
    app()
