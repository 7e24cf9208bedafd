"""Model types the committed family table lacks, or may describe stale, derived at run time.

``families.json`` is derived under one transformers version. A checkpoint of a model type that the table lacks but
the installed transformers defines, or of any derived family when the installed transformers is another version,
has its one type derived here, by the derivation that writes the table (``derive.py``), before any weight is read.
Records are cached per transformers version in the user's cache folder
(``$XDG_CACHE_HOME/moeslim/families-<version>.json``, by default ``~/.cache/moeslim/…``), so a type is derived once.

This module is the one run-time importer of the derivation, and imports it only when a type must be derived: a run
on a committed family under the table's transformers never comes here (``tests/test_layers.py``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from moeslim.errors import UnsupportedModelError
from moeslim.safefs import write_text_atomic

Record = dict[str, Any]  # a family record as in families.json: its layout, or {"refused": why}


@cache
def installed_transformers() -> str | None:
    """The installed transformers version, read from its package metadata (transformers is not imported)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_file(version: str) -> Path:
    """Where records derived under transformers ``version`` are kept (an unset or relative ``XDG_CACHE_HOME`` is
    ignored, as the XDG base directory specification says)."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(root) if os.path.isabs(root) else Path.home() / ".cache"
    return base / "moeslim" / f"families-{version}.json"


def record_of(model_type: str, version: str, rederive: bool = False) -> Record | None:
    """``model_type``'s record under the installed transformers ``version``: cached (unless ``rederive``: the cached
    one did not read), else derived now and cached; None where that transformers defines no MoE model of that type."""
    path = cache_file(version)
    cached = _read(path, version)
    if model_type in cached and not rederive:
        return cached[model_type]
    start = time.monotonic()
    record = _derive(model_type)
    if record is None:
        return None
    if _write(path, version, {**_read(path, version), model_type: record}) and "refused" not in record:  # others kept
        print(f"moeslim: note: derived the layout of model type {model_type!r} from transformers {version} in"
              f" {time.monotonic() - start:.1f} s; cached in {path}", file=sys.stderr)  # fmt: skip
    return record


def _read(path: Path, version: str) -> dict[str, Record]:
    """The cached records; a missing, unreadable or corrupt cache reads as empty (and is rewritten)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("transformers") != version or not isinstance(data.get("families"), dict):
        return {}
    return {t: r for t, r in data["families"].items() if isinstance(r, dict) and r.get("name") == t}


def _write(path: Path, version: str, records: dict[str, Record]) -> bool:
    """Replace the cache with ``records``; False (with a note) where it cannot be written."""
    text = json.dumps({"transformers": version, "families": records}, indent=1, sort_keys=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    except OSError as e:
        print(f"moeslim: note: cannot cache derived families in {path} ({e}); they are derived again next time",
              file=sys.stderr)  # fmt: skip
        return False
    return True


def _derive(model_type: str) -> Record | None:
    """``model_type``'s record derived from the installed transformers, or None where it defines no MoE model of
    that type. What the derivation prints (progress bars, warnings) is kept off the user's terminal."""
    try:
        from moeslim.families.derive import is_moe_type, probe  # the one run-time import of the derivation
    except ImportError as e:
        raise UnsupportedModelError(
            f"model type {model_type!r} must be derived from the installed transformers, which needs torch and"
            f" transformers ({e})"
        ) from e
    if not is_moe_type(model_type):
        return None
    with _quiet():
        return probe(model_type)[0]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' logging and progress bars, Python warnings and output silenced; the torch random state, which
    the tiny models' seeding sets, restored."""
    import warnings

    import torch
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
