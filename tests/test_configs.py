"""One config per stage: every CLI option maps onto a config field with the config's default, and the
API, the CLI and a YAML run give identical results for the same settings."""

import json

import pytest
import torch
import typer.main
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from layerprune import save_model
from layerprune.cli import app
from layerprune.cli.options import CALIBRATION_OPTIONS, config_from_options
from layerprune.config import load_run_config
from layerprune.benchmark.config import BenchConfig
from layerprune.evaluation.config import EvalConfig
from layerprune.selection.config import CalibrationConfig, PruneConfig, ScoreConfig
from layerprune.finetune import HealConfig
from layerprune.runs.pipeline import run_pipeline
from tiny_models import CORPUS, tiny_model, tiny_tokenizer

runner = CliRunner()
TEXT = CORPUS  # tiny_models.CORPUS, shared

# Fields set only from YAML or the API (a dict per metric has no sensible flag), per command.
NOT_ON_THE_COMMAND_LINE = {"prune": {"metric_params", "calibration"}, "finetune": set(), "eval": set(),
                           "bench": set(), "score": {"calibration", "stability"}}  # stability: lists of --calib ...
COMMAND_CONFIGS = {"prune": PruneConfig, "finetune": HealConfig, "eval": EvalConfig, "bench": BenchConfig,
                   "score": ScoreConfig}


def command_params(name: str) -> dict:
    command = typer.main.get_command(app).commands[name]
    return {param.name: param for param in command.params}


@pytest.mark.parametrize("command", list(COMMAND_CONFIGS))
def test_every_config_field_is_an_option_that_defers_to_the_config_default(command):
    config_cls, params = COMMAND_CONFIGS[command], command_params(command)
    expected = set(config_cls.model_fields) - NOT_ON_THE_COMMAND_LINE[command]
    if command in ("prune", "score"):
        expected |= set(CALIBRATION_OPTIONS.values())
    missing = sorted(expected - set(params))
    assert not missing, f"`layerprune {command}` has no option for {missing}"
    for name in expected:
        # None means "not given": the config's own default applies, so the CLI cannot disagree with it
        assert params[name].default is None, f"--{name} has its own default {params[name].default!r}"


@pytest.mark.parametrize("config_cls, required", [(PruneConfig, {"ratio": 0.25}), (HealConfig, {}),
                                                  (EvalConfig, {}), (BenchConfig, {})])
def test_no_options_give_the_config_defaults(config_cls, required):
    nested = {"calibration": CALIBRATION_OPTIONS} if config_cls is PruneConfig else None
    assert config_from_options(config_cls, dict(required), nested=nested) == config_cls(**required)


def test_calibration_options_reach_the_nested_config():
    values = {"ratio": 0.25, "calib": "wikitext2", "n_samples": 4, "seq_len": 32, "seed": 3, "calib_field": "body"}
    config = config_from_options(PruneConfig, values, nested={"calibration": CALIBRATION_OPTIONS})
    assert config.calibration == CalibrationConfig(source="wikitext2", n_samples=4, seq_len=32, seed=3, field="body")


def test_one_default_per_setting_everywhere():
    """The defaults a user meets through the API, the CLI and YAML are the same objects."""
    import inspect

    from layerprune.api import finetune_model, prune_model
    from layerprune.config import RunConfig
    from layerprune.common.config_base import DEFAULT_DTYPE

    assert RunConfig.model_fields["dtype"].default == DEFAULT_DTYPE
    assert inspect.signature(prune_model).parameters["dtype"].default == DEFAULT_DTYPE
    for command in ("prune", "eval", "bench", "score", "info"):
        assert command_params(command)["dtype"].default == DEFAULT_DTYPE, command
    assert inspect.signature(finetune_model).parameters["config"].default is None  # None: HealConfig() itself
    assert PruneConfig(ratio=0.25).metric == "block-influence"


@pytest.fixture
def workspace(tmp_path):
    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(TEXT)
    with open(tmp_path / "sft.jsonl", "w") as f:
        for w in ("cat", "dog", "owl", "sun") * 4:
            f.write(json.dumps({"instruction": f"say {w}", "context": "", "response": f"{w} {w}"}) + "\n")
    return tmp_path


def run_yaml(tmp_path, **stages) -> dict:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "tiny"), "out": str(tmp_path / "run"), **stages}))
    return run_pipeline(load_run_config(path), log=lambda message: None)


def weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.integration
def test_prune_is_the_same_through_api_cli_and_yaml(workspace):
    from layerprune.api import prune_model

    calib = {"source": str(workspace / "text.txt"), "n_samples": 4, "seq_len": 32}
    prune = {"metric": ["block-influence", "reverse-order"], "select": "auto", "num_layers": 2, "calibration": calib}
    api = prune_model(str(workspace / "tiny"), out=str(workspace / "api"), log=lambda m: None, **prune)
    cli = runner.invoke(app, ["prune", str(workspace / "tiny"), "--out", str(workspace / "cli"), "--metric",
                              "block-influence,reverse-order", "--select", "auto", "--num-layers", "2", "--calib",
                              calib["source"], "--n-samples", "4", "--seq-len", "32"])
    assert cli.exit_code == 0, cli.output
    run_yaml(workspace, prune=prune)
    selection = json.loads((workspace / "run" / "selection.json").read_text())
    cli_record = json.loads((workspace / "cli" / "layerprune.json").read_text())
    assert api.dropped == selection["dropped"] == cli_record["dropped_layers"]
    assert api.how["candidates"] == selection["candidates"] == cli_record["selection"]["candidates"]
    assert_same_weights(workspace / "api", workspace / "cli")
    assert_same_weights(workspace / "api", workspace / "run" / "pruned")


@pytest.mark.integration
def test_heal_is_the_same_through_api_cli_and_yaml(workspace):
    from layerprune.api import finetune_model

    heal = {"method": "lora", "data": str(workspace / "sft.jsonl"), "max_steps": 2, "batch_size": 4,
            "effective_batch_size": 4, "warmup_steps": 0, "max_length": 64, "bf16": False}
    finetune_model(str(workspace / "tiny"), out=str(workspace / "api"), **heal)
    cli = runner.invoke(app, ["finetune", str(workspace / "tiny"), "--out", str(workspace / "cli"), "--method", "lora",
                              "--data", heal["data"], "--max-steps", "2", "--batch-size", "4",
                              "--effective-batch-size", "4", "--warmup-steps", "0", "--max-length", "64", "--no-bf16"])
    assert cli.exit_code == 0, cli.output
    run_yaml(workspace, prune={"drop": [1]}, heal=[heal])
    # the run heals its pruned model: heal the same pruned model through the API to compare
    finetune_model(str(workspace / "run" / "pruned"), out=str(workspace / "api-pruned"), **heal)
    assert_same_weights(workspace / "api", workspace / "cli")
    assert_same_weights(workspace / "api-pruned", workspace / "run" / "healed-1")
    for folder in ("api", "cli", "run/healed-1"):
        history = json.loads((workspace / folder / "layerprune.json").read_text())["history"]
        assert history[-1]["healed"] == "lora", folder


@pytest.mark.integration
def test_eval_is_the_same_through_api_cli_and_yaml(workspace):
    from layerprune.evaluation.protocol import plan_eval, run_eval
    from layerprune.models.loading import load_model

    settings = {"ppl": str(workspace / "text.txt"), "tasks": "none", "seq_len": 32, "ppl_windows": 4, "samples": False}
    api = run_eval(load_model(str(workspace / "tiny")), plan_eval(**settings)).record
    cli = runner.invoke(app, ["eval", str(workspace / "tiny"), "--out", str(workspace / "cli"), "--ppl",
                              settings["ppl"], "--tasks", "none", "--seq-len", "32", "--ppl-windows", "4",
                              "--no-samples"])
    assert cli.exit_code == 0, cli.output
    run_yaml(workspace, prune={"drop": [1]}, eval={**settings, "before_healing": False})
    cli_record = json.loads((workspace / "cli" / "eval.json").read_text())
    run_record = json.loads((workspace / "run" / "eval-original" / "eval.json").read_text())
    ppl = [r["perplexity"]["text.txt"]["ppl"] for r in (api, cli_record, run_record)]
    assert ppl[0] == ppl[1] == ppl[2]


@pytest.mark.integration
def test_bench_settings_are_the_same_through_cli_and_yaml(workspace):
    cli = runner.invoke(app, ["bench", str(workspace / "tiny"), "--out", str(workspace / "cli"), "--new-tokens", "2",
                              "--seq-len", "8", "--warmup", "0", "--runs", "1"])
    assert cli.exit_code == 0, cli.output
    run_yaml(workspace, prune={"drop": [1]}, bench={"new_tokens": [2], "seq_len": 8, "warmup": 0, "runs": 1})
    cli_config = json.loads((workspace / "cli" / "bench.json").read_text())["models"][0]["config"]
    run_config = json.loads((workspace / "run" / "bench" / "bench.json").read_text())["models"][0]["config"]
    assert cli_config == run_config == BenchConfig(new_tokens=[2], seq_len=8, warmup=0, runs=1).model_dump(mode="json")


ONE_PATH_CASES = {
    "search": ({"select": "search", "num_layers": 2}, ["--select", "search", "--num-layers", "2"]),
    "quality target": ({"select": "search", "max_ppl_ratio": 50.0}, ["--select", "search", "--max-ppl-ratio", "50"]),
    "iterative 1:4:8 healed between rounds": ({"metric": "block-influence", "schedule": "1:4:8"},
                                              ["--metric", "block-influence", "--schedule", "1:4:8"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(ONE_PATH_CASES))
def test_one_prune_path_gives_the_same_layers_and_weights_through_api_cli_and_yaml(case, tmp_path, corpus_file):
    """The API, the CLI and a YAML run prune through strategies.prune: same drop-set, same final weights."""
    from layerprune.api import prune_model

    save_model(tiny_model("llama", num_hidden_layers=10), tiny_tokenizer(), tmp_path / "tiny")
    calib = {"source": str(corpus_file), "n_samples": 4, "seq_len": 32}
    prune, flags = ONE_PATH_CASES[case]
    prune = {**prune, "calibration": calib}
    iterative = "schedule" in prune
    heal = {"method": "cpt", "data": str(corpus_file), "max_steps": 2, "batch_size": 2, "warmup_steps": 0,
            "max_length": 32, "bf16": False}
    (tmp_path / "heal.yaml").write_text(yaml.safe_dump(heal))
    api = prune_model(str(tmp_path / "tiny"), out=str(tmp_path / "api"), log=lambda m: None,
                      heal=heal if iterative else None, **prune)
    cli = runner.invoke(app, ["prune", str(tmp_path / "tiny"), "--out", str(tmp_path / "cli"), *flags,
                              "--calib", calib["source"], "--n-samples", "4", "--seq-len", "32",
                              *(["--heal-config", str(tmp_path / "heal.yaml")] if iterative else [])])
    assert cli.exit_code == 0, cli.output
    run_yaml(tmp_path, prune=prune, heal=[heal] if iterative else [])
    cli_record = json.loads((tmp_path / "cli" / "layerprune.json").read_text())
    if iterative:
        rounds = [json.loads((tmp_path / "run" / "rounds" / f"round-{r}" / "selection.json").read_text())["dropped"]
                  for r in (1, 2)]
        assert [r["dropped"] for r in api.rounds] == rounds and len(rounds[0]) == len(rounds[1]) == 4
        assert api.dropped == cli_record["dropped_layers"] == sorted(rounds[0] + rounds[1])
        final = tmp_path / "run" / "rounds" / "round-2" / "healed-1"
        for folder in (tmp_path / "api", tmp_path / "cli", final):  # every round was healed, in order
            history = json.loads((folder / "layerprune.json").read_text())["history"]
            assert [h.get("round", h.get("healed")) for h in history] == [1, "cpt", 2, "cpt"], folder
    else:
        selection = json.loads((tmp_path / "run" / "selection.json").read_text())
        assert api.dropped == selection["dropped"] == cli_record["dropped_layers"]
        assert api.how["constraints"] == selection["constraints"]
        final = tmp_path / "run" / "pruned"
    assert_same_weights(tmp_path / "api", tmp_path / "cli")
    assert_same_weights(tmp_path / "api", final)


@pytest.mark.integration
def test_score_is_the_same_through_api_cli_and_yaml_in_one_schema(workspace):
    """score_model, `layerprune score` and a run's prune stage write one scores.json schema with equal scores,
    and `layerprune report` reads the run's back."""
    from layerprune.api import score_model
    from layerprune.importance.scores_file import read_scores_json

    calib = {"source": str(workspace / "text.txt"), "n_samples": 4, "seq_len": 32}
    metrics = ["block-influence", "angular", "magnitude-l1"]
    api = score_model(str(workspace / "tiny"), out=str(workspace / "api"), metric=metrics, num_layers=2,
                      calibration=calib, log=lambda m: None)
    cli = runner.invoke(app, ["score", str(workspace / "tiny"), "--out", str(workspace / "cli"), "--metric",
                              ",".join(metrics), "--num-layers", "2", "--calib", calib["source"], "--n-samples", "4",
                              "--seq-len", "32"])
    assert cli.exit_code == 0, cli.output
    run_yaml(workspace, prune={"metric": metrics, "select": "auto", "num_layers": 2, "calibration": calib})
    (cli_scores, cli_selections), (run_scores, _) = (read_scores_json(workspace / "cli" / "scores.json"),
                                                     read_scores_json(workspace / "run" / "scores.json"))
    def same(a, b) -> bool:  # NaN marks an impossible angular block start: compare as written
        return json.dumps(a.to_json(), sort_keys=True) == json.dumps(b.to_json(), sort_keys=True)

    api_file = read_scores_json(workspace / "api" / "scores.json")[0]
    for name in metrics:
        assert same(api.scores[name], api_file[name]) and same(api_file[name], cli_scores[name]), name
        assert same(cli_scores[name], run_scores[name]), name
        assert api.selections[name].dropped == cli_selections[name]["dropped"], name
    assert runner.invoke(app, ["report", str(workspace / "run")]).exit_code == 0
    assert (workspace / "run" / "scores.png").exists()
