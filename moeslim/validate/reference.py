"""Validation's original side, run inside the calibration pass that ``slim`` makes anyway.

``slim`` validates the pruned model against its source on held-out text (``stream.py``), both models layer by
layer. When ``slim`` calibrates, the source's decoder layers are loaded one by one for the statistics already, so
the held-out tokens run through them there, as a stream of their own (``Reference``, an observer of that walk),
and the hidden states after each trunk MoE layer and after the last layer are kept (on disk past a bound).
Validation then runs the pruned model alone and compares it with them: the source's weights are read once per
``slim`` instead of once more for validation (a Hub source read in place is downloaded once).

The numbers are the ones a separate validation gives, bit for bit: the same layer code runs on the same weights in
the same dtype on the same device, batch by batch, the held-out batches never mixed with calibration batches.
Validation uses the reference only where its held-out tokens, batch size, dtype and device are those the reference
ran (``matches``); otherwise it runs the source again, as without one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from moeslim.stream.activations import Activations
from moeslim.stream.loop import Observer, Ride, Walk

#: the kept hidden states stay in memory up to this many bytes, the rest goes to disk: they are read once, at the end
RESIDENT_BYTES = 256 * 2**20


class Reference(Observer):
    """The source model's hidden states for the held-out ``tokens`` ``(samples, seq)`` in batches of
    ``batch_size``: after each trunk MoE layer (``states``) and after the last layer (``final``), computed by the
    walk's own loaded layers."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, spill_beside: Path | None = None) -> None:
        self.tokens, self.batch_size = tokens, batch_size
        self.stream = Activations()  # the held-out batches as they pass the layers
        self.kept = Activations(RESIDENT_BYTES, spill_beside)  # the states after each MoE layer, in order
        self._at: dict[int, range] = {}  # MoE layer → its batches' positions in ``kept``
        self.complete = False  # the walk ran every layer
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    def begin(self, walk: Walk) -> None:
        if walk.first or walk.ranks.world > 1:
            raise ValueError("a validation reference needs a fresh walk in one process")
        runner = walk.runner
        self.dtype, self.device = runner.dtype, runner.device
        runner.embed(self.tokens, self.batch_size, self.stream)
        runner.unload_embedding()

    def stop(self, walk: Walk) -> int | None:
        return walk.runner.num_layers

    def batches(self, walk: Walk, index: int) -> list[int] | None:
        return []  # the walk's own batches are not needed: past the calibration's last layer only the ride runs

    def ride(self, walk: Walk, index: int) -> Ride:
        """The held-out batches through layer ``index`` beside the calibration's (one sweep of streamed experts)."""
        inputs = [functools.partial(self.stream.__getitem__, b) for b in range(len(self.stream))]
        return Ride(inputs, lambda layer: walk.runner.forward(index, layer, self.stream))  # inside the walk's replay

    def after(self, walk: Walk, index: int, layer: torch.nn.Module) -> None:
        if index in walk.moe:
            start = len(self.kept)
            for b in range(len(self.stream)):
                self.kept.append(self.stream[b])
            self._at[index] = range(start, len(self.kept))
        self.complete = index == walk.runner.num_layers - 1

    def states(self, index: int) -> list[torch.Tensor]:
        """The source's hidden states after trunk MoE layer ``index``, one tensor per batch."""
        return [self.kept[p] for p in self._at[index]]

    @property
    def final(self) -> Activations:
        """The source's hidden states after its last decoder layer, one tensor per batch."""
        return self.stream

    def matches(self, tokens: torch.Tensor, batch_size: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a validation of ``tokens`` in batches of ``batch_size``, in ``dtype`` on ``device``, would
        compute exactly these states."""
        return (
            self.complete and batch_size == self.batch_size and dtype == self.dtype and device == self.device
            and tokens.shape == self.tokens.shape and bool(torch.equal(tokens, self.tokens))
        )  # fmt: skip

    def close(self) -> None:
        """Drop the states (and their folder on disk)."""
        self.stream.close()
        self.kept.close()
