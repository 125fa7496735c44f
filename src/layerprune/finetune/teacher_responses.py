"""Instruction data answered by the teacher: `responses: teacher` trains on the unpruned model's own greedy
responses to the data set's prompts instead of the data set's responses (sequence-level distillation, Kim &
Rush, arXiv 1606.07947). The pruned model then learns to say what the model it replaces said, which is
what instruction following against the unpruned model measures; "On the Limits of Layer Pruning for
Generative Reasoning in LLMs" (arXiv 2602.01997) heals on self-generated responses for the same reason.

Generating is the expensive part on a CPU (each token is a forward), so only the examples the steps will
read are answered, with an estimate printed first, and the answers are cached on disk by the teacher's
weights and the prompts: a second run with the same teacher reads them.
"""

from __future__ import annotations

from layerprune.data.instructions import Example, prompt_ids
from layerprune.files.cache import cache_dir
from layerprune.hardware.compute import compute_choice
from layerprune.hardware.devices import release_memory
from layerprune.hardware.speed import GENERATED_TOKEN_COST, announced, measure_speed
from layerprune.models.responses import (
    GENERATION_BATCH, greedy_responses, read_cached_responses, responses_path, write_cached_responses,
)


def answered_by_teacher(examples: list[Example], tokenizer, load_teacher, *, new_tokens: int, bf16,
                        template: str = "auto", log=print) -> list[Example]:
    """The examples with the teacher's greedy responses (at most new_tokens tokens, cut at the end of turn)
    in place of their own; from the cache when this teacher answered these prompts before."""
    prompts = [prompt_ids(tokenizer, example, template) for example in examples]
    teacher = load_teacher()
    compute = compute_choice(next(teacher.parameters()).device, bf16)
    path = responses_path(teacher, prompts, new_tokens=new_tokens, batch_size=GENERATION_BATCH,
                          cache_dir=cache_dir() / "responses", compute=compute.dtype)
    responses = read_cached_responses(path, len(prompts))
    if responses is None:
        speed = measure_speed(teacher, compute=compute)
        seconds = (sum(map(len, prompts)) + len(prompts) * new_tokens * GENERATED_TOKEN_COST) * speed.forward
        with announced(f"the teacher answers {len(prompts)} prompts (up to {new_tokens} tokens, {compute.dtype})",
                       seconds, log), compute.autocast():
            responses = greedy_responses(teacher, tokenizer, prompts, new_tokens=new_tokens,
                                         batch_size=GENERATION_BATCH, progress="teacher responses")
        write_cached_responses(path, responses)
    else:
        log(f"the teacher's responses to {len(prompts)} prompts: from the cache")
    del teacher
    release_memory()  # on a GPU too: the next model loads there
    return [Example(e.instruction, e.context, tokenizer.decode(r, skip_special_tokens=True).strip())
            for e, r in zip(examples, responses)]

