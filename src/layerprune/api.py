"""The public surface: one door per stage, shared by the CLI, YAML runs and Python users.

    load_model        a model reference -> LoadedModel (models/loading.py)
    score_model       every layer's score under each metric (ScoreConfig)
    prune_model       choose layers and remove them: a folder, a GGUF file, or a checkpoint cut on disk (PruneConfig)
    heal_model        heal a pruned model and save it (HealConfig; `finetune_model` is the same door)
    evaluate_model    perplexity, zero-shot tasks, instruction following (EvalConfig)
    benchmark_model   parameters, MACs, memory, latency; with `compare`, the speed-ups (BenchConfig)
    plan_job          memory and time of each stage before anything loads

Each takes its stage's typed config, or that config's fields as keyword arguments; both are checked before
any model loads. The work itself lives in the stage packages; this module only wires them together.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerprune.benchmark import benchmark, write_outputs
from layerprune.benchmark.config import BenchConfig
from layerprune.common.config_base import DEFAULT_DTYPE, as_config
from layerprune.data.calibration import load_calibration, load_calibration_for
from layerprune.data.training_rows import EVALUATION_ONLY_TEXTS  # noqa: F401  (public here before it moved)
from layerprune.errors import LayerpruneError
from layerprune.evaluation.config import EvalConfig
from layerprune.evaluation.generation import generate_samples
from layerprune.evaluation.protocol import (
    EvalResult,
    check_streamable_plan,
    describe_plan,
    plan_eval,
    run_eval,
    write_eval,
)
from layerprune.files.outputs import atomic_output_dir, check_output_dir, check_output_file, is_main_process, write_json
from layerprune.files.work_dirs import claim_work_dir, remove_work_dir, removed_unless_used
from layerprune.finetune.config import HealConfig
from layerprune.finetune.fit import fit_heal
from layerprune.finetune.stage import (  # noqa: F401  (prepare_training_rows: public here before it moved)
    heal_loaded,
    heal_model_ref,
    heal_streaming,
    prepare_training_rows,
    write_healed,
)
from layerprune.hardware.devices import Devices, parse_memory, this_machine
from layerprune.hardware.speed import announced, measure_speed
from layerprune.importance import compute_many, get_metric
from layerprune.importance.experts.registry import compute_expert_scores, expert_scores_markdown, get_expert_metric
from layerprune.importance.experts.streaming import stream_expert_scores
from layerprune.importance.experts.streaming import streamed as streamed_experts
from layerprune.importance.streaming import load_skeleton, stream_scores
from layerprune.models.anatomy import count_parameters
from layerprune.models.builtin import builtin_gguf_path
from layerprune.models.checkpoint import prune_checkpoint
from layerprune.models.experts.anatomy import moe_layers
from layerprune.models.gguf_file import layout, prune_gguf
from layerprune.models.loading import LoadedModel, load_model, model_folder, resolve_model_ref
from layerprune.models.memory_policy import on_disk_folder, too_big_to_load
from layerprune.models.model_config import read_model_config
from layerprune.models.prune_result import PruneResult
from layerprune.models.quantize import check_load_in
from layerprune.models.saving import save_model, write_model_files  # noqa: F401  (public here before)
from layerprune.models.shape import model_shape
from layerprune.models.surgery import kept_layers
from layerprune.planning import job as job_plans
from layerprune.planning.disk import GGUF_BITS
from layerprune.planning.estimate import eval_seconds
from layerprune.planning.run_time import choose_seconds
from layerprune.selection.config import PruneConfig, ScoreConfig
from layerprune.selection.experts import choose_experts, expert_metric_params, prune_experts
from layerprune.selection.objectives import objective_validation
from layerprune.selection.ranking import count_to_drop
from layerprune.selection.scores import (
    metric_requests,
    select_for_each,
    stability_markdown,
    stability_study,
    write_score_files,
)
from layerprune.selection.strategies import (
    PruneHooks,
    choose,
    history_entry,
    in_memory_scores,
    layers_to_drop,
    needs_calibration,
    prune,
)

__all__ = [
    "BenchConfig", "EvalConfig", "HealConfig", "LoadedModel", "PruneConfig", "PruneResult", "ScoreConfig",
    "ScoreResult", "benchmark_model", "choose_layers", "evaluate_model", "finetune_model", "heal_model",
    "load_model", "plan_job", "prune_model", "save_model", "score_model",
]


# ------------------------------------------------------------------------------------------------ score
@dataclass
class ScoreResult:
    scores: dict  # metric -> LayerScores (one score per layer, ORIGINAL indices)
    selections: dict  # metric -> selection.Selection: the layers it would drop
    stability: dict | None = None  # the calibration-stability study, when asked for
    out: Path | None = None
    experts: dict = field(default_factory=dict)  # expert metric -> ExpertScores (mixture-of-experts models)


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
    config = as_config(ScoreConfig, config, **fields)
    c = config.calibration
    if out is not None:
        check_output_dir(out, overwrite, inputs=[model_ref, c.source, *(config.stability.sources
                                                                         if config.stability else [])])
    loaded = _load_for_scores(model_ref, config, dtype, device_map)
    if not config.metrics and not config.expert_metrics:
        raise LayerpruneError("nothing to score: metric none needs expert metrics (--expert-metric)")
    if config.expert_metrics:
        moe_layers(loaded.model)  # a dense model fails before any text is read
    n_layers = len(kept_layers(loaded.model))
    n_drop = config.n_drop(n_layers) if config.metrics else 0
    requests = metric_requests(config.metrics, n_layers, seed=c.seed, block_size=config.block_size or n_drop or 1)
    calibration = None
    if any(get_metric(n).needs_calibration for n in config.metrics) or \
            any(get_expert_metric(n).needs_calibration for n in config.expert_metrics):
        if loaded.tokenizer is None:
            raise LayerpruneError(f"{model_ref} has no tokenizer, so calibration text cannot be encoded")
        calibration = load_calibration(loaded.tokenizer, c.source, n_samples=c.n_samples, seq_len=c.seq_len,
                                       seed=c.seed, field=c.field)
    scores = {}
    if config.metrics:
        log(f"scoring {n_layers} layers with {', '.join(config.metrics)}"
            + (f" on {calibration.description}" if calibration else ""))
        if config.streaming:
            scores = stream_scores(loaded.path, calibration, requests, dtype=dtype)
        else:
            scores = compute_many(loaded.model, requests, calibration)
    result = ScoreResult(scores, select_for_each(scores, n_drop) if scores else {})
    if config.expert_metrics:
        result.experts = _expert_scores(loaded, config, calibration, dtype, log)
    if config.stability is not None:
        st = config.stability
        result.stability = stability_study(loaded.model, loaded.tokenizer, config.metrics, sources=st.sources,
                                           n_samples_list=st.n_samples, seeds=st.seeds, seq_len=c.seq_len,
                                           n_drop=n_drop, block_size=config.block_size or n_drop, progress=progress)
    if out is not None:
        result.out = _write_scores(out, result, model_ref, overwrite)
    return result


def _expert_scores(loaded, config: ScoreConfig, calibration, dtype: str, log) -> dict:
    """{expert metric: ExpertScores} of a loaded model, or one layer at a time with streaming."""
    requests = {name: {"seed": config.calibration.seed} if name == "random" else {} for name in config.expert_metrics}
    log(f"scoring the experts with {', '.join(requests)}" + (f" on {calibration.description}" if calibration else "")
        + (" (one layer at a time)" if config.streaming else ""))
    if config.streaming:
        return stream_expert_scores(loaded.path, requests, calibration, dtype=dtype)
    return compute_expert_scores(loaded.model, requests, calibration)


def _load_for_scores(model_ref: str, config: ScoreConfig, dtype: str, device_map):
    if not config.streaming:
        return load_model(model_ref, dtype=dtype, device_map=device_map, for_compute=True)
    if device_map is not None:
        raise LayerpruneError("streaming scores one layer at a time on the CPU; device_map needs the loaded model")
    return load_skeleton(model_ref, dtype=dtype, metrics=config.metrics or None)  # weights stay on disk


def _write_scores(out: str, result: ScoreResult, model_ref: str, overwrite: bool) -> Path:
    with atomic_output_dir(out, overwrite) as tmp:
        if result.scores:
            write_score_files(Path(tmp), result.scores, result.selections, model_ref)
        if result.experts:
            write_json(Path(tmp) / "expert_scores.json",
                       {"model": model_ref, "metrics": {n: s.to_json() for n, s in result.experts.items()}})
            (Path(tmp) / "expert_scores.md").write_text(expert_scores_markdown(result.experts))
        if result.stability is not None:
            write_json(Path(tmp) / "stability.json", result.stability)
            (Path(tmp) / "stability.md").write_text(stability_markdown(result.stability))
    return Path(out)


# ------------------------------------------------------------------------------------------------ prune
def choose_layers(model, config: PruneConfig | dict | None = None, *, calibration=None, log=print,
                  **fields) -> tuple[list[int], dict]:
    """The ORIGINAL indices to drop and the record of how they were chosen (one-shot; see strategies.choose).

    calibration: the CalibrationData that data-driven metrics read (select auto draws its held-out text
    from config.calibration, so it needs the tokenizer: use `prune_model` for that).
    """
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

    Four routes: a GGUF file cut by index (nothing loaded), a checkpoint cut on disk (nothing loaded), and a
    loaded model whose chosen layers are removed and saved as a folder or cut from its GGUF file.
    """
    config = as_config(PruneConfig, config, **fields)
    heal_config = as_config(HealConfig, heal) if config.strategy == "iterative" else None
    inputs = [model_ref, config.calibration.source, *((heal_config.data, heal_config.teacher) if heal_config else ())]
    gguf_source = _gguf_output_source(model_ref, out, config, output_format)
    if gguf_source is not None:
        check_output_file(out, overwrite, inputs=inputs)
        explicit = (config.drop is not None or not config.prunes_layers) and config.expert_ratio is None \
            and config.num_experts is None
        if explicit and not prompts:  # nothing to compute: no need to dequantize the file
            return prune_gguf(gguf_source, config.drop or [], out, overwrite=overwrite, source=model_ref,
                              inputs=inputs, drop_experts=config.drop_experts)
    else:
        check_output_dir(out, overwrite, inputs=inputs)
    job_plans.announce_plan(model_ref, heal_config, prune=config, log=log)  # a model over 1B parameters: the plan
    if no_load and gguf_source is None and (config.expert_ratio is not None or config.num_experts is not None):
        return _prune_experts_on_disk(model_ref, config, out, overwrite, dtype, log)
    folder = None if gguf_source is not None else on_disk_folder(
        model_ref, no_load=no_load, drop_given=config.drop is not None or config.drop_experts is not None, say=log,
        model_options={
            "--sample": bool(prompts), "--dtype": dtype != DEFAULT_DTYPE, "--device-map": device_map is not None,
            "--granularity": config.granularity != "block",
            "--expert-ratio/--num-experts": config.expert_ratio is not None or config.num_experts is not None})
    if folder is not None:
        return prune_checkpoint(folder, config.drop or [], out, overwrite=overwrite, source=model_ref,
                                drop_experts=config.drop_experts)
    loaded = load_model(model_ref, dtype=dtype, device_map=device_map)
    before = count_parameters(loaded.model)
    how, records, samples = _prune_loaded(loaded, model_ref, config, heal_config, prompts, max_new_tokens, log)
    if gguf_source is not None:  # the same layers cut from the GGUF file, its tensors as stored
        result = prune_gguf(gguf_source, how["dropped"], out, overwrite=overwrite, how=history_entry(how),
                            source=model_ref, inputs=inputs, drop_experts=config.drop_experts)
        result.how, (result.samples_before, result.samples_after) = how, samples
        return result
    save_model(loaded.model, loaded.tokenizer, out, overwrite=overwrite, extra={"selection": how})
    after = count_parameters(loaded.model)
    return PruneResult(out=Path(out), dropped=how["dropped"], chosen_by=how["chosen_by"],
                       layers_before=len(before["per_layer"]), layers_after=len(after["per_layer"]),
                       params_before=before["total"], params_after=after["total"], samples_before=samples[0],
                       samples_after=samples[1], how=how, granularity=config.granularity,
                       rounds=records if config.strategy == "iterative" else [], experts=how.get("experts", {}))


def _prune_loaded(loaded: LoadedModel, model_ref: str, config: PruneConfig, heal_config: HealConfig | None,
                  prompts, max_new_tokens: int, log) -> tuple[dict, list[dict], tuple[list, list]]:
    """Choose and remove the layers of a loaded model (loaded.model becomes the pruned one): (how they were
    chosen, the records of each round, the generation samples before and after)."""
    if prompts and loaded.tokenizer is None:
        raise LayerpruneError(f"{model_ref} has no tokenizer, so no generation samples can be made")
    if config.prunes_experts:
        moe_layers(loaded.model)  # a dense model fails before calibration text is read
    if config.strategy == "one-shot" and config.granularity == "block":
        layers_to_drop(loaded.model, config)  # an impossible count fails before calibration text is read
    calibration = validation = None
    experts_read_text = config.drop_experts is None and get_expert_metric(config.expert_metric).needs_calibration
    if needs_calibration(config) or (config.prunes_experts and experts_read_text):
        calibration = load_calibration_for(loaded, config.calibration)
        validation = objective_validation(config, loaded.tokenizer, held_out_text=lambda: load_calibration_for(
            loaded, config.calibration, validation=True))
    samples_before = _samples(loaded, prompts, max_new_tokens)
    if not config.prunes_layers:  # experts alone
        how = {"dropped": [], "chosen_by": "none", "experts": prune_experts(loaded.model, config, calibration, log)}
        return how, [how], (samples_before, _samples(loaded, prompts, max_new_tokens))

    def select(number: int, current, n_drop: int | None) -> dict:
        with _announced_choice(current, config, n_drop, log):
            return choose(current, config, score=in_memory_scores(current, calibration), validation=validation,
                          n_drop=n_drop, log=log)

    def heal_round(current, number: int):
        log(f"round {number}: healing with {heal_config.method}")
        loaded.model = current
        return heal_loaded(loaded, heal_config, default_teacher=model_ref, log=log)[0].model

    loaded.model, records = prune(loaded.model, config, PruneHooks(select=select, heal=heal_round), log=log)
    dropped = sorted(d for r in records for d in r["dropped"])
    if config.strategy == "iterative":
        how = {"dropped": dropped, "chosen_by": config.metrics[0], "schedule": config.schedule, "rounds": records}
    else:
        how = records[0]
    if config.prunes_experts:  # then experts, scored on the model that remains
        how = {**how, "experts": prune_experts(loaded.model, config, calibration, log)}
    return how, records, (samples_before, _samples(loaded, prompts, max_new_tokens))


def _prune_experts_on_disk(model_ref: str, config: PruneConfig, out: str, overwrite: bool, dtype: str, log
                           ) -> PruneResult:
    """--no-load with an expert budget: the experts scored one decoder layer at a time from the checkpoint,
    then cut from it tensor by tensor; the whole model is never in memory."""
    if config.prunes_layers:
        raise LayerpruneError("--no-load with --expert-ratio/--num-experts removes experts only; remove layers in "
                              "a second call (`--no-load --drop ...`)")
    skeleton = load_skeleton(model_ref, dtype=dtype)  # weights stay on disk
    metric = config.expert_metric
    calibration = load_calibration_for(skeleton, config.calibration) \
        if get_expert_metric(metric).needs_calibration else None
    model, routing = streamed_experts(skeleton.path, dtype)
    drop, how = choose_experts(model, calibration, metric=metric, num_experts=config.num_experts,
                               ratio=config.expert_ratio, params=expert_metric_params(config), routing=routing)
    log(f"removing {how['experts_per_layer']} experts from each of {len(drop)} MoE layers (chosen by {metric}, "
        "scored one layer at a time), on disk")
    return prune_checkpoint(skeleton.path, [], out, overwrite=overwrite, source=model_ref, drop_experts=drop,
                            how={"chosen_by": metric, "experts_per_layer": how["experts_per_layer"]})


def _gguf_output_source(model_ref: str, out, config=None, output_format: str = "auto") -> Path | None:
    """The GGUF file to cut when the output is a GGUF file (None for a folder output); refuses what a GGUF
    output cannot hold."""
    if output_format not in ("auto", "folder", "gguf"):
        raise LayerpruneError(f"unknown output format {output_format!r}; choose auto, folder or gguf")
    if output_format == "folder" or (output_format == "auto" and not str(out).endswith(".gguf")):
        return None
    resolved = resolve_model_ref(model_ref)
    if resolved.kind not in ("gguf", "builtin"):
        raise LayerpruneError(f"a .gguf output is cut from a GGUF model (a .gguf file or a built-in alias), and "
                              f"{model_ref} is not one; prune to a folder, then `layerprune export --format gguf`")
    if config is not None and (config.expert_ratio is not None or config.num_experts is not None):
        raise LayerpruneError("a GGUF file loses the experts given by --drop-experts; --expert-ratio / --num-experts "
                              "score them on the model's checkpoint (`layerprune score CHECKPOINT --metric none "
                              "--expert-metric reap` lists the lowest first), or prune the checkpoint to a folder "
                              "and `layerprune export --format gguf`")
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
    if not needs_calibration(config):
        return contextlib.nullcontext()
    count = n_drop if n_drop is not None else layers_to_drop(model, config)
    seconds = choose_seconds(model, config, measure_speed(model), count)
    return announced(f"choosing the layers (select {config.select})", seconds, log)


def _samples(loaded, prompts, max_new_tokens):
    if not prompts:
        return []
    return generate_samples(loaded.model, loaded.tokenizer, prompts, max_new_tokens)


# ------------------------------------------------------------------------------------------------- heal
def heal_model(
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

    def load(dtype):  # train_dtype, or a LoRA base's 16-bit dtype (finetune/placement.py)
        loaded["model"] = load_model(model_ref, dtype=dtype)
        return loaded["model"]

    with removed_unless_used(work_dir):  # also when the healed folder is refused (a full disk)
        result, record = heal_model_ref(model_ref, config, load=load, work_dir=work_dir, resume=resumable)
        if not is_main_process():
            return result, Path(out)  # under accelerate/torchrun only the main process writes
        write_healed(result, record, loaded["model"].tokenizer, out, overwrite=overwrite)
    remove_work_dir(work_dir)
    return result, Path(out)


finetune_model = heal_model  # the door's first name, kept: `layerprune finetune` and earlier scripts use it


def _check_heal_fits(model_ref: str, config: HealConfig) -> None:
    """Refuse, from the config alone, a heal that cannot fit this machine (the check repeats after loading,
    with the real model); print the plan of a model over 1B parameters."""
    job_plans.announce_plan(model_ref, config)
    if resolve_model_ref(model_ref).kind != "hub":
        fit_heal(config, read_model_config(model_folder(model_ref)), log=lambda line: None)


def _ref_key(ref: str) -> str:
    """A model reference as a settings value: a local path made absolute (the same folder from anywhere)."""
    path = Path(ref)
    return str(path.resolve()) if path.exists() else ref


# ------------------------------------------------------------------------------------------------- eval
def evaluate_model(
    model: str | LoadedModel,
    config: EvalConfig | dict | None = None,
    *,
    out: str | None = None,
    reference=None,
    streaming: bool = False,
    dtype: str = DEFAULT_DTYPE,
    device_map: str | None = None,
    load_in: str | None = None,
    overwrite: bool = False,
    estimate: bool = True,
    log=print,
    **fields,
) -> EvalResult:
    """Evaluate `model` (a model reference, or a LoadedModel in memory) with `config` (or its fields: tasks=,
    ppl=, limit=, follow=, ...); with `out`, write eval.json, eval.md and samples.json there.

    reference: the unpruned model in memory, for instruction following (else config.reference or the
    model's provenance source is loaded). streaming: perplexity with one decoder layer in memory at a time
    (chosen by itself when only perplexity is asked and the weights do not fit in memory). estimate: time a
    forward first and say how long the evaluation will take (a run has its stage estimates already)."""
    config = as_config(EvalConfig, config, **fields)
    if out is not None:
        check_output_dir(out, overwrite, inputs=[model if isinstance(model, str) else None, config.tasks,
                                                 config.ppl, config.reference])
    load_in = check_load_in(load_in)  # before the plan reads any data
    plan = plan_eval(config)
    log(f"evaluating: {describe_plan(plan)}")
    loaded = model
    if streaming:
        check_streamable_plan(plan)  # before the skeleton loads
    if isinstance(model, str):
        streaming = streaming or _does_not_fit(model, plan, log)
        if streaming:
            loaded = load_skeleton(model, dtype=dtype)
            log("streaming: one decoder layer in memory at a time (perplexity only)")
        else:
            loaded = load_model(model, dtype=dtype, device_map=device_map, load_in=load_in, for_compute=True)
    seconds = eval_seconds(config, measure_speed(loaded.model)) if estimate and not streaming else None
    with announced("evaluation", seconds, log) if estimate else contextlib.nullcontext():
        result = run_eval(loaded, plan, streaming=streaming, reference=reference)
    result.estimate_s = seconds
    if out is not None:
        write_eval(out, result, plan, overwrite=overwrite)
    return result


def _does_not_fit(model: str, plan, log) -> bool:
    """Stream by itself when only perplexity is asked and the local weights exceed the memory available."""
    resolved = resolve_model_ref(model)
    if plan.lm_eval_tasks or plan.humaneval or not plan.ppl or resolved.kind != "folder":
        return False
    big = too_big_to_load(resolved.location)
    if big:
        log(f"the weights ({big[0] / 2**30:.1f} GiB) do not fit in the available memory ({big[1] / 2**30:.1f} GiB): "
            "streaming")
    return big is not None


# ------------------------------------------------------------------------------------------------ bench
def benchmark_model(
    model: str | LoadedModel,
    config: BenchConfig | dict | None = None,
    *,
    compare: str | LoadedModel | None = None,
    out: str | None = None,
    dtype: str = DEFAULT_DTYPE,
    device: str | None = None,
    load_in: str | None = None,
    compare_load_in: str | None = None,
    overwrite: bool = False,
    log=print,
    **fields,
) -> tuple[dict, dict | None, dict | None]:
    """Parameters, MACs, memory, prefill latency and generation speed of `model` (a reference or a LoadedModel)
    and, with `compare`, of a second model and the speed-ups: (base, other, comparison). With `out`, write
    bench.json, bench.md and bench.png there. References are loaded one at a time and freed after."""
    config = as_config(BenchConfig, config, **fields)
    device = _resolve_device(device)
    load_in = check_load_in(load_in)
    compare_load_in = load_in if compare_load_in is None else check_load_in(compare_load_in)
    if out is not None:
        check_output_dir(out, overwrite, inputs=[m for m in (model, compare) if isinstance(m, str)])
    results = [_bench_one(m, config, dtype, device, quant, log)
               for m, quant in [(model, load_in), (compare, compare_load_in)] if m is not None]
    base, other = results[0], (results[1] if len(results) > 1 else None)
    comparison = None
    if out is not None:
        with atomic_output_dir(out, overwrite) as tmp:
            comparison = write_outputs(Path(tmp), base, other)
    return base, other, comparison


def _bench_one(model: str | LoadedModel, config: BenchConfig, dtype: str, device: str, load_in: str | None,
               log) -> dict:
    """Benchmark one model; a reference is loaded, measured and freed before the next one loads."""
    if isinstance(model, LoadedModel):
        return benchmark(model.model, model.tokenizer, config, name=str(model.ref), log=log)
    log(f"benchmarking {model}{f' ({load_in})' if load_in else ''} on {device}")
    loaded = load_model(model, dtype=dtype, device=device, load_in=load_in)
    name = f"{model} ({load_in})" if load_in else model  # the same folder may be measured twice: full and quantized
    try:
        return benchmark(loaded.model, loaded.tokenizer, config, name=name, log=lambda m: log(f"  {m}"))
    finally:
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _resolve_device(device: str | None) -> str:
    """Default to the GPU when there is one; refuse a device this machine lacks before loading."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise LayerpruneError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise LayerpruneError(f"device {device!r} is not available on this machine")
    return device


# ------------------------------------------------------------------------------------------------- plan
def plan_job(
    model_ref: str,
    *,
    num_layers: int | None = None,
    ratio: float | None = None,
    heal: HealConfig | dict | None = None,
    prune: PruneConfig | dict | None = None,
    evaluation: EvalConfig | dict | None = None,
    adapter: str = "auto",
    gpus: int | None = None,
    gpu_memory: str = "80GB",
    trust_remote_code: bool = False,
    gguf: str | None = None,
    out: str = ".",
    expert_ratio: float | None = None,
    num_experts: int | None = None,
) -> job_plans.JobPlan:
    """Peak memory per device, disk and time of each stage, and the healing that fits, from the model's config
    alone (nothing is loaded): on this machine, or on `gpus` GPUs of `gpu_memory` each. num_layers / ratio:
    the layers to remove (default 25%; num_layers=0: the model as it is). gguf: a quantization the healed model
    is exported in (its file counted on disk); out: where the outputs go (the free space of its disk).
    expert_ratio / num_experts: mixture-of-experts models, the experts removed from every MoE layer (then no
    layer goes unless num_layers / ratio says so)."""
    if gpus is not None and gpus < 1:
        raise LayerpruneError("--gpus must be at least 1")
    if gguf is not None and gguf.lower() not in GGUF_BITS:
        raise LayerpruneError(f"unknown --gguf quantization {gguf!r}; choose one of {', '.join(GGUF_BITS)}")
    if adapter not in ("auto", "none", "lora"):
        raise LayerpruneError(f"unknown --adapter {adapter!r}; choose auto, none or lora")
    gpu_bytes = parse_memory(gpu_memory)  # checked whether or not --gpus uses it
    heal, evaluation = as_config(HealConfig, heal), as_config(EvalConfig, evaluation)
    shape = model_shape(model_ref, trust_remote_code=trust_remote_code)
    experts_only = (expert_ratio is not None or num_experts is not None) and num_layers is None and ratio is None
    drop = 0 if num_layers == 0 or experts_only else count_to_drop(
        shape.layers, num_layers=num_layers, ratio=ratio if ratio is not None or num_layers else 0.25)
    devices = Devices("cuda", gpus, gpu_bytes) if gpus else this_machine()
    prune = as_config(PruneConfig, prune, num_layers=max(drop, 1), expert_ratio=expert_ratio, num_experts=num_experts)
    return job_plans.plan_job(shape, shape.layers - drop, devices, heal, adapter=adapter, prune=prune,
                              evaluation=evaluation, gguf=gguf.lower() if gguf else None, out=out)
