"""What a prune did, the same record whether the model was loaded (api.prune_model) or its checkpoint was
pruned on disk (models.checkpoint.prune_checkpoint), so every caller prints and tests one type."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PruneResult:
    out: Path
    dropped: list[int]
    chosen_by: str
    layers_before: int
    layers_after: int
    params_before: int  # on disk: values stored in the checkpoint (tied weights are stored once)
    params_after: int
    samples_before: list[dict] = field(default_factory=list)
    samples_after: list[dict] = field(default_factory=list)
    how: dict = field(default_factory=dict)  # the selection record (budgets keep their measured numbers here)
    granularity: str = "block"  # what went from each dropped layer: the whole block, its attention or its MLP
    rounds: list[dict] = field(default_factory=list)  # an iterative schedule: each round's selection record
    on_disk: bool = False  # pruned tensor by tensor without loading the model
    bytes_before: int | None = None  # on disk: the checkpoint's tensor bytes, and the output's
    bytes_after: int | None = None
    shards: int | None = None  # on disk: weight files written
    # Mixture-of-experts: the expert removal's record ({"dropped": {ORIGINAL layer: [ORIGINAL experts]},
    # "chosen_by", "experts_per_layer", ...}); empty when no expert went.
    experts: dict = field(default_factory=dict)
