"""`layerprune score`: score every layer with importance metrics; write files and plots."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from layerprune.cli.app import MODEL_HELP, app, console, trust_remote_code_option, user_errors
from layerprune.cli.options import parse_indices
from layerprune.errors import LayerpruneError


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
    trust_remote_code: bool = trust_remote_code_option(),
    device_map: Optional[str] = typer.Option(None, help="'auto' to spread a large model over devices (accelerate)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder that layerprune wrote."),
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
    check_output_dir(out, overwrite, inputs=[model, *sources])
    if streaming:
        from layerprune.importance.streaming import load_skeleton, stream_scores

        if device_map is not None or len(sample_counts) > 1 or seeds > 1 or len(sources) > 1:
            raise LayerpruneError("--streaming scores one calibration setting on the CPU: --device-map and the "
                                  "stability study (several --n-samples, --seeds or --calib) need the loaded model")
        loaded = load_skeleton(model, dtype=dtype, metrics=names)  # weights stay on disk
    else:
        loaded = load_model(model, dtype=dtype, device_map=device_map, for_compute=True)
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
