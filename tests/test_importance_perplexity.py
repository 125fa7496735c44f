"""The perplexity (PPL) metric: the fast cached method equals the naive one and real layer removal."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from layerprune.data.calibration import CalibrationData
from layerprune.errors import LayerpruneError
from layerprune.importance.perplexity import perplexity, token_nll
from layerprune.models.bypass import StandIn
from layerprune.importance.registry import compute_scores, get_metric
from layerprune.models.anatomy import get_anatomy
from layerprune.models.bypass import bypass_layers
from layerprune.models.surgery import remove_layers
from tiny_models import FAMILIES, N_LAYERS, VOCAB, tiny_input, tiny_model

N = N_LAYERS


def _calibration(length: int = 16) -> CalibrationData:
    """3 samples longer than every tiny sliding window; sample 1 is right-padded."""
    ids = tiny_input(batch=3, length=length)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return CalibrationData(ids, mask)


def _close(a: list[float], b: list[float], rtol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=rtol)


def _hand_ppl(model, calibration: CalibrationData) -> float:
    """exp(mean NLL) over real next-token predictions, from a plain forward and log_softmax."""
    with torch.no_grad():
        logits = model(input_ids=calibration.input_ids, attention_mask=calibration.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = calibration.input_ids[:, 1:]
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    valid = calibration.attention_mask[:, 1:].bool() & calibration.attention_mask[:, :-1].bool()
    return math.exp(-float(picked[valid].sum()) / int(valid.sum()))


def _hooks(model) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_equals_naive_for_every_family(family):
    model = tiny_model(family)
    calibration = _calibration()
    fast, fast_extra = perplexity(model, calibration, method="fast")
    naive, naive_extra = perplexity(model, calibration, method="naive")
    _close(fast, naive, rtol=1e-4)
    assert fast_extra["baseline_perplexity"] == pytest.approx(naive_extra["baseline_perplexity"], rel=1e-6)
    assert fast_extra["candidate_layer_forwards"] == N * (N - 1) // 2
    assert naive_extra["candidate_layer_forwards"] == N * (N - 1)
    for extra in (fast_extra, naive_extra):
        assert extra["baseline_layer_forwards"] == N
        assert extra["layer_forwards"] == extra["baseline_layer_forwards"] + extra["candidate_layer_forwards"]
    # The scores must be about removed layers, not the intact model.
    assert max(abs(s - fast_extra["baseline_perplexity"]) for s in fast) > 1e-3 * fast_extra["baseline_perplexity"]


def test_scores_equal_perplexity_of_a_model_with_the_layer_removed():
    model = tiny_model("llama")
    calibration = _calibration()
    scores, extra = perplexity(model, calibration)
    assert extra["baseline_perplexity"] == pytest.approx(_hand_ppl(model, calibration), rel=1e-5)
    for i in range(N):
        pruned = remove_layers(copy.deepcopy(model), [i])
        assert get_anatomy(pruned).num_layers == N - 1
        assert scores[i] == pytest.approx(_hand_ppl(pruned, calibration), rel=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_naive_equals_bypass_layers_reference(family):
    model = tiny_model(family)
    calibration = _calibration()
    scores, _ = perplexity(model, calibration, method="naive")
    for i in range(N):
        with bypass_layers(model, [i]):
            assert scores[i] == pytest.approx(_hand_ppl(model, calibration), rel=1e-5)


def test_layer_forward_count_is_honest_and_per_chunk():
    model = tiny_model("qwen2")
    calibration = _calibration()
    calls = [0]

    def count(*_):
        calls[0] += 1

    handles = [block.register_forward_hook(count) for block in get_anatomy(model).layers]
    try:
        _, extra = perplexity(model, calibration, batch_size=1)
    finally:
        for handle in handles:
            handle.remove()
    assert extra["chunks"] == 3
    assert extra["layer_forwards"] == calls[0] == 3 * (N + N * (N - 1) // 2)
    assert extra["candidate_layer_forwards"] == 3 * N * (N - 1) // 2
    _, naive = perplexity(model, calibration, method="naive", batch_size=2)
    assert naive["chunks"] == 2 and naive["candidate_layer_forwards"] == 2 * N * (N - 1)


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_chunking_and_offload_do_not_change_scores(method):
    model = tiny_model("gemma3_text")
    calibration = _calibration()
    whole, extra = perplexity(model, calibration, method=method)
    for batch_size in (1, 2):
        chunked, chunked_extra = perplexity(model, calibration, method=method, batch_size=batch_size, offload=True)
        _close(chunked, whole, rtol=1e-5)
        assert chunked_extra["tokens"] == extra["tokens"] == 15 + 9 + 15
    _close(perplexity(model, calibration, method=method, offload="auto")[0], whole, rtol=1e-6)


def test_padding_is_ignored():
    model = tiny_model("mistral")
    calibration = _calibration()
    scores, extra = perplexity(model, calibration)
    # Garbage ids under the mask change nothing.
    ids = calibration.input_ids.clone()
    ids[1, 10:] = torch.randint(3, VOCAB, (ids.shape[1] - 10,), generator=torch.Generator().manual_seed(7))
    garbage, _ = perplexity(model, CalibrationData(ids, calibration.attention_mask))
    _close(garbage, scores, rtol=1e-6)
    # Extra padding columns appended to every sample (longer L, mask 0) change nothing either.
    pad = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(8))
    longer = CalibrationData(
        torch.cat([calibration.input_ids, pad], dim=1),
        torch.cat([calibration.attention_mask, torch.zeros_like(pad)], dim=1),
    )
    padded, padded_extra = perplexity(model, longer)
    _close(padded, scores, rtol=1e-5)
    assert padded_extra["tokens"] == extra["tokens"]
    assert padded_extra["baseline_perplexity"] == pytest.approx(extra["baseline_perplexity"], rel=1e-5)


def test_model_is_unchanged_after_scoring():
    model = tiny_model("opt")
    calibration = _calibration()
    layers = get_anatomy(model).layers
    hooks = _hooks(model)
    with torch.no_grad():
        before = model(tiny_input()).logits
    perplexity(model, calibration)
    perplexity(model, calibration, method="naive")
    assert get_anatomy(model).layers is layers
    assert _hooks(model) == hooks
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in layers)
    with torch.no_grad():
        assert torch.equal(model(tiny_input()).logits, before)


def test_model_is_restored_after_an_error_and_training_flag_kept():
    model = tiny_model("llama")
    model.train()
    layers = get_anatomy(model).layers
    hooks = _hooks(model)
    calls = [0]

    def fail_late(module, args):
        calls[0] += 1
        if calls[0] > 2:  # block 3 runs in the caching pass, then for candidates 0, 1, 2: fail in a candidate
            raise RuntimeError("boom")

    handle = layers[3].register_forward_pre_hook(fail_late)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            perplexity(model, _calibration())
    finally:
        handle.remove()
    assert get_anatomy(model).layers is layers
    assert _hooks(model) == hooks
    assert all(m.training for m in model.modules())


def test_guards():
    calibration = _calibration()
    with pytest.raises(LayerpruneError, match="at least 2 layers"):
        perplexity(tiny_model("llama", num_hidden_layers=1), calibration)
    model = tiny_model("llama")
    with pytest.raises(LayerpruneError, match="method"):
        perplexity(model, calibration, method="slow")
    with pytest.raises(LayerpruneError, match="batch_size"):
        perplexity(model, calibration, batch_size=0)
    with pytest.raises(LayerpruneError, match="offload"):
        perplexity(model, calibration, offload="sometimes")


def test_registered_and_usable_through_the_registry():
    spec = get_metric("perplexity")
    assert spec.needs_calibration
    model = tiny_model("phi3")
    result = compute_scores(model, "perplexity", _calibration(), method="fast", batch_size=2)
    assert result.layers == list(range(N))
    assert result.extra["method"] == "fast"
    assert result.ranking()[0] == min(range(N), key=lambda i: result.values[i])


def test_token_nll_ignores_padding_and_sums():
    logits = torch.randn(2, 4, VOCAB)
    ids = torch.randint(0, VOCAB, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    total, count = token_nll(logits, ids, mask)
    assert count == 3 + 1
    logp = torch.log_softmax(logits, dim=-1)
    expected = -sum(float(logp[0, t, ids[0, t + 1]]) for t in range(3)) - float(logp[1, 0, ids[1, 1]])
    assert total == pytest.approx(expected, rel=1e-5)


def test_stand_in_keeps_the_block_output_form():
    hidden = torch.randn(2, 3, 4)
    cached = torch.randn(2, 3, 4)
    assert StandIn(None)(hidden) is hidden
    assert StandIn((None,), cached)(hidden)[0] is not hidden
    out = StandIn((None,), cached)(hidden_states=hidden)
    assert isinstance(out, tuple) and torch.equal(out[0], cached) and out[1] is None
    with pytest.raises(RuntimeError, match="do not match"):
        StandIn(None, cached)(torch.randn(1, 3, 4))
    # Attributes a model forward may read from its blocks come from the original block.
    block = torch.nn.Linear(2, 2)
    block.attention_type = "sliding_attention"
    stand_in = StandIn(None, block=block)
    assert stand_in.attention_type == "sliding_attention"
    assert list(stand_in.modules()) == [stand_in]
    with pytest.raises(AttributeError):
        StandIn(None).attention_type


@torch.no_grad()
def bypassed_loss(model, calibration, drop: list[int]) -> float:
    """Reference: mean next-token loss of a full forward with the layers at positions `drop` bypassed."""
    total, count = 0.0, 0
    with bypass_layers(model, drop):
        for ids, mask in calibration.batches(4):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                       reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2", "gpt2"])
def test_drop_set_losses_equal_bypassed_forwards_and_skip_the_prefix(family):
    """select: auto's cheap candidate losses equal a full forward with the layers bypassed."""
    from layerprune.selection.drop_set_losses import drop_set_losses

    model = tiny_model(family).eval()
    calibration = _calibration()
    drop_sets = {"tail": [3, 4], "middle": [1, 3], "single": [2]}
    losses, forwards = drop_set_losses(model, calibration, drop_sets, batch_size=4)
    for name, drop in drop_sets.items():
        assert losses[name] == pytest.approx(bypassed_loss(model, calibration, drop), rel=1e-5), name
    batches = math.ceil(calibration.num_samples / 4)
    # per batch: one intact pass + each candidate's blocks after its first drop that it keeps
    expected = batches * (N_LAYERS + sum(len([p for p in range(min(d), N_LAYERS) if p not in d])
                                         for d in drop_sets.values()))
    assert forwards == expected
