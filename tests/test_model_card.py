"""The model card (README.md) of a pruned/healed model folder, built from its layerprune record."""

import json

from tiny_models import tiny_model

from layerprune.models.model_card import format_layers, model_card
from layerprune.models.saving import save_model
from layerprune.models.surgery import remove_layers

RECORD = {
    "source": "smollm2-135m",
    "original_num_layers": 30,
    "kept_layers": [i for i in range(30) if i not in (12, 13, 14, 15, 16, 17, 25, 26)],
    "dropped_layers": [12, 13, 14, 15, 16, 17, 25, 26],
    "history": [
        {"dropped": [12, 13, 14, 15, 16, 17, 25, 26], "chosen_by": "auto:block-influence", "num_layers": 8,
         "calibration": {"source": "c4", "n_samples": 10, "seq_len": 128}},
        {"healed": "lora", "data": "dolly"},
    ],
    "selection": {
        "dropped": [12, 13, 14, 15, 16, 17, 25, 26], "chosen_by": "auto:block-influence",
        "candidates": {
            "reverse-order": {"dropped": list(range(22, 30)), "validation_loss": 20.5},
            "block-influence": {"dropped": [12, 13, 14, 15, 16, 17, 25, 26], "validation_loss": 5.02},
        },
    },
    "heal": {
        "method": "lora", "trainable_params": 1_800_000, "total_params": 106_200_000, "steps": 70,
        "final_loss": 2.345, "config": {"method": "lora", "lora_r": 8, "learning_rate": 1e-4, "epochs": 1.0,
                                        "effective_batch_size": 8, "max_length": 256},
        "data": {"source": "dolly", "kind": "instructions", "examples": 640},
    },
    "versions": {"layerprune": "0.1.0", "torch": "2.13.0", "transformers": "4.99.0"},
}


def test_format_layers_folds_runs():
    assert format_layers([26, 12, 13, 14, 15, 16, 17, 25]) == "12-17, 25, 26"
    assert format_layers([3]) == "3"
    assert format_layers([]) == "none"


def test_card_of_a_healed_record():
    card = model_card(RECORD, original_parameters=134_500_000)
    assert card.startswith("# smollm2-135m, pruned and healed")
    assert "`smollm2-135m`" in card
    assert "8 of its 30 decoder layers removed" in card
    assert "removed layers: 12-17, 25, 26" in card
    assert "`block-influence` scores, chosen by comparing candidate drop-sets" in card
    assert "| reverse-order | 22-29 | 20.5000 |" in card  # candidates, best first
    assert card.index("| block-influence |") < card.index("| reverse-order |")
    assert "healed with `lora` on dolly" in card
    assert "r=8" in card and "lr 1e-4" in card and "640 examples" in card and "70 steps" in card
    assert "this model: 106.20M (79% of the original)" in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    assert "| torch | 2.13.0 |" in card


def test_card_takes_the_step_details_from_the_selection_record():
    # prune_model / runs keep only {dropped, chosen_by} in the history and the details in `selection`.
    record = {**RECORD, "history": [{"dropped": [12, 13, 14, 15, 16, 17, 25, 26], "chosen_by": "block-influence"}],
              "selection": {"dropped": [26, 25, 17, 16, 15, 14, 13, 12], "chosen_by": "block-influence",
                            "num_layers": 8, "calibration": {"source": "c4", "n_samples": 10, "seq_len": 128}},
              "heal": {}}
    card = model_card(record)
    assert "the lowest `block-influence` scores; 8 layers, calibration c4, 10 x 128 tokens" in card
    assert "## Healing" not in card and "validation loss" not in card


def test_card_of_an_attention_only_removal_says_layerprune_loads_it():
    record = {"source": "tiny", "original_num_layers": 5, "kept_layers": [0, 1, 2, 3, 4], "dropped_layers": [],
              "removed_sublayers": {"attention": [1, 3], "mlp": []},
              "history": [{"removed_attention": [1, 3], "chosen_by": "attention-influence"}]}
    card = model_card(record)
    assert "the attention of layers 1, 3 removed" in card
    assert "lowest `attention-influence` scores" in card
    assert "Only layerprune can load this folder" in card
    assert "from layerprune import load_model" in card
    assert "AutoModelForCausalLM" not in card


def test_card_from_a_saved_folder(tmp_path):
    model = tiny_model("llama")
    remove_layers(model, [1, 3], how={"chosen_by": "explicit"})
    save_model(model, None, tmp_path / "pruned")
    record = json.loads((tmp_path / "pruned" / "layerprune.json").read_text())
    card = model_card(record)
    assert "removed layers: 1, 3" in card
    assert "kept layers (3): 0, 2, 4" in card
    assert "given explicitly" in card
    assert "## Healing" not in card


def test_card_of_a_searched_drop_set_with_a_quality_target():
    entry = {"dropped": [5, 13, 14, 15, 16, 17, 18, 26], "chosen_by": "search", "num_layers": 8,
             "max_ppl_ratio": 2.5, "validation_loss_increase": 0.811, "validation_ppl_ratio": 2.25}
    card = model_card({**RECORD, "history": [entry], "selection": {}, "heal": {}})
    assert "step 1: removed layers 5, 13-18, 26: a greedy search over drop-sets" in card
    assert "`select: search`" in card and "lowest `search` scores" not in card
    assert "quality target: validation perplexity at most 2.5x the unpruned model's" in card
    assert "validation perplexity 2.25x the unpruned model's" in card


def test_run_report_shows_the_search_path_and_the_quality_target(tmp_path):
    from layerprune.report.run_report import run_report

    selection = {
        "dropped": [13, 14], "chosen_by": "search",
        "constraints": {"num_layers": 2, "max_loss_increase": 0.5, "validation_ppl_ratio": 1.35},
        "validation": {"loss": 4.3, "unpruned_loss": 4.0, "block_forwards": 100, "naive_block_forwards": 300},
        "search": {"beam": 1, "swap": True, "path": [
            {"k": 1, "dropped": [14], "loss": 4.1, "candidates": [{}, {}, {}]},
            {"k": 2, "dropped": [13, 14], "loss": 4.3, "candidates": [{}, {}]}],
            "swaps": [{"restored": 13, "removed": 12, "loss_before": 4.3, "loss": 4.25, "tried": 2}]},
    }
    (tmp_path / "selection.json").write_text(json.dumps(selection))
    text, _ = run_report(tmp_path)
    assert "validation loss at most 0.5 nats above the unpruned model's" in text
    assert "removes 2 layers (perplexity ratio 1.350)" in text
    assert "| 1 | 14 | 4.1000 | 3 |" in text and "| 2 | 13,14 | 4.3000 | 2 |" in text
    assert "| swap | layer 13 back, 12 out | 4.2500 | 2 |" in text
    assert "100 block forwards (300 for a search without cached states)" in text
