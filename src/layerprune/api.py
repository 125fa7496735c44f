"""High-level operations shared by the CLI and Python users."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from layerprune.errors import LayerpruneError
from layerprune.importance import compute_scores, get_metric
from layerprune.models.anatomy import count_parameters
from layerprune.models.loading import load_model
from layerprune.models.saving import save_model, write_model_files
from layerprune.models.sublayer import remove_units
from layerprune.models.surgery import kept_layers, validate_drop
from layerprune.outputs import check_output_dir
from layerprune.selection import count_to_drop


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
    how: dict = field(default_factory=dict)  # the selection record (budgets keep their measured numbers here)
    granularity: str = "block"  # what went from each dropped layer: the whole block, its attention or its MLP


# The metric that chooses what to remove when none is named, per granularity (`prune --granularity`).
DEFAULT_METRICS = {"block": "reverse-order", "attention": "attention-influence", "mlp": "mlp-influence"}


def choose_layers(
    model,
    *,
    drop: list[int] | None = None,
    num_layers: int | None = None,
    ratio: float | None = None,
    metric: str | None = None,
    metric_params: dict | None = None,
    calibration=None,
    protect_first: int = 0,
    protect_last: int = 0,
    target_params: int | str | None = None,
    target_latency: float | None = None,
    latency_mode: str = "decode",
    granularity: str = "block",
) -> tuple[list[int], dict]:
    """The ORIGINAL indices to drop and a record of how they were chosen.

    granularity "attention" / "mlp": the layers whose attention / MLP alone goes (see `choose_sublayers`).
    """
    from layerprune.budgets import Budget, select_with_budget

    _check_granularity(granularity, metric, drop, target_params is not None or target_latency is not None)
    if granularity != "block":
        return choose_sublayers(
            model, granularity, drop=drop, num_layers=num_layers, ratio=ratio, metric=metric,
            metric_params=metric_params, calibration=calibration, protect_first=protect_first,
            protect_last=protect_last,
        )
    metric = metric or DEFAULT_METRICS["block"]
    if drop is not None:
        return validate_drop(model, drop), {"chosen_by": "explicit"}
    budget = Budget(num_layers=num_layers, ratio=ratio, target_params=target_params, target_latency=target_latency,
                    latency_mode=latency_mode)
    params = dict(metric_params or {})
    n_layers = len(kept_layers(model))
    if metric == "angular" and "block_size" not in params:
        # Angular distance scores contiguous blocks: the block is as long as the cut. A target's cut is not
        # known yet, so score every block size and let the budget pick.
        if budget.is_target:
            params.update(block_size=1, max_block_size=n_layers)
        else:
            params["block_size"] = count_to_drop(n_layers, num_layers=num_layers, ratio=ratio)
            budget = Budget(num_layers=params["block_size"])
    scores = compute_scores(model, metric, calibration, **params)
    selection = select_with_budget(model, scores, budget, protect_first=protect_first, protect_last=protect_last)
    how = {"chosen_by": metric, "metric_params": scores.params, **selection.constraints}
    if scores.calibration:
        how["calibration"] = scores.calibration
    return selection.dropped, how


def choose_sublayers(
    model,
    kind: str,
    *,
    drop: list[int] | None = None,
    num_layers: int | None = None,
    ratio: float | None = None,
    metric: str | None = None,
    metric_params: dict | None = None,
    calibration=None,
    protect_first: int = 0,
    protect_last: int = 0,
) -> tuple[list[int], dict]:
    """The ORIGINAL layers whose attention (kind "attention") or MLP ("mlp") alone to remove, and how.

    Candidates are the layers that still have both branches; num_layers/ratio count branches of those.
    protect_first/protect_last count the first/last layers of the current model, as for whole layers.
    """
    from layerprune.importance.base import LayerScores
    from layerprune.importance.registry import check_granularity
    from layerprune.models.sublayer import check_sublayers, removable_layers
    from layerprune.models.surgery import provenance
    from layerprune.selection import select_layers

    record = provenance(model)
    if drop is not None:
        return check_sublayers(record, kind, drop), {"chosen_by": "explicit", "granularity": kind}
    metric = metric or DEFAULT_METRICS[kind]
    check_granularity(metric, kind)
    candidates = removable_layers(record, kind)
    k = count_to_drop(len(candidates), num_layers=num_layers, ratio=ratio)
    kept = record["kept_layers"]
    protected = set(kept[:protect_first]) | set(kept[len(kept) - protect_last:] if protect_last else [])
    scores = compute_scores(model, metric, calibration, **(metric_params or {}))
    pairs = [(layer, v) for layer, v in zip(scores.layers, scores.values)
             if layer in candidates and layer not in protected]
    if k > len(pairs):
        raise LayerpruneError(f"cannot remove {k} {kind} branches: only {len(pairs)} layers are candidates")
    eligible = LayerScores(scores.metric, [p[0] for p in pairs], [p[1] for p in pairs], scores.params)
    dropped = sorted(eligible.ranking()[:k])
    check_sublayers(record, kind, dropped)
    how = {"chosen_by": metric, "granularity": kind, "metric_params": scores.params, "num_layers": k,
           "protect_first": protect_first, "protect_last": protect_last}
    if scores.calibration:
        how["calibration"] = scores.calibration
    return dropped, how


def _check_granularity(granularity: str, metric: str | None, drop, budget_given: bool) -> None:
    """Refuse, before any model loads, what a granularity cannot do."""
    from layerprune.importance.registry import check_granularity
    from layerprune.models.sublayer import GRANULARITIES

    if granularity not in GRANULARITIES:
        raise LayerpruneError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    if drop is not None:
        return
    if granularity != "block" and budget_given:
        raise LayerpruneError(
            f"parameter/latency targets choose whole layers; with granularity {granularity!r} give a number or ratio"
        )
    check_granularity(metric or DEFAULT_METRICS[granularity], granularity)


def prune_model(
    model_ref: str,
    *,
    out: str,
    drop: list[int] | None = None,
    num_layers: int | None = None,
    ratio: float | None = None,
    metric: str | None = None,
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
    target_params: int | str | None = None,
    target_latency: float | None = None,
    latency_mode: str = "decode",
    granularity: str = "block",
) -> PruneResult:
    """Load, choose layers, remove them, save; optionally generate samples before and after.

    granularity: "block" removes whole layers; "attention" / "mlp" remove only that branch of each chosen
    layer (such a model reloads through `layerprune.load_model` only, see models/sublayer.py). metric
    None: reverse-order for blocks, attention-influence / mlp-influence for branches.
    """
    check_output_dir(out, overwrite)
    _check_granularity(granularity, metric, drop, target_params is not None or target_latency is not None)
    metric = metric or DEFAULT_METRICS[granularity]
    if drop is None and num_layers is None and ratio is None and target_params is None and target_latency is None:
        raise LayerpruneError(
            "say what to drop: drop=[...], num_layers=N, ratio=R, target_params=P or target_latency=L")
    if drop is None:
        from layerprune.budgets import Budget

        # A bad budget fails before the model loads.
        Budget(num_layers=num_layers, ratio=ratio, target_params=target_params, target_latency=target_latency,
               latency_mode=latency_mode)
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
        target_params=target_params,
        target_latency=target_latency,
        latency_mode=latency_mode,
        granularity=granularity,
    )
    samples_before = _samples(loaded, prompts, max_new_tokens)
    remove_units(model, dropped, granularity, how=how)
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
        how=how,
        granularity=granularity,
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


# Bundled texts that are evaluation test sets (see resources/data/MANIFEST.md): never training data.
EVALUATION_ONLY_TEXTS = ("wikitext2", "ptb")


def prepare_training_rows(method: str, tokenizer, data: str | None, config, *, max_samples=None, fields=None,
                          template: str = "auto", seed: int = 0) -> tuple[list[dict], dict]:
    """Tokenized training rows for a healing method and a description of the data."""
    from layerprune.data.instructions import load_examples, pack, tokenize_examples, tokenize_text
    from layerprune.data.sources import read_texts
    from layerprune.finetune.methods import get_method

    if tokenizer is None:
        raise LayerpruneError("healing needs the model's tokenizer")
    if get_method(method).raw_text:
        source = data or "c4"
        if source in EVALUATION_ONLY_TEXTS:
            raise LayerpruneError(
                f"the bundled {source} is the TEST split that `layerprune eval` measures perplexity on; training "
                "on it would make that perplexity meaningless. Use c4 (bundled) or a text file of your own")
        rows = tokenize_text(read_texts(source), tokenizer, max_length=config.max_length, max_samples=max_samples)
        return rows, {"source": source, "kind": "raw text", "blocks": len(rows), "block_tokens": config.max_length}
    source = data or "dolly"
    examples = load_examples(source, fields=fields, max_samples=max_samples, seed=seed)
    rows = tokenize_examples(examples, tokenizer, template=template, max_length=config.max_length)
    if config.packing:
        rows = pack(rows, config.max_length)
    return rows, {"source": source, "kind": "instructions", "examples": len(examples), "rows": len(rows),
                  "template": template, "max_length": config.max_length, "packing": config.packing}


def finetune_model(
    model_ref: str,
    *,
    out: str,
    config,
    data: str | None = None,
    max_samples: int | None = None,
    fields=None,
    template: str = "auto",
    dtype: str = "fp32",
    resume: bool = False,
    overwrite: bool = False,
):
    """Load a (pruned) model, heal it with config.method, save a stock checkpoint + loss curve + heal.json."""
    import shutil

    from layerprune.finetune import heal
    from layerprune.finetune.trainer import write_loss_curve
    from layerprune.outputs import atomic_output_dir, write_json

    check_output_dir(out, overwrite)
    loaded = load_model(model_ref, dtype=dtype)
    rows, data_info = prepare_training_rows(
        config.method, loaded.tokenizer, data, config, max_samples=max_samples, fields=fields, template=template,
        seed=config.seed,
    )
    teacher = None
    if config.method == "distill":
        teacher_ref = config.teacher or loaded.model.config.layerprune.get("source")
        if not teacher_ref or teacher_ref == model_ref:
            raise LayerpruneError("distillation needs a teacher: set teacher (the unpruned model)")
        teacher = load_model(teacher_ref, dtype=dtype, load_tokenizer=False).model
    work_dir = Path(f"{Path(out)}.checkpoints")
    result = heal(loaded.model, rows, config, tokenizer=loaded.tokenizer, teacher=teacher, work_dir=work_dir,
                  resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return result, Path(out)  # under accelerate/torchrun only the main process writes
    record = {"heal": {**result.summary(), "config": config.model_dump(), "data": data_info}}
    history = list(result.model.config.layerprune.get("history", []))
    history.append({"healed": config.method, "data": data_info["source"]})
    result.model.config.layerprune = {**result.model.config.layerprune, "history": history}
    with atomic_output_dir(out, overwrite) as tmp:
        write_model_files(result.model, loaded.tokenizer, tmp, extra=record)
        write_json(Path(tmp) / "heal.json", record["heal"])
        write_loss_curve(result.loss_curve, Path(tmp))
    shutil.rmtree(work_dir, ignore_errors=True)
    return result, Path(out)
