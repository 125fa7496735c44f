"""The typer app and what every command shares; imports no other command module."""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from layerprune.errors import LayerpruneError

app = typer.Typer(
    help="Prune whole decoder layers out of large language models, heal them, and measure the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

MODEL_HELP = "A model folder, a .gguf file, a built-in alias (smollm2-135m, gemma3-270m) or a hub id."


def user_errors(fn):
    """Turn a LayerpruneError into one red line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LayerpruneError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)

    return wrapper


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for our own progress and tables."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
