"""`layerprune info`: a model's architecture, layers, parameters and pruning history."""

from __future__ import annotations

import typer
from rich.table import Table

from layerprune.cli.app import MODEL_HELP, app, console, trust_remote_code_option, user_errors
from layerprune.errors import LayerpruneError


@app.command()
@user_errors
def info(
    model: str = typer.Argument(..., help=MODEL_HELP),
    dtype: str = typer.Option("auto", help="auto | bf16 | fp16 | fp32"),
    trust_remote_code: bool = trust_remote_code_option(),
) -> None:
    """Show a model's architecture, layers, parameters and pruning history (of a .gguf file: also the
    quantization types of its tensor groups, read from the header without loading it)."""
    if model.endswith(".gguf"):
        _gguf_info(model)
        return
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.models.anatomy import count_parameters, get_anatomy, model_dtype
    from layerprune.models.experts.surgery import expert_summary
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
    for kind, layers in (record.get("removed_sublayers") or {}).items():
        if layers:
            table.add_row(f"{kind} removed (original indices)", ",".join(map(str, layers)))
    for label, text in expert_summary(loaded.model):  # mixture-of-experts models
        table.add_row(label, text)
    table.add_row("parameters", f"{params['total']:,} ({params['non_embedding']:,} non-embedding)")
    table.add_row("tied embeddings", str(anatomy.tied_embeddings))
    table.add_row("dtype", str(model_dtype(loaded.model)).replace("torch.", ""))
    console.print(table)


def _gguf_info(path: str) -> None:
    from pathlib import Path

    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.models.gguf_file import field_value, layout, reader, tensor_groups

    if not Path(path).is_file():
        raise LayerpruneError(f"GGUF file not found: {path}")
    r = reader(path)
    shape = layout(r)
    record = shape.provenance
    table = Table(title=path, show_header=False)
    table.add_row("architecture", f"{shape.arch} (GGUF)")
    table.add_row("layers", f"{shape.block_count} (original {record['original_num_layers']})")
    if record["dropped_layers"]:
        table.add_row("dropped (original indices)", ",".join(map(str, record["dropped_layers"])))
        for number, step in enumerate(record.get("history", []), 1):
            if "dropped" in step:  # expert cuts are listed below
                how = ", ".join(f"{k}={v}" for k, v in step.items() if k != "dropped")
                table.add_row(f"prune {number}", f"dropped {','.join(map(str, step['dropped']))} ({how})")
    count_key = f"{shape.arch}.expert_count"
    if count_key in r.fields and field_value(r.fields[count_key]):  # a mixture-of-experts file
        count, experts = field_value(r.fields[count_key]), record.get("experts") or {}
        table.add_row("experts per MoE layer", f"{count} (original {experts.get('original_num_experts', count)})")
        for layer, gone in (experts.get("dropped") or {}).items():
            if gone:
                table.add_row(f"experts removed, layer {layer}", ",".join(map(str, gone)))
    if shape.sliding is not None:
        table.add_row("global-attention layers", ",".join(str(i) for i, s in enumerate(shape.sliding) if not s))
    for group, kinds in tensor_groups(path).items():
        table.add_row(f"{group} tensors", ", ".join(f"{n} x {kind}" for kind, n in sorted(kinds.items())))
    console.print(table)
