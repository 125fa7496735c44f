"""What every stage config shares: strictness, named presets, quality targets, comma lists.

A leaf module: `layerprune.config` and `layerprune.finetune.config` both build on it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """A YAML typo is an error, not a silently ignored key."""

    model_config = ConfigDict(extra="forbid")


def apply_preset(data, presets: dict[str, dict]):
    """Fill every setting a named preset gives unless the setting is given explicitly (None: not given)."""
    if not isinstance(data, dict) or data.get("preset") is None:
        return data
    if data["preset"] not in presets:
        raise ValueError(f"unknown preset {data['preset']!r}; available: {', '.join(presets)}")
    return {**presets[data["preset"]], **{k: v for k, v in data.items() if v is not None}}


class QualityTargetMixin:
    """max_loss_increase / max_ppl_ratio: at most one, read as one budgets.QualityTarget."""

    def quality_target(self):
        """The budgets.QualityTarget these settings name, or None."""
        from layerprune.selection.budgets import QualityTarget

        if self.max_loss_increase is None and self.max_ppl_ratio is None:
            return None
        return QualityTarget(max_loss_increase=self.max_loss_increase, max_ppl_ratio=self.max_ppl_ratio)

    def _check_one_quality_target(self) -> None:
        if self.max_loss_increase is not None and self.max_ppl_ratio is not None:
            raise ValueError("give max_loss_increase or max_ppl_ratio, not both")


def comma_list(value: str | list | None) -> list[str]:
    """'a, b,,c' or a list -> ['a', 'b', 'c'] (empty items dropped; None -> [])."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]
