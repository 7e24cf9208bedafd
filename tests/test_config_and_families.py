"""Config rewriting, family lookup and which layers each family makes MoE."""

from __future__ import annotations

import pytest

from moeslim.errors import CheckpointError, UnsupportedModelError
from moeslim.families.table import FAMILIES, family_of
from moeslim.layout import routing_of
from moeslim.surgery.config import dump_config, rewrite_config


def test_only_keys_present_in_the_file_change() -> None:
    cfg = {"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True}
    out = rewrite_config(cfg, FAMILIES["qwen3_moe"], 64, 4)
    assert out == {"model_type": "qwen3_moe", "num_experts": 64, "num_experts_per_tok": 4, "norm_topk_prob": True}
    assert list(out) == list(cfg) and cfg["num_experts"] == 128  # order kept, input untouched


def test_every_alias_present_is_rewritten() -> None:
    cfg = {"model_type": "gpt_oss", "num_local_experts": 32, "experts_per_token": 4, "num_experts_per_tok": 4}
    out = rewrite_config(cfg, FAMILIES["gpt_oss"], 16, 2)
    assert (out["num_local_experts"], out["experts_per_token"], out["num_experts_per_tok"]) == (16, 2, 2)


def test_wrapper_rewrites_the_nested_text_config() -> None:
    cfg = {"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_local_experts": 16}}
    out = rewrite_config(cfg, family_of(cfg), 8, 1)
    assert out["text_config"]["num_local_experts"] == 8 and "num_local_experts" not in out
    assert dump_config(out).endswith("}\n")


def test_unknown_family_names_the_supported_ones() -> None:
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*supports: .*deepseek_v3.*mixtral"):
        family_of({"model_type": "llama"})


@pytest.mark.parametrize(
    ("family", "cfg", "expected"),
    [
        ("qwen2_moe", {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}, [1, 5]),
        ("deepseek_v3", {"num_hidden_layers": 5, "first_k_dense_replace": 3}, [3, 4]),
        ("llama4", {"num_hidden_layers": 6, "interleave_moe_layer_step": 2}, [1, 3, 5]),
        ("llama4", {"num_hidden_layers": 6, "moe_layers": [0, 4]}, [0, 4]),
        ("mixtral", {"num_hidden_layers": 2}, [0, 1]),
    ],
)
def test_moe_layers_follow_the_config(family: str, cfg: dict, expected: list[int]) -> None:
    assert FAMILIES[family].moe_layers(cfg) == expected


def test_grouping_applies_only_to_group_limited_routers() -> None:
    assert FAMILIES["deepseek_v2"].groups({"n_group": 8, "topk_method": "greedy"}) == 1
    assert FAMILIES["deepseek_v2"].groups({"n_group": 8, "topk_method": "group_limited_greedy"}) == 8
    assert FAMILIES["deepseek_v3"].groups({"n_group": 8}) == 8


HUNYUAN_A13B = {  # the shape of tencent/Hunyuan-A13B-Instruct's config.json: per-layer lists, one entry per layer
    "model_type": "hunyuan_v1_moe",
    "num_hidden_layers": 3,
    "num_experts": 64,
    "moe_topk": [8, 8, 8],
    "num_shared_expert": [1, 1, 1],
    "moe_intermediate_size": [3072, 3072, 3072],
}


def test_a_per_layer_list_is_rewritten_as_a_list_of_the_new_value() -> None:
    out = rewrite_config(HUNYUAN_A13B, family_of(HUNYUAN_A13B), 32, 4)
    assert out == {**HUNYUAN_A13B, "num_experts": 32, "moe_topk": [4, 4, 4]}
    assert HUNYUAN_A13B["moe_topk"] == [8, 8, 8]  # input untouched


def test_a_per_layer_list_of_one_value_is_read_as_that_value() -> None:
    routing = routing_of(HUNYUAN_A13B)
    assert (routing.num_experts, routing.top_k) == (64, 8)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (
            [8, 8, 4],
            UnsupportedModelError,
            r"moe_topk differs between layers \(\[8, 8, 4\]\); a per-layer different top-k is not supported",
        ),
        ([8, "8", 8], CheckpointError, r"moe_topk is \[8, '8', 8\], not a whole number"),
        ([], CheckpointError, r"moe_topk is \[\], not a whole number"),
    ],
)
def test_a_per_layer_list_of_different_or_odd_values_is_refused(value: list, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        routing_of({**HUNYUAN_A13B, "moe_topk": value})


def test_a_list_where_the_family_takes_only_a_number_is_refused() -> None:
    """Only keys the derivation found to take a per-layer list may hold one (transformers refuses the others)."""
    assert family_of(HUNYUAN_A13B).per_layer == ("moe_topk",) and FAMILIES["qwen3_moe"].per_layer == ()
    cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": [2, 2]}
    with pytest.raises(CheckpointError, match=r"num_experts_per_tok is \[2, 2\], not a whole number"):
        routing_of(cfg)
