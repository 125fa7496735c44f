"""Healing: each method lowers the loss and saves a stock model; partial trains exactly what it says."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune import get_anatomy, remove_layers, save_model
from layerprune.data.instructions import Example, pack, tokenize_examples
from layerprune.models.tokens import IGNORE_INDEX
from layerprune.finetune import HealConfig, heal, trainable_parameters
from layerprune.finetune.methods import Full, HealContext, Lora, Partial, disable_cpu_repacking
from layerprune.finetune.trainer import PadCollator
from tiny_models import tiny_input, tiny_model, tiny_tokenizer

WORDS = ["cat", "dog", "sun", "sky", "red", "big", "owl", "map"]


@pytest.fixture(scope="module")
def rows():
    tokenizer = tiny_tokenizer()
    examples = [Example(f"say {w}", "", f"{w} {w} {w}") for w in WORDS * 2]
    return tokenize_examples(examples, tokenizer, max_length=64)


def fast_config(method, **overrides):
    values = dict(method=method, learning_rate=1e-2, max_steps=8, batch_size=8, effective_batch_size=8,
                  warmup_steps=0, bf16=False, logging_steps=1)
    return HealConfig(**{**values, **overrides})


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("method", ["partial", "lora", "full", "cpt", "distill", "qlora"])
def test_each_method_lowers_the_loss_and_saves_a_stock_model(method, rows, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    model = remove_layers(tiny_model("llama"), [2])
    teacher = tiny_model("llama", seed=7) if method == "distill" else None
    # Low-rank adapters start at zero and the tiny head is frozen for them: give them a larger scale and more steps.
    extra = dict(lora_alpha=64, lora_dropout=0.0, max_steps=12) if method in ("lora", "qlora") else {}
    result = heal(model, rows, fast_config(method, **extra), tokenizer=tiny_tokenizer(), teacher=teacher,
                  work_dir=tmp_path / "work")
    losses = [c["loss"] for c in result.loss_curve]
    assert len(losses) == result.steps and sum(losses[-3:]) / 3 < 0.96 * sum(losses[:2]) / 2, losses
    assert type(result.model).__name__ == "LlamaForCausalLM"
    ids = tiny_input()
    expected = logits(result.model, ids)
    save_model(result.model, None, tmp_path / "healed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
    assert reloaded.config.layerprune["dropped_layers"] == [2]


def test_partial_trains_exactly_lm_head_and_the_chosen_layers():
    model = tiny_model("gemma2")  # tied embeddings
    ids = tiny_input()
    before = logits(model, ids)
    context = HealContext()
    Partial.prepare(model, HealConfig(train_last_layers=2), context)
    anatomy = get_anatomy(model)
    assert context.notes["untied_embeddings"] and not anatomy.tied_embeddings
    torch.testing.assert_close(logits(model, ids), before)
    expected = anatomy.lm_head.weight.numel() + sum(p.numel() for b in list(anatomy.layers)[-2:] for p in b.parameters())
    assert trainable_parameters(model)[0] == expected
    assert not anatomy.embeddings.weight.requires_grad
    assert context.notes["trained_layers"] == [3, 4]


def test_partial_with_explicit_original_layers():
    model = remove_layers(tiny_model("llama"), [0])
    context = HealContext()
    Partial.prepare(model, HealConfig(train_layers=[2], train_lm_head=False), context)
    anatomy = get_anatomy(model)
    assert trainable_parameters(model)[0] == sum(p.numel() for p in anatomy.layers[1].parameters())


def test_partial_prefix_builds_no_autograd_graph(rows):
    model = tiny_model("llama")
    Partial.prepare(model, HealConfig(train_last_layers=1), HealContext())
    seen = []
    get_anatomy(model).layers[0].register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    batch = PadCollator(0)(rows[:2])
    model(**batch).loss.backward()
    assert seen == [False]


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])  # gemma2 ties lm_head to the embeddings, qwen3 does not
def test_lora_finalize_gives_a_stock_model_with_the_peft_logits(family, tmp_path):
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    config = fast_config("lora", lora_dropout=0.0)
    original = tiny_model(family)
    tied = get_anatomy(original).tied_embeddings
    assert tied == (family == "gemma2")
    ids = tiny_input()
    base_logits = logits(original, ids)
    peft_model = Lora.prepare(original, config, HealContext())
    assert isinstance(peft_model, PeftModel)
    with torch.no_grad():  # trained-looking adapters: lora_B starts at zero, which would make merging a no-op
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.eval()
    expected = logits(peft_model, ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3), "the adapters must change the output"

    finalized = Lora.finalize(peft_model, config, HealContext())
    assert type(finalized) is type(tiny_model(family)) and type(finalized).__module__.startswith("transformers.models.")
    assert not isinstance(finalized, PeftModel)
    assert not [n for n, m in finalized.named_modules() if isinstance(m, BaseTunerLayer)]
    assert not [n for n, _ in finalized.named_parameters() if "lora_" in n or "base_layer" in n]
    assert {p.dtype for p in finalized.parameters()} == {torch.float32}
    merged_logits = logits(finalized, ids)
    torch.testing.assert_close(merged_logits, expected, rtol=0, atol=1e-5)
    assert get_anatomy(finalized).tied_embeddings == tied
    assert all(p.requires_grad for p in finalized.parameters()), "a later stage may train any weight"

    save_model(finalized, None, tmp_path / "merged")
    assert not list((tmp_path / "merged").glob("adapter_*")), "a merged model is saved without adapter files"
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora_" in k or "base_layer" in k], keys
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded) is type(finalized)
    assert get_anatomy(reloaded).tied_embeddings == tied and reloaded.config.tie_word_embeddings == tied
    assert torch.equal(logits(reloaded, ids), merged_logits), "save and reload must not change the weights"


def test_qlora_gradients_are_unchanged_by_an_eval_forward(rows, tmp_path):
    pytest.importorskip("bitsandbytes")
    from layerprune.finetune.methods import QLora

    batch = PadCollator(0)(rows[:4])

    def lora_grads(eval_first):
        torch.manual_seed(0)
        model = QLora.prepare(tiny_model("llama", hidden_size=64, intermediate_size=128),
                              fast_config("qlora", bf16=False), HealContext())
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    clean, after_eval = lora_grads(False), lora_grads(True)
    assert clean.keys() == after_eval.keys() and clean
    for name in clean:
        torch.testing.assert_close(after_eval[name], clean[name], rtol=1e-4, atol=1e-6)


def test_disable_cpu_repacking_touches_every_4bit_layer():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = torch.nn.Sequential(bnb.nn.Linear4bit(8, 8), bnb.nn.Linear4bit(8, 8))
    assert disable_cpu_repacking(model) == 2
    assert all(m.support_avx512bf16_for_cpu is False for m in model)


def test_labels_mask_the_prompt():
    tokenizer = tiny_tokenizer()
    [row] = tokenize_examples([Example("add", "1 and 2", "3")], tokenizer, max_length=128)
    labelled = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "3<|im_end|>\n"
    prompt = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX])
    assert prompt == "<|im_start|>user\nadd\n\n1 and 2<|im_end|>\n<|im_start|>assistant\n"


def test_alpaca_template_masks_the_prompt_and_ends_with_eos():
    tokenizer = tiny_tokenizer(chat_template=False)
    [row] = tokenize_examples([Example("add", "", "3")], tokenizer, max_length=512)
    labelled = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "3</s>"
    assert "### Response:\n" in tokenizer.decode(row["input_ids"])


def test_examples_without_room_for_a_response_are_dropped():
    tokenizer = tiny_tokenizer()
    rows = tokenize_examples([Example("x" * 50, "", "y"), Example("a", "", "b")], tokenizer, max_length=40)
    assert len(rows) == 1


def _example(first_id: int, prompt: int, response: int) -> dict:
    """A tokenized example with distinct ids: `prompt` masked tokens, then `response` labelled ones."""
    ids = list(range(first_id, first_id + prompt + response))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def test_packing_concatenates_whole_examples_in_order():
    a, b, c, d = _example(100, 2, 3), _example(200, 1, 3), _example(300, 4, 2), _example(400, 0, 2)  # 5, 4, 6, 2
    before = copy.deepcopy([a, b, c, d])
    packed = pack([a, b, c, d], max_length=10)
    # Greedy: a+b (9) fits, +c would be 15; c+d (8) fits.
    assert packed == [
        {"input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"]},
        {"input_ids": c["input_ids"] + d["input_ids"], "labels": c["labels"] + d["labels"]},
    ]
    assert packed[0]["labels"][:2] == [IGNORE_INDEX] * 2 and packed[0]["labels"][5] == IGNORE_INDEX  # b's prompt
    assert [a, b, c, d] == before, "packing must not change its input rows"
    # An example longer than a block stays whole in a block of its own: nothing is cut away.
    long = _example(500, 3, 9)
    assert pack([a, long, d], max_length=10) == [a, long, d]


def test_packing_tokenized_examples_keeps_every_token_and_label():
    examples = [Example(f"say {w}", "", " ".join([w] * (1 + i % 3))) for i, w in enumerate(WORDS)]
    rows = tokenize_examples(examples, tiny_tokenizer(), max_length=64)
    assert len({len(r["input_ids"]) for r in rows}) == 3, "examples of several lengths"
    assert all(r["labels"][0] == IGNORE_INDEX and r["labels"][-1] != IGNORE_INDEX for r in rows), "masked prompts"
    max_length = 2 * max(len(r["input_ids"]) for r in rows)
    packed = pack(rows, max_length)
    assert 1 < len(packed) < len(rows)
    # Each block is a run of whole examples, in order: cut the blocks at the example boundaries.
    remaining = list(rows)
    for block in packed:
        assert set(block) == {"input_ids", "labels"} and len(block["input_ids"]) == len(block["labels"])
        assert len(block["input_ids"]) <= max_length
        taken = []
        while remaining and len(sum((r["input_ids"] for r in taken), [])) < len(block["input_ids"]):
            taken.append(remaining.pop(0))
        assert block["input_ids"] == sum((r["input_ids"] for r in taken), [])
        assert block["labels"] == sum((r["labels"] for r in taken), [])
        if remaining:  # greedy: the next example did not fit in this block
            assert len(block["input_ids"]) + len(remaining[0]["input_ids"]) > max_length
    assert remaining == []


def test_bad_heal_configs_are_refused():
    with pytest.raises(ValueError):
        HealConfig(method="magic")
    with pytest.raises(ValueError):
        HealConfig(learning_rate=-1)
    with pytest.raises(ValueError):
        HealConfig(lora_rank=8)  # typo: extra fields are forbidden


@pytest.mark.parametrize("text,method", [("wikitext2", "cpt"), ("ptb", "cpt"), ("c4-heldout", "cpt"),
                                         ("dolly-heldout", "lora"), ("dolly-heldout", "distill")])
def test_healing_refuses_the_bundled_evaluation_test_sets(text, method):
    from layerprune import LayerpruneError
    from layerprune.finetune.stage import prepare_training_rows

    with pytest.raises(LayerpruneError, match="TEST data"):
        prepare_training_rows(HealConfig(method=method, data=text, max_length=32), tiny_tokenizer())
    rows, info = prepare_training_rows(HealConfig(method="cpt", data="c4", max_length=32, max_samples=2),
                                       tiny_tokenizer())
    assert len(rows) == 2 and info["source"] == "c4"


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2 ties lm_head to the embeddings
def test_freeze_prefix_trains_only_from_the_layer_before_the_first_cut(family, rows, tmp_path):
    model = remove_layers(tiny_model(family), [2, 3])  # kept original layers 0, 1, 4, ...
    before = copy.deepcopy(model)
    teacher = tiny_model(family)
    config = fast_config("distill", freeze="prefix", distill_hidden=1.0)
    result = heal(model, rows, config, tokenizer=tiny_tokenizer(), teacher=teacher, work_dir=tmp_path / "work")
    losses = [c["loss"] for c in result.loss_curve]
    assert sum(losses[-3:]) / 3 < 0.96 * sum(losses[:2]) / 2, losses
    assert result.notes["frozen"] == ["embeddings", "layers [0]"]
    old, new = get_anatomy(before), get_anatomy(result.model)
    torch.testing.assert_close(new.embeddings.weight, old.embeddings.weight, rtol=0, atol=0)
    torch.testing.assert_close(new.layers[0].state_dict(), old.layers[0].state_dict(), rtol=0, atol=0)
    for pos in range(1, len(new.layers)):  # the layer that feeds the cut and every one after it trained
        changed = [not torch.equal(p, q) for p, q in zip(new.layers[pos].parameters(), old.layers[pos].parameters())]
        assert any(changed), pos
    assert trainable_parameters(result.model)[0] == trainable_parameters(before)[1]  # all trainable again


def test_freeze_embeddings_keeps_the_tied_head_and_backpropagates_no_further_than_the_layers():
    model = remove_layers(tiny_model("gemma2"), [2])
    context = HealContext()
    Full.prepare(model, HealConfig(method="distill", freeze="embeddings"), context)
    anatomy = get_anatomy(model)
    assert anatomy.tied_embeddings and not anatomy.embeddings.weight.requires_grad
    assert context.notes["frozen"] == ["embeddings"]
    assert all(p.requires_grad for p in anatomy.layers.parameters())


def test_freeze_prefix_builds_no_autograd_graph_before_the_cut(rows):
    model = remove_layers(tiny_model("llama"), [3])  # first cut at position 3: layers 0-1 frozen, 2 trains
    Full.prepare(model, HealConfig(method="distill", freeze="prefix"), HealContext())
    seen = []
    for layer in get_anatomy(model).layers:
        layer.register_forward_hook(lambda m, a, out: seen.append(out[0].requires_grad if isinstance(out, tuple)
                                                                   else out.requires_grad))
    model(**PadCollator(0)(rows[:2])).loss.backward()
    assert seen[:3] == [False, False, True]


@pytest.mark.parametrize("remove", ["attention", "mlp"])
def test_freeze_prefix_counts_a_removed_attention_or_mlp_as_the_first_cut(remove):
    """An attention (or MLP) removed at original layer 2 changes layer 2's output: layers from 1 on train,
    even when the first whole-layer cut comes later (at 4)."""
    from layerprune.models.sublayer import remove_attention, remove_mlp

    model = (remove_attention if remove == "attention" else remove_mlp)(remove_layers(tiny_model("llama"), [4]), [2])
    context = HealContext()
    Full.prepare(model, HealConfig(method="distill", freeze="prefix"), context)
    assert context.notes["frozen"] == ["embeddings", "layers [0]"]
    layers = get_anatomy(model).layers
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())


def test_freeze_is_refused_where_it_does_not_apply():
    for bad in (dict(method="lora", freeze="prefix"), dict(method="distill", adapter="lora", freeze="embeddings"),
                dict(method="distill", freeze="head")):
        with pytest.raises(ValueError):
            HealConfig(**bad)
