"""Prune a safetensors checkpoint on disk, tensor by tensor, without ever loading the model.

For models bigger than the machine's memory, and for speed: pruning by explicit indices only
renames tensors, so there is no need to build the model. Plan, then execute (mergekit's habit):

- `read_checkpoint(folder)`: every tensor's name, dtype, shape and byte range, from the
  safetensors headers alone (`model.safetensors` or shards + `model.safetensors.index.json`);
- `find_layers_prefix(names, layers_path)`: how this checkpoint spells the decoder's block list
  ("model.layers", or e.g. "h" for GPT-2 files saved without the "transformer." wrapper);
- `plan_renames(names, prefix, keep_positions)`: old name -> new name, or None for a dropped
  layer's tensor. Pure;
- `plan_shards(tensors, max_shard_size)`: which output file each kept tensor goes to. Pure;
- `prune_checkpoint(...)`: executes the plans into an atomic output folder.

Executing copies each kept tensor's byte range from its source shard into its output shard,
one tensor at a time, through the kernel (`os.copy_file_range`) or a bounded buffer: no tensor is
decoded, so every dtype passes bit-exact and memory stays flat whatever the model's size. The
config is rewritten by the same function as in-memory surgery (`surgery.rewrite_config`), with
the same provenance record, so both paths give the same folder.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from layerprune.errors import LayerpruneError, shorten
from layerprune.files.outputs import atomic_output_dir, check_output_dir, read_json, write_json
from layerprune.files.user_files import check_free_space
from layerprune.models.anatomy import family_spec, supported_model_types
from layerprune.models.experts.checkpoint import cut_experts_on_disk
from layerprune.models.model_config import loads_tokenizer, read_model_config, trusts_remote_code
from layerprune.models.prune_result import PruneResult
from layerprune.models.saving import RECORD_FILE, SIDE_FILES_BYTES, write_record_file
from layerprune.models.sublayer import WEIGHTS_NAME as SUBLAYER_WEIGHTS
from layerprune.models.surgery import check_drop, config_provenance, pruned_provenance, rewrite_config

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied as they are next to the weights (tokenizer, generation settings, chat templates, licence).
COPIED_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "*.model", "*.tiktoken", "generation_config.json", "chat_template.json", "chat_template.jinja",
    "additional_chat_templates", "LICENSE*", "NOTICE*", "USE_POLICY*",
)
# The ones that belong to the tokenizer (left out by --no-tokenizer).
TOKENIZER_COPIED_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "*.model", "*.tiktoken", "chat_template.json", "chat_template.jinja", "additional_chat_templates",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_COPY_CHUNK = 64 << 20


# ---------------------------------------------------------------------------------------------
# Reading: headers only
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint, located by its byte range in a safetensors file."""

    name: str
    file: str  # file name inside the checkpoint folder
    dtype: str  # safetensors dtype code ("BF16", "F32", ...)
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(the JSON header of a .safetensors file, offset of its data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LayerpruneError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        file_size = os.fstat(f.fileno()).st_size
        if 8 + size > file_size:
            raise LayerpruneError(
                f"{path} is truncated or not a safetensors file: its header says {size:,} bytes, the file has "
                f"{file_size - 8:,} after the first 8"
            )
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError, MemoryError, OverflowError):
            raise LayerpruneError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise LayerpruneError(f"{path} is not a safetensors file (its header is not a JSON object)")
    data_size = file_size - 8 - size
    end = _check_entries(path, header)
    if end != data_size:
        what = "truncated" if end > data_size else "corrupt"
        raise LayerpruneError(
            f"{path} is {what}: its header places tensor data up to byte {end:,} of the data section, "
            f"which holds {data_size:,} bytes"
        )
    return header, 8 + size


# Bits per element of each safetensors dtype: a header's byte range must be exactly shape x this.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
              "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64}
MAX_ELEMENTS = 2**48  # far above any real tensor; a larger shape is a lie that would overflow arithmetic


def _check_entries(path, header: dict) -> int:
    """Every tensor entry as strict as the safetensors loader: known dtype, a sane shape, a byte range of
    exactly shape x dtype, and ranges that tile the data section from 0 without overlap. Returns its end."""
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not _valid_entry(info):
            raise LayerpruneError(f"{path} is corrupt: the header entry of tensor {name!r:.100} is malformed")
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise LayerpruneError(f"{path} is corrupt: tensor {name!r:.100} has an unknown dtype {dtype!r:.20}")
        numel = math.prod(shape)
        if numel > MAX_ELEMENTS:
            raise LayerpruneError(f"{path} is corrupt: tensor {name!r:.100} claims an absurd shape {shape!s:.100}")
        if numel * DTYPE_BITS[dtype] != (end - begin) * 8:
            raise LayerpruneError(
                f"{path} is corrupt: tensor {name!r:.100} is {dtype} of shape {shape}, which is "
                f"{numel * DTYPE_BITS[dtype] / 8:,.0f} bytes, but its header gives it {end - begin:,}")
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise LayerpruneError(f"{path} is corrupt: the data of tensor {name!r:.100} {problem} (bytes {begin:,} "
                                  f"to {end:,}); each tensor must have bytes of its own")
        position = end
    return position


def _valid_entry(info) -> bool:
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    return (
        isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors files holding a checkpoint's weights; one clear error for other layouts."""
    folder = Path(folder)
    if (folder / SUBLAYER_WEIGHTS).is_file():
        raise LayerpruneError(
            f"{folder} has attention-only/MLP-only removals, whose weights only layerprune's loader reads; "
            "load the model instead (no --no-load / --streaming)"
        )
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
        except (KeyError, TypeError):
            raise LayerpruneError(f"{index} is not a valid safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise LayerpruneError(f"{index} names shard(s) that are not in {folder}: {', '.join(missing)}")
        return files
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    shards = sorted(p.name for p in folder.glob("model*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise LayerpruneError(
            f"{folder} stores its weights as pickle files ({', '.join(pickles[:3])}); pruning a checkpoint on disk "
            "reads safetensors only: convert to safetensors first (load it once and save_pretrained it), "
            "or prune it without --no-load"
        )
    if any(folder.glob("*.gguf")):
        raise LayerpruneError(f"{folder} holds a GGUF file, not safetensors; prune it without --no-load")
    raise LayerpruneError(f"{folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME} + shards)")


def read_checkpoint(folder: str | os.PathLike) -> list[TensorEntry]:
    """Every tensor of the checkpoint, in file order then byte order (reading only the headers)."""
    folder = Path(folder)
    entries: list[TensorEntry] = []
    seen: dict[str, str] = {}
    for file in weight_files(folder):
        header, data_start = read_safetensors_header(folder / file)
        tensors = [(name, info) for name, info in header.items() if name != "__metadata__"]
        for name, info in sorted(tensors, key=lambda item: item[1]["data_offsets"][0]):
            if name in seen:
                raise LayerpruneError(f"tensor {name} is stored twice: in {seen[name]} and {file}")
            seen[name] = file
            begin, end = info["data_offsets"]
            start, nbytes = data_start + begin, end - begin
            entries.append(TensorEntry(name, file, info["dtype"], tuple(info["shape"]), start, nbytes))
    return entries


# ---------------------------------------------------------------------------------------------
# Planning: pure functions
# ---------------------------------------------------------------------------------------------


def layer_index(name: str, layers_prefix: str) -> tuple[int, str] | None:
    """(layer index, rest of the name) when `name` is "<layers_prefix>.<index>.<rest>", else None."""
    head = layers_prefix + "."
    if not name.startswith(head):
        return None
    index, dot, rest = name[len(head):].partition(".")
    if not (dot and index.isdigit()):
        return None
    return int(index), rest


def find_layers_prefix(names: Iterable[str], layers_path: str) -> str:
    """How the checkpoint names the block list: `layers_path` itself or its longest dotted suffix found.

    Checkpoints saved from the bare decoder (or by older code) lack the *ForCausalLM wrapper prefix:
    GPT-2's `h.0.attn...` for `transformer.h`, a base Llama's `layers.0...` for `model.layers`.
    """
    names = list(names)
    parts = layers_path.split(".")
    candidates = [".".join(parts[k:]) for k in range(len(parts))]  # longest first
    found = [c for c in candidates if any(layer_index(n, c) is not None for n in names)]
    if not found:
        raise LayerpruneError(f"no decoder layer tensor ('{layers_path}.<i>.*') in this checkpoint")
    if len(found) > 1:
        raise LayerpruneError(
            f"this checkpoint names its decoder layers in more than one way ({', '.join(f + '.<i>' for f in found)})"
        )
    return found[0]


def plan_renames(
    tensor_names: Iterable[str], layers_prefix: str, keep_positions: list[int]
) -> dict[str, str | None]:
    """{old name: new name, or None when the tensor belongs to a dropped layer}.

    keep_positions: the stored indices (positions in this checkpoint, not original indices) of the
    layers that stay, in order; position keep_positions[k] becomes layer k. Tensors outside the
    layer list (embeddings, final norm, lm_head) keep their name.
    """
    new_index = {old: new for new, old in enumerate(keep_positions)}
    if len(new_index) != len(keep_positions):
        raise ValueError(f"keep_positions has duplicates: {keep_positions}")
    plan: dict[str, str | None] = {}
    for name in tensor_names:
        located = layer_index(name, layers_prefix)
        if located is None:
            plan[name] = name
        else:
            index, rest = located
            plan[name] = f"{layers_prefix}.{new_index[index]}.{rest}" if index in new_index else None
    return plan


@dataclass(frozen=True)
class OutputTensor:
    name: str  # name in the output
    source: TensorEntry
    # Rows (indices along axis 0) of the source kept, in order; None: the whole tensor. Each row's bytes are
    # contiguous, so a slice is still a byte copy (expert removal cuts the experts' axis this way).
    rows: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape if self.rows is None else (len(self.rows), *self.source.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.source.nbytes if self.rows is None else len(self.rows) * self._row_bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def _row_bytes(self) -> int:
        return self.source.nbytes // self.source.shape[0]

    def byte_ranges(self) -> list[tuple[int, int]]:
        """(absolute offset, length) of the bytes to copy, consecutive rows merged into one range."""
        if self.rows is None:
            return [(self.source.start, self.source.nbytes)]
        ranges: list[tuple[int, int]] = []
        for row in self.rows:
            start = self.source.start + row * self._row_bytes
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + self._row_bytes)
            else:
                ranges.append((start, self._row_bytes))
        return ranges


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Greedy split in the given order: a shard is closed before it would pass max_shard_size bytes.

    A tensor bigger than max_shard_size gets a shard of its own (as in transformers).
    """
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    size = 0
    for tensor in tensors:
        if current and size + tensor.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(n_shards: int) -> list[str]:
    if n_shards == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def parse_size(size: int | str) -> int:
    """500000000, "500MB", "5GB", "20KB" -> bytes (decimal units, as transformers reads them)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        from transformers.utils.hub import convert_file_size_to_int

        try:
            value = convert_file_size_to_int(size)
        except ValueError:
            raise LayerpruneError(f"could not read the shard size {size!r}; write it like 500MB or 5GB") from None
    if value < 1:
        raise LayerpruneError(f"max_shard_size must be positive, got {size!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Executing
# ---------------------------------------------------------------------------------------------


def _copy_range(src, dst, offset: int, nbytes: int) -> None:
    """Append src[offset : offset + nbytes] to the unbuffered dst, in the kernel when it can."""
    done = 0
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while done < nbytes:
                n = copy_file_range(src.fileno(), dst.fileno(), min(nbytes - done, 1 << 30), offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # a filesystem without support: go on with a bounded buffer
    src.seek(offset + done)
    while done < nbytes:
        chunk = src.read(min(_COPY_CHUNK, nbytes - done))
        if not chunk:
            raise LayerpruneError(f"{src.name} is truncated: tensor data ends early")
        _write_all(dst, chunk)
        done += len(chunk)


def _write_all(dst, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[dst.write(view):]


def write_shard(folder: Path, path: Path, tensors: list[OutputTensor], metadata: dict) -> None:
    """One safetensors file: a header planned from the sources' dtypes/shapes, then each tensor's bytes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.source.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    handles: dict[str, object] = {}
    try:
        with open(path, "wb", buffering=0) as out:  # unbuffered: kernel copies append at the fd's position
            _write_all(out, struct.pack("<Q", len(raw)) + raw)
            for tensor in tensors:
                file = tensor.source.file
                if file not in handles:
                    handles[file] = open(folder / file, "rb")
                for start, nbytes in tensor.byte_ranges():
                    _copy_range(handles[file], out, start, nbytes)
    finally:
        for handle in handles.values():
            handle.close()


def _read_config(folder: Path):
    if not (folder / "config.json").is_file():
        raise LayerpruneError(f"{folder} is not a model folder: it has no config.json")
    config = read_model_config(folder)
    spec = family_spec(config.model_type)
    if spec is None:
        raise LayerpruneError(
            f"no layout known for model_type {config.model_type!r}, so its checkpoint can't be pruned on disk "
            f"(supported: {', '.join(supported_model_types())}); prune it without --no-load"
        )
    return config, spec


def _check_layer_indices(names: list[str], prefix: str, n_layers: int) -> None:
    found = {located[0] for name in names if (located := layer_index(name, prefix)) is not None}
    if found != set(range(n_layers)):
        extra = sorted(found - set(range(n_layers)))
        missing = sorted(set(range(n_layers)) - found)
        raise LayerpruneError(
            f"the checkpoint's layer tensors don't match its config ({n_layers} layers): "
            + (f"unexpected layer indices {shorten(str(extra), 80)}" if extra
               else f"no tensor for layers {shorten(str(missing), 80)}")
        )


def copy_side_files(src: Path, dst: Path | None, tokenizer: bool = True) -> list[str]:
    """Copy the tokenizer, generation and licence files (not the tokenizer's when `tokenizer` is False);
    dst None only checks that they can be copied (before any weight is written).

    A symbolic link is followed only to a target inside the model folder (or, for a Hugging Face cache
    snapshot, inside its repository's blobs): the output must never carry a copy of an unrelated file.
    """
    copied = []
    roots = _link_roots(src)
    for path in sorted(src.iterdir()):
        if path.name in ("config.json", RECORD_FILE, INDEX_NAME) or path.suffix == ".safetensors":
            continue
        if not any(fnmatch.fnmatch(path.name, pattern) for pattern in COPIED_FILES):
            continue
        if not tokenizer and any(fnmatch.fnmatch(path.name, pattern) for pattern in TOKENIZER_COPIED_FILES):
            continue
        _copy_inside(path, dst / path.name if dst is not None else None, src, roots, set())
        copied.append(path.name)
    return copied


def _link_roots(src: Path) -> list[Path]:
    """Where links of a model folder may point: the folder; a hub cache snapshot's blobs too."""
    root = src.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def _copy_inside(path: Path, target: Path | None, src: Path, roots: list[Path], seen: set[Path]) -> None:
    """shutil.copy2 / copytree that refuses links leading outside `roots` (and folders linked into themselves)."""
    if path.is_symlink():
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise LayerpruneError(f"{path} is a symbolic link that leads nowhere (or in a loop)") from None
        if not any(real == root or root in real.parents for root in roots):
            raise LayerpruneError(
                f"{path} is a symbolic link to {real}, outside the model folder {src}; layerprune copies linked "
                "files only from inside it. Copy the file into the folder (or pass --no-tokenizer for a "
                "tokenizer file) if it belongs to this model"
            )
    if path.is_dir():
        real = path.resolve()
        if real in seen:
            raise LayerpruneError(f"{path} links back to a folder it is inside")
        if target is not None:
            target.mkdir()
        for child in sorted(path.iterdir()):
            _copy_inside(child, target / child.name if target is not None else None, src, roots, seen | {real})
        if target is not None:
            shutil.copystat(path, target)
    elif target is not None:
        shutil.copy2(path, target)


def _tree_bytes(path: Path) -> int:
    """The bytes of a file, or of every file in a folder (links followed, as copying them does)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def prune_checkpoint(
    src_dir: str | os.PathLike,
    drop: list[int],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    how: dict | None = None,
    source: str | None = None,
    tokenizer: bool | None = None,
    drop_experts: dict[int, list[int]] | None = None,
) -> PruneResult:
    """Write a copy of the checkpoint in `src_dir` without the layers of ORIGINAL indices `drop` (and, for a
    mixture-of-experts model, without the experts `drop_experts` {ORIGINAL layer: [ORIGINAL experts]} of the layers
    that stay: models/experts/checkpoint.py).

    The output is what loading, `remove_layers` and `save_model` would write: the kept layers'
    tensors renumbered, every other tensor as it was, the config rewritten with its `layerprune`
    provenance (composing with an earlier prune), `layerprune.json`, and the tokenizer /
    generation / chat-template files. Only headers and one tensor's byte range at a time are
    read. max_shard_size (bytes or "500MB"; default: the largest source file) bounds each output
    file; one file `model.safetensors` is written when everything fits, else shards + index.
    `how` is recorded in the provenance history ({"chosen_by": "explicit"} by default); `source`
    names the original model when the config does not yet record one (default: src_dir). tokenizer False
    leaves the tokenizer files out (None: the setting of `loading.loading_options`, default True).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise LayerpruneError(f"model folder not found: {src}")
    check_output_dir(out_dir, overwrite, inputs=[src])
    config, spec = _read_config(src)
    entries = read_checkpoint(src)
    names = [entry.name for entry in entries]
    n_layers = config.get_text_config().num_hidden_layers
    record = _source_record(config, n_layers, src, source or str(src_dir))
    drop = check_drop(record, drop)
    how = {"chosen_by": "explicit", **(how or {})}
    keep_positions, new_record = pruned_provenance(record, drop, how) if drop or drop_experts is None else (
        list(range(n_layers)), record)  # experts alone: no layer step in the history
    prefix = find_layers_prefix(names, spec.layers)
    _check_layer_indices(names, prefix, n_layers)
    cuts, experts = {}, {}
    if drop_experts is not None:
        cuts, new_record, experts = cut_experts_on_disk(
            config, {e.name: e.shape for e in entries}, prefix, record["kept_layers"], keep_positions, new_record,
            drop_experts, how)
    rewrite_config(config, keep_positions, spec)
    config.layerprune = new_record

    kept = _output_tensors(entries, cuts, prefix, keep_positions)
    limit = parse_size(max_shard_size) if max_shard_size is not None else max(
        (src / f).stat().st_size for f in weight_files(src)
    )
    shards = plan_shards(kept, limit)
    files = shard_file_names(len(shards))
    metadata = source_metadata(src, entries)
    side = copy_side_files(src, None, tokenizer=loads_tokenizer(tokenizer))  # links outside the folder fail here
    check_free_space(out_dir, sum(t.nbytes for t in kept) + sum(_tree_bytes(src / name) for name in side)
                     + (src / "config.json").stat().st_size + SIDE_FILES_BYTES, "the pruned checkpoint")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for file, shard in zip(files, shards):
            write_shard(src, tmp / file, shard, metadata)
        if len(shards) > 1:
            write_json(tmp / INDEX_NAME, {
                "metadata": {
                    "total_size": sum(t.nbytes for t in kept),
                    "total_parameters": sum(t.numel for t in kept),
                },
                "weight_map": {t.name: file for file, shard in zip(files, shards) for t in shard},
            })
        config.save_pretrained(tmp)
        copied = copy_side_files(src, tmp, tokenizer=loads_tokenizer(tokenizer))
        write_record_file(tmp, new_record, {
            "pruned_on_disk": {
                "from": str(src),
                "tensors_kept": len(kept),
                "tensors_dropped": len(entries) - len(kept),
                "copied_files": copied,
            },
        })
    return PruneResult(
        out=Path(out_dir),
        dropped=drop,
        chosen_by=how["chosen_by"],
        how=how,
        on_disk=True,
        layers_before=n_layers,
        layers_after=len(keep_positions),
        params_before=sum(e.numel for e in entries),
        params_after=sum(t.numel for t in kept),
        bytes_before=sum(e.nbytes for e in entries),
        bytes_after=sum(t.nbytes for t in kept),
        shards=len(shards),
        experts=experts,
    )


def _source_record(config, n_layers: int, src: Path, source: str) -> dict:
    """The checkpoint's provenance record, as load_model would record it (its source, remote code trusted)."""
    record = config_provenance(config, n_layers)
    if len(record["kept_layers"]) != n_layers:
        raise LayerpruneError(
            f"{src}/config.json is inconsistent: its layerprune record keeps {len(record['kept_layers'])} layers "
            f"but num_hidden_layers is {n_layers}"
        )
    if "source" not in record:
        record = {**record, "source": source}
    if trusts_remote_code():
        record = {**record, "trust_remote_code": True}
    return record


def _output_tensors(entries: list[TensorEntry], cuts: dict, prefix: str, keep_positions: list[int]) -> list[OutputTensor]:
    """The kept tensors under their new names: an expert cut first (within the layer), then the layer renumbering."""
    cut_names = {e.name: (cuts[e.name].name if e.name in cuts else e.name) for e in entries}
    renames = plan_renames([n for n in cut_names.values() if n is not None], prefix, keep_positions)
    kept = []
    for entry in entries:
        name = cut_names[entry.name]
        if name is not None and renames[name] is not None:
            kept.append(OutputTensor(renames[name], entry, cuts[entry.name].rows if entry.name in cuts else None))
    return kept


def source_metadata(src: Path, entries: list[TensorEntry]) -> dict:
    """The `__metadata__` of the output files: the first source file's, which says format "pt"."""
    first = entries[0].file if entries else weight_files(src)[0]
    metadata = read_safetensors_header(src / first)[0].get("__metadata__") or {}
    return {str(k): str(v) for k, v in {"format": "pt", **metadata}.items()}
