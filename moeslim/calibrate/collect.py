"""The calibration pass: embed, then every decoder layer in order, collecting routing statistics.

The batches are split into two halves whose statistics are kept apart, so the stability of the kept set
can be measured; criteria use their sum. With ``progressive``, each MoE layer is calibrated, its kept set
chosen, and the hidden states passed on are those of the layer routing only to its kept experts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from moeslim.calibrate.masking import mask_router
from moeslim.calibrate.ranks import SINGLE, Ranks
from moeslim.calibrate.reconstruction import ReconstructionSampler

if TYPE_CHECKING:
    from moeslim.calibrate.resume import Boundary
    from moeslim.calibrate.runner import Activations, LayerRunner
    from moeslim.calibrate.trials import PlanTrials
from moeslim.calibrate.stats import FIELDS, HALVES, LayerStats, Statistics, collect
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
    trials: PlanTrials | None = None,
    ranks: Ranks = SINGLE,
) -> Statistics:
    """Fill ``stats`` for every trunk MoE layer not already in it, running layers up to the last such one.

    Without ``start`` the tokens are embedded and layers already in ``stats`` are only run (resuming without
    saved hidden states); with it, the run starts at its layer from its hidden states, and no layer before it is
    loaded. ``on_layer`` follows each newly calibrated layer, once the hidden states hold its output (with
    ``progressive``, that of the layer routing only to its kept experts). With ``trials`` (a fresh run, not
    progressive) every layer runs, the candidate plans stream beside the statistics pass and are measured.
    With several ``ranks`` each runs its share of the batches (``start`` holds its own) and every rank ends with
    the statistics of all of them.
    """
    moe = {layer.index for layer in runner.layout.layers if not layer.mtp}
    pending = sorted(moe - set(stats.halves))
    if not pending:
        return stats
    if trials is not None and (start is not None or progressive is not None or set(stats.halves)):
        raise ValueError("plan trials need a fresh one-shot calibration")
    count = math.ceil(tokens.shape[0] / batch_size)  # batches over all ranks
    mine = ranks.share(count)
    if count < 2 or not mine:
        raise ValueError(f"calibration needs at least two batches (two halves) and one per rank; it has {count}")
    first, store = _first(runner, tokens, batch_size, max_bytes, start, pending[0], mine)
    halves = {h: [p for p, b in enumerate(mine) if (b < (count + 1) // 2) == (h == HALVES[0])] for h in HALVES}
    stop = runner.num_layers if trials is not None else pending[-1] + 1
    if trials is not None:
        trials.start(store, [p for p, b in enumerate(mine) if b in trials.held_out(count)])
    quiet = None if ranks.leader else True  # bars on a terminal, and from rank 0 only
    bar = tqdm(runner.layers(first, stop), desc="calibrating", total=stop, initial=first, unit="layer", disable=quiet)
    for index, layer in bar:
        block = runner.parts.get(index) if index in moe else None
        new = index in pending
        if trials is not None and index > pending[-1]:  # the rest of the model, for the held-out batches only
            runner.forward(index, layer, store, batches=trials.held)
        elif block is None or not new and progressive is None:
            runner.forward(index, layer, store)
        else:
            if new:
                with trials.capture(block) if trials is not None else contextlib.nullcontext():
                    _calibrate_layer(
                        runner, index, layer, block, store, stats, reconstruction_tokens, progressive is None,
                        halves, ranks, mine,
                    )  # fmt: skip
            if progressive is not None:
                kept = progressive(index, stats)
                with mask_router(block, kept, runner.layout.num_experts):
                    runner.forward(index, layer, store)
            if new:
                on_layer(index, stats, store)
        if trials is not None:
            trials.advance(runner, index, layer, stats)
    if trials is not None:
        trials.finish(runner, store, ranks)
    return stats


def _first(
    runner: LayerRunner, tokens: torch.Tensor, batch_size: int, max_bytes: int | None, start: Boundary | None,
    pending: int, mine: list[int],
) -> tuple[int, Activations]:  # fmt: skip
    """The first layer to run and its input: the embedded tokens of batches ``mine``, or the hidden states saved
    at ``start``."""
    if start is None:
        store = runner.embed(tokens, batch_size, max_bytes, only=mine)
    elif start.next_layer > pending:
        raise ValueError(f"cannot resume at layer {start.next_layer}: layer {pending} has no statistics")
    else:
        runner.capture(tokens, batch_size)  # the layers' call arguments (masks, rotary) for each batch shape
        store = start.store
    runner.unload_embedding()  # a vocab × hidden matrix not needed again
    if len(store) != len(mine):
        raise ValueError(f"the saved hidden states hold {len(store)} batches, not {len(mine)}")
    return (0, store) if start is None else (start.next_layer, store)


def _calibrate_layer(
    runner: LayerRunner, index: int, layer: torch.nn.Module, block: MoeParts, store: Activations,
    stats: Statistics, reconstruction_tokens: int, update: bool, halves: dict[str, list[int]], ranks: Ranks,
    mine: list[int],
) -> None:  # fmt: skip
    """One pass over this rank's batches (``halves``: their positions in ``store``) with statistics hooks, summed
    over the ranks; ``update`` also moves the hidden states on."""
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
    for part in parts.values():
        summed = ranks.sum(np.concatenate([*(part.arrays[f] for f in FIELDS), [part.tokens]]))
        for k, field in enumerate(FIELDS):
            part.arrays[field] = summed[k * stats.num_experts : (k + 1) * stats.num_experts]
        part.tokens = int(summed[-1])
    stats.halves[index] = parts
    if sampler is not None:
        sampler.share([mine[p] for h in HALVES for p in halves[h]], ranks)  # the batches in the order run
        stats.reconstruction[index] = ranks.from_leader(sampler.scores(runner.layout) if ranks.leader else None)
