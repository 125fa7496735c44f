"""Original vs pruned: one flat list of figures per result, and how much better the second one is."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    label: str
    value: float | None
    unit: str  # "count" | "bytes" | "s" | "tok/s" | "macs"
    lower_is_better: bool = True
    ideal: str | None = None  # which MACs ratio is this figure's ideal gain: "macs" | "decode:<L>"
    std: float | None = None
    derived_spread: float | None = None  # std / mean of the timing a derived figure (throughput) comes from

    @property
    def spread(self) -> float | None:
        """std / mean of the timing behind this figure (None: not a timing)."""
        if self.derived_spread is not None:
            return self.derived_spread
        return self.std / self.value if self.std is not None and self.value else None


def figures(result: dict) -> dict[str, Figure]:
    """A flat, ordered view of one benchmark result: key -> Figure."""
    mem = result["memory"]
    out = {
        "layers": Figure("decoder layers", result["layers"], "count"),
        "params_total": Figure("parameters", result["params"]["total"], "count"),
        "params_non_embedding": Figure("non-embedding parameters", result["params"]["non_embedding"], "count"),
        "weights_bytes": Figure("weight memory", mem["weights_bytes"], "bytes"),
        "macs": Figure(f"MACs ({result['macs']['seq_len']} tokens)", result["macs"]["macs"], "macs", ideal="macs"),
        "memory_forward": Figure("peak memory, forward", mem["forward"]["peak_bytes"], "bytes"),
        "memory_forward_increase": Figure(
            "peak memory increase, forward", mem["forward"]["peak_increase_bytes"], "bytes"
        ),
        "memory_generation": Figure(
            f"peak memory, generation M={mem['generation']['batch_size']} L={mem['generation']['new_tokens']}",
            mem["generation"]["peak_bytes"], "bytes",
        ),
        "memory_generation_increase": Figure(
            "peak memory increase, generation", mem["generation"]["peak_increase_bytes"], "bytes"
        ),
        "prefill": Figure(
            f"prefill latency ({result['prefill']['seq_len']} tokens)", result["prefill"]["mean_s"], "s",
            ideal="macs", std=result["prefill"]["std_s"],
        ),
    }
    for gen in result["generation"]:
        m, length = gen["batch_size"], gen["new_tokens"]
        out[f"gen_latency_M{m}_L{length}"] = Figure(
            f"generation latency M={m} L={length}", gen["mean_s"], "s", ideal=f"decode:{length}", std=gen["std_s"]
        )
        out[f"gen_throughput_M{m}_L{length}"] = Figure(
            f"throughput M={m} L={length}", gen["throughput_tok_s"], "tok/s", lower_is_better=False,
            ideal=f"decode:{length}",
            derived_spread=gen["std_s"] / gen["mean_s"] if gen.get("std_s") is not None and gen["mean_s"] else None,
        )
    return out


def _ideal(kind: str | None, base: dict, other: dict) -> float | None:
    """Speedup the compute ratio promises: base MACs / other MACs (per decoded token for generation)."""
    if kind is None:
        return None
    if kind == "macs":
        return _ratio(base["macs"]["macs"], other["macs"]["macs"])
    length = kind.split(":", 1)[1]
    return _ratio(base.get("decode_macs", {}).get(length), other.get("decode_macs", {}).get(length))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# A timing whose spread (std / mean) passes this, or a gain past its ideal by more than this share, was taken
# while other work ran: it is flagged unreliable rather than reported as a speed-up.
NOISY_SPREAD = 0.2
PAST_IDEAL = 1.1


def compare(base: dict, other: dict) -> dict:
    """How much better `other` is than `base` on every figure both have.

    gain = base/other for costs (latency, bytes, MACs), other/base for throughput (> 1: other is better).
    ideal = base MACs / other MACs (per decoded token for generation figures); of_ideal = gain / ideal,
    the share of the theoretical speedup that is real. reliable: False when either timing spread more than
    NOISY_SPREAD of its mean, or the gain is beyond PAST_IDEAL x its ideal (removing layers cannot speed up a
    model more than the work it removes: a busy machine slowed one of the two measurements).
    """
    a, b = figures(base), figures(other)
    rows = []
    for key, fa in a.items():
        fb = b.get(key)
        if fb is None:
            continue
        gain = _ratio(fa.value, fb.value) if fa.lower_is_better else _ratio(fb.value, fa.value)
        ideal = _ideal(fa.ideal, base, other)
        spread = max((f.spread for f in (fa, fb) if f.spread is not None), default=None)
        beyond = gain is not None and ideal is not None and gain > PAST_IDEAL * ideal
        rows.append({
            "key": key, "label": fa.label, "unit": fa.unit, "base": fa.value, "other": fb.value,
            "gain": gain, "ideal": ideal, "of_ideal": _ratio(gain, ideal), "spread": spread,
            "reliable": not beyond and (spread is None or spread <= NOISY_SPREAD),
        })
    return {
        "base": base["model"],
        "other": other["model"],
        "ideal_speedup": _ratio(base["macs"]["macs"], other["macs"]["macs"]),
        "layer_ratio": _ratio(base["layers"], other["layers"]),
        "rows": rows,
    }
