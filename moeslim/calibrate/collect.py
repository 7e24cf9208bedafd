"""Routing statistics as an observer of the layer loop (``stream/loop.py``).

The batches are split into two halves whose statistics are kept apart, so the stability of the kept set
can be measured; criteria use their sum. With ``progressive``, each MoE layer is calibrated, its kept set
chosen, and the hidden states passed on are those of the layer routing only to its kept experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np
import torch

from moeslim.calibrate.capture import FIELDS, HALVES, LayerStats, Statistics, collect
from moeslim.calibrate.reconstruction import ReconstructionSampler
from moeslim.stream.loop import Observer, Walk, walk
from moeslim.stream.modules import takes_routing
from moeslim.stream.ranks import SINGLE, Ranks

if TYPE_CHECKING:
    from moeslim.layout import Layout
    from moeslim.stream.activations import Activations
    from moeslim.stream.resume import Boundary
    from moeslim.stream.runner import LayerRunner

__all__ = ["HALVES", "Statistics", "Collector", "calibrate_layers"]

Chooser = Callable[[int, Statistics], tuple[int, ...]]  # (layer index, statistics so far) → kept experts
OnLayer = Callable[[int, Statistics, "Activations"], None]  # (layer index, statistics, hidden states after it)


class Collector(Observer):
    """Fills ``stats`` for every trunk MoE layer not already in it, running layers up to the last such one.

    Layers already in ``stats`` are only run (resuming without saved hidden states). ``on_layer`` follows each
    newly calibrated layer, once the hidden states hold its output (with ``progressive``, that of the layer
    routing only to its kept experts). With several ranks each runs its share of the batches and every rank
    ends with the statistics of all of them.
    """

    def __init__(
        self, stats: Statistics, *, reconstruction_tokens: int = 0, progressive: Chooser | None = None,
        on_layer: OnLayer = lambda index, stats, store: None,
    ) -> None:  # fmt: skip
        self.stats, self.reconstruction_tokens = stats, reconstruction_tokens
        self.progressive, self.on_layer = progressive, on_layer
        self.pending: list[int] = []
        self._half: dict[int, str] = {}  # batch position → its half
        self._parts: dict[str, LayerStats] = {}  # the layer being measured, per half

    def begin(self, walk: Walk) -> None:
        self.pending = sorted(walk.moe - set(self.stats.halves))
        if walk.count < 2 or not walk.mine:
            raise ValueError(
                f"calibration needs at least two batches (two halves) and one per rank; it has {walk.count}"
            )
        if self.pending and walk.first > self.pending[0]:
            raise ValueError(f"cannot resume at layer {walk.first}: layer {self.pending[0]} has no statistics")
        self._half = {
            p: HALVES[0] if b < (walk.count + 1) // 2 else HALVES[1] for p, b in enumerate(walk.mine)
        }  # fmt: skip

    def stop(self, walk: Walk) -> int | None:
        return self.pending[-1] + 1 if self.pending else None

    def batches(self, walk: Walk, index: int) -> list[int] | None:
        return list(range(len(walk.store))) if self.pending and index <= self.pending[-1] else None

    def layer(self, walk: Walk, index: int, layer: torch.nn.Module) -> AbstractContextManager[None] | None:
        return self._measure(walk, index) if index in self.pending and walk.block(index) is not None else None

    def batch(self, walk: Walk, index: int, b: int) -> AbstractContextManager[None] | None:
        if not self._parts:
            return None
        block = walk.block(index)
        assert block is not None
        return collect(block, self._parts[self._half[b]], walk.runner.layout.family.scoring)

    def route(self, walk: Walk, index: int) -> Callable[[], tuple[int, ...]] | None:
        progressive = self.progressive
        if progressive is None or not self.pending or index > self.pending[-1]:
            return None
        return lambda: progressive(index, self.stats)

    def after(self, walk: Walk, index: int, layer: torch.nn.Module) -> None:
        if index in self.pending:
            self.on_layer(index, self.stats, walk.store)

    @contextlib.contextmanager
    def _measure(self, walk: Walk, index: int) -> Iterator[None]:
        """One pass over this rank's batches with statistics hooks (``batch``), summed over the ranks."""
        block = walk.block(index)
        assert block is not None
        self._parts = {h: LayerStats(self.stats.num_experts) for h in HALVES}
        # reconstruction needs the experts module to take the router's choice (Llama-4's routes every token densely)
        sampler = (
            ReconstructionSampler(block, self.reconstruction_tokens, walk.runner.experts_of(index))
            if self.reconstruction_tokens and takes_routing(block.experts)
            else None
        )
        with sampler.capture() if sampler else contextlib.nullcontext():
            yield
        parts, self._parts = self._parts, {}
        ranks, e = walk.ranks, self.stats.num_experts
        for part in parts.values():
            summed = ranks.sum(np.concatenate([*(part.arrays[f] for f in FIELDS), [part.tokens]]))
            for k, field in enumerate(FIELDS):
                part.arrays[field] = summed[k * e : (k + 1) * e]
            part.tokens = int(summed[-1])
        self.stats.halves[index] = parts
        if sampler is not None:
            order = [walk.mine[p] for h in HALVES for p in range(len(walk.mine)) if self._half[p] == h]
            sampler.share(order, ranks)  # the batches in the order run
            layout = walk.runner.layout
            self.stats.reconstruction[index] = ranks.from_leader(_reconstruction(sampler, layout, ranks, index))


def _reconstruction(sampler: ReconstructionSampler, layout: Layout, ranks: Ranks, index: int) -> np.ndarray | None:
    """The sampler's scores; a family whose router or experts the criterion cannot call on their own (a router that
    returns logits only and leaves the top-k to its block, zero-computation experts, experts that take a projection
    of the router's input) is refused in one line, naming another criterion."""
    from moeslim.errors import PlanError
    from moeslim.stream.memory import is_out_of_memory

    try:
        return sampler.scores(layout, ranks)
    except (IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        if is_out_of_memory(e) or isinstance(e, PlanError):
            raise
        raise PlanError(
            f"the reconstruction criterion cannot run {layout.family.name}'s router and experts on their own (layer"
            f" {index}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); choose another --criterion,"
            " such as ean (`moeslim calibrate`: pass --reconstruction-tokens 0)"
        ) from e


def calibrate_layers(
    runner: LayerRunner, tokens: torch.Tensor, batch_size: int, sink: Collector | Statistics, *observers: Observer,
    ranks: Ranks = SINGLE, store: Activations | None = None, start: Boundary | None = None,
) -> Statistics:  # fmt: skip
    """Calibrate in one walk over the layers: ``sink`` (a ``Collector``, or the statistics to fill with its
    defaults) and other ``observers`` (plan trials, the correction fit) in the same pass; the hidden states go
    into ``store`` (empty; default: one in memory) or start from ``start``'s."""
    collector = sink if isinstance(sink, Collector) else Collector(sink)
    stats = collector.stats
    if not {layer.index for layer in runner.layout.layers if not layer.mtp} - set(stats.halves):
        return stats  # nothing to calibrate: nothing is read
    walk(runner, tokens, batch_size, [collector, *observers], ranks=ranks, store=store, start=start,
         desc="calibrating")  # fmt: skip
    return stats
