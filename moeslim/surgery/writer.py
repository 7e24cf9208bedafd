"""Streaming writer: output shards planned by size, each written as header then copied byte ranges.

Memory stays flat: bytes move file to file through ``os.copy_file_range`` (in-kernel) or a fixed buffer.
Reads are announced to the kernel a window ahead (``POSIX_FADV_WILLNEED``): a pruned checkpoint reads the
source with gaps (the dropped experts), which defeats ordinary readahead; announced, the kept ranges are read
in large requests while earlier ones are written, and slim runs as fast as a plain copy (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub.serialization import split_state_dict_into_shards_factory

from moeslim.names import INDEX_NAME
from moeslim.surgery.mapping import OutputTensor, Piece, safetensors_header

if TYPE_CHECKING:
    from moeslim.surgery.finished import Finished

CHUNK = 64 * 2**20  # bytes per copy call; bounds memory on the read/write fallback
READ_AHEAD = 256 * 2**20  # bytes of source announced to the kernel ahead of the copy (page cache, not RSS)


def plan_shards(tensors: list[OutputTensor], max_shard_size: int | str) -> dict[str, list[OutputTensor]]:
    """Shard file name → tensors, in order, each shard filled up to ``max_shard_size`` bytes."""
    split = split_state_dict_into_shards_factory(
        {t.name: t for t in tensors},
        get_storage_size=lambda t: t.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    by_name = {t.name: t for t in tensors}
    return {file: [by_name[n] for n in names] for file, names in split.filename_to_tensors.items()}


def write_checkpoint(
    out_dir: Path,
    shards: dict[str, list[OutputTensor]],
    metadata: dict[str, str],
    progress: Callable[[int], object] = lambda n: None,
    fetch: Callable[[list[Piece]], int] = len,
    finished: Finished | None = None,
) -> None:
    """Write every shard into ``out_dir`` and, when there are several, the index with ``total_size``.

    ``fetch(pieces)`` makes the first of the source ranges still to be read readable and says how many (a Hub
    source read in place downloads them: ``Checkpoint.fetch_ahead``); they are read before it is called again.
    ``finished``: shards a killed run finished are adopted from it, and each shard written is recorded in it.
    """
    for file, tensors in shards.items():
        if finished is not None and finished.adopt(out_dir, file, tensors, metadata):
            progress(sum(t.nbytes for t in tensors))
            continue
        write_shard(out_dir / file, tensors, metadata, progress, fetch)
        if finished is not None:
            finished.record(out_dir, file, tensors, metadata)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for ts in shards.values() for t in ts)},
            "weight_map": dict(sorted((t.name, file) for file, ts in shards.items() for t in ts)),
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_shard(
    path: Path, tensors: list[OutputTensor], metadata: dict[str, str], progress: Callable[[int], object],
    fetch: Callable[[list[Piece]], int] = len,
) -> None:  # fmt: skip
    pieces = [piece for t in tensors for piece in t.pieces]
    with open(path, "wb") as dst, _Sources() as sources:
        dst.write(safetensors_header(tensors, metadata))
        dst.flush()
        advised = ahead = 0  # pieces announced so far; bytes announced but not yet copied
        ready = 0  # pieces fetched and not yet copied
        for i, (file, start, end) in enumerate(pieces):
            ready = ready or fetch(pieces[i:])
            while advised < len(pieces) and ahead < READ_AHEAD:
                ahead += _will_need(sources.fd(pieces[advised][0]), *pieces[advised][1:])
                advised += 1
            copy_range(sources.fd(file), dst.fileno(), start, end - start)
            ready -= 1
            ahead -= end - start
            progress(end - start)


def _will_need(fd: int, start: int, end: int) -> int:
    """Ask the kernel to start reading ``[start, end)`` now; a hint only, so where unsupported nothing changes."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
    return end - start


def copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst`` (at its current position)."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, min(count, CHUNK), offset)
        except OSError:  # filesystems or kernels without copy_file_range across these files
            n = 0
        if n == 0:
            data = os.pread(src, min(count, CHUNK), offset)
            if not data:
                raise OSError(f"unexpected end of source file while copying at byte {offset}")
            n = os.write(dst, data)
        offset += n
        count -= n


class _Sources:
    """Open source files by path, all closed on exit; a shard reads from few files, mostly in order."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def __enter__(self) -> _Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
