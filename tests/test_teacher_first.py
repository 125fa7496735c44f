"""Distillation's teacher pass before the student loads: the teacher alone in memory (or read layer by
layer from disk), freed before the student's load; the same targets and the same training as the usual
order."""

import copy
import gc
import json
import weakref

import pytest
import torch

import layerprune.api as api
import layerprune.finetune.stage as heal_stage
import layerprune.finetune.teacher_first as teacher_first
import layerprune.models.memory_policy as memory_policy
from layerprune import remove_layers, save_model
from layerprune.finetune import HealConfig, heal
from layerprune.finetune.teacher import compute_teacher_targets, streamed_teacher_targets
from layerprune.finetune.teacher_first import targets_before_student
from tiny_models import CORPUS, tiny_input, tiny_model, tiny_tokenizer

torch.set_grad_enabled(True)


def rows(n=8, length=24, seed=0):
    ids = tiny_input(batch=n, length=length, seed=seed)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """A tiny llama teacher and its copy without layers 1 and 2, saved with a tokenizer; a text file."""
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = tiny_model("llama")
    save_model(teacher, tiny_tokenizer(), tmp_path / "teacher")
    student = copy.deepcopy(teacher)
    remove_layers(student, [1, 2], how={"chosen_by": "test"})
    save_model(student, tiny_tokenizer(), tmp_path / "student")
    (tmp_path / "text.txt").write_text(CORPUS * 4)
    return tmp_path


def heal_settings(folders, **extra):
    return dict(method="distill", teacher=str(folders / "teacher"), data=str(folders / "text.txt"), max_length=24,
                max_steps=2, batch_size=4, effective_batch_size=4, warmup_steps=0, bf16=False, distill_top_k=8,
                **extra)


def spy_loads(monkeypatch):
    """Every load_model call of the API: which folder, and which earlier loaded models were still alive."""
    events, made = [], []
    load = api.load_model

    def spy(ref, **kwargs):
        gc.collect()
        events.append((str(ref).rsplit("/", 1)[-1], [name for name, alive in made if alive() is not None]))
        loaded = load(ref, **kwargs)
        made.append((str(ref).rsplit("/", 1)[-1], weakref.ref(loaded.model)))
        return loaded

    monkeypatch.setattr(api, "load_model", spy)  # the student
    monkeypatch.setattr(heal_stage, "load_model", spy)  # the teacher
    return events


def test_the_student_loads_after_the_teacher_is_gone(folders, monkeypatch):
    events = spy_loads(monkeypatch)
    result, out = api.finetune_model(str(folders / "student"), out=str(folders / "healed"),
                                     **heal_settings(folders))
    assert events == [("teacher", []), ("student", [])]  # nothing was alive when the student loaded
    notes = json.loads((out / "heal.json").read_text())["notes"]["teacher_targets"]
    assert notes["before_student"] is True and notes["streamed"] is False and result.steps == 2


def test_with_a_time_budget_and_room_for_both_the_student_is_timed_first(folders, monkeypatch):
    events = spy_loads(monkeypatch)
    result, _ = api.finetune_model(str(folders / "student"), out=str(folders / "healed"),
                                   **heal_settings(folders, max_minutes=5))
    assert [name for name, _ in events] == ["student", "teacher"]  # only the rows the fitted steps use
    assert "before_student" not in result.notes["teacher_targets"]


def test_a_teacher_bigger_than_memory_is_read_layer_by_layer(folders, monkeypatch):
    events = spy_loads(monkeypatch)
    size = memory_policy.checkpoint_bytes(folders / "teacher")
    monkeypatch.setattr(teacher_first, "available_memory_bytes", lambda: int(size * 1.1))  # neither fits beside
    result, _ = api.finetune_model(str(folders / "student"), out=str(folders / "healed"),
                                   **heal_settings(folders, max_minutes=5))
    assert [name for name, _ in events] == ["student"]  # the teacher was never loaded whole
    notes = result.notes["teacher_targets"]
    assert notes["before_student"] is True and notes["streamed"] is True and result.steps == 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_streamed_teacher_targets_equal_the_loaded_teachers(family, tmp_path):
    teacher = tiny_model(family)
    teacher.save_pretrained(tmp_path, max_shard_size="20KB")  # many shards: layers are read one by one
    data = rows(6, length=20)
    data[1]["labels"][:5] = [-100] * 5  # a prompt: no targets there
    values, indices, offsets = compute_teacher_targets(teacher.eval(), data, 8, pad_id=0, batch_size=4)
    s_values, s_indices, s_offsets = streamed_teacher_targets(tmp_path, data, 8, pad_id=0, batch_size=4)
    assert torch.equal(offsets, s_offsets) and int(offsets[-1]) == 6 * 19 - 4  # labels 1-4 are the prompt's
    assert torch.allclose(values, s_values, atol=1e-5)
    assert torch.equal(indices, s_indices)


def test_targets_made_first_train_exactly_as_the_usual_order(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    remove_layers(student, [1, 2], how={"chosen_by": "test"})
    data = rows(12)
    config = HealConfig(method="distill", max_steps=2, batch_size=4, warmup_steps=0, bf16=False, distill_top_k=8)
    usual = heal(copy.deepcopy(student), data, config, tokenizer=tiny_tokenizer(), teacher=teacher,
                 work_dir=tmp_path / "a")
    from layerprune.finetune.hidden_states import cut_pairs
    from layerprune.models.surgery import provenance

    record = provenance(student)
    pairs = cut_pairs(record["dropped_layers"], record["kept_layers"])  # the default hidden-state loss needs them
    targets = targets_before_student(data, config, lambda: teacher, pad_id=0, log=lambda line: None,
                                     state_layers=[t for _, t in pairs])
    assert targets[0].states is not None and pairs == [(0, 2)]
    assert len(targets[0].offsets) - 1 == 8  # 2 steps x 4 rows: only the rows training reads
    first = heal(copy.deepcopy(student), data, config, tokenizer=tiny_tokenizer(), targets=targets,
                 work_dir=tmp_path / "b")
    assert [c["loss"] for c in first.loss_curve] == pytest.approx([c["loss"] for c in usual.loss_curve], abs=1e-6)
    assert first.notes["teacher_targets"]["from_cache"] is True  # the usual order made the same file
