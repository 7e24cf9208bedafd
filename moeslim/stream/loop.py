"""The one loop over decoder layers. Every pass of moeslim (statistics, ``auto``'s plan trials, the correction fit,
progressive masking, resume boundaries, validation) is an observer of it, so any set of them runs in one pass,
reading each layer's weights once.

The loop embeds this rank's calibration batches (or starts from saved hidden states), then for each decoder layer
loads its weights, runs it over the batches, which replaces the hidden states with its output, and unloads it. An
observer sees each step through hooks, all optional:

- ``begin(walk)``: once the stream exists (its hidden states entering ``walk.first``).
- ``stop(walk)``: the layer after the last one this observer needs run (None: no need).
- ``batches(walk, index)``: which batch positions the stream needs through layer ``index`` (None: all).
- ``layer(walk, index, layer)``: a context around the forward that measures layer ``index`` (hooks on its
  modules, e.g. statistics), or None where the observer does not watch this layer.
- ``batch(walk, index, b)``: a context around batch position ``b`` of that forward (None: nothing).
- ``route(walk, index)``: None, or a function giving the experts the stream's forward of this MoE layer may route
  to (progressive), called once the layer has been measured. Where an observer routes and another measures, the
  layer runs twice: measured unmasked without moving the stream, then masked to move it.
- ``ride(walk, index)``: a ``Ride``, other hidden states of the observer's own that should go through layer
  ``index`` beside the stream (validation's reference), or None. Where the layer streams its experts from disk,
  the rides' inputs are recorded with the stream's and swept in the same pass over the experts; each ride runs
  once the measured forward is over (no observer's hooks see it), still inside that replay.
- ``after(walk, index, layer)``: once the stream has passed layer ``index``, still loaded (trials run their own
  streams through it; resume boundaries are saved).
- ``unloaded(walk, index)``: after layer ``index`` is unloaded (validation loads the pruned model's layer then,
  so one decoder layer is resident at a time).
- ``finish(walk)``: after the last layer.
- ``done(walk)``: True once the observer needs nothing more; the walk stops when every observer is done.

Adding an observer: subclass ``Observer`` and override what it needs, e.g. a per-layer norm of the hidden states::

    class Norms(Observer):
        def __init__(self) -> None:
            self.norms: dict[int, float] = {}

        def after(self, walk: Walk, index: int, layer: torch.nn.Module) -> None:
            self.norms[index] = sum(float(walk.store[b].norm()) for b in range(len(walk.store)))

    walk(runner, tokens, batch_size, [Norms()])
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from moeslim.stream.activations import Activations
from moeslim.stream.masking import mask_router
from moeslim.stream.memory import is_out_of_memory, out_of_memory
from moeslim.stream.ranks import SINGLE, Ranks

if TYPE_CHECKING:
    from moeslim.stream.modules import MoeParts
    from moeslim.stream.resume import Boundary
    from moeslim.stream.runner import LayerRunner


@dataclass
class Walk:
    """One pass: the runner, the stream of hidden states of this rank's batches, and where it goes."""

    runner: LayerRunner
    tokens: torch.Tensor  # (samples, seq) over all ranks
    batch_size: int
    store: Activations  # this rank's batches, positions 0.. in the order of ``mine``
    mine: list[int]  # the batch numbers (over all ranks) this rank runs
    count: int  # batches over all ranks
    ranks: Ranks
    first: int  # the first layer run
    stop: int = 0  # one past the last layer run

    @property
    def moe(self) -> set[int]:
        """The trunk's MoE layers (MTP layers are not run: transformers does not run them either)."""
        return {layer.index for layer in self.runner.layout.layers if not layer.mtp}

    def block(self, index: int) -> MoeParts | None:
        """The MoE modules of trunk layer ``index``, or None for a dense layer."""
        return self.runner.parts.get(index) if index in self.moe else None


@dataclass(frozen=True)
class Ride:
    """Hidden states of an observer's own for one layer: ``inputs`` (one callable per batch, giving it) and ``run``,
    which runs the loaded layer over them in that order."""

    inputs: Sequence[Callable[[], torch.Tensor]]
    run: Callable[[torch.nn.Module], None]


class Observer:
    """Watches the loop; every hook is a no-op unless overridden (see the module docstring)."""

    def begin(self, walk: Walk) -> None:
        pass

    def stop(self, walk: Walk) -> int | None:
        return None

    def batches(self, walk: Walk, index: int) -> list[int] | None:
        return None

    def layer(self, walk: Walk, index: int, layer: torch.nn.Module) -> AbstractContextManager[None] | None:
        return None

    def batch(self, walk: Walk, index: int, b: int) -> AbstractContextManager[None] | None:
        return None

    def route(self, walk: Walk, index: int) -> Callable[[], tuple[int, ...]] | None:
        return None

    def ride(self, walk: Walk, index: int) -> Ride | None:
        return None

    def after(self, walk: Walk, index: int, layer: torch.nn.Module) -> None:
        pass

    def unloaded(self, walk: Walk, index: int) -> None:
        pass

    def finish(self, walk: Walk) -> None:
        pass

    def done(self, walk: Walk) -> bool:
        """Whether this observer needs nothing more (the walk stops early when every observer is done)."""
        return False


def walk(
    runner: LayerRunner, tokens: torch.Tensor, batch_size: int, observers: Sequence[Observer], *,
    ranks: Ranks = SINGLE, store: Activations | None = None, start: Boundary | None = None, desc: str = "running",
) -> Walk:  # fmt: skip
    """Run ``tokens`` ``(samples, seq)`` in batches of ``batch_size`` through the model's decoder layers, this
    rank's share of the batches, from the embedding (into the empty ``store``, default: one in memory) or from the
    saved hidden states of ``start``, up to the last layer an observer needs; see the module docstring. The hidden
    states are dropped at the end (a spill folder removed), also when the walk fails."""
    count = math.ceil(tokens.shape[0] / batch_size)
    mine = ranks.share(count)
    if start is not None:
        store, first = start.store, start.next_layer
    else:
        store, first = Activations() if store is None else store, 0
    with contextlib.closing(store):
        if start is None:
            runner.embed(tokens, batch_size, store, only=mine)
        else:
            runner.capture(tokens, batch_size)  # the layers' call arguments (masks, rotary) for each batch shape
        return _walk(Walk(runner, tokens, batch_size, store, mine, count, ranks, first), observers, desc)


def _walk(state: Walk, observers: Sequence[Observer], desc: str) -> Walk:
    """``walk`` once the stream holds the hidden states entering layer ``state.first``."""
    runner, ranks, first = state.runner, state.ranks, state.first
    runner.unload_embedding()  # a vocab × hidden matrix not needed again
    if len(state.store) != len(state.mine):
        raise ValueError(f"the saved hidden states hold {len(state.store)} batches, not {len(state.mine)}")
    for observer in observers:
        observer.begin(state)
    state.stop = max((s for o in observers if (s := o.stop(state)) is not None), default=first)
    quiet = None if ranks.leader else True  # bars on a terminal, and from rank 0 only

    at = [first]  # the layer being loaded or run, for the out-of-memory line

    def unloaded(index: int) -> None:
        at[0] = index + 1
        for observer in observers:
            observer.unloaded(state, index)

    layers = runner.layers(first, state.stop, unloaded=unloaded)
    try:
        for index, layer in tqdm(layers, desc=desc, total=state.stop, initial=first, unit="layer", disable=quiet):
            _step(state, observers, index, layer)
            for observer in observers:
                observer.after(state, index, layer)
            if all(observer.done(state) for observer in observers):
                break
    except (MemoryError, RuntimeError) as e:
        if is_out_of_memory(e):
            raise out_of_memory(f"at decoder layer {at[0]}") from e
        raise
    for observer in observers:
        observer.finish(state)
    return state


def _step(state: Walk, observers: Sequence[Observer], index: int, layer: torch.nn.Module) -> None:
    """Run layer ``index`` over the stream: measured by the observers that watch it, masked where one routes."""
    runner = state.runner
    wanted = [b for o in observers if (b := o.batches(state, index)) is not None]
    batches = sorted(set().union(*wanted)) if wanted else list(range(len(state.store)))
    block = state.block(index)
    route = None if block is None else next((r for o in observers if (r := o.route(state, index)) is not None), None)
    store = state.store
    rides = [ride for o in observers if (ride := o.ride(state, index)) is not None]
    with contextlib.ExitStack() as stack:
        # a layer streaming its experts runs over the batches (and the rides) first, its experts swept once, before
        # any observer watches: the observers see the run that follows (``chunks.py``)
        watched = [c for o in observers if (c := o.layer(state, index, layer)) is not None]  # not yet entered
        if watched or route is None:
            inputs = [functools.partial(store.__getitem__, b) for b in batches]
            stack.enter_context(runner.replaying(index, layer, [*inputs, *(x for r in rides for x in r.inputs)]))
            with contextlib.ExitStack() as watching:
                for context in watched:
                    watching.enter_context(context)
                _forward(state, observers, index, layer, batches, update=route is None)
            for ride in rides:
                ride.run(layer)
            rides = []
    for ride in rides:  # a progressive layer's measured run did not replay: each ride sweeps the experts itself
        with runner.replaying(index, layer, ride.inputs):
            ride.run(layer)
    if route is not None and block is not None:
        with mask_router(block, route(), runner.layout.num_experts):
            runner.forward(index, layer, state.store, batches=batches)


def _forward(
    state: Walk, observers: Sequence[Observer], index: int, layer: torch.nn.Module, batches: list[int], update: bool
) -> None:
    for b in batches:
        with contextlib.ExitStack() as stack:
            for observer in observers:
                if (context := observer.batch(state, index, b)) is not None:
                    stack.enter_context(context)
            state.runner.forward(index, layer, state.store, update=update, batches=[b])
