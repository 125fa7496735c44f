"""bench.json, bench.md (the summary table and how it was measured) and bench.png (generation plot)."""

from __future__ import annotations

from pathlib import Path

from layerprune.benchmark.compare import compare, figures
from layerprune.files.outputs import write_json
from layerprune.files.plotting import pyplot, save_png


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if unit == "s":
        return f"{value * 1000:,.1f} ms"
    if unit == "tok/s":
        return f"{value:,.1f} tok/s"
    if unit == "macs":
        return f"{value / 1e9:,.3f} G" if value >= 1e8 else f"{value:,.0f}"
    return f"{value:,.0f}"


def _gain(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table_rows(base: dict, other: dict | None = None, comparison: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (one model, or two with gains)."""
    fa = figures(base)
    if other is None:
        rows = [[f.label, format_value(f.value, f.unit) + (f" ± {f.std * 1000:.1f}" if f.std else "")] for f in fa.values()]
        return ["figure", base["model"]], rows
    comparison = comparison or compare(base, other)
    fb = figures(other)
    rows = []
    for row in comparison["rows"]:
        a, b = fa[row["key"]], fb[row["key"]]
        rows.append([
            row["label"],
            format_value(a.value, a.unit) + (f" ± {a.std * 1000:.1f}" if a.std else ""),
            format_value(b.value, b.unit) + (f" ± {b.std * 1000:.1f}" if b.std else ""),
            _gain(row["gain"]), _gain(row["ideal"]),
            _share(row["of_ideal"]) if row.get("reliable", True) else "unreliable: machine busy",
        ])
    return ["figure", base["model"], other["model"], "gain", "ideal (MACs)", "of ideal"], rows


def markdown(base: dict, other: dict | None = None, comparison: dict | None = None) -> str:
    """bench.md: the summary table plus how it was measured."""
    header, rows = table_rows(base, other, comparison)
    lines = ["# layerprune bench", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *_method_notes(base, other)]
    return "\n".join(lines) + "\n"


def _method_notes(base: dict, other: dict | None) -> list[str]:
    notes = []
    if "device" in base:
        notes.append(
            f"- device {base['device']}, dtype {base['dtype']}, torch {base['torch']}, {base['torch_threads']} "
            f"threads; inputs: {base['inputs']}."
        )
    for result in [base] + ([other] if other is not None else []):
        quant = result.get("quantization")
        if quant:
            notes.append(f"- {result['model']}: {quant['quantized_linears']} linear layers quantized by bitsandbytes "
                         f"{quant['load_in']} ({quant['quant_type']}); weight memory counts the packed bytes.")
    cfg = base.get("config", {})
    if cfg:
        notes.append(
            f"- latency: mean ± std (ms) of {cfg['runs']} runs after {cfg['warmup']} warm-ups; generation = "
            f"{cfg['prompt_tokens']} prompt tokens, exactly L new tokens (greedy), throughput = M*L / latency."
        )
    notes.append(
        "- MACs counted with torch FlopCounterMode (FLOPs = 2 MACs), attention QK^T and AV included; "
        "ideal = MACs ratio (per decoded token for generation rows); gain > 1 means the second model is better."
    )
    if "method" in base["memory"]:
        notes.append(
            f"- memory: {base['memory']['method']}; peak = the whole process on CPU (Python and libraries "
            "included), max allocated on GPU; increase = above the level before the call (on CPU a lower bound)."
        )
    if other is not None and other.get("inputs") != base.get("inputs"):
        notes.append(f"- the second model's inputs: {other.get('inputs')}.")
    return notes


def plot_latency(results: list[dict], path: str | Path) -> Path:
    """Generation latency and throughput vs batch size, one line per (model, L)."""
    plt = pyplot()
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        for length in sorted({g["new_tokens"] for g in result["generation"]}):
            runs = sorted((g for g in result["generation"] if g["new_tokens"] == length), key=lambda g: g["batch_size"])
            sizes = [g["batch_size"] for g in runs]
            label = f"{result['model']} (L={length})"
            ax_lat.errorbar(sizes, [g["mean_s"] for g in runs], yerr=[g["std_s"] for g in runs], marker="o",
                            capsize=3, label=label)
            ax_thr.plot(sizes, [g["throughput_tok_s"] for g in runs], marker="o", label=label)
    sizes_seen = sorted({g["batch_size"] for r in results for g in r["generation"]})
    for ax, ylabel in ((ax_lat, "latency (s)"), (ax_thr, "throughput (tokens/s)")):
        ax.set_xlabel("batch size M")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes_seen, [str(s) for s in sizes_seen])  # 1, 4, 16 rather than 2^k
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"generation on {results[0]['device']} ({results[0]['dtype']})")
    fig.tight_layout()
    path = Path(path)
    save_png(fig, path)
    plt.close(fig)
    return path


def write_outputs(folder: str | Path, base: dict, other: dict | None = None) -> dict | None:
    """bench.json, bench.md and bench.png in `folder`; returns the comparison (None for one model)."""
    folder = Path(folder)
    comparison = compare(base, other) if other is not None else None
    models = [base] + ([other] if other is not None else [])
    write_json(folder / "bench.json", {"models": models, "comparison": comparison})
    (folder / "bench.md").write_text(markdown(base, other, comparison))
    plot_latency(models, folder / "bench.png")
    return comparison
