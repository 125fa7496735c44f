"""Healing toward the unpruned model: chunked losses, distillation with a cached teacher, training-free
linear replacement, block-local training, and chains of them."""

import copy
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from layerprune import remove_layers, save_model
from layerprune.models.tokens import IGNORE_INDEX
from layerprune.finetune import HealConfig, heal
from layerprune.finetune.local import cuts, fit_cut, fold_linear_map, mlp_output_projection
from layerprune.finetune.losses import chunked_cross_entropy, chunked_distillation
from layerprune.models.logits import causal_lm_parts, labelled_positions
from layerprune.finetune.teacher import teacher_targets
from layerprune.models.anatomy import get_anatomy
from tiny_models import tiny_input, tiny_model, tiny_tokenizer

torch.set_grad_enabled(True)


def rows(n=8, length=16, seed=0):
    ids = tiny_input(batch=n, length=length, seed=seed)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def pruned(model, drop):
    student = copy.deepcopy(model)
    remove_layers(student, drop, how={"chosen_by": "test"})
    return student


def test_chunked_cross_entropy_equals_the_stock_loss():
    model = tiny_model("llama")
    ids = tiny_input(batch=3, length=12)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    stock = model(input_ids=ids, labels=labels).loss
    hidden, targets = labelled_positions(model, ids, torch.ones_like(ids), labels)
    _, head, softcap = causal_lm_parts(model)
    ours = chunked_cross_entropy(head, hidden, targets, softcap=softcap, chunk=5) / len(targets)
    assert torch.allclose(ours, stock, atol=1e-5)


def test_distillation_on_the_full_vocabulary_is_the_exact_kl():
    student, teacher = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ids = tiny_input(batch=2, length=10)
    hidden, targets = labelled_positions(student, ids, torch.ones_like(ids), ids)
    t_hidden, _ = labelled_positions(teacher, ids, torch.ones_like(ids), ids)
    _, head, _ = causal_lm_parts(student)
    _, t_head, _ = causal_lm_parts(teacher)
    ours = chunked_distillation(head, hidden, targets, lambda a, b: (t_head(t_hidden[a:b]), None),
                                temperature=2.0, alpha=1.0, chunk=3)
    s = torch.log_softmax(head(hidden) / 2, -1)
    t = torch.log_softmax(t_head(t_hidden) / 2, -1)
    exact = (t.exp() * (t - s)).sum() * 4
    assert torch.allclose(ours, exact, atol=1e-4)
    assert chunked_distillation(t_head, t_hidden, targets, lambda a, b: (t_head(t_hidden[a:b]), None),
                                temperature=2.0, alpha=1.0).abs() < 1e-4  # zero against itself
    # alpha < 1 (the default 0.5) adds the cross-entropy on the text: alpha KL + (1 - alpha) CE, summed
    mixed = chunked_distillation(head, hidden, targets, lambda a, b: (t_head(t_hidden[a:b]), None),
                                 temperature=2.0, alpha=0.5, chunk=3)
    ce = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    assert torch.allclose(mixed, 0.5 * exact + 0.5 * ce, atol=1e-4)


def test_teacher_top_k_cache_round_trips_exactly(tmp_path):
    teacher = tiny_model("llama")
    data = rows(5)
    first, cached = teacher_targets(teacher, data, 8, pad_id=0, cache_dir=tmp_path, batch_size=2)
    again, hit = teacher_targets(teacher, data, 8, pad_id=0, cache_dir=tmp_path, batch_size=3)
    assert not cached and hit
    assert torch.equal(first.values, again.values) and torch.equal(first.indices, again.indices)
    logits = teacher(input_ids=torch.tensor([data[3]["input_ids"]])).logits[0, :-1]
    values, indices = again.for_rows([3])
    top = logits.topk(8, dim=-1)
    assert torch.allclose(values, top.values, atol=1e-5) and torch.equal(indices.long(), top.indices)
    other, hit = teacher_targets(tiny_model("llama", seed=9), data, 8, pad_id=0, cache_dir=tmp_path)
    assert not hit  # another teacher is another key


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_distillation_moves_the_student_toward_the_teacher(tmp_path, monkeypatch, adapter):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = tiny_model("gemma3_text")  # tied embeddings
    student = pruned(teacher, [1, 2])
    data = rows(8, length=24)
    ids = torch.tensor([r["input_ids"] for r in data])

    def kl():
        with torch.no_grad():
            s = torch.log_softmax(student(input_ids=ids).logits, -1)
            t = torch.log_softmax(teacher(input_ids=ids).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    before = kl()
    config = HealConfig(method="distill", adapter=adapter, max_steps=12, batch_size=4, effective_batch_size=4,
                        learning_rate=2e-3, warmup_steps=0, bf16=False, distill_top_k=16, lora_r=4,
                        distill_alpha=1.0)  # KL only: the CE on random tokens would pull elsewhere
    result = heal(student, data, config, tokenizer=tiny_tokenizer(), teacher=teacher, work_dir=tmp_path / "w")
    student = result.model
    assert result.loss_curve[-1]["loss"] < result.loss_curve[0]["loss"]
    assert kl() < before
    assert result.notes["teacher_targets"]["from_cache"] is False
    if adapter == "lora":  # the output is a stock checkpoint with its embeddings still tied
        save_model(student, None, tmp_path / "out")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert reloaded.get_input_embeddings().weight.data_ptr() == reloaded.get_output_embeddings().weight.data_ptr()
        assert torch.allclose(reloaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)


def test_a_loaded_teacher_is_freed_before_training_once_its_targets_are_cached(tmp_path, monkeypatch):
    """Given a loader, heal holds the teacher only for its top-k pass: the Trainer starts without it."""
    import gc
    import weakref

    import layerprune.finetune.trainer as trainer_module

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    student = pruned(tiny_model("llama"), [1, 2])
    made = []

    def load_teacher():
        teacher = tiny_model("llama")
        made.append(weakref.ref(teacher))
        return teacher

    seen = {}
    train = trainer_module._train

    def spy_train(trainer, checkpoint, work_dir):
        gc.collect()
        seen["teacher alive when training starts"] = made[0]() is not None
        return train(trainer, checkpoint, work_dir)

    monkeypatch.setattr(trainer_module, "_train", spy_train)
    config = HealConfig(method="distill", max_steps=2, batch_size=4, warmup_steps=0, bf16=False, distill_top_k=8)
    result = heal(student, rows(8, length=24), config, tokenizer=tiny_tokenizer(), teacher=load_teacher,
                  work_dir=tmp_path / "w")
    assert len(made) == 1 and seen == {"teacher alive when training starts": False}
    assert result.notes["teacher_targets"]["from_cache"] is False and result.steps == 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_replacement_fold_equals_the_map_applied_by_a_hook(family):
    teacher = tiny_model(family)
    student = pruned(teacher, [2, 3])
    projection, t_map, tokens = fit_cut(student, teacher, 2, 3, rows(6), pad_id=0)
    assert tokens == 6 * 16
    hooked = copy.deepcopy(student)
    hooked_projection = mlp_output_projection(get_anatomy(hooked).layers[1])
    hooked_projection.register_forward_hook(lambda module, args, output: output @ t_map)
    fold_linear_map(projection, t_map)
    ids = tiny_input(batch=2, length=12, seed=5)
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, hooked(input_ids=ids).logits, atol=1e-5)


def test_replacement_recovers_an_exactly_linear_cut():
    """Layer 2 of the teacher is the identity; the student lacks it and its layer 1 MLP output is mixed by a
    random invertible R. The least-squares map is R^-1, and folding it gives back the teacher's logits."""
    teacher = tiny_model("llama")
    block = get_anatomy(teacher).layers[2]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    student = pruned(teacher, [2])
    mixing = torch.eye(32) + 0.3 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    fold_linear_map(mlp_output_projection(get_anatomy(student).layers[1]), mixing)
    ids = tiny_input(batch=2, length=12, seed=7)
    with torch.no_grad():
        assert not torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-3)
    result = heal(student, rows(8), HealConfig(method="replace", batch_size=4), tokenizer=tiny_tokenizer(),
                  teacher=teacher)
    assert result.notes["cuts"] == [{"cut": [2, 2], "into_layer": 1, "tokens": 128}]
    with torch.no_grad():
        assert torch.allclose(result.model(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-4)


def test_replacement_refuses_a_normalised_mlp_output():
    teacher = tiny_model("gemma3_text")
    with pytest.raises(Exception, match="post_feedforward_layernorm"):
        heal(pruned(teacher, [2]), rows(4), HealConfig(method="replace"), tokenizer=tiny_tokenizer(), teacher=teacher)


def test_block_local_changes_only_the_layers_before_each_cut_and_learns():
    teacher = tiny_model("llama")
    student = pruned(teacher, [2, 4])
    assert cuts(student) == [(2, 2), (4, 4)]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = HealConfig(method="block-local", max_steps=30, learning_rate=1e-2, batch_size=4, bf16=False)
    result = heal(student, rows(8), config, tokenizer=tiny_tokenizer(), teacher=teacher)
    changed = {k.split(".")[2] for k, v in result.model.state_dict().items()
               if "layers." in k and not torch.equal(v, before[k])}
    assert changed == {"1", "2"}  # positions of original layers 1 and 3, the layers before the two cuts
    assert all(torch.equal(v, before[k]) for k, v in result.model.state_dict().items() if "layers." not in k)
    per_cut = [c["loss"] for c in result.loss_curve]
    assert per_cut[29] < per_cut[0] and per_cut[-1] < per_cut[30]
    assert [c["trained_layers"] for c in result.notes["cuts"]] == [[1], [3]]


def test_a_heal_chain_records_every_step(tmp_path):
    from layerprune.config import load_run_config
    from layerprune.runs.pipeline import run_pipeline

    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("\n\n".join(f"the {w} sat on the mat." for w in ("cat", "dog", "owl")) * 40)
    text = str(tmp_path / "text.txt")
    config = {"model": str(tmp_path / "tiny"), "out": str(tmp_path / "run"), "prune": {"drop": [2]},
              "heal": [{"method": "replace", "data": text, "max_length": 32, "batch_size": 4},
                       {"method": "distill", "data": text, "max_length": 32, "max_steps": 2, "batch_size": 4,
                        "effective_batch_size": 4, "warmup_steps": 0, "bf16": False}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run_pipeline(load_run_config(tmp_path / "run.yaml"), log=lambda m: None)
    record = json.loads((tmp_path / "run" / "healed-2" / "layerprune.json").read_text())
    assert [h.get("healed") for h in record["history"] if "healed" in h] == ["replace", "distill"]
    assert record["heal"]["method"] == "distill"




def test_init_replace_starts_training_from_the_replaced_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = tiny_model("llama")
    data = rows(8)
    replaced = heal(pruned(teacher, [2]), data, HealConfig(method="replace", batch_size=4), tokenizer=tiny_tokenizer(),
                    teacher=teacher).model
    config = HealConfig(method="distill", init="replace", max_steps=1, batch_size=4, effective_batch_size=4,
                        learning_rate=1e-12, warmup_steps=0, bf16=False)
    result = heal(pruned(teacher, [2]), data, config, tokenizer=tiny_tokenizer(), teacher=teacher,
                  work_dir=tmp_path / "w")
    assert result.notes["init_replace"]["cuts"] == [{"cut": [2, 2], "into_layer": 1, "tokens": 128}]
    ids = tiny_input(batch=2, length=12, seed=3)
    with torch.no_grad():  # a negligible step after the replacement: the replaced model's logits
        assert torch.allclose(result.model(input_ids=ids).logits, replaced(input_ids=ids).logits, atol=1e-4)


def test_max_grad_norm_reaches_the_optimizer(tmp_path):
    """A clip far below the gradient's norm leaves Adam's steps at eps scale; no clipping moves the weights."""
    moved, grad_norms = {}, {}
    for clip in (1e-12, 0.0):
        model = tiny_model("llama")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = HealConfig(method="cpt", max_steps=2, batch_size=4, learning_rate=1e-2, warmup_steps=0, bf16=False,
                            max_grad_norm=clip)
        result = heal(model, rows(8), config, tokenizer=tiny_tokenizer(), work_dir=tmp_path / str(clip))
        after = dict(result.model.named_parameters())
        moved[clip] = max(float((after[n].detach() - before[n]).abs().max()) for n in before)
        grad_norms[clip] = result.loss_curve[0]["grad_norm"]
    assert grad_norms[0.0] > 1e-3  # the gradient was far larger than the clip
    assert moved[0.0] > 1e-3 and moved[1e-12] < 1e-4 * moved[0.0]


def test_a_teacher_given_to_a_method_that_does_not_distill_changes_nothing(tmp_path, monkeypatch):
    """init replace loads the teacher for every method; only `distill` may train toward its logits."""
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = tiny_model("llama")
    config = HealConfig(method="full", max_steps=2, batch_size=4, learning_rate=1e-2, warmup_steps=0, bf16=False)
    weights = []
    for given in (None, teacher):
        result = heal(pruned(teacher, [1]), rows(8), config, tokenizer=tiny_tokenizer(), teacher=given,
                      work_dir=tmp_path / str(given is None))
        weights.append({n: p.detach() for n, p in result.model.named_parameters()})
        assert "teacher_targets" not in result.notes
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)
