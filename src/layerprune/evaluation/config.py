"""The settings of `layerprune eval` and of a run's eval stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from layerprune.common.config_base import StrictConfig

# A bare `layerprune eval` is a quick look (its time on the embedded model: docs/results.md, "Evaluation at
# the speed limit"): the paper's 8 tasks on the first 5 documents of each (sub)task and the
# first 300 perplexity windows. `--limit 0 --ppl-windows 0` is the full protocol.
DEFAULT_TASK_LIMIT = 5


DEFAULT_PPL_WINDOWS = 300


class EvalConfig(StrictConfig):
    tasks: str = Field(
        "paper", description="Zero-shot tasks, comma separated: piqa, hellaswag, openbookqa, arc_easy, arc_challenge, "
        "mmlu, cmmlu, winogrande; 'paper' = all 8; a task .yaml (lm-eval format) or a multiple-choice .jsonl file; "
        "humaneval (opt-in: EXECUTES model-generated code in limited subprocesses). Empty or 'none': none.")
    ppl: str = Field("wikitext2", description="Perplexity texts, comma separated: wikitext2, ptb, a .txt/.jsonl "
                     "file; 'none'.")
    ppl_field: str = Field("text", description="Text field of a .jsonl perplexity file.")
    seq_len: int = Field(128, ge=2, description="Perplexity window length in tokens (LLM-Pruner uses 128).")
    stride: int | None = Field(None, ge=1, description="Sliding windows: score only the last STRIDE new tokens of "
                               "each window.")
    bos: Literal["auto", "always", "never", "first"] = Field(
        "auto", description="BOS per perplexity window: auto | always | never | first (once, at the start).")
    ppl_windows: int | None = Field(
        DEFAULT_PPL_WINDOWS, ge=0, description="Only the first N perplexity windows; 0: the whole text (WikiText-2: "
        "2,382 windows of 128 SmolLM2 tokens).")
    limit: int | None = Field(
        DEFAULT_TASK_LIMIT, ge=0, description="First N documents of each (sub)task and first N HumanEval problems; "
        "0: every document ('paper' in full: 165,062 requests; docs/results.md has the measured times).")
    batch_size: int = Field(8, ge=1, description="Batch size of perplexity windows and lm-eval requests (the fast "
                            "scorer: rows of up to 256 tokens).")
    avg_metric: Literal["acc", "acc_norm"] = Field("acc", description="Metric averaged into Avg Acc.")
    scorer: Literal["fast", "stock"] = Field(
        "fast", description="fast: lm-eval's requests with each distinct context run once (the same numbers to "
        "float rounding, several times faster on multiple choice) | stock: lm-eval's HFLM, byte for byte.")
    data_source: Literal["bundled", "hub"] = Field(
        "bundled", description="bundled (offline copies) | hub (lm-eval's stock tasks and hub datasets).")
    follow: int = Field(
        0, ge=0, description="Instruction following against the unpruned model on N held-out Dolly prompts (the "
        "reserved dolly-heldout slice, chat template): teacher-forced KL on their responses and agreement of greedy "
        "responses (ROUGE-L, common prefix); 0: off. Needs the reference model in memory too.")
    follow_new_tokens: int = Field(48, ge=1, description="Instruction following: tokens per greedy response.")
    reference: str | None = Field(None, description="Instruction following: the unpruned model to compare with "
                                  "(default: the model the evaluated one was pruned from).")
    samples: bool = Field(True, description="Save greedy generation samples (samples.json).")
    max_new_tokens: int = Field(40, ge=1, description="Tokens per generation sample.")
    humaneval_max_new_tokens: int = Field(256, ge=1, description="HumanEval: most tokens per completion.")
    humaneval_timeout: float = Field(10.0, gt=0, allow_inf_nan=False, description="HumanEval: seconds each program "
                                     "may run.")

    @model_validator(mode="after")
    def _stride_fits(self) -> "EvalConfig":
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride ({self.stride}) cannot exceed seq_len ({self.seq_len})")
        return self
