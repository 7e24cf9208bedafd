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
from tqdm import tqdm

from moeslim.calibrate.masking import mask_router
from moeslim.calibrate.reconstruction import ReconstructionSampler

if TYPE_CHECKING:
    from moeslim.calibrate.resume import Boundary
    from moeslim.calibrate.runner import Activations, LayerRunner
from moeslim.calibrate.stats import HALVES, LayerStats, Statistics, collect
from moeslim.engine.modules import MoeParts, takes_routing

Chooser = Callable[[int, Statistics], tuple[int, ...]]  # (layer index, statistics so far) → kept experts
OnLayer = Callable[[int, Statistics, "Activations"], None]  # (layer index, statistics, hidden states after it)


def calibrate_layers(
    runner: LayerRunner,
    tokens: torch.Tensor,
    batch_size: int,
    stats: Statistics,
    *,
    max_bytes: int | None = None,
    progressive: Chooser | None = None,
    reconstruction_tokens: int = 0,
    start: Boundary | None = None,
    on_layer: OnLayer = lambda index, stats, store: None,
) -> Statistics:
    """Fill ``stats`` for every trunk MoE layer not already in it, running layers up to the last such one.

    Without ``start`` the tokens are embedded and layers already in ``stats`` are only run (resuming without
    saved hidden states); with it, the run starts at its layer from its hidden states, and no layer before it is
    loaded. ``on_layer`` follows each newly calibrated layer, once the hidden states hold its output (with
    ``progressive``, that of the layer routing only to its kept experts).
    """
    moe = {layer.index for layer in runner.layout.layers if not layer.mtp}
    pending = sorted(moe - set(stats.halves))
    if not pending:
        return stats
    first, store = _first(runner, tokens, batch_size, max_bytes, start, pending[0])
    layers = runner.layers(first, pending[-1] + 1)
    bar = tqdm(layers, desc="calibrating", total=pending[-1] + 1, initial=first, unit="layer", disable=None)
    for index, layer in bar:
        block = runner.parts.get(index) if index in moe else None
        new = index in pending
        if block is None or not new and progressive is None:
            runner.forward(index, layer, store)
            continue
        if new:
            _calibrate_layer(runner, index, layer, block, store, stats, reconstruction_tokens, progressive is None)
        if progressive is not None:
            kept = progressive(index, stats)
            with mask_router(block, kept, runner.layout.num_experts):
                runner.forward(index, layer, store)
        if new:
            on_layer(index, stats, store)
    return stats


def _first(
    runner: LayerRunner, tokens: torch.Tensor, batch_size: int, max_bytes: int | None, start: Boundary | None,
    pending: int,
) -> tuple[int, Activations]:  # fmt: skip
    """The first layer to run and its input: the embedded tokens, or the hidden states saved at ``start``."""
    if start is None:
        store = runner.embed(tokens, batch_size, max_bytes)
    elif start.next_layer > pending:
        raise ValueError(f"cannot resume at layer {start.next_layer}: layer {pending} has no statistics")
    else:
        runner.capture(tokens, batch_size)  # the layers' call arguments (masks, rotary) for each batch shape
        store = start.store
    runner.unload_embedding()  # a vocab × hidden matrix not needed again
    if len(store) < 2:
        raise ValueError("calibration needs at least two batches (two halves)")
    return (0, store) if start is None else (start.next_layer, store)


def _calibrate_layer(
    runner: LayerRunner, index: int, layer: torch.nn.Module, block: MoeParts, store: Activations,
    stats: Statistics, reconstruction_tokens: int, update: bool,
) -> None:  # fmt: skip
    """One pass over all batches with statistics hooks; ``update`` also moves the hidden states on."""
    n = len(store)
    halves = {HALVES[0]: range(0, (n + 1) // 2), HALVES[1]: range((n + 1) // 2, n)}
    parts = {h: LayerStats(stats.num_experts) for h in HALVES}
    # reconstruction needs the experts module to take the router's choice (Llama-4's routes every token densely)
    sampler = (
        ReconstructionSampler(block, reconstruction_tokens)
        if reconstruction_tokens and takes_routing(block.experts)
        else None
    )
    with sampler.capture() if sampler else contextlib.nullcontext():
        for half, batches in halves.items():
            with collect(block, parts[half], runner.layout.family.scoring):
                runner.forward(index, layer, store, update=update, batches=batches)
    stats.halves[index] = parts
    if sampler is not None:
        stats.reconstruction[index] = sampler.scores(runner.layout)
