"""Byte spans of a file as sorted, disjoint ``[start, end)`` pairs, and holes punched back into sparse files.

Which bytes of a sparse file hold downloaded data is tracked here, never guessed from zeros: a hole reads as
zeros, and so do many real weights.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable

Span = tuple[int, int]

_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (linux/falloc.h)


def merge(spans: Iterable[Span], gap: int = 0) -> list[Span]:
    """``spans`` sorted and joined where they overlap, touch, or lie at most ``gap`` bytes apart."""
    out: list[Span] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def missing(have: list[Span], start: int, end: int) -> list[Span]:
    """The parts of ``[start, end)`` that the sorted, disjoint ``have`` does not cover."""
    gaps, at = [], start
    for s, e in have:
        if e <= at:
            continue
        if s >= end:
            break
        if s > at:
            gaps.append((at, s))
        at = max(at, e)
    if at < end:
        gaps.append((at, end))
    return gaps


def total(spans: Iterable[Span]) -> int:
    return sum(e - s for s, e in spans)


def blocks_bytes(spans: Iterable[Span], block: int) -> int:
    """Bytes of the whole ``block``-sized disk blocks that the sorted, disjoint ``spans`` touch: what they take on
    disk in a sparse file."""
    count, last = 0, -1
    for start, end in spans:
        first, final = max(start // block, last + 1), (end - 1) // block
        if final >= first:
            count += final - first + 1
        last = max(last, final)
    return count * block


def punch(fd: int, start: int, end: int) -> None:
    """Give the disk blocks of ``[start, end)`` back, keeping the file's size (Linux ``fallocate``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, _PUNCH, start, end - start) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot free downloaded bytes ({os.strerror(code)})")


def can_punch(fd: int, size: int) -> bool:
    """Whether this file system frees blocks on request (ext4, xfs, btrfs, tmpfs do; some network ones do not)."""
    try:
        punch(fd, 0, min(size, 4096))
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise
    return True
