"""Small synthetic GGUF files of three architectures (llama, qwen2, gemma3), written with the gguf library:
Q8_0 matrices, F32 norms and biases, a tiny byte-level BPE tokenizer that transformers and llama.cpp read."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 128
N_BLOCKS = 6


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: every byte is one token, so any text tokenizes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tokenizer_fields(writer) -> int:
    """Write the tokenizer metadata; returns the vocabulary size."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + _byte_tokens() + ["Ġt", "Ġth", "he"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "Ġt h", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    return len(tokens)


def block_tensors(arch: str, rng) -> dict[str, tuple[np.ndarray, bool]]:
    """{name suffix: (values in numpy order, quantize)} of one decoder block."""
    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    found = {"attn_norm.weight": (1 + w(HIDDEN), False), "attn_q.weight": (w(q, HIDDEN), True),
             "attn_k.weight": (w(kv, HIDDEN), True), "attn_v.weight": (w(kv, HIDDEN), True),
             "attn_output.weight": (w(HIDDEN, q), True), "ffn_norm.weight": (1 + w(HIDDEN), False),
             "ffn_gate.weight": (w(FFN, HIDDEN), True), "ffn_up.weight": (w(FFN, HIDDEN), True),
             "ffn_down.weight": (w(HIDDEN, FFN), True)}
    if arch == "qwen2":
        found.update({"attn_q.bias": (w(q), False), "attn_k.bias": (w(kv), False), "attn_v.bias": (w(kv), False)})
    if arch == "gemma3":
        found.update({"attn_q_norm.weight": (w(HEAD_DIM), False), "attn_k_norm.weight": (w(HEAD_DIM), False),
                      "post_attention_norm.weight": (w(HIDDEN), False), "post_ffw_norm.weight": (w(HIDDEN), False)})
    return found


def add_tensor(writer, name: str, values: np.ndarray, quantized: bool) -> None:
    """Write one tensor, as Q8_0 blocks when `quantized` (the quantized type every test file uses)."""
    import gguf
    from gguf.quants import quantize

    if quantized:
        writer.add_tensor(name, quantize(values, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, values)


def write_gguf(path: str | Path, arch: str, *, n_blocks: int = N_BLOCKS, seed: int = 0, extra_metadata=None) -> Path:
    """A random model of `arch` as a GGUF file; extra_metadata: {key: (value, GGUFValueType, sub_type)}."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6 if arch == "gemma3" else 10000.0)  # Gemma-3's sliding layers use 10000
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    if arch == "llama":
        writer.add_rope_dimension_count(HEAD_DIM)
    if arch == "gemma3":
        writer.add_sliding_window(4)  # short, so sliding and global layers differ on a few tokens
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = tokenizer_fields(writer)
    writer.add_vocab_size(vocab)
    for key, (value, kind, sub) in (extra_metadata or {}).items():
        writer.add_key_value(key, value, kind, sub_type=sub)

    add = functools.partial(add_tensor, writer)

    add("token_embd.weight", rng.standard_normal((vocab, HIDDEN)).astype(np.float32) * 0.1, True)
    for block in range(n_blocks):
        for suffix, (values, quantized) in block_tensors(arch, rng).items():
            add(f"blk.{block}.{suffix}", values, quantized)
    add("output_norm.weight", 1 + rng.standard_normal(HIDDEN).astype(np.float32) * 0.1, False)
    if arch != "gemma3":  # Gemma ties the output to the embeddings
        add("output.weight", rng.standard_normal((vocab, HIDDEN)).astype(np.float32) * 0.1, True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# Mixture-of-experts files as llama.cpp names them: qwen2moe (with a shared expert), qwen3moe, and llama with
# experts (Mixtral's layout). The experts of every block are drawn for all N_EXPERTS first, so a file written
# with a subset of them holds exactly those experts' bytes: the reference an expert cut must equal.
N_EXPERTS, EXPERTS_USED, EXPERT_FFN, SHARED_FFN = 8, 2, 64, 64


def moe_block_tensors(arch: str, rng, experts: list[int]) -> dict[str, tuple[np.ndarray, bool]]:
    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    found = {k: v for k, v in block_tensors("llama", rng).items() if not k.startswith("ffn_") or k == "ffn_norm.weight"}
    found.update({
        "ffn_gate_inp.weight": (w(N_EXPERTS, HIDDEN)[experts], False),
        "ffn_gate_exps.weight": (w(N_EXPERTS, EXPERT_FFN, HIDDEN)[experts], True),
        "ffn_up_exps.weight": (w(N_EXPERTS, EXPERT_FFN, HIDDEN)[experts], True),
        "ffn_down_exps.weight": (w(N_EXPERTS, HIDDEN, EXPERT_FFN)[experts], True),
    })
    if arch == "qwen2moe":
        found.update({"attn_q.bias": (w(HEADS * HEAD_DIM), False), "attn_k.bias": (w(KV_HEADS * HEAD_DIM), False),
                      "attn_v.bias": (w(KV_HEADS * HEAD_DIM), False),
                      "ffn_gate_inp_shexp.weight": (w(HIDDEN), False),
                      "ffn_gate_shexp.weight": (w(SHARED_FFN, HIDDEN), True),
                      "ffn_up_shexp.weight": (w(SHARED_FFN, HIDDEN), True),
                      "ffn_down_shexp.weight": (w(HIDDEN, SHARED_FFN), True)})
    if arch == "qwen3moe":
        found.update({"attn_q_norm.weight": (1 + w(HEAD_DIM), False), "attn_k_norm.weight": (1 + w(HEAD_DIM), False)})
    return found


def write_moe_gguf(path: str | Path, arch: str, *, n_blocks: int = 3, seed: int = 0,
                   experts: dict[int, list[int]] | None = None, blocks: list[int] | None = None) -> Path:
    """A random MoE model of `arch` (qwen2moe, qwen3moe, llama) as a Q8_0 GGUF file. experts: {block: the
    experts it keeps} (default all); blocks: the blocks written (default all): a cut's exact reference."""
    import gguf

    rng = np.random.default_rng(seed)
    kept_blocks = list(range(n_blocks)) if blocks is None else blocks
    n_kept = len(next(iter(experts.values()))) if experts else N_EXPERTS
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(len(kept_blocks))
    writer.add_feed_forward_length(EXPERT_FFN if arch == "llama" else FFN)  # llama's experts take this length
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_expert_count(n_kept)
    writer.add_expert_used_count(EXPERTS_USED)
    if arch == "llama":
        writer.add_rope_dimension_count(HEAD_DIM)
    else:
        writer.add_expert_feed_forward_length(EXPERT_FFN)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(SHARED_FFN)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = tokenizer_fields(writer)
    writer.add_vocab_size(vocab)

    add = functools.partial(add_tensor, writer)

    add("token_embd.weight", rng.standard_normal((vocab, HIDDEN)).astype(np.float32) * 0.1, True)
    for block in range(n_blocks):
        chosen = (experts or {}).get(block, list(range(N_EXPERTS)))
        tensors = moe_block_tensors(arch, rng, chosen)  # drawn for every block, written for the kept ones
        if block in kept_blocks:
            for suffix, (values, quantized) in tensors.items():
                add(f"blk.{kept_blocks.index(block)}.{suffix}", values, quantized)
    add("output_norm.weight", 1 + rng.standard_normal(HIDDEN).astype(np.float32) * 0.1, False)
    add("output.weight", rng.standard_normal((vocab, HIDDEN)).astype(np.float32) * 0.1, True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
