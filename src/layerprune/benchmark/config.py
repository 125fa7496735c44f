"""The settings of `layerprune bench` and of a run's bench stage."""

from __future__ import annotations

from pydantic import Field, field_validator

from layerprune.common.config_base import StrictConfig


class BenchConfig(StrictConfig):
    seq_len: int = Field(64, ge=1, description="Prefill length in tokens (MACs and prefill latency).")
    batch_sizes: list[int] = Field([1], min_length=1, description="Batch sizes to time.")
    new_tokens: list[int] = Field([32], min_length=1, description="Tokens to generate per timed generation.")
    warmup: int = Field(3, ge=0, description="Untimed warm-up runs.")
    runs: int = Field(10, ge=1, description="Timed runs (mean and std are reported).")
    prompt_tokens: int = Field(12, ge=1, description="Prompt length of the generation runs (Shortened LLaMA: 12).")
    seed: int = Field(0, description="Seed of the random prompts.")

    @field_validator("batch_sizes", "new_tokens")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if min(value) < 1:
            raise ValueError("every value must be at least 1")
        return value
