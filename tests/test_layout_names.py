"""The one home of per-expert tensor naming and completeness (``layout.py``): what the layout and the structural
check both rely on."""

from __future__ import annotations

import pytest

from moeslim.families.table import DERIVED, FAMILIES
from moeslim.layout import decoder_layer_of, expert_pattern, incomplete_expert

PER_EXPERT = sorted((f for f in (*FAMILIES.values(), *DERIVED.values()) if not f.fused), key=lambda f: f.name)


@pytest.mark.parametrize("family", PER_EXPERT, ids=lambda f: f.name)
def test_every_per_expert_family_parses_its_own_names_back(family) -> None:
    """A name built from the family's own record (as ``save_pretrained`` writes it) parses into its parts."""
    prefix = f"model.{family.layers_name}.7.{family.block_path}{family.experts[0]}"
    m = expert_pattern(family).match(f"{prefix}12.down_proj.weight")
    assert m is not None and (m["prefix"], m["layer"], m["expert"], m["suffix"]) == (
        prefix, "7", "12", "down_proj.weight",
    )  # fmt: skip
    assert expert_pattern(family).match(f"model.{family.layers_name}.7.self_attn.q_proj.weight") is None
    assert decoder_layer_of(f"{prefix}12.down_proj.weight", family.layers_name) == 7


def test_decoder_layer_of() -> None:
    assert decoder_layer_of("model.layers.3.mlp.gate.weight") == 3
    assert decoder_layer_of("layers.0.x") == 0  # at the start of the name
    assert decoder_layer_of("model.sublayers.3.x") is None  # "layers" must be a whole name part
    assert decoder_layer_of("lm_head.weight") is None
    assert decoder_layer_of("transformer.blocks.2.ffn.x", "blocks") == 2


def test_incomplete_expert_names_the_first_gap() -> None:
    full = {"w1", "w2", "w3"}
    assert incomplete_expert({0: full, 1: full}, 2) is None
    assert incomplete_expert({0: full}, 2) == (1, None)  # expert 1 absent
    assert incomplete_expert({0: full, 1: {"w1", "w3"}}, 2) == (1, "w2")  # expert 1 lacks w2
    assert incomplete_expert({0: {"w1"}, 1: full}, 2) == (0, "w2")  # expert 0 lacks what expert 1 has
    assert incomplete_expert({0: full, 1: full, 5: {"w1"}}, 2) is None  # past the count: the callers' concern
