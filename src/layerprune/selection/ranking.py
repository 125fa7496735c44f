"""From layer scores and constraints to the ORIGINAL indices of the layers to drop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from layerprune.errors import LayerpruneError
from layerprune.importance.base import LayerScores


@dataclass
class Selection:
    dropped: list[int]
    kept: list[int]
    metric: str | None = None
    constraints: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def count_or_share(total: int, count: int | None, ratio: float | None, *, what: str, ratio_name: str = "a ratio"
                   ) -> int:
    """`count`, or `ratio` of `total` rounded to nearest: exactly one given, the ratio inside (0, 1), at least one.
    what / ratio_name: how the messages name the count ("layers to drop") and the ratio ("a ratio")."""
    if (count is None) == (ratio is None):
        raise LayerpruneError(f"give exactly one of a number of {what} or {ratio_name}")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise LayerpruneError(f"{ratio_name.split(' ', 1)[-1]} must be between 0 and 1 (exclusive), got {ratio}")
        count = round(total * ratio)
    if count < 1:
        raise LayerpruneError(f"nothing to {what.rsplit(' ', 1)[-1]}: {count} {what.split(' ')[0]} requested")
    return count


def count_to_drop(n_layers: int, *, num_layers: int | None = None, ratio: float | None = None) -> int:
    """How many layers to drop, given a count or a ratio of the current layers (rounded to nearest)."""
    num_layers = count_or_share(n_layers, num_layers, ratio, what="layers to drop", ratio_name="a ratio")
    if num_layers >= n_layers:
        raise LayerpruneError(f"cannot drop {num_layers} of {n_layers} layers; at least one must stay")
    return num_layers


def protected_layers(layers: list[int], protect_first: int = 0, protect_last: int = 0) -> set[int]:
    """The layers never dropped: the first/last `protect_*` of the CURRENT model, whose layers (original
    indices or positions) are given in order."""
    if protect_first < 0 or protect_last < 0:
        raise LayerpruneError("protect_first and protect_last must be >= 0")
    return set(layers[:protect_first]) | set(layers[len(layers) - protect_last:] if protect_last else [])


def select_layers(
    scores: LayerScores,
    *,
    num_layers: int | None = None,
    ratio: float | None = None,
    protect_first: int = 0,
    protect_last: int = 0,
) -> Selection:
    """Drop the lowest-scored layers. Ties go to the deeper layer. Protected layers are never dropped.

    protect_first/protect_last count the first/last layers of the CURRENT model.
    """
    n = len(scores.layers)
    k = count_to_drop(n, num_layers=num_layers, ratio=ratio)
    protected = protected_layers(scores.layers, protect_first, protect_last)
    if scores.params.get("block_size"):
        return _select_block(scores, k, protected, protect_first, protect_last)
    candidates = [layer for layer in scores.ranking() if layer not in protected]
    if k > len(candidates):
        raise LayerpruneError(f"cannot drop {k} layers: only {len(candidates)} are not protected")
    dropped = sorted(candidates[:k])
    return Selection(
        dropped=dropped,
        kept=[layer for layer in scores.layers if layer not in dropped],
        metric=scores.metric,
        constraints={"num_layers": k, "protect_first": protect_first, "protect_last": protect_last},
    )


def _select_block(scores: LayerScores, k: int, protected: set[int], protect_first: int, protect_last: int) -> Selection:
    """Block metrics (angular): values[i] scores the block of `block_size` layers starting at i; drop the lowest.

    Another block size k is served from the metric's table of every size (extra["distances"]), so a budget can
    try several counts from one scoring pass.
    """
    m = int(scores.params["block_size"])
    values = scores.values
    if k != m:
        table = scores.extra.get("distances") or {}
        if str(k) not in table:
            raise LayerpruneError(f"{scores.metric} scored blocks of {m} layers but {k} layers are to be dropped")
        m, values = k, table[str(k)]
    starts = [
        (value, start)
        for start, value in enumerate(values)
        if value == value and start + m <= len(scores.layers)  # NaN marks an invalid start
        and not protected & set(scores.layers[start : start + m])
    ]
    if not starts:
        raise LayerpruneError(f"no block of {m} unprotected consecutive layers to drop")
    _, start = min(starts, key=lambda t: (t[0], -t[1]))
    dropped = scores.layers[start : start + m]
    return Selection(
        dropped=list(dropped),
        kept=[layer for layer in scores.layers if layer not in dropped],
        metric=scores.metric,
        constraints={"num_layers": k, "block_size": m, "protect_first": protect_first, "protect_last": protect_last},
    )
