"""Slicing and renumbering as byte ranges: pure functions, hand-computed expectations."""

from __future__ import annotations

from pathlib import Path

from moeslim.shards import TensorInfo
from moeslim.surgery.mapping import rename_expert, slice_rows

F = Path("shard.safetensors")


def test_consecutive_rows_become_one_range() -> None:
    info = TensorInfo("gate.weight", F, "F32", (4, 3), 100, 148)  # rows of 3 × 4 bytes = 12 bytes
    out = slice_rows(info, (1, 2))
    assert out.shape == (2, 3)
    assert out.pieces == ((F, 112, 136),)  # rows 1-2: 100 + 12 .. 100 + 36


def test_scattered_rows_keep_their_order() -> None:
    info = TensorInfo("experts.gate_up_proj", F, "BF16", (4, 2, 5), 0, 80)  # a row: 2 × 5 × 2 bytes = 20
    out = slice_rows(info, (0, 3))
    assert out.shape == (2, 2, 5)
    assert out.pieces == ((F, 0, 20), (F, 60, 80))
    assert out.nbytes == 40


def test_mxfp4_blocks_slice_as_bytes() -> None:
    info = TensorInfo("experts.down_proj_blocks", F, "U8", (8, 4, 2, 16), 8, 8 + 8 * 128)  # 128 bytes per expert
    assert slice_rows(info, (5,)).pieces == ((F, 8 + 5 * 128, 8 + 6 * 128),)


def test_rename_only_touches_the_expert_id() -> None:
    block = "model.layers.1.block_sparse_moe."
    old = block + "experts.7.w1.weight_scale_inv"
    assert rename_expert(old, block, 7, 1) == block + "experts.1.w1.weight_scale_inv"
    # the layer number equals the expert id here: only the expert's position may change
    assert rename_expert("model.layers.1.mlp.experts.1.up_proj.weight", "model.layers.1.mlp.", 1, 0) == (
        "model.layers.1.mlp.experts.0.up_proj.weight"
    )
