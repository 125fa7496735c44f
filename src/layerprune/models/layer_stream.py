"""Run a checkpoint on disk one decoder layer at a time: for models bigger than memory.

The model is built as a skeleton on the meta device (accelerate's `init_empty_weights`: parameters take no
memory, buffers such as rotary frequencies are real). `layer_inputs` sends the batches through a forward
whose decoder layers are stand-ins: each records the arguments the model hands it (causal or
sliding-window mask, rotary position embeddings, ...; computed by the model's own code, so no
family-specific knowledge is needed) and the last one stops the forward. Then each layer's weights are
read from the shards (`CheckpointWeights`: safetensors `safe_open`, one layer's tensors), every batch's
hidden states go through it with the recorded arguments, and its weights are dropped again.

Used by streaming scores (importance/streaming.py) and streaming perplexity (evaluation/perplexity.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from layerprune.errors import LayerpruneError, first_line
from layerprune.models.anatomy import get_anatomy
from layerprune.models.checkpoint import TensorEntry, find_layers_prefix, read_checkpoint
from layerprune.models.decoder_calls import hidden_of, last_logits_kwargs, layer_input
from layerprune.models.dtypes import SAFETENSORS_FLOATS, parse_dtype, stored_dtype
from layerprune.models.loading import check_causal_lm, model_folder, resolve_model_ref
from layerprune.models.model_config import read_model_config, trusts_remote_code


def local_folder(ref: str | os.PathLike) -> Path:
    """The Hugging Face folder of a reference (aliases and GGUF files are converted once); no hub ids."""
    if resolve_model_ref(ref).kind == "hub":
        raise LayerpruneError(f"streaming reads a local checkpoint; {ref} is a hub id (download it first)")
    return Path(model_folder(ref))


def skeleton(folder: Path, dtype, entries: dict[str, TensorEntry]) -> nn.Module:
    """The model with parameters on the meta device and real buffers (rotary frequencies, ...)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    trusted = trusts_remote_code()
    check_causal_lm(str(folder), trusted)  # encoders and encoder-decoders are refused as in load_model
    config = read_model_config(folder, trust_remote_code=trusted)
    torch_dtype = resolve_dtype(config, dtype, entries)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trusted)
    except ValueError as err:
        raise LayerpruneError(
            f"unsupported architecture {config.model_type!r} in {folder}: {first_line(err)}"
        ) from err
    return model.eval()


def resolve_dtype(config, dtype, entries: dict[str, TensorEntry]) -> torch.dtype:
    """dtype "auto" as from_pretrained reads it: the config's dtype, else the first stored float tensor's."""
    dtype = parse_dtype(dtype)
    if dtype != "auto":
        return dtype
    stored = stored_dtype(config)
    if stored is not None:
        return stored
    for entry in entries.values():
        if entry.dtype in SAFETENSORS_FLOATS:
            return SAFETENSORS_FLOATS[entry.dtype]
    return torch.float32


# How transformers 5 fuses the per-expert tensors of a checkpoint into one 3-D parameter per kind on load
# (its conversion_mapping.py): the in-memory name after ".experts." -> the stored parts of expert j
# (".experts.<j>.<part>"), concatenated on their output axis; Qwen2/3-MoE, OLMoE, DeepSeek spell them
# gate/up/down_proj, Mixtral w1/w3/w2. GPT-OSS and Granite-MoE store their experts fused already.
FUSED_EXPERTS = {
    "gate_up_proj": (("gate_proj.weight", "up_proj.weight"), ("w1.weight", "w3.weight")),
    "down_proj": (("down_proj.weight",), ("w2.weight",)),
}
# Where transformers renames on load, (in memory, on disk): Mixtral's block, Granite-MoE's fused experts and router.
RENAMES = ((".mlp.", ".block_sparse_moe."),
           (".block_sparse_moe.experts.gate_up_proj", ".block_sparse_moe.input_linear.weight"),
           (".block_sparse_moe.experts.down_proj", ".block_sparse_moe.output_linear.weight"),
           (".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight"))


class CheckpointWeights:
    """Puts tensors of the checkpoint into the skeleton and takes them out again.

    Names are matched as stored, or without the *ForCausalLM wrapper prefix (GPT-2's `h.0...`
    for `transformer.h.0...`). Each load opens the shard files it needs with safe_open and lets
    them go with the tensors, so mapped pages are released with the layer.
    """

    def __init__(self, folder: Path, entries: dict[str, TensorEntry], model: nn.Module, layers_path: str):
        self.folder = folder
        self.entries = entries
        self.model = model
        prefix = find_layers_prefix(entries, layers_path)
        self.wrapper = layers_path[: len(layers_path) - len(prefix)]  # "transformer." or ""

    def checkpoint_name(self, name: str) -> str | None:
        if name in self.entries:
            return name
        if self.wrapper and name.startswith(self.wrapper) and name[len(self.wrapper):] in self.entries:
            return name[len(self.wrapper):]
        return None

    def stored_name(self, name: str) -> str | None:
        """The checkpoint's name for `name`, also where transformers renames on load (RENAMES)."""
        for spelling in (name, *(name.replace(memory, disk) for memory, disk in RENAMES if memory in name)):
            stored = self.checkpoint_name(spelling)
            if stored is not None:
                return stored
        return None

    def load(self, prefix: str, module: nn.Module) -> list[str]:
        """Materialise every parameter (and stored buffer) of `module`, whose full name starts with prefix."""
        wanted: dict[str, str] = {}
        fused: dict[str, list[list[str]]] = {}
        missing = []
        for local, param in module.named_parameters():
            stored = self.stored_name(prefix + local)
            if stored is not None:
                wanted[prefix + local] = stored
            elif (parts := self.expert_parts(prefix + local, param.shape[0])) is not None:
                fused[prefix + local] = parts
            else:
                missing.append(prefix + local)
        if missing:
            raise LayerpruneError(
                f"the checkpoint has no tensor for {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; streaming needs tensors stored under the model's own parameter names, or per-expert tensors "
                "as transformers fuses them"
            )
        for local, _ in module.named_buffers():
            stored = self.stored_name(prefix + local)
            if stored is not None:
                wanted[prefix + local] = stored
        return self.read(wanted) + self.read_fused(fused)

    def expert_parts(self, name: str, n_experts: int) -> list[list[str]] | None:
        """For a fused 3-D expert parameter (`...experts.gate_up_proj`), the stored per-expert tensors it is
        made of, [expert][part] (None when the checkpoint does not hold them)."""
        head, _, attr = name.rpartition(".experts.")
        for parts in FUSED_EXPERTS.get(attr, ()):
            names = [[self.stored_name(f"{head}.experts.{j}.{part}") for part in parts] for j in range(n_experts)]
            if all(all(names_j) for names_j in names):
                return names
        return None

    def read_fused(self, fused: dict[str, list[list[str]]]) -> list[str]:
        """Stack each expert's parts (concatenated on their output axis) into the fused parameter, as
        transformers' loader does (MergeModulelist(dim=0), then Concatenate(dim=1))."""
        from safetensors import safe_open

        for name, parts in fused.items():
            by_file: dict[str, list[str]] = {}
            for stored in (part for expert in parts for part in expert):
                by_file.setdefault(self.entries[stored].file, []).append(stored)
            tensors = {}
            for file, names in by_file.items():
                with safe_open(self.folder / file, framework="pt", device="cpu") as f:
                    tensors.update((stored, f.get_tensor(stored)) for stored in names)
            set_tensor(self.model, name, torch.stack([torch.cat([tensors[p] for p in expert]) for expert in parts]))
        return list(fused)

    def read(self, wanted: dict[str, str]) -> list[str]:
        from safetensors import safe_open

        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, stored in wanted.items():
            by_file.setdefault(self.entries[stored].file, []).append((name, stored))
        for file, pairs in by_file.items():
            with safe_open(self.folder / file, framework="pt", device="cpu") as f:
                for name, stored in pairs:
                    set_tensor(self.model, name, f.get_tensor(stored))
        return list(wanted)

    def unload(self, names: list[str]) -> None:
        for name in names:
            set_tensor(self.model, name, None)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Replace a parameter or buffer by `value` cast to its dtype; None puts it back on the meta device."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    old = module._parameters.get(attr) if attr in module._parameters else module._buffers[attr]
    if value is None:
        value = torch.empty_like(old, device="meta")
    elif value.is_floating_point() and old.is_floating_point():
        value = value.to(old.dtype)
    if value.shape != old.shape:
        raise LayerpruneError(
            f"tensor {name} has shape {tuple(value.shape)} in the checkpoint, {tuple(old.shape)} in the model"
        )
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


class _Recorded(Exception):
    """Stops the capture forward once the last layer's arguments are recorded."""


def layer_inputs(model: nn.Module, weights: CheckpointWeights, calibration, batch_size: int) -> list[dict]:
    """Per calibration batch (a CalibrationData, or a list of (input_ids, attention_mask)): the first layer's
    input and every layer's other arguments.

    A forward of the model with its layers replaced by recorders, so masks (causal, sliding window)
    and position embeddings come from the model's own code, exactly as in a normal forward.
    """
    if batch_size < 1:
        raise LayerpruneError(f"batch_size must be >= 1, got {batch_size}")
    layers = get_anatomy(model).layers
    n = len(layers)
    outside = outside_parameters(model)
    current: dict = {}

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden = layer_input(args, kwargs)
            rest = args[1:] if args else ()
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"} if not args else kwargs
            if i == 0:
                current["hidden"] = hidden
            current["calls"].append((rest, kwargs))
            if i == n - 1:
                raise _Recorded
            return hidden

        return forward

    batches = []
    loaded = []
    extra = last_logits_kwargs(model)
    try:
        for name in outside:
            loaded += weights.read({name: required(weights, name)})
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        with torch.no_grad():
            given = calibration.nonempty_batches(batch_size) if hasattr(calibration, "nonempty_batches") else calibration
            for ids, mask in given:
                current.clear()
                current["calls"] = []
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
                except _Recorded:
                    pass
                if len(current["calls"]) != n:
                    raise LayerpruneError(f"the model called {len(current['calls'])} of its {n} layers in a forward")
                batches.append({"hidden": current["hidden"], "mask": mask, "calls": current["calls"]})
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        weights.unload(loaded)
    return batches


def required(weights: CheckpointWeights, name: str) -> str:
    stored = weights.checkpoint_name(name)
    if stored is None:
        raise LayerpruneError(f"the checkpoint has no tensor for {name}")
    return stored


def outside_parameters(model: nn.Module, with_head: bool = False) -> list[str]:
    """The parameters outside the decoder layers: what the forward touches before layer 0 (embeddings), and
    with_head also the final norm and an untied lm_head."""
    anatomy = get_anatomy(model)
    layer_ids = {id(p) for p in anatomy.layers.parameters()}
    head = anatomy.lm_head
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    embedding_ids = {id(p) for p in anatomy.embeddings.parameters()}
    head_too = with_head and not ties_head(model)  # a tied head is the embeddings (see tied_head)
    return [name for name, p in model.named_parameters()
            if id(p) not in layer_ids and (head_too or id(p) not in head_ids or id(p) in embedding_ids)]


def ties_head(model: nn.Module) -> bool:
    """Whether the lm_head is the embeddings: said by the config (the meta skeleton does not tie them)."""
    return get_anatomy(model).tied_embeddings or bool(getattr(model.config, "tie_word_embeddings", False))


@contextlib.contextmanager
def tied_head(model: nn.Module):
    """A tied lm_head shares the loaded embeddings' weight for a while."""
    anatomy = get_anatomy(model)
    head = anatomy.lm_head
    if head is None or not ties_head(model) or head.weight is anatomy.embeddings.weight:
        yield
        return
    own = head.weight
    head.weight = anatomy.embeddings.weight
    try:
        yield
    finally:
        head.weight = own


def run_layer(block: nn.Module, i: int, batches: list[dict], before=None) -> None:
    """Push every recorded batch's hidden states through layer i; its output becomes the next layer's input.
    before(batch): called as each batch goes in (e.g. a hook that needs the batch's attention mask)."""
    with torch.no_grad():
        for batch in batches:
            if before is not None:
                before(batch)
            rest, kwargs = batch["calls"][i]
            batch["hidden"] = hidden_of(block(batch["hidden"], *rest, **kwargs))


@contextlib.contextmanager
def replayed_layers(anatomy, final_hidden: torch.Tensor):
    """The model's forward with its layers standing in: each passes its input on and the last returns
    `final_hidden`, so the model's own code applies the final norm, the head and any logit soft-capping."""
    n = len(anatomy.layers)

    def stand_in(i: int):
        def forward(*args, **kwargs):
            return final_hidden if i == n - 1 else layer_input(args, kwargs)

        return forward

    for i, layer in enumerate(anatomy.layers):
        layer.forward = stand_in(i)
    try:
        yield
    finally:
        for layer in anatomy.layers:
            layer.__dict__.pop("forward", None)


def streamed_forwards(model_ref: str | os.PathLike, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
                      dtype="auto", batch_size: int = 8, desc: str = "layers (streaming)", progress: bool = True):
    """Yields (model, i) for each (input_ids, attention_mask) batch of a checkpoint on disk, computed with
    one decoder layer in memory at a time: every batch's hidden states go through each layer in turn, then,
    inside the loop body, the model's own forward on batch i (layers replaced by its final hidden states)
    gives batch i's real output: final norm, head, soft-capping. Used by streaming perplexity and the
    teacher's top-k targets of a teacher bigger than memory."""
    from tqdm.auto import tqdm

    folder = local_folder(model_ref)
    entries = {entry.name: entry for entry in read_checkpoint(folder)}
    model = skeleton(folder, dtype, entries)
    anatomy = get_anatomy(model)
    weights = CheckpointWeights(folder, entries, model, anatomy.layers_path)
    recorded = layer_inputs(model, weights, batches, batch_size)
    for i, block in enumerate(tqdm(anatomy.layers, desc=desc, disable=not progress, unit="layer")):
        loaded = weights.load(f"{anatomy.layers_path}.{i}.", block)
        try:
            run_layer(block, i, recorded)
        finally:
            weights.unload(loaded)
    loaded = weights.read({name: required(weights, name) for name in outside_parameters(model, with_head=True)})
    try:
        for i, record in enumerate(recorded):
            with replayed_layers(anatomy, record["hidden"]), tied_head(model):
                yield model, i
    finally:
        weights.unload(loaded)
