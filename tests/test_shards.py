"""Raw safetensors headers: parsed the way safetensors writes them, corruption caught with one clear error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moeslim.errors import CheckpointError
from moeslim.shards import read_header, tensor_nbytes
from moeslim.surgery.mapping import OutputTensor
from moeslim.surgery.writer import write_shard


def test_header_locates_every_tensor_byte_exact(tmp_path: Path) -> None:
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.arange(5, dtype=np.int64)}
    save_file(arrays, tmp_path / "x.safetensors", metadata={"format": "pt"})
    tensors, metadata = read_header(tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert metadata == {"format": "pt"}
    assert tensors["a"].dtype == "F32" and tensors["a"].shape == (4, 3) and tensors["a"].nbytes == 48
    for name, array in arrays.items():
        assert raw[tensors[name].start : tensors[name].end] == array.tobytes()


def test_written_shard_reads_back_in_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    array = np.arange(20, dtype=np.float32).reshape(5, 4)
    save_file({"w": array}, src)
    info = read_header(src)[0]["w"]
    row = 16  # 4 float32 per row
    rows = OutputTensor(
        "w", "F32", (2, 4), ((src, info.start + row, info.start + 2 * row), (src, info.start + 4 * row, info.end))
    )
    write_shard(tmp_path / "out.safetensors", [rows], {"format": "pt"}, lambda n: None)
    np.testing.assert_array_equal(load_file(tmp_path / "out.safetensors")["w"], array[[1, 4]])
    assert (tmp_path / "out.safetensors").read_bytes()[8:].index(b"[") >= 0
    header_len = struct.unpack("<Q", (tmp_path / "out.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0  # data area 8-byte aligned, as safetensors writes it


def _file(tmp_path: Path, header: bytes, declared: int | None = None, data: bytes = b"") -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + data)
    return path


@pytest.mark.parametrize(
    ("header", "declared", "data", "why"),
    [
        (b"", None, b"", "too short"),  # only 8 bytes: header length 0, not JSON
        (b"{}", 10**12, b"", "declares"),  # header longer than the file
        (b"{not json", None, b"", "corrupt"),
        (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(), None, b"1234", "outside"),
        (
            json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(),
            None,
            b"12345678",
            "needs 12",
        ),
        (json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode(), None, b"1", "dtype"),
    ],
)
def test_corrupt_headers_are_refused(
    tmp_path: Path, header: bytes, declared: int | None, data: bytes, why: str
) -> None:
    path = _file(tmp_path, header, declared, data)
    if why == "too short":
        path.write_bytes(b"\x01\x02")
        why = "truncated"
    with pytest.raises(CheckpointError, match=why):
        read_header(path)


def test_sub_byte_dtypes_count_bits() -> None:
    assert tensor_nbytes("F4", (3, 4)) == 6  # 12 values × 4 bits = 48 bits
    assert tensor_nbytes("BF16", (3, 4)) == 24
    with pytest.raises(ValueError):
        tensor_nbytes("F4", (3,))  # 12 bits is not whole bytes
