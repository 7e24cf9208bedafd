"""Strict JSON in and out: every file moeslim writes parses with any JSON reader (no bare ``NaN``/``Infinity``).

Non-finite floats are written as ``null``: a value that was not measured or could not be computed, which readers
of moeslim's files treat as missing, never as a number. Reading rejects the ``NaN``/``Infinity`` tokens that
Python's ``json`` would otherwise accept.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeGuard


def dumps(obj: Any, *, indent: int | None = 2, **kwargs: Any) -> str:
    """``obj`` as strict JSON text; non-finite floats (also numpy's) become ``null``."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False, **kwargs)


def loads(text: str | bytes) -> Any:
    """Parse strict JSON; ``NaN``, ``Infinity`` and ``-Infinity`` raise ``ValueError``."""
    return json.loads(text, parse_constant=_reject)


def is_whole(value: object) -> TypeGuard[int]:
    """A JSON whole number: not a bool (Python's ``True == 1``), not a float such as ``3.0``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """A finite JSON number (int or float, not a bool): what a measured value or a score must be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def finite(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, scalars) with non-finite floats replaced by ``None``."""
    if isinstance(obj, float | int) and not isinstance(obj, bool):
        return obj if isinstance(obj, int) or math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():  # numpy/torch scalar
        return finite(obj.item())
    return obj


def _reject(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")
