"""benchmark/ and `layerprune bench`: exact MACs, layer-wise accounting, forced-length generation, speedups."""

import json

import pytest
import torch
from typer.testing import CliRunner

from layerprune.benchmark.compare import compare
from layerprune.benchmark.config import BenchConfig
from layerprune.benchmark.latency import generation_latency
from layerprune.benchmark.macs import count_macs
from layerprune.benchmark.memory import measure_memory
from layerprune.benchmark.render import markdown
from layerprune.benchmark.measure import benchmark
from layerprune.cli import app
from layerprune.models.anatomy import count_parameters
from layerprune.models.saving import save_model
from layerprune.models.surgery import remove_layers
from tiny_models import FAMILY_CONFIGS, N_LAYERS, VOCAB, tiny_model
from cli_asserts import assert_one_line_error

runner = CliRunner()
CFG = FAMILY_CONFIGS["llama"]


def llama_layer_macs(T: int) -> int:
    """Closed form for one Llama block on T tokens (batch 1)."""
    h, nh, nkv, d, inter = CFG["hidden_size"], CFG["num_attention_heads"], CFG["num_key_value_heads"], CFG["head_dim"], CFG["intermediate_size"]
    q = T * h * (nh * d)
    k = v = T * h * (nkv * d)  # GQA: fewer key/value heads
    o = T * (nh * d) * h
    mlp = 3 * T * h * inter  # gate, up, down
    scores = nh * T * T * d  # Q K^T, every query head, the full T x T square
    mix = nh * T * T * d  # A V
    return q + k + v + o + mlp + scores + mix


def llama_macs(T: int, n_layers: int = N_LAYERS) -> int:
    lm_head = T * CFG["hidden_size"] * VOCAB  # logits at every position
    return n_layers * llama_layer_macs(T) + lm_head


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("T", [10, 64])
def test_macs_of_tiny_llama_match_the_closed_form(attn, T):
    result = count_macs(tiny_model("llama", attn_implementation=attn), seq_len=T)
    assert result["macs"] == llama_macs(T)
    assert result["flops"] == 2 * result["macs"]
    attention = N_LAYERS * 2 * CFG["num_attention_heads"] * T * T * CFG["head_dim"]
    assert result["attention_macs"] == attention, "attention (SDPA on CPU included) must be counted"
    assert result["per_layer_macs"] == [llama_layer_macs(T)] * N_LAYERS


def test_pruning_k_layers_removes_exactly_k_layers_of_params_and_macs():
    model = tiny_model("llama")
    params, macs = count_parameters(model), count_macs(model, 64)
    drop = [1, 3]
    remove_layers(model, drop)
    params_after, macs_after = count_parameters(model), count_macs(model, 64)
    assert params["total"] - params_after["total"] == sum(params["per_layer"][i] for i in drop)
    assert params["total"] - params_after["total"] == len(drop) * params["per_layer"][0]
    assert macs["macs"] - macs_after["macs"] == len(drop) * llama_layer_macs(64)
    assert macs_after["macs"] == llama_macs(64, N_LAYERS - len(drop))


def test_generation_has_the_forced_length_even_when_eos_is_the_argmax():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0 -> greedy picks token 0 ...
    model.generation_config.eos_token_id = 0  # ... which is EOS: unforced generation would stop at once
    result = generation_latency(model, batch_size=2, new_tokens=6, warmup=0, runs=2)
    assert result["tokens_per_run"] == 2 * 6 and result["runs"] == 2
    assert result["throughput_tok_s"] == pytest.approx(2 * 6 / result["mean_s"])


def test_cpu_peak_memory_sees_a_64_mib_allocation():
    model = tiny_model("llama")
    held = []
    measured = measure_memory(model, lambda: held.append(torch.ones(16 * 2**20)))  # 64 MiB, touched
    assert measured["peak_increase_bytes"] >= 60 * 2**20, measured


def test_benchmark_of_a_tiny_model_returns_every_field():
    config = BenchConfig(seq_len=16, batch_sizes=[1, 2], new_tokens=[3, 5], warmup=1, runs=2)
    result = benchmark(tiny_model("llama"), None, config, name="tiny")
    assert result["inputs"].startswith("random token ids")
    assert result["layers"] == N_LAYERS and result["params"]["per_layer"] == [count_parameters(tiny_model("llama"))["per_layer"][0]] * N_LAYERS
    assert result["macs"]["macs"] == llama_macs(16) and set(result["decode_macs"]) == {"3", "5"}
    memory = result["memory"]
    assert memory["weights_bytes"] == 4 * result["params"]["total"]  # fp32
    assert memory["forward"]["peak_bytes"] > 0 and memory["generation"]["batch_size"] == 2
    assert result["prefill"]["runs"] == 2 and result["prefill"]["seq_len"] == 16
    assert [(g["batch_size"], g["new_tokens"]) for g in result["generation"]] == [(1, 3), (1, 5), (2, 3), (2, 5)]
    for gen in result["generation"]:
        assert gen["runs"] == 2 and gen["mean_s"] > 0 and gen["std_s"] >= 0 and gen["throughput_tok_s"] > 0
    text = markdown(result)
    assert "MACs (16 tokens)" in text and "throughput M=2 L=5" in text
    json.dumps(result)  # JSON-ready


def fake(name, layers, macs, decode, prefill_s, gen_s, params=1000, peak=400):
    return {
        "model": name, "layers": layers,
        "params": {"total": params, "non_embedding": params - 100},
        "macs": {"macs": macs, "seq_len": 64},
        "decode_macs": {"8": decode},
        "memory": {"weights_bytes": 2 * params, "forward": {"peak_bytes": peak, "peak_increase_bytes": peak // 4},
                   "generation": {"batch_size": 4, "new_tokens": 8, "peak_bytes": 2 * peak, "peak_increase_bytes": 0}},
        "prefill": {"mean_s": prefill_s, "std_s": 0.0, "seq_len": 64},
        "generation": [{"batch_size": 4, "new_tokens": 8, "mean_s": gen_s, "std_s": 0.0, "throughput_tok_s": 32 / gen_s}],
    }


def test_compare_computes_gains_and_share_of_the_ideal():
    base = fake("base", 30, macs=1200, decode=300, prefill_s=0.30, gen_s=2.0, params=1000, peak=400)
    other = fake("other", 22, macs=1000, decode=200, prefill_s=0.25, gen_s=1.6, params=800, peak=320)
    result = compare(base, other)
    rows = {r["key"]: r for r in result["rows"]}
    assert result["ideal_speedup"] == pytest.approx(1.2) and result["layer_ratio"] == pytest.approx(30 / 22)
    assert rows["prefill"]["gain"] == pytest.approx(1.2) and rows["prefill"]["ideal"] == pytest.approx(1.2)
    assert rows["prefill"]["of_ideal"] == pytest.approx(1.0)
    latency = rows["gen_latency_M4_L8"]
    assert latency["gain"] == pytest.approx(1.25) and latency["ideal"] == pytest.approx(1.5)
    assert latency["of_ideal"] == pytest.approx(1.25 / 1.5)
    assert rows["gen_throughput_M4_L8"]["gain"] == pytest.approx(1.25), "higher throughput is a gain > 1"
    assert rows["params_total"]["gain"] == pytest.approx(1.25) and rows["params_total"]["ideal"] is None
    assert rows["memory_forward"]["gain"] == pytest.approx(1.25)
    assert rows["memory_forward_increase"]["gain"] == pytest.approx(1.25)
    assert rows["memory_generation_increase"]["gain"] is None, "no ratio of a zero increase"
    assert rows["macs"]["gain"] == pytest.approx(1.2)
    assert "| prefill latency (64 tokens) | 300.0 ms | 250.0 ms | 1.200x | 1.200x | 100% |" in markdown(base, other)


# ----------------------------------------------------------------------------- CLI




@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--batch-sizes", "0"], "--batch-sizes: every value must be at least 1 (got [0])"),
        (["--batch-sizes", "1,0"], "--batch-sizes: every value must be at least 1 (got [1, 0])"),
        (["--new-tokens", "0"], "--new-tokens: every value must be at least 1"),
        (["--warmup", "-1"], "--warmup: Input should be greater than or equal to 0"),
        (["--runs", "0"], "--runs: Input should be greater than or equal to 1"),
        (["--seq-len", "0"], "--seq-len: Input should be greater than or equal to 1"),
        (["--batch-sizes", "one"], "could not read --batch-sizes"),
        (["--device", "cuda:99"], "not available on this machine"),
        (["--device", "nonsense"], "unknown device"),
    ],
)
def test_bad_values_fail_before_any_model_loads(tmp_path, args, fragment):
    out = tmp_path / "out"
    # A model that does not exist: the error must be about the value, so nothing was loaded.
    result = runner.invoke(app, ["bench", str(tmp_path / "no-model"), "--out", str(out), *args])
    assert_one_line_error(result, fragment)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(runner.invoke(app, ["bench", str(tmp_path / "no-model"), "--out", str(out)]), "already exists")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.integration
def test_bench_compare_writes_json_markdown_and_plot(tmp_path, drawn):
    model = tiny_model("llama")
    save_model(model, None, tmp_path / "full")
    save_model(remove_layers(model, [1, 2]), None, tmp_path / "pruned")
    out = tmp_path / "bench"
    result = runner.invoke(app, [
        "bench", str(tmp_path / "full"), "--compare", str(tmp_path / "pruned"), "--out", str(out),
        "--seq-len", "16", "--batch-sizes", "1,2", "--new-tokens", "4", "--warmup", "0", "--runs", "1", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [".layerprune-output", "bench.json", "bench.md", "bench.png"]
    data = json.loads((out / "bench.json").read_text())
    full, pruned = data["models"]
    assert (full["layers"], pruned["layers"]) == (N_LAYERS, N_LAYERS - 2)
    assert full["macs"]["macs"] - pruned["macs"]["macs"] == 2 * llama_layer_macs(16)
    assert data["comparison"]["ideal_speedup"] == pytest.approx(llama_macs(16) / llama_macs(16, N_LAYERS - 2))
    assert {r["key"] for r in data["comparison"]["rows"]} >= {"prefill", "gen_latency_M2_L4", "gen_throughput_M1_L4"}
    assert "of ideal" in (out / "bench.md").read_text() and "of ideal" in result.output
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    throughput = {line.get_label(): list(line.get_ydata()) for line in drawn[-1].axes[1].lines}
    for model in data["models"]:  # one throughput line per model and length, a point per batch size
        runs = sorted(model["generation"], key=lambda g: g["batch_size"])
        assert throughput[f"{model['model']} (L=4)"] == [g["throughput_tok_s"] for g in runs]
