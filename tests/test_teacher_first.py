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
import layerprune.finetune.placement as placement
import layerprune.finetune.teacher_first as teacher_first
import layerprune.models.memory_policy as memory_policy
from layerprune import remove_layers, save_model
from layerprune.finetune import HealConfig, heal
from layerprune.finetune.teacher import compute_teacher_targets, streamed_teacher_targets
from layerprune.finetune.placement import teacher_loader
from layerprune.finetune.teacher_first import targets_before_student
from layerprune.hardware import compute
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
    return {**dict(method="distill", teacher=str(folders / "teacher"), data=str(folders / "text.txt"), max_length=24,
                   max_steps=2, batch_size=4, effective_batch_size=4, warmup_steps=0, bf16=False, distill_top_k=8),
            **extra}


def spy_loads(monkeypatch, dtypes=None):
    """Every load_model call of the API: which folder, and which earlier loaded models were still alive (and,
    into `dtypes`, the dtype each was asked in)."""
    events, made = [], []
    load = api.load_model

    def spy(ref, **kwargs):
        gc.collect()
        if dtypes is not None:
            dtypes.append(kwargs.get("dtype"))
        events.append((str(ref).rsplit("/", 1)[-1], [name for name, alive in made if alive() is not None]))
        loaded = load(ref, **kwargs)
        made.append((str(ref).rsplit("/", 1)[-1], weakref.ref(loaded.model)))
        return loaded

    monkeypatch.setattr(api, "load_model", spy)  # the student
    monkeypatch.setattr(placement, "load_model", spy)  # the teacher
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


@pytest.fixture
def bf16_folders(tmp_path, monkeypatch):
    """folders() stored in bf16; `native(bool)` sets whether this CPU counts as computing bf16 natively."""
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = tiny_model("llama").to(torch.bfloat16)
    save_model(teacher, tiny_tokenizer(), tmp_path / "teacher")
    student = copy.deepcopy(teacher)
    remove_layers(student, [1, 2], how={"chosen_by": "test"})
    save_model(student, tiny_tokenizer(), tmp_path / "student")
    (tmp_path / "text.txt").write_text(CORPUS * 4)

    def native(value: bool):
        monkeypatch.setattr(compute, "cpu_bf16_support", lambda: (value, "monkeypatched"))
        return tmp_path

    return native


@pytest.mark.parametrize("is_native", [True, False])
def test_the_teacher_pass_holds_a_bf16_teacher_in_bf16_where_native_and_frees_it_before_the_student(
        bf16_folders, monkeypatch, is_native):
    folders = bf16_folders(is_native)
    dtypes = []
    events = spy_loads(monkeypatch, dtypes)
    result, out = api.finetune_model(str(folders / "student"), out=str(folders / "healed"),
                                     **heal_settings(folders, bf16="auto"))
    assert events == [("teacher", []), ("student", [])]  # nothing was alive when the student loaded
    assert dtypes[0] == (torch.bfloat16 if is_native else torch.float32)  # fp32 where bf16 is emulated
    assert dtypes[1] == "fp32"  # the student trains every weight: fp32 master weights
    notes = json.loads((out / "heal.json").read_text())["notes"]
    assert notes["teacher_targets"]["before_student"] is True and result.steps == 2
    assert notes["compute"]["dtype"] == ("bf16" if is_native else "fp32")


@pytest.mark.parametrize("is_native", [True, False])
def test_a_16bit_teacher_gives_the_targets_of_an_fp32_one(bf16_folders, monkeypatch, is_native):
    """The targets of the teacher held in bf16 against the same teacher loaded in fp32 (the path before), both
    under the same autocast: the top-k values within 1e-2 (logits of about 0.3 here: bf16's rounding, not
    another model), the same first choice at nearly every position; identical where the 16-bit path does not
    apply (bf16 emulated: both fp32)."""
    folders = bf16_folders(is_native)
    config = HealConfig(**heal_settings(folders, bf16="auto"))
    data = rows(8)
    held = []

    def loader(frozen):
        load = teacher_loader(128, str(folders / "teacher"), config, frozen=frozen)

        def load_and_note():
            model = load()
            held.append(next(model.parameters()).dtype)
            return model
        return load_and_note

    sixteen, notes = targets_before_student(data, config, loader(True), pad_id=0, log=lambda line: None)
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(folders / "another-cache"))  # computed again, not read back
    fp32, again = targets_before_student(data, config, loader(False), pad_id=0, log=lambda line: None)
    assert not notes["from_cache"] and not again["from_cache"]
    assert held == ([torch.bfloat16, torch.float32] if is_native else [torch.float32, torch.float32])
    assert torch.equal(sixteen.offsets, fp32.offsets)
    if is_native:
        assert torch.allclose(sixteen.values, fp32.values, rtol=2e-2, atol=1e-2)
        assert (sixteen.indices[:, 0] == fp32.indices[:, 0]).float().mean() > 0.9
        assert not torch.equal(sixteen.values, fp32.values)  # the 16-bit path did run
    else:
        assert torch.equal(sixteen.values, fp32.values) and torch.equal(sixteen.indices, fp32.indices)
