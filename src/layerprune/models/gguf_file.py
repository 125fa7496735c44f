"""Prune a GGUF file directly: the kept blocks' tensors are copied byte for byte in their quantization type.

GGUF in, GGUF out, with llama.cpp's own container library (`gguf` on PyPI). Each kept `blk.N.*` tensor
is renamed to its new block number and written with the exact bytes and type it had; every other tensor
(embeddings, output, norms, rope factors) is copied as it is. In the metadata, `{arch}.block_count` and
every per-layer array (any `{arch}.*` array with one entry per block: head counts, feed-forward lengths,
sliding-window flags) keep the kept layers' entries; everything else (tokenizer, chat template, general.*)
is copied unchanged. Architectures whose sliding-window layers llama.cpp derives from the layer number
(Gemma-2 every 2nd, Gemma-3 every 6th layer global) get the kept layers' flags as an explicit
`{arch}.attention.sliding_window_pattern` array, because after a cut the numbering no longer tells.
`layerprune.dropped_layers` and `layerprune.provenance` record what was removed, in ORIGINAL indices,
so a second prune, `layerprune info` and layerprune's loader still speak original layer numbers.

Only headers and one tensor at a time are read (the file is memory-mapped); nothing is dequantized.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from layerprune.errors import LayerpruneError, first_line
from layerprune.files.outputs import atomic_output_file
from layerprune.files.user_files import check_free_space
from layerprune.models.experts.gguf_cut import cut_gguf_experts
from layerprune.models.gguf_checks import check_blocks, check_per_layer_arrays, check_tensor_data
from layerprune.models.prune_result import PruneResult
from layerprune.models.surgery import check_drop, pruned_provenance

# GGUF architectures that transformers reads and layerprune supports (mistral files mostly say "llama").
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen2moe", "qwen3moe")
# llama.cpp's default sliding-window rule when a file has no per-layer array: layer il is sliding when
# il % n < n - 1 (models/gemma2.cpp, models/gemma3.cpp: load_swa_pattern).
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6}
PROVENANCE_KEY = "layerprune.provenance"
DROPPED_KEY = "layerprune.dropped_layers"
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass
class GgufLayout:
    """What layerprune needs to know of a GGUF file's layers."""

    arch: str
    block_count: int
    provenance: dict  # as config.json's `layerprune` entry: original_num_layers, kept_layers, dropped_layers
    sliding: list[bool] | None  # per current block, for architectures with interleaved sliding windows


def reader(path: str | os.PathLike):
    """gguf.GGUFReader of `path`, with one clear error for what is not a readable GGUF file."""
    import struct

    import gguf

    if not Path(path).is_file():
        raise LayerpruneError(f"GGUF file not found: {path}")
    try:
        r = gguf.GGUFReader(str(path))
    except OSError as err:
        raise LayerpruneError(f"could not read {path}: {err.strerror or err}") from err
    except (ValueError, IndexError, KeyError, struct.error, EOFError) as err:
        raise LayerpruneError(f"could not read {path} as a GGUF model: it is truncated or corrupt "
                              f"({first_line(err)})") from err
    check_tensor_data(r, path)
    return r


def field_value(field):
    """A metadata value as the writer takes it: numbers as Python numbers, strings as their exact bytes."""
    import gguf

    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[1] == gguf.GGUFValueType.ARRAY:
            raise LayerpruneError(f"metadata {field.name} is an array of arrays, which layerprune cannot copy")
        if len(field.types) > 1 and field.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]])
    return field.parts[field.data[0]].tolist()[0]


def _scalar(fields, key: str, default=None):
    field = fields.get(key)
    return default if field is None else field_value(field)


def _architecture(r) -> str:
    value = _scalar(r.fields, "general.architecture")
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def check_gguf(path: str | os.PathLike) -> None:
    """The header of a GGUF file checked against its data (models/gguf_checks.py), before a loader reads
    it: tensor data for every file, blocks and per-layer arrays for the architectures layerprune prunes."""
    r = reader(path)
    if _architecture(r) in SUPPORTED_ARCHS:
        layout(r)


def layout(source) -> GgufLayout:
    """The layers of a GGUF file (a path or a gguf.GGUFReader); refuses an architecture layerprune does not
    prune."""
    r = source if hasattr(source, "fields") else reader(source)
    arch = _architecture(r)
    if arch not in SUPPORTED_ARCHS:
        raise LayerpruneError(f"GGUF architecture {arch!r} is not supported for pruning "
                              f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    count = _scalar(r.fields, f"{arch}.block_count")
    if not isinstance(count, int) or count < 1:
        raise LayerpruneError(f"GGUF file has no valid {arch}.block_count")
    where = getattr(r.data, "filename", None) or "the GGUF file"
    check_blocks(r, arch, count, where)  # before any weight is read: the header against the tensors
    check_per_layer_arrays(r.fields, arch, count, where)
    stored = _scalar(r.fields, PROVENANCE_KEY)
    if stored is not None:
        try:
            record = json.loads(stored)
            assert len(record["kept_layers"]) == count
        except (ValueError, KeyError, TypeError, AssertionError) as err:
            raise LayerpruneError(f"GGUF metadata {PROVENANCE_KEY} is damaged or does not match "
                                  f"{arch}.block_count={count}") from err
    else:
        record = {"original_num_layers": count, "kept_layers": list(range(count)), "dropped_layers": []}
    return GgufLayout(arch, count, record, _sliding_flags(r.fields, arch, count))


def _sliding_flags(fields, arch: str, count: int) -> list[bool] | None:
    """Which current blocks use sliding-window attention, as llama.cpp reads the file."""
    if arch not in SWA_PATTERNS:
        return None
    stored = _scalar(fields, f"{arch}.attention.sliding_window_pattern")
    if isinstance(stored, list):
        return [bool(flag) for flag in stored]
    n = stored if isinstance(stored, int) else SWA_PATTERNS[arch]
    return [n == 0 or i % n < n - 1 for i in range(count)]


def apply_layout(config, path: str | os.PathLike) -> None:
    """Complete the config transformers built from a GGUF file with what its loader does not read: the
    layerprune provenance (original layer numbers) and, for Gemma-2/3, which layers use sliding windows
    (transformers derives them from the layer number, which a cut file no longer tells)."""
    r = reader(path)
    if _architecture(r) not in SUPPORTED_ARCHS:
        return  # an architecture layerprune does not prune: nothing to add
    shape = layout(r)
    text = config.get_text_config()
    if shape.provenance["dropped_layers"]:
        config.layerprune = shape.provenance
    if shape.sliding is not None and getattr(text, "layer_types", None) is not None:
        text.layer_types = ["sliding_attention" if flag else "full_attention" for flag in shape.sliding]


def gguf_config(path: str | os.PathLike):
    """The transformers config of a GGUF file from its metadata and tensor names alone, as the conversion
    (models/loading.py) builds it and completed by apply_layout: no tensor data is read or dequantized (the
    header is checked against the data's offsets first)."""
    from transformers import AutoConfig  # heavy: transformers' config classes

    path = Path(path)
    check_gguf(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as err:
        raise LayerpruneError(f"could not read the config of {path} from its GGUF metadata: {first_line(err)}") from err
    apply_layout(config, path)
    return config


def pruned_metadata(fields, arch: str, keep: list[int], count: int, swa: list[bool] | None, record: dict) -> dict:
    """{key: (value, type, sub_type)} of the output: per-layer values cut to `keep` (positions), the rest as is."""
    import gguf

    out = {}
    for key, field in fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the reader's header, the writer's own
            continue
        value = field_value(field)
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        if key == f"{arch}.block_count":
            value = len(keep)
        elif kind == gguf.GGUFValueType.ARRAY and key.startswith(f"{arch}.") and len(value) == count:
            value = [value[p] for p in keep]  # one entry per block
        out[key] = (value, kind, sub)
    if swa is not None:
        out[f"{arch}.attention.sliding_window_pattern"] = (
            [swa[p] for p in keep], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)
    if record["dropped_layers"]:  # GGUF has no empty arrays (an expert cut alone drops no layer)
        out[DROPPED_KEY] = (record["dropped_layers"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    out[PROVENANCE_KEY] = (json.dumps(record), gguf.GGUFValueType.STRING, None)
    return out


def prune_gguf(
    src: str | os.PathLike,
    drop: list[int],
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    how: dict | None = None,
    source: str | None = None,
    inputs=(),
    drop_experts: dict[int, list[int]] | None = None,
) -> PruneResult:
    """Write `src` without the layers of ORIGINAL indices `drop` (and, for a MoE file, the experts `drop_experts`
    {ORIGINAL layer: [ORIGINAL experts]} of the layers that stay: models/experts/gguf_cut.py) to the GGUF file
    `out` (atomically).

    how: the selection record kept in the provenance history ({"chosen_by": "explicit"} by default);
    source: the name the original is recorded under (default: the file's path)."""
    import gguf

    r = reader(src)
    shape = layout(r)
    record = {**shape.provenance}
    record.setdefault("source", source or str(src))
    drop = check_drop(record, drop)
    how = {"chosen_by": "explicit", **(how or {})}
    keep, new_record = pruned_provenance(record, drop, how) if drop or drop_experts is None else (
        list(range(shape.block_count)), record)  # experts alone: no layer step in the history
    rows, experts, n_experts = {}, {}, None
    if drop_experts is not None:
        rows, n_experts, new_record, experts = cut_gguf_experts(
            shape.arch, _scalar(r.fields, f"{shape.arch}.expert_count"), _scalar(r.fields, f"{shape.arch}.expert_used_count"),
            {t.name: tuple(t.data.shape) for t in r.tensors}, record["kept_layers"], keep, new_record, drop_experts, how)
    tensors = _kept_tensors(r, keep, shape.block_count, src, rows)
    metadata = pruned_metadata(r.fields, shape.arch, keep, shape.block_count, shape.sliding, new_record)
    if n_experts is not None:
        metadata[f"{shape.arch}.expert_count"] = (n_experts, gguf.GGUFValueType.UINT32, None)
    alignment = _scalar(r.fields, "general.alignment")
    alignment = alignment if isinstance(alignment, int) else None
    # the tensors, the metadata (the source's header bounds it: the tokenizer's vocabulary is most of it, tens of
    # MB for a large vocabulary) and the padding that aligns each tensor
    header = int(r.data_offset) + (alignment or gguf.GGUF_DEFAULT_ALIGNMENT) * len(tensors)
    check_free_space(out, sum(int(t.nbytes) for _, t, _ in tensors) + header, "the pruned GGUF")
    with atomic_output_file(out, overwrite, inputs=[src, *inputs]) as tmp:
        writer = gguf.GGUFWriter(tmp, shape.arch, endianess=r.endianess)
        if alignment is not None:
            writer.data_alignment = alignment
        for key, (value, kind, sub) in metadata.items():
            writer.add_key_value(key, value, kind, sub_type=sub)
        for name, data, tensor in tensors:
            writer.add_tensor(name, data, raw_dtype=tensor.tensor_type, tensor_endianess=r.endianess)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return PruneResult(
        out=Path(out), dropped=drop, chosen_by=how["chosen_by"], how=how, on_disk=True,
        layers_before=shape.block_count, layers_after=len(keep),
        params_before=sum(int(t.n_elements) for t in r.tensors),
        params_after=sum(int(t.n_elements) * data.shape[0] // max(t.data.shape[0], 1) for _, data, t in tensors),
        bytes_before=sum(int(t.n_bytes) for t in r.tensors), bytes_after=sum(int(data.nbytes) for _, data, _ in tensors),
        shards=1, experts=experts,
    )


class RowSlice:
    """Rows of a memory-mapped tensor (its outer axis), read one row at a time when the writer writes them, so an
    expert cut holds no tensor in memory. What gguf.GGUFWriter asks of a tensor: shape, dtype, nbytes, tofile."""

    def __init__(self, data, rows: tuple[int, ...]) -> None:
        self.data, self.rows = data, rows
        self.shape = (len(rows), *data.shape[1:])
        self.dtype = data.dtype
        self.nbytes = len(rows) * (data.nbytes // data.shape[0])

    def tofile(self, fout) -> None:
        for row in self.rows:
            self.data[row].tofile(fout)


def _kept_tensors(r, keep: list[int], block_count: int, src, rows: dict) -> list[tuple]:
    """(new name, data as stored, the source tensor) of every kept tensor: blocks renumbered, and the rows an expert
    cut keeps (the outer axis of the raw data; a quantized row is whole blocks)."""
    positions = {old: new for new, old in enumerate(keep)}
    tensors = []
    for tensor in r.tensors:
        data = RowSlice(tensor.data, rows[tensor.name]) if tensor.name in rows else tensor.data
        match = _BLOCK.match(tensor.name)
        if match is None:
            tensors.append((tensor.name, data, tensor))
        elif int(match.group(1)) in positions:
            tensors.append((f"blk.{positions[int(match.group(1))]}.{match.group(2)}", data, tensor))
        elif int(match.group(1)) >= block_count:
            raise LayerpruneError(f"{src} has tensor {tensor.name} beyond its {block_count} blocks")
    return tensors


def tensor_groups(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """{group: {quantization type: tensor count}}: embeddings, attention, feed-forward, norms, output, other."""
    groups: dict[str, dict[str, int]] = {}
    for tensor in reader(path).tensors:
        name = tensor.name
        part = name.split(".", 2)[2] if name.startswith("blk.") else name
        group = ("norms" if "norm" in part else "attention" if part.startswith("attn") else
                 "feed-forward" if part.startswith("ffn") else "embeddings" if part.startswith("token_embd") else
                 "output" if part.startswith("output") else "other")
        kinds = groups.setdefault(group, {})
        kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + 1
    return groups
