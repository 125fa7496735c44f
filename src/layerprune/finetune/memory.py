"""Peak memory of healing per device, from the model's shape alone: full weights (AdamW with fp32 master weights:
16 bytes per trained parameter, sharded by FSDP), LoRA, QLoRA and layer-local healing, and the first of them
that fits (`choose_heal`). Activations of training: per layer and token, 34 x hidden bytes in 16-bit (x2 in fp32)
without recomputation, 2 x hidden with gradient checkpointing ("Reducing Activation Recomputation in Large
Transformer Models", arXiv 2205.05198), plus the logits of `loss_chunk` positions."""

from __future__ import annotations

from layerprune.hardware.devices import USABLE, Devices, GiB, StageMemory, runtime_bytes
from layerprune.models.shape import Job, ModelShape

ADAM_BYTES = 16  # fp32 weight + fp32 gradient + two fp32 moments


NF4_BYTES = 0.5625  # 4-bit values + one fp32 absmax per 64 (bitsandbytes, double quantization off)


HEAL_ORDER = ("full", "lora", "qlora", "layer-local")


NORMAL_EQUATIONS_BLOCK = 1024  # finetune/normal_equations.py BLOCK (not imported: planning loads no torch)


def training_activations(shape: ModelShape, job: Job, layers: int, value_bytes: int) -> int:
    tokens = job.batch * job.seq_len
    per_layer = (2 if job.gradient_checkpointing else 34) * shape.hidden * tokens * value_bytes // 2
    recompute = 34 * shape.hidden * tokens * value_bytes // 2 if job.gradient_checkpointing else 0
    logits = min(tokens, job.loss_chunk) * shape.vocab * 4 * 3  # logits, softmax, their gradient
    return per_layer * layers + recompute + logits


def autocast_copies(params: int, job: Job, compute: int) -> int:
    """16-bit autocast over fp32 weights keeps a 16-bit copy of every weight it used until the backward."""
    return params * compute if compute < job.train_dtype_bytes else 0


def lora_dropout_activations(shape: ModelShape, job: Job, layers: int, value_bytes: int) -> int:
    """LoRA's dropout keeps, per adapted Linear and token, its dropped input and mask (one layer's with
    gradient checkpointing)."""
    tokens = job.batch * job.seq_len
    kept = 1 if job.gradient_checkpointing else layers
    return kept * tokens * sum(i for i, _ in shape.linear_dims) * value_bytes * 2


def frozen_weight_bytes(shape: ModelShape, job: Job, devices: Devices) -> int:
    """Bytes per frozen weight (a LoRA base, a teacher): the checkpoint's 16-bit where the device computes 16-bit
    natively (finetune/placement.py loads them so: hardware/compute.py frozen_dtype), else train_dtype (fp32)."""
    return 2 if devices.compute_bytes == 2 and shape.stored_bytes == 2 else job.train_dtype_bytes


def teacher_pass_memory(shape: ModelShape, job: Job, devices: Devices, *, beside: bool, activations: int
                        ) -> StageMemory:
    """Distillation's teacher pass (finetune/teacher_first.py): the unpruned teacher's top-k targets, made before
    training. The teacher is whole on each device (it is loaded there, never sharded), its weights held as
    `frozen_weight_bytes` says and loaded in that dtype directly (on a CPU, fp32 from a 16-bit checkpoint peaks at
    the larger of the two while read), plus one batch's forward (`activations`). Alone: the student loads only
    once the teacher is freed. beside: a time budget with room for both, or a teacher read live while training
    (no top-k cache, init replace): the student is in memory too, in train_dtype."""
    full, held = shape.params(), frozen_weight_bytes(shape, job, devices)
    weights = full * (max(held, shape.stored_bytes) if devices.kind == "cpu" else held)
    student = shape.params(job.layers_kept) * job.train_dtype_bytes if beside else 0
    how = f"the unpruned teacher ({held} B per weight)" + (
        " beside the student; freed before training" if beside else " alone; freed before the student loads")
    return StageMemory("teacher pass", int(runtime_bytes(devices) + weights + student + activations), how)


def lora_params(shape: ModelShape, layers: int, r: int) -> int:
    return layers * sum(r * (i + o) for i, o in shape.linear_dims)


def heal_memory(option: str, shape: ModelShape, job: Job, devices: Devices) -> StageMemory:
    """Peak bytes per device of healing the pruned model (job.layers_kept layers) with `option`."""
    kept = job.layers_kept
    compute = devices.compute_bytes
    params = shape.params(kept)
    runtime = runtime_bytes(devices)
    sharded = devices.kind == "cuda" and devices.count > 1
    shards = devices.count if sharded else 1
    acts = training_activations(shape, job, kept, compute)
    if option == "full":
        states = ADAM_BYTES * params // shards
        how = f"{params / 1e9:.2f}B params x {ADAM_BYTES} B (AdamW, fp32 master)" + (
            f" / {devices.count} GPUs (FSDP)" if sharded else "")
        return StageMemory("heal", runtime + states + autocast_copies(params, job, compute) // shards + acts, how,
                           settings={"adapter": "none", "fsdp": sharded})
    if option in ("lora", "qlora"):
        held = frozen_weight_bytes(shape, job, devices) if option == "lora" else job.train_dtype_bytes
        frozen_bytes = NF4_BYTES if option == "qlora" else held
        trained = lora_params(shape, kept, job.lora_r)
        frozen = round(shape.layer_params(kept) * frozen_bytes) + (shape.params(kept) - shape.layer_params(kept)) * held
        copies = params * compute if option == "lora" and compute < held else 0  # autocast's 16-bit copies
        how = f"frozen weights {frozen / GiB:.1f} GiB" + (f" ({held} B per weight)" if option == "lora" else "") + \
            f" + {trained / 1e6:.0f}M LoRA params x {ADAM_BYTES} B"
        total = runtime + frozen + trained * ADAM_BYTES + copies + acts + lora_dropout_activations(shape, job, kept,
                                                                                                   compute)
        return StageMemory("heal", total, how, settings={"method": option if option == "qlora" else None,
                                                         "adapter": "lora"})
    # layer-local: `replace --streaming`, one layer at a time
    total = replace_streaming_bytes(shape, job, devices)
    how = f"one layer in fp32 + its least-squares system ({shape.hidden}^2 in fp64) + {job.rows} rows"
    return StageMemory("heal", total, how, settings={"method": "replace", "streaming": True})


def replace_streaming_bytes(shape: ModelShape, job: Job, devices: Devices) -> int:
    """`finetune --method replace --streaming`: fp32 skeletons, and the rows' hidden states of student and
    teacher, beside the largest of: the embeddings (first pass) in fp32 with their stored copy while read; one
    layer in fp32 with its stored copy while read; the layer before a cut in fp32 with one batch's activations
    or its least-squares step, whichever is larger; that layer with its folded output projection. The map T
    is hidden x hidden (it acts on the MLP's output): the normal equations in fp64 (gram and right-hand side,
    solved in place by Cholesky: one block column of extra) and T in fp32; the fold makes the product, then
    its copy is kept until written (one cut counted). Measured on a Llama-3-70B-shaped checkpoint: 6.42 GiB
    against 6.41 planned (bench/scale_rehearsal.py)."""
    stored = shape.stored_bytes
    layer = max(shape.per_layer)
    h = shape.hidden
    system = 2 * h * h * 8 + h * h * 4 + 3 * h * NORMAL_EQUATIONS_BLOCK * 8
    batch = min(job.rows, 8) * job.seq_len * (8 * h + 2 * shape.intermediate) * 4
    folded = 2 * h * shape.intermediate * 4
    weights = max(shape.embedding * (4 + stored), layer * (4 + stored), layer * 4 + max(system, batch),
                  layer * 4 + folded)
    hidden = job.rows * job.seq_len * h * 4 * 3  # student in/out + the teacher's stream at a cut
    return int(runtime_bytes(devices) + weights + hidden)


def choose_heal(shape: ModelShape, job: Job, devices: Devices, wanted: str = "auto") -> StageMemory:
    """`adapter: auto`: the first of full weights, LoRA, QLoRA (GPU), layer-local that fits; `wanted` forces one
    (its plan says whether it fits)."""
    limit = USABLE * devices.memory
    options = [wanted] if wanted != "auto" else [o for o in HEAL_ORDER if o != "qlora" or devices.kind == "cuda"]
    plans = [heal_memory(option, shape, job, devices) for option in options]
    for plan in plans:
        plan.fits = plan.bytes_per_device <= limit
        plan.settings["option"] = options[plans.index(plan)]
        if plan.fits:
            return plan
    return plans[-1]


def gpus_for_full_heal(shape: ModelShape, job: Job, gpu_memory: int) -> int | None:
    """The fewest GPUs of `gpu_memory` that hold a full-weight heal with FSDP (None: more than 64)."""
    for n in range(1, 65):
        if heal_memory("full", shape, job, Devices("cuda", n, gpu_memory)).bytes_per_device <= USABLE * gpu_memory:
            return n
    return None
