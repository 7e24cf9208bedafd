"""Experts fused one at a time by moeslim equal, bit for bit, the parameters transformers' own loading builds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.fuse import plan_fusions
from moeslim.stream.runner import LayerRunner, decoder_of

PER_EXPERT = [
    "mixtral",
    "phimoe",
    "minimax_m2",
    "olmoe",
    "deepseek_v2",
    "qwen2_moe",
    "deepseek_v3",
    "glm4_moe",
    "qwen3_moe_multishard",
]


@pytest.mark.parametrize("name", PER_EXPERT)
def test_fused_layers_equal_from_pretrained(name: str, built: Callable[[str], Path]) -> None:
    src = built(name)
    ckpt = open_checkpoint(src)
    layout = resolve_layout(ckpt)
    runner = LayerRunner(ckpt, layout)
    reference = decoder_of(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)).layers
    try:
        for layer in layout.layers:
            if layer.mtp:
                continue
            names = [n for n in ckpt.tensors if n.startswith(layer.block)]
            fusions, rest = plan_fusions(runner._load_config.weight_mapping, [ckpt.tensors[n] for n in names])
            # every per-expert tensor is fused here (gate/up and down: two fused parameters per layer)
            assert len(fusions) == 2 and not [i.name for i in rest if ".experts." in i.name]
            assert {f.target for f in fusions} <= dict(runner.model.named_parameters()).keys()  # none left over
            with runner.loaded(layer.index) as loaded:
                ours = dict(loaded.named_parameters())
                theirs = dict(reference[layer.index].named_parameters())
                assert ours.keys() == theirs.keys()
                for key, value in theirs.items():
                    assert torch.equal(ours[key], value), key
    finally:
        runner.close()
