"""Byte-span arithmetic of the in-place Hub reader (moeslim/remote/spans.py) against the plain model it stands for:
a set of byte offsets. Every case is generated (seeded), so the edges (touching, nested, empty, one byte) come up
without being listed; and hole punching is checked on a real sparse file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from moeslim.remote.spans import blocks_bytes, merge, missing, punch

CASES = 500


def _spans(rng: random.Random, size: int = 64) -> list[tuple[int, int]]:
    out = []
    for _ in range(rng.randrange(0, 6)):
        start = rng.randrange(0, size)
        out.append((start, start + rng.randrange(0, 12)))  # empty spans included
    return out


def _bytes(spans: list[tuple[int, int]]) -> set[int]:
    return {b for s, e in spans for b in range(s, e)}


@pytest.mark.parametrize("seed", range(4))
def test_merge_and_missing_agree_with_sets_of_bytes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(CASES):
        spans = _spans(rng)
        merged = merge(spans)
        assert _bytes(merged) == _bytes(spans)
        assert all(e > s for s, e in merged) and all(a[1] < b[0] for a, b in zip(merged, merged[1:], strict=False))
        start = rng.randrange(0, 64)
        end = start + rng.randrange(0, 20)
        gaps = missing(merged, start, end)
        assert _bytes(gaps) == set(range(start, end)) - _bytes(merged)
        assert gaps == merge(gaps)  # sorted, disjoint, none empty


@pytest.mark.parametrize("block", [1, 4, 16])
def test_blocks_bytes_counts_each_touched_block_once(block: int) -> None:
    rng = random.Random(block)
    for _ in range(CASES):
        merged = merge(_spans(rng))
        touched = {b // block for b in _bytes(merged)}
        assert blocks_bytes(merged, block) == len(touched) * block


def test_blocks_bytes_by_hand() -> None:
    assert blocks_bytes([(0, 1)], 4096) == 4096  # one byte takes a block
    assert blocks_bytes([(4095, 4097)], 4096) == 8192  # two bytes across a boundary take two
    assert blocks_bytes([(10, 20), (30, 40)], 4096) == 4096  # two ranges in one block share it


def test_punch_frees_blocks_and_keeps_size_and_neighbours(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    block = os.statvfs(tmp_path).f_bsize
    data = os.urandom(8 * block)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        punch(fd, 2 * block, 5 * block)  # three whole blocks
        os.fsync(fd)
        after = os.fstat(fd).st_blocks
    finally:
        os.close(fd)
    assert (before - after) * 512 == 3 * block
    got = path.read_bytes()
    assert len(got) == len(data) and got[: 2 * block] == data[: 2 * block] and got[5 * block :] == data[5 * block :]
    assert got[2 * block : 5 * block] == bytes(3 * block)  # a hole reads as zeros: which is why presence is tracked
