"""The `layerprune` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import functools
import re
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
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
    for kind, layers in (record.get("removed_sublayers") or {}).items():
        if layers:
            table.add_row(f"{kind} removed (original indices)", ",".join(map(str, layers)))
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
    target_params: Optional[str] = typer.Option(None, help="Drop the fewest layers (in --metric's order) that leave at most this many parameters: 100M, 1.5B, 350k."),
    target_latency: Optional[float] = typer.Option(None, help="Drop the fewest layers that bring the measured latency to this ratio of the original's (e.g. 0.75)."),
    latency_mode: str = typer.Option("decode", help="Latency that --target-latency measures: decode (one token with a KV cache) | prefill."),
    metric: Optional[str] = typer.Option(None, help="Importance metric that chooses the layers (see `layerprune metrics`; default reverse-order, or attention-influence / mlp-influence with --granularity attention / mlp)."),
    granularity: str = typer.Option("block", help="block: remove whole layers | attention / mlp: remove only the attention / the MLP of the chosen layers (such a model reloads through layerprune only)."),
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
    no_load: bool = typer.Option(
        False, "--no-load", help="Prune the safetensors checkpoint on disk, tensor by tensor, without loading the "
        "model (only with --drop; used by itself when the weights exceed 80% of available memory).",
    ),
) -> None:
    """Remove decoder layers (or only their attention / MLP) and save the pruned model."""
    from layerprune.api import prune_model
    from layerprune.models.checkpoint import on_disk_folder, prune_checkpoint
    from layerprune.outputs import check_output_dir

    given = [x is not None for x in (drop, num_layers, ratio, target_params, target_latency)]
    if sum(given) != 1:
        raise LayerpruneError("give exactly one of --drop, --num-layers, --ratio, --target-params or --target-latency")
    check_output_dir(out, overwrite)
    folder = on_disk_folder(
        model, no_load=no_load, drop_given=drop is not None, say=lambda line: console.print(line, highlight=False),
        model_options={"--sample": bool(sample), "--dtype": dtype != "auto", "--device-map": device_map is not None,
                       "--granularity": granularity != "block"},
    )
    if folder is not None:
        result = prune_checkpoint(folder, parse_indices(drop), out, overwrite=overwrite, source=model)
    else:
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
            target_params=target_params,
            target_latency=target_latency,
            latency_mode=latency_mode,
            granularity=granularity,
        )
    table = Table(title="layerprune prune")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("layers", str(result.layers_before), str(result.layers_after))
    pct = 100 * (1 - result.params_after / result.params_before)
    table.add_row("parameters", f"{result.params_before:,}", f"{result.params_after:,} (-{pct:.1f}%)")
    console.print(table)
    what = {"attention": "removed the attention of", "mlp": "removed the MLP of"}.get(
        getattr(result, "granularity", "block"), "dropped")
    console.print(f"{what} original layers: {','.join(map(str, result.dropped))}  (chosen by: {result.chosen_by})")
    if "estimated_latency_ratio" in getattr(result, "how", {}):
        console.print(f"estimated {result.how['latency']['mode']} latency: {result.how['estimated_latency_ratio']:.3f} "
                      f"of the original's (target {result.how['target_latency']})")
    for before, after in zip(result.samples_before, result.samples_after):
        console.print(f"\n[bold]prompt:[/] {escape(before['prompt'])}", highlight=False)
        console.print(f"  [cyan]original:[/] {escape(repr(before['completion']))}", highlight=False)
        console.print(f"  [magenta]pruned:[/]   {escape(repr(after['completion']))}", highlight=False)
    reload = ("layerprune.load_model only: stock transformers cannot describe a layer without attention or MLP"
              if getattr(result, "granularity", "block") != "block" else "AutoModelForCausalLM.from_pretrained")
    console.print(f"\npruned model saved to [bold]{result.out}[/] (reload: {reload})")


@app.command()
@user_errors
def score(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Folder for scores.json/csv/md and plots."),
    metric: str = typer.Option("all", help="Metric name(s), comma separated, or 'all'."),
    calib: str = typer.Option("c4", help="Calibration text(s), comma separated: c4 | wikitext2 | ptb | a .txt/.jsonl file | a hub dataset id."),
    calib_field: str = typer.Option("text", help="Text field of a JSONL/hub calibration source."),
    n_samples: str = typer.Option("10", help="Calibration samples; a list (1,5,10,30) runs the stability study."),
    seq_len: int = typer.Option(128, help="Tokens per calibration sample."),
    seed: int = typer.Option(0, help="Seed of calibration sampling and the random metric."),
    seeds: int = typer.Option(1, help="Stability study: number of calibration seeds per setting."),
    block_size: Optional[int] = typer.Option(None, help="Angular distance block size m (default: the number of layers to drop; its table covers every m)."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", "-n", help="Layers each metric would drop (default 25%)."),
    ratio: Optional[float] = typer.Option(None, help="Fraction each metric would drop."),
    dtype: str = typer.Option("auto", help="auto | bf16 | fp16 | fp32"),
    device_map: Optional[str] = typer.Option(None, help="'auto' to spread a large model over devices (accelerate)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    streaming: bool = typer.Option(
        False, "--streaming", help="Read one layer at a time from the checkpoint, for models bigger than memory "
        "(block-influence, relative-magnitude, angular, magnitude-l1/-l2 and the order baselines).",
    ),
) -> None:
    """Score every layer with one or more importance metrics; write files and plots."""
    from rich.progress import Progress

    from layerprune.data.calibration import load_calibration
    from layerprune.models.loading import load_model
    from layerprune.models.surgery import kept_layers
    from layerprune.outputs import atomic_output_dir, check_output_dir, write_json
    from layerprune.importance import compute_many, get_metric
    from layerprune.scoring import (
        default_n_drop, metric_requests, parse_metrics, select_for_each, stability_markdown, stability_study,
        write_score_files,
    )

    names = parse_metrics(metric)
    sample_counts = [int(x) for x in parse_indices(n_samples)]
    sources = [c.strip() for c in calib.split(",") if c.strip()]
    check_output_dir(out, overwrite)
    if streaming:
        from layerprune.importance.streaming import load_skeleton, stream_scores

        if device_map is not None or len(sample_counts) > 1 or seeds > 1 or len(sources) > 1:
            raise LayerpruneError("--streaming scores one calibration setting on the CPU: --device-map and the "
                                  "stability study (several --n-samples, --seeds or --calib) need the loaded model")
        loaded = load_skeleton(model, dtype=dtype, metrics=names)  # weights stay on disk
    else:
        loaded = load_model(model, dtype=dtype, device_map=device_map)
    n_layers = len(kept_layers(loaded.model))
    n_drop = default_n_drop(n_layers, num_layers, ratio)
    block_size = block_size or n_drop
    requests = metric_requests(names, n_layers, seed=seed, block_size=block_size)
    calibration = None
    if any(get_metric(n).needs_calibration for n in names):
        if loaded.tokenizer is None:
            raise LayerpruneError(f"{model} has no tokenizer, so calibration text cannot be encoded")
        calibration = load_calibration(
            loaded.tokenizer, sources[0], n_samples=sample_counts[0], seq_len=seq_len, seed=seed, field=calib_field
        )
    console.print(f"scoring {n_layers} layers with {', '.join(names)}" + (f" on {calibration.description}" if calibration else ""))
    if streaming:
        all_scores = stream_scores(loaded.path, calibration, requests, dtype=dtype)
    else:
        all_scores = compute_many(loaded.model, requests, calibration)
    selections = select_for_each(all_scores, n_drop)
    study = None
    if len(sample_counts) > 1 or seeds > 1 or len(sources) > 1:
        settings = len(sources) * len(sample_counts) * seeds
        with Progress(console=console) as progress:
            task = progress.add_task("stability study", total=settings)
            study = stability_study(
                loaded.model, loaded.tokenizer, names, sources=sources, n_samples_list=sample_counts, seeds=seeds,
                seq_len=seq_len, n_drop=n_drop, block_size=block_size, progress=lambda: progress.advance(task),
            )
    with atomic_output_dir(out, overwrite) as tmp:
        from pathlib import Path

        written = write_score_files(Path(tmp), all_scores, selections, model)
        if study is not None:
            write_json(Path(tmp) / "stability.json", study)
            (Path(tmp) / "stability.md").write_text(stability_markdown(study))
    _print_scores(all_scores, selections)
    if study is not None:
        console.print(stability_markdown(study))
    console.print(f"wrote {', '.join(p.name for p in written)}{', stability.json/md' if study else ''} to [bold]{out}[/]")


def _print_scores(all_scores, selections) -> None:
    names = list(all_scores)
    table = Table(title="layer scores (higher = keep; * = would be dropped)")
    table.add_column("layer", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    layers = next(iter(all_scores.values())).layers
    for pos, layer in enumerate(layers):
        cells = []
        for name in names:
            value = all_scores[name].values[pos]
            mark = "*" if layer in selections[name].dropped else ""
            cells.append("-" if value != value else f"{value:.4g}{mark}")
        table.add_row(str(layer), *cells)
    console.print(table)


def validated(config_cls, values: dict, yaml_path: str | None = None):
    """A pydantic config from a YAML file overlaid with the options given on the command line."""
    from layerprune.config import build_config, read_yaml_mapping

    data = read_yaml_mapping(yaml_path) if yaml_path else {}
    data.update({k: v for k, v in values.items() if v is not None})
    return build_config(config_cls, data, where_prefix="invalid setting ")


@app.command()
@user_errors
def finetune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the healed model, heal.json and the loss curve."),
    method: Optional[str] = typer.Option(None, help="partial | lora | qlora | full | cpt | distill (default partial)."),
    data: Optional[str] = typer.Option(None, help="dolly | a Dolly/Alpaca .json/.jsonl file | a hub dataset id; cpt: c4 | a text file (not wikitext2/ptb: they are the evaluation test sets)."),
    fields: Optional[str] = typer.Option(None, help="Field mapping for other formats, e.g. instruction=question,context=,response=answer."),
    template: str = typer.Option("auto", help="Prompt format: auto (chat template if any) | chat | alpaca."),
    max_samples: Optional[int] = typer.Option(None, help="Use at most N examples (quick runs)."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file with HealConfig settings; options override it."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 1e-5, the seed's; 1e-4 suits small models)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs (default 2)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Micro-batch per device (default 8)."),
    effective_batch_size: Optional[int] = typer.Option(None, help="Examples per optimizer step (default 64)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Warm-up steps (default 100)."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per example (default 1024)."),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="Pack examples into full sequences."),
    train_last_layers: Optional[int] = typer.Option(None, help="partial: train the last K layers (default 3)."),
    train_layers: Optional[str] = typer.Option(None, help="partial: ORIGINAL indices of the layers to train."),
    train_lm_head: Optional[bool] = typer.Option(None, "--train-lm-head/--freeze-lm-head", help="partial: train lm_head."),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank (default 8)."),
    teacher: Optional[str] = typer.Option(None, help="distill: the teacher (default: the model this one was pruned from)."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: where supported)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    save_steps: Optional[int] = typer.Option(None, help="Checkpoint every N steps, for --resume."),
    seed: Optional[int] = typer.Option(None, help="Seed (default 0)."),
    resume: bool = typer.Option(False, help="Resume from the last checkpoint in OUT.checkpoints."),
    dtype: str = typer.Option("fp32", help="Weights dtype while training (bf16 autocast is separate)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Heal a pruned model by fine-tuning: partial-layer, LoRA, QLoRA, full, continued pretraining, distillation."""
    from layerprune.api import finetune_model
    from layerprune.data.instructions import FieldMap
    from layerprune.finetune import HealConfig
    from layerprune.outputs import check_output_dir

    heal_config = validated(
        HealConfig,
        {
            "method": method, "learning_rate": lr, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
            "effective_batch_size": effective_batch_size, "warmup_steps": warmup_steps, "max_length": max_length,
            "packing": packing, "train_last_layers": train_last_layers,
            "train_layers": parse_indices(train_layers) if train_layers else None, "train_lm_head": train_lm_head,
            "lora_r": lora_r, "teacher": teacher, "bf16": bf16, "gradient_checkpointing": gradient_checkpointing,
            "save_steps": save_steps, "seed": seed,
        },
        config,
    )
    check_output_dir(out, overwrite)
    result, path = finetune_model(
        model, out=out, config=heal_config, data=data, max_samples=max_samples,
        fields=FieldMap.parse(fields) if fields else None, template=template, dtype=dtype, resume=resume,
        overwrite=overwrite,
    )
    table = Table(title=f"layerprune finetune ({result.method})", show_header=False)
    table.add_row("trainable parameters", f"{result.trainable_params:,} of {result.total_params:,} "
                  f"({100 * result.trainable_params / result.total_params:.1f}%)")
    table.add_row("optimizer steps", str(result.steps))
    table.add_row("tokens seen (with loss)", f"{result.tokens_seen:,}")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("final loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "-")
    console.print(table)
    console.print(f"healed model saved to [bold]{path}[/] (with heal.json, loss.csv, loss.png)")


@app.command()
@user_errors
def run(
    config: str = typer.Argument(..., help="Run YAML (see examples/)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder (overrides the YAML's out)."),
    sets: Optional[list[str]] = typer.Option(
        None, "--set", help="Override a setting: --set model=smollm2-135m --set heal.0.learning_rate=1e-4 (repeatable)."),
) -> None:
    """Run score -> select -> prune -> heal -> eval -> bench -> report from one YAML; reruns resume.

    A YAML with a `grid:` of lists is a study: one run per combination, sharing work, ending in
    study.md/.csv/.html and plots."""
    from layerprune.config import load_run_config, read_yaml_mapping
    from layerprune.pipeline import run_pipeline
    from layerprune.study import is_study, load_study

    if is_study(read_yaml_mapping(config)):
        _run_study(load_study(config, {"out": out} if out else None, sets))
        return
    run_config = load_run_config(config, {"out": out} if out else None, sets)
    console.print(f"run folder: [bold]{run_config.out}[/]")
    summary = run_pipeline(run_config, log=lambda message: console.print(f"[dim]»[/] {message}", highlight=False))
    from pathlib import Path

    console.print(Path(run_config.out, "report.md").read_text(), highlight=False, markup=False, soft_wrap=True)
    console.print(f"done in {summary['wall_time_s']:.0f} s; final model: [bold]{summary['final_model']}[/]")


def _run_study(study) -> None:
    from pathlib import Path

    console.print(f"study folder: [bold]{study.out}[/] ({len(study.settings)} settings)")
    record = study.execute(log=lambda message: console.print(f"[dim]»[/] {message}", highlight=False))
    console.print(Path(study.out, "study.md").read_text(), highlight=False, markup=False, soft_wrap=True)
    console.print(f"done in {record['wall_time_s']:.0f} s; tables: study.md, study.csv, study.html; "
                  f"plots in {Path(study.out, 'plots')}")


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


# Commands that live in their own modules register themselves on `app` when imported.
from layerprune import cli_bench, cli_eval  # noqa: E402,F401
from layerprune import cli_export  # noqa: E402,F401
from layerprune import cli_report  # noqa: E402,F401


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    # Run through the imported module, on whose `app` the other command modules registered.
    from layerprune.cli import main as _main

    sys.exit(_main())
