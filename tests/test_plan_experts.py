"""`layerprune plan` counts expert pruning: the pruned model's parameters are those a real expert cut leaves,
a token's compute is its top-k experts (so removing experts leaves the time per token as it was), and a dense
model given an expert budget is refused with one line."""

import pytest
from typer.testing import CliRunner

from layerprune.api import plan_job, prune_model
from layerprune.cli import app
from layerprune.models.anatomy import count_parameters
from layerprune.models.loading import load_model
from layerprune.models.saving import save_model
from layerprune.models.shape import shape_from_config
from tiny_models import CORPUS, N_EXPERTS, tiny_model, tiny_moe_model, tiny_tokenizer
from cli_asserts import assert_one_line_error


@pytest.fixture
def moe_dir(tmp_path):
    save_model(tiny_moe_model("qwen2_moe"), tiny_tokenizer(), tmp_path / "moe")  # 3 layers, a dense one, shared experts
    (tmp_path / "text.txt").write_text(CORPUS)
    return tmp_path


@pytest.mark.parametrize("layers", [None, 1])
def test_planned_parameters_are_those_of_the_real_cut(moe_dir, layers):
    plan = plan_job(str(moe_dir / "moe"), expert_ratio=0.25, num_layers=layers)
    prune_model(str(moe_dir / "moe"), out=str(moe_dir / "out"), expert_ratio=0.25, expert_metric="random",
                num_layers=layers, metric="reverse-order", log=lambda _: None)
    real = count_parameters(load_model(str(moe_dir / "out")).model)["total"]
    assert plan.experts == N_EXPERTS and plan.experts_kept == N_EXPERTS - 2
    assert plan.layers_kept == 3 - (layers or 0)
    if layers is None:
        assert plan.params_kept == real  # every layer kept: exact
    else:  # the plan counts the average layer: the dense layer is smaller than the MoE ones it stands among
        assert abs(plan.params_kept - real) / real < 0.25
    assert plan.params_kept < plan.params


def test_a_token_computes_with_its_top_k_experts_whatever_their_number():
    shape = shape_from_config(tiny_moe_model("qwen3_moe").config)
    routed = shape.expert_params - shape.router_params  # the routers compute every expert's logit
    assert routed == 2 * N_EXPERTS * 3 * 32 * 16 and shape.router_params == 2 * N_EXPERTS * 32  # 2 layers, hand count
    assert shape.active_params() == shape.params() - routed + routed * shape.top_k // shape.experts
    cut = shape.without_experts(4)
    assert cut.params(cut.layers) == shape.params() - shape.expert_params // 2
    assert cut.active_params() == shape.active_params()  # the router still picks top_k experts


def test_plan_cli_names_the_experts_and_refuses_a_dense_model(moe_dir):
    result = CliRunner().invoke(app, ["plan", str(moe_dir / "moe"), "--num-experts", "3"])
    assert result.exit_code == 0, result.output
    assert "3 -> 3 layers, 8 -> 5 experts per MoE layer" in " ".join(result.output.split())
    save_model(tiny_model("llama"), tiny_tokenizer(), moe_dir / "dense")
    assert_one_line_error(CliRunner().invoke(app, ["plan", str(moe_dir / "dense"), "--expert-ratio", "0.25"]),
                          "not a mixture-of-experts model")
    assert_one_line_error(CliRunner().invoke(app, ["plan", str(moe_dir / "moe"), "--num-experts", "7"]),
                          "at least 2 must stay")
