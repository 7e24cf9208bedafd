"""Shard planning by size, with plain objects standing in for tensors."""

from __future__ import annotations

from pathlib import Path

from moeslim.surgery.mapping import OutputTensor
from moeslim.surgery.writer import plan_shards


def fake(name: str, size: int) -> OutputTensor:
    return OutputTensor(name, "U8", (size,), ((Path("x"), 0, size),))


def test_shards_fill_in_order_up_to_the_limit() -> None:
    tensors = [fake(n, s) for n, s in zip("abcdef", [6, 6, 2, 6, 2, 2], strict=True)]
    shards = plan_shards(tensors, 10)
    # in order: [a] then b+c (8) then d+e+f (10): a new shard starts when the next tensor would exceed 10
    assert {f: [t.name for t in ts] for f, ts in shards.items()} == {
        "model-00001-of-00003.safetensors": ["a"],
        "model-00002-of-00003.safetensors": ["b", "c"],
        "model-00003-of-00003.safetensors": ["d", "e", "f"],
    }


def test_one_shard_is_the_single_file_name() -> None:
    assert list(plan_shards([fake("a", 3)], "5GB")) == ["model.safetensors"]


def test_sizes_parse_as_the_hub_writes_them() -> None:
    import pytest

    from moeslim.units import parse_size

    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 kb") == 1500
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError):
        parse_size("lots")
