"""A local checkpoint folder: its config, and every tensor's location checked against the shard index."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from moeslim import jsonio
from moeslim.errors import CheckpointError, MissingFileError
from moeslim.names import CONFIG_NAME, INDEX_NAME, SINGLE_NAME
from moeslim.shards import TensorInfo, read_header

Spans = Iterable[tuple[Path, int, int]]  # (file, start, end) byte ranges


class Fetcher(Protocol):
    """Brings byte ranges of a checkpoint's files onto the disk before they are read (``remote/store.py``)."""

    window: int | None  # most bytes of source held on disk at once (None: no limit)

    def fetch(self, spans: Spans) -> None: ...

    def retain(self, spans: Spans) -> None:
        """Keep the present ``spans`` on disk, outside the window, until they are fetched again."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder as moeslim sees it.

    ``tensors`` maps every weight name to its location, in shard-then-offset order, so iterating it reads
    each file front to back. ``shards`` are the weight files relative to ``root``. A Hub source read in place
    has a ``fetcher``: its shards are sparse until ``fetch`` brings the ranges about to be read.
    """

    root: Path
    config: dict
    tensors: dict[str, TensorInfo]
    shards: tuple[str, ...]
    metadata: dict[str, str]
    fetcher: Fetcher | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def fetch(self, names: Iterable[str], *, again: bool = False) -> None:
        """Make the bytes of tensors ``names`` readable; call it before reading them (a no-op for a folder).
        ``again``: a later pass reads them too, so they stay on disk until then (read once from the Hub)."""
        if self.fetcher is not None:
            spans = [(t.file, t.start, t.end) for t in (self.tensors[n] for n in names)]
            self.fetcher.fetch(spans)
            if again:
                self.fetcher.retain(spans)

    def fetch_ahead(self, spans: Sequence[tuple[Path, int, int]]) -> int:
        """Make the first of ``spans`` (file, start, end), in the order they will be read, readable, as many as
        half the fetcher's window holds (at least one) in one go; return how many. Read those before calling
        again: the next call may free them."""
        if self.fetcher is None or self.fetcher.window is None:
            return len(spans)
        count, budget = 0, self.fetcher.window // 2
        while count < len(spans) and (count == 0 or spans[count][2] - spans[count][1] <= budget):
            budget -= spans[count][2] - spans[count][1]
            count += 1
        self.fetcher.fetch(spans[:count])
        return count


def open_checkpoint(path: str | Path, fetcher: Fetcher | None = None) -> Checkpoint:
    """Read ``config.json``, the shard index (or the single ``model.safetensors``) and every shard header."""
    root = Path(path)
    if not root.is_dir():
        raise MissingFileError(f"{root} is not a folder; pass a local checkpoint folder")
    config = read_json(root / CONFIG_NAME, what="model config")
    weight_map = _weight_map(root)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in dict.fromkeys(weight_map.values()):
        in_file, meta = read_header(root / shard)
        metadata = metadata or meta
        _check_index_matches(weight_map, shard, in_file)
        tensors.update((name, info) for name, info in in_file.items() if weight_map[name] == shard)
    return Checkpoint(root, config, tensors, tuple(dict.fromkeys(weight_map.values())), metadata, fetcher)


def read_json(path: Path, *, what: str) -> dict:
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: a checkpoint folder needs its {what}")
    try:
        data = jsonio.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8, bad JSON, NaN/Infinity
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or re-download it") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; fix or re-download it")
    return data


def _weight_map(root: Path) -> dict[str, str]:
    """Tensor name → shard file name, from the index or the single-file layout."""
    if (root / INDEX_NAME).is_file():
        index = read_json(root / INDEX_NAME, what="shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{root / INDEX_NAME} has no weight_map; re-download it")
        for shard in weight_map.values():
            _check_shard_name(root, shard)
        return weight_map
    if (root / SINGLE_NAME).is_file():
        names = read_header(root / SINGLE_NAME)[0]
        return dict.fromkeys(names, SINGLE_NAME)
    raise MissingFileError(
        f"no safetensors weights in {root} (expected {SINGLE_NAME} or {INDEX_NAME});"
        " moeslim reads safetensors only, convert other formats first"
    )


def _check_shard_name(root: Path, shard: object) -> None:
    """A shard name must be a plain relative path inside the folder and the file must exist.

    The check is lexical, not on resolved paths: Hub cache snapshots are symlinks into a blob store.
    """
    pure = PurePosixPath(str(shard))
    if not isinstance(shard, str) or not shard or pure.is_absolute() or ".." in pure.parts or "\\" in shard:
        raise CheckpointError(
            f"{INDEX_NAME} names the shard {shard!r}, which is outside the checkpoint folder; refusing to read it"
        )
    if not (root / shard).is_file():
        raise MissingFileError(f"shard {shard} named in {INDEX_NAME} is missing from {root}; download it")


def _check_index_matches(weight_map: dict[str, str], shard: str, in_file: dict[str, TensorInfo]) -> None:
    """Every tensor the index places in ``shard`` must be in it, and every tensor in it must be in the index.

    A tensor the index does not list would silently go missing from the output. A second copy of a tensor the
    index places in another shard is left out: the index decides which copy is read.
    """
    wanted = [name for name, file in weight_map.items() if file == shard]
    if missing := [name for name in wanted if name not in in_file]:
        raise CheckpointError(
            f"{INDEX_NAME} places {missing[0]} in {shard}, but that file does not contain it;"
            " the checkpoint is inconsistent, re-download it"
        )
    if unlisted := [name for name in in_file if name not in weight_map]:
        raise CheckpointError(
            f"{shard} holds {unlisted[0]}, but {INDEX_NAME} does not list it; the checkpoint is inconsistent,"
            " re-download it"
        )
