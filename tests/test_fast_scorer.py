"""The shared-prefix scorer gives every lm-eval request the log-likelihood and is-greedy flag stock HFLM
gives it (tiny models of every family, sliding windows included), and a task scored both ways has the same
acc and acc_norm."""

from __future__ import annotations

import json
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from layerprune.evaluation.fast_lm import FastHFLM
from layerprune.evaluation.fast_scorer import (
    attention_plan, batch_rows, build_trees, make_batch, pack_rows, plan_batches,
)
from layerprune.evaluation.harness import evaluate_tasks
from layerprune.evaluation.tasks import resolve_tasks
from numerics import approx_value, close
from tiny_models import FAMILIES, tiny_model, tiny_tokenizer

MAX_LENGTH = 40  # HFLM's window: the long context below and some pairs are truncated to it
CONTEXTS = ["Question: what is red?\nAnswer:", "The cat sat on the ", "x", "", "A long story. " * 4]
CONTINUATIONS = [" apple", " a", "mat", " blue sky today", "B", "  two spaces", "dog, cat and owl"]


def _lms(model, **fast):
    kwargs = dict(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=2, max_length=MAX_LENGTH)
    return HFLM(**kwargs), FastHFLM(**{**kwargs, **fast})


def _assert_same(stock: list, fast: list) -> None:
    assert len(stock) == len(fast)
    for k, ((ll_s, greedy_s), (ll_f, greedy_f)) in enumerate(zip(stock, fast)):
        assert close(ll_s, ll_f), f"request {k}: {ll_s} vs {ll_f}"  # sums of up to ~40 tokens
        assert greedy_s == greedy_f, f"request {k}: is_greedy {greedy_s} vs {greedy_f}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("row_tokens", [8, 512])  # a tree per row, 2 per batch / rows of a whole window
def test_every_request_scores_as_stock_hflm(family, row_tokens):
    """String requests through lm-eval's own tokenization: leading spaces, empty contexts, multi-token
    continuations, pairs longer than the window."""
    requests = [Instance("loglikelihood", {}, (c, k), i)
                for i, (c, k) in enumerate((c, k) for c in CONTEXTS for k in CONTINUATIONS)]
    stock, fast = _lms(tiny_model(family), row_tokens=row_tokens)
    assert fast.attention is not None, "every tiny family takes the shared-prefix path"
    _assert_same(stock.loglikelihood(requests, disable_tqdm=True), fast.loglikelihood(requests, disable_tqdm=True))


@pytest.mark.parametrize("family, logits_to_keep", [("llama", True), ("gpt2", True), ("qwen2", True),
                                                    ("llama", False)])
def test_greedy_continuations_and_truncation_match_at_token_level(family, logits_to_keep):
    """Continuations that are the model's own greedy tokens (is_greedy True), the same with one token
    changed (False), and contexts longer than the window, which HFLM truncates per pair. Without
    logits_to_keep (older model code), every position is projected and the kept ones picked."""
    model = tiny_model(family)
    stock, fast = _lms(model, row_tokens=32)
    fast.keeps_logits = logits_to_keep
    generator = torch.Generator().manual_seed(0)
    requests = []
    for length in (3, 17, 39, 60):  # 60 + continuation > MAX_LENGTH + 1: left-truncated
        context = torch.randint(3, 100, (length,), generator=generator).tolist()
        with torch.no_grad():
            greedy = model.generate(torch.tensor([context[-MAX_LENGTH + 6:]]), max_new_tokens=5, do_sample=False,
                                    pad_token_id=0)[0, -5:].tolist()
        for continuation in (greedy[:1], greedy, greedy[:-1] + [(greedy[-1] + 1) % 100 + 3], [5, 6, 7]):
            requests.append((("c", "k"), context, continuation))
    expected = stock._loglikelihood_tokens(requests, disable_tqdm=True)
    assert sum(greedy for _, greedy in expected) >= 4, "some continuations are greedy"
    _assert_same(expected, fast._loglikelihood_tokens(requests, disable_tqdm=True))


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_unbranched_trees_take_the_models_own_causal_mask(family):
    """A context with one continuation is a plain sequence: rows of one such tree get a 2D padding mask."""
    generator = torch.Generator().manual_seed(1)
    requests = [(("c", "k"), torch.randint(3, 100, (n,), generator=generator).tolist(), [7, 8, 9][: 1 + n % 3])
                for n in (5, 9, 14, 30)]
    stock, fast = _lms(tiny_model(family), row_tokens=1)  # one tree per row
    rows = [[tree] for tree in build_trees(requests, MAX_LENGTH)]
    assert make_batch(rows, fast.attention, torch.float32, "cpu").attention_mask.dim() == 2
    _assert_same(stock._loglikelihood_tokens(requests, disable_tqdm=True),
                 fast._loglikelihood_tokens(requests, disable_tqdm=True))


def test_rolling_loglikelihood_matches_stock():
    text = "The quick brown fox jumps over the lazy dog. " * 6  # several windows of MAX_LENGTH tokens
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0), Instance("loglikelihood_rolling", {}, ("hi",), 1)]
    stock, fast = _lms(tiny_model("llama"))
    for a, b in zip(stock.loglikelihood_rolling(requests, disable_tqdm=True),
                    fast.loglikelihood_rolling(requests, disable_tqdm=True)):
        assert a == approx_value(b)  # a sum over every token of the text


def test_multiple_choice_task_gives_identical_metrics(tmp_path):
    path = tmp_path / "quiz.jsonl"
    words = ["red", "blue", " green", "a yellow bird", "sky", "grass and trees", "x"]
    items = [{"question": f"Which colour is item {i}?", "choices": words[i % 3: i % 3 + 4], "answer": i % 4}
             for i in range(12)]
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    entries = resolve_tasks(str(path))
    model = tiny_model("llama", max_position_embeddings=512)
    stock = evaluate_tasks(model, tiny_tokenizer(), entries, batch_size=3, scorer="stock")
    fast = evaluate_tasks(model, tiny_tokenizer(), entries, batch_size=3, scorer="fast")
    name = entries[0].name
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"):
        assert fast["tasks"][name][metric] == stock["tasks"][name][metric], metric
    assert 0 < fast["tasks"][name]["acc"] < 1, "a quiz the random model gets partly right: a meaningful check"
    assert fast["protocol"]["scorer"].startswith("layerprune-fast") and stock["protocol"]["scorer"] == "lm-eval's HFLM"


def test_requests_sharing_a_context_share_one_tree():
    requests = [(None, [1, 2, 3], [4]), (None, [1, 2, 3], [5, 6, 7]), (None, [1, 2, 3], [5, 6, 8]),
                (None, [9], [4]), (None, [1, 2, 3, 4, 5, 6], [7, 8])]
    trees = build_trees(requests, max_length=6)
    # The last pair is 8 tokens: HFLM keeps the last 7 of them, so its context loses its first token.
    assert [t.tokens for t in trees[1:]] == [[9], [2, 3, 4, 5, 6, 7]]  # context, then 7 (8 only predicted)
    first = trees[0]
    assert first.tokens == [1, 2, 3, 5, 6]  # [4] needs no node; [5, 6, 7] and [5, 6, 8] share 5, 6
    assert first.positions == [0, 1, 2, 3, 4]
    assert [nodes for _, nodes, _ in first.scored] == [[2], [2, 3, 4], [2, 3, 4]]
    seen = first.visible()
    assert seen[4].tolist() == [True] * 5 and seen[2].tolist() == [True, True, True, False, False]


def test_contexts_that_begin_alike_share_one_tree_within_its_size():
    header = [50, 51, 52, 53]
    requests = [(None, header + [1, 2], [7]), (None, header + [3], [8, 9]), (None, header + [1, 2, 4], [7]),
                (None, [60, 61], [7]), (None, header + [5], [7])]
    unshared = build_trees(requests, max_length=64)
    assert [t.contexts for t in unshared] == [1] * 5
    shared = build_trees(requests, max_length=64, share_tokens=9, min_shared=4)
    # sorted: header+1,2 / header+1,2,4 / header+3 / header+5 / 60,61; the first three fill 9 nodes
    assert [t.contexts for t in shared] == [3, 1, 1]
    tree = shared[0]
    assert tree.tokens == header + [1, 2, 4, 3, 8]  # header once; header+1,2 is a prefix of header+1,2,4
    assert tree.positions == [0, 1, 2, 3, 4, 5, 6, 4, 5]
    assert {index: nodes for index, nodes, _ in tree.scored} == {0: [5], 2: [6], 1: [7, 8]}
    assert tree.visible()[8].tolist() == [True] * 4 + [False] * 3 + [True, True]  # 9's input sees header, 3, 8
    assert len(tree) == 9 and sum(map(len, shared)) < sum(map(len, unshared))
    assert [t.contexts for t in build_trees(requests, 64, share_tokens=12, min_shared=5)] == [2, 1, 1, 1]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_contexts_sharing_a_header_score_as_stock_hflm(family):
    """MMLU-like requests (one header, several questions, one-token and multi-token answers) through
    shared trees give stock HFLM's numbers, whatever the tree size (one question per tree, or many)."""
    header = "Quiz on cats:\n"  # 14 tokens of the character-level tiny tokenizer
    questions = ["red?", "a dog?", "naps?", "x"]
    requests = [Instance("loglikelihood", {}, (header + q, k), i) for i, (q, k) in
                enumerate((q, k) for q in questions for k in [" A", " B", " no", "mat"])]
    stock, _ = _lms(tiny_model(family))
    expected = stock.loglikelihood(requests, disable_tqdm=True)
    built = []

    def recorded(*args, **kwargs):
        built.append(build_trees(*args, **kwargs))
        return built[-1]

    for row_tokens, trees in ((16, 4), (40, 2)):  # a question per tree / two questions share a header
        fast = _lms(tiny_model(family), row_tokens=row_tokens)[1]
        with mock.patch("layerprune.evaluation.fast_scorer.build_trees", recorded):
            _assert_same(expected, fast.loglikelihood(requests, disable_tqdm=True))
        assert len(built[-1]) == trees and fast.progress.contexts == len(questions)


def test_branches_see_the_context_but_not_each_other():
    tree = build_trees([(None, [1, 2], [3, 4, 5]), (None, [1, 2], [6, 7, 8])], max_length=10)[0]
    assert tree.tokens == [1, 2, 3, 4, 6, 7] and tree.positions == [0, 1, 2, 3, 2, 3]
    seen = tree.visible()
    assert seen[5].tolist() == [True, True, False, False, True, True]  # 7 sees 1 2 6 7, not the other branch


def test_rows_and_batches_respect_their_budgets():
    trees = build_trees([(None, [k] * n, [1]) for k, n in enumerate([5, 5, 12, 3, 3], start=2)], max_length=64)
    rows = pack_rows(trees, row_tokens=10)
    assert [[len(t) for t in row] for row in rows] == [[5, 5], [12], [3, 3]]
    assert [len(b) for b in batch_rows(rows, token_budget=24)] == [2, 1]  # 2 rows x 12 padded tokens fit in 24


def test_batches_cover_every_tree_once_in_a_seeded_order():
    trees = build_trees([(None, [k] * (1 + k % 7), [1, 2]) for k in range(3, 40)], max_length=64)
    batches = plan_batches(trees, row_tokens=8, rows_per_batch=2, chunk=10)
    planned = [t for rows in batches for row in rows for t in row]
    assert sorted(map(id, planned)) == sorted(map(id, trees))
    assert [t.tokens for t in planned] == [t.tokens for rows in plan_batches(trees, 8, 2, chunk=10)
                                           for row in rows for t in row]
    first_chunk = planned[:10]
    assert [len(t) for t in first_chunk] == sorted(map(len, first_chunk), reverse=True)


def test_models_the_tree_mask_cannot_reproduce_use_stock_scoring():
    def plan(**config):
        return attention_plan(SimpleNamespace(config=SimpleNamespace(**{"_attn_implementation": "sdpa", **config})))

    assert plan() is not None and plan(sliding_window=8).window == 8
    assert plan(_attn_implementation="flash_attention_2") is None
    assert plan(layer_types=["full_attention", "chunked_attention"], sliding_window=None) is None
    assert plan(use_bidirectional_attention=True) is None
    assert plan(is_encoder_decoder=True) is None


def test_progress_estimates_the_whole_pass_from_its_first_timed_part(monkeypatch, capsys):
    """Once ESTIMATE_AFTER_S seconds are timed, the estimate is elapsed / share of padded tokens done, and
    the printed share keeps its digits below 10% (a long suite is timed on well under 1%)."""
    import layerprune.evaluation.fast_lm as fast_lm

    clock = iter([0.0, 4.0, 12.0, 30.0, 60.0])
    monkeypatch.setattr(fast_lm, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # this module only
    progress = fast_lm.Progress(requests=40, contexts=10, work=[2, 2, 996, 1000], quiet=False)
    progress.advance(4)  # 4 s: too early to say
    assert progress.estimate is None
    progress.advance(4)  # 12 s on 4 of 2,000 padded tokens
    assert progress.estimate == (12.0, 12.0 / (4 / 2000))
    assert "about 100.0 min in all (timed on the first 0.2%)" in capsys.readouterr().err
    assert [fast_lm.format_share(f) for f in (0.0031, 0.08, 0.45, 0.999)] == ["0.31%", "8%", "45%", "100%"]


def test_lm_eval_itself_builds_the_fast_scorer_from_its_registered_name(tiny_dir):
    """`model="layerprune-fast"` in lm-eval (simple_evaluate, model_args strings) gives the fast scorer, and
    it scores as stock HFLM does."""
    from lm_eval.api.registry import get_model

    args = f"pretrained={tiny_dir},max_length={MAX_LENGTH},batch_size=2,device=cpu"
    fast = get_model("layerprune-fast").create_from_arg_string(args)
    assert type(fast) is FastHFLM and fast.attention is not None
    stock = get_model("hf").create_from_arg_string(args)
    requests = [Instance("loglikelihood", {}, (c, k), i) for i, (c, k) in
                enumerate([("The cat sat on the ", "mat"), ("The cat sat on the ", " dog, cat and owl")])]
    _assert_same(stock.loglikelihood(requests, disable_tqdm=True), fast.loglikelihood(requests, disable_tqdm=True))
