"""Training data mixes: `c4+dolly`, `c4:3+dolly:1`: several sources, each tokenized as its kind (general text
in blocks with the loss on every token, instruction data with the chat template and the loss on the
response), interleaved in fixed proportions so every stretch of training sees the same mix."""

from __future__ import annotations

import os

from layerprune.errors import LayerpruneError


def is_mix(spec: str | None) -> bool:
    """Several sources (`a+b`), or one with a weight (`c4:2`, `c4:-1`: read as a mix, so a bad weight is named
    as one instead of searched for as a file); a path that exists stays a path."""
    if not spec:
        return False
    head, sep, tail = spec.rpartition(":")
    return "+" in spec or (bool(sep and head) and _is_number(tail) and not os.path.exists(spec))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """[(source, weight)] of 'a:3+b:1' ('a+b': equal weights). A suffix is a weight only if it is a number,
    so a path with a colon stays a path."""
    parts = []
    for item in (p.strip() for p in spec.split("+")):
        if not item:
            raise LayerpruneError(f"empty source in the data mix {spec!r}; write sources as c4+dolly or c4:3+dolly:1")
        source, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                source, weight = head, float(tail)
            except ValueError:
                pass
        if not weight > 0 or weight == float("inf"):
            raise LayerpruneError(f"the weight of {source!r} in the data mix {spec!r} must be a positive number")
        parts.append((source, weight))
    if len({s for s, _ in parts}) != len(parts):
        raise LayerpruneError(f"a source appears twice in the data mix {spec!r}")
    return parts


def interleave(parts: list[list[dict]], weights: list[float], limit: int | None = None
               ) -> tuple[list[dict], list[int]]:
    """(rows of all parts in proportion to the weights, rows taken from each part): each next row comes from
    the part furthest behind its share; stops when a part runs out (so the proportions hold) or at `limit`."""
    total = sum(weights)
    taken = [0] * len(parts)
    out: list[dict] = []
    while limit is None or len(out) < limit:
        n = len(out) + 1
        behind = max(range(len(parts)), key=lambda i: (n * weights[i] / total - taken[i], -i))
        if taken[behind] >= len(parts[behind]):
            break
        out.append(parts[behind][taken[behind]])
        taken[behind] += 1
    return out, taken
