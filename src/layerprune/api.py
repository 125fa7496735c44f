"""High-level operations shared by the CLI, YAML runs and Python users.

Each takes its stage's typed config (layerprune.config / layerprune.finetune.HealConfig), or that
config's fields as keyword arguments; both are checked before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerprune.common.config_base import as_config
from layerprune.data.calibration import load_calibration_for
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import check_output_dir, is_main_process
from layerprune.finetune.config import HealConfig
from layerprune.models.anatomy import count_parameters
from layerprune.models.dtypes import DEFAULT_DTYPE
from layerprune.models.loading import load_model
from layerprune.models.prune_result import PruneResult  # noqa: F401  (public: layerprune.api.PruneResult)
from layerprune.models.saving import save_model
from layerprune.selection.config import PruneConfig, ScoreConfig
from layerprune.finetune.stage import heal_loaded, heal_model_ref, heal_streaming, write_healed


@dataclass
class ScoreResult:
    scores: dict  # metric -> LayerScores (one score per layer, ORIGINAL indices)
    selections: dict  # metric -> selection.Selection: the layers it would drop
    stability: dict | None = None  # the calibration-stability study, when asked for
    out: Path | None = None


def score_model(
    model_ref: str,
    *,
    out: str | None = None,
    config: ScoreConfig | dict | None = None,
    dtype: str = DEFAULT_DTYPE,
    device_map: str | None = None,
    overwrite: bool = False,
    progress=None,
    log=print,
    **fields,
) -> ScoreResult:
    """Score every layer with each metric of `config` (or its fields: metric="all", calibration={...},
    num_layers=, streaming=True, stability={...}); with `out`, write scores.json/csv/md and plots there
    (and stability.json/md). streaming reads one layer at a time from the checkpoint, for models bigger
    than memory. progress(): called after each setting of the stability study."""
    from layerprune.data.calibration import load_calibration
    from layerprune.importance import compute_many, get_metric
    from layerprune.models.surgery import kept_layers
    from layerprune.selection.scores import metric_requests, select_for_each, stability_study

    config = as_config(ScoreConfig, config, **fields)
    c = config.calibration
    if out is not None:
        check_output_dir(out, overwrite, inputs=[model_ref, c.source, *(config.stability.sources
                                                                         if config.stability else [])])
    loaded = _load_for_scores(model_ref, config, dtype, device_map)
    n_layers = len(kept_layers(loaded.model))
    n_drop = config.n_drop(n_layers)
    requests = metric_requests(config.metrics, n_layers, seed=c.seed, block_size=config.block_size or n_drop)
    calibration = None
    if any(get_metric(n).needs_calibration for n in config.metrics):
        if loaded.tokenizer is None:
            raise LayerpruneError(f"{model_ref} has no tokenizer, so calibration text cannot be encoded")
        calibration = load_calibration(loaded.tokenizer, c.source, n_samples=c.n_samples, seq_len=c.seq_len,
                                       seed=c.seed, field=c.field)
    log(f"scoring {n_layers} layers with {', '.join(config.metrics)}"
        + (f" on {calibration.description}" if calibration else ""))
    if config.streaming:
        from layerprune.importance.streaming import stream_scores

        scores = stream_scores(loaded.path, calibration, requests, dtype=dtype)
    else:
        scores = compute_many(loaded.model, requests, calibration)
    result = ScoreResult(scores, select_for_each(scores, n_drop))
    if config.stability is not None:
        st = config.stability
        result.stability = stability_study(loaded.model, loaded.tokenizer, config.metrics, sources=st.sources,
                                           n_samples_list=st.n_samples, seeds=st.seeds, seq_len=c.seq_len,
                                           n_drop=n_drop, block_size=config.block_size or n_drop, progress=progress)
    if out is not None:
        result.out = _write_scores(out, result, model_ref, overwrite)
    return result


def _load_for_scores(model_ref: str, config: ScoreConfig, dtype: str, device_map):
    if not config.streaming:
        return load_model(model_ref, dtype=dtype, device_map=device_map, for_compute=True)
    if device_map is not None:
        raise LayerpruneError("streaming scores one layer at a time on the CPU; device_map needs the loaded model")
    from layerprune.importance.streaming import load_skeleton

    return load_skeleton(model_ref, dtype=dtype, metrics=config.metrics)  # weights stay on disk


def _write_scores(out: str, result: ScoreResult, model_ref: str, overwrite: bool) -> Path:
    from layerprune.files.outputs import atomic_output_dir, write_json
    from layerprune.selection.scores import stability_markdown, write_score_files

    with atomic_output_dir(out, overwrite) as tmp:
        write_score_files(Path(tmp), result.scores, result.selections, model_ref)
        if result.stability is not None:
            write_json(Path(tmp) / "stability.json", result.stability)
            (Path(tmp) / "stability.md").write_text(stability_markdown(result.stability))
    return Path(out)


def choose_layers(model, config: PruneConfig | dict | None = None, *, calibration=None, log=print,
                  **fields) -> tuple[list[int], dict]:
    """The ORIGINAL indices to drop and the record of how they were chosen (one-shot; see strategies.choose).

    calibration: the CalibrationData that data-driven metrics read (select auto draws its held-out text
    from config.calibration, so it needs the tokenizer: use `prune_model` for that).
    """
    from layerprune.selection.strategies import choose, in_memory_scores

    config = as_config(PruneConfig, config, **fields)
    record = choose(model, config, score=in_memory_scores(model, calibration), log=log)
    return record["dropped"], record


def prune_model(
    model_ref: str,
    *,
    out: str,
    config: PruneConfig | dict | None = None,
    heal: HealConfig | dict | None = None,
    dtype: str = DEFAULT_DTYPE,
    device_map: str | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 40,
    overwrite: bool = False,
    no_load: bool = False,
    output_format: str = "auto",
    log=print,
    **fields,
) -> PruneResult:
    """Load, choose layers (one-shot, select auto or an iterative schedule), remove them, save.

    `config` (or its fields as keywords: ratio=0.25, metric="angular", select="auto", schedule="1:4:8",
    calibration={"n_samples": 20}, ...) says what to remove; `heal` is the healing run between the rounds
    of an iterative schedule (default: HealConfig()). prompts: generate samples before and after.
    no_load: prune the safetensors checkpoint on disk, tensor by tensor (only with `drop`); the same
    happens by itself when a local checkpoint's weights exceed 80% of the available memory and `drop`
    is given (models/memory_policy.py), and `log` says so.
    output_format: auto (a GGUF file when `out` ends in .gguf, else a folder) | folder | gguf.
    A GGUF output (the model a GGUF file or a built-in alias): the layers are chosen as usual (on the
    dequantized model) and cut from the GGUF file itself, every kept tensor copied in its quantization type
    (models/gguf_file.py); with `drop` the file is never dequantized.
    """
    from layerprune.files.outputs import check_output_file
    from layerprune.models.checkpoint import prune_checkpoint
    from layerprune.models.gguf_file import prune_gguf
    from layerprune.models.memory_policy import on_disk_folder
    from layerprune.selection.objectives import objective_validation
    from layerprune.selection.strategies import (
        PruneHooks,
        choose,
        history_entry,
        in_memory_scores,
        layers_to_drop,
        needs_calibration,
        prune,
    )

    config = as_config(PruneConfig, config, **fields)
    heal_config = as_config(HealConfig, heal) if config.strategy == "iterative" else None
    inputs = [model_ref, config.calibration.source, *((heal_config.data, heal_config.teacher) if heal_config else ())]
    gguf_source = _gguf_output_source(model_ref, out, config, output_format)
    if gguf_source is not None:
        check_output_file(out, overwrite, inputs=inputs)
        if config.drop is not None and not prompts:  # nothing to compute: no need to dequantize the file
            return prune_gguf(gguf_source, config.drop, out, overwrite=overwrite, source=model_ref, inputs=inputs)
    else:
        check_output_dir(out, overwrite, inputs=inputs)
    from layerprune.planning.job import announce_plan

    announce_plan(model_ref, heal_config, prune=config, log=log)  # a model over 1B parameters: the plan first
    folder = None if gguf_source is not None else on_disk_folder(model_ref, no_load=no_load, drop_given=config.drop is not None, say=log, model_options={
        "--sample": bool(prompts), "--dtype": dtype != DEFAULT_DTYPE, "--device-map": device_map is not None,
        "--granularity": config.granularity != "block"})
    if folder is not None:
        return prune_checkpoint(folder, config.drop, out, overwrite=overwrite, source=model_ref)
    loaded = load_model(model_ref, dtype=dtype, device_map=device_map)
    model = loaded.model
    if prompts and loaded.tokenizer is None:
        raise LayerpruneError(f"{model_ref} has no tokenizer, so no generation samples can be made")
    before = count_parameters(model)
    if config.strategy == "one-shot" and config.granularity == "block":
        layers_to_drop(model, config)  # an impossible count fails before calibration text is read
    calibration = validation = None
    if needs_calibration(config):
        calibration = load_calibration_for(loaded, config.calibration)
        validation = objective_validation(config, loaded.tokenizer, held_out_text=lambda: load_calibration_for(
            loaded, config.calibration, validation=True))
    samples_before = _samples(loaded, prompts, max_new_tokens)

    def select(number: int, current, n_drop: int | None) -> dict:
        with _announced_choice(current, config, n_drop, log):
            return choose(current, config, score=in_memory_scores(current, calibration), validation=validation,
                          n_drop=n_drop, log=log)

    def heal_round(current, number: int):
        log(f"round {number}: healing with {heal_config.method}")
        loaded.model = current
        return heal_loaded(loaded, heal_config, default_teacher=model_ref, log=log)[0].model

    loaded.model, records = prune(model, config, PruneHooks(select=select, heal=heal_round), log=log)
    dropped = sorted(d for r in records for d in r["dropped"])
    if config.strategy == "iterative":
        how = {"dropped": dropped, "chosen_by": config.metrics[0], "schedule": config.schedule, "rounds": records}
    else:
        how = records[0]
    samples_after = _samples(loaded, prompts, max_new_tokens)
    if gguf_source is not None:  # the same layers cut from the GGUF file, its tensors as stored
        result = prune_gguf(gguf_source, dropped, out, overwrite=overwrite, how=history_entry(how), source=model_ref,
                            inputs=inputs)
        result.how, result.samples_before, result.samples_after = how, samples_before, samples_after
        return result
    after = count_parameters(loaded.model)
    save_model(loaded.model, loaded.tokenizer, out, overwrite=overwrite, extra={"selection": how})
    return PruneResult(
        out=Path(out),
        dropped=dropped,
        chosen_by=how["chosen_by"],
        layers_before=len(before["per_layer"]),
        layers_after=len(after["per_layer"]),
        params_before=before["total"],
        params_after=after["total"],
        samples_before=samples_before,
        samples_after=samples_after,
        how=how,
        granularity=config.granularity,
        rounds=records if config.strategy == "iterative" else [],
    )


def _gguf_output_source(model_ref: str, out, config=None, output_format: str = "auto") -> Path | None:
    """The GGUF file to cut when the output is a GGUF file (None for a folder output); refuses what a GGUF
    output cannot hold."""
    from layerprune.models.builtin import builtin_gguf_path
    from layerprune.models.gguf_file import layout
    from layerprune.models.loading import resolve_model_ref

    if output_format not in ("auto", "folder", "gguf"):
        raise LayerpruneError(f"unknown output format {output_format!r}; choose auto, folder or gguf")
    if output_format == "folder" or (output_format == "auto" and not str(out).endswith(".gguf")):
        return None
    resolved = resolve_model_ref(model_ref)
    if resolved.kind not in ("gguf", "builtin"):
        raise LayerpruneError(f"a .gguf output is cut from a GGUF model (a .gguf file or a built-in alias), and "
                              f"{model_ref} is not one; prune to a folder, then `layerprune export --format gguf`")
    if config is not None and config.granularity != "block":
        raise LayerpruneError("GGUF and llama.cpp need whole decoder layers: --granularity attention/mlp cannot be "
                              "written to a .gguf file")
    if config is not None and config.strategy == "iterative":
        raise LayerpruneError("an iterative schedule heals between rounds, which changes the weights: prune to a "
                              "folder, then `layerprune export --quant same-as:MODEL.gguf`")
    path = Path(resolved.location) if resolved.kind == "gguf" else builtin_gguf_path(resolved.location)
    layout(path)  # refuses an unsupported architecture before any work
    return path


def _announced_choice(model, config: PruneConfig, n_drop: int | None, log):
    """Print the estimate of choosing the layers (scores, select auto, search) when it reads text."""
    import contextlib

    from layerprune.hardware.speed import announced, measure_speed
    from layerprune.planning.run_time import choose_seconds
    from layerprune.selection.strategies import layers_to_drop, needs_calibration

    if not needs_calibration(config):
        return contextlib.nullcontext()
    count = n_drop if n_drop is not None else layers_to_drop(model, config)
    seconds = choose_seconds(model, config, measure_speed(model), count)
    return announced(f"choosing the layers (select {config.select})", seconds, log)


def _samples(loaded, prompts, max_new_tokens):
    if not prompts:
        return []
    from layerprune.evaluation.generation import generate_samples

    return generate_samples(loaded.model, loaded.tokenizer, prompts, max_new_tokens)


def _check_heal_fits(model_ref: str, config: HealConfig) -> None:
    """Refuse, from the config alone, a heal that cannot fit this machine (the check repeats after loading,
    with the real model); print the plan of a model over 1B parameters."""
    from layerprune.finetune.fit import fit_heal
    from layerprune.models.loading import model_folder, resolve_model_ref
    from layerprune.models.model_config import read_model_config
    from layerprune.planning.job import announce_plan

    announce_plan(model_ref, config)
    if resolve_model_ref(model_ref).kind != "hub":
        fit_heal(config, read_model_config(model_folder(model_ref)), log=lambda line: None)


def _ref_key(ref: str) -> str:
    """A model reference as a settings value: a local path made absolute (the same folder from anywhere)."""
    path = Path(ref)
    return str(path.resolve()) if path.exists() else ref


def finetune_model(
    model_ref: str,
    *,
    out: str,
    config: HealConfig | dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    streaming: bool = False,
    **fields,
):
    """Load a (pruned) model, heal it, save a stock checkpoint + loss curve + heal.json.

    `config` (or its fields as keywords: method="lora", learning_rate=1e-4, data="dolly", ...) is the
    healing run; HealConfig() is the measured default. Returns (HealResult, output folder).
    streaming: method replace on a checkpoint on disk, one layer in memory at a time (models bigger than
    memory; finetune/streaming_local.py); returns (None, output folder).
    """
    from layerprune.files.work_dirs import claim_work_dir, remove_work_dir

    config = as_config(HealConfig, config, **fields)
    inputs = [model_ref, config.data, config.teacher]
    check_output_dir(out, overwrite, inputs=inputs)
    if streaming:
        return heal_streaming(model_ref, out, config, overwrite=overwrite)
    _check_heal_fits(model_ref, config)  # before any weight is read
    # The checkpoints' folder is claimed like an output, and keyed by the settings: --resume only under them
    work_dir = Path(f"{Path(out)}.checkpoints")
    settings = {"model": _ref_key(model_ref), "heal": config.model_dump(mode="json")}
    resumable = claim_work_dir(work_dir, settings, inputs=inputs, resume=resume) if is_main_process() else resume
    loaded = {}

    def load():
        loaded["model"] = load_model(model_ref, dtype=config.train_dtype)
        return loaded["model"]

    result, record = heal_model_ref(model_ref, config, load=load, work_dir=work_dir, resume=resumable)
    if not is_main_process():
        return result, Path(out)  # under accelerate/torchrun only the main process writes
    write_healed(result, record, loaded["model"].tokenizer, out, overwrite=overwrite)
    remove_work_dir(work_dir)
    return result, Path(out)
