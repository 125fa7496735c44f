"""Benchmark: fast (cached block inputs) vs naive perplexity scoring on the embedded SmolLM2-135M.

Both methods run in the same process on the same calibration data. Prints the wall time
of each, their ratio (target <= 0.55), the block-forward counts, the largest relative
difference between the two score lists, and the ranking (least to most important).

It also times one intact forward and one forward with every block skipped (embeddings +
head only) to show how much of a candidate run is the head, which no method can avoid:
with head cost h (in block units) the expected ratio is
(n + n(n-1)/2 + (n+1)h) / (n + n(n-1) + (n+1)h).

    python bench/perplexity_scoring.py [--n-samples 10] [--seq-len 128] [--dtype fp32|bf16|both]
                                       [--batch-size N] [--threads T]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from layerprune.data.calibration import load_calibration  # noqa: E402
from layerprune.importance.perplexity import forward_logits, perplexity
from layerprune.models.bypass import StandIn, swapped  # noqa: E402
from layerprune.models.anatomy import get_anatomy  # noqa: E402
from layerprune.models.loading import load_model  # noqa: E402


def _timed(fn, *args, **kwargs):
    """(result, wall seconds, process CPU seconds): CPU time is steadier on a shared, busy machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _head_share(model, calibration) -> tuple[float, float]:
    """CPU seconds (best of 3) of one intact forward and of one forward with every block skipped."""
    anatomy = get_anatomy(model)
    ids, mask = calibration.input_ids, calibration.attention_mask
    with torch.no_grad():
        forward_logits(model, ids, mask)  # warm-up
        full = min(_timed(forward_logits, model, ids, mask)[2] for _ in range(3))
        with swapped(anatomy, {p: StandIn(None) for p in range(anatomy.num_layers)}):
            head = min(_timed(forward_logits, model, ids, mask)[2] for _ in range(3))
    return full, head


def run(dtype: str, n_samples: int, seq_len: int, batch_size: int | None) -> None:
    loaded = load_model("smollm2-135m", dtype=dtype)
    model = loaded.model.eval()
    calibration = load_calibration(loaded.tokenizer, "c4", n_samples=n_samples, seq_len=seq_len)
    n = get_anatomy(model).num_layers
    print(f"== smollm2-135m {dtype}: {n} layers, {n_samples} x {seq_len} tokens, batch_size={batch_size}, "
          f"torch threads={torch.get_num_threads()}")

    full, head = _head_share(model, calibration)
    h = head / max((full - head) / n, 1e-12)
    expected = (n + n * (n - 1) / 2 + (n + 1) * h) / (n + n * (n - 1) + (n + 1) * h)
    print(f"one forward: {full:.3f} CPU s, of which embeddings+head {head:.3f} s (h = {h:.2f} block units); "
          f"expected ratio {expected:.3f}")

    (fast, fast_extra), t_fast, c_fast = _timed(perplexity, model, calibration, method="fast", batch_size=batch_size)
    (naive, naive_extra), t_naive, c_naive = _timed(
        perplexity, model, calibration, method="naive", batch_size=batch_size
    )
    max_rel = max(abs(a - b) / abs(b) for a, b in zip(fast, naive))
    ranking = sorted(range(n), key=lambda i: (fast[i], -i))

    print(f"time fast:  {t_fast:8.2f} s wall, {c_fast:8.2f} s CPU   layer forwards {fast_extra['layer_forwards']} "
          f"(candidates {fast_extra['candidate_layer_forwards']} + baseline {fast_extra['baseline_layer_forwards']})")
    print(f"time naive: {t_naive:8.2f} s wall, {c_naive:8.2f} s CPU   layer forwards {naive_extra['layer_forwards']} "
          f"(candidates {naive_extra['candidate_layer_forwards']} + baseline {naive_extra['baseline_layer_forwards']})")
    print(f"ratio fast/naive: {t_fast / t_naive:.3f} wall, {c_fast / c_naive:.3f} CPU "
          f"(target <= 0.55; cost model {expected:.3f})")
    print(f"max relative difference of the scores: {max_rel:.2e}")
    print(f"baseline perplexity: {fast_extra['baseline_perplexity']:.4f}")
    print("scores (layer: ppl without it): " + ", ".join(f"{i}: {s:.2f}" for i, s in enumerate(fast)))
    print(f"ranking (least -> most important): {ranking}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16, or 'both'")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        run(dtype, args.n_samples, args.seq_len, args.batch_size)


if __name__ == "__main__":
    main()
