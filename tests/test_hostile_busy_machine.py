"""Estimates and benchmarks on a busy machine: one slow timing does not become the estimate, a loaded machine
is said to be, the time left is re-estimated at the pace the stages really ran, and a speed-up measured while
other work ran is flagged instead of reported past its ideal."""

from __future__ import annotations

import itertools

from layerprune.benchmark.compare import compare
from layerprune.benchmark.render import table_rows
from layerprune.hardware.speed import busy_note, median_seconds
from layerprune.planning.estimate import Plan


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_slow_timing_among_several_is_not_the_estimate():
    clock, durations = FakeClock(), iter([9.0, 5.0, 1.0, 1.2])  # warm-up, a burst of other work, then steady

    def run():
        clock.now += next(durations)

    assert abs(median_seconds(run, 3, clock=clock) - 1.2) < 1e-9  # the warm-up is not timed; the 5 s outlier is not kept


def test_a_loaded_machine_is_said_to_be_and_an_idle_one_is_not():
    assert busy_note((2.1, 2)) is None  # one torch job alone keeps the load near the cores
    note = busy_note((4.3, 2))
    assert note is not None and "busy" in note and "4.3 on 2 cores" in note


def test_the_time_left_follows_the_pace_the_stages_really_ran():
    plan = Plan("run")
    for name, estimate in (("prune", 10.0), ("heal", 100.0), ("eval", 50.0)):
        plan.add(name, name, estimate)
    plan.record("prune", 20.0)  # twice as slow as estimated
    line = plan.progress_line("prune")
    assert plan.pace() == 2.0 and plan.remaining() == 300.0
    assert line.startswith("prune took 20 s (estimated 10 s); left: ~5.0 min at 2x the estimated pace")
    plan.record("heal", 50.0)  # then faster: 70 s for 110 s estimated
    assert abs(plan.remaining() - 50.0 * 70 / 110) < 1e-9


def bench_result(name: str, macs: float, decode_s: float, decode_std: float) -> dict:
    """A bench.json result of the shape benchmark/measure.py writes, with one generation setting (M=1, L=32)."""
    generation = {"batch_size": 1, "new_tokens": 32, "mean_s": decode_s, "std_s": decode_std,
                  "throughput_tok_s": 32 / decode_s}
    return {"model": name, "layers": 30 if name == "a" else 22, "params": {"total": 100, "non_embedding": 80},
            "macs": {"seq_len": 64, "macs": macs}, "decode_macs": {"32": macs / 64},
            "prefill": {"seq_len": 64, "mean_s": 0.1, "std_s": 0.001},
            "memory": {"weights_bytes": 10, "forward": {"peak_bytes": 20, "peak_increase_bytes": 5},
                       "generation": {"batch_size": 1, "new_tokens": 32, "peak_bytes": 30, "peak_increase_bytes": 6}},
            "generation": [generation]}


def generation_rows(comparison: dict) -> list[dict]:
    return [r for r in comparison["rows"] if r["key"].startswith("gen")]


def test_a_speed_up_past_its_ideal_is_flagged_not_reported():
    base, other = bench_result("a", 1000.0, 5.5, 0.01), bench_result("b", 750.0, 2.6, 0.01)  # 2.1x for 1.33x ideal
    rows = generation_rows(compare(base, other))
    assert rows and all(not r["reliable"] for r in rows)
    header, table = table_rows(base, other)
    assert any("unreliable: machine busy" in cells for cells in table)


def test_a_timing_that_spread_over_a_fifth_of_its_mean_is_flagged():
    base, other = bench_result("a", 1000.0, 5.5, 9.25), bench_result("b", 750.0, 4.5, 0.01)  # 5.5 s +- 9.25 s
    assert all(not r["reliable"] for r in generation_rows(compare(base, other)))


def test_steady_timings_within_their_ideal_are_reported():
    base, other = bench_result("a", 1000.0, 5.5, 0.05), bench_result("b", 750.0, 4.6, 0.05)
    rows = generation_rows(compare(base, other))
    assert rows and all(r["reliable"] for r in rows)
    assert all("%" in cells[-1] for cells in table_rows(base, other)[1] if cells[0].startswith("generation"))


def test_progress_lines_count_only_stages_with_estimates():
    plan = Plan("run")
    plan.add("eval-original", "evaluate", 30.0, skipped=True)  # done before: not part of the pace
    plan.add("bench", "benchmark", None)
    plan.record("eval-original", 0.1)
    assert plan.pace() is None and plan.remaining() is None
    assert plan.progress_line("eval-original") == "eval-original took 0 s (estimated 0 s)"
    assert list(itertools.islice(plan.lines(), 1))[0].startswith("run: estimated")


def test_a_busy_machine_does_not_turn_native_bf16_into_fp32(monkeypatch):
    """A bf16 matmul timed while other work runs can read a few times slow; emulated bf16 is 10-200x slower.
    Reading the first as emulated computed a whole run in fp32: several times slower, and other numbers."""
    from layerprune.hardware import compute

    compute.cpu_bf16_support.cache_clear()
    monkeypatch.setattr(compute, "cpu_flags", lambda cpuinfo=None: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.setattr(compute, "torch_cpu_capability", lambda: "AVX512")
    try:
        monkeypatch.setattr(compute, "bf16_matmul_ratio", lambda: 3.0)  # a native CPU, timed on a loaded machine
        assert compute.cpu_bf16_support()[0] is True
        compute.cpu_bf16_support.cache_clear()
        monkeypatch.setattr(compute, "bf16_matmul_ratio", lambda: 12.0)  # emulated
        assert compute.cpu_bf16_support()[0] is False
    finally:
        compute.cpu_bf16_support.cache_clear()
