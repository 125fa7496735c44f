"""High-level operations shared by the CLI and Python users."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from layerprune.errors import LayerpruneError
from layerprune.importance import compute_scores, get_metric
from layerprune.models.anatomy import count_parameters
from layerprune.models.loading import load_model
from layerprune.models.saving import save_model
from layerprune.models.surgery import kept_layers, remove_layers, validate_drop
from layerprune.outputs import check_output_dir
from layerprune.selection import count_to_drop, select_layers


@dataclass
class PruneResult:
    out: Path
    dropped: list[int]
    chosen_by: str
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    samples_before: list[dict] = field(default_factory=list)
    samples_after: list[dict] = field(default_factory=list)


def choose_layers(
    model,
    *,
    drop: list[int] | None = None,
    num_layers: int | None = None,
    ratio: float | None = None,
    metric: str = "reverse-order",
    metric_params: dict | None = None,
    calibration=None,
    protect_first: int = 0,
    protect_last: int = 0,
) -> tuple[list[int], dict]:
    """The ORIGINAL indices to drop and a record of how they were chosen."""
    if drop is not None:
        return validate_drop(model, drop), {"chosen_by": "explicit"}
    params = dict(metric_params or {})
    if metric == "angular" and "block_size" not in params:
        # Angular distance scores contiguous blocks: the block is as long as the cut.
        params["block_size"] = count_to_drop(len(kept_layers(model)), num_layers=num_layers, ratio=ratio)
        num_layers, ratio = params["block_size"], None
    scores = compute_scores(model, metric, calibration, **params)
    selection = select_layers(
        scores, num_layers=num_layers, ratio=ratio, protect_first=protect_first, protect_last=protect_last
    )
    how = {"chosen_by": metric, "metric_params": scores.params, **selection.constraints}
    if scores.calibration:
        how["calibration"] = scores.calibration
    return selection.dropped, how


def prune_model(
    model_ref: str,
    *,
    out: str,
    drop: list[int] | None = None,
    num_layers: int | None = None,
    ratio: float | None = None,
    metric: str = "reverse-order",
    metric_params: dict | None = None,
    protect_first: int = 0,
    protect_last: int = 0,
    calib: str = "c4",
    n_samples: int = 10,
    seq_len: int = 128,
    calib_seed: int = 0,
    dtype: str = "auto",
    device_map: str | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 40,
    overwrite: bool = False,
) -> PruneResult:
    """Load, choose layers, remove them, save; optionally generate samples before and after."""
    check_output_dir(out, overwrite)
    if drop is None and num_layers is None and ratio is None:
        raise LayerpruneError("say what to drop: drop=[...], num_layers=N or ratio=R")
    if drop is None:
        get_metric(metric)  # unknown names fail before the model loads
    loaded = load_model(model_ref, dtype=dtype, device_map=device_map)
    model = loaded.model
    if prompts and loaded.tokenizer is None:
        raise LayerpruneError(f"{model_ref} has no tokenizer, so no generation samples can be made")
    before = count_parameters(model)
    n_before = len(before["per_layer"])
    calibration = None
    if drop is None and get_metric(metric).needs_calibration:
        calibration = _calibration(loaded, calib, n_samples, seq_len, calib_seed)
    dropped, how = choose_layers(
        model,
        drop=drop,
        num_layers=num_layers,
        ratio=ratio,
        metric=metric,
        metric_params=metric_params,
        calibration=calibration,
        protect_first=protect_first,
        protect_last=protect_last,
    )
    samples_before = _samples(loaded, prompts, max_new_tokens)
    remove_layers(model, dropped, how=how)
    samples_after = _samples(loaded, prompts, max_new_tokens)
    after = count_parameters(model)
    save_model(model, loaded.tokenizer, out, overwrite=overwrite)
    return PruneResult(
        out=Path(out),
        dropped=dropped,
        chosen_by=how["chosen_by"],
        layers_before=n_before,
        layers_after=len(after["per_layer"]),
        params_before=before["total"],
        params_after=after["total"],
        samples_before=samples_before,
        samples_after=samples_after,
    )


def _samples(loaded, prompts, max_new_tokens):
    if not prompts:
        return []
    from layerprune.evaluation.generation import generate_samples

    return generate_samples(loaded.model, loaded.tokenizer, prompts, max_new_tokens)


def _calibration(loaded, source: str, n_samples: int, seq_len: int, seed: int):
    from layerprune.data.calibration import load_calibration

    if loaded.tokenizer is None:
        raise LayerpruneError(f"{loaded.ref} has no tokenizer, so calibration text cannot be encoded")
    return load_calibration(loaded.tokenizer, source, n_samples=n_samples, seq_len=seq_len, seed=seed)
