"""Reserved evaluation data is recognised by its content, not its name (docs/safety.md): a copy of a bundled
test set, gzip or plain, whole or in part, is refused as training data; an instruction file's reserved
Dolly prompts are dropped and the record says so; data without reserved content is taken as before."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layerprune import LayerpruneError
from layerprune.cli import app
from layerprune.data.instructions import dolly_records, dolly_split
from layerprune.data.sources import BUNDLED_CORPORA, bundled_path, read_bundled_lines
from layerprune.data.task_data import BUNDLED_TASKS, read_task_rows, task_data_path
from layerprune.finetune.config import HealConfig
from layerprune.finetune.stage import prepare_training_rows
from cli_asserts import assert_one_line_error
from test_pipeline import make_workspace
from tiny_models import tiny_tokenizer

runner = CliRunner()


def rows_of(data, method="cpt", max_length=32, **extra):
    return prepare_training_rows(HealConfig(method=method, data=str(data), max_length=max_length, **extra),
                                 tiny_tokenizer())


@pytest.mark.parametrize("name", ["wikitext2-test.txt.gz", "ptb-test.txt.gz"])
def test_a_copy_of_a_bundled_test_set_is_refused_gzip_or_plain(name, tmp_path):
    shutil.copy(bundled_path(name), tmp_path / name)
    plain = tmp_path / name.removesuffix(".gz")
    plain.write_bytes(gzip.decompress((tmp_path / name).read_bytes()))
    for path in (tmp_path / name, plain):
        with pytest.raises(LayerpruneError, match="reserved for evaluation") as err:
            rows_of(path)
        assert "\n" not in str(err.value) and ("WikiText-2" in str(err.value) or "Penn Treebank" in str(err.value))


def test_a_few_test_set_lines_among_other_text_are_refused_even_re_spaced(tmp_path):
    lines = [line for line in read_bundled_lines("wikitext2") if len(line) > 200][5:8]
    mine = ["My own notes about gardening, written for this healing run and nowhere else. " * 3] * 40
    (tmp_path / "mixed.txt").write_text("\n\n".join(mine[:20] + [" ".join(lines[0].split()).upper()] + lines[1:]
                                                  + mine[20:]))
    with pytest.raises(LayerpruneError, match="3 lines or documents of the WikiText-2 test set"):
        rows_of(tmp_path / "mixed.txt")


def c4_documents():
    with gzip.open(bundled_path("c4-validation.jsonl.gz"), "rt") as f:
        return [json.loads(line) for line in f]


def test_the_reserved_c4_slice_is_refused_but_the_training_slice_is_taken(tmp_path):
    documents = c4_documents()
    (tmp_path / "c4-copy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
    with pytest.raises(LayerpruneError, match="300 lines or documents of the reserved C4 slice"):
        rows_of(tmp_path / "c4-copy.jsonl")
    start, _ = BUNDLED_CORPORA["c4-heldout"].documents
    (tmp_path / "c4-train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents[:start]))
    rows, info = rows_of(tmp_path / "c4-train.jsonl", max_samples=2)
    assert len(rows) == 2 and info["kind"] == "raw text"
    rows, _ = rows_of("c4", max_samples=2)  # the bundled name still trains
    assert len(rows) == 2


def test_reserved_dolly_prompts_are_dropped_from_a_copy_and_the_record_says_so(tmp_path):
    records = dolly_records()
    training, reserved = dolly_split(records)
    sample = records[:300]  # the first 300 records: 10 of them are reserved
    (tmp_path / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample))
    rows, info = rows_of(tmp_path / "dolly.jsonl", method="lora", max_samples=400)
    assert info["examples"] == 290 and info["reserved_dropped"].startswith("10 records")
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in training[:50]))
    _, info = rows_of(tmp_path / "clean.jsonl", method="lora")
    assert info["examples"] == 50 and "reserved_dropped" not in info


def test_a_file_of_only_reserved_dolly_prompts_is_refused_in_one_line(tmp_path):
    _, reserved = dolly_split(dolly_records())
    with gzip.open(tmp_path / "heldout.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in reserved[:20])
    workspace = make_workspace(tmp_path)
    before = (tmp_path / "heldout.jsonl.gz").read_bytes()
    result = runner.invoke(app, ["finetune", str(workspace / "tiny"), "--out", str(tmp_path / "healed"), "--data",
                                 str(tmp_path / "heldout.jsonl.gz"), "--method", "lora", "--max-steps", "1"])
    assert_one_line_error(result, "reserved for evaluation")
    assert (tmp_path / "heldout.jsonl.gz").read_bytes() == before and not (tmp_path / "healed").exists()


# ------------------------------------------------------------------ the bundled task items
def task_copy(tmp_path, name: str, compressed: bool):
    """A copy of a bundled task file, as it is (gzip) or decompressed."""
    source = task_data_path(BUNDLED_TASKS[name].data_file)
    if compressed:
        return Path(shutil.copy(source, tmp_path / source.name))
    plain = tmp_path / source.name.removesuffix(".gz")
    plain.write_bytes(gzip.decompress(source.read_bytes()))
    return plain


# Each task's fields as instruction records: (instruction, response) of `--fields`.
TASK_FIELDS = {"arc_easy": "instruction=question,response=answerKey", "piqa": "instruction=goal,response=sol1",
               "hellaswag": "instruction=ctx,response=activity_label", "winogrande": "instruction=sentence,response=option1",
               "mmlu": "instruction=question,response=subject"}


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "decompressed"])
@pytest.mark.parametrize("name", sorted(TASK_FIELDS))
def test_a_copy_of_a_bundled_task_as_instruction_data_is_refused(tmp_path, name, compressed):
    copy = task_copy(tmp_path, name, compressed)
    before = copy.read_bytes()
    with pytest.raises(LayerpruneError, match="reserved for evaluation") as err:
        rows_of(copy, method="lora", fields=TASK_FIELDS[name])
    assert "\n" not in str(err.value) and f"({name})" in str(err.value)
    assert copy.read_bytes() == before


def test_task_items_among_instruction_records_are_dropped_and_the_record_says_so(tmp_path):
    arc = read_task_rows(BUNDLED_TASKS["arc_easy"].data_file)[:7]
    piqa = read_task_rows(BUNDLED_TASKS["piqa"].data_file)[:5]
    records = [{"instruction": f"Say {n}.", "context": "", "response": f"{n}"} for n in range(40)]
    records += [{"instruction": r["question"], "context": "", "response": r["choices"]["text"][0]} for r in arc]
    records += [{"instruction": r["goal"], "context": "", "response": r["sol2"]} for r in piqa]  # short goals too
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, info = rows_of(tmp_path / "mine.jsonl", method="lora")
    assert info["examples"] == 40
    assert info["reserved_dropped"] == ("12 records of evaluation data were left out: 7 of the ARC-e evaluation items "
                                        "(arc_easy), 5 of the PIQA evaluation items (piqa)")


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "decompressed"])
def test_task_items_as_text_are_refused(tmp_path, compressed):
    hellaswag = read_task_rows(BUNDLED_TASKS["hellaswag"].data_file)[:30]
    winogrande = read_task_rows(BUNDLED_TASKS["winogrande"].data_file)[:4]
    mine = ["My own notes about gardening, written for this healing run and nowhere else. " * 3] * 20
    blocks = mine[:10] + [f"{r['ctx']} {r['endings'][int(r['label'])]}" for r in hellaswag]
    blocks += [r["sentence"].replace("_", r["option1"]) for r in winogrande] + mine[10:]
    text = "\n\n".join(blocks)
    path = tmp_path / ("items.txt.gz" if compressed else "items.txt")
    path.write_bytes(gzip.compress(text.encode()) if compressed else text.encode())
    with pytest.raises(LayerpruneError, match="reserved for evaluation") as err:
        rows_of(path)
    assert "30 lines or documents of the HellaSwag evaluation items" in str(err.value)
    assert "4 lines or documents of the WinoGrande evaluation items" in str(err.value)


def test_generic_questions_and_text_of_ones_own_stay_trainable(tmp_path):
    records = [{"instruction": "Which of the following is true?", "context": "", "response": "The sky is blue."},
               {"instruction": "Which of the following statements is correct?", "context": "",
                "response": "Water boils at 100 degrees Celsius at sea level."}]
    (tmp_path / "generic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, info = rows_of(tmp_path / "generic.jsonl", method="lora", max_length=256)
    assert info["examples"] == 2 and "reserved_dropped" not in info
    rows, _ = rows_of("c4", max_samples=2)  # the bundled training text holds no task item
    assert len(rows) == 2
