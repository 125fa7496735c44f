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

`choose_heal` (healing's part, finetune/memory.py) is `adapter: auto`: full weights where they fit (sharded with FSDP over several GPUs), else
LoRA, else QLoRA (a GPU: bitsandbytes), else layer-local healing; nothing fits: the plan says so before any
load. The numbers are estimates with stated formulas; bench/scale_rehearsal.py measures them.
"""

from __future__ import annotations

from layerprune.finetune.memory import choose_heal, replace_streaming_bytes, teacher_pass_memory
from layerprune.hardware.devices import USABLE, Devices, StageMemory, runtime_bytes
from layerprune.models.shape import Job, ModelShape


def inference_activations(shape: ModelShape, job: Job, value_bytes: int, logits: bool = True) -> int:
    """One batch forward: hidden buffers, one MLP intermediate and (logits) three logits-sized fp32 buffers
    (the head's output, its cast and the log-softmax; measured on SmolLM2 and Gemma-3), per token. Activation
    metrics stop before the head (no logits)."""
    tokens = job.batch * job.seq_len
    return tokens * (8 * shape.hidden + 2 * shape.intermediate) * value_bytes + \
        (min(tokens, job.loss_chunk) * shape.vocab * 4 * 3 if logits else 0)


def load_bytes(params: int, stored: float, compute: int) -> int:
    """Weights loaded to compute in another dtype than stored (measured on SmolLM2: the peak is about the
    larger of the two, as tensors are read and cast one by one)."""
    return int(params * max(stored, compute))


def stream_score_bytes(shape: ModelShape, job: Job, devices: Devices) -> int:
    """`score --streaming`: the embeddings (first pass) or one layer, in the stored dtype, plus every
    calibration row's hidden state (fp32, input and output of the current layer) and one batch's activations."""
    stored = shape.stored_bytes
    tokens = job.calibration_rows * job.calibration_len
    weights = max(shape.embedding, max(shape.per_layer)) * stored
    batch = min(job.calibration_rows, 8) * job.calibration_len * (8 * shape.hidden + 2 * shape.intermediate) * 4
    return int(runtime_bytes(devices) + weights + tokens * shape.hidden * 4 * 2 + batch)


def stream_eval_bytes(shape: ModelShape, job: Job, devices: Devices) -> int:
    """`eval --streaming`: one layer, then the embeddings, final norm and head with one batch's logits; every
    window's hidden state stays in memory."""
    stored = shape.stored_bytes
    batch_tokens = min(job.windows, 8) * job.window_len
    head = (shape.embedding + shape.head) * stored + batch_tokens * shape.vocab * (stored + 4)
    hidden = job.windows * job.window_len * shape.hidden * 4 * 2
    return int(runtime_bytes(devices) + max(head, max(shape.per_layer) * stored) + hidden)


def plan_memory(shape: ModelShape, job: Job, devices: Devices, heal: str = "auto", teacher: str | None = "alone"
                ) -> list[StageMemory]:
    """Peak bytes per device of each stage: score, prune, teacher pass (teacher "alone" or "beside" the student,
    finetune/memory.py teacher_pass_memory; None, or where the healing chosen is layer-local: it streams the
    teacher inside its own peak), heal, eval, and the layer-by-layer variants of score, heal (replace) and eval."""
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
    chosen = choose_heal(shape, job, devices, heal)
    if teacher and chosen.settings.get("option") != "layer-local":  # layer-local streams the teacher itself
        stages.append(teacher_pass_memory(shape, job, devices, beside=teacher == "beside", activations=infer))
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
