"""Rehearsal at the papers' scale on a small machine: a Llama-3.1-8B-shaped checkpoint end to end, layer by layer,
or one with Llama-3-70B's layer shapes.

Builds once (cached in --workdir) a checkpoint with Llama-3.1-8B's shapes (32 layers, hidden 4096, MLP
14336, 8 KV heads, vocab 128256; random bf16 weights, ~16 GB in shards of ~2 GB) and a byte-level
tokenizer, then runs, each stage in its own process so its peak RSS (VmHWM) is clean:

1. `layerprune plan` (config only): the predicted peak of every stage below;
2. `layerprune score --streaming` (block influence, one layer in memory at a time);
3. `layerprune prune --no-load --drop ...` (the 8 layers the scores chose, cut on disk);
4. `layerprune finetune --method replace --streaming` (least-squares healing of each cut, one layer at a time);
5. `layerprune eval --tasks none --streaming` (WikiText-2 perplexity, one layer at a time).

Targets: every stage <= 6 GB of RSS on a 24 GB machine, and the plan within 25% of each measured peak.
The weights are random, so the perplexity only shows that the pipeline ran; the times name the CPU.

`--shape llama-3-70b --layers K`: Llama-3-70B's exact layer shapes (hidden 8192, MLP 28672, 64 heads, 8 KV
heads), vocabulary and embeddings, but only K decoder layers (a layer is 1.7 GB in bf16; K=3 is 9.4 GB on
disk). Per-layer peaks do not depend on how many layers follow. The last layer is dropped (`--layers` set:
one cut, healed into layer K-2) instead of the scores' choice, so the fold is always measured. Target:
every stage within 20 GB of RSS.

    python bench/scale_rehearsal.py [--workdir /tmp/layerprune-8b] [--rows 8] [--windows 8] [--seq-len 128]
    python bench/scale_rehearsal.py --shape llama-3-70b --layers 3 [--workdir /tmp/layerprune-70b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import cpu_kind, write_random_checkpoint  # noqa: E402  (bench/ is on sys.path when run as a script)

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                        rope_theta=500000.0, tie_word_embeddings=False),
}
SHAPE = SHAPES["llama-3.1-8b"]
SHARD_BYTES = 2e9
GiB = 2**30


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE (256 byte tokens + specials): any text encodes, ids stay far below the vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(["<|begin_of_text|>", "<|end_of_text|>", *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(folder)


def build_checkpoint(folder: Path, shape: dict = SHAPE) -> Path:
    """The shaped checkpoint, tensor by tensor (no model is instantiated); cached by a stamp file."""
    from transformers import LlamaConfig

    stamp = {**shape, "v": 2}
    if (folder / "bench-stamp.json").is_file() and json.loads((folder / "bench-stamp.json").read_text()) == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    LlamaConfig(**shape, dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    build_tokenizer(folder)
    h, i, kv, v = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"] * 128, \
        shape["vocab_size"]
    tensors = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    write_random_checkpoint(folder, tensors, SHARD_BYTES)
    (folder / "bench-stamp.json").write_text(json.dumps(stamp))
    return folder


def run_stage(command: list[str]) -> dict:
    """Wall time and peak RSS (ru_maxrss of the finished child) of one command."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "layerprune", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"layerprune {' '.join(command)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB; the largest child so far
    if peak <= before:
        raise SystemExit("run the stages from the smallest to the largest peak, or one per process")
    return {"seconds": seconds, "peak_gib": peak * 1024 / GiB, "output": proc.stdout + proc.stderr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="default /tmp/layerprune-8b or /tmp/layerprune-70b")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the checkpoint (default: the "
                        "shape's own count); set: the last one is dropped")
    parser.add_argument("--rows", type=int, default=8, help="calibration and healing rows")
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--report", action="store_true", help="only print the table of the last measurement "
                        "against a fresh plan")
    args = parser.parse_args()
    big = args.shape == "llama-3-70b"
    work = Path(args.workdir or ("/tmp/layerprune-70b" if big else "/tmp/layerprune-8b"))
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    model = work / ("llama-70b-shaped" if big else "llama-8b-shaped")
    n, seq = str(args.rows), str(args.seq_len)
    drop = [args.layers - 1] if args.layers else None
    if not args.report:
        build_checkpoint(model, shape)
        measure(work, model, n, seq, args.windows, drop)
    record = json.loads((work / "measured.json").read_text())
    plan = json.loads(subprocess.run(
        [sys.executable, "-m", "layerprune", "plan", str(model), "--num-layers", str(len(record["dropped"])),
         "--method", "replace", "--n-samples", n, "--seq-len", seq,
         "--max-length", seq, "--max-samples", n, "--ppl-windows", str(args.windows), "--json"],
        capture_output=True, text=True, check=True).stdout)
    predicted = {row["stage"]: row["peak_gib"] for row in plan["stages"]}
    print(f"\nCPU: {record['cpu']}")
    print(f"{args.shape}-shaped checkpoint, {shape['num_hidden_layers']} layers ({plan['params'] / 1e9:.2f}B params, "
          f"bf16, random weights); dropped "
          f"{record['dropped']}; {args.rows} rows / {args.windows} windows of {args.seq_len} tokens; perplexity "
          f"{record['perplexity']:.4g}")
    print("| stage | wall | peak RSS | plan | plan / measured |")
    print("|---|---|---|---|---|")
    for name, result in record["stages"].items():
        estimate = predicted.get(name, predicted.get(name.replace(" (streaming)", "")))  # layer-local heal: "heal"
        ratio = f"{estimate / result['peak_gib']:.2f}" if estimate else "-"
        print(f"| {name} | {result['seconds'] / 60:.1f} min | {result['peak_gib']:.2f} GiB | "
              f"{estimate if estimate is not None else '-'} GiB | {ratio} |")


def measure(work: Path, model: Path, n: str, seq: str, windows: int, drop: list[int] | None = None) -> None:
    for name in ("scores", "pruned", "healed", "eval"):
        shutil.rmtree(work / name, ignore_errors=True)
    stages = {}
    stages["score (streaming)"] = run_one(["score", str(model), "--streaming", "--metric", "block-influence",
                                           "--n-samples", n, "--seq-len", seq, "--out", str(work / "scores")])
    drop = drop if drop is not None else _chosen(work / "scores")
    stages["prune (on disk)"] = run_one(["prune", str(model), "--no-load", "--drop", ",".join(map(str, drop)),
                                         "--out", str(work / "pruned")])
    stages["heal (streaming)"] = run_one(["finetune", str(work / "pruned"), "--method", "replace", "--streaming",
                                          "--teacher", str(model), "--data", "c4", "--max-samples", n,
                                          "--max-length", seq, "--out", str(work / "healed")])
    stages["eval (streaming)"] = run_one(["eval", str(work / "healed"), "--tasks", "none", "--ppl", "wikitext2",
                                          "--streaming", "--ppl-windows", str(windows), "--seq-len", seq,
                                          "--no-samples", "--out", str(work / "eval")])
    ppl = json.loads((work / "eval" / "eval.json").read_text())["perplexity"]["wikitext2"]["ppl"]
    (work / "measured.json").write_text(json.dumps({"cpu": cpu_kind(), "dropped": drop, "perplexity": ppl,
                                                    "stages": stages}, indent=2))


def run_one(command: list[str]) -> dict:
    """One stage in a fresh driver process (ru_maxrss of children only grows, so each stage gets its own)."""
    proc = subprocess.run([sys.executable, __file__, "--stage", json.dumps(command)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage {command[0]} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{command[0]}: {result['seconds'] / 60:.1f} min, peak {result['peak_gib']:.2f} GiB", flush=True)
    return result


def _chosen(scores_dir: Path) -> list[int]:
    """The 8 layers block influence chose (selections in scores.json)."""
    record = json.loads((scores_dir / "scores.json").read_text())
    chosen = record["selections"]["block-influence"]
    return sorted(chosen["dropped"] if isinstance(chosen, dict) else chosen)


if __name__ == "__main__":
    if "--stage" in sys.argv:
        command = json.loads(sys.argv[sys.argv.index("--stage") + 1])
        result = run_stage(command)
        print(json.dumps({"seconds": result["seconds"], "peak_gib": result["peak_gib"]}))
    else:
        main()
