"""Running GGUF exports in llama.cpp through its Python bindings (`pip install 'layerprune[llamacpp]'`).

Used by `layerprune generate FILE.gguf` and the composition study; also quantizes GGUF files
(q4_k_m etc.) with llama.cpp's own quantizer when no `llama-quantize` binary is around.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from layerprune.errors import LayerpruneError

INSTALL_HINT = "pip install 'layerprune[llamacpp]' (builds llama.cpp from source: ~7 min on 2 cores)"


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LayerpruneError(f"running a GGUF file needs llama.cpp's Python bindings: {INSTALL_HINT}") from None
    return llama_cpp


def have_llama_cpp() -> bool:
    try:
        require_llama_cpp()
    except LayerpruneError:
        return False
    return True


def quantize_gguf(source: str | os.PathLike, target: str | os.PathLike, kind: str = "Q4_K_M",
                  log_file: str | os.PathLike | None = None, *, token_embedding_type: int | None = None,
                  output_tensor_type: int | None = None) -> dict:
    """llama.cpp's quantizer (the library call behind `llama-quantize`) on an f16/f32 GGUF file.

    llama.cpp writes a line per tensor; that goes to `log_file` (or a temp file), and
    the returned summary says how many tensors could not be stored as asked (`fallback_tensors`: e.g.
    q4_K needs rows that are multiples of 256 values; SmolLM2's 576 fall back to q5_0/q8_0)."""
    llama_cpp = require_llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
    if ftype is None:
        raise LayerpruneError(f"llama.cpp does not know the quantization {kind!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if token_embedding_type is not None:  # ggml type numbers, as gguf.GGMLQuantizationType
        params.token_embedding_type = token_embedding_type
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(log_file) if log_file else Path(tmp) / "quantize.log"
        # llama-cpp-python forwards llama.cpp's log to Python's sys.stderr; C code may also write to fd 2
        with open(log_path, "w") as log, _fd_to(log, 2), contextlib.redirect_stderr(log):
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
        text = log_path.read_text(errors="replace")
    if status != 0:
        raise LayerpruneError(f"llama.cpp could not quantize {source} to {kind} (status {status})")
    return quantize_fallbacks(text)


@contextlib.contextmanager
def _fd_to(file, fd: int):
    """Point a file descriptor that C code writes to directly at `file` for a while."""
    sys.stderr.flush()
    saved = os.dup(fd)
    os.dup2(file.fileno(), fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def quantize_fallbacks(log_text: str) -> dict:
    """What llama.cpp's quantizer said about tensors it could not store in the asked type."""
    summary = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", log_text)
    if not summary:
        return {"fallback_tensors": 0}
    kinds = collections.Counter(re.findall(r"falling back to\s+(\w+)", log_text))
    return {"fallback_tensors": int(summary.group(1)), "tensors": int(summary.group(2)),
            "fallback_types": dict(kinds), "row_lengths": sorted({int(n) for n in re.findall(r"ncols\s+(\d+)", log_text)})}


def open_gguf(path: str | os.PathLike, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False):
    """A llama.cpp model; logits_all keeps the logits of every position (what `perplexity_windows` needs)."""
    llama_cpp = require_llama_cpp()
    path = Path(path)
    if not path.is_file() or path.suffix != ".gguf":
        raise LayerpruneError(f"{path} is not a .gguf file")
    threads = threads or os.cpu_count() or 1
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                               seed=0, logits_all=logits_all)
    except (ValueError, RuntimeError) as err:
        raise LayerpruneError(f"llama.cpp could not load {path}: {err}") from None


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    seconds: float  # decode time of the new tokens (prompt processing excluded)
    prefill_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


def greedy_tokens(llm, prompt_tokens: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> Generation:
    """Greedy continuation of the given token ids (no sampling, no repetition penalty) with timings."""
    if not prompt_tokens:
        raise LayerpruneError("the prompt has no tokens")
    if len(prompt_tokens) + max_new_tokens > llm.n_ctx():
        raise LayerpruneError(f"prompt + new tokens ({len(prompt_tokens) + max_new_tokens}) exceed llama.cpp's "
                              f"context of {llm.n_ctx()}")
    eos = llm.token_eos()
    out: list[int] = []
    start = time.perf_counter()
    first = None
    for token in llm.generate(prompt_tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if first is None:
            first = time.perf_counter()
        if stop_at_eos and token == eos:
            break
        out.append(token)
        if len(out) >= max_new_tokens:
            break
    end = time.perf_counter()
    first = first or end
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    return Generation(list(prompt_tokens), out, text, seconds=end - first, prefill_seconds=first - start)


def prompt_tokens(llm, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt; with chat, wrapped in the chat template the GGUF file carries."""
    if chat:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise LayerpruneError("this GGUF file has no chat template; pass --no-chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
            bos_token=llm.detokenize([llm.token_bos()]).decode(errors="replace"),
            eos_token=llm.detokenize([llm.token_eos()]).decode(errors="replace"))
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    return llm.tokenize(prompt.encode(), add_bos=True, special=False)


def perplexity_windows(llm, windows: Sequence[Sequence[int]], score_from: int | Sequence[int] = 1) -> dict:
    """Perplexity of token windows under a GGUF model, from llama.cpp's logits.

    Each window is evaluated from an empty KV cache; input position p (p >= score_from) is scored from the
    logits at p - 1, as `layerprune.evaluation.perplexity` does. Pass the windows of its `window_inputs`
    (`.inputs`, `.score_from`) so that llama.cpp scores the transformers tokenizer's ids. Log-probabilities
    are taken in float64 from llama.cpp's float32 logits. `llm` must be opened with logits_all=True.
    """
    import numpy as np

    if not getattr(llm, "_logits_all", True):
        raise LayerpruneError("perplexity needs the logits of every position: open the GGUF with logits_all=True")
    firsts = [score_from] * len(windows) if isinstance(score_from, int) else list(score_from)
    if len(firsts) != len(windows):
        raise LayerpruneError(f"{len(firsts)} score_from positions for {len(windows)} windows")
    nll_sum, scored = 0.0, 0
    for tokens, first in zip(windows, firsts):
        tokens = [int(t) for t in tokens]
        if len(tokens) > llm.n_ctx():
            raise LayerpruneError(f"a window of {len(tokens)} tokens exceeds llama.cpp's context of {llm.n_ctx()}")
        first = max(int(first), 1)
        if first >= len(tokens):
            continue
        llm.reset()  # n_tokens = 0: eval() drops the whole KV cache before decoding
        llm.eval(tokens)
        logits = np.asarray(llm.scores[first - 1 : len(tokens) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        targets = np.asarray(tokens[first:])
        nll_sum += float((log_z - logits[np.arange(len(targets)), targets]).sum())
        scored += len(targets)
    if not scored:
        raise LayerpruneError("no token to score: every window is shorter than its score_from position")
    nll = nll_sum / scored
    return {"ppl": math.exp(nll) if nll < 700 else float("inf"), "nll": nll, "nll_sum": nll_sum, "tokens": scored,
            "windows": len(windows), "nll_dtype": "float64"}
