"""`layerprune bench`: parameters, MACs, memory, latency and throughput of a model, or two side by side."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from layerprune.benchmark.compare import NOISY_SPREAD
from layerprune.benchmark.config import BenchConfig
from layerprune.cli.app import MODEL_HELP, app, console, trust_remote_code_option, user_errors
from layerprune.cli.options import config_from_options, config_option, parse_int_list
from layerprune.common.config_base import DEFAULT_DTYPE

B = BenchConfig


def _print_table(base: dict, other: dict | None, comparison: dict | None) -> None:
    from layerprune.benchmark import table_rows  # start-up: `--help` loads no torch (cli/__init__.py)

    header, rows = table_rows(base, other, comparison)
    table = Table(title="layerprune bench")
    table.add_column(header[0])
    for name in header[1:]:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command("bench")
@user_errors
def bench(
    model: str = typer.Argument(..., help=MODEL_HELP),
    compare: Optional[str] = typer.Option(None, "--compare", help="A second model (e.g. the pruned one) to measure and compare."),
    out: str = typer.Option(..., "--out", "-o", help="Folder for bench.json, bench.md and bench.png."),
    seq_len: Optional[int] = config_option(B, "seq_len"),
    batch_sizes: Optional[str] = config_option(B, "batch_sizes", help="Generation batch sizes M, comma separated."),
    new_tokens: Optional[str] = config_option(B, "new_tokens", help="Generated lengths L (forced, greedy), comma "
                                              "separated."),
    warmup: Optional[int] = config_option(B, "warmup"),
    runs: Optional[int] = config_option(B, "runs"),
    prompt_tokens: Optional[int] = config_option(B, "prompt_tokens"),
    seed: Optional[int] = config_option(B, "seed"),
    dtype: str = typer.Option(DEFAULT_DTYPE, help="auto | bf16 | fp16 | fp32"),
    trust_remote_code: bool = trust_remote_code_option(),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:1 ... (default: cuda when available)."),
    load_in: Optional[str] = typer.Option(
        None, help="Quantize the linear layers while loading (bitsandbytes): 4bit (NF4) | 8bit (LLM.int8)."
    ),
    compare_load_in: Optional[str] = typer.Option(
        None, help="--load-in for the --compare model (default: as --load-in; 'none' = full precision)."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder that layerprune wrote."),
) -> None:
    """Measure parameters, MACs, memory, prefill latency and generation speed; with --compare, the speedups."""
    from layerprune.api import benchmark_model  # start-up: `--help` loads no torch (cli/__init__.py)

    config = config_from_options(BenchConfig, locals(), convert={
        "batch_sizes": lambda text: parse_int_list(text, "--batch-sizes"),
        "new_tokens": lambda text: parse_int_list(text, "--new-tokens")})
    base, other, comparison = benchmark_model(
        model, config, compare=compare, out=out, dtype=dtype, device=device, load_in=load_in,
        compare_load_in=compare_load_in, overwrite=overwrite, log=lambda line: console.print(line, highlight=False))
    _print_table(base, other, comparison)
    if comparison is not None:
        console.print(
            f"ideal speedup from MACs: {comparison['ideal_speedup']:.3f}x "
            f"(layers {base['layers']} -> {other['layers']}: {comparison['layer_ratio']:.3f}x)"
        )
        noisy = [row["label"] for row in comparison["rows"] if not row["reliable"]]
        if noisy:
            console.print(f"[yellow]unreliable (spread over {NOISY_SPREAD:.0%} of the mean, or a gain past the ideal: "
                          f"other work ran): {', '.join(noisy)}; measure again on an idle machine[/]", highlight=False)
    console.print(f"wrote bench.json, bench.md, bench.png to [bold]{out}[/]")
