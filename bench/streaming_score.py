"""Benchmark: block-influence streamed one layer at a time (`stream_scores`) vs on the loaded model.

Uses the synthetic random bf16 Llama checkpoint of bench/checkpoint_prune.py (built once, cached
in --workdir). Each path runs in its own subprocess so its peak RSS (VmHWM) is clean. Prints
time and peak RSS of both, and the targets it is held to:

- peak RSS of the streaming path <= 25% of the model's size on disk
- identical scores (largest relative difference; rtol 1e-5)

Calibration: --n-samples x --seq-len random token ids (the synthetic model has no tokenizer;
CPU time grows with the tokens, memory hardly).

    python bench/streaming_score.py [--size-gb 3] [--shard-mb 500] [--n-samples 4] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from _common import peak_rss_mb, rss_mb, run_child  # noqa: E402
from checkpoint_prune import build_checkpoint  # noqa: E402

METRIC = "block-influence"


def child(path: str, src: str, n_samples: int, seq_len: int) -> None:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports before the clock, for both)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401
    from transformers.utils import logging as hf_logging

    from layerprune.data.calibration import CalibrationData
    from layerprune.importance import compute_many
    from layerprune.importance.streaming import stream_scores
    from layerprune.models.loading import load_model

    hf_logging.disable_progress_bar()
    vocab = json.loads((Path(src) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (n_samples, seq_len), generator=torch.Generator().manual_seed(0))
    calibration = CalibrationData(ids, torch.ones_like(ids), {"source": "random ids"})
    base = rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    if path == "stream":
        scores = stream_scores(src, calibration, [METRIC])
    else:
        scores = compute_many(load_model(src, load_tokenizer=False).model, {METRIC: {}}, calibration)
    print(json.dumps({
        "path": path, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
        "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base, "values": scores[METRIC].values,
    }))


def run_path(path: str, src: Path, n_samples: int, seq_len: int) -> dict:
    return run_child(__file__, path, str(src), str(n_samples), str(seq_len))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--shard-mb", type=float, default=500.0)
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--workdir", default="/tmp/layerprune-bench")
    parser.add_argument("--child", nargs=4, metavar=("PATH", "SRC", "N", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, src, n, length = args.child
        child(path, src, int(n), int(length))
        return

    work = Path(args.workdir)
    src = build_checkpoint(work / f"llama-{args.size_gb:g}gb-{args.shard_mb:g}mb", args.size_gb, args.shard_mb)
    files = sorted(src.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in files)
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    print(f"checkpoint: {src}: {n_layers} layers, {total / 1e9:.2f} GB bf16 in {len(files)} shards; "
          f"{METRIC} on {args.n_samples} x {args.seq_len} random tokens")
    stream = run_path("stream", src, args.n_samples, args.seq_len)
    memory = run_path("memory", src, args.n_samples, args.seq_len)
    for r in (stream, memory):
        label = "streamed (stream_scores)" if r["path"] == "stream" else "loaded (compute_many)"
        print(f"  {label:26s} {r['seconds']:6.1f} s wall, {r['cpu_seconds']:6.1f} s CPU   "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB (after imports {r['base_rss_mb']:.0f} MB)")
    share = stream["peak_rss_mb"] * 2**20 / total
    print(f"streaming peak RSS / model size:  {share:.3f}   target <= 0.25   {'OK' if share <= 0.25 else 'MISSED'}"
          f"   (above the interpreter's own: {(stream['peak_rss_mb'] - stream['base_rss_mb']) * 2**20 / total:.3f})")
    print(f"peak RSS, streamed / loaded:      {stream['peak_rss_mb'] / memory['peak_rss_mb']:.3f}")
    diffs = [abs(a - b) / abs(b) for a, b in zip(stream["values"], memory["values"])]
    verdict = "OK" if max(diffs) <= 1e-5 else "MISSED"
    print(f"largest relative score difference: {max(diffs):.2e}   (rtol 1e-5: {verdict}); "
          f"identical: {stream['values'] == memory['values']}")


if __name__ == "__main__":
    main()
