"""The typer app and what every command shares; imports no other command module."""

from __future__ import annotations

import contextlib
import functools
import logging

import typer
from rich.console import Console
from rich.markup import escape

from layerprune.errors import LayerpruneError, shorten
from layerprune.files.cache import cache_dir
from layerprune.files.user_files import os_error_message
from layerprune.models.model_config import loading_options

app = typer.Typer(
    help="Prune whole decoder layers out of large language models, heal them, and measure the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

MODEL_HELP = "A model folder, a .gguf file, a built-in alias (smollm2-135m, gemma3-270m) or a hub id."


TRUST_REMOTE_CODE_HELP = (
    "Run the Python code a model folder ships (auto_map in config.json / tokenizer_config.json). Only for models "
    "whose code you trust; without it such models are refused."
)
NO_TOKENIZER_HELP = "Load no tokenizer: the output holds the weights only (for folders without a usable tokenizer)."


def trust_remote_code_option():
    return typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)


def no_tokenizer_option():
    return typer.Option(False, "--no-tokenizer", help=NO_TOKENIZER_HELP)


def user_errors(fn):
    """Turn a LayerpruneError, or an OSError the user must fix (a full or read-only disk, a refused
    permission), into one red line on stderr and exit code 1. Other errors are bugs: they keep their traceback.

    A command's --trust-remote-code / --no-tokenizer (parameters trust_remote_code / no_tokenizer) apply to
    every model it loads (models.model_config.loading_options)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            cache_dir()  # a LAYERPRUNE_CACHE naming a file is refused before any work, not at the first write
            with _loading_options(kwargs):
                return fn(*args, **kwargs)
        except LayerpruneError as err:
            _print_error(str(err))
        except OSError as err:
            message = os_error_message(err)
            if message is None:
                raise
            _print_error(message)

    return wrapper


def _loading_options(kwargs: dict):
    if "trust_remote_code" not in kwargs and "no_tokenizer" not in kwargs:
        return contextlib.nullcontext()

    return loading_options(trust_remote_code=kwargs.get("trust_remote_code"),
                           tokenizer=False if kwargs.get("no_tokenizer") else None)


def _print_error(message: str):
    # one line, whatever was echoed into it
    message = shorten(" ".join(message.split("\n")), 2000)
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for our own progress and tables."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # bitsandbytes warns on import that an optional CPU kernel package is missing; nothing here needs it
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Never ask on the terminal whether to run a model's own code (an answer piped to stdin would run it):
    # layerprune passes trust_remote_code explicitly; anything that does not gets transformers' refusal.
    from transformers import dynamic_module_utils

    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0
