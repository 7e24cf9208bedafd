"""Safetensors files read as raw bytes: headers parsed and checked, no tensor library involved.

A tensor is described by where its bytes lie in its file; surgery copies byte ranges, so quantised
tensors (FP8, MXFP4, GPTQ) travel bit-exact without ever being decoded.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from moeslim.errors import CheckpointError

# Bits per element of every dtype safetensors writes. Sub-byte types pack several elements per byte.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype, shape and absolute byte range ``[start, end)`` in ``file``."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``dtype`` and ``shape`` occupies; sub-byte dtypes must fill whole bytes."""
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    if bits % 8:
        raise ValueError(f"{dtype} tensor of shape {list(shape)} does not fill whole bytes")
    return bits // 8


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of one safetensors file; return its tensors (in file order) and metadata.

    Every check that would otherwise surface later as a wrong slice or a crash is made here: header length
    within the file, valid JSON, known dtypes, byte ranges inside the data area and matching dtype × shape.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path} is truncated: too short to hold a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header (declares {header_len} header bytes, file has {size});"
                " re-download the file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); re-download the file") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object); re-download it")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry, data_start, size) for name, entry in header.items()}
    ordered = dict(sorted(tensors.items(), key=lambda kv: kv[1].start))
    return ordered, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name} {why}; the file is corrupt, re-download it")

    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BITS:
        raise bad("has no known dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad("has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise bad("has invalid data offsets")
    begin, end = offsets
    if not 0 <= begin <= end or data_start + end > size:
        raise bad(f"lies outside the file (bytes {begin}..{end} of a {size - data_start}-byte data area)")
    try:
        expected = tensor_nbytes(entry["dtype"], tuple(shape))
    except ValueError as e:
        raise bad(str(e)) from e
    if end - begin != expected:
        raise bad(f"has {end - begin} bytes but {entry['dtype']} {shape} needs {expected}")
    return TensorInfo(name, path, entry["dtype"], tuple(shape), data_start + begin, data_start + end)
