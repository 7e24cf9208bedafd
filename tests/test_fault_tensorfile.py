"""``tensorfile.save_tensors`` (moeslim's own safetensors writer, for patches and resume boundaries) writes the
very bytes safetensors' ``save_file`` writes, for every dtype and order of names; so a plan's recorded sha256 of
its correction's patches is what it was when safetensors wrote them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeslim.tensorfile import save_tensors

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int16, torch.float16,
          torch.bfloat16, torch.int32, torch.float32, torch.float64, torch.int64]  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_the_bytes_are_safetensors_own(seed: int, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(DTYPES), generator=gen).tolist()
    tensors = {}
    for i, k in enumerate(order):  # names in another order than dtypes; shapes of every rank, one empty
        shape = [(i % 3) + 1] * (i % 4) if i != 5 else [0, 3]
        tensors[f"layer.{(7 * i) % 5}.t{i}"] = (torch.randn(shape, generator=gen) * 4).to(DTYPES[k])
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    save_tensors(tmp_path / "ours.safetensors", tensors)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    back = load_file(tmp_path / "ours.safetensors")
    assert all(
        torch.equal(back[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)) for n, t in tensors.items()
    )
