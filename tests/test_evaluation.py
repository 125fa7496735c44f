"""Evaluation: perplexity equals a hand computation; bundled tasks build lm-eval's stock prompts;
custom tasks score as lm-eval's rules say; the CLI refuses bad input with one line and writes nothing."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import lm_eval.tasks
import pytest
import torch
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.evaluation.custom import read_mc_items
from layerprune.evaluation.harness import evaluate_tasks
from layerprune.evaluation.perplexity import Window, load_ppl_text, perplexity, plan_windows, resolve_bos
from layerprune.evaluation.results import compare_rows, eval_markdown
from layerprune.evaluation.tasks import load_bundled, resolve_tasks, tasks_dir
from layerprune.data.task_data import BUNDLED_TASKS, PAPER_TASKS, read_task_rows
from layerprune.models.saving import save_model
from tiny_models import CharTokenizer, tiny_model, tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."
runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", max_position_embeddings=512)


# ------------------------------------------------------------------ perplexity


def _nll_sum(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Sum of NLL over labels != -100, from the model's own (shifted) loss: an independent reference."""
    out = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels]))
    n = sum(1 for x in labels[1:] if x != -100)
    return out.loss.item() * n, n


def test_windows_follow_llm_pruner_and_the_hf_guide():
    assert plan_windows(10, 4) == [Window(0, 4, 0), Window(4, 8, 4)]  # the tail of 2 tokens is dropped
    # HF guide: windows every `stride`, each scores what no earlier window scored.
    assert plan_windows(10, 4, stride=2) == [Window(0, 4, 0), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert plan_windows(7, 4, stride=4) == [Window(0, 4, 0), Window(4, 7, 4)]


@pytest.mark.parametrize("bos", ["never", "always"])
def test_non_overlapping_perplexity_equals_hand_computation(model, bos):
    tok = tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False).input_ids
    seq_len = 16
    total, count = 0.0, 0
    for k in range(len(ids) // seq_len):
        window = ids[k * seq_len : (k + 1) * seq_len]
        if bos == "always":  # BOS before every window: every window token is scored
            s, n = _nll_sum(model, [tok.bos_token_id] + window, [-100] + window)
        else:  # the window's first token is context only
            s, n = _nll_sum(model, window, window)
        total, count = total + s, count + n
    result = perplexity(model, tok, TEXT, seq_len=seq_len, bos=bos, batch_size=2, progress=False)
    assert result["tokens"] == count == (len(ids) // seq_len) * (seq_len if bos == "always" else seq_len - 1)
    assert result["windows"] == len(ids) // seq_len and result["bos_used"] == bos
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("bos", ["never", "always"])
def test_sliding_window_perplexity_equals_hand_computation(model, bos):
    tok = tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False).input_ids
    max_length, stride = 16, 6
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):  # the Hugging Face perplexity guide's loop
        end = min(begin + max_length, len(ids))
        target = list(ids[begin:end])
        trg_len = end - prev_end
        target[: len(target) - trg_len] = [-100] * (len(target) - trg_len)
        window = ids[begin:end]
        if bos == "always":
            s, n = _nll_sum(model, [tok.bos_token_id] + window, [-100] + target)
        else:
            s, n = _nll_sum(model, window, target)
        total, count, prev_end = total + s, count + n, end
        if end == len(ids):
            break
    result = perplexity(model, tok, TEXT, seq_len=max_length, stride=stride, bos=bos, batch_size=3, progress=False)
    assert result["tokens"] == count == len(ids) - (0 if bos == "always" else 1)  # every token once
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["mode"] == "sliding"


def test_bos_auto_follows_the_tokenizer_and_first_puts_it_once(model):
    assert resolve_bos(tiny_tokenizer(), "auto") == "never"
    assert resolve_bos(CharTokenizer(add_bos=True), "auto") == "always"
    tok = CharTokenizer(add_bos=False)
    ids = [tok.bos_token_id] + tok(TEXT, add_special_tokens=False).input_ids  # LLM-Pruner: BOS starts the stream
    expected = [_nll_sum(model, ids[k * 20 : (k + 1) * 20], ids[k * 20 : (k + 1) * 20]) for k in range(len(ids) // 20)]
    result = perplexity(model, tok, TEXT, seq_len=20, bos="first", progress=False, max_windows=None)
    assert result["ppl"] == pytest.approx(math.exp(sum(s for s, _ in expected) / sum(n for _, n in expected)), rel=1e-5)


def test_bf16_model_scores_in_float32(model):
    tok = tiny_tokenizer()
    reference = perplexity(model, tok, TEXT, seq_len=16, progress=False)
    bf16 = perplexity(tiny_model("llama", max_position_embeddings=512, dtype=torch.bfloat16), tok, TEXT, seq_len=16,
                      progress=False)
    assert bf16["dtype"] == "bfloat16" and bf16["nll_dtype"] == "float32"
    assert bf16["ppl"] == pytest.approx(reference["ppl"], rel=0.05)


def test_ppl_texts_follow_the_papers_strings(tmp_path):
    wiki = load_ppl_text("wikitext2")
    assert len(wiki.text) == 1_294_336  # "\n\n".join of the HF rows (resources/data/MANIFEST.md)
    assert wiki.data["sha256"].startswith("173c87a5")
    ptb = load_ppl_text("ptb")
    assert ptb.text.count("\n\n") == 3760 and not ptb.text.startswith(" ")
    (tmp_path / "notes.jsonl").write_text('{"body": "first"}\n{"body": "second"}\n')
    assert load_ppl_text(str(tmp_path / "notes.jsonl"), field="body").text == "first\n\nsecond"
    with pytest.raises(LayerpruneError, match="unknown perplexity text 'wikitext3'"):
        load_ppl_text("wikitext3")


# ------------------------------------------------------------------ bundled tasks == lm-eval's stock tasks


STOCK = Path(lm_eval.tasks.__file__).parent  # lm-eval's own task YAMLs
STOCK_YAML = {
    "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
    "winogrande": "winogrande/default.yaml",
}
SAMPLE_SUBJECTS = {"mmlu": ["abstract_algebra", "high_school_us_history", "world_religions"],
                   "cmmlu": ["agronomy", "chinese_history", "world_religions"]}


def _task_from_yaml(yaml_path: Path, docs: list[dict]):
    """An lm-eval task built from a YAML (its includes and !function utils resolved by lm-eval), fed `docs`.

    Applied to lm-eval's own YAML and to ours with the same documents, it shows that both ask the model the
    same questions; the data swap itself (custom_dataset) is checked separately."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(yaml_path)
    for key in ("tag", "group"):
        config.pop(key, None)
    splits = {config.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
    config["custom_dataset"] = lambda **_: datasets.DatasetDict({s: datasets.Dataset.from_list(docs) for s in splits})
    return ConfigurableTask(config=config)


def _requests(task, n: int = 3) -> list:
    """What the model is asked for the first n documents: (context, continuation) pairs, and the gold index."""
    docs = task.eval_docs  # a property that re-runs process_docs: read it once
    out = []
    for i in range(n):
        doc = docs[i]
        context = task.fewshot_context(doc, 0)
        instances = task.construct_requests(doc, context, metadata=(task.config.task, i, 1))
        out.append(([inst.arguments for inst in instances], task.doc_to_target(doc), task.doc_to_choice(doc)))
    return out


def _same_task(mine, stock) -> None:
    assert _requests(mine) == _requests(stock)
    for key in ("description", "target_delimiter", "fewshot_delimiter", "output_type", "metadata"):
        if key == "metadata":
            assert mine.config.metadata.get("version") == stock.config.metadata.get("version")
        else:
            assert getattr(mine.config, key) == getattr(stock.config, key), key
    assert [m["metric"] for m in mine.config.metric_list] == [m["metric"] for m in stock.config.metric_list]


@pytest.mark.parametrize("name", list(STOCK_YAML))
def test_bundled_task_builds_the_stock_prompts(name):
    docs = [dict(r) for r in read_task_rows(BUNDLED_TASKS[name].data_file)[:3]]
    mine = _task_from_yaml(tasks_dir() / f"{BUNDLED_TASKS[name].local_task}.yaml", docs)
    _same_task(mine, _task_from_yaml(STOCK / STOCK_YAML[name], docs))


@pytest.mark.parametrize("family", ["mmlu", "cmmlu"])
def test_mmlu_and_cmmlu_subjects_build_the_stock_prompts(family):
    from lm_eval.tasks._yaml_loader import load_yaml

    stock_dir = STOCK / ("mmlu/default" if family == "mmlu" else "cmmlu")
    mine = sorted((tasks_dir() / family).glob(f"lp_{family}_*.yaml"))
    assert len(mine) == (57 if family == "mmlu" else 67)
    for path in mine:  # every subject: same description (part of the prompt), data filtered to that subject
        config = load_yaml(path, resolve_func=False)
        stock = load_yaml(stock_dir / path.name.removeprefix("lp_"), resolve_func=False)
        assert config["description"] == stock["description"]
        assert config["dataset_kwargs"]["subject"] == stock["dataset_name"]
    for subject in SAMPLE_SUBJECTS[family]:
        docs = [dict(d) for d in load_bundled(family, split="test", subject=subject)["test"].select(range(3))]
        _same_task(_task_from_yaml(tasks_dir() / family / f"lp_{family}_{subject}.yaml", docs),
                   _task_from_yaml(stock_dir / f"{family}_{subject}.yaml", docs))


def test_bundled_loader_gives_each_task_its_rows():
    for name in ("piqa", "openbookqa", "arc_challenge", "winogrande"):  # the others share this code path
        task = BUNDLED_TASKS[name]
        rows = read_task_rows(task.data_file)
        split = load_bundled(task.data_file, split=task.split, version=1.0, config_source="x")[task.split]
        assert len(split) == len(rows)
    subjects = {r["subject"] for r in read_task_rows("mmlu.jsonl.gz")}
    sizes = [len(load_bundled("mmlu", subject=s)["test"]) for s in sorted(subjects)]
    assert sum(sizes) == 14042 and len(subjects) == 57


@pytest.fixture(scope="module")
def ours():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()), include_defaults=False)


def test_every_bundled_name_is_indexed(ours):
    for name in PAPER_TASKS:
        assert BUNDLED_TASKS[name].local_task in ours.all_tasks
    assert len([t for t in ours.all_subtasks if t.startswith(("lp_mmlu_", "lp_cmmlu_"))]) == 57 + 67


def test_mmlu_groups_aggregate_like_the_stock_groups(ours):
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    stock_index = TaskManager(include_path=str(STOCK / "mmlu/default"), include_defaults=False).task_index
    for category in ("stem", "other", "social_sciences", "humanities"):  # the same subjects in each category
        stock_tag = stock_index[f"mmlu_{category}_tasks"].tags
        assert {t.removeprefix("lp_") for t in ours.task_index[f"lp_mmlu_{category}_tasks"].tags} == stock_tag
    groups = [("mmlu", f"mmlu/default/_{g}.yaml") for g in
              ("mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities")]
    for family, stock_file in [*groups, ("cmmlu", "cmmlu/_cmmlu.yaml")]:
        stock = load_yaml(STOCK / stock_file, resolve_func=False)
        mine = load_yaml(tasks_dir() / family / f"_lp_{Path(stock_file).name[1:]}", resolve_func=False)
        assert [t.removeprefix("lp_") for t in mine["task"]] == stock["task"]
        assert mine["aggregate_metric_list"] == stock["aggregate_metric_list"]  # weight_by_size: as lm-eval


def test_cmmlu_rows_reach_lm_eval_in_the_upstream_csv_columns():
    raw = read_task_rows("cmmlu.jsonl.gz")
    given = load_bundled("cmmlu", split="test", subject=raw[0]["subject"], version=1.0)["test"]
    first = given[0]
    assert first["Question"] == raw[0]["question"] and [first[c] for c in "ABCD"] == raw[0]["choices"]
    assert first["Answer"] == "ABCD"[raw[0]["answer"]]


def test_bundled_files_match_the_manifest():
    manifest = (tasks_dir().parent / "data" / "MANIFEST.md").read_text()
    for name in PAPER_TASKS:
        record = resolve_tasks(name)[0].data
        assert record["sha256"] in manifest and record["file"].split("/")[-1] in manifest
        with gzip.open(tasks_dir().parent / "data" / "tasks" / BUNDLED_TASKS[name].data_file, "rb") as f:
            assert f.read(1) == b"{"
    assert "non-commercial" in manifest and "CMMLU" in manifest


# ------------------------------------------------------------------ custom tasks


def _uniform(model):
    """Zero the final norm: every token gets the same probability, whatever the context."""
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model


def test_custom_jsonl_task_scores_by_lm_eval_rules(tmp_path):
    # Under a uniform model, log-likelihood = -(tokens) * log V: acc picks the shortest choice; lm-eval's
    # acc_norm divides by the choice's characters (without the leading space), so it picks the longest.
    items = [
        {"question": "Pick one", "choices": ["aa", "bbbbbb", "cccccccc"], "answer": 0},
        {"question": "Pick one", "choices": ["dddddddd", "e", "ffff"], "answer": 1},
        {"question": "Pick one", "choices": ["gggggg", "hhhhhhhh", "ii"], "answer": 2, "context": "A story."},
        {"question": "Pick one", "choices": ["jjjjjjjjj", "k"], "answer": 1},
    ]
    path = tmp_path / "quiz.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    entries = resolve_tasks(str(path))
    assert entries[0].lm_eval_name == "lpc_quiz" and entries[0].data["items"] == 4
    result = evaluate_tasks(_uniform(tiny_model("llama")), tiny_tokenizer(), entries, batch_size=4)
    scores = result["tasks"]["lpc_quiz"]
    assert scores["n"] == 4 and scores["acc"] == 1.0 and scores["acc_norm"] == 0.0
    assert result["average"]["value"] == 1.0


def test_custom_jsonl_prompt_has_the_context(tmp_path):
    from lm_eval.tasks import TaskManager

    path = tmp_path / "ctx.jsonl"
    path.write_text(json.dumps({"question": "Sky?", "context": "Look up.", "choices": ["blue", "red"], "answer": 0})
                    + "\n" + json.dumps({"question": "Grass?", "choices": ["green", "red"], "answer": 0}) + "\n")
    entry = resolve_tasks(str(path))[0]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(entry.generated_yaml)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    task = manager.load(["lpc_ctx"])["tasks"]["lpc_ctx"]
    docs = list(task.eval_docs)
    assert task.fewshot_context(docs[0], 0) == "Look up.\nQuestion: Sky?\nAnswer:"
    assert task.fewshot_context(docs[1], 0) == "Question: Grass?\nAnswer:"
    assert task.doc_to_choice(docs[0]) == ["blue", "red"] and task.doc_to_target(docs[0]) == 0


def test_task_yaml_path_runs_through_lm_eval(tmp_path):
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps({"q": q, "options": o, "gold": g}) + "\n" for q, o, g in
                            [("Norway", ["Oslo", "Rome"], 0), ("Italy", ["Oslo", "Rome"], 1)]))
    (tmp_path / "capitals.yaml").write_text(
        "task: capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "The capital of {{q}} is"\n'
        "doc_to_choice: \"{{options}}\"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n"
    )
    entries = resolve_tasks(str(tmp_path / "capitals.yaml"))
    assert entries[0].name == "capitals" and entries[0].kind == "yaml"
    scores = evaluate_tasks(_uniform(tiny_model("llama")), tiny_tokenizer(), entries)["tasks"]["capitals"]
    assert scores["n"] == 2 and scores["acc"] == 0.5  # equal lengths, uniform model: ties, argmax takes the first
    assert scores["acc_norm"] is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": 0', "is not valid JSON"),
        ('["q", "a"]', "is not a JSON object"),
        ('{"question": "q", "choices": ["a", "b"]}', "has no 'answer'"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "'answer' must be the index"),
        ('{"question": "q", "choices": ["a", "b"], "answer": true}', "'answer' must be the index"),
        ('{"question": "q", "choices": "a b", "answer": 0}', "'choices' must be a list"),
        ('{"question": 3, "choices": ["a", "b"], "answer": 0}', "'question' must be a string"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 0, "context": 5}', "'context' must be a string"),
    ],
)
def test_malformed_custom_file_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "choices": ["a", "b"], "answer": 1}\n\n' + line + "\n")
    with pytest.raises(LayerpruneError, match=message) as err:
        read_mc_items(path)
    assert f"{path}:3" in str(err.value)


def test_default_evaluation_is_the_paper_tasks_on_a_few_documents():
    from layerprune.config import EvalStage
    from layerprune.evaluation.config import DEFAULT_PPL_WINDOWS, DEFAULT_TASK_LIMIT, EvalConfig
    from layerprune.evaluation.protocol import describe_plan, plan_eval

    plan = plan_eval()
    assert [t.name for t in plan.tasks] == list(PAPER_TASKS) and plan.limit == DEFAULT_TASK_LIMIT
    assert [t.name for t in plan.ppl] == ["wikitext2"] and plan.ppl_windows == DEFAULT_PPL_WINDOWS
    assert plan.scorer == "fast"
    assert plan_eval(ppl_windows=0, tasks="none").ppl_windows is None  # 0: the whole text
    assert f"first {DEFAULT_TASK_LIMIT} documents of each (sub)task" in describe_plan(plan)
    assert plan_eval(tasks="piqa", ppl="none", limit=0).limit is None  # 0: every document
    assert "every document" in describe_plan(plan_eval(tasks="piqa", ppl="none", limit=0))
    for nothing in ("", "none"):
        with pytest.raises(LayerpruneError, match="nothing to evaluate"):
            plan_eval(tasks=nothing, ppl="none")
    # One default per setting: a run's eval stage starts from the same defaults as `layerprune eval`.
    stage, command = EvalStage(), EvalConfig()
    assert {k: getattr(stage, k) for k in EvalConfig.model_fields} == command.model_dump()
    assert stage.tasks == "paper" and stage.limit == DEFAULT_TASK_LIMIT and stage.ppl_windows == DEFAULT_PPL_WINDOWS


def test_task_names_and_files_are_checked(tmp_path):
    assert [e.name for e in resolve_tasks("paper")] == list(PAPER_TASKS)
    assert [e.lm_eval_name for e in resolve_tasks("piqa,mmlu", "hub")] == ["piqa", "mmlu"]
    with pytest.raises(LayerpruneError, match="unknown task 'piqaa'"):
        resolve_tasks("piqa,piqaa")
    with pytest.raises(LayerpruneError, match="task file not found"):
        resolve_tasks(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LayerpruneError, match="has no items"):
        resolve_tasks(str(tmp_path / "empty.jsonl"))
    (tmp_path / "t.yaml").write_text("dataset_path: json\n")
    with pytest.raises(LayerpruneError, match="defines no lm-eval task"):
        resolve_tasks(str(tmp_path / "t.yaml"))


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_model(tiny_model("llama", max_position_embeddings=512), tiny_tokenizer(), out)
    return out


def _one_error_line(result, fragment):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tasks", "piqa,nonsense"], "unknown task 'nonsense'"),
        (["--tasks", "missing/quiz.jsonl"], "task file not found"),
        (["--tasks", "none", "--ppl", "wikitext3"], "unknown perplexity text"),
        (["--tasks", "none", "--ppl", "none"], "nothing to evaluate"),
        (["--tasks", "piqa", "--avg-metric", "f1"], "--avg-metric: Input should be 'acc' or 'acc_norm' (got 'f1')"),
        (["--tasks", "piqa", "--bos", "sometimes"], "--bos: Input should be"),
        (["--tasks", "piqa", "--stride", "300"], "cannot exceed --seq-len"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, args, fragment):
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(tiny_dir), "--out", str(out), *args])
    _one_error_line(result, fragment)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_malformed_custom_file(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    result = runner.invoke(app, ["eval", str(tiny_dir), "--tasks", str(bad), "--out", str(tmp_path / "out")])
    _one_error_line(result, f"{bad}:1")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_cli_eval_writes_results_and_compare_shows_deltas(tiny_dir, tmp_path):
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text(json.dumps({"question": "2+2?", "choices": ["4", "five"], "answer": 0}) + "\n")
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4)
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(tiny_dir), "--tasks", str(quiz), "--ppl", str(text), "--seq-len", "32",
                                 "--no-samples", "--out", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps lines
    assert "evaluating: text.txt perplexity (32-token windows, first 300); zero-shot lpc_quiz" in said
    record = json.loads((out / "eval.json").read_text())
    assert record["protocol"]["plan"].startswith("text.txt perplexity") and "fast scorer" in record["protocol"]["plan"]
    assert set(record["tasks"]) == {"lpc_quiz"} and record["perplexity"]["text.txt"]["windows"] == len(TEXT * 4) // 32
    assert record["data"][str(quiz.resolve())] == record["tasks"]["lpc_quiz"]["data"]["sha256"]
    assert {"torch", "transformers", "lm_eval"} <= set(record["package_versions"])
    assert record["wall_time_s"]["total"] > 0 and record["model"]["layers"] == 5
    assert (out / "eval.md").is_file() and (out / "tasks" / "lpc_quiz.yaml").is_file()
    assert not (out / "samples.json").exists()
    refused = runner.invoke(app, ["eval", str(tiny_dir), "--tasks", str(quiz), "--ppl", "none", "--out", str(out)])
    _one_error_line(refused, "already exists")

    compared = runner.invoke(app, ["eval-compare", str(out), str(out), "--out", str(tmp_path / "cmp.md")])
    assert compared.exit_code == 0, compared.output
    assert "+0.0000" in compared.output and "text.txt ppl" in (tmp_path / "cmp.md").read_text()


def test_compare_rows_and_markdown():
    def record(acc, ppl, dropped):
        return {
            "model": {"ref": "m", "architecture": "Llama", "layers": 30 - len(dropped), "original_layers": 30,
                      "dropped_layers": dropped, "parameters": 1, "dtype": "bfloat16"},
            "tasks": {"piqa": {"acc": acc, "acc_stderr": 0.01, "acc_norm": None, "acc_norm_stderr": None, "n": 50}},
            "average": {"metric": "acc", "value": acc, "tasks": 1, "metric_per_task": {"piqa": "acc"}},
            "perplexity": {"wikitext2": {"ppl": ppl, "tokens": 10, "windows": 1, "seq_len": 128, "stride": None,
                                         "bos": "auto", "bos_used": "never", "max_windows": None}},
            "protocol": {"tasks": {"harness": "lm-eval", "num_fewshot": 0, "limit": 50}, "data_source": "bundled",
                         "avg_metric": "acc"},
        }

    a, b = record(0.70, 20.0, []), record(0.55, 80.0, [22, 23])
    rows = {r.label: r for r in compare_rows(a, b)}
    assert rows["PIQA acc"].delta == pytest.approx(-0.15)
    assert rows["wikitext2 ppl"].delta == pytest.approx(60.0)
    assert "| PIQA | 0.5500 ± 0.0100 | - | 50 |" in eval_markdown(b)
