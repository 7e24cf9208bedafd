"""Corrected tensors for surgery: the kept experts' down projections, rewritten in the checkpoint's own tensors.

The correction (``correct/fit.py``) is fitted on the loaded model's parameter; here it is carried back to the
tensors on disk that load into that parameter (one per expert, or one fused tensor per layer), in their dtype and
orientation. A patch file holds each rewritten tensor as the output will hold it (a fused tensor already sliced to the
kept experts), and ``plan_outputs`` takes its bytes from there instead of the source.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from moeslim.layout import MoeLayer
from moeslim.shards import TensorInfo, read_header
from moeslim.tensorfile import save_tensors

FLOATS = {"F32", "BF16", "F16"}


class PatchError(Exception):
    """The down projections cannot be rewritten in this checkpoint (the message says why)."""


def layer_patch(
    tensors: dict[str, TensorInfo], layer: MoeLayer, kept: tuple[int, ...], deltas: dict[int, torch.Tensor],
    loaded: dict[str, str], target: str, transposed: bool,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Disk tensor name → its corrected value as the output holds it. ``loaded``: disk name → the parameter it
    loads into; ``target``: the down-projection parameter; ``deltas``: kept expert → ``ΔW`` ``(out, inner)``;
    ``transposed``: the parameter's slices are ``(inner, out)``."""
    out: dict[str, torch.Tensor] = {}
    for name in layer.fused:
        if loaded.get(name) != target:
            continue
        info = tensors[name]
        rows = layer.rows_of(name, kept, info.shape[layer.dim_of(name)])
        if layer.dim_of(name) != 0 or tuple(rows) != tuple(kept):
            raise PatchError(f"{name} does not hold one slice per expert on its first dim")
        value = _read(info)[list(kept)].float()
        for pos, k in enumerate(kept):
            if k in deltas:
                value[pos] += _oriented(deltas[k], tuple(value.shape[1:]), transposed, name)
        out[name] = value.to(_read_dtype(info))
    for k in kept:
        if k not in deltas or not layer.per_expert:
            continue
        for name in layer.per_expert[k]:
            if loaded.get(name) != target:
                continue
            info = tensors[name]
            value = _read(info).float()
            value += _oriented(deltas[k], tuple(value.shape), transposed, name)
            out[name] = value.to(_read_dtype(info))
    if deltas and not out:
        raise PatchError(f"no tensor of layer {layer.index} loads into {target}")
    return out


def save_patch(values: dict[str, torch.Tensor], path: Path) -> dict[str, TensorInfo]:
    """Write ``values`` as one safetensors file; their byte ranges in it, for ``plan_outputs``."""
    save_tensors(path, values)  # in one step: a failed write is an OSError naming the file
    return read_header(path)[0]


def _read(info: TensorInfo) -> torch.Tensor:
    if info.dtype not in FLOATS:
        raise PatchError(f"{info.name} is stored as {info.dtype}; only float tensors can be corrected")
    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(info.name)


def _read_dtype(info: TensorInfo) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[info.dtype]


def _oriented(delta: torch.Tensor, shape: tuple[int, ...], transposed: bool, name: str) -> torch.Tensor:
    """``delta`` ``(out, inner)`` laid out as a slice of ``shape``: as the parameter's slices are, when square."""
    if len(shape) != 2:
        raise PatchError(f"{name}: an expert's slice has shape {list(shape)}, not a matrix")
    same, flipped = shape == tuple(delta.shape), shape == tuple(delta.T.shape)
    if same and (not flipped or not transposed):
        return delta
    if flipped:
        return delta.T
    raise PatchError(f"{name}: an expert's slice has shape {list(shape)}, not that of its down projection")
