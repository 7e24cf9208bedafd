"""The hidden-state store of a layer-by-layer pass: one tensor ``(batch, seq, hidden)`` per calibration batch, on
CPU, kept in memory up to a bound (what the pass's memory plan leaves the hidden states of ``--max-memory``,
``memory.py``) and spilled to disk past it.

Spilled batches go into a temporary folder made on the first spill: beside the output or statistics folder whose
lock the run holds, named as that target's temp folders (``targets.temp_beside``), so that a killed run's (many GB
on a large model) is removed by the next run there, and not left in TMPDIR for good. Without a target (a library
caller) it is made in TMPDIR. ``close()`` removes it; the loop closes its store when the walk ends.
"""

from __future__ import annotations

import errno
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from moeslim.errors import OutputError
from moeslim.targets import temp_beside


@dataclass(frozen=True)
class Spilled:
    """A batch's hidden states on disk: the tensor's raw bytes in ``path``."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    def load(self) -> torch.Tensor:
        data = bytearray(self.path.read_bytes())  # writable: torch shares it rather than warning
        return torch.frombuffer(data, dtype=self.dtype).reshape(self.shape)


class Activations:
    """Hidden states ``(batch, seq, hidden)`` per calibration batch, on CPU; spilled to disk past ``max_bytes``,
    beside ``spill_beside`` (the target whose lock the run holds) or, without it, in TMPDIR."""

    def __init__(self, max_bytes: int | None = None, spill_beside: Path | None = None) -> None:
        self._items: list[torch.Tensor | Spilled] = []
        self._max = max_bytes
        self._beside = spill_beside
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return item.load() if isinstance(item, Spilled) else item

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        self._items[i] = self._place(value.detach().to("cpu"), i)

    def append(self, value: torch.Tensor) -> None:
        self._items.append(value)
        self[len(self._items) - 1] = value

    def resident_bytes(self) -> int:
        return sum(t.nbytes for t in self._items if isinstance(t, torch.Tensor))

    def close(self) -> None:
        """Empty the store and remove its spill folder."""
        self._items.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _place(self, value: torch.Tensor, i: int) -> torch.Tensor | Spilled:
        current = self._items[i]
        in_memory = self.resident_bytes() - (current.nbytes if isinstance(current, torch.Tensor) else 0)
        if self._max is None or in_memory + value.nbytes <= self._max:
            return value
        if self._dir is None:
            self._dir = self._spill_folder()
        spilled = Spilled(Path(self._dir.name) / f"{i}.bin", value.dtype, tuple(value.shape))
        try:
            with open(spilled.path, "wb") as f:  # plain writes: a full disk is an OSError with its errno
                f.write(value.contiguous().view(torch.uint8).numpy().data)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(
                    f"no space left on device for the hidden states spilled past --max-memory into {self._dir.name};"
                    " free space there or raise --max-memory"
                ) from e
            raise
        return spilled

    def _spill_folder(self) -> tempfile.TemporaryDirectory[str]:
        try:
            if self._beside is not None:
                return temp_beside(self._beside)
            return tempfile.TemporaryDirectory(prefix="moeslim-activations-", ignore_cleanup_errors=True)
        except OSError as e:
            where = self._beside.parent if self._beside is not None else Path(tempfile.gettempdir())
            raise OutputError(
                f"cannot make a folder in {where} for the hidden states spilled past --max-memory ({e.strerror});"
                " free space there or raise --max-memory"
            ) from e
