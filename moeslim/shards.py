"""Safetensors files read as raw bytes: headers parsed and checked, no tensor library involved.

A tensor is described by where its bytes lie in its file; surgery copies byte ranges, so quantised
tensors (FP8, MXFP4, GPTQ) travel bit-exact without ever being decoded.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from moeslim import jsonio
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

    Every check that would otherwise surface later as a wrong slice or a crash is made here, by the rules
    safetensors itself applies: header length within the file, valid JSON, known dtypes, dtype × shape matching
    each byte range, and the ranges tiling the data area from 0 to its end without gap or overlap.
    """
    size = path.stat().st_size
    header, data_start = _read_json_header(path, size)
    metadata = _metadata(path, header.pop("__metadata__", None))
    tensors = {name: _tensor_info(path, name, entry, data_start, size) for name, entry in header.items()}
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)))
    _check_contiguous(path, list(ordered.values()), data_start, size)
    return ordered, metadata


def _read_json_header(path: Path, size: int) -> tuple[dict, int]:
    """The header's JSON object and where the data area starts."""
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
        header = jsonio.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8, bad JSON, NaN/Infinity
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); re-download the file") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object); re-download it")
    return header, 8 + header_len


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path} has a corrupt safetensors header (__metadata__ must map names to strings); re-download it"
        )
    return metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name} {why}; the file is corrupt, re-download it")

    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPE_BITS:
        raise bad("has no known dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad("has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad("has invalid data offsets")
    begin, end = offsets
    if not begin <= end or data_start + end > size:
        raise bad(f"lies outside the file (bytes {begin}..{end} of a {size - data_start}-byte data area)")
    try:
        expected = tensor_nbytes(entry["dtype"], tuple(shape))
    except ValueError as e:
        raise bad(str(e)) from e
    if end - begin != expected:
        raise bad(f"has {end - begin} bytes but {entry['dtype']} {shape} needs {expected}")
    return TensorInfo(name, path, entry["dtype"], tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    """A JSON whole number ≥ 0."""
    return jsonio.is_whole(value) and value >= 0


def _check_contiguous(path: Path, tensors: list[TensorInfo], data_start: int, size: int) -> None:
    """Sorted by offset, the tensors must tile the data area exactly, as safetensors requires: no gap, no
    overlap, nothing after the last one. A file safetensors refuses must not yield an output that looks fine."""
    at, before = data_start, None
    for t in tensors:
        if t.start < at:
            where = f"it starts at byte {t.start - data_start}, {before} ends at {at - data_start}"
            raise _layout_error(path, f"tensor {t.name} overlaps {before} ({where})")
        if t.start > at:
            after = f"after {before}" if before else "at the start of the data area"
            raise _layout_error(path, f"tensor {t.name} leaves a gap of {t.start - at} bytes {after}")
        at, before = t.end, t.name
    if at != size:
        raise _layout_error(path, f"{size - at} bytes follow the last tensor{f' {before}' if before else ''}")


def _layout_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}, which safetensors refuses; the file is corrupt, re-download it")
