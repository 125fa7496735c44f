"""Activation metrics (block-influence, relative-magnitude, angular) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import FAMILIES, N_LAYERS, tiny_input, tiny_model

from layerprune.data.calibration import CalibrationData
from layerprune.errors import LayerpruneError
from layerprune.importance import compute_many, compute_scores
from layerprune.importance.activations import last_real_positions
from layerprune.models.anatomy import get_anatomy

N = N_LAYERS


def calib(ids: torch.Tensor, mask: torch.Tensor | None = None) -> CalibrationData:
    mask = torch.ones_like(ids) if mask is None else mask
    return CalibrationData(ids, mask, description={"source": "test", "n_samples": ids.shape[0]})


def right_padded(ids: torch.Tensor, lengths: list[int], total: int, garbage_seed: int = 7):
    """Keep lengths[r] real tokens of row r, fill up to `total` with random garbage ids marked as padding."""
    generator = torch.Generator().manual_seed(garbage_seed)
    out = torch.randint(3, 96, (ids.shape[0], total), generator=generator)
    mask = torch.zeros((ids.shape[0], total), dtype=torch.long)
    for r, length in enumerate(lengths):
        out[r, :length] = ids[r, :length]
        mask[r, :length] = 1
    return out, mask


def layer_io(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of every layer (from output_hidden_states, valid for entries 0..n-1) and the last
    layer's raw output (hooked, since the last hidden_states entry is after the final norm)."""
    captured = {}
    last = get_anatomy(model).layers[-1]
    handle = last.register_forward_hook(
        lambda mod, args, out: captured.setdefault("y", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        states = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    handle.remove()
    n = get_anatomy(model).num_layers
    return [s.double() for s in states[:n]] + [captured["y"].double()]


def hand_bi_and_rm(model, ids: torch.Tensor) -> tuple[list[float], list[float]]:
    xs = layer_io(model, ids)
    bi, rm = [], []
    for i in range(len(xs) - 1):
        x, y = xs[i], xs[i + 1]
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        bi.append(1.0 - float(cos.mean()))
        rm.append(float(((y - x).norm(dim=-1) / y.norm(dim=-1)).mean()))
    return bi, rm


def hand_angular(model, rows: list[torch.Tensor], max_m: int) -> dict[int, list[float]]:
    """Each sample alone, unpadded: d(i, i+m) = arccos(cos) / π on its last token, averaged over samples."""
    lasts = [[x[0, -1] for x in layer_io(model, row[None])] for row in rows]
    table = {}
    for m in range(1, max_m + 1):
        per_sample = []
        for last in lasts:
            d = []
            for i in range(len(last) - m):
                cos = torch.dot(last[i], last[i + m]) / (last[i].norm() * last[i + m].norm())
                d.append(math.acos(max(-1.0, min(1.0, float(cos)))) / math.pi)
            per_sample.append(d)
        table[m] = [sum(col) / len(col) for col in zip(*per_sample)]
    return table


def hand_bi_weighted(model, rows: list[torch.Tensor]) -> list[float]:
    """BI over all real tokens of several rows of different lengths (a token-weighted mean)."""
    cos_sum, count = [0.0] * N, 0
    for row in rows:
        xs = layer_io(model, row[None])
        for i in range(N):
            x, y = xs[i][0], xs[i + 1][0]
            cos_sum[i] += float(((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).sum())
        count += row.numel()
    return [1.0 - s / count for s in cos_sum]


def make_identity(model, layer: int) -> None:
    """Zero the residual branches' output projections: the block then returns its input unchanged."""
    block = get_anatomy(model).layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


# ---------------------------------------------------------------------------------------------


def test_block_influence_and_relative_magnitude_match_hand_computation():
    model = tiny_model("llama")
    ids = tiny_input(batch=3, length=10)
    bi, rm = hand_bi_and_rm(model, ids)
    got_bi = compute_scores(model, "block-influence", calib(ids), batch_size=2).values
    got_rm = compute_scores(model, "relative-magnitude", calib(ids), batch_size=2).values
    assert got_bi == pytest.approx(bi, rel=1e-4, abs=1e-6)
    assert got_rm == pytest.approx(rm, rel=1e-4, abs=1e-6)
    assert all(v > 1e-3 for v in got_bi + got_rm)  # random layers do change their input


def test_identity_layer_scores_zero():
    model = tiny_model("llama")
    make_identity(model, 2)
    ids = tiny_input(batch=2, length=10)
    out = compute_many(model, {"block-influence": {}, "relative-magnitude": {}, "angular": {}}, calib(ids))
    bi, rm, ang = (out[k].values for k in ("block-influence", "relative-magnitude", "angular"))
    assert bi[2] == pytest.approx(0.0, abs=1e-6)
    assert rm[2] == pytest.approx(0.0, abs=1e-6)
    assert ang[2] == pytest.approx(0.0, abs=1e-6)
    for i in (0, 1, 3, 4):
        assert bi[i] > 1e-3 and rm[i] > 1e-3 and ang[i] > 1e-3
    # The identity layer is the least important one by every activation metric.
    for scores in out.values():
        assert scores.ranking()[0] == 2


def test_angular_matches_hand_computation_with_padding():
    model = tiny_model("llama")
    base = tiny_input(batch=3, length=12)
    lengths = [12, 7, 9]
    ids, mask = right_padded(base, lengths, total=14)
    rows = [base[r, :length] for r, length in enumerate(lengths)]
    scores = compute_scores(model, "angular", calib(ids, mask), block_size=2, max_block_size=3, batch_size=2)
    table = scores.extra["distances"]
    assert scores.extra["block_size"] == 2
    assert sorted(table) == ["1", "2", "3"]
    expected = hand_angular(model, rows, 3)
    for m in (1, 2, 3):
        assert len(table[str(m)]) == N - m + 1
        assert table[str(m)] == pytest.approx(expected[m], abs=2e-5)
    # values: d(i, i+2) for valid starts i <= n-2, NaN after.
    assert scores.values[: N - 1] == pytest.approx(table["2"], abs=1e-12)
    assert math.isnan(scores.values[N - 1])
    assert all(0.0 < v < 1.0 for v in scores.values[: N - 1])


def test_angular_block_size_equal_to_n_and_default_table():
    model = tiny_model("llama")
    ids = tiny_input(batch=2, length=8)
    full = compute_scores(model, "angular", calib(ids), block_size=N)
    assert math.isfinite(full.values[0]) and all(math.isnan(v) for v in full.values[1:])
    assert list(full.extra["distances"]) == [str(m) for m in range(1, N + 1)]
    one = compute_scores(model, "angular", calib(ids))
    assert list(one.extra["distances"]) == ["1"] and all(math.isfinite(v) for v in one.values)


@pytest.mark.parametrize(
    "params",
    [{"block_size": 0}, {"block_size": N + 1}, {"block_size": 3, "max_block_size": 2}, {"max_block_size": N + 1}],
)
def test_angular_rejects_bad_block_sizes(params):
    model = tiny_model("llama")
    with pytest.raises(LayerpruneError, match="block_size"):
        compute_scores(model, "angular", calib(tiny_input()), **params)


def test_unknown_parameter_is_a_clear_error():
    with pytest.raises(LayerpruneError, match="unknown parameter"):
        compute_many(tiny_model("llama"), {"block-influence": {"block_size": 2}}, calib(tiny_input()))


def test_last_real_positions_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_real_positions(mask).tolist() == [2, 4, 4, 0]


@pytest.mark.parametrize("batch_size", [1, 8])
def test_padding_does_not_change_scores(batch_size):
    model = tiny_model("qwen2")  # sliding windows: padding must not leak through either mask kind
    base = tiny_input(batch=2, length=12)
    metrics = {"block-influence": {}, "relative-magnitude": {}, "angular": {"block_size": 1, "max_block_size": 2}}
    plain = compute_many(model, metrics, calib(base))
    ids, mask = right_padded(torch.cat([base, base[:1]]), [12, 12, 0], total=17)  # + a garbage all-padding row
    for params in metrics.values():
        params["batch_size"] = batch_size
    padded = compute_many(model, metrics, calib(ids, mask))
    for name in metrics:
        assert padded[name].values == pytest.approx(plain[name].values, abs=1e-5, nan_ok=True), name
    table, plain_table = padded["angular"].extra["distances"], plain["angular"].extra["distances"]
    assert table["2"] == pytest.approx(plain_table["2"], abs=1e-5)


def test_padded_tokens_are_left_out_of_the_mean():
    """A padded row = the same scores as that row alone, trimmed to its real length."""
    model = tiny_model("llama")
    base = tiny_input(batch=2, length=12)
    ids, mask = right_padded(base, [12, 6], total=12)
    ref_bi = hand_bi_weighted(model, [base[0], base[1, :6]])
    got = compute_scores(model, "block-influence", calib(ids, mask)).values
    assert got == pytest.approx(ref_bi, rel=1e-4, abs=1e-6)


def test_one_pass_for_the_whole_group():
    model = tiny_model("llama")
    ids, mask = right_padded(tiny_input(batch=3, length=10), [10, 8, 5], total=10)
    data = calib(ids, mask)
    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    metrics = {"block-influence": {}, "relative-magnitude": {}, "angular": {"block_size": 2}}
    together = compute_many(model, metrics, data)
    assert len(calls) == 1
    handle.remove()
    for name, params in metrics.items():
        alone = compute_scores(model, name, data, **params)
        assert together[name].values == pytest.approx(alone.values, abs=1e-7, nan_ok=True)
        assert together[name].extra == alone.extra
        assert together[name].params == params
    assert together["angular"].extra["block_size"] == 2
    # no hook is left behind on the layers
    assert all(not layer._forward_hooks for layer in get_anatomy(model).layers)


def test_batches_follow_the_smallest_batch_size():
    model = tiny_model("llama")
    data = calib(tiny_input(batch=4, length=8))
    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    compute_many(model, {"block-influence": {"batch_size": 3}, "angular": {"batch_size": 2}}, data)
    handle.remove()
    assert len(calls) == 2


def test_train_mode_is_restored_and_bf16_matches_fp32():
    model = tiny_model("llama")
    data = calib(tiny_input(batch=2, length=10))
    fp32 = compute_scores(model, "block-influence", data).values
    low = tiny_model("llama", dtype=torch.bfloat16)
    low.train()
    bf16 = compute_scores(low, "block-influence", data).values
    assert low.training
    assert bf16 == pytest.approx(fp32, rel=0.1, abs=5e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family):
    model = tiny_model(family)
    ids, mask = right_padded(tiny_input(batch=3, length=12), [12, 9, 12], total=12)
    out = compute_many(
        model,
        {"block-influence": {}, "relative-magnitude": {}, "angular": {"block_size": 2}},
        calib(ids, mask),
    )
    n = get_anatomy(model).num_layers
    bi, rm, ang = (out[k].values for k in ("block-influence", "relative-magnitude", "angular"))
    assert len(bi) == len(rm) == len(ang) == n
    assert all(math.isfinite(v) and 0.0 < v <= 2.0 for v in bi)
    assert all(math.isfinite(v) and v > 0.0 for v in rm)
    assert all(math.isfinite(v) and 0.0 < v <= 1.0 for v in ang[: n - 1]) and math.isnan(ang[n - 1])
    assert out["block-influence"].layers == list(range(n))
