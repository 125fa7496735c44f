"""Which compute dtype healing should use on this CPU: a 4-step default heal (distillation, teacher pass
included) of SmolLM2 minus 8 layers with `bf16: auto`, `bf16: true` and `bf16: false`, each in a fresh
process with an empty teacher cache, side by side in one run.

    flock /tmp/layerprune-heavy.lock .venv/bin/python bench/dtype_choice.py [--steps 4]
    # an AVX2-only CPU, emulated on a CPU with AVX512-BF16 (the script checks that it took effect):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/dtype_choice.py

Prints each setting's wall time of heal() and the ratio of auto to the faster of the two fixed settings
(target <= 1.1): auto must never pick the emulated dtype. `--repeat 2` runs each setting twice, in turn, and
keeps the faster run (a 4-step heal varies by ~10% between processes on 2 cores); `--settings auto,fp32`
leaves out the emulated bf16 run (about 11 minutes under the AVX2 emulation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cache_without_teacher_targets, cpu_kind, run_child  # noqa: E402

DROP = [12, 13, 14, 15, 16, 17, 25, 26]
SETTINGS = {"auto": "auto", "bf16": True, "fp32": False}


def child(name: str, steps: int, cache: str) -> None:
    import copy

    import torch

    from layerprune.finetune.stage import prepare_training_rows
    from layerprune.finetune import HealConfig, heal
    from layerprune.models.loading import load_model
    from layerprune.models.surgery import remove_layers

    torch.set_num_threads(2)
    os.environ["LAYERPRUNE_CACHE"] = cache
    teacher = load_model("smollm2-135m", dtype="fp32")
    student = copy.deepcopy(teacher.model)
    remove_layers(student, DROP)
    config = HealConfig(max_steps=steps, warmup_steps=0, bf16=SETTINGS[name])
    rows, _ = prepare_training_rows(config, teacher.tokenizer)
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        result = heal(student, rows, config, tokenizer=teacher.tokenizer, teacher=teacher.model, work_dir=work,
                      log=lambda line: None)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "compute": result.notes["compute"], "estimate": result.notes["estimate"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--settings", default="auto,bf16,fp32", help="which of auto,bf16,fp32 to run")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting, in turn; the fastest counts")
    parser.add_argument("--child", default=None)
    parser.add_argument("--cache", default=None)
    args, _ = parser.parse_known_args()
    if args.child:
        child(args.child, args.steps, args.cache)
        return
    from layerprune.hardware.compute import bf16_matmul_ratio

    print(cpu_kind())
    print(f"bf16 / fp32 time of a 64x256 @ 256x512 matmul here: {bf16_matmul_ratio():.2f}")
    times: dict[str, float] = {}
    for _ in range(args.repeat):
        for name in args.settings.split(","):
            cache = cache_without_teacher_targets("dtype-choice-")  # every setting runs the teacher
            r = run_child(__file__, name, "--steps", str(args.steps), "--cache", cache)
            shutil.rmtree(cache, ignore_errors=True)
            times[name] = min(times.get(name, float("inf")), r["seconds"])
            print(f"bf16={name:5} computed in {r['compute']['dtype']:5} {r['seconds']:7.1f} s "
                  f"(estimated {r['estimate']['seconds']:.1f} s before it started)", flush=True)
    fixed = [times[name] for name in ("bf16", "fp32") if name in times]
    if "auto" in times and fixed:
        print(f"auto / faster of {' and '.join(n for n in ('bf16', 'fp32') if n in times)}: "
              f"{times['auto'] / min(fixed):.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
