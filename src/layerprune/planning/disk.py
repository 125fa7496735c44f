"""The disk a job writes, stage by stage, against the free space where it writes it (`layerprune plan`).

Each writing stage is counted from the model's shape: the pruned checkpoint in the stored dtype; the healed one
in the dtype its weights end in (a LoRA adapter merged into a 16-bit base: 16-bit; every weight trained: the
fp32 master weights, as `save_pretrained` writes them; layer by layer: the stored dtype, only the changed tensors
rewritten); a GGUF file at its quantization's bits per weight, beside its f16 staging copy while llama.cpp's
quantizer runs; and the teacher's cached targets (top-k values and ids of every labelled position, with the
hidden states at one cut) and the Trainer's checkpoints in the cache or work folders. The outputs are checked
against the free space of the output's disk, the caches against the cache's (the sum, where both are one disk).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from layerprune.files.cache import cache_dir
from layerprune.files.user_files import existing_parent, free_bytes
from layerprune.finetune.config import HealConfig
from layerprune.finetune.memory import lora_params
from layerprune.finetune.teacher_first import distills_from_cache
from layerprune.hardware.devices import GiB
from layerprune.models.shape import ModelShape

# Bits per weight of a whole GGUF file per quantization, as llama.cpp's quantizer reports them for a 7B Llama
# (the k-quant mixes keep some tensors in wider types). Names as export/gguf.py's QUANTS (not imported: export
# sits above planning).
GGUF_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.69, "q5_k_s": 5.54,
             "q5_1": 6.0, "q5_0": 5.5, "q4_k_m": 4.89, "q4_k_s": 4.58, "q4_1": 5.0, "q4_0": 4.55, "q3_k_m": 3.91,
             "q2_k": 3.35}
GGUF_STAGED = ("f32", "f16", "bf16", "q8_0")  # written by the converter itself; the others from an f16 copy


def healed_value_bytes(shape: ModelShape, heal_option: str, frozen_bytes: int, train_bytes: int) -> float:
    """Bytes per weight of the healed checkpoint: a merged LoRA keeps its base's dtype, layer-local healing the
    stored one, every weight trained (and QLoRA, merged into the full-precision model) the master weights'."""
    if heal_option == "layer-local":
        return shape.stored_bytes
    return frozen_bytes if heal_option == "lora" else train_bytes


def cache_rows(shape: ModelShape, heal: HealConfig, heal_option: str, trained_params: int) -> list[dict]:
    """What healing writes besides its output: the teacher's cached targets, the Trainer's checkpoints."""
    rows = []
    if heal_option != "layer-local" and distills_from_cache(heal) and heal.max_steps > 0:
        positions = heal.max_steps * (heal.effective_batch_size or heal.batch_size) * heal.max_length
        states = positions * shape.hidden * 2 if heal.hidden_weight else 0  # bf16, one cut
        rows.append({"what": "teacher targets (cache)", "bytes": positions * heal.distill_top_k * 8 + states,
                     "where": "cache"})
    if heal.save_steps and heal.max_steps > 0:  # every one is kept until the heal ends
        saved = math.ceil(heal.max_steps / heal.save_steps)
        each = trained_params * 12  # the trained weights (peft: the adapter alone) + AdamW's two fp32 moments
        rows.append({"what": f"{saved} Trainer checkpoints (work folder)", "bytes": saved * each, "where": "out"})
    return rows


def plan_disk(shape: ModelShape, layers_kept: int, heal: HealConfig | None, heal_option: str, *,
              frozen_bytes: int, train_bytes: int = 4, gguf: str | None = None, out: str | os.PathLike = ".",
              lora_r: int = 8) -> dict:
    """{rows, bytes, disks: [{where, needs, free, fits}], fits}: what each writing stage writes and whether the
    disks hold it (free None: unknown, taken as fitting)."""
    kept = shape.params(layers_kept)
    rows = [{"what": "pruned checkpoint", "bytes": round(kept * shape.stored_bytes), "where": "out"}]
    if heal is not None:
        rows.append({"what": f"healed checkpoint ({heal_option})", "where": "out",
                     "bytes": round(kept * healed_value_bytes(shape, heal_option, frozen_bytes, train_bytes))})
        trained = lora_params(shape, layers_kept, lora_r) if heal_option in ("lora", "qlora") else kept
        rows += cache_rows(shape, heal, heal_option, trained)
    if gguf is not None:
        rows.append({"what": f"GGUF file ({gguf})", "bytes": round(kept * GGUF_BITS[gguf] / 8), "where": "out"})
        if gguf not in GGUF_STAGED:
            rows.append({"what": "its f16 copy while quantizing", "bytes": kept * 2, "where": "out"})
    places = {"out": Path(out), "cache": cache_dir()}
    disks = {}
    for row in rows:
        path = places[row["where"]]
        disk = _device_of(path)
        entry = disks.setdefault(disk, {"where": str(existing_parent(path)), "needs": 0, "free": free_bytes(path)})
        entry["needs"] += row["bytes"]
    for entry in disks.values():
        entry["fits"] = entry["free"] is None or entry["needs"] <= entry["free"]
    return {"rows": rows, "bytes": sum(row["bytes"] for row in rows), "disks": list(disks.values()),
            "fits": all(entry["fits"] for entry in disks.values())}


def _device_of(path: Path):
    try:
        return os.stat(existing_parent(path)).st_dev
    except OSError:
        return str(path)


def disk_lines(disk: dict) -> list[str]:
    """The disk plan in a few lines: what each stage writes, then each disk's total against its free space."""
    lines = ["disk, what each stage writes:"] + [f"  {row['what']}: {row['bytes'] / GiB:.1f} GiB" for row in disk["rows"]]
    for entry in disk["disks"]:
        free = "free space unknown" if entry["free"] is None else f"{entry['free'] / GiB:.1f} GiB free"
        verdict = "fits" if entry["fits"] else "DOES NOT FIT"
        lines.append(f"  in all {entry['needs'] / GiB:.1f} GiB at {entry['where']} ({free}): {verdict}")
    return lines
