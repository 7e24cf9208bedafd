"""Float tensors decoded from safetensors bytes without torch: every value exactly as torch's ``.float()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moeslim.floats import decode, read_float, read_rows
from moeslim.shards import read_header

EVERY_16_BITS = torch.arange(65536, dtype=torch.int32).to(torch.int16)
EVERY_BYTE = torch.arange(256, dtype=torch.uint8)
CASES = {
    "BF16": EVERY_16_BITS.view(torch.bfloat16),
    "F16": EVERY_16_BITS.view(torch.float16),
    "F8_E4M3": EVERY_BYTE.view(torch.float8_e4m3fn),
    "F8_E5M2": EVERY_BYTE.view(torch.float8_e5m2),
    "F64": torch.tensor([1 / 3, 1e300, -1e-300, 2.0**-149 * 1.5, float("inf")], dtype=torch.float64),
}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 values, NaNs included (with their sign)."""
    return np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b))


@pytest.mark.parametrize("dtype", CASES)
def test_decode_gives_every_value_as_torch_does(dtype: str) -> None:
    tensor = CASES[dtype]
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    assert same_bits(decode(raw, dtype), tensor.float().numpy())


def test_read_float_reads_a_row_from_the_file(tmp_path) -> None:
    weight = torch.randn(4, 3, 5).to(torch.bfloat16)
    save_file({"a": torch.zeros(7), "w": weight}, tmp_path / "x.safetensors")
    info = read_header(tmp_path / "x.safetensors")[0]["w"]
    assert same_bits(read_float(info), weight.float().numpy())
    assert same_bits(read_float(info, 2), weight[2].float().numpy())
    with pytest.raises(IndexError):
        read_float(info, 4)
    assert same_bits(read_rows(info, 1, 3), weight[1:3].float().numpy())  # a flattened expert's block of rows
