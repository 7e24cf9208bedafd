"""Floating-point tensors read from a safetensors shard's bytes as numpy float32, exactly, without torch.

numpy has no bfloat16 or FP8: bfloat16 is the upper half of a float32, and every FP8 byte has one exact float32
value, so both decode without rounding (as torch's ``.float()`` does). Float64 rounds to nearest, like torch.
"""

from __future__ import annotations

import math

import numpy as np

from moeslim.shards import TensorInfo, tensor_nbytes


def _fp8_table(exp_bits: int, man_bits: int, *, finite_only: bool) -> np.ndarray:
    """The float32 value of each of the 256 bytes of an FP8 format (IEEE-like; ``finite_only``: OCP E4M3FN, whose
    only special value is NaN at all exponent and mantissa bits set)."""
    bias = (1 << (exp_bits - 1)) - 1
    values = []
    for byte in range(256):
        sign = -1.0 if byte >> 7 else 1.0
        exp, man = (byte >> man_bits) & ((1 << exp_bits) - 1), byte & ((1 << man_bits) - 1)
        top = exp == (1 << exp_bits) - 1
        if top and (man == (1 << man_bits) - 1 if finite_only else True):
            values.append(math.copysign(math.nan if finite_only or man else math.inf, sign))
        elif exp == 0:
            values.append(sign * math.ldexp(man, 1 - bias - man_bits))  # subnormal
        else:
            values.append(sign * math.ldexp((1 << man_bits) + man, exp - bias - man_bits))
    return np.array(values, dtype=np.float32)


FP8 = {
    "F8_E4M3": _fp8_table(4, 3, finite_only=True),
    "F8_E5M2": _fp8_table(5, 2, finite_only=False),
}
NATIVE = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def decode(raw: bytes, dtype: str) -> np.ndarray:
    """Little-endian safetensors bytes of a float ``dtype`` → flat float32 array."""
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype in FP8:
        return FP8[dtype][np.frombuffer(raw, np.uint8)]
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes ±inf, as in torch
        return np.frombuffer(raw, NATIVE[dtype]).astype(np.float32)


def read_float(info: TensorInfo, row: int | None = None) -> np.ndarray:
    """The whole tensor, or its ``row`` along dim 0, as float32 of the tensor's shape (without dim 0 for a row)."""
    if row is None:
        return read_rows(info, 0, info.shape[0] if info.shape else 1).reshape(info.shape)
    if not 0 <= row < (info.shape[0] if info.shape else 0):
        raise IndexError(f"row {row} of {info.name}, which has {info.shape[0] if info.shape else 0}")
    return read_rows(info, row, row + 1)[0]


def read_rows(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` along dim 0 as float32 ``(stop - start, *shape[1:])`` (a scalar is one row)."""
    size = tensor_nbytes(info.dtype, info.shape[1:])  # bytes of one row
    with open(info.file, "rb") as f:
        f.seek(info.start + start * size)
        raw = f.read((stop - start) * size)
    if len(raw) != (stop - start) * size:
        raise OSError(f"{info.file} ended inside tensor {info.name}")
    return decode(raw, info.dtype).reshape(stop - start, *info.shape[1:])
