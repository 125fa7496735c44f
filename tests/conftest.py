import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest on one thread, and timings stay stable when the machine is busy.
torch.set_num_threads(1)


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny llama with its tokenizer saved as a stock model folder (modules may define their own)."""
    from tiny_models import tiny_model, tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# Tests that run a whole pipeline, study or CLI command end to end, marked `integration` here by name so
# that `-m integration` / `-m "not integration"` split them from the unit tests. A CLI test that only checks
# an error refused before any work is a unit test. A listed name missing from its module is an error, so the
# list can't go stale silently when a test is renamed.
INTEGRATION_TESTS = {
    "test_benchmark.py": ["test_bench_compare_writes_json_markdown_and_plot"],
    "test_budgets.py": ["test_cli_prunes_to_a_parameter_target", "test_cli_prunes_to_a_latency_target"],
    "test_checkpoint.py": ["test_cli_no_load_prunes_on_disk", "test_cli_switches_to_disk_when_the_weights_exceed_memory"],
    "test_cli.py": [
        "test_prune_writes_a_reloadable_model", "test_prune_by_metric_drops_the_last_layers",
        "test_info_shows_layers_and_parameters", "test_existing_output_is_refused_and_kept",
    ],
    "test_configs.py": [
        "test_prune_is_the_same_through_api_cli_and_yaml", "test_heal_is_the_same_through_api_cli_and_yaml",
        "test_eval_is_the_same_through_api_cli_and_yaml", "test_bench_settings_are_the_same_through_cli_and_yaml",
    ],
    "test_distributed.py": ["test_two_process_ddp_run_agrees_on_the_final_weights"],
    "test_evaluation.py": ["test_cli_eval_writes_results_and_compare_shows_deltas"],
    "test_export.py": ["test_cli_exports_and_refuses_an_existing_output"],
    "test_humaneval.py": ["test_cli_humaneval_end_to_end", "test_humaneval_never_enters_avg_acc"],
    "test_llamacpp.py": ["test_quantizer_fallbacks_are_summarised_not_printed"],
    "test_pipeline.py": [
        "test_one_shot_run_writes_every_stage_and_resumes",
        "test_iterative_schedule_drops_one_layer_per_round_in_original_indices",
        "test_interrupted_iterative_run_resumes_from_its_last_round",
        "test_run_killed_during_healing_resumes_to_the_same_weights", "test_cli_run_prints_the_report_verbatim",
    ],
    "test_quantized_load.py": ["test_eval_cli_records_the_quantization", "test_bench_compares_full_and_quantized"],
    "test_streaming.py": ["test_cli_score_streaming_writes_the_same_scores"],
    "test_study.py": [
        "test_two_by_two_grid_shares_work_and_writes_table_and_plots", "test_cli_run_dispatches_a_study",
        "test_grid_over_layer_counts_plots_perplexity_against_layers_removed",
    ],
    "test_study_plots.py": ["test_report_rebuilds_a_run_folder", "test_report_of_an_iterative_run_built_from_files"],
    "test_sublayer.py": [
        "test_cli_prunes_attention_only_and_the_result_reloads", "test_cli_mlp_granularity_defaults_to_mlp_influence",
        "test_one_shot_run_removes_attention_only",
    ],
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(config, items):
    checked = set()
    for item in items:
        names = INTEGRATION_TESTS.get(item.path.name)
        if names is None:
            continue
        if item.path not in checked:
            checked.add(item.path)
            missing = [name for name in names if not hasattr(item.module, name)]
            if missing:
                raise pytest.UsageError(f"tests/conftest.py INTEGRATION_TESTS names tests that {item.path.name} "
                                        f"does not have: {', '.join(missing)}")
        if item.originalname in names:
            item.add_marker(pytest.mark.integration)
