"""distill_hidden: the student's state before each cut toward the teacher's state after it."""

import copy

import pytest
import torch

from layerprune import remove_layers
from layerprune.finetune import HealConfig, heal
from layerprune.finetune.hidden_states import cut_pairs, relative_state_error
from layerprune.finetune.teacher import compute_teacher_targets
from tiny_models import tiny_input, tiny_model, tiny_tokenizer

torch.set_grad_enabled(True)


def rows(n=8, length=24, seed=0):
    ids = tiny_input(batch=n, length=length, seed=seed)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def test_the_state_loss_is_on_for_distillation_only():
    assert HealConfig().hidden_weight == 1.0  # the default recipe (docs/results.md)
    assert HealConfig(method="lora").hidden_weight == 0.0 and HealConfig(distill_top_k=None).hidden_weight == 0.0
    with pytest.raises(ValueError, match="distill_hidden needs method distill"):
        HealConfig(method="lora", distill_hidden=1.0)


def test_cut_pairs_name_the_kept_layer_before_each_cut_and_the_cuts_last_layer():
    assert cut_pairs([2, 3, 7], [0, 1, 4, 5, 6, 8, 9]) == [(1, 3), (4, 7)]
    assert cut_pairs([0, 1, 5], [2, 3, 4, 6]) == [(2, 5)]  # a cut at the start has no student state before it
    assert cut_pairs([], [0, 1]) == []


def test_relative_state_error_equals_a_hand_computation():
    teacher = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # 1 position, 2 cuts
    student = torch.tensor([[[3.0, 3.0], [0.0, 0.0]]])
    assert float(relative_state_error(student, teacher)) == pytest.approx((1 / 25 + 1 / 1) / 2)


def test_the_teacher_pass_keeps_the_states_after_the_cut_at_the_labelled_positions():
    teacher = tiny_model("llama").eval()
    data = rows(3, length=10)
    data[0]["labels"][:4] = [-100] * 4
    *_, offsets, states = compute_teacher_targets(teacher, data, 4, pad_id=0, batch_size=2, state_layers=[1, 3])
    assert states.shape == (int(offsets[-1]), 2, 32) and states.dtype == torch.bfloat16
    with torch.no_grad():
        hidden = teacher(input_ids=torch.tensor([data[0]["input_ids"]]), output_hidden_states=True).hidden_states
    keep = torch.tensor(data[0]["labels"][1:]) != -100  # positions that predict a label
    for column, layer in enumerate([1, 3]):
        expected = hidden[layer + 1][0, :-1][keep]  # hidden_states[i + 1] is layer i's output
        assert torch.allclose(states[:int(offsets[1]), column].float(), expected, atol=2e-2, rtol=1e-2)


def test_the_state_loss_adds_its_weighted_error_and_pulls_the_student_toward_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = tiny_model("llama")
    student = remove_layers(copy.deepcopy(teacher), [2, 3], how={"chosen_by": "test"})
    data = rows(8)
    settings = dict(method="distill", max_steps=6, batch_size=8, warmup_steps=0, bf16=False, distill_top_k=8,
                    learning_rate=1e-2, logging_steps=1)
    plain = heal(copy.deepcopy(student), data, HealConfig(**settings, distill_hidden=0.0), tokenizer=tiny_tokenizer(), teacher=teacher,
                 work_dir=tmp_path / "a")
    with_states = heal(copy.deepcopy(student), data, HealConfig(**settings, distill_hidden=2.0),
                       tokenizer=tiny_tokenizer(), teacher=teacher, work_dir=tmp_path / "b")
    assert with_states.notes["hidden_states"]["student_teacher_layers"] == [(1, 3)]

    def state_error(model):  # the mean relative error at the cut over the labelled positions, by hand
        with torch.no_grad():
            ids = torch.tensor([r["input_ids"] for r in data])
            s = model(input_ids=ids, output_hidden_states=True).hidden_states[2][:, :-1]  # student layer 1 out
            t = teacher(input_ids=ids, output_hidden_states=True).hidden_states[4][:, :-1]  # teacher layer 3 out
        return float(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1)).mean())

    before = state_error(student)
    first = with_states.loss_curve[0]["loss"] - plain.loss_curve[0]["loss"]  # the same first batch and weights
    assert first == pytest.approx(2.0 * before, rel=2e-2)  # teacher states are cached in bf16
    # logits-only training moves the state at the cut anywhere (here: 4x further off); the state loss pulls it in
    assert state_error(with_states.model) < before < state_error(plain.model)
    ours = [hook for layer in with_states.model.model.layers for hook in layer._forward_hooks.values()
            if "StateRecorder" in hook.__qualname__]
    assert not ours  # the healed model carries no hooks of the state loss
