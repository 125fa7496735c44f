"""Benchmark: pruning a checkpoint on disk (`prune_checkpoint`) vs load + remove_layers + save.

Builds (once, cached in --workdir) a synthetic random Llama checkpoint written tensor by tensor
with safetensors (no model is instantiated): bf16, about --size-gb in shards of about --shard-mb.
Then prunes 25% of its layers both ways, each path in its own subprocess so that its peak RSS
(VmHWM) is clean, and prints times, peak RSS, and the targets it is held to:

- time(on disk) / time(load + prune + save) <= 0.1
- peak RSS of the on-disk path <= 1.5 x the largest shard

The source files are read once beforehand so both paths start with them in the page cache, and
each subprocess imports torch/transformers before its clock starts (imports cost the same whatever
the model's size; the process time including them is printed too).
The two outputs are checked to hold identical tensors.

    python bench/checkpoint_prune.py [--size-gb 3] [--shard-mb 500] [--workdir /tmp/layerprune-bench]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import peak_rss_mb, rss_mb, run_child, write_random_checkpoint  # noqa: E402  (bench/ is on sys.path when run as a script)

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 8192, 16, 16, 32000


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    head_dim = HIDDEN // HEADS
    return {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
        p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }


def checkpoint_layout(size_gb: float) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """(number of layers, every tensor name and shape in storage order) for about size_gb of bf16."""
    per_layer = sum(math.prod(s) for s in layer_shapes(0).values()) * 2
    outside = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    n_layers = max(4, round((size_gb * 1e9 - outside) / per_layer))
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        tensors += list(layer_shapes(i).items())
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return n_layers, tensors


def build_checkpoint(folder: Path, size_gb: float, shard_mb: float) -> Path:
    """A random Llama checkpoint written shard by shard (cached: rebuilt only when the settings change)."""
    from transformers import LlamaConfig

    stamp = {"size_gb": size_gb, "shard_mb": shard_mb, "hidden": HIDDEN, "intermediate": INTERMEDIATE, "v": 1}
    stamp_file = folder / "bench-stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    n_layers, tensors = checkpoint_layout(size_gb)
    LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        num_hidden_layers=n_layers, vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
        dtype="bfloat16", architectures=["LlamaForCausalLM"],
    ).save_pretrained(folder)
    write_random_checkpoint(folder, tensors, shard_mb * 1e6)
    stamp_file.write_text(json.dumps(stamp))
    return folder


def child(path: str, src: str, out: str, drop: list[int]) -> None:
    """One path in a fresh process; prints a JSON line with its time and memory."""
    # Each path imports what it needs before the clock starts: imports cost the same whatever the model's size.
    import torch  # noqa: F401
    import transformers.models.llama.configuration_llama  # noqa: F401
    from transformers import AutoConfig  # noqa: F401
    from transformers.utils import logging as hf_logging

    if path == "memory":
        import transformers.models.llama.modeling_llama  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

    from layerprune.models.checkpoint import prune_checkpoint
    from layerprune.models.loading import load_model
    from layerprune.models.saving import save_model
    from layerprune.models.surgery import remove_layers

    hf_logging.disable_progress_bar()
    shard_bytes = max(p.stat().st_size for p in Path(src).glob("*.safetensors"))
    base_rss = rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    if path == "disk":
        prune_checkpoint(src, drop, out, max_shard_size=shard_bytes)
    else:
        loaded = load_model(src, load_tokenizer=False)
        remove_layers(loaded.model, drop, how={"chosen_by": "explicit"})
        save_model(loaded.model, None, out)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"path": path, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(),
                      "base_rss_mb": base_rss}))


def run_path(path: str, src: Path, out: Path, drop: list[int]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # no write-back of an earlier run's files lands on this run's clock
    return run_child(__file__, path, str(src), str(out), ",".join(map(str, drop)))


def warm_page_cache(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def same_tensors(a: Path, b: Path) -> bool:
    """Compare the two outputs tensor by tensor (one tensor pair in memory at a time)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                found.update({name: path for name in f.keys()})
        return found

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for name in ia:
        with safe_open(ia[name], "pt") as fa, safe_open(ib[name], "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--shard-mb", type=float, default=500.0)
    parser.add_argument("--workdir", default="/tmp/layerprune-bench")
    parser.add_argument("--repeat", type=int, default=2, help="Runs of each path (the fastest is kept).")
    parser.add_argument("--keep", action="store_true", help="Keep the pruned outputs.")
    parser.add_argument("--child", nargs=4, metavar=("PATH", "SRC", "OUT", "DROP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, src, out, drop = args.child
        child(path, src, out, [int(i) for i in drop.split(",")])
        return

    work = Path(args.workdir)
    start = time.perf_counter()
    src = build_checkpoint(work / f"llama-{args.size_gb:g}gb-{args.shard_mb:g}mb", args.size_gb, args.shard_mb)
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    files = sorted(src.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in files)
    largest = max(p.stat().st_size for p in files)
    drop = list(range(n_layers - n_layers // 4, n_layers))  # the last 25%, as in arXiv 2411.15558
    print(f"checkpoint: {src} ({time.perf_counter() - start:.0f} s to build or find)")
    print(f"  {n_layers} layers, {total / 1e9:.2f} GB bf16 in {len(files)} shards (largest {largest / 1e6:.0f} MB); "
          f"dropping {len(drop)} layers: {drop[0]}-{drop[-1]}")
    warm_page_cache(src)
    runs = {"disk": [], "memory": []}
    for _ in range(args.repeat):  # alternate, keep each path's fastest run
        for path in runs:
            runs[path].append(run_path(path, src, work / f"out-{path}", drop))
    disk, memory = (min(runs[path], key=lambda r: r["seconds"]) for path in ("disk", "memory"))
    identical = same_tensors(work / "out-disk", work / "out-memory")
    for r in (disk, memory):
        label = "on disk (prune_checkpoint)" if r["path"] == "disk" else "load + remove_layers + save"
        print(f"  {label:30s} {r['seconds']:6.2f} s wall, {r['cpu_seconds']:6.2f} s CPU "
              f"(whole process {r['process_seconds']:5.1f} s)   "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB (after imports {r['base_rss_mb']:.0f} MB)")
    ratio = disk["seconds"] / memory["seconds"]
    rss_ratio = disk["peak_rss_mb"] * 2**20 / largest
    print(f"time ratio (disk / memory):            {ratio:.3f}   target <= 0.1   {'OK' if ratio <= 0.1 else 'MISSED'}"
          f"   (CPU time ratio {disk['cpu_seconds'] / memory['cpu_seconds']:.3f})")
    verdict = "OK" if rss_ratio <= 1.5 else "MISSED"
    print(f"peak RSS of disk path / largest shard: {rss_ratio:.2f}    target <= 1.5   {verdict}"
          f"   (above the interpreter's own {disk['base_rss_mb']:.0f} MB: "
          f"{(disk['peak_rss_mb'] - disk['base_rss_mb']) * 2**20 / largest:.2f})")
    print(f"peak RSS, disk / memory:               {disk['peak_rss_mb'] / memory['peak_rss_mb']:.3f}")
    print(f"identical tensors in both outputs:     {identical}")
    if not args.keep:
        for name in ("out-disk", "out-memory"):
            shutil.rmtree(work / name, ignore_errors=True)


if __name__ == "__main__":
    main()
