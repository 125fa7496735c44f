"""The `layerprune` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import functools
import re
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

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


def parse_indices(text: str) -> list[int]:
    """'3,5,10-12' -> [3, 5, 10, 11, 12] (ranges inclusive)."""
    indices: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if match:
            indices.extend(range(int(match[1]), int(match[2]) + 1))
        elif re.fullmatch(r"-?\d+", part):
            indices.append(int(part))
        else:
            raise LayerpruneError(f"could not read layer indices from {text!r}; write them like 3,5,10-12")
    if not indices:
        raise LayerpruneError("no layer indices given")
    return indices


@app.command()
@user_errors
def info(
    model: str = typer.Argument(..., help=MODEL_HELP),
    dtype: str = typer.Option("auto", help="auto | bf16 | fp16 | fp32"),
) -> None:
    """Show a model's architecture, layers, parameters and pruning history."""
    from layerprune.models.anatomy import count_parameters, get_anatomy, model_dtype
    from layerprune.models.loading import load_model
    from layerprune.models.surgery import provenance

    loaded = load_model(model, dtype=dtype, load_tokenizer=False)
    anatomy = get_anatomy(loaded.model)
    params = count_parameters(loaded.model)
    record = provenance(loaded.model)
    table = Table(title=f"{model}", show_header=False)
    table.add_row("architecture", f"{type(loaded.model).__name__} (family {anatomy.family})")
    table.add_row("folder", loaded.path)
    table.add_row("layers", f"{anatomy.num_layers} (original {record['original_num_layers']})")
    if record["dropped_layers"]:
        table.add_row("dropped (original indices)", ",".join(map(str, record["dropped_layers"])))
    table.add_row("parameters", f"{params['total']:,} ({params['non_embedding']:,} non-embedding)")
    table.add_row("tied embeddings", str(anatomy.tied_embeddings))
    table.add_row("dtype", str(model_dtype(loaded.model)).replace("torch.", ""))
    console.print(table)


@app.command()
@user_errors
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the pruned model (must not exist unless --overwrite)."),
    drop: Optional[str] = typer.Option(None, help="Original layer indices to drop, e.g. 21,22,23 or 22-29."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", "-n", help="Number of layers to drop, chosen by --metric."),
    ratio: Optional[float] = typer.Option(None, help="Fraction of layers to drop (e.g. 0.25), chosen by --metric."),
    metric: str = typer.Option("reverse-order", help="Importance metric that chooses the layers (see `layerprune metrics`)."),
    seed: int = typer.Option(0, help="Seed for the random metric."),
    protect_first: int = typer.Option(0, help="Never drop the first K layers."),
    protect_last: int = typer.Option(0, help="Never drop the last K layers."),
    calib: str = typer.Option("c4", help="Calibration text for data-driven metrics: c4 | wikitext2 | ptb | a .txt/.jsonl file | a hub dataset id."),
    n_samples: int = typer.Option(10, help="Calibration samples."),
    seq_len: int = typer.Option(128, help="Tokens per calibration sample."),
    dtype: str = typer.Option("auto", help="auto | bf16 | fp16 | fp32"),
    device_map: Optional[str] = typer.Option(None, help="'auto' to spread a large model over devices (accelerate)."),
    sample: list[str] = typer.Option([], help="Prompt to generate from before and after pruning (repeatable)."),
    max_new_tokens: int = typer.Option(40, help="Tokens per generation sample."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Remove decoder layers and save a stock transformers checkpoint."""
    from layerprune.api import prune_model
    from layerprune.outputs import check_output_dir

    given = [x is not None for x in (drop, num_layers, ratio)]
    if sum(given) != 1:
        raise LayerpruneError("give exactly one of --drop, --num-layers or --ratio")
    check_output_dir(out, overwrite)
    result = prune_model(
        model,
        out=out,
        drop=parse_indices(drop) if drop is not None else None,
        num_layers=num_layers,
        ratio=ratio,
        metric=metric,
        metric_params={"seed": seed} if metric == "random" else {},
        protect_first=protect_first,
        protect_last=protect_last,
        calib=calib,
        n_samples=n_samples,
        seq_len=seq_len,
        calib_seed=seed,
        dtype=dtype,
        device_map=device_map,
        prompts=sample,
        max_new_tokens=max_new_tokens,
        overwrite=overwrite,
    )
    table = Table(title="layerprune prune")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("layers", str(result.layers_before), str(result.layers_after))
    pct = 100 * (1 - result.params_after / result.params_before)
    table.add_row("parameters", f"{result.params_before:,}", f"{result.params_after:,} (-{pct:.1f}%)")
    console.print(table)
    console.print(f"dropped original layers: {','.join(map(str, result.dropped))}  (chosen by: {result.chosen_by})")
    for before, after in zip(result.samples_before, result.samples_after):
        console.print(f"\n[bold]prompt:[/] {before['prompt']}", highlight=False)
        console.print(f"  [cyan]original:[/] {before['completion']!r}", highlight=False)
        console.print(f"  [magenta]pruned:[/]   {after['completion']!r}", highlight=False)
    console.print(f"\npruned model saved to [bold]{result.out}[/] (reload: AutoModelForCausalLM.from_pretrained)")


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


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for our own progress and tables."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
