"""Healing that cannot lie: divergence stops with one line and saves nothing, the teacher cache is keyed by
the teacher's real content and survives damaged files, --resume only continues under the same settings,
bad healing data and a full disk are one line each (docs/safety.md)."""

import errno
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from layerprune import LayerpruneError, save_model
from layerprune.cli import app
from layerprune.finetune.teacher import teacher_targets
from layerprune.models.fingerprint import teacher_fingerprint
from layerprune.models.loading import load_model
from cli_asserts import assert_one_line_error
from test_pipeline import make_workspace
from tiny_models import tiny_input, tiny_model, tiny_tokenizer

runner = CliRunner()
HEAL = ["--method", "partial", "--batch-size", "2", "--max-length", "32", "--no-bf16", "--train-last-layers", "1",
        "--warmup-steps", "0"]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    return make_workspace(tmp_path)


def finetune(workspace, *args, data=None):
    return runner.invoke(app, ["finetune", str(workspace / "tiny"), "--out", str(workspace / "healed"), "--data",
                               str(data or workspace / "sft.jsonl"), *map(str, args)])


def assert_ends_in_one_error(result, fragment):
    """An error mid-training: after the progress bars (stderr), one `error:` line and exit code 1."""
    assert result.exit_code == 1, result.output
    last = result.stderr.rstrip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("error:") and result.stderr.count("error:") == 1, result.stderr
    assert fragment in last, result.stderr
    assert "Traceback" not in result.output


def rows(n=6, length=12):
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in tiny_input(batch=n, length=length)]


# ------------------------------------------------------------------ divergence
def test_a_diverging_heal_stops_with_one_line_and_saves_nothing(workspace):
    result = finetune(workspace, *HEAL, "--max-steps", "4", "--learning-rate", "1e30", "--max-grad-norm", "0")
    assert_ends_in_one_error(result, "healing diverged")
    assert "at step" in result.stderr and "lower the learning rate" in result.stderr
    assert not (workspace / "healed").exists()


def test_non_finite_weights_are_never_saved(workspace):
    from layerprune.finetune.stage import write_healed
    from layerprune.finetune.trainer import HealResult

    model = tiny_model("llama")
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    result = HealResult(model=model, method="partial", trainable_params=1, total_params=1, steps=1, tokens_seen=1,
                        seconds=0.0, final_loss=0.0)
    with pytest.raises(LayerpruneError, match="non-finite weights"):
        write_healed(result, {}, tiny_tokenizer(), workspace / "healed")
    assert not (workspace / "healed").exists()


# ------------------------------------------------------------------ the teacher cache
def swap_two_deep_values(folder):
    """Change the weights without changing any tensor's sum or its first 16 values (the old key)."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    name = next(n for n, t in tensors.items() if t.numel() > 64 and t.reshape(-1)[40] != t.reshape(-1)[50])
    flat = tensors[name].reshape(-1)
    flat[40], flat[50] = flat[50].clone(), flat[40].clone()
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_teacher_changed_at_the_same_path_misses_the_cache(tmp_path):
    folder = tmp_path / "teacher"
    save_model(tiny_model("llama"), tiny_tokenizer(), folder)
    before = teacher_fingerprint(load_model(str(folder)).model, tmp_path / "cache")
    assert teacher_fingerprint(load_model(str(folder)).model, tmp_path / "cache") == before  # stable
    swap_two_deep_values(folder)
    assert teacher_fingerprint(load_model(str(folder)).model, tmp_path / "cache") != before


def test_an_in_memory_teacher_is_keyed_by_every_value(tmp_path):
    teacher = tiny_model("llama")
    before = teacher_fingerprint(teacher, tmp_path)
    with torch.no_grad():
        weight = teacher.model.layers[0].mlp.up_proj.weight.reshape(-1)
        weight[40], weight[50] = weight[50].clone(), weight[40].clone()
    assert teacher_fingerprint(teacher, tmp_path) != before


def damage(path, how):
    data = path.read_bytes()
    tensors = load_file(path)
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00\xff" * 100)
    elif how == "short offsets":
        save_file({**tensors, "offsets": tensors["offsets"][:3]}, path)
    elif how == "indices outside the vocabulary":
        save_file({**tensors, "indices": tensors["indices"] + 10_000}, path)
    elif how == "nan values":
        save_file({**tensors, "values": tensors["values"] * float("nan")}, path)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "short offsets", "indices outside the vocabulary",
                                 "nan values"])
def test_a_damaged_teacher_cache_is_removed_and_made_again(tmp_path, how):
    teacher, data = tiny_model("llama"), rows()
    first, _ = teacher_targets(teacher, data, 8, pad_id=0, cache_dir=tmp_path)
    damage(tmp_path / first.key["file"].rsplit("/", 1)[1], how)
    with pytest.warns(UserWarning, match="damaged"):
        again, hit = teacher_targets(teacher, data, 8, pad_id=0, cache_dir=tmp_path)
    assert not hit
    assert torch.equal(again.values, first.values) and torch.equal(again.indices, first.indices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third, hit = teacher_targets(teacher, data, 8, pad_id=0, cache_dir=tmp_path)  # whole again: a hit
    assert hit and torch.equal(third.values, first.values)


def test_a_full_disk_while_writing_the_teacher_cache_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    teacher = tiny_model("llama")  # before the patch: transformers binds save_file when it is first imported

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(LayerpruneError, match="no space left on the disk"):
        teacher_targets(teacher, rows(), 8, pad_id=0, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if "teacher-top" in p.name] == []

    def full_in_its_own_words(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                           "left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full_in_its_own_words)
    with pytest.raises(LayerpruneError, match="no space left on the disk"):
        teacher_targets(teacher, rows(), 8, pad_id=0, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if "teacher-top" in p.name] == []


def test_a_teacher_with_another_vocabulary_is_one_line(workspace):
    save_model(tiny_model("llama", vocab_size=300), None, workspace / "other")
    result = finetune(workspace, *[a if a != "partial" else "distill" for a in HEAL], "--max-steps", "1",
                      "--teacher", workspace / "other")
    assert_one_line_error(result, "vocabulary")


# ------------------------------------------------------------------ resume
def interrupted_heal(workspace, monkeypatch, lr="1e-3"):
    """A finetune killed after two checkpoints (save every step), as a crash or Ctrl-C would leave it."""
    step = torch.optim.AdamW.step
    calls = []

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", failing_step)
        result = finetune(workspace, *HEAL, "--max-steps", "4", "--save-steps", "1", "--learning-rate", lr)
    assert isinstance(result.exception, RuntimeError)
    assert any((workspace / "healed.checkpoints").glob("checkpoint-*"))


def test_resume_with_changed_settings_is_refused_and_names_them(workspace, monkeypatch):
    interrupted_heal(workspace, monkeypatch)
    result = finetune(workspace, *HEAL, "--max-steps", "4", "--save-steps", "1", "--learning-rate", "5e-3",
                      "--resume")
    assert_one_line_error(result, "learning_rate: 0.001 -> 0.005")
    assert any((workspace / "healed.checkpoints").glob("checkpoint-*"))  # kept for a resume under its settings
    assert not (workspace / "healed").exists()


def test_resume_with_the_same_settings_continues_and_cleans_up(workspace, monkeypatch):
    interrupted_heal(workspace, monkeypatch)
    steps = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    result = finetune(workspace, *HEAL, "--max-steps", "4", "--save-steps", "1", "--learning-rate", "1e-3",
                      "--resume")
    assert result.exit_code == 0, result.output
    assert len(steps) == 2  # steps 3 and 4: the first two came from the checkpoint
    assert json.loads((workspace / "healed" / "heal.json").read_text())["config"]["learning_rate"] == 1e-3
    assert not (workspace / "healed.checkpoints").exists()


# ------------------------------------------------------------------ bad healing data
@pytest.mark.parametrize("record, fragment", [
    ({"instruction": "say hi", "context": "", "response": None}, "field 'response' is null"),
    ({"instruction": 5, "context": "", "response": "hi"}, "field 'instruction' is int"),
    ({"instruction": "say hi", "context": ["a"], "response": "hi"}, "field 'context' is list"),
])
def test_instruction_records_that_are_not_text_are_one_line(workspace, record, fragment):
    data = workspace / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "a", "context": "", "response": "b"}) + "\n" + json.dumps(record) + "\n")
    result = finetune(workspace, *HEAL, "--max-steps", "1", data=data)
    assert_one_line_error(result, fragment)
    assert "record 2" in result.stderr


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 50_000 + "1" + "}" * 50_000])
def test_deeply_nested_json_is_one_line(workspace, text):
    data = workspace / "deep.jsonl"
    data.write_text(text + "\n")
    result = finetune(workspace, *HEAL, "--max-steps", "1", data=data)
    assert_one_line_error(result, "deep.jsonl")


# ------------------------------------------------------------------ a full disk
def test_a_full_disk_during_a_checkpoint_is_one_line_and_removes_that_checkpoint(workspace, monkeypatch):
    save = torch.save

    def full(obj, f, *args, **kwargs):
        if "optimizer" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    result = finetune(workspace, *HEAL, "--max-steps", "2", "--save-steps", "1")
    assert_ends_in_one_error(result, "no space left on the disk")
    assert "MB free" in result.stderr
    assert list((workspace / "healed.checkpoints").glob("checkpoint-*")) == []
    assert not (workspace / "healed").exists()


def test_a_full_disk_while_saving_the_healed_model_is_one_line_and_leaves_nothing(workspace, monkeypatch):
    import layerprune.finetune.stage

    def full(model, tokenizer, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                           "left on device\" })")

    monkeypatch.setattr(layerprune.finetune.stage, "write_model_files", full)
    result = finetune(workspace, *HEAL, "--max-steps", "1")
    assert_ends_in_one_error(result, "no space left on the disk")
    assert not (workspace / "healed").exists()
    assert [p.name for p in workspace.iterdir() if "layerprune-tmp" in p.name] == []
