"""`layerprune prune`: remove decoder layers (or their attention / MLP) and save the pruned model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from layerprune.cli.app import (
    MODEL_HELP,
    app,
    console,
    no_tokenizer_option,
    trust_remote_code_option,
    user_errors,
)
from layerprune.cli.options import (
    CALIBRATION_OPTIONS,
    config_from_options,
    config_option,
    parse_expert_indices,
    parse_indices,
)
from layerprune.common.config_base import DEFAULT_DTYPE, comma_list
from layerprune.config import read_yaml_mapping
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import check_output_dir, check_output_file
from layerprune.selection.config import CalibrationConfig, PruneConfig

P = PruneConfig
C = CalibrationConfig


def _metrics(text: str) -> str | list[str]:
    names = comma_list(text)
    return names[0] if len(names) == 1 else names


@app.command()
@user_errors
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the pruned model (must not exist unless --overwrite), "
                            "or a .gguf file: a GGUF model is then cut in place of its quantized tensors."),
    drop: Optional[str] = config_option(P, "drop", help="ORIGINAL layer indices to drop, e.g. 21,22,23 or 22-29."),
    num_layers: Optional[int] = config_option(P, "num_layers", "--num-layers", "-n"),
    ratio: Optional[float] = config_option(P, "ratio"),
    target_params: Optional[str] = config_option(P, "target_params"),
    target_latency: Optional[float] = config_option(P, "target_latency"),
    latency_mode: Optional[str] = config_option(P, "latency_mode"),
    max_loss_increase: Optional[float] = config_option(P, "max_loss_increase"),
    max_ppl_ratio: Optional[float] = config_option(P, "max_ppl_ratio"),
    metric: Optional[str] = config_option(P, "metric", help="Importance metric (see `layerprune metrics`), or several "
                                          "comma separated with --select auto. Default: block-influence "
                                          "(attention-influence / mlp-influence with --granularity attention / mlp)."),
    select: Optional[str] = config_option(P, "select"),
    select_objective: Optional[str] = config_option(P, "select_objective"),
    select_tasks_docs: Optional[int] = config_option(P, "select_tasks_docs"),
    search_beam: Optional[int] = config_option(P, "search_beam"),
    search_swap: Optional[bool] = config_option(P, "search_swap"),
    granularity: Optional[str] = config_option(P, "granularity"),
    strategy: Optional[str] = config_option(P, "strategy"),
    schedule: Optional[str] = config_option(P, "schedule", help="Iterative pruning: 'step:total' or '1:step:total', "
                                            "e.g. 1:4:8 drops 4 layers per round, 8 in all, healing between rounds "
                                            "(with --heal-config's settings)."),
    heal_config: Optional[str] = typer.Option(None, "--heal-config", help="YAML file of healing settings for the "
                                              "rounds of --schedule (default: the finetune defaults)."),
    expert_ratio: Optional[float] = config_option(P, "expert_ratio"),
    num_experts: Optional[int] = config_option(P, "num_experts"),
    expert_metric: Optional[str] = config_option(P, "expert_metric"),
    drop_experts: Optional[str] = config_option(P, "drop_experts", help="Mixture-of-experts models: ORIGINAL expert "
                                                "indices to remove per ORIGINAL layer, e.g. '0:1,6;1:0,7' (as many in "
                                                "every MoE layer)."),
    protect_first: Optional[int] = config_option(P, "protect_first"),
    protect_last: Optional[int] = config_option(P, "protect_last"),
    preset: Optional[str] = config_option(P, "preset"),
    calib: Optional[str] = config_option(C, "source", option="calib"),
    calib_field: Optional[str] = config_option(C, "field", option="calib_field"),
    n_samples: Optional[int] = config_option(C, "n_samples"),
    seq_len: Optional[int] = config_option(C, "seq_len"),
    seed: Optional[int] = config_option(C, "seed"),
    dtype: str = typer.Option(DEFAULT_DTYPE, help="auto | bf16 | fp16 | fp32"),
    trust_remote_code: bool = trust_remote_code_option(),
    no_tokenizer: bool = no_tokenizer_option(),
    device_map: Optional[str] = typer.Option(None, help="'auto' to spread a large model over devices (accelerate)."),
    sample: list[str] = typer.Option([], help="Prompt to generate from before and after pruning (repeatable)."),
    max_new_tokens: int = typer.Option(40, help="Tokens per generation sample."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder that layerprune wrote."),
    output_format: str = typer.Option("auto", "--format", help="auto (a GGUF file when --out ends in .gguf, else a "
                                      "folder) | folder | gguf (cut a GGUF model's file, its tensors kept as "
                                      "stored)."),
    no_load: bool = typer.Option(
        False, "--no-load", help="Prune the safetensors checkpoint on disk, tensor by tensor, without loading the "
        "model (only with --drop and/or --drop-experts; used by itself when the weights exceed 80% of available "
        "memory).",
    ),
) -> None:
    """Remove decoder layers (or only their attention / MLP), or experts of a mixture-of-experts model, and save
    the pruned model."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.api import prune_model

    config = config_from_options(PruneConfig, locals(), convert={"drop": parse_indices, "metric": _metrics,
                                                                "drop_experts": parse_expert_indices},
                                 nested={"calibration": CALIBRATION_OPTIONS})
    heal = read_yaml_mapping(heal_config) if heal_config else None
    if heal is not None and config.strategy != "iterative":
        raise LayerpruneError("--heal-config sets the healing between the rounds of --schedule; give a schedule")
    inputs = [model, config.calibration.source, heal_config, *((heal or {}).get(key) for key in ("data", "teacher"))]
    if output_format == "gguf" or (output_format == "auto" and out.endswith(".gguf")):
        check_output_file(out, overwrite, inputs=inputs)
    else:
        check_output_dir(out, overwrite, inputs=inputs)
    say = lambda message: console.print(f"[dim]»[/] {message}", highlight=False)  # noqa: E731
    result = prune_model(model, out=out, config=config, heal=heal, dtype=dtype, device_map=device_map,
                         prompts=sample, max_new_tokens=max_new_tokens, overwrite=overwrite, no_load=no_load,
                         output_format=output_format, log=say)
    _print_result(result)


def _print_result(result) -> None:
    """The before/after table, what went and how it was chosen, the samples, and how to reload."""
    table = Table(title="layerprune prune")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("layers", str(result.layers_before), str(result.layers_after))
    pct = 100 * (1 - result.params_after / result.params_before)
    table.add_row("parameters", f"{result.params_before:,}", f"{result.params_after:,} (-{pct:.1f}%)")
    console.print(table)
    what = {"attention": "removed the attention of", "mlp": "removed the MLP of"}.get(result.granularity, "dropped")
    if result.dropped or not result.experts:
        console.print(f"{what} original layers: {','.join(map(str, result.dropped))}  (chosen by: {result.chosen_by})")
    if result.experts:
        console.print(f"removed {result.experts['experts_per_layer']} experts from each MoE layer (chosen by: "
                      f"{result.experts['chosen_by']}); original indices per original layer:")
        for layer, experts in result.experts["dropped"].items():
            console.print(f"  layer {layer}: {','.join(map(str, experts))}", highlight=False)
    constraints = result.how.get("constraints", {})
    if "estimated_latency_ratio" in constraints:
        console.print(f"estimated {constraints['latency']['mode']} latency: {constraints['estimated_latency_ratio']:.3f} "
                      f"of the original's (target {constraints['target_latency']})")
    validation = result.how.get("validation")
    if validation:
        console.print(_validation_line(validation))
    for before, after in zip(result.samples_before, result.samples_after):
        console.print(f"\n[bold]prompt:[/] {escape(before['prompt'])}", highlight=False)
        console.print(f"  [cyan]original:[/] {escape(repr(before['completion']))}", highlight=False)
        console.print(f"  [magenta]pruned:[/]   {escape(repr(after['completion']))}", highlight=False)
    reload = ("layerprune.load_model only: stock transformers cannot describe a layer without attention or MLP"
              if result.granularity != "block" else "AutoModelForCausalLM.from_pretrained")
    if Path(result.out).is_file():  # a GGUF file (every other output is a folder)
        console.print(f"GGUF: {result.bytes_before / 2**20:,.1f} MB -> {result.bytes_after / 2**20:,.1f} MB of tensors, "
                      "every kept tensor in its original quantization")
        reload = "llama.cpp, Ollama, LM Studio, `layerprune generate`, or layerprune.load_model"
    console.print(f"\npruned model saved to [bold]{result.out}[/] (reload: {reload})")


def _validation_line(validation: dict) -> str:
    """What the chosen drop-set scored on the objective that chose it (records before objectives: the loss)."""
    objective = validation.get("objective", "loss")
    if objective == "loss":
        return (f"validation loss {validation['loss']:.4f} (unpruned {validation['unpruned_loss']:.4f}, "
                f"perplexity x{validation['ppl_ratio']:.3f}) on held-out calibration text")
    if objective == "kl":
        return f"KL to the unpruned model {validation['value']:.4f} nats on held-out calibration text"
    return (f"answer loss {validation['value']:.4f} (unpruned {validation['unpruned']:.4f}) on the task documents "
            "that evaluation does not read")
