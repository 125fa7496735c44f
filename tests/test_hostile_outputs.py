"""Inputs are never outputs (docs/safety.md): export's same-as reference GGUF is an input, whatever
--overwrite says and through symbolic links too; `report` rewrites only the folders layerprune made."""

import json
import os

import pytest
from typer.testing import CliRunner

import layerprune.export.gguf as gguf_export
from layerprune import save_model
from layerprune.cli import app
from layerprune.files.outputs import mark_output_dir
from cli_asserts import assert_one_line_error
from gguf_files import write_gguf
from tiny_models import tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture
def model(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    save_model(tiny_model("llama"), tiny_tokenizer(), folder)
    monkeypatch.setattr(gguf_export, "_sentencepiece_path", lambda log: None)
    monkeypatch.setattr(gguf_export, "ensure_converter", lambda log=None: pytest.fail("no conversion may start"))
    return folder


@pytest.mark.parametrize("through_link", [False, True])
def test_export_refuses_to_write_over_its_same_as_reference(model, tmp_path, through_link):
    reference = write_gguf(tmp_path / "ref.gguf", "llama", n_blocks=2)
    before = reference.read_bytes()
    out = reference
    if through_link:
        out = tmp_path / "link.gguf"
        os.symlink(reference, out)
    result = runner.invoke(app, ["export", str(model), "--quant", f"same-as:{reference}", "--out", str(out),
                                 "--overwrite"])
    assert_one_line_error(result, "is the input")
    assert reference.read_bytes() == before
    # the reference named through a link, the output named directly
    link = tmp_path / "ref-link.gguf"
    os.symlink(reference, link)
    result = runner.invoke(app, ["export", str(model), "--quant", f"same-as:{link}", "--out", str(reference),
                                 "--overwrite"])
    assert_one_line_error(result, "is the input")
    assert reference.read_bytes() == before


def users_run_folder(folder, files):
    folder.mkdir()
    (folder / "config.yaml").write_text("model: tiny\n")
    for name, text in files.items():
        (folder / name).write_text(text)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("kind", ["run", "study"])
def test_report_leaves_a_folder_layerprune_did_not_make_as_it_was(tmp_path, kind):
    folder = tmp_path / kind
    if kind == "run":
        before = users_run_folder(folder, {"report.md": "my own notes\n"})
    else:
        folder.mkdir()
        (folder / "study.json").write_text(json.dumps({"settings": []}))
        for name in ("study.md", "study.csv"):
            (folder / name).write_text(f"my own {name}\n")
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = runner.invoke(app, ["report", str(folder)])
    assert_one_line_error(result, "was not made by layerprune")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing rewritten, nothing added


def test_report_rebuilds_a_folder_layerprune_made(tmp_path):
    folder = tmp_path / "run"
    users_run_folder(folder, {"report.md": "an old report\n"})
    mark_output_dir(folder)
    result = runner.invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "report.md").read_text() != "an old report\n"
