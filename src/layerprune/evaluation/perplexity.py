"""Perplexity of a long text, with the LLM-Pruner / Shortened LLaMA protocol made explicit.

The text is tokenized once, without special tokens, and cut into windows of `seq_len` tokens:

- non-overlapping (default, `stride=None`): windows [0, L), [L, 2L), ...; the last partial window is
  dropped, as LLM-Pruner's `process_data` does (`numel // seq_len` windows);
- sliding (`stride=S`): the Hugging Face perplexity guide. Windows start every S tokens and are at most
  L long; each scores only the tokens no earlier window scored (the last S of a full window), so every
  token is predicted once, with up to L - S tokens of context. The last window may be shorter.

BOS is a choice, recorded in the result:
- "never": windows are plain text tokens; a window's first token is context only;
- "always": BOS is put before every window, so all of its tokens are scored (Shortened LLaMA's
  `add_bos_to_every`; the window is then L + 1 long);
- "first": BOS once at the start of the token stream (what LLM-Pruner gets from a Llama tokenizer);
- "auto": "always" if the tokenizer adds BOS by default (Llama, Gemma), else "never" (GPT-2, SmolLM2).

Perplexity = exp(sum of NLL / number of scored tokens); log-probabilities are taken in float32.

Bundled texts (the papers' strings): wikitext2 = "\\n\\n".join(rows of the HF test split), rebuilt from
`wiki.test.raw` as resources/data/MANIFEST.md describes; ptb = "\\n\\n".join(sentences) of the test split.
LLM-Pruner and Shortened LLaMA join PTB with "\\n\\n" too (ppl_dataset.py / dataset.py `process_data`),
though their code reads PTB's *validation* split; Reassessing Layer Pruning (arXiv 2411.15558)
reports the test set, which is what ships.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from layerprune.data.sources import BUNDLED_CORPORA, bundled_path, read_bundled_lines, read_texts
from layerprune.errors import LayerpruneError, first_line
from layerprune.evaluation.checksums import sha256_uncompressed
from layerprune.files.user_files import decode, read_bytes
from layerprune.models.anatomy import get_anatomy
from layerprune.models.layer_stream import streamed_forwards
from layerprune.models.tokens import pad_token_id

BOS_MODES = ("auto", "always", "never", "first")


@dataclass(frozen=True)
class PplText:
    name: str
    text: str
    description: str
    data: dict  # file/sha256 or hub dataset: recorded in eval.json


@dataclass(frozen=True)
class Window:
    start: int  # first text token in the window's input
    end: int  # one past the last text token
    score_from: int  # first text token scored (>= start)


# ------------------------------------------------------------------ texts

BUNDLED_PPL = {"wikitext2": "WikiText-2 raw test set", "ptb": "Penn Treebank (text-only) test set",
               "c4-heldout": "C4 documents 1200-1499 of the bundled sample (never used for calibration or healing)"}
HUB_PPL = {  # --data-source hub: the usual datasets (id, config, split, field)
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
}


def wikitext2_rows(lines: list[str]) -> list[str]:
    """Rows of the HF wikitext-2-raw-v1 test split from the raw file's lines (MANIFEST.md mapping)."""
    return ["" if not line.strip() else line + "\n" for line in lines]


def load_ppl_text(source: str, *, field: str = "text", data_source: str = "bundled") -> PplText:
    """The evaluation string of a source: wikitext2 | ptb | a .txt file | a .jsonl file (its `field`)."""
    if source in BUNDLED_PPL:
        if data_source == "hub" and source in HUB_PPL:  # c4-heldout is a slice of the bundled file only
            return _hub_text(source)
        if BUNDLED_CORPORA[source].kind == "jsonl":  # documents joined by blank lines

            rows = read_texts(source)
        else:
            lines = read_bundled_lines(source)
            rows = wikitext2_rows(lines) if source == "wikitext2" else [line.strip() for line in lines]
        filename = BUNDLED_CORPORA[source].filename
        data = {"file": f"resources/data/{filename}", "sha256": sha256_uncompressed(str(bundled_path(filename))),
                "join": "\\n\\n"}
        return PplText(source, "\n\n".join(rows), BUNDLED_PPL[source], data)
    path = Path(source).expanduser()
    if not path.is_file():
        known = ", ".join(BUNDLED_PPL)
        raise LayerpruneError(f"unknown perplexity text {source!r}: not one of {known} or an existing .txt/.jsonl file")
    import hashlib

    raw = read_bytes(path, "perplexity text")  # gunzipped; a corrupt file is one error naming it
    data = {"file": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest()}  # = sha256_uncompressed
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        texts = read_texts(str(path), field=field)
        data = {**data, "field": field, "join": "\\n\\n"}
        return PplText(path.name, "\n\n".join(texts), f"{path.name} field {field!r}", data)
    text = decode(raw, path)
    if not text.strip():
        raise LayerpruneError(f"{path} is empty")
    return PplText(path.name, text, f"{path.name} (whole file)", data)


def _hub_text(source: str) -> PplText:
    dataset_id, config, split, field = HUB_PPL[source]
    try:
        import datasets

        rows = datasets.load_dataset(dataset_id, config, split=split)[field]
    except Exception as err:  # offline / missing dataset: one line for the user
        raise LayerpruneError(f"could not load {dataset_id} ({config}, {split}) from the hub: {first_line(err)}") from err
    return PplText(source, "\n\n".join(rows), f"{dataset_id} {config} {split}",
                   {"hub": dataset_id, "config": config, "split": split, "field": field, "join": "\\n\\n"})


# ------------------------------------------------------------------ windows


def plan_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """Which text tokens each window feeds and scores (see module docstring)."""
    if seq_len < 2:
        raise LayerpruneError(f"seq_len must be at least 2, got {seq_len}")
    if stride is None:
        return [Window(i * seq_len, (i + 1) * seq_len, i * seq_len) for i in range(n_tokens // seq_len)]
    if not 1 <= stride <= seq_len:
        raise LayerpruneError(f"stride must be between 1 and seq_len ({seq_len}), got {stride}")
    windows, prev_end = [], 0
    for start in range(0, n_tokens, stride):
        end = min(start + seq_len, n_tokens)
        windows.append(Window(start, end, prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def tokenizer_adds_bos(tokenizer) -> bool:
    """Does `tokenizer(text)` start with BOS by default (Llama/Gemma yes, GPT-2/SmolLM2 no)?"""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = list(tokenizer("a", add_special_tokens=True).input_ids)
    plain = list(tokenizer("a", add_special_tokens=False).input_ids)
    return bool(with_special) and with_special[0] == bos and plain[:1] != [bos]


def resolve_bos(tokenizer, bos: str) -> str:
    """'auto' -> 'always' | 'never'; checks the tokenizer has a BOS when one is asked for."""
    if bos not in BOS_MODES:
        raise LayerpruneError(f"unknown bos mode {bos!r}; choose one of {', '.join(BOS_MODES)}")
    if bos == "auto":
        return "always" if tokenizer_adds_bos(tokenizer) else "never"
    if bos in ("always", "first") and getattr(tokenizer, "bos_token_id", None) is None:
        raise LayerpruneError(f"bos={bos!r} needs a BOS token, and this tokenizer has none")
    return bos


# ------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class WindowInputs:
    """What `perplexity` feeds the model: one id list per window and its first scored input position."""

    inputs: list[list[int]]  # BOS prefix (bos_used "always") + text token ids
    score_from: list[int]  # input position p >= 1 is scored (predicted from inputs[:p]) when p >= score_from
    bos_used: str
    text_tokens: int  # tokens of the whole text (BOS not counted)


def window_inputs(
    tokenizer, text: str, *, seq_len: int = 128, stride: int | None = None, bos: str = "auto",
    max_windows: int | None = None,
) -> WindowInputs:
    """The token windows of `text` under this module's protocol, for any backend that returns logits.

    `perplexity` scores exactly these; llama.cpp's `layerprune.export.llamacpp.perplexity_windows` takes them too,
    so both backends see the same token ids (the transformers tokenizer's).
    """
    bos_used = resolve_bos(tokenizer, bos)
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_used == "first":
        ids = [bos_id] + ids
    windows = plan_windows(len(ids), seq_len, stride)
    if max_windows is not None:
        windows = windows[:max_windows]
    if not windows:
        raise LayerpruneError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    prefix = [bos_id] if bos_used == "always" else []
    # Input position p holds text token (w.start + p - len(prefix)); score the tokens from w.score_from on.
    inputs = [prefix + ids[w.start : w.end] for w in windows]
    score_from = [max(w.score_from - w.start + len(prefix), 1) for w in windows]
    return WindowInputs(inputs, score_from, bos_used, len(ids) - (1 if bos_used == "first" else 0))


@dataclass
class WindowBatch:
    """Windows padded into one batch, and which logits predict which scored token."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    rows: list[int]
    cols: list[int]
    targets: list[int]


def window_batches(planned: WindowInputs, pad: int, batch_size: int) -> list[WindowBatch]:
    windows = list(zip(planned.inputs, planned.score_from))
    out = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(len(x) for x, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        # The logits at input position p - 1 predict input position p; keep only the scored ones.
        rows, cols, targets = [], [], []
        for b, (x, first) in enumerate(batch):
            input_ids[b, : len(x)] = torch.tensor(x)
            mask[b, : len(x)] = 1
            for p in range(first, len(x)):
                rows.append(b)
                cols.append(p - 1)
                targets.append(x[p])
        out.append(WindowBatch(input_ids, mask, rows, cols, targets))
    return out


def batch_nll_sum(logits: torch.Tensor, batch: WindowBatch) -> float:
    """Summed cross-entropy (fp32) of a batch's scored tokens."""
    picked = logits[torch.tensor(batch.rows, device=logits.device), torch.tensor(batch.cols, device=logits.device)]
    labels = torch.tensor(batch.targets, device=logits.device)
    return torch.nn.functional.cross_entropy(picked.float(), labels, reduction="sum").item()


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seq_len: int = 128,
    stride: int | None = None,
    bos: str = "auto",
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """Perplexity of `text` over windows of `seq_len` tokens; returns ppl, nll, tokens, windows and the protocol."""
    from tqdm.auto import tqdm

    planned = window_inputs(tokenizer, text, seq_len=seq_len, stride=stride, bos=bos, max_windows=max_windows)
    device = next(model.parameters()).device
    nll_sum, scored = 0.0, 0
    for batch in tqdm(window_batches(planned, pad_token_id(tokenizer), batch_size), desc=desc, disable=not progress,
                      unit="batch"):
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.mask.to(device)).logits
        nll_sum += batch_nll_sum(logits, batch)
        scored += len(batch.targets)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return _record(nll_sum, scored, planned, seq_len=seq_len, stride=stride, bos=bos, max_windows=max_windows,
                   dtype=dtype)


@torch.no_grad()
def streaming_perplexity(
    model_ref: str,
    tokenizer,
    text: str,
    *,
    seq_len: int = 128,
    stride: int | None = None,
    bos: str = "auto",
    batch_size: int = 8,
    max_windows: int | None = None,
    dtype: str | torch.dtype = "auto",
    progress: bool = True,
    desc: str = "perplexity (streaming)",
) -> dict:
    """`perplexity` of a checkpoint on disk with one decoder layer in memory at a time (models/layer_stream.py):
    the windows' hidden states stay in memory, each layer is read, applied to every window and dropped; then
    the model's own forward, its layers replaced by the final hidden states, gives the logits."""
    planned = window_inputs(tokenizer, text, seq_len=seq_len, stride=stride, bos=bos, max_windows=max_windows)
    batches = window_batches(planned, pad_token_id(tokenizer), batch_size)
    nll_sum, scored, dtype_name = 0.0, 0, None
    with torch.no_grad():
        for model, i in streamed_forwards(model_ref, [(b.input_ids, b.mask) for b in batches], dtype=dtype,
                                          batch_size=batch_size, desc=desc, progress=progress):
            batch = batches[i]
            logits = model(input_ids=batch.input_ids, attention_mask=batch.mask, use_cache=False).logits
            nll_sum += batch_nll_sum(logits, batch)
            scored += len(batch.targets)
            dtype_name = str(next(iter(get_anatomy(model).layers[0].parameters())).dtype).replace("torch.", "")
    return {**_record(nll_sum, scored, planned, seq_len=seq_len, stride=stride, bos=bos, max_windows=max_windows,
                      dtype=dtype_name), "streaming": True}


def _record(nll_sum: float, scored: int, planned: WindowInputs, *, seq_len, stride, bos, max_windows, dtype) -> dict:
    nll = nll_sum / scored
    return {
        "ppl": math.exp(nll) if nll < 700 else float("inf"),
        "nll": nll,
        "nll_sum": nll_sum,
        "tokens": scored,
        "windows": len(planned.inputs),
        "text_tokens": planned.text_tokens,
        "seq_len": seq_len,
        "stride": stride,
        "mode": "non-overlapping" if stride is None else "sliding",
        "bos": bos,
        "bos_used": planned.bos_used,
        "max_windows": max_windows,
        "dtype": dtype,
        "nll_dtype": "float32",
    }
