"""Benchmark: pruning a quantized GGUF file directly vs the dequantize -> prune -> requantize path.

For each built-in GGUF model (SmolLM2-135M Q4_1, Gemma-3-270M Q4_K_M) the same drop-set (chosen once by
block-influence on 25% of the layers, not timed) is cut two ways, each in its own subprocess so that its
peak RSS (VmHWM) is clean:

- direct: `prune_gguf` copies every kept tensor in its quantization type (models/gguf_file.py);
- requantize: what layerprune did before: load the GGUF through transformers (dequantized to fp32, into a
  fresh cache), remove the layers, save safetensors, and `export_gguf(..., "same-as:<source>")`
  (llama.cpp's converter to f16, then llama.cpp's quantizer to the source's file type and embedding type).

Then llama.cpp (llama-cpp-python) scores both outputs, and the unpruned source, on the same WikiText-2
windows (the transformers tokenizer's ids), and the table gives wall time, peak RSS, output size and
perplexity. Targets: the direct path faster, smaller in memory, and no worse in perplexity.

    python bench/gguf_prune.py [--models smollm2-135m,gemma3-270m] [--windows 40] [--seq-len 256]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import cpu_kind, peak_rss_mb, run_child  # noqa: E402  (bench/ is on sys.path when run as a script)


def child(path: str, source: str, drop: str, out: str) -> None:
    """One path in a fresh process: prints {"seconds", "peak_rss_mb"} as its last line."""
    import torch  # noqa: F401  (imports before the clock: they cost the same whatever the model)
    import transformers  # noqa: F401

    from layerprune.models.gguf_file import prune_gguf

    drop_list = [int(i) for i in drop.split(",")]
    start = time.perf_counter()
    if path == "direct":
        prune_gguf(source, drop_list, out)
    else:
        from layerprune.export.gguf import export_gguf
        from layerprune.models.loading import load_model
        from layerprune.models.saving import save_model
        from layerprune.models.surgery import remove_layers

        loaded = load_model(source, dtype="fp32")
        remove_layers(loaded.model, drop_list)
        folder = Path(out).with_suffix("")
        save_model(loaded.model, loaded.tokenizer, folder)
        export_gguf(folder, out, f"same-as:{source}")
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}))


def choose_drop(alias: str) -> tuple[str, list[int]]:
    """The GGUF file of `alias` and 25% of its layers chosen by block-influence on the dequantized model."""
    from layerprune.api import choose_layers
    from layerprune.data.calibration import load_calibration_for
    from layerprune.selection.config import CalibrationConfig
    from layerprune.models.builtin import builtin_gguf_path
    from layerprune.models.loading import load_model

    source = str(builtin_gguf_path(alias))
    loaded = load_model(source, dtype="fp32")
    calibration = load_calibration_for(loaded, CalibrationConfig(n_samples=16, seq_len=256))
    drop, _ = choose_layers(loaded.model, ratio=0.25, metric="block-influence", calibration=calibration,
                            log=lambda m: None)
    return source, drop


def llama_cpp_perplexity(path: str, tokenizer_from: str, windows: int, seq_len: int) -> float:
    from layerprune.evaluation.perplexity import load_ppl_text, window_inputs
    from layerprune.export.llamacpp import open_gguf, perplexity_windows
    from layerprune.models.loading import load_model

    tokenizer = load_model(tokenizer_from, dtype="fp32").tokenizer
    planned = window_inputs(tokenizer, load_ppl_text("wikitext2").text, seq_len=seq_len, max_windows=windows)
    llm = open_gguf(path, n_ctx=seq_len + 8, threads=os.cpu_count(), logits_all=True)
    result = perplexity_windows(llm, planned.inputs, planned.score_from)
    llm.close()
    return result["ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--child", default=None)
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args()
    if args.child:
        child(args.child, *args.rest)
        return
    from layerprune.files.cache import cache_dir

    rows = []
    work = Path(tempfile.mkdtemp(prefix="layerprune-gguf-bench-"))
    try:
        for alias in args.models.split(","):
            source, drop = choose_drop(alias)
            results = {}
            for path in ("direct", "requantize"):
                cache = work / f"cache-{alias}-{path}"  # a fresh cache: the requantize path dequantizes anew
                cache.mkdir()
                if (cache_dir() / "llama-cpp").is_dir():
                    os.symlink(cache_dir() / "llama-cpp", cache / "llama-cpp")  # llama.cpp's converter, fetched once
                os.environ["LAYERPRUNE_CACHE"] = str(cache)
                out = work / f"{alias}-{path}.gguf"
                results[path] = run_child(__file__, path, source, ",".join(map(str, drop)), str(out))
                results[path]["bytes"] = out.stat().st_size
                os.environ.pop("LAYERPRUNE_CACHE")
                results[path]["perplexity"] = llama_cpp_perplexity(str(out), source, args.windows, args.seq_len)
            base = llama_cpp_perplexity(source, source, args.windows, args.seq_len)
            rows.append({"model": alias, "dropped": drop, "unpruned_perplexity": base, **results})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nCPU: {cpu_kind()}; llama.cpp perplexity on {args.windows} WikiText-2 windows of {args.seq_len} tokens")
    print("| model | path | wall s | peak RSS MB | output MB | llama.cpp ppl (unpruned) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for path in ("direct", "requantize"):
            r = row[path]
            print(f"| {row['model']} | {path} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['bytes'] / 2**20:.1f} | "
                  f"{r['perplexity']:.2f} ({row['unpruned_perplexity']:.2f}) |")
        d, q = row["direct"], row["requantize"]
        print(f"| {row['model']} | direct / requantize | {d['seconds'] / q['seconds']:.3f} | "
              f"{d['peak_rss_mb'] / q['peak_rss_mb']:.3f} | {d['bytes'] / q['bytes']:.3f} | "
              f"{d['perplexity'] / q['perplexity']:.3f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
