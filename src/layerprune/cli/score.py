"""`layerprune score`: score every layer with importance metrics; write files and plots."""

from __future__ import annotations

from typing import Optional

import typer
from rich.progress import Progress
from rich.table import Table

from layerprune.cli.app import MODEL_HELP, app, console, trust_remote_code_option, user_errors
from layerprune.cli.options import CALIBRATION_OPTIONS, config_from_options, config_option, parse_int_list
from layerprune.common.config_base import DEFAULT_DTYPE, comma_list
from layerprune.errors import LayerpruneError
from layerprune.selection.config import CalibrationConfig, ScoreConfig, StabilityConfig

S = ScoreConfig
C = CalibrationConfig


@app.command()
@user_errors
def score(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Folder for scores.json/csv/md and plots."),
    metric: Optional[str] = config_option(S, "metric"),
    calib: Optional[str] = config_option(C, "source", option="calib", help="Calibration text(s), comma separated "
                                         "(several run the stability study): c4 | wikitext2 | ptb | a .txt/.jsonl "
                                         "file | a hub dataset id."),
    calib_field: Optional[str] = config_option(C, "field", option="calib_field"),
    n_samples: Optional[str] = config_option(C, "n_samples", help="Calibration samples; a list (1,5,10,30) runs the "
                                             "stability study."),
    seq_len: Optional[int] = config_option(C, "seq_len"),
    seed: Optional[int] = config_option(C, "seed"),
    seeds: int = typer.Option(1, help="Stability study: number of calibration seeds per setting."),
    block_size: Optional[int] = config_option(S, "block_size"),
    num_layers: Optional[int] = config_option(S, "num_layers", "--num-layers", "-n"),
    ratio: Optional[float] = config_option(S, "ratio"),
    streaming: Optional[bool] = config_option(S, "streaming", "--streaming"),
    expert_metric: Optional[str] = config_option(S, "expert_metric"),
    dtype: str = typer.Option(DEFAULT_DTYPE, help="auto | bf16 | fp16 | fp32"),
    trust_remote_code: bool = trust_remote_code_option(),
    device_map: Optional[str] = typer.Option(None, help="'auto' to spread a large model over devices (accelerate)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder that layerprune wrote."),
) -> None:
    """Score every layer with one or more importance metrics; write files and plots."""
    # start-up: `layerprune --help` loads no torch (cli/__init__.py)
    from layerprune.api import score_model
    from layerprune.importance.experts.registry import expert_scores_markdown
    from layerprune.selection.scores import stability_markdown

    sources = comma_list(calib) if calib is not None else [C().source]
    sample_counts = parse_int_list(n_samples, "--n-samples") if n_samples is not None else [C().n_samples]
    stability = None
    if len(sample_counts) > 1 or seeds > 1 or len(sources) > 1:
        stability = {"sources": sources, "n_samples": sample_counts, "seeds": seeds}
    options = {**locals(), "calib": sources[0] if calib is not None else None,
               "n_samples": sample_counts[0] if n_samples is not None else None}
    config = config_from_options(ScoreConfig, options, nested={"calibration": CALIBRATION_OPTIONS})
    if stability is not None:
        config = config.model_copy(update={"stability": StabilityConfig(**stability)})
    if config.streaming and device_map is not None:
        raise LayerpruneError("--streaming scores one calibration setting on the CPU: --device-map needs the loaded "
                              "model")
    with Progress(console=console, disable=stability is None) as bar:
        task = bar.add_task("stability study", total=len(sources) * len(sample_counts) * seeds)
        result = score_model(model, out=out, config=config, dtype=dtype, device_map=device_map, overwrite=overwrite,
                             progress=lambda: bar.advance(task), log=console.print)
    if result.scores:
        _print_scores(result.scores, result.selections)
    if result.experts:
        console.print(expert_scores_markdown(result.experts), highlight=False)
    if result.stability is not None:
        console.print(stability_markdown(result.stability))
    written = [*(["scores.json/csv/md and plots"] if result.scores else []),
               *(["expert_scores.json/md"] if result.experts else []), *(["stability.json/md"] if result.stability
                                                                          else [])]
    console.print(f"wrote {', '.join(written)} to [bold]{out}[/]")


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
