"""Sizes as users write them: ``5GB``, ``500MB``, ``2GiB``, or a plain number of bytes."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """``"5GB"`` → 5_000_000_000 (decimal units as on the Hub; ``GiB`` for binary), at least one byte.

    Raises ValueError for anything else, a size under one byte (``0``, ``0.1B``) included.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    size = int(Fraction(m.group(1)) * _UNITS[m.group(2).upper()])  # exact: no float overflow or rounding
    if size < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def human_bytes(n: float) -> str:
    """1536 → '1.5 KB' (decimal units, as the Hub shows sizes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
