"""What memory depends on, read from a model's config without loading a weight: parameter counts by part and the
sizes activations scale with (ModelShape, counted on the meta device), and the settings of a job that matter (Job)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from layerprune.errors import LayerpruneError
from layerprune.models.anatomy import count_parameters, get_anatomy
from layerprune.models.builtin import builtin_gguf_path
from layerprune.models.experts.anatomy import moe_layers
from layerprune.models.gguf_file import gguf_config
from layerprune.models.loading import model_folder, resolve_model_ref
from layerprune.models.memory_policy import checkpoint_bytes
from layerprune.models.model_config import read_model_config


GGUF_LOADED_BYTES = 4.0  # a GGUF file is loaded dequantized to fp32 (models/loading.py), and planned so


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
    # Mixture-of-experts: the parameters over all layers (in per_layer) that grow with the expert count (the
    # routed experts', and the routers' one row per expert), the routers' alone, the experts per MoE layer
    # and how many each token goes to; the experts per MoE layer the pruned model keeps.
    expert_params: int = 0
    router_params: int = 0
    experts: int = 0
    top_k: int = 0
    experts_kept: int = 0

    @property
    def layers(self) -> int:
        return len(self.per_layer)

    def params(self, layers: int | None = None) -> int:
        """All parameters of the model as it is (layers None), or of the pruned model with `layers` decoder
        layers kept (the average layer's size each) and experts_kept experts per MoE layer."""
        return self.layer_params(layers) + self.embedding + self.head + self.other

    def layer_params(self, layers: int | None = None) -> int:
        if layers is None:
            return sum(self.per_layer)
        gone = self.expert_params * (1 - self.experts_kept / self.experts) if self.experts else 0
        return round((sum(self.per_layer) - gone) * layers / self.layers)

    def active_params(self, layers: int | None = None) -> int:
        """The parameters one token's forward computes with: a MoE layer runs top_k of its experts, however many
        there are (so removing experts leaves the time per token as it was)."""
        idle = (self.expert_params - self.router_params) * (1 - self.top_k / self.experts) if self.experts else 0
        kept = self.layers if layers is None else layers
        return round((sum(self.per_layer) - idle) * kept / self.layers) + self.embedding + self.head + self.other

    def without_experts(self, n_drop: int) -> "ModelShape":
        """The shape whose pruned model keeps experts - n_drop experts in every MoE layer."""
        if not self.experts:
            raise LayerpruneError(f"{self.name} is not a mixture-of-experts model: it has no experts to remove")
        return replace(self, experts_kept=self.experts - n_drop)


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
    moe = _moe_counts(model)
    dtype = getattr(text, "dtype", None)
    if stored_bytes is None:
        stored_bytes = 4.0 if str(dtype) in ("float32", "torch.float32") else 2.0
    return ModelShape(
        name=name, per_layer=tuple(counts["per_layer"]), embedding=embedding, head=head,
        other=counts["total"] - sum(counts["per_layer"]) - embedding - in_model, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), vocab=text.vocab_size,
        linear_dims=dims, stored_bytes=stored_bytes, **moe,
    )


def _moe_counts(model) -> dict:
    """expert_params / experts / top_k / experts_kept of a (meta) model; {} for a dense one."""
    try:
        layers = moe_layers(model)
    except LayerpruneError:
        return {}
    if not layers:
        return {}
    experts = layers[0].num_experts
    routers = sum(p.numel() for layer in layers for p in layer.router.parameters())
    return {"expert_params": sum(p.numel() for layer in layers for p in layer.experts.parameters()) + routers,
            "router_params": routers, "experts": experts, "top_k": int(model.config.get_text_config().num_experts_per_tok),
            "experts_kept": experts}


def model_shape(ref: str, *, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model reference from its config alone: a local folder, an alias (its converted
    folder), or a hub id whose config is in the local cache."""
    resolved = resolve_model_ref(ref)
    if resolved.kind == "hub":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(ref, local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise LayerpruneError(f"the config of {ref} is not in the local cache (plan reads no weights, but needs "
                                  "config.json): download it once, or pass a local folder") from err
        return shape_from_config(config, ref)
    if resolved.kind in ("gguf", "builtin"):  # from the metadata: nothing dequantized, no tensor data read
        path = builtin_gguf_path(resolved.location) if resolved.kind == "builtin" else Path(resolved.location)
        return shape_from_config(gguf_config(path), ref, stored_bytes=GGUF_LOADED_BYTES)
    folder = model_folder(ref)
    shape = shape_from_config(read_model_config(folder, trust_remote_code=trust_remote_code), ref)
    stored = checkpoint_bytes(folder)
    if stored:
        shape = replace(shape, stored_bytes=stored / shape.params())
    return shape
