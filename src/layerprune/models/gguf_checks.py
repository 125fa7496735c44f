"""A GGUF file's header checked against its data before any weight is read.

The `gguf` reader takes a header at its word: a `block_count` of 8 over 6 blocks, a missing `blk.1`, a block
numbered both `blk.1` and `blk.01`, a per-layer array shorter than the layer count, two tensors whose data
overlap. Pruned or converted as they stand, such files give a GGUF that still claims the missing blocks or a
folder whose missing layers transformers fills with random weights, without a word. Each is refused here
in one line naming what does not fit.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import Counter

from layerprune.errors import LayerpruneError

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# The metadata llama.cpp reads either as one value or as an array with one entry per block (get_key_or_arr).
PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv",
                  "attention.sliding_window_pattern")


def check_tensor_data(r, path: str | os.PathLike) -> None:
    """Every tensor's bytes inside the file's data and overlapping no other tensor's."""
    size = len(r.data)
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in r.tensors)
    for (start, end, name), following in zip(spans, spans[1:] + [None]):
        if end > size:
            raise LayerpruneError(f"{path}: tensor {name} ends at byte {end}, past the end of the file ({size} "
                                  "bytes); the file is truncated or corrupt")
        if following is not None and following[0] < end:
            raise LayerpruneError(f"{path}: the data of tensors {name} and {following[2]} overlap (bytes "
                                  f"{following[0]}-{min(end, following[1])}); the file is corrupt")


def check_blocks(r, arch: str, count: int, path: str | os.PathLike) -> None:
    """Blocks `blk.0` .. `blk.{count-1}` each present once, under its plain number, with the same tensors."""
    parts: dict[int, set[str]] = {}
    for tensor in r.tensors:
        match = _BLOCK.match(tensor.name)
        if match is None:
            continue
        number = match.group(1)
        if number != str(int(number)):  # blk.01: llama.cpp names blocks blk.%d and would never read it
            raise LayerpruneError(f"{path}: tensor {tensor.name} has a block number written {number!r}; GGUF "
                                  f"blocks are numbered blk.0, blk.1, ... (the file is damaged)")
        parts.setdefault(int(number), set()).add(match.group(2))
    beyond = sorted(n for n in parts if n >= count)
    if beyond:
        raise LayerpruneError(f"{path}: {arch}.block_count says {count} blocks, but the file holds tensors of "
                              f"block {beyond[0]} (blocks 0-{max(parts)}); the header does not match the data")
    if len(parts) < count:  # the first few missing only: a block_count of 2**31 must cost nothing
        missing = list(itertools.islice((n for n in range(count) if n not in parts), 6))
        shown = ", ".join(f"blk.{n}" for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise LayerpruneError(f"{path}: {arch}.block_count says {count} blocks, but the file has no tensors of "
                              f"{shown}; its loader would fill them with random weights, so it is refused")
    usual, _ = Counter(frozenset(p) for p in parts.values()).most_common(1)[0]
    for number in range(count):
        if parts[number] != usual:
            lacks = sorted(usual - parts[number]) or sorted(parts[number] - usual)
            how = "lacks" if usual - parts[number] else "has an extra"
            raise LayerpruneError(f"{path}: block blk.{number} {how} {lacks[0]}, unlike the other blocks; the file "
                                  "is damaged")


def check_per_layer_arrays(fields, arch: str, count: int, path: str | os.PathLike) -> None:
    """A per-layer metadata array holds one entry per block."""
    for key in PER_LAYER_KEYS:
        field = fields.get(f"{arch}.{key}")
        if field is None or len(field.types) < 2:  # absent, or one value for every block
            continue
        if len(field.data) != count:
            raise LayerpruneError(f"{path}: metadata {arch}.{key} has {len(field.data)} entries for "
                                  f"{arch}.block_count={count} blocks; the header is inconsistent")
