"""Choosing drop-sets by their validation loss: a greedy search, drop-set paths and quality targets.

- `SearchPath`: greedy removal as in SLEB (arXiv 2402.09025): step k removes the layer whose removal,
  given the k-1 already removed, raises the validation loss least. With a beam of B, each step keeps
  the B best drop-sets of its size and tries every extension of each (BlockPruner, arXiv 2406.10594,
  searches block by block the same way). `swap_pass` then offers each removed layer back in exchange
  for a kept one, when that lowers the loss.
- A path gives, for each count k, one drop-set and its loss: the search's, a metric's own k lowest
  (`MetricPath`), or the best of several metrics' (`BestPath`, select auto).
- `choose_by_loss`: the selection record of `select: search`, and of any select under a quality target
  (max_loss_increase / max_ppl_ratio), alone or guarding a size/speed target.

Every loss is measured on held-out calibration text (the validation text of select auto, drawn with
data.calibration.VALIDATION_SEED_OFFSET), never on the text that ranks the metrics, and comes from one
selection.drop_set_losses.DropSetLosses, so all passes share its cached hidden states. `select_objective`
(objectives.py) makes that "loss" the KL to the unpruned model on the same text, or the loss of task
answers; quality targets need the plain loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.importance import LayerScores
from layerprune.models.anatomy import count_parameters
from layerprune.models.provenance_labels import get_objective
from layerprune.models.surgery import kept_layers
from layerprune.selection.budgets import latency_along, measure_layer_costs, metric_drop_at, most_within, params_along
from layerprune.selection.config import PruneConfig
from layerprune.selection.drop_set_losses import DropSetLosses
from layerprune.selection.objectives import describe_value, objective_record
from layerprune.selection.ranking import protected_layers
from layerprune.selection.scores import prune_metric_requests

Log = Callable[[str], None]


@dataclass(frozen=True)
class Point:
    """One drop-set on a path: k layers (POSITIONS in the current model), its loss and who proposed it."""

    k: int
    positions: frozenset
    loss: float
    label: str


def allowed_positions(n_layers: int, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """Positions of the current model a search may drop (selection.protected_layers keeps the others)."""
    protected = protected_layers(list(range(n_layers)), protect_first, protect_last)
    return [p for p in range(n_layers) if p not in protected]


class SearchPath:
    """Greedy (beam) drop-set search; `at(k)` runs steps until size k is reached (memoized)."""

    label = "search"

    def __init__(self, losses: DropSetLosses, allowed: list[int], layers: list[int], *, beam: int = 1,
                 log: Log | None = None, judged_by: str = "validation loss") -> None:
        if beam < 1:
            raise LayerpruneError(f"the search beam must be at least 1, got {beam}")
        self.losses, self.allowed, self.layers, self.beam_width = losses, list(allowed), list(layers), beam
        self.log, self.judged_by = log, judged_by
        self.beam: list[frozenset] = [frozenset()]
        self.steps: list[dict] = []  # the search path: each step's candidates, beam and best drop-set
        self.points: list[Point] = []

    def at(self, k: int) -> Point | None:
        while len(self.points) < k:
            if not self._step():
                return None
        return self.points[k - 1] if k >= 1 else None

    def _step(self) -> bool:
        k = len(self.points) + 1
        if k >= self.losses.n or k > len(self.allowed):  # at least one layer stays
            return False
        tried: dict[frozenset, dict] = {}
        for rank, parent in enumerate(self.beam):
            for p in self.allowed:
                child = parent | {p}
                if p not in parent and child not in tried:
                    tried[child] = {"parent": rank, "add": self.layers[p], "loss": self.losses.loss(child)}
        ranked = sorted(tried, key=lambda c: (tried[c]["loss"], sorted(c)))
        self.beam = ranked[: self.beam_width]
        self.losses.retain(self.beam)  # forget states no extension of the new beam can resume from
        for drop in self.beam:
            self.losses.ensure_chain(drop)
        best = self.beam[0]
        self.points.append(Point(k, best, tried[best]["loss"], self.label))
        self.steps.append({
            "k": k, "dropped": self.original(best), "loss": tried[best]["loss"],
            "beam": [{"dropped": self.original(d), "loss": tried[d]["loss"]} for d in self.beam],
            "candidates": sorted(tried.values(), key=lambda c: c["loss"]),
        })
        if self.log:
            self.log(f"search step {k}: removed layer {tried[best]['add']} -> {self.original(best)} ({self.judged_by} "
                     f"{tried[best]['loss']:.4f}, {len(tried)} candidates)")
        return True

    def original(self, positions) -> list[int]:
        return sorted(self.layers[p] for p in positions)


class MetricPath:
    """A metric's own drop-set of each size (a block metric: its best block of k), scored by its loss."""

    def __init__(self, losses: DropSetLosses, scores: LayerScores, *, protect_first: int = 0,
                 protect_last: int = 0) -> None:
        self.losses, self.scores, self.label = losses, scores, scores.metric
        self.drop_at = metric_drop_at(scores, protect_first=protect_first, protect_last=protect_last)
        self._position = {layer: pos for pos, layer in enumerate(scores.layers)}

    def at(self, k: int) -> Point | None:
        dropped = self.drop_at(k) if k >= 1 else None
        if dropped is None:
            return None
        positions = frozenset(self._position[i] for i in dropped)
        point = Point(k, positions, self.losses.loss(positions), self.label)
        self.losses.retain([positions])  # keep what its next, usually larger drop-set can resume from
        return point


class BestPath:
    """For each k, the lowest-loss drop-set among several paths (select auto under a quality target)."""

    label = "auto"

    def __init__(self, paths: list) -> None:
        self.paths = paths

    def at(self, k: int) -> Point | None:
        points = [point for path in self.paths if (point := path.at(k)) is not None]
        return min(points, key=lambda p: (p.loss, p.label)) if points else None


def swap_pass(losses: DropSetLosses, dropped, allowed: list[int], layers: list[int], log: Log | None = None,
              judged_by: str = "validation loss") -> tuple[frozenset, list[dict]]:
    """One pass over the removed layers: each goes back in exchange for the kept layer whose removal instead
    gives the lowest loss, if that is lower than the current loss. Returns the drop-set and the swaps made."""
    current = frozenset(dropped)
    loss = losses.loss(current)
    swaps = []
    for removed in sorted(current):
        losses.ensure_chain(current)  # trials share the current drop-set's states up to their first change
        trials = {p: losses.loss(current - {removed} | {p}) for p in allowed if p not in current}
        if not trials:
            continue
        best = min(trials, key=lambda p: (trials[p], p))
        if trials[best] < loss:
            swaps.append({"restored": layers[removed], "removed": layers[best], "loss_before": loss,
                          "loss": trials[best], "tried": len(trials)})
            if log:
                log(f"swap: layer {layers[removed]} back, layer {layers[best]} out ({judged_by} {loss:.4f} -> "
                    f"{trials[best]:.4f})")
            current, loss = current - {removed} | {best}, trials[best]
    return current, swaps


# ---------------------------------------------------------------- choosing by validation loss


def validation_data(validation):
    if validation is None:
        raise LayerpruneError("choosing layers by validation loss needs held-out calibration text")
    return validation() if callable(validation) else validation


def choose_by_loss(model: nn.Module, config: PruneConfig, *, score, validation, n_drop: int | None = None,
                   log: Log = print) -> dict:
    """The selection record of select search, or of a quality target with any select (see the module doc).

    n_drop: the count when the config fixes one (num_layers, ratio, an iterative round); else the targets
    decide. score: the strategies.ScoreFn that metric paths read.
    """
    layers = kept_layers(model)
    data = validation_data(validation)
    objective = get_objective(config.select_objective)
    losses = DropSetLosses(model, data, measure=objective.measure)
    allowed = allowed_positions(len(layers), config.protect_first, config.protect_last)
    if not allowed:
        raise LayerpruneError(f"protect_first {config.protect_first} and protect_last {config.protect_last} cover all "
                              f"{len(layers)} layers, so no layer can be dropped; protect fewer")
    path, scores = _path(config, losses, allowed, layers, score, log, objective.label)
    point, constraints = _count(model, config, path, losses, layers, n_drop)
    record = {"dropped": sorted(layers[p] for p in point.positions), "chosen_by": point.label,
              "granularity": "block"}
    if isinstance(path, SearchPath):
        search = {"beam": config.search_beam, "swap": config.search_swap, "path": path.steps}
        if config.search_swap:
            positions, search["swaps"] = swap_pass(losses, point.positions, allowed, layers, log, objective.label)
            point = Point(point.k, positions, losses.loss(positions), point.label)
            record["dropped"] = sorted(layers[p] for p in positions)
        record["search"] = search
    else:
        record["path"] = [{"k": k, "dropped": sorted(layers[p] for p in pt.positions), "loss": pt.loss,
                           "chosen_by": pt.label} for k in range(1, point.k + 1) if (pt := path.at(k))]
        chosen = scores[point.label]
        record.update(metric_params=chosen.params, **({"calibration": chosen.calibration} if chosen.calibration
                                                       else {}))
    if isinstance(path, BestPath):
        record["chosen_by"] = f"auto:{point.label}"
        record["candidates"] = {p.label: {"dropped": sorted(layers[q] for q in pt.positions),
                                          "validation_loss": pt.loss}
                                for p in path.paths if (pt := p.at(point.k))}
    quality = config.quality_target()
    if quality is not None:
        constraints.update(quality.record(point.loss - losses.intact_loss))
    record["constraints"] = {"num_layers": point.k, "protect_first": config.protect_first,
                             "protect_last": config.protect_last, **constraints}
    record["validation"] = {**objective_record(objective.name, point.loss, losses.intact_loss, data.description),
                            "block_forwards": losses.block_forwards,
                            "naive_block_forwards": losses.naive_block_forwards}
    log(f"{describe_value(objective.name, point.loss, losses.intact_loss)} without layers {record['dropped']}; "
        f"{losses.block_forwards} block forwards ({losses.naive_block_forwards} without cached states)")
    return record


def _path(config: PruneConfig, losses: DropSetLosses, allowed: list[int], layers: list[int], score, log,
          judged_by: str):
    """The path of the config's select, and the metric scores it read ({} for a search)."""
    if config.select == "search":
        return SearchPath(losses, allowed, layers, beam=config.search_beam, log=log, judged_by=judged_by), {}

    scores = score(prune_metric_requests(config, len(layers), None))
    paths = [MetricPath(losses, s, protect_first=config.protect_first, protect_last=config.protect_last)
             for s in scores.values()]
    return (paths[0] if config.select == "metric" else BestPath(paths)), scores


def _count(model, config: PruneConfig, path, losses: DropSetLosses, layers: list[int], n_drop: int | None
           ) -> tuple[Point, dict]:
    """The path's drop-set of the count the config asks for, and what the budgets measured."""
    def point_at(k: int) -> Point:
        point = path.at(k)
        if point is None:
            raise LayerpruneError(f"cannot drop {k} of {len(layers)} layers: protect_first/protect_last leave "
                                  f"{len(allowed_positions(len(layers), config.protect_first, config.protect_last))}")
        return point

    if n_drop is not None:
        return point_at(n_drop), {}
    quality = config.quality_target()
    limit = losses.intact_loss + quality.allowed_increase if quality else math.inf

    def loss_at(k: int) -> float | None:
        return point.loss if (point := path.at(k)) else None

    def drop_at(k: int) -> list[int] | None:
        return sorted(layers[p] for p in point.positions) if (point := path.at(k)) else None

    constraints: dict = {}
    if config.target_params is None and config.target_latency is None:  # the quality target alone: the most layers
        k, over = most_within(loss_at, limit, len(layers))
        if k == 0 and over is None:
            raise LayerpruneError(f"{quality.describe()}: protect_first/protect_last leave no layer to drop")
        if k == 0:
            increase = over[1] - losses.intact_loss
            raise LayerpruneError(f"{quality.describe()} is unreachable: removing even one layer raises the validation "
                                  f"loss by {quality.as_target(increase)} (the best drop-set found); reachable: "
                                  f"{quality.needed(increase)}")
        return point_at(k), {}
    size, size_left = _size_target(model, config, layers)
    if config.target_params is not None:
        dropped, constraints = params_along(model, drop_at, config.target_params)
    else:
        dropped, constraints = latency_along(model, drop_at, config.target_latency, costs=size_left.costs)
    point = point_at(len(dropped))
    if point.loss > limit:  # the size/speed target sets the count; the quality target must hold there
        increase = point.loss - losses.intact_loss
        k, _ = most_within(loss_at, limit, point.k)
        reachable = f"{quality.needed(increase)} with this {size}"
        if k:
            allows = f"allows at most {k} ({quality.as_target(path.at(k).loss - losses.intact_loss)})"
            reachable += f", or {size_left(drop_at(k))} with this {quality.key}"
        else:
            allows = "allows not even one"
        raise LayerpruneError(
            f"{size} and {quality.describe()} cannot both hold: {size} needs at least {point.k} of {len(layers)} "
            f"layers removed, which raises the validation loss by {quality.as_target(increase)}, and "
            f"{quality.describe()} {allows}; reachable: {reachable}")
    return point, constraints


class _SizeLeft:
    """What a drop-set leaves of the size/speed target's measure, written as the target it would meet."""

    def __init__(self, model, config: PruneConfig, layers: list[int]) -> None:
        self.costs = None
        if config.target_params is not None:
            params = count_parameters(model)
            self.total, self.per_layer = params["total"], dict(zip(layers, params["per_layer"]))
        else:
            self.costs = measure_layer_costs(model, mode=config.latency_mode)
            self.total, self.per_layer = self.costs["total_s"], dict(zip(layers, self.costs["layer_s"]))

    def __call__(self, dropped: list[int]) -> str:
        left = self.total - sum(self.per_layer[i] for i in dropped)
        if self.costs is None:
            return f"target_params >= {left:,}"
        return f"target_latency >= {math.ceil(left / self.total * 1000) / 1000:g}"


def _size_target(model, config: PruneConfig, layers: list[int]) -> tuple[str, _SizeLeft]:
    name = "target_params" if config.target_params is not None else "target_latency"
    return f"{name} {getattr(config, name)}", _SizeLeft(model, config, layers)
