"""Loaded weights must be finite: one ``inf`` or ``nan`` in a checkpoint is reported when its layer is loaded,
naming the layer, the expert and the on-disk tensor, instead of turning up later as a NaN statistic or KL.

The check after each load is cheap (a sum over each of the module's tensors, a chunk at a time: several GB/s).
Only when it fails are the on-disk tensors of what was loaded read again, one at a time, to name the culprit
exactly: the in-memory parameter may be a fused one (``experts.gate_up_proj`` ``[E, 2I, H]``) built from many
on-disk tensors. Finite on disk but not in memory means the conversion to the compute dtype overflowed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch

from moeslim.errors import CheckpointError, DeviceError
from moeslim.layout import MoeLayer
from moeslim.source import Checkpoint
from moeslim.stream.dequant import read

CHUNK = 2**24  # elements tested at a time: bounds the temporaries of the exact test
FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def check_finite(
    module: torch.nn.Module, ckpt: Checkpoint, names: Iterable[str], *, prefix: str = "", index: int | None = None,
    moe: MoeLayer | None = None,
) -> None:  # fmt: skip
    """Raise when a floating-point tensor of ``module`` (named ``prefix…`` in the model), just loaded from the
    on-disk tensors ``names`` (decoder layer ``index``, whose routed experts are ``moe``), holds ``inf`` or ``nan``.

    ``CheckpointError`` names the on-disk tensor and expert when the checkpoint holds the values; ``DeviceError``
    names the parameter when they appeared in the conversion to the compute dtype.
    """
    bad = next(((prefix + name, t) for name, t in _floating(module) if nonfinite(t)), None)
    if bad is None:
        return
    where = "" if index is None else f"layer {index}"
    found = [(name, kind, _experts(ckpt, name, moe)) for name in sorted(names) if (kind := _on_disk(ckpt, name))]
    if not found:
        raise DeviceError(
            f"{_label(where)}{bad[0]} is finite in the checkpoint but not once converted to"
            f" {str(bad[1].dtype).removeprefix('torch.')}"
            " (its values exceed that dtype's range); use --dtype float32"
        )
    raise CheckpointError(_corrupt(where, found))


def nonfinite(tensor: torch.Tensor) -> str | None:
    """``"inf"``, ``"nan"`` or ``"inf and nan"`` when ``tensor`` holds such values, else None."""
    chunks = tensor.detach().reshape(-1).split(CHUNK)
    if all(bool(torch.isfinite(c.sum())) for c in chunks):  # inf and nan carry through a sum: 4-8× faster than
        return None  # isfinite; a sum of finite values that overflows only takes the exact path below
    kinds = [k for k, test in (("inf", torch.isinf), ("nan", torch.isnan)) if any(bool(test(c).any()) for c in chunks)]
    return " and ".join(kinds) or None


def bad_rows(tensor: torch.Tensor) -> list[int]:
    """Indices along dim 0 whose slice holds a non-finite value."""
    return [j for j in range(tensor.shape[0]) if nonfinite(tensor[j])]


def _floating(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The loaded floating-point parameters and buffers of ``module`` (meta tensors are not loaded)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not tensor.is_meta:
            yield name, tensor


def _on_disk(ckpt: Checkpoint, name: str) -> str | None:
    """What is non-finite in the on-disk tensor ``name`` (read with ``pread``, not kept), or None."""
    info = ckpt.tensors[name]
    if info.dtype not in FLOATS:
        return None
    fd = os.open(info.file, os.O_RDONLY)
    try:
        return nonfinite(_widened(read(fd, info)))
    finally:
        os.close(fd)


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """FP8 values as float32 (torch does not sum float8); wider types as they are."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


def _experts(ckpt: Checkpoint, name: str, moe: MoeLayer | None) -> list[int]:
    """The experts the on-disk tensor ``name`` belongs to: its own for a per-expert tensor, the non-finite rows
    of a fused expert or router tensor (one row per expert), none for the rest."""
    if moe is None:
        return []
    for j, names in enumerate(moe.per_expert):
        if name in names:
            return [j]
    if name in moe.fused or name in moe.router:
        fd = os.open(ckpt.tensors[name].file, os.O_RDONLY)
        try:
            return bad_rows(_widened(read(fd, ckpt.tensors[name])))
        finally:
            os.close(fd)
    return []


def _corrupt(where: str, found: list[tuple[str, str, list[int]]]) -> str:
    """``layer 2, expert 5: non-finite values (inf) in model.layers.2...; the checkpoint is corrupt: ...``:
    ``found`` lists (on-disk name, what is non-finite, experts) of each non-finite tensor; an expert's is named."""
    experts = sorted({j for _, _, js in found for j in js})
    name, kind, _ = next((f for f in found if f[2]), found[0])
    label = _label(where, f"expert{'s' if len(experts) > 1 else ''} {', '.join(map(str, experts))}" if experts else "")
    more = f" (and {len(found) - 1} more tensor{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
    fix = "re-download it"
    if experts:
        fix += f", or drop {'that expert' if len(experts) == 1 else 'those experts'} with a --plan and --no-validate"
    return f"{label}non-finite values ({kind}) in {name}{more}; the checkpoint is corrupt: {fix}"


def _label(*parts: str) -> str:
    """``"layer 2, expert 5: "`` from the parts given (empty ones left out)."""
    text = ", ".join(part for part in parts if part)
    return f"{text}: " if text else ""
