"""Weights packed as MoE releases publish them besides FP8, MXFP4 and compressed-tensors: the arithmetic that turns
them back into dense matrices ``[out, in]``, and which on-disk tensors make one weight (``group``).

- ModelOpt ``NVFP4`` (``quant_method: modelopt``, ``quant_algo: NVFP4``): ``P.weight`` (uint8 ``[out, in/2]``, two
  E2M1 codes a byte, the even column in the low nibble, sign in bit 3), ``P.weight_scale`` (float8 E4M3
  ``[out, in/16]``, one per block of 16 columns), ``P.weight_scale_2`` (float32, one value) and ``P.input_scale``
  (an activation scale, not needed here): ``weight = e2m1(code) * (float(weight_scale) * weight_scale_2)``.
- GPTQ (AutoGPTQ / GPTQModel, ``quant_method: gptq``): ``P.qweight`` (int32 ``[in·bits/32, out]``, packed along the
  input dim, element i of a word at bit ``i·bits``), ``P.qzeros`` (int32 ``[groups, out·bits/32]``, packed along
  the output dim), ``P.scales`` (``[groups, out]``) and ``P.g_idx`` (int32 ``[in]``, each input row's group; absent:
  row // group_size): ``weight[o, i] = (q[i, o] - zero[g, o]) * scale[g, o]`` with ``g = g_idx[i]``; checkpoints in
  the original ``gptq`` format store each zero point less one (``checkpoint_format: gptq_v2`` does not).
- AWQ (AutoAWQ GEMM, ``quant_method: awq``, ``version: gemm``): ``P.qweight`` (int32 ``[in, out/8]``) and ``P.qzeros``
  (int32 ``[in/group, out/8]``), packed along the output dim in the interleaved order ``0 2 4 6 1 3 5 7`` (nibble i
  holds column ``ORDER[i]`` of its eight), and ``P.scales`` (``[in/group, out]``); the same arithmetic, no offset.

The integer formats compute ``(q - zero) * scale`` in float32 and return the scale's dtype, as their reference
kernels (in float16) do: an integer below 256 times a float16 scale rounds once either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from moeslim.errors import CheckpointError
from moeslim.shards import TensorInfo

NVFP4, GPTQ, AWQ = "nvfp4", "gptq", "awq"
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code 0-7; bit 3 is the sign
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a word holds column AWQ_ORDER[i] of its eight
NVFP4_SUFFIXES = (".weight_scale_2", ".weight_scale", ".input_scale", ".weight")
INT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


@dataclass(frozen=True)
class Pack:
    """One packed weight: its dense name and shape ``[out, in]``, the on-disk tensors by role, and every on-disk
    tensor it stands for."""

    name: str
    shape: tuple[int, int]
    method: str
    parts: dict[str, TensorInfo]
    sources: tuple[str, ...]
    bits: int
    group: int  # columns per scale (NVFP4: 16; GPTQ / AWQ: the group size)
    zero_offset: int = 0  # added to stored zero points (1 for GPTQ's original format)


def nvfp4_dense(codes: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, group: int = 16) -> torch.Tensor:
    """A ModelOpt NVFP4 weight ``[rows, 2·bytes]`` from its codes (uint8 ``[rows, bytes]``), block scales (float8
    ``[rows, cols/group]``) and global scale (one float32), in float32."""
    values = _byte_values()[codes.int()].reshape(codes.shape[0], -1)  # each byte: its low, then its high code
    rows, cols = values.shape
    per_block = scale.float() * scale_2.float().reshape(())
    if cols % group == 0 and per_block.shape[1] * group == cols:
        return values.view(rows, -1, group).mul_(per_block.unsqueeze(-1)).view(rows, cols)
    return values.mul_(per_block.repeat_interleave(group, dim=1)[:, :cols])


@cache
def _byte_values() -> torch.Tensor:
    """The two E2M1 values of every byte ``[256, 2]``: low nibble first, bit 3 of each nibble its sign."""
    nibbles = torch.tensor([[b & 0x0F, b >> 4] for b in range(256)])
    return torch.tensor(E2M1)[nibbles & 7] * (1 - 2 * (nibbles >> 3)).float()


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``words`` ``[rows, cols]`` packed along dim 0 (GPTQ ``qweight``) as codes ``[rows·32/bits, cols]``."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (words.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)  # the mask drops the sign's copies
    return codes.reshape(words.shape[0] * per, words.shape[1])


def unpack_columns(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 ``words`` ``[rows, cols]`` packed along dim 1 (GPTQ ``qzeros``; AWQ ``qweight`` and ``qzeros`` with
    ``order``: nibble i holds column ``order[i]`` of its group) as codes ``[rows, cols·32/bits]``."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, cols, per]: by nibble
    if order is not None:
        codes = codes[..., [order.index(c) for c in range(per)]]  # by column
    return codes.reshape(words.shape[0], -1)


def int_dense(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor, zero_offset: int = 0
) -> torch.Tensor:
    """``weight[o, i] = (codes[i, o] - zeros[g, o] - offset) * scales[g, o]``, ``g = groups[i]``, as ``[out, in]`` in
    the scales' dtype (``codes`` ``[in, out]``; ``zeros``, ``scales`` ``[groups, out]``). Groups of consecutive rows
    (no activation order) broadcast; others are gathered row by row."""
    rows, out = codes.shape
    n = zeros.shape[0]
    zeros, scales_f = zeros + zero_offset, scales.float()
    if rows % n == 0 and torch.equal(groups.long(), torch.arange(rows) // (rows // n)):
        grouped = codes.view(n, rows // n, out)
        dense = (grouped - zeros.unsqueeze(1)).float().mul_(scales_f.unsqueeze(1)).view(rows, out)
    else:
        g = groups.long()
        dense = (codes - zeros[g]).float().mul_(scales_f[g])
    return dense.t().to(scales.dtype)


def pack_dense(
    method: str, shape: tuple[int, ...], block: tuple[int, ...], read: dict[str, torch.Tensor], name: str
) -> torch.Tensor:
    """The dense weight ``name`` of ``shape`` packed by ``method`` (``block``: bits, columns per scale, zero offset)
    from its on-disk tensors ``read`` (by role)."""
    bits, group, offset = block
    if method == NVFP4:
        return nvfp4_dense(read["codes"], read["scales"], read["global"], group)
    out, cols = shape
    if method == GPTQ:
        codes = unpack_rows(read["codes"], bits)[:cols]
        zeros = unpack_columns(read["zeros"], bits)[:, :out]
        groups = read["groups"] if "groups" in read else torch.arange(cols) // group
    else:
        codes = unpack_columns(read["codes"], bits, AWQ_ORDER)[:, :out]
        zeros = unpack_columns(read["zeros"], bits, AWQ_ORDER)[:, :out]
        groups = torch.arange(cols) // group
    if groups.shape != (cols,) or int(groups.min()) < 0 or int(groups.max()) >= read["scales"].shape[0]:
        raise CheckpointError(
            f"{name}: g_idx does not name one group of its {read['scales'].shape[0]} scale rows for each of its {cols}"
            " input rows; the checkpoint is corrupt, re-download it"
        )
    return int_dense(codes, zeros, read["scales"], groups, offset)


def nvfp4_group(tensors: dict[str, TensorInfo], name: str, present: set[str], quant: dict) -> Pack | None:
    """The NVFP4 weight that ``name`` belongs to (its codes or a scale), or None for a tensor of no NVFP4 weight."""
    prefix = next((name.removesuffix(s) for s in NVFP4_SUFFIXES if name.endswith(s)), None)
    if prefix is None or prefix + ".weight" not in present or tensors[prefix + ".weight"].dtype != "U8":
        return None
    codes = tensors[prefix + ".weight"]
    missing = [s for s in (".weight_scale", ".weight_scale_2") if prefix + s not in present]
    if missing:
        raise CheckpointError(
            f"{prefix}.weight holds NVFP4 codes but has no {missing[0][1:]} beside it; the checkpoint is incomplete:"
            " re-download it"
        )
    scale, scale_2 = tensors[prefix + ".weight_scale"], tensors[prefix + ".weight_scale_2"]
    group = int(quant.get("group_size") or 16)
    rows, cols = (codes.shape[0], codes.shape[1] * 2) if len(codes.shape) == 2 else (0, 0)
    if not rows or tuple(scale.shape) != (rows, math.ceil(cols / group)) or math.prod(scale_2.shape) != 1:
        raise CheckpointError(
            f"{scale.name} has shape {list(scale.shape)}, not one scale per {group} columns of the {[rows, cols]}"
            f" weight in {codes.name} {list(codes.shape)}; the checkpoint's quantization_config does not match it"
        )
    parts = {"codes": codes, "scales": scale, "global": scale_2}
    sources = tuple(prefix + s for s in NVFP4_SUFFIXES if prefix + s in present)
    return Pack(prefix + ".weight", (rows, cols), NVFP4, parts, sources, 4, group)


def int_group(tensors: dict[str, TensorInfo], name: str, present: set[str], method: str, quant: dict) -> Pack | None:
    """The GPTQ or AWQ weight that ``name`` belongs to, or None for a tensor of no packed weight."""
    prefix = next((name.removesuffix(s) for s in INT_SUFFIXES if name.endswith(s)), None)
    if prefix is None:
        return None
    missing = [s for s in (".qweight", ".qzeros", ".scales") if prefix + s not in present]
    if missing:
        raise CheckpointError(
            f"{prefix} is packed by {method} but has no {missing[0][1:]}; the checkpoint is incomplete: re-download it"
        )
    bits = int(quant.get("bits") or quant.get("w_bit") or 4)
    codes, zeros, scales = (tensors[prefix + s] for s in (".qweight", ".qzeros", ".scales"))
    per = 32 // bits
    if len(codes.shape) != 2 or len(scales.shape) != 2:
        raise CheckpointError(f"{codes.name} {list(codes.shape)} is not a matrix of packed {bits}-bit codes")
    cols, out = (codes.shape[0] * per, codes.shape[1]) if method == GPTQ else (codes.shape[0], codes.shape[1] * per)
    groups = scales.shape[0]
    fits = (
        codes.dtype == zeros.dtype == "I32"
        and scales.shape[1] == out
        and tuple(zeros.shape) == (groups, math.ceil(out / per))
        and groups > 0
        and cols % groups == 0
    )
    if not fits:
        raise CheckpointError(
            f"{prefix}: qweight {list(codes.shape)}, qzeros {list(zeros.shape)} and scales {list(scales.shape)} do not"
            f" make one {bits}-bit {method} weight; the checkpoint's quantization_config does not match it"
        )
    parts = {"codes": codes, "zeros": zeros, "scales": scales}
    if method == GPTQ and prefix + ".g_idx" in present:
        parts["groups"] = tensors[prefix + ".g_idx"]
    offset = 1 if method == GPTQ and str(quant.get("checkpoint_format") or "gptq") == "gptq" else 0
    sources = tuple(prefix + s for s in INT_SUFFIXES if prefix + s in present)
    return Pack(prefix + ".weight", (out, cols), method, parts, sources, bits, cols // groups, offset)
