"""`layerprune bench`: parameters, MACs, memory, latency and throughput of a model, or two side by side."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from layerprune.benchmark.config import BenchConfig
from layerprune.cli.app import MODEL_HELP, app, console, trust_remote_code_option, user_errors
from layerprune.cli.options import config_from_options, config_option, parse_int_list
from layerprune.errors import LayerpruneError
from layerprune.models.dtypes import DEFAULT_DTYPE

B = BenchConfig


def _resolve_device(device: str | None) -> str:
    """Default to the GPU when there is one; refuse a device this machine lacks before loading."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise LayerpruneError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise LayerpruneError(f"device {device!r} is not available on this machine")
    return device


def _bench_one(ref: str, config, dtype: str, device: str, load_in: str | None = None) -> dict:
    """Load one model, benchmark it, and free it before the next one loads."""
    import torch

    from layerprune.benchmark import benchmark
    from layerprune.models.loading import load_model

    loaded = load_model(ref, dtype=dtype, device=device, load_in=load_in)
    name = f"{ref} ({load_in})" if load_in else ref  # the same folder may be measured twice: full and quantized
    try:
        return benchmark(loaded.model, loaded.tokenizer, config, name=name,
                         log=lambda m: console.print(f"  {m}", highlight=False))
    finally:
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _print_table(base: dict, other: dict | None, comparison: dict | None) -> None:
    from layerprune.benchmark import table_rows

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
    from layerprune.benchmark import write_outputs
    from layerprune.files.outputs import atomic_output_dir, check_output_dir
    from layerprune.models.quantize import check_load_in

    config = config_from_options(BenchConfig, locals(), convert={
        "batch_sizes": lambda text: parse_int_list(text, "--batch-sizes"),
        "new_tokens": lambda text: parse_int_list(text, "--new-tokens")})
    device = _resolve_device(device)
    load_in = check_load_in(load_in)
    compare_load_in = load_in if compare_load_in is None else check_load_in(compare_load_in)
    check_output_dir(out, overwrite, inputs=[model, compare])
    refs = [(model, load_in)] + ([(compare, compare_load_in)] if compare else [])
    results = []
    for ref, quant in refs:
        console.print(f"benchmarking [bold]{ref}[/]{f' ({quant})' if quant else ''} on {device}", highlight=False)
        results.append(_bench_one(ref, config, dtype, device, quant))
    base, other = results[0], (results[1] if compare else None)
    with atomic_output_dir(out, overwrite) as tmp:
        comparison = write_outputs(Path(tmp), base, other)
    _print_table(base, other, comparison)
    if comparison is not None:
        console.print(
            f"ideal speedup from MACs: {comparison['ideal_speedup']:.3f}x "
            f"(layers {base['layers']} -> {other['layers']}: {comparison['layer_ratio']:.3f}x)"
        )
    console.print(f"wrote bench.json, bench.md, bench.png to [bold]{out}[/]")
