"""`layerprune plan`: before any weight is read, each stage's peak memory per device, the disk it needs, a
time estimate, and the healing that fits (planning/memory.py, finetune/memory.py) on this machine or on `--gpus N
--gpu-memory 80GB`.

Times come from the model's FLOPs per token (2 x parameters, plus the logits) over a measured throughput:
this CPU's matmul rate in the dtype it computes in, or a nominal 40% of 400 TFLOPS per GPU (an H100's bf16
at a typical training utilisation) for GPUs given on the command line. A factor of 2 is the promise; the
stage estimates of the job itself (`run`, `finetune`) are measured on the loaded model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from layerprune.common.units import format_seconds
from layerprune.errors import LayerpruneError
from layerprune.evaluation.config import EvalConfig
from layerprune.finetune.config import HealConfig
from layerprune.finetune.local import DEFAULT_LOCAL_ROWS
from layerprune.finetune.memory import choose_heal, frozen_weight_bytes, gpus_for_full_heal, teacher_pass_memory
from layerprune.finetune.teacher_first import distills_from_cache
from layerprune.hardware.devices import USABLE, Devices, GiB, device_flops, this_machine
from layerprune.hardware.speed import Speed
from layerprune.models.memory_policy import MEMORY_FRACTION
from layerprune.models.shape import Job, ModelShape, model_shape
from layerprune.planning.estimate import eval_seconds, heal_seconds, score_seconds
from layerprune.planning.disk import plan_disk
from layerprune.planning.memory import inference_activations, plan_memory
from layerprune.selection.config import PruneConfig
from layerprune.selection.experts import experts_to_drop
from layerprune.selection.ranking import count_to_drop


@dataclass
class JobPlan:
    model: str
    devices: str
    layers: int
    layers_kept: int
    params: int
    params_kept: int
    stages: list[dict]
    heal: dict
    gpus_for_full_heal: int | None
    disk_bytes: int  # all that the stages write (planning/disk.py)
    disk: dict = field(default_factory=dict)  # what each writing stage writes, and whether the disks hold it
    heal_per_card: dict = field(default_factory=dict)  # "24 GB": the healing that one such GPU takes
    experts: int = 0  # mixture-of-experts models: experts per MoE layer before and after
    experts_kept: int = 0

    def to_json(self) -> dict:
        return asdict(self)


CARDS_GB = (24, 48, 80)  # common GPU memories


def teacher_mode(heal: HealConfig, shape: ModelShape, job: Job, devices: Devices) -> str | None:
    """How the heal holds distillation's teacher, as finetune/teacher_first.py decides it: "alone" (its targets
    made before the student loads), "beside" the student (targets not cached: a live teacher or init replace; or
    a time budget, with room for both), or None (no teacher pass)."""
    if heal.method != "distill":
        return None
    if not distills_from_cache(heal):
        return "beside"
    if heal.max_minutes is None:
        return "alone"
    both = shape.params(job.layers_kept) * shape.stored_bytes + shape.params() * frozen_weight_bytes(shape, job,
                                                                                                     devices)
    return "beside" if both <= MEMORY_FRACTION * devices.memory else "alone"


def heal_per_card(shape: ModelShape, job: Job, wanted: str, heal: HealConfig) -> dict:
    """{"24 GB": {option, fits, peak_gib, teacher}, ...}: the healing one GPU of each common size takes, its
    teacher pass included: on the GPU where it fits there (the peak is the larger of the two), else read layer by
    layer from disk on the CPU (finetune/teacher_first.py), which takes no GPU memory."""
    cards = {}
    for gb in CARDS_GB:
        devices = Devices("cuda", 1, gb * GiB)
        chosen = choose_heal(shape, job, devices, wanted)
        card = {"option": chosen.settings.get("option"), "fits": chosen.fits, "peak_gib": chosen.bytes_per_device}
        mode = teacher_mode(heal, shape, job, devices)
        if mode and card["option"] != "layer-local":  # layer-local streams the teacher itself
            teacher = teacher_pass_memory(shape, job, devices, beside=mode == "beside",
                                          activations=inference_activations(shape, job, devices.compute_bytes))
            on_gpu = teacher.bytes_per_device <= USABLE * devices.memory
            card["teacher"] = "on the GPU" if on_gpu else "from disk"
            card["peak_gib"] = max(card["peak_gib"], teacher.bytes_per_device if on_gpu else 0)
        cards[f"{gb} GB"] = {**card, "peak_gib": round(card["peak_gib"] / GiB, 2)}
    return cards


def plan_job(shape: ModelShape, layers_kept: int, devices: Devices, heal=None, *, adapter: str = "auto", prune=None,
             evaluation=None, gguf: str | None = None, out: str = ".") -> JobPlan:
    """The plan of prune -> heal -> eval (-> a GGUF file of quantization `gguf`) of `shape` down to `layers_kept`
    layers on `devices`, writing to `out`; adapter: auto (the first healing that fits: full weights, LoRA, QLoRA
    on a GPU, layer-local) | none | lora."""
    heal = heal or HealConfig()
    prune = prune or PruneConfig(num_layers=shape.layers - layers_kept or 1)
    evaluation = evaluation or EvalConfig()
    shape = with_expert_budget(shape, prune)
    if not 1 <= layers_kept <= shape.layers:
        raise LayerpruneError(f"cannot keep {layers_kept} of {shape.layers} layers")

    job = Job(layers_kept=layers_kept, batch=heal.batch_size, seq_len=heal.max_length, loss_chunk=heal.loss_chunk,
              gradient_checkpointing=heal.gradient_checkpointing, lora_r=heal.lora_r,
              train_last_layers=heal.train_last_layers, rows=heal.max_samples or DEFAULT_LOCAL_ROWS,
              calibration_rows=prune.calibration.n_samples, calibration_len=prune.calibration.seq_len,
              windows=evaluation.ppl_windows or 300, window_len=evaluation.seq_len)
    wanted = {"auto": "auto", "lora": "lora", "none": "full"}[adapter]
    if heal.method in ("replace", "block-local"):
        wanted = "layer-local"
    elif heal.method in ("lora", "qlora"):
        wanted = heal.method
    stages = plan_memory(shape, job, devices, heal=wanted, teacher=teacher_mode(heal, shape, job, devices))
    flops, source = device_flops(devices)
    per_token = 2 * shape.active_params() + 2 * shape.hidden * shape.vocab  # MoE: the top-k experts only
    speed = Speed(forward=per_token / flops, decode=per_token / flops * 50, compute=f"{devices.compute_bytes * 8}-bit")
    fraction = shape.active_params(layers_kept) / shape.active_params()
    tokens = prune.calibration.n_samples * prune.calibration.seq_len
    seconds = {"score": score_seconds(prune.metrics, shape.layers, tokens, speed),
               "score (streaming)": score_seconds(prune.metrics, shape.layers, tokens, speed) * 1.2,
               "prune (on disk)": shape.params(layers_kept) * shape.stored_bytes / 200e6,
               "teacher pass": 0.0,
               "heal": heal_seconds(heal, speed, student_fraction=fraction),
               "eval": eval_seconds(evaluation, speed.scaled(fraction)),
               "heal (streaming)": heal_seconds(HealConfig(method="replace", max_samples=job.rows,
                                                           max_length=heal.max_length), speed,
                                                student_fraction=fraction),
               "eval (streaming)": job.windows * job.window_len * speed.forward * fraction * 1.3}
    if heal.method == "distill" and heal.distill_top_k is not None and heal.max_steps > 0:
        rows = heal.max_steps * (heal.effective_batch_size or heal.batch_size)
        seconds["teacher pass"] = rows * heal.max_length * speed.forward
    if any(stage.settings.get("option") == "layer-local" for stage in stages):  # auto fell back to replace
        seconds["heal"] = seconds["heal (streaming)"]
    rows = []
    for stage in stages:
        rows.append({"stage": stage.stage, "peak_gib": round(stage.bytes_per_device / GiB, 2), "fits": stage.fits,
                     "detail": stage.detail, "settings": stage.settings, "seconds": seconds.get(stage.stage),
                     "time_source": source})
    heal_row = next(stage for stage in stages if stage.stage == "heal")
    teacher_row = next(({"peak_gib": row["peak_gib"], "fits": row["fits"]} for row in rows
                        if row["stage"] == "teacher pass"), None)
    full_gpus = gpus_for_full_heal(shape, job, devices.memory) if devices.kind == "cuda" else None
    disk = plan_disk(shape, layers_kept, heal, heal_row.settings.get("option"), gguf=gguf, out=out, lora_r=heal.lora_r,
                     frozen_bytes=frozen_weight_bytes(shape, job, devices), train_bytes=job.train_dtype_bytes)
    return JobPlan(model=shape.name, experts=shape.experts, experts_kept=shape.experts_kept, devices=devices.describe(), layers=shape.layers, layers_kept=layers_kept,
                   params=shape.params(), params_kept=shape.params(layers_kept), stages=rows,
                   heal={"option": heal_row.settings.get("option"), "fits": heal_row.fits, **heal_row.settings,
                         "teacher_pass": teacher_row},
                   gpus_for_full_heal=full_gpus,
                   disk_bytes=disk["bytes"], disk=disk,
                   heal_per_card=heal_per_card(shape, job, wanted, heal))


def plan_lines(plan: JobPlan) -> list[str]:
    """The plan as a few lines for the start of a long job."""
    lines = [f"memory plan ({plan.params / 1e9:.1f}B -> {plan.params_kept / 1e9:.1f}B params on {plan.devices}):"]
    for row in plan.stages:
        fits = "" if row["fits"] else "  DOES NOT FIT"
        lines.append(f"  {row['stage']}: {row['peak_gib']:.1f} GiB, ~{format_seconds(row['seconds'])}{fits}")
    lines.append(f"  healing: {plan.heal['option']}")
    return lines


def announce_plan(model_ref: str, heal=None, *, prune=None, log=print, min_params: float = 1e9) -> None:
    """Print the plan at the start of a job on a model over `min_params` parameters (config read only);
    prune: the PruneConfig whose count gives the layers kept (default: 25% removed)."""
    try:
        shape = model_shape(model_ref)
    except (LayerpruneError, OSError, ValueError):
        return  # no config to read here (a hub id not cached): the job's own loading says why
    if shape.params() < min_params:
        return
    if prune is not None and not prune.prunes_layers:  # experts alone: every layer stays
        kept = shape.layers
    elif prune is not None and prune.drop is not None:
        kept = shape.layers - len(prune.drop)
    elif prune is not None and (prune.num_layers or prune.ratio):
        kept = shape.layers - count_to_drop(shape.layers, num_layers=prune.num_layers, ratio=prune.ratio)
    else:
        kept = shape.layers - count_to_drop(shape.layers, ratio=0.25)
    try:
        plan = plan_job(shape, kept, this_machine(), heal, prune=prune if prune is not None and prune.prunes_experts
                        else None)
    except LayerpruneError:
        return  # e.g. an expert budget for a dense model: the job's own checks say why, in its words
    for line in plan_lines(plan):
        log(line)


def with_expert_budget(shape: ModelShape, prune: PruneConfig | None) -> ModelShape:
    """The shape whose pruned model has lost the experts `prune` removes from every MoE layer."""
    if prune is None or not prune.prunes_experts:
        return shape
    if prune.drop_experts is not None:
        return shape.without_experts(max(len(experts) for experts in prune.drop_experts.values()))
    if not shape.experts:
        raise LayerpruneError(f"{shape.name} is not a mixture-of-experts model: it has no experts to remove")
    return shape.without_experts(experts_to_drop(shape.experts, shape.top_k, num_experts=prune.num_experts,
                                                 ratio=prune.expert_ratio))
