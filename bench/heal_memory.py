"""Peak memory and step time of healing through layerprune's own path (heal(): Trainer, chunked head and
loss, cached teacher), each configuration in a fresh process, on SmolLM2 minus 8 layers.

    flock /tmp/layerprune-heavy.lock .venv/bin/python bench/heal_memory.py [--steps 3]

Configurations: the default healing (distill, 4 x 256 tokens per step); LoRA on Dolly at
8 x 1024 tokens per micro-batch (the settings that held ~15 GB when every position's full-vocabulary
logits were materialised); and distillation a second time on the same rows, where the teacher's targets
come from the disk cache (target: < 10% of the run's time on the teacher). Peak RSS increase is the
process's high-water mark minus its resident memory once the models are loaded (target <= 3 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cache_without_teacher_targets, peak_rss_mb, rss_mb, run_child  # noqa: E402

DROP = [12, 13, 14, 15, 16, 17, 25, 26]
CONFIGS = {
    "default (distill)": {},
    "lora dolly 8 x 1024": {"method": "lora", "init": "none", "data": "dolly", "batch_size": 8, "max_length": 1024},
    "  + gradient checkpointing": {"method": "lora", "init": "none", "data": "dolly", "batch_size": 8,
                                   "max_length": 1024, "gradient_checkpointing": True},
    "distill again (cached teacher)": {},
}


def child(name: str, steps: int, cache: str) -> None:
    import copy

    from layerprune.finetune.stage import prepare_training_rows
    from layerprune.finetune import HealConfig, heal
    from layerprune.models.loading import load_model
    from layerprune.models.surgery import remove_layers

    os.environ["LAYERPRUNE_CACHE"] = cache
    teacher = load_model("smollm2-135m", dtype="fp32")
    student = copy.deepcopy(teacher.model)
    remove_layers(student, DROP)
    config = HealConfig(**{**CONFIGS[name], "max_steps": steps, "warmup_steps": 0})
    rows, _ = prepare_training_rows(config, teacher.tokenizer)
    before = rss_mb()
    with tempfile.TemporaryDirectory() as work:
        result = heal(student, rows, config, tokenizer=teacher.tokenizer, teacher=teacher.model, work_dir=work)
    teacher_s = result.notes.get("teacher_targets", {}).get("seconds", 0.0)
    print(json.dumps({"peak_increase_mb": peak_rss_mb() - before, "s_per_step": result.seconds / result.steps,
                      "train_s": result.seconds, "teacher_s": teacher_s,
                      "teacher_cached": result.notes.get("teacher_targets", {}).get("from_cache")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", default=None)
    parser.add_argument("--cache", default=None)
    args, rest = parser.parse_known_args()
    if args.child:
        child(args.child, args.steps, args.cache)
        return
    cache = cache_without_teacher_targets("heal-memory-cache-")  # the first distillation runs the teacher
    print(f"{'configuration':34} {'peak RSS increase':>18} {'s/step':>7} {'teacher s':>10} {'teacher share':>14}")
    for name in CONFIGS:
        r = run_child(__file__, name, "--steps", str(args.steps), "--cache", cache)
        share = r["teacher_s"] / (r["teacher_s"] + r["train_s"])
        print(f"{name:34} {r['peak_increase_mb'] / 1024:>15.2f} GB {r['s_per_step']:>7.2f} {r['teacher_s']:>10.1f} "
              f"{share:>13.0%}{' (cached)' if r['teacher_cached'] else ''}")


if __name__ == "__main__":
    main()
