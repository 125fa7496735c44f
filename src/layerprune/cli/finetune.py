"""`layerprune finetune`: heal a pruned model by fine-tuning."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from layerprune.cli.app import MODEL_HELP, app, console, trust_remote_code_option, user_errors
from layerprune.cli.options import config_from_options, config_option, parse_indices
from layerprune.common.config_base import comma_list
from layerprune.files.outputs import check_output_dir
from layerprune.finetune.config import HealConfig

H = HealConfig


def _targets(text: str):
    return text if text == "all-linear" else comma_list(text)


@app.command()
@user_errors
def finetune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the healed model, heal.json and the loss curve."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of healing settings; options override it."),
    preset: Optional[str] = config_option(H, "preset"),
    method: Optional[str] = config_option(H, "method"),
    data: Optional[str] = config_option(H, "data"),
    max_samples: Optional[int] = config_option(H, "max_samples"),
    template: Optional[str] = config_option(H, "template"),
    fields: Optional[str] = config_option(H, "fields"),
    learning_rate: Optional[float] = config_option(H, "learning_rate", "--learning-rate", "--lr"),
    epochs: Optional[float] = config_option(H, "epochs"),
    max_steps: Optional[int] = config_option(H, "max_steps"),
    max_minutes: Optional[float] = config_option(H, "max_minutes"),
    batch_size: Optional[int] = config_option(H, "batch_size"),
    effective_batch_size: Optional[int] = config_option(H, "effective_batch_size"),
    warmup_steps: Optional[int] = config_option(H, "warmup_steps"),
    scheduler: Optional[str] = config_option(H, "scheduler"),
    weight_decay: Optional[float] = config_option(H, "weight_decay"),
    max_grad_norm: Optional[float] = config_option(H, "max_grad_norm"),
    max_length: Optional[int] = config_option(H, "max_length"),
    packing: Optional[bool] = config_option(H, "packing"),
    responses: Optional[str] = config_option(H, "responses"),
    response_tokens: Optional[int] = config_option(H, "response_tokens"),
    train_last_layers: Optional[int] = config_option(H, "train_last_layers"),
    train_layers: Optional[str] = config_option(H, "train_layers"),
    train_lm_head: Optional[bool] = config_option(H, "train_lm_head", "--train-lm-head/--freeze-lm-head"),
    lora_r: Optional[int] = config_option(H, "lora_r"),
    lora_alpha: Optional[int] = config_option(H, "lora_alpha"),
    lora_dropout: Optional[float] = config_option(H, "lora_dropout"),
    lora_target: Optional[str] = config_option(H, "lora_target", help="LoRA target modules, comma separated, or "
                                               "all-linear."),
    init: Optional[str] = config_option(H, "init"),
    adapter: Optional[str] = config_option(H, "adapter"),
    freeze: Optional[str] = config_option(H, "freeze"),
    teacher: Optional[str] = config_option(H, "teacher"),
    distill_temperature: Optional[float] = config_option(H, "distill_temperature"),
    distill_alpha: Optional[float] = config_option(H, "distill_alpha"),
    distill_top_k: Optional[int] = config_option(H, "distill_top_k"),
    distill_hidden: Optional[float] = config_option(H, "distill_hidden"),
    local_layers: Optional[int] = config_option(H, "local_layers"),
    loss_chunk: Optional[int] = config_option(H, "loss_chunk"),
    train_dtype: Optional[str] = config_option(H, "train_dtype"),
    bf16: Optional[bool] = config_option(H, "bf16", help="bf16 autocast (default: where the hardware computes bf16 "
                                         "natively; fp32 on CPUs without AVX512-BF16/AMX)."),
    gradient_checkpointing: Optional[bool] = config_option(H, "gradient_checkpointing"),
    seed: Optional[int] = config_option(H, "seed"),
    logging_steps: Optional[int] = config_option(H, "logging_steps"),
    save_steps: Optional[int] = config_option(H, "save_steps"),
    resume: bool = typer.Option(False, help="Resume from the last checkpoint in OUT.checkpoints."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder that layerprune wrote."),
    streaming: bool = typer.Option(False, "--streaming", help="methods replace and block-local, one decoder layer in "
                                   "memory at a time: for models bigger than memory (student and teacher stay on "
                                   "disk)."),
    trust_remote_code: bool = trust_remote_code_option(),
) -> None:
    """Heal a pruned model by fine-tuning: partial-layer, LoRA, QLoRA, full, continued pretraining, distillation."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.api import finetune_model

    heal_config = config_from_options(HealConfig, locals(), yaml_path=config,
                                      convert={"train_layers": parse_indices, "lora_target": _targets})
    check_output_dir(out, overwrite, inputs=[model, config, heal_config.data, heal_config.teacher])
    result, path = finetune_model(model, out=out, config=heal_config, resume=resume, overwrite=overwrite,
                                  streaming=streaming)
    if result is None:  # streaming: heal.json says what was fitted
        console.print(f"healed model saved to [bold]{path}[/] ({heal_config.method}, one layer at a time; heal.json)")
        return
    table = Table(title=f"layerprune finetune ({result.method})", show_header=False)
    table.add_row("trainable parameters", f"{result.trainable_params:,} of {result.total_params:,} "
                  f"({100 * result.trainable_params / result.total_params:.1f}%)")
    table.add_row("optimizer steps", str(result.steps))
    table.add_row("tokens seen (with loss)", f"{result.tokens_seen:,}")
    timing = result.notes.get("estimate")
    table.add_row("time", f"{result.seconds:.1f} s training" + (
        f"; {timing['took_seconds']:.0f} s with the teacher pass (estimated {timing['seconds']:.0f} s)" if timing else ""))
    if "time_budget" in result.notes:
        budget = result.notes["time_budget"]
        table.add_row("time budget", f"{budget['minutes']:.3g} min: {result.steps} of {budget['steps_wanted']} steps")
    table.add_row("computed in", result.notes.get("compute", {}).get("dtype", "-"))
    table.add_row("final loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "-")
    console.print(table)
    console.print(f"healed model saved to [bold]{path}[/] (with heal.json, loss.csv, loss.png)")
