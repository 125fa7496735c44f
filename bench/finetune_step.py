"""Step time and peak memory of healing methods on SmolLM2 pruned by 8 layers, measured side by side.

    .venv/bin/python bench/finetune_step.py [--steps 3] [--batch 4] [--seq-len 256]

Same batch (random Dolly-like token ids, every token labelled), bf16 autocast, AdamW. Methods run
round-robin (A B C A B C ...) so machine drift hits them alike. Prints partial/LoRA (target <= 0.5).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from layerprune.benchmark.memory import measure_memory
from layerprune.finetune import HealConfig
from layerprune.finetune.methods import HealContext, get_method, trainable_parameters
from layerprune.models.loading import load_model
from layerprune.models.surgery import remove_layers

DROP = [12, 13, 14, 15, 16, 17, 25, 26]  # block influence's choice on SmolLM2 (docs/results.md)


def make_step(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)  # what heal() uses (adamw_torch_fused)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--methods", default="partial,lora,qlora")
    args = parser.parse_args()

    base = load_model("smollm2-135m", dtype="fp32", load_tokenizer=False).model
    remove_layers(base, DROP)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    steps, trainable = {}, {}
    for name in args.methods.split(","):
        config = HealConfig(method=name, bf16=True)
        model = get_method(name).prepare(copy.deepcopy(base), config, HealContext())
        model.train()
        trainable[name] = trainable_parameters(model)[0]
        steps[name] = make_step(model, batch)
        steps[name]()  # warm-up: optimizer state, kernels

    times = {name: [] for name in steps}
    peaks = {}
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    for name, step in steps.items():
        peaks[name] = measure_memory(base, step)["peak_increase_bytes"]

    print(f"SmolLM2-135M minus layers {DROP}: batch {args.batch} x {args.seq_len} tokens, bf16 autocast, "
          f"{args.steps} measured steps each, round-robin, {torch.get_num_threads()} threads")
    print(f"{'method':10} {'trainable':>12} {'s/step (mean ± sd)':>20} {'peak RSS increase':>18}")
    for name in steps:
        mean = statistics.mean(times[name])
        sd = statistics.stdev(times[name]) if len(times[name]) > 1 else 0.0
        peak = f"{peaks[name] / 2**20:.0f} MiB" if peaks[name] is not None else "n/a"
        print(f"{name:10} {trainable[name]:>12,} {mean:>12.2f} ± {sd:<5.2f} {peak:>18}")
    if "partial" in times and "lora" in times:
        ratio = statistics.mean(times["partial"]) / statistics.mean(times["lora"])
        print(f"partial/LoRA step time: {ratio:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
