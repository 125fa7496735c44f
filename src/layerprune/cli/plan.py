"""`layerprune plan`: the memory, disk and time plan of prune -> heal -> eval, before any weight is read."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from layerprune.cli.app import MODEL_HELP, app, console, trust_remote_code_option, user_errors
from layerprune.cli.options import config_from_options
from layerprune.common.units import format_seconds
from layerprune.evaluation.config import EvalConfig
from layerprune.finetune.config import HealConfig


@app.command("plan")
@user_errors
def plan_command(
    model: str = typer.Argument(..., help=MODEL_HELP + " Only its config is read."),
    ratio: Optional[float] = typer.Option(None, help="Share of the layers to remove (default 0.25)."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", "-n", help="Layers to remove (0: the model as "
                                             "it is, e.g. an already pruned model to heal)."),
    expert_ratio: Optional[float] = typer.Option(None, help="Mixture-of-experts models: share of the experts to "
                                                 "remove from every MoE layer (as prune --expert-ratio)."),
    num_experts: Optional[int] = typer.Option(None, help="Mixture-of-experts models: experts to remove from every "
                                              "MoE layer."),
    method: str = typer.Option("distill", help="Healing method (as finetune --method)."),
    adapter: str = typer.Option("auto", help="auto (full weights where they fit, else LoRA, QLoRA on a GPU, else "
                                "layer-local) | none | lora."),
    batch_size: int = typer.Option(4, help="Healing micro-batch per device."),
    max_length: int = typer.Option(256, help="Healing tokens per example."),
    gradient_checkpointing: bool = typer.Option(False, help="Plan with activation recomputation."),
    max_samples: Optional[int] = typer.Option(None, help="Healing rows (layer-local methods: default 64)."),
    n_samples: int = typer.Option(10, help="Calibration rows of the scores."),
    seq_len: int = typer.Option(256, help="Tokens per calibration row."),
    ppl_windows: int = typer.Option(300, help="Perplexity windows of the evaluation."),
    gpus: Optional[int] = typer.Option(None, help="Plan for this many GPUs instead of this machine."),
    gpu_memory: str = typer.Option("80GB", help="Memory of each GPU given by --gpus."),
    gguf: Optional[str] = typer.Option(None, help="Count a GGUF export of the healed model in this quantization "
                                       "(f16, q8_0, q4_k_m, ...) on disk."),
    out: str = typer.Option(".", help="Where the outputs will be written: the free space of its disk is checked."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    trust_remote_code: bool = trust_remote_code_option(),
) -> None:
    """Peak memory per device, disk and time of score -> prune -> teacher -> heal -> eval, and the healing that
    fits, from the model's config alone (nothing is loaded)."""
    from layerprune.api import plan_job  # start-up: `--help` loads no torch (cli/__init__.py)
    from layerprune.planning.disk import disk_lines

    plan = plan_job(model, num_layers=num_layers, ratio=ratio, adapter=adapter, gpus=gpus, gpu_memory=gpu_memory,
                    trust_remote_code=trust_remote_code, gguf=gguf, out=out, expert_ratio=expert_ratio,
                    num_experts=num_experts,
                    heal=config_from_options(HealConfig, dict(  # one line naming the option on a bad value
                        method=method, batch_size=batch_size, max_length=max_length, max_samples=max_samples,
                        gradient_checkpointing=gradient_checkpointing)),
                    prune={"calibration": {"n_samples": n_samples, "seq_len": seq_len}},
                    evaluation=config_from_options(EvalConfig, {"ppl_windows": ppl_windows}))
    if as_json:
        print(json.dumps(plan.to_json(), indent=2))
        return
    experts = f", {plan.experts} -> {plan.experts_kept} experts per MoE layer" if plan.experts != plan.experts_kept \
        else ""
    table = Table(title=f"plan: {model}, {plan.layers} -> {plan.layers_kept} layers{experts} "
                        f"({plan.params / 1e9:.2f}B -> {plan.params_kept / 1e9:.2f}B params) on {plan.devices}")
    for column in ("stage", "peak per device", "fits", "time", "how"):
        table.add_column(column, justify="right" if column in ("peak per device", "time") else "left")
    for row in plan.stages:
        table.add_row(row["stage"], f"{row['peak_gib']:.1f} GiB", "yes" if row["fits"] else "[red]no[/]",
                      format_seconds(row["seconds"]), row["detail"])
    console.print(table)
    console.print(healing_line(plan))
    cards = [f"{gb} {c['option']} ({c['peak_gib']:.1f} GiB" + ("; the teacher pass from disk" if c.get("teacher") ==
                                                                 "from disk" else "") + ")"
             if c["fits"] else f"{gb} [red]none fits[/]" for gb, c in plan.heal_per_card.items()]
    console.print("healing on one GPU of " + ", ".join(cards))
    if plan.gpus_for_full_heal:
        console.print(f"a full-weight heal needs {plan.gpus_for_full_heal} of these GPUs (FSDP)")
    for line in disk_lines(plan.disk):
        console.print(line.replace("DOES NOT FIT", "[red]does not fit[/]"), highlight=False)


def healing_line(plan) -> str:
    """The healing chosen, with its teacher pass where it has one, and whether both fit."""
    choice, teacher = plan.heal, plan.heal.get("teacher_pass")
    line = f"healing: {choice['option']}" + (f", after its teacher pass ({teacher['peak_gib']:.1f} GiB)" if teacher
                                             else "")
    if not choice["fits"]:
        return line + " [red](does not fit: nothing does)[/]"
    if teacher and not teacher["fits"]:
        return line + ": [red]the teacher pass does not fit[/] (the teacher is then read layer by layer from disk)"
    return line + (": both fit" if teacher else ": fits")
