"""Seeded tiny random models of every supported family (hidden 32, 5 layers) for fast tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
N_LAYERS = 5
_IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_hidden_layers=N_LAYERS,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    **_IDS,
)

# model_type -> config overrides. Windows are small so sliding layers differ from full ones on 12+ tokens.
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(_DECODER),
    "mistral": dict(_DECODER, sliding_window=4),
    "qwen2": dict(_DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "qwen3": dict(_DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=3),
    "gemma2": dict(_DECODER, sliding_window=4, tie_word_embeddings=True),
    "gemma3_text": dict(
        _DECODER,
        sliding_window=4,
        tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    ),
    "phi3": dict(_DECODER),
    "gpt2": dict(n_embd=32, n_head=4, n_layer=N_LAYERS, n_positions=128, tie_word_embeddings=True, **_IDS),
    "gpt_neox": dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=N_LAYERS,
        max_position_embeddings=128, **_IDS,
    ),
    "opt": dict(
        hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=N_LAYERS, word_embed_proj_dim=32,
        max_position_embeddings=128, tie_word_embeddings=True, **_IDS,
    ),
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(
        _DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        decoder_sparse_step=2, mlp_only_layers=[4],
    ),
}
FAMILIES = list(FAMILY_CONFIGS)

# Mixture-of-experts families for expert removal: 2 layers, 8 experts, top-2 (apart from FAMILY_CONFIGS, whose
# families every layer-removal test covers). DeepSeek's 8 experts form 2 groups of 4 with group-limited routing
# (and as many KV heads as heads: its attention with a padding mask needs them).
N_EXPERTS = 8
_MOE = dict(_DECODER, num_hidden_layers=2, intermediate_size=16, num_experts_per_tok=2)
_DEEPSEEK = dict(
    _MOE, num_key_value_heads=4, intermediate_size=32, moe_intermediate_size=16, n_routed_experts=N_EXPERTS,
    n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
    n_group=2, topk_group=1,
)
MOE_CONFIGS: dict[str, dict] = {
    "mixtral": dict(_MOE, num_local_experts=N_EXPERTS),
    # A dense layer between two MoE layers, and a shared expert; softmax weights not renormalised.
    "qwen2_moe": dict(
        _MOE, num_hidden_layers=3, mlp_only_layers=[1], intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=N_EXPERTS, norm_topk_prob=False,
    ),
    "qwen3_moe": dict(_MOE, intermediate_size=32, moe_intermediate_size=16, num_experts=N_EXPERTS, norm_topk_prob=True),
    "olmoe": dict(_MOE, num_experts=N_EXPERTS, norm_topk_prob=False),
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "deepseek_v3": dict(_DEEPSEEK, q_lora_rank=16, routed_scaling_factor=2.5, norm_topk_prob=True),
    "gpt_oss": dict(
        _MOE, num_local_experts=N_EXPERTS, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "granitemoe": dict(_MOE, num_local_experts=N_EXPERTS),
}
MOE_FAMILIES = list(MOE_CONFIGS)


def tiny_moe_model(model_type: str, seed: int = 0, **overrides):
    """A seeded tiny MoE model; every weight perturbed (DeepSeek-V3's zero correction bias too)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**MOE_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model.eval()


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**FAMILY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    # Random init leaves some norms at exactly 1 and biases at 0; perturb so every weight matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_input(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


class CharTokenizer:
    """A minimal stand-in for a HF tokenizer: one token per character (ids 3..VOCAB-1)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, add_bos: bool = False):
        self.add_bos = add_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id] + ids

        class Encoded:
            input_ids = ids

        return Encoded()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True):
    """A real (fast) HF tokenizer with one token per character, ids < VOCAB, and a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(specials + chars + ["<unk>"])}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# The calibration / training text of the pipeline, config and curve tests: 9 short sentences, 20 times.
CORPUS = "\n\n".join(f"the {w} sat on the mat and looked at the {v}." for w in ("cat", "dog", "owl")
                       for v in ("sun", "sky", "sea")) * 20
