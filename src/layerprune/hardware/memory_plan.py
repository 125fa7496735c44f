"""The memory plan of a job, from the model's config alone (a meta-device model: no weight is read).

Peak memory per device is counted stage by stage from the model's shape:

- weights: parameters x bytes per value (bf16/fp16 2, fp32 4, 4-bit NF4 ~0.56 with its scales);
- training states: AdamW with fp32 master weights keeps 16 bytes per trained parameter (weight 4, gradient
  4, two moments 8); FSDP shards them over the GPUs, DDP does not;
- activations of training: per layer and token, 34 x hidden bytes in 16-bit (x2 in fp32) without
  recomputation, 2 x hidden with gradient checkpointing ("Reducing Activation Recomputation in Large
  Transformer Models", arXiv 2205.05198, with fused attention so the score matrix is never stored), plus
  the logits of `loss_chunk` positions;
- activations of inference: a few hidden-size buffers, one MLP's intermediate and one logits chunk per token;
- layer by layer (`replace`, `block-local`, streaming scores and perplexity): the largest layer (trained:
  x16), the embeddings, and the hidden states of every calibration row held in fp32.

`choose_heal` is `adapter: auto`: full weights where they fit (sharded with FSDP over several GPUs), else
LoRA, else QLoRA (a GPU: bitsandbytes), else layer-local healing; nothing fits: the plan says so before any
load. The numbers are estimates with stated formulas; bench/scale_rehearsal.py measures them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GiB = 2**30
USABLE = 0.9  # of a device's memory: what the allocator, the CUDA context and the OS leave
ADAM_BYTES = 16  # fp32 weight + fp32 gradient + two fp32 moments
NF4_BYTES = 0.5625  # 4-bit values + one fp32 absmax per 64 (bitsandbytes, double quantization off)
HEAL_ORDER = ("full", "lora", "qlora", "layer-local")
RUNTIME_BYTES = int(0.45 * 2**30)  # Python + torch + transformers imported (bench/scale_rehearsal.py: 0.39 GiB)


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: parameter counts by part and the sizes activations scale with."""

    name: str
    per_layer: tuple[int, ...]  # parameters of each decoder layer (MoE: every expert)
    embedding: int
    head: int  # lm_head parameters; 0 when tied to the embeddings
    other: int  # final norm and the rest
    hidden: int
    intermediate: int
    vocab: int
    linear_dims: tuple[tuple[int, int], ...]  # (in, out) of each Linear in one layer (LoRA's size)
    stored_bytes: float = 2.0  # per value as stored on disk

    @property
    def layers(self) -> int:
        return len(self.per_layer)

    def params(self, layers: int | None = None) -> int:
        """All parameters with `layers` decoder layers kept (the average layer's size each)."""
        kept = self.layers if layers is None else layers
        return round(sum(self.per_layer) * kept / self.layers) + self.embedding + self.head + self.other

    def layer_params(self, layers: int | None = None) -> int:
        kept = self.layers if layers is None else layers
        return round(sum(self.per_layer) * kept / self.layers)


@dataclass(frozen=True)
class Devices:
    kind: str  # "cpu" or "cuda"
    count: int
    memory: int  # bytes per device (the CPU: available RAM)
    bf16: bool = True  # computes bf16 natively (a CPU without AVX512-BF16/AMX: fp32)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.bf16 or self.kind == "cuda" else 4

    def describe(self) -> str:
        size = f"{self.memory / GiB:.0f} GiB"
        return f"{self.count} x GPU {size}" if self.kind == "cuda" else f"CPU, {size} available"


@dataclass
class StageMemory:
    stage: str
    bytes_per_device: int
    detail: str
    fits: bool = True
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """The parts of a job's settings that memory depends on."""

    layers_kept: int
    batch: int = 4
    seq_len: int = 256
    loss_chunk: int = 1024
    gradient_checkpointing: bool = False
    lora_r: int = 8
    train_last_layers: int = 3
    rows: int = 64  # healing rows of layer-local healing (finetune/local.py: DEFAULT_LOCAL_ROWS)
    calibration_rows: int = 10  # scoring rows (CalibrationConfig.n_samples) of calibration_len tokens
    calibration_len: int = 256
    windows: int = 300  # perplexity windows (EvalConfig.ppl_windows) of window_len tokens, in batches of 8
    window_len: int = 128
    train_dtype_bytes: int = 4  # fp32 master weights (HealConfig.train_dtype fp32)


def shape_from_config(config, name: str = "model", stored_bytes: float | None = None) -> ModelShape:
    """The shape of a transformers config, counted on the meta device (nothing is allocated)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from layerprune.models.anatomy import count_parameters, get_anatomy

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    counts = count_parameters(model)
    anatomy = get_anatomy(model)
    embedding = sum(p.numel() for p in anatomy.embeddings.parameters())
    in_model = 0 if anatomy.tied_embeddings or anatomy.lm_head is None else \
        sum(p.numel() for p in anatomy.lm_head.parameters())
    tied = anatomy.tied_embeddings or bool(getattr(config, "tie_word_embeddings", False))  # meta models do not tie
    head = 0 if tied else in_model
    dims = tuple((m.in_features, m.out_features) for m in anatomy.layers[0].modules() if isinstance(m, torch.nn.Linear))
    text = config.get_text_config()
    dtype = getattr(text, "dtype", None)
    if stored_bytes is None:
        stored_bytes = 4.0 if str(dtype) in ("float32", "torch.float32") else 2.0
    return ModelShape(
        name=name, per_layer=tuple(counts["per_layer"]), embedding=embedding, head=head,
        other=counts["total"] - sum(counts["per_layer"]) - embedding - in_model, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), vocab=text.vocab_size,
        linear_dims=dims, stored_bytes=stored_bytes,
    )


def inference_activations(shape: ModelShape, job: Job, value_bytes: int, logits: bool = True) -> int:
    """One batch forward: hidden buffers, one MLP intermediate and (logits) three logits-sized fp32 buffers
    (the head's output, its cast and the log-softmax; measured on SmolLM2 and Gemma-3), per token. Activation
    metrics stop before the head (no logits)."""
    tokens = job.batch * job.seq_len
    return tokens * (8 * shape.hidden + 2 * shape.intermediate) * value_bytes + \
        (min(tokens, job.loss_chunk) * shape.vocab * 4 * 3 if logits else 0)


def training_activations(shape: ModelShape, job: Job, layers: int, value_bytes: int) -> int:
    tokens = job.batch * job.seq_len
    per_layer = (2 if job.gradient_checkpointing else 34) * shape.hidden * tokens * value_bytes // 2
    recompute = 34 * shape.hidden * tokens * value_bytes // 2 if job.gradient_checkpointing else 0
    logits = min(tokens, job.loss_chunk) * shape.vocab * 4 * 3  # logits, softmax, their gradient
    return per_layer * layers + recompute + logits


def load_bytes(params: int, stored: float, compute: int) -> int:
    """Weights loaded to compute in another dtype than stored (measured on SmolLM2: the peak is about the
    larger of the two, as tensors are read and cast one by one)."""
    return int(params * max(stored, compute))


def autocast_copies(params: int, job: Job, compute: int) -> int:
    """16-bit autocast over fp32 weights keeps a 16-bit copy of every weight it used until the backward."""
    return params * compute if compute < job.train_dtype_bytes else 0


def lora_dropout_activations(shape: ModelShape, job: Job, layers: int, value_bytes: int) -> int:
    """LoRA's dropout keeps, per adapted Linear and token, its dropped input and mask (one layer's with
    gradient checkpointing)."""
    tokens = job.batch * job.seq_len
    kept = 1 if job.gradient_checkpointing else layers
    return kept * tokens * sum(i for i, _ in shape.linear_dims) * value_bytes * 2


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
        frozen_bytes = NF4_BYTES if option == "qlora" else job.train_dtype_bytes
        trained = lora_params(shape, kept, job.lora_r)
        frozen = round(shape.layer_params(kept) * frozen_bytes) + (shape.params(kept) - shape.layer_params(kept)) * \
            job.train_dtype_bytes
        copies = autocast_copies(params, job, compute) if option == "lora" else 0
        how = f"frozen weights {frozen / GiB:.1f} GiB + {trained / 1e6:.0f}M LoRA params x {ADAM_BYTES} B"
        return StageMemory("heal", runtime + frozen + trained * ADAM_BYTES + copies + acts +
                           lora_dropout_activations(shape, job, kept, compute), how,
                           settings={"method": option if option == "qlora" else None, "adapter": "lora"})
    # layer-local: `replace --streaming`, one layer at a time
    total = replace_streaming_bytes(shape, job, devices)
    how = f"one layer in fp32 + its least-squares system ({shape.intermediate}^2 in fp64) + {job.rows} rows"
    return StageMemory("heal", total, how, settings={"method": "replace", "streaming": True})


def runtime_bytes(devices: Devices) -> int:
    """Host memory of the interpreter with torch and transformers imported (counted on a CPU only)."""
    return RUNTIME_BYTES if devices.kind == "cpu" else 0


def stream_score_bytes(shape: ModelShape, job: Job, devices: Devices) -> int:
    """`score --streaming`: the embeddings (first pass) or one layer, in the stored dtype, plus every
    calibration row's hidden state (fp32, input and output of the current layer) and one batch's activations."""
    stored = shape.stored_bytes
    tokens = job.calibration_rows * job.calibration_len
    weights = max(shape.embedding, max(shape.per_layer)) * stored
    batch = min(job.calibration_rows, 8) * job.calibration_len * (8 * shape.hidden + 2 * shape.intermediate) * 4
    return int(runtime_bytes(devices) + weights + tokens * shape.hidden * 4 * 2 + batch)


def replace_streaming_bytes(shape: ModelShape, job: Job, devices: Devices) -> int:
    """`finetune --method replace --streaming`: fp32 skeletons; the embeddings (first pass) or one layer (+ its
    stored copy while read), the fp64 normal equations of the MLP's output map and the LU copy of the solve,
    and the rows' hidden states of student and teacher."""
    stored = shape.stored_bytes
    layer = max(shape.per_layer)
    embedding = shape.embedding * (4 + stored)
    system = 2 * shape.intermediate ** 2 * 8 + shape.intermediate * shape.hidden * 8
    layer_step = layer * (4 + stored) + system
    hidden = job.rows * job.seq_len * shape.hidden * 4 * 3  # student in/out + the teacher's stream at a cut
    return int(runtime_bytes(devices) + max(embedding, layer_step) + hidden)


def stream_eval_bytes(shape: ModelShape, job: Job, devices: Devices) -> int:
    """`eval --streaming`: one layer, then the embeddings, final norm and head with one batch's logits; every
    window's hidden state stays in memory."""
    stored = shape.stored_bytes
    batch_tokens = min(job.windows, 8) * job.window_len
    head = (shape.embedding + shape.head) * stored + batch_tokens * shape.vocab * (stored + 4)
    hidden = job.windows * job.window_len * shape.hidden * 4 * 2
    return int(runtime_bytes(devices) + max(head, max(shape.per_layer) * stored) + hidden)


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


def plan_memory(shape: ModelShape, job: Job, devices: Devices, heal: str = "auto", teacher: bool = True
                ) -> list[StageMemory]:
    """Peak bytes per device of each stage: score, prune, teacher pass, heal, eval, and the layer-by-layer
    variants of score, heal (replace) and eval."""
    compute = devices.compute_bytes
    full, kept = shape.params(), shape.params(job.layers_kept)
    infer = inference_activations(shape, job, compute)
    per_device = max(1, devices.count) if devices.kind == "cuda" else 1
    runtime = runtime_bytes(devices)
    stages = [
        StageMemory("score", runtime + load_bytes(full, shape.stored_bytes, compute) // per_device +
                    inference_activations(shape, job, compute, logits=False),
                    f"{full / 1e9:.2f}B params x {compute} B + one calibration batch"),
        StageMemory("score (streaming)", stream_score_bytes(shape, job, devices),
                    "one layer or the embeddings + every calibration row's hidden state"),
        StageMemory("prune (on disk)", runtime, "tensors copied file to file by the kernel (never in memory)"),
    ]
    if teacher:
        both = (full + kept) * job.train_dtype_bytes // per_device
        stages.append(StageMemory("teacher pass", runtime + both + infer,
                                  "the unpruned teacher beside the student; the teacher is freed before training"))
    chosen = choose_heal(shape, job, devices, heal)
    stages.append(chosen)
    if chosen.settings.get("option") != "layer-local":  # the layer-by-layer alternative
        stages.append(StageMemory("heal (streaming)", replace_streaming_bytes(shape, job, devices),
                                  "replace --streaming: one layer + its least-squares system + the rows"))
    stages.append(StageMemory("eval", runtime + load_bytes(kept, shape.stored_bytes, compute) // per_device + infer,
                              f"{kept / 1e9:.2f}B params x {compute} B"))
    stages.append(StageMemory("eval (streaming)", stream_eval_bytes(shape, job, devices),
                              "one layer, then embeddings + head + one batch's logits; every window's hidden state"))
    limit = USABLE * devices.memory
    for stage in stages:
        if stage.stage != "heal":
            stage.fits = stage.bytes_per_device <= limit
    return stages


def gpus_for_full_heal(shape: ModelShape, job: Job, gpu_memory: int) -> int | None:
    """The fewest GPUs of `gpu_memory` that hold a full-weight heal with FSDP (None: more than 64)."""
    for n in range(1, 65):
        if heal_memory("full", shape, job, Devices("cuda", n, gpu_memory)).bytes_per_device <= USABLE * gpu_memory:
            return n
    return None


def parse_memory(text: str) -> int:
    """'80GB', '24 GiB', '512MB' -> bytes (GB and GiB both read as 2**30: how GPU memory is quoted)."""
    import re

    from layerprune.errors import LayerpruneError

    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?)?\s*", str(text), flags=re.I)
    if not match or not math.isfinite(float(match.group(1))):
        raise LayerpruneError(f"cannot read the memory size {text!r}; write e.g. 80GB")
    unit = (match.group(2) or "G").upper()[0]
    return int(float(match.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])
