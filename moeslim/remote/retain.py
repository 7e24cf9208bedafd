"""Calibration that downloads each source byte once: as each layer is calibrated, its bytes that surgery will
copy are retained on disk (``Store.retain``) instead of leaving with the window, until surgery reads them."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from moeslim.layout import Layout
from moeslim.remote.store import Store
from moeslim.source import Checkpoint
from moeslim.stream.loop import Observer, Walk
from moeslim.surgery.mapping import plan_outputs

_LAYER_KEY = re.compile(r"^(.*?\.)([0-9]+)\.")  # "model.layers.3.mlp..." → ("model.layers.", "3")


class Retain(Observer):
    """After each calibrated layer, retain the source bytes of its output tensors for the experts ``choose``
    picks from its statistics (None: nothing retained); the tensors outside the layers once the stream begins.
    A later choice that differs only costs a download, never a wrong byte (fetch fills what is missing)."""

    def __init__(self, ckpt: Checkpoint, layout: Layout, keep: int, choose: Callable[[int], tuple[int, ...] | None]):
        assert isinstance(ckpt.fetcher, Store)
        self.ckpt, self.layout, self.store, self.choose = ckpt, layout, ckpt.fetcher, choose
        self.guess = {i: tuple(range(keep)) for i in layout.moe_indices}

    def begin(self, walk: Walk) -> None:
        self._retain(None, self.guess)

    def after(self, walk: Walk, index: int, layer: torch.nn.Module) -> None:
        chosen = self.choose(index) if index in self.guess else self.guess.get(index, ())
        if chosen is not None:
            self._retain(index, {**self.guess, index: chosen} if index in self.guess else self.guess)

    def _retain(self, index: int | None, kept: dict[int, tuple[int, ...]]) -> None:
        """Retain the pieces of the output tensors of decoder layer ``index`` (None: outside the layers)."""
        pieces = [p for t in plan_outputs(self.ckpt, self.layout, kept) if _layer_of(t.name) == index for p in t.pieces]
        self.store.retain(pieces)


def _layer_of(name: str) -> int | None:
    m = _LAYER_KEY.match(name)
    return int(m[2]) if m else None
