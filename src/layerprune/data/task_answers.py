"""The multiple-choice answers that `select_objective: tasks` judges drop-sets on.

A fixed mix of the bundled ARC-Easy, PIQA and HellaSwag files, formatted as the bundled lm-eval task
YAMLs (resources/tasks/lp_*.yaml) format them for evaluation: the context is the task's doc_to_text, the
continuation is lm-eval's default target delimiter " " followed by the gold choice, and both are tokenized
as lm-eval's HFLM does (`_encode_pair`). Only the continuation's tokens are scored.

Evaluation reads the first documents of each task (`--limit 1000` is what the studies use), so selection
takes the documents after them: FIRST_DOCUMENT .. FIRST_DOCUMENT + n - 1 of each task file, in file order
(the order lm-eval reads them in).
"""

from __future__ import annotations

import torch

from layerprune.data.calibration import CalibrationData
from layerprune.data.task_data import BUNDLED_TASKS, read_task_rows
from layerprune.errors import LayerpruneError
from layerprune.models.tokens import pad_token_id

SELECT_TASKS = ("arc_easy", "piqa", "hellaswag")
FIRST_DOCUMENT = 1000  # documents 0..999 belong to evaluation
TARGET_DELIMITER = " "  # lm-eval's default, which none of the three task YAMLs changes


def arc_easy_pair(doc: dict) -> tuple[str, str]:
    """lp_arc_easy.yaml: "Question: {{question}}\\nAnswer:", gold choices.text[choices.label.index(answerKey)]."""
    gold = doc["choices"]["label"].index(doc["answerKey"])
    return f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"][gold]


def piqa_pair(doc: dict) -> tuple[str, str]:
    """lp_piqa.yaml: "Question: {{goal}}\\nAnswer:", gold [sol1, sol2][label]."""
    return f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]][int(doc["label"])]


def hellaswag_pair(doc: dict) -> tuple[str, str]:
    """lp_hellaswag.yaml: the stock process_docs (lm_eval.tasks.hellaswag.utils) makes query and choices."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = preprocess(doc["activity_label"] + ": " + context)
    return query, preprocess(doc["endings"][int(doc["label"])])


PAIRS = {"arc_easy": arc_easy_pair, "piqa": piqa_pair, "hellaswag": hellaswag_pair}


def max_documents() -> int:
    """The most documents per task after FIRST_DOCUMENT that every task file holds (PIQA: 838)."""
    return min(len(read_task_rows(BUNDLED_TASKS[name].data_file)) for name in SELECT_TASKS) - FIRST_DOCUMENT


def task_documents(name: str, n_docs: int) -> list[dict]:
    """Documents FIRST_DOCUMENT .. FIRST_DOCUMENT + n_docs - 1 of a bundled task file."""
    rows = read_task_rows(BUNDLED_TASKS[name].data_file)
    if FIRST_DOCUMENT + n_docs > len(rows):
        raise LayerpruneError(f"select_tasks_docs {n_docs}: {name} has {len(rows) - FIRST_DOCUMENT} documents after "
                              f"the first {FIRST_DOCUMENT} that evaluation reads; give at most {max_documents()}")
    return list(rows[FIRST_DOCUMENT: FIRST_DOCUMENT + n_docs])


def gold_pairs(n_docs: int) -> list[tuple[str, str]]:
    """(context, continuation) of each selected document, task by task: the requests lm-eval scores for its
    gold choice."""
    return [(context, TARGET_DELIMITER + answer) for name in SELECT_TASKS
            for context, answer in map(PAIRS[name], task_documents(name, n_docs))]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for a causal model: trailing spaces of the context move to the continuation,
    the whole text is encoded (the tokenizer's own special tokens, as HFLM's tok_encode), and the
    continuation is what follows the encoded context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer(context + continuation).input_ids)
    context_ids = list(tokenizer(context).input_ids)
    return context_ids, whole[len(context_ids):]


def answers_data(tokenizer, pairs: list[tuple[str, str]], description: dict | None = None) -> CalibrationData:
    """Rows context + continuation, right padded, `scored` on the continuation's tokens; sorted by length so
    that a batch carries little padding (the mean over answer tokens does not depend on the order)."""
    rows = []
    for context, continuation in pairs:
        context_ids, answer_ids = encode_pair(tokenizer, context, continuation)
        if not context_ids or not answer_ids:
            raise LayerpruneError(f"a task document encodes to an empty question or answer: {context[:60]!r}")
        rows.append((context_ids + answer_ids, len(answer_ids)))
    rows.sort(key=lambda row: len(row[0]))
    width = len(rows[-1][0])
    ids = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row, answer) in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
        scored[r, len(row) - answer: len(row)] = 1
    return CalibrationData(ids, mask, {**(description or {}), "answer_tokens": int(scored.sum())}, scored=scored)


def task_answers(tokenizer, n_docs: int) -> CalibrationData:
    """The gold answers of documents FIRST_DOCUMENT.. of ARC-Easy, PIQA and HellaSwag (n_docs each)."""
    if tokenizer is None:
        raise LayerpruneError("select_objective tasks needs the model's tokenizer to encode the task documents")
    description = {"source": "tasks", "tasks": list(SELECT_TASKS), "rows": len(SELECT_TASKS) * n_docs,
                   "documents": f"{FIRST_DOCUMENT}-{FIRST_DOCUMENT + n_docs - 1} of each"}
    return answers_data(tokenizer, gold_pairs(n_docs), description)
