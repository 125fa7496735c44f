"""Helpers shared by the benchmarks that run each path in its own subprocess (clean peak RSS per path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(script: str, path: str, *args: str) -> dict:
    """Run `script --child path *args` in a fresh interpreter; the JSON of its last output line + process_seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--child", path, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{path} path failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def cache_without_teacher_targets(prefix: str) -> str:
    """A fresh layerprune cache folder that links the converted models of the real one, so a child reuses the
    model but computes the teacher's targets anew."""
    import os
    import tempfile

    from layerprune.files.cache import cache_dir

    cache = tempfile.mkdtemp(prefix=prefix)
    for kept in ("models", "gguf"):
        if (cache_dir() / kept).is_dir():
            os.symlink(cache_dir() / kept, Path(cache) / kept)
    return cache


def cpu_kind() -> str:
    """The CPU a timing was measured on, as every published time names it."""
    import os

    from layerprune.hardware.compute import compute_choice, cpu_model_name, isa_names, cpu_flags, torch_cpu_capability

    choice = compute_choice("cpu")
    return (f"{cpu_model_name()}, {os.cpu_count()} cores, flags {'/'.join(isa_names(cpu_flags()))}, torch kernels "
            f"{torch_cpu_capability()}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}: auto -> "
            f"{choice.dtype} ({choice.reason})")


CHUNKED_ABOVE = 1.5e9  # bytes in bf16: larger tensors are drawn in blocks of rows (smaller ones as before)


def nbytes_of(shape: tuple[int, ...]) -> int:
    size = 2
    for n in shape:
        size *= n
    return size


def write_random_checkpoint(folder: Path, tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: float) -> None:
    """Random bf16 tensors (norm weights near 1, matrices at std 0.02) in safetensors shards of about
    `shard_bytes`, written one shard at a time, with the index; no model is instantiated."""
    import math

    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape in shard:
            if len(shape) == 1:
                data[name] = 1 + 0.02 * torch.randn(shape, generator=generator).to(torch.bfloat16)
            elif nbytes_of(shape) <= CHUNKED_ABOVE:
                data[name] = (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
            else:  # a 70B-shaped embedding (2.1 GB in bf16) drawn whole would pass through 8 GB of fp32
                data[name] = torch.empty(shape, dtype=torch.bfloat16)
                for start in range(0, shape[0], 8192):
                    rows = data[name][start:start + 8192]
                    rows.copy_(0.02 * torch.randn(rows.shape, generator=generator))
        save_file(data, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in shard})
        print(f"  wrote {file}", flush=True)
        del data
    total = sum(math.prod(s) * 2 for _, s in tensors)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
