"""A short README.md (model card) for a pruned or healed model folder, built from its layerprune record.

The record is what `layerprune.json` holds (or the `layerprune` entry of `config.json`, which has the
same core keys): `source`, `original_num_layers`, `kept_layers`, `dropped_layers`, optionally
`removed_sublayers` (attention-only / MLP-only removal), `history` (one entry per step: `{"dropped":
[...], "chosen_by": ..., ...}`, `{"removed_attention": [...], ...}` or `{"healed": method, "data": ...}`),
and what the stage that saved it added: `selection` (a run's choice, with every candidate's validation
loss under `select: auto`), `heal` (the last healing stage: method, steps, parameters, config, data),
`pruned_on_disk`, `versions`. Every key but the layer lists is optional; the card says only what the
record holds. Pure: no model, no file access.
"""

from __future__ import annotations

from typing import Iterable

from layerprune.models.provenance_labels import describe_quality_target, objective_label

_LOAD_STOCK = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

It is a stock transformers checkpoint with fewer layers (`num_hidden_layers` and the per-layer config
lists are cut to match); nothing from layerprune is needed to load or serve it."""

_LOAD_SUBLAYER = """```python
from layerprune import load_model

loaded = load_model("path/to/this/folder")  # loaded.model, loaded.tokenizer
```

**Only layerprune can load this folder.** Some layers have no attention or no MLP, which stock
transformers, vLLM and llama.cpp cannot describe, so the weights are stored in
`layerprune-weights.safetensors` and `config.json` names the architecture `LayerpruneSublayerModel`:
stock loaders fail on purpose rather than fill the missing modules with random weights."""


def format_layers(layers: Iterable[int]) -> str:
    """Sorted indices, runs of three or more folded: [12, 13, 14, 15, 16, 17, 25, 26] -> "12-17, 25, 26"."""
    values = sorted(set(int(i) for i in layers))
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for i in values[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        if prev - start >= 2:
            parts.append(f"{start}-{prev}")
        else:
            parts.extend(str(j) for j in range(start, prev + 1))
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def _count(n) -> str:
    """12_345_678 -> "12.35M"."""
    n = int(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _number(value) -> str:
    """1e-4 -> "1e-4", 1.0 -> "1", 64 -> "64"."""
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            mantissa, exponent = f"{value:.0e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:g}"
    return str(value)


def _chosen_by(entry: dict) -> str:
    """How one pruning step chose its layers, in words."""
    chosen = entry.get("chosen_by")
    if chosen is None:
        return "how they were chosen is not recorded"
    if chosen == "explicit":
        return "given explicitly (`--drop`)"
    if chosen == "search":
        return ("a greedy search over drop-sets that removes, one layer at a time, the layer whose removal "
                "raises the loss on held-out text least (`select: search`)")
    if isinstance(chosen, str) and chosen.startswith("auto:"):
        return (f"`{chosen[5:]}` scores, chosen by comparing candidate drop-sets on held-out text before "
                "healing (`select: auto`)")
    return f"the lowest `{chosen}` scores"


def _step_details(entry: dict) -> str:
    details = []
    if entry.get("num_layers") is not None:
        details.append(f"{entry['num_layers']} layers")
    if entry.get("block_size") is not None:
        details.append(f"contiguous block of {entry['block_size']}")
    for key in ("protect_first", "protect_last"):
        if entry.get(key):
            details.append(f"{key.replace('_', ' ')} {entry[key]}")
    target = describe_quality_target(entry)
    if target:
        details.append(f"quality target: {target}")
    if entry.get("validation_ppl_ratio") is not None:
        details.append(f"validation perplexity {entry['validation_ppl_ratio']:.2f}x the unpruned model's")
    calib = entry.get("calibration")
    if isinstance(calib, dict) and calib.get("source"):
        size = (f", {calib['n_samples']} x {calib['seq_len']} tokens"
                if calib.get("n_samples") and calib.get("seq_len") else "")
        details.append(f"calibration {calib['source']}{size}")
    return f"; {', '.join(details)}" if details else ""


def _history_lines(history: list[dict]) -> tuple[list[str], list[str]]:
    """(pruning steps, healing steps), one markdown bullet each, in the order they happened."""
    pruning, healing = [], []
    for step, entry in enumerate(history, 1):
        if not isinstance(entry, dict):
            continue
        if "dropped" in entry:
            pruning.append(f"- step {step}: removed layers {format_layers(entry['dropped'])}: "
                           f"{_chosen_by(entry)}{_step_details(entry)}")
        for kind, label in (("attention", "attention"), ("mlp", "MLP")):
            if f"removed_{kind}" in entry:
                pruning.append(f"- step {step}: removed the {label} of layers "
                               f"{format_layers(entry[f'removed_{kind}'])}: {_chosen_by(entry)}{_step_details(entry)}")
        if entry.get("dropped_experts"):
            per_layer = "; ".join(f"layer {layer}: {format_layers(experts)}"
                                  for layer, experts in entry["dropped_experts"].items())
            pruning.append(f"- step {step}: removed experts ({per_layer}): {_chosen_by(entry)}")
        if "healed" in entry:
            data = f" on {entry['data']}" if entry.get("data") else ""
            healing.append(f"- step {step}: healed with `{entry['healed']}`{data}")
    return pruning, healing


def _expert_lines(record: dict) -> list[str]:
    """The `## Experts` section of a mixture-of-experts model that lost experts (the record's `experts`)."""
    experts = record.get("experts") or {}
    dropped = {layer: v for layer, v in (experts.get("dropped") or {}).items() if v}
    if not dropped:
        return []
    kept = {len(v) for v in (experts.get("kept") or {}).values()}
    lines = ["", "## Experts", "", f"- original experts per MoE layer: {experts.get('original_num_experts')}"]
    if kept:
        lines.append(f"- experts per MoE layer now: {', '.join(map(str, sorted(kept)))} (the router's rows and the "
                     "config's expert count cut to match)")
    lines += [f"- removed from layer {layer} (original expert indices): {format_layers(v)}" for layer, v in dropped.items()]
    return lines


def _with_selection(entry, selection: dict):
    """A history step with the details of the run's selection record when that record describes it (the
    history keeps only what was dropped and by which metric; `selection` adds counts and calibration)."""
    if not isinstance(entry, dict) or not selection:
        return entry
    dropped = next((entry[k] for k in ("dropped", "removed_attention", "removed_mlp") if k in entry), None)
    if dropped is None or sorted(dropped) != sorted(selection.get("dropped") or []):
        return entry
    details = {k: v for k, v in selection.items() if k not in ("dropped", "candidates", "rounds")}
    return {**details, **entry}


def _candidates(selection: dict) -> list[str]:
    candidates = selection.get("candidates") or {}
    if not candidates:
        return []

    label = objective_label((selection.get("validation") or {}).get("objective"))
    lines = ["", "Candidate drop-sets compared on held-out text before healing (lower loss is better):", "",
             f"| metric | layers | {label} |", "|---|---|---|"]
    for name, c in sorted(candidates.items(), key=lambda kv: kv[1].get("validation_loss", float("inf"))):
        loss = c.get("validation_loss")
        lines.append(f"| {name} | {format_layers(c.get('dropped', []))} | "
                     f"{f'{loss:.4f}' if isinstance(loss, (int, float)) else '-'} |")
    return lines


def _heal_lines(heal: dict) -> list[str]:
    """Details of the last healing stage (the `heal` entry that `layerprune finetune` and runs record)."""
    config = heal.get("config") or {}
    data = heal.get("data") or {}
    parts = []
    if heal.get("method"):
        parts.append(f"method `{heal['method']}`")
    if config.get("preset"):
        parts.append(f"preset `{config['preset']}`")
    if config.get("method") == "lora" or heal.get("method") in ("lora", "qlora"):
        if config.get("lora_r"):
            parts.append(f"r={config['lora_r']}")
    for key, label in (("learning_rate", "lr"), ("epochs", "epochs"), ("effective_batch_size", "effective batch"),
                       ("max_length", "max length")):
        if config.get(key) is not None:
            parts.append(f"{label} {_number(config[key])}")
    if data.get("source"):
        amount = data.get("examples", data.get("blocks"))
        parts.append(f"data {data['source']}" + (f" ({amount} {'examples' if 'examples' in data else 'blocks'})"
                                                 if amount is not None else ""))
    if heal.get("steps") is not None:
        parts.append(f"{heal['steps']} steps")
    if heal.get("trainable_params") is not None:
        parts.append(f"{_count(heal['trainable_params'])} trainable parameters")
    if isinstance(heal.get("final_loss"), (int, float)):
        parts.append(f"final loss {heal['final_loss']:.3f}")
    return [f"- last healing stage: {', '.join(parts)}"] if parts else []


def model_card(record: dict, *, title: str | None = None, parameters: int | None = None,
               original_parameters: int | None = None) -> str:
    """README.md text for a model folder saved by layerprune, from its `layerprune.json` record.

    parameters / original_parameters: counts to report when the caller has them (the record itself holds
    only the healed model's total, under `heal.total_params`).
    """
    source = record.get("source")
    n_orig = record.get("original_num_layers")
    kept = list(record.get("kept_layers") or [])
    dropped = list(record.get("dropped_layers") or [])
    removed = {k: v for k, v in (record.get("removed_sublayers") or {}).items() if v}
    sublayer = bool(removed)
    heal = record.get("heal") or {}
    selection = record.get("selection") if isinstance(record.get("selection"), dict) else {}
    history = [_with_selection(entry, selection) for entry in record.get("history") or []]
    pruning, healing = _history_lines(history)
    healed = bool(healing or heal)

    what = "pruned and healed" if healed else "pruned"
    lines = [f"# {title or (f'{source}, {what}' if source else f'A {what} model')}", ""]
    summary = f"A {what} copy of `{source}`" if source else f"A {what} model"
    if dropped and n_orig:
        summary += f": {len(dropped)} of its {n_orig} decoder layers removed"
    if sublayer:
        summary += ("; " if dropped else ": ") + "; ".join(
            f"the {'attention' if k == 'attention' else 'MLP'} of layers {format_layers(v)} removed"
            for k, v in removed.items())
    if any((record.get("experts") or {}).get("dropped", {}).values()):
        summary += ("; " if dropped or sublayer else ": ") + "experts removed from its mixture-of-experts layers"
    lines += [summary + ". Made with layerprune.", ""]

    lines += ["## Layers", ""]
    if source:
        lines.append(f"- source model: `{source}`")
    if n_orig:
        lines.append(f"- original decoder layers: {n_orig} (indices below are 0-based indices of the original model)")
    lines.append(f"- removed layers: {format_layers(dropped)}")
    for kind, layers in removed.items():
        lines.append(f"- {'attention' if kind == 'attention' else 'MLP'} removed (the layer stays): "
                     f"{format_layers(layers)}")
    if kept:
        lines.append(f"- kept layers ({len(kept)}): {format_layers(kept)}")
    disk = record.get("pruned_on_disk")
    if isinstance(disk, dict):
        lines.append("- pruned on disk (tensors copied shard to shard, the model never loaded)")

    lines += _expert_lines(record)

    lines += ["", "## How the layers were chosen", ""]
    lines += pruning or ["- not recorded"]
    if selection.get("schedule"):
        lines.append(f"- iterative schedule {selection['schedule']} (score, drop, heal; repeated)")
    lines += _candidates(selection)

    if healed:
        lines += ["", "## Healing", ""]
        lines += healing + _heal_lines(heal)

    total = parameters if parameters is not None else heal.get("total_params")
    if total is not None or original_parameters is not None:
        lines += ["", "## Parameters", ""]
        if original_parameters is not None:
            lines.append(f"- original: {_count(original_parameters)}")
        if total is not None:
            share = f" ({total / original_parameters:.0%} of the original)" if original_parameters else ""
            lines.append(f"- this model: {_count(total)}{share}")

    lines += ["", "## How to load", "", _LOAD_SUBLAYER if sublayer else _LOAD_STOCK]

    versions = record.get("versions") or {}
    if versions:
        lines += ["", "## Made with", "", "| package | version |", "|---|---|"]
        lines += [f"| {name} | {v} |" for name, v in versions.items()]
    lines += ["", "The full record is `layerprune.json` in this folder.", ""]
    return "\n".join(lines)
