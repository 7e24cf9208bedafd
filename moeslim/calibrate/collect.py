"""The calibration pass: embed, then every decoder layer in order, collecting routing statistics.

The batches are split into two halves whose statistics are kept apart, so the stability of the kept set
can be measured; criteria use their sum. With ``progressive``, each MoE layer is calibrated, its kept set
chosen, and the hidden states passed on are those of the layer routing only to its kept experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from moeslim.calibrate.masking import mask_router
from moeslim.calibrate.reconstruction import ReconstructionSampler

if TYPE_CHECKING:
    from moeslim.calibrate.runner import Activations, LayerRunner
from moeslim.calibrate.stats import HALVES, LayerStats, Statistics, collect, moe_block, router_module

Chooser = Callable[[int, Statistics], tuple[int, ...]]  # (layer index, statistics so far) → kept experts


def calibrate_layers(
    runner: LayerRunner,
    tokens: torch.Tensor,
    batch_size: int,
    stats: Statistics,
    *,
    max_bytes: int | None = None,
    progressive: Chooser | None = None,
    reconstruction_tokens: int = 0,
    on_layer: Callable[[int, Statistics], None] = lambda index, stats: None,
) -> Statistics:
    """Fill ``stats`` for every trunk MoE layer not already in it; layers present are only run (resuming)."""
    moe = {layer.index for layer in runner.layout.layers if not layer.mtp}
    store = runner.embed(tokens, batch_size, max_bytes)
    runner.unload_embedding()  # a vocab × hidden matrix not needed again
    if len(store) < 2:
        raise ValueError("calibration needs at least two batches (two halves)")
    for index, layer in runner.layers():
        block = moe_block(layer) if index in moe else None
        if block is None or index in stats.halves and progressive is None:
            runner.forward(index, layer, store)
            continue
        if index not in stats.halves:
            _calibrate_layer(runner, index, layer, block, store, stats, reconstruction_tokens, progressive is None)
            on_layer(index, stats)
        if progressive is not None:
            with mask_router(block, router_module(block), progressive(index, stats)):
                runner.forward(index, layer, store)
    return stats


def _calibrate_layer(
    runner: LayerRunner, index: int, layer: torch.nn.Module, block: torch.nn.Module, store: Activations,
    stats: Statistics, reconstruction_tokens: int, update: bool,
) -> None:  # fmt: skip
    """One pass over all batches with statistics hooks; ``update`` also moves the hidden states on."""
    n = len(store)
    halves = {HALVES[0]: range(0, (n + 1) // 2), HALVES[1]: range((n + 1) // 2, n)}
    parts = {h: LayerStats(stats.num_experts) for h in HALVES}
    sampler = ReconstructionSampler(block, reconstruction_tokens) if reconstruction_tokens else None
    with sampler.capture() if sampler else contextlib.nullcontext():
        for half, batches in halves.items():
            with collect(block, parts[half], runner.layout.family.scoring):
                runner.forward(index, layer, store, update=update, batches=batches)
    stats.halves[index] = parts
    if sampler is not None:
        stats.reconstruction[index] = sampler.scores(runner.layout)
