"""The streaming runner's statistics equal those of one ordinary full-model transformers forward.

Both sides use the same statistics hooks (moeslim/calibrate/capture.py); what is compared is the streaming
machinery: meta-device model, per-layer loading through transformers' conversion, captured layer arguments,
batching, and the two calibration halves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moeslim.calibrate.capture import FIELDS, LayerStats, collect
from moeslim.calibrate.collect import HALVES, Statistics, calibrate_layers
from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.activations import Activations
from moeslim.stream.modules import moe_parts
from moeslim.stream.runner import LayerRunner

pytestmark = pytest.mark.slow

CALIBRATABLE = [
    "mixtral", "phimoe", "minimax_m2", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
    "kimi_k2", "glm4_moe", "gpt_oss", "granitemoe", "llama4_text", "qwen3_moe_multishard",
]  # fmt: skip
TOKENS = torch.randint(3, 128, (6, 20), generator=torch.Generator().manual_seed(1))  # 3 batches of 2


def _reference(src: Path, layout, batches: list[list[int]]) -> dict[int, LayerStats]:
    """Statistics from the full model loaded by from_pretrained, over the same batches."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    stats = {layer.index: LayerStats(layout.num_experts) for layer in layout.layers if not layer.mtp}
    with contextlib.ExitStack() as stack, torch.no_grad():
        parts = moe_parts(model, layout)
        for index, s in stats.items():
            stack.enter_context(collect(parts[index], s, layout.family.scoring))
        for rows in batches:
            model(input_ids=TOKENS[rows])
    return stats


@pytest.mark.parametrize("name", CALIBRATABLE)
def test_streaming_statistics_equal_full_forward(name: str, built: Callable[[str], Path]) -> None:
    src = built(name)
    ckpt = open_checkpoint(src)
    layout = resolve_layout(ckpt)
    runner = LayerRunner(ckpt, layout)
    try:
        stats = calibrate_layers(runner, TOKENS, 2, Statistics(layout.num_experts))
    finally:
        runner.close()
    expected = _reference(src, layout, [[0, 1], [2, 3], [4, 5]])
    assert sorted(stats.layers) == sorted(expected)
    for index, ref in expected.items():
        total = stats.total(index)
        assert np.array_equal(total["count"], ref["count"])  # selection counts exactly
        assert total["count"].sum() == 6 * 20 * layout.top_k  # every token routed top-k times
        for field in FIELDS:
            np.testing.assert_allclose(total[field], ref[field], rtol=1e-5, atol=1e-9)
        assert total.tokens == 120 and stats.halves[index][HALVES[0]].tokens == 80  # batches 0-1 | 2


def test_activations_spill_to_disk_and_read_back() -> None:
    store = Activations(max_bytes=100)
    a, b = torch.arange(20.0).reshape(4, 5), torch.ones(30)  # 80 bytes in memory, then 120 more spill
    store.append(a)
    store.append(b)
    assert store.resident_bytes() == 80
    assert torch.equal(store[0], a) and torch.equal(store[1], b)
    store[1] = b * 2
    assert torch.equal(store[1], b * 2) and store.resident_bytes() == 80
