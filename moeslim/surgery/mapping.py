"""What the pruned checkpoint contains: each output tensor as byte ranges of source files.

Pure functions of the checkpoint's tensor table, its layout and the plan; nothing is read here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from moeslim.layout import Layout, MoeLayer
from moeslim.shards import DTYPE_BITS, TensorInfo
from moeslim.source import Checkpoint

Piece = tuple[Path, int, int]  # (source file, start byte, end byte)


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of the pruned checkpoint, built by concatenating ``pieces`` of source bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(end - start for _, start, end in self.pieces)


def plan_outputs(
    ckpt: Checkpoint, layout: Layout, kept: dict[int, tuple[int, ...]], patches: dict[str, TensorInfo] | None = None
) -> list[OutputTensor]:
    """Every output tensor in source order: untouched ones whole, router and fused expert tensors sliced
    on dim 0, per-expert tensors of kept experts renamed to their new id (kept ids renumbered 0..N-1).

    ``patches``: source tensor name → its corrected value in a patch file (``patch.py``), as the output holds it
    (a fused tensor already sliced); its bytes are taken from there."""
    patches = patches or {}
    actions: dict[str, OutputTensor | None] = {}
    for layer in layout.layers:
        actions.update(_layer_actions(ckpt.tensors, layer, kept[layer.index], patches))
    out = []
    for name, info in ckpt.tensors.items():
        if name not in actions:
            out.append(OutputTensor(name, info.dtype, info.shape, ((info.file, info.start, info.end),)))
        elif (action := actions[name]) is not None:
            out.append(action)
    return out


def _layer_actions(
    tensors: dict[str, TensorInfo], layer: MoeLayer, kept: tuple[int, ...], patches: dict[str, TensorInfo]
) -> dict[str, OutputTensor | None]:
    actions: dict[str, OutputTensor | None] = {}
    for name in layer.router + layer.fused:
        info, dim = tensors[name], layer.dim_of(name)
        if (patch := patches.get(name)) is not None:
            actions[name] = OutputTensor(name, patch.dtype, patch.shape, ((patch.file, patch.start, patch.end),))
        else:
            actions[name] = slice_rows(info, layer.rows_of(name, kept, info.shape[dim]), dim)
    new_id = {old: new for new, old in enumerate(kept)}
    # tensors past the routed experts keep their place after them: expert E + i becomes len(kept) + i
    new_id.update({old: len(kept) + old - len(layer.per_expert) for old, _ in layer.extra})
    for old, names in [*enumerate(layer.per_expert), *layer.extra]:
        for name in names:
            info = patches.get(name, tensors[name])
            renamed = None
            if old in new_id:
                renamed = rename_expert(name, layer.block, old, new_id[old])
            actions[name] = (
                None
                if renamed is None
                else OutputTensor(renamed, info.dtype, info.shape, ((info.file, info.start, info.end),))
            )
    return actions


def rename_expert(name: str, block: str, old: int, new: int) -> str:
    """``{block}experts.{old}.w1.weight`` → ``{block}experts.{new}.w1.weight``."""
    rel = name[len(block) :]
    head, sep, tail = rel.partition(f".{old}.")
    assert sep and name.startswith(block), f"{name} is not expert {old} of {block}"
    return f"{block}{head}.{new}.{tail}"


def slice_rows(info: TensorInfo, rows: tuple[int, ...], dim: int = 0) -> OutputTensor:
    """Keep ``rows`` (ascending) of ``dim``, as byte ranges; runs of consecutive rows become one range.

    On a dim other than 0 the tensor is read as ``[outer, experts, inner]`` and each outer slice contributes
    its kept rows in turn (``[1, E]`` selection biases, experts stacked inside a wider tensor)."""
    row_bits = DTYPE_BITS[info.dtype] * math.prod(info.shape[dim + 1 :])
    assert row_bits % 8 == 0, f"{info.name}: a row of {info.dtype} {list(info.shape)} is not whole bytes"
    row, count = row_bits // 8, info.shape[dim]
    pieces: list[Piece] = []
    for outer in range(math.prod(info.shape[:dim])):
        for r in rows:
            start = info.start + (outer * count + r) * row
            if pieces and pieces[-1][2] == start:
                pieces[-1] = (info.file, pieces[-1][1], start + row)
            else:
                pieces.append((info.file, start, start + row))
    shape = (*info.shape[:dim], len(rows), *info.shape[dim + 1 :])
    return OutputTensor(info.name, info.dtype, shape, tuple(pieces))


def safetensors_header(tensors: Iterable[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces so the data starts 8-byte aligned."""
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        entries[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw
