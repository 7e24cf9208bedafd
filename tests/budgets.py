"""``--max-memory`` values computed from a fixture, for tests that need its hidden states to spill: the plan's own
least budget for whole layers (``memory.needs``), so the bound follows the plan rather than a guessed size."""

from __future__ import annotations

from pathlib import Path

from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.context import RunContext
from moeslim.stream.memory import BASE_BYTES, layer_split, needs
from moeslim.stream.options import CalibrationOptions


def spilling(src: Path, opts: CalibrationOptions, kept: int) -> str:
    """A ``--max-memory`` under which a pass of ``opts`` over ``src`` runs whole layers and keeps only ``kept``
    bytes of hidden states in RAM, spilling the rest."""
    return _bound(src, opts, None, kept)


def chunking(src: Path, opts: CalibrationOptions, chunk: int, kept: int) -> str:
    """A ``--max-memory`` under which a pass of ``opts`` over ``src`` reads ``chunk`` routed experts at a time and
    keeps ``kept`` bytes of hidden states in RAM (``kept`` under one expert's bytes, so the chunk is not larger)."""
    return _bound(src, opts, chunk, kept)


def _bound(src: Path, opts: CalibrationOptions, chunk: int | None, kept: int) -> str:
    ckpt = open_checkpoint(src)
    ctx = RunContext(ckpt, resolve_layout(ckpt), opts)
    split = layer_split(ckpt, ctx.layout, ctx.dtype.itemsize)
    return f"{BASE_BYTES + needs(split, ctx.states(), chunk) + kept}B"
