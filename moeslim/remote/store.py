"""The shards of one Hub commit as sparse files of their full size in a work folder, filled on demand.

``fetch`` makes byte ranges present just before they are read; the readers then read the files as if they
were local. At most ``window`` bytes of weights are held on disk at once: room for new ranges is made by
punching out the ranges fetched longest ago (never the ones being fetched). Headers stay. What is present is
recorded in a journal beside the files after the bytes are synced, and before a range is punched, so a killed
run's rerun downloads only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moeslim.errors import OutputError
from moeslim.remote.spans import Span, blocks_bytes, can_punch, merge, missing, punch
from moeslim.remote.transfer import Remote, Transfer
from moeslim.shards import MAX_HEADER_BYTES

HEADER_LEN = 8  # the little-endian u64 that opens every safetensors file
PART = 64 * 2**20  # most bytes one request asks for; larger gaps are split and fetched side by side
WORKERS = 4  # concurrent range requests

Key = tuple[str, int, int]  # shard name, start, end


class Store:
    """Sparse copies of ``remotes`` under ``root``; ``window`` bytes of weights at most (None: no limit)."""

    def __init__(self, root: Path, journal: Path, transfer: Transfer, remotes: dict[str, Remote]) -> None:
        self.root, self.journal, self.transfer, self.remotes = root, journal, transfer, remotes
        self.window: int | None = None
        self._fds: dict[str, int] = {}
        self._lru: OrderedDict[Key, int] = OrderedDict()  # weight ranges, disjoint, oldest first → last fetch call
        self._calls = 0  # fetch calls so far: the ranges of the last two are being read (a layer and the next one)
        self._kept: set[Key] = set()  # ranges retained for a later read, outside the window until fetched again
        self._headers: dict[str, int] = {}  # shard → end of its header, which is never punched
        self._state = threading.Lock()  # the bookkeeping
        self._slow = threading.Lock()  # one fetch that downloads at a time
        self.peak = 0  # most disk taken by weights at once (window and retained)
        self._block = os.statvfs(root.parent).f_bsize
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="moeslim-ranges")

    # opening ------------------------------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def opened(cls, root: Path, journal: Path, transfer: Transfer, remotes: dict[str, Remote]) -> Iterator[Store]:
        """The store, resumed from ``journal`` when it describes the same commit and files, else started empty."""
        store = cls(root, journal, transfer, remotes)
        try:
            store._open_files(store._resume())
            yield store
        finally:
            store._pool.shutdown(wait=True)
            for fd in store._fds.values():
                os.close(fd)

    def _resume(self) -> dict[str, list[Span]]:
        """What the journal records as present, when it is this commit's (else nothing: a fresh start)."""
        try:
            saved = json.loads(self.journal.read_text(encoding="utf-8"))
            if saved.get("commit") != self.transfer.commit or saved.get("files") != self._files():
                return {}
            self._headers = {str(name): int(end) for name, end in saved["headers"].items()}
            return {str(name): [(int(s), int(e)) for s, e in spans] for name, spans in saved["have"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._headers = {}
            return {}

    def _files(self) -> dict[str, list]:
        return {name: [r.size, r.etag] for name, r in self.remotes.items()}

    def _open_files(self, have: dict[str, list[Span]]) -> None:
        for name, remote in self.remotes.items():
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name not in have and name not in self._headers:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # bytes nobody recorded are not trusted
            if path.is_symlink():  # a link to the cache, left by a run that found this shard cached: never written
                path.unlink()
            fd = self._fds[name] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.ftruncate(fd, remote.size)
            if not (have.get(name) or name in self._headers) and not can_punch(fd, remote.size):
                raise OutputError(
                    f"the file system of {self.root} cannot free parts of files, which reading from the Hub in"
                    " place needs; pass --cache-window full, or write the output elsewhere"
                )
            for start, end in have.get(name, []):
                self._lru[(name, start, end)] = 0
            for start, end in missing(self._spans_of(name), 0, remote.size) if have.get(name) else ():
                punch(fd, start, end)  # bytes a killed run wrote but never recorded: not trusted, not kept
        self._save()

    # headers ------------------------------------------------------------------------------------------------

    def fetch_headers(self) -> None:
        """Each shard's safetensors header: its 8-byte length, then exactly that many bytes (two requests)."""
        for name, remote in self.remotes.items():
            if name in self._headers:
                continue
            fd, first = self._fds[name], min(HEADER_LEN, remote.size)
            self.transfer.get(remote, fd, 0, first)
            length = int.from_bytes(os.pread(fd, first, 0), "little") if first == HEADER_LEN else 0
            end = first if length > MAX_HEADER_BYTES else min(remote.size, HEADER_LEN + length)  # refused later
            if end > first:
                self.transfer.get(remote, fd, first, end)
            os.fdatasync(fd)
            self._headers[name] = end
        self._save()

    # fetching -----------------------------------------------------------------------------------------------

    def fetch(self, spans: Iterable[tuple[Path, int, int]]) -> None:
        """Make ``spans`` (file, start, end) present; files that are not this store's are left alone."""
        wanted = self._wanted(spans)
        if not wanted:
            return
        with self._state:
            self._calls += 1
            call = self._calls
            gaps = self._gaps(wanted)
            if not gaps:
                self._touch(wanted, call)
                return
        with self._slow:
            with self._state:
                gaps = self._gaps(wanted)
                self._make_room(wanted, gaps, call)
            self._download(gaps)
            with self._state:
                for key in gaps:
                    self._lru[key] = call
                self._touch(wanted, call)
                self.peak = max(
                    self.peak, self.held + sum(blocks_bytes([(s, e)], self._block) for _, s, e in self._kept)
                )
                self._save()

    def retain(self, spans: Iterable[tuple[Path, int, int]]) -> None:
        """Keep the present parts of ``spans`` out of the window's reach until they are fetched once more: bytes
        a later pass will read (the kept experts of a calibrated layer, which surgery copies), so that they are
        downloaded once. They are at most what the output will hold."""
        for path, start, end in spans:
            name = self._name_of(Path(path))
            if name is None:
                continue
            with self._state:
                for key in [k for k in self._lru if k[0] == name and k[1] < end and start < k[2]]:
                    call = self._lru.pop(key)
                    _, s, e = key
                    self._kept.add((name, max(s, start), min(e, end)))
                    for part in ((s, start), (end, e)):
                        if part[1] > part[0]:
                            self._lru[(name, *part)] = call

    @property
    def held(self) -> int:
        """Disk taken by the weights in the window now: the whole blocks their ranges touch (headers and
        retained ranges not counted)."""
        return sum(self._disk_of(name) for name in {n for n, _, _ in self._lru})

    def _disk_of(self, name: str) -> int:
        return blocks_bytes(merge((s, e) for n, s, e in self._lru if n == name), self._block)

    def _wanted(self, spans: Iterable[tuple[Path, int, int]]) -> dict[str, list[Span]]:
        by_name: dict[str, list[Span]] = {}
        for path, start, end in spans:
            name = self._name_of(Path(path))
            if name is not None and end > start:
                by_name.setdefault(name, []).append((start, end))
        return {name: merge(spans) for name, spans in by_name.items()}

    def _name_of(self, path: Path) -> str | None:
        try:
            name = path.relative_to(self.root).as_posix()
        except ValueError:
            return None
        return name if name in self.remotes else None

    def _spans_of(self, name: str) -> list[Span]:
        """Present bytes of shard ``name``: its header and the weight ranges held."""
        held = [(s, e) for n, s, e in self._lru if n == name] + [(s, e) for n, s, e in self._kept if n == name]
        return merge([(0, self._headers.get(name, 0)), *held])

    def _gaps(self, wanted: dict[str, list[Span]]) -> list[Key]:
        gaps = []
        for name, spans in wanted.items():
            have = self._spans_of(name)
            gaps += [(name, s, e) for start, end in spans for s, e in missing(have, start, end)]
        return gaps

    def _touch(self, wanted: dict[str, list[Span]], call: int) -> None:
        """Mark the present ranges overlapping ``wanted`` as read by fetch call ``call``, the most recent; retained
        ones among them return to the window, their later read having come."""
        for key in [k for k in self._kept if _overlaps(k, wanted)]:
            self._kept.discard(key)
            self._lru[key] = call
        for key in [k for k in self._lru if _overlaps(k, wanted)]:
            self._lru[key] = call
            self._lru.move_to_end(key)

    def _make_room(self, wanted: dict[str, list[Span]], gaps: list[Key], call: int) -> None:
        """Punch out the oldest ranges until the blocks of ``gaps`` fit in the window. Never ranges of ``wanted``,
        nor those the previous fetch call asked for: a reader may be reading them now (the layer runner reads
        one layer while the next is fetched). When those alone fill the window, it is exceeded rather than a
        range read as zeros."""
        if self.window is None:
            return
        need = sum(blocks_bytes([(s, e)], self._block) for _, s, e in gaps)
        disk = {name: self._disk_of(name) for name in {n for n, _, _ in self._lru}}
        victims: list[Key] = []
        for key in list(self._lru):
            if sum(disk.values()) + need <= self.window:
                break
            if self._lru[key] < call - 1 and not _overlaps(key, wanted):
                del self._lru[key]
                victims.append(key)
                disk[key[0]] = self._disk_of(key[0])
        if victims:
            self._save()  # recorded absent before the bytes go
        for key in victims:
            self._punch(*key)

    def _punch(self, name: str, start: int, end: int) -> None:
        """Free ``[start, end)`` of shard ``name``, widened to whole blocks where no present byte shares them."""
        block, before, after = self._block, 0, self.remotes[name].size
        for s, e in self._spans_of(name):
            if e <= start:
                before = max(before, e)
            elif s >= end:
                after = min(after, s)
        low = max(before, start - start % block)
        high = min(after, -(-end // block) * block)
        punch(self._fds[name], low, high)

    def _download(self, gaps: list[Key]) -> None:
        parts = [(n, s, min(s + PART, e)) for n, start, e in gaps for s in range(start, e, PART)]
        list(self._pool.map(lambda p: self.transfer.get(self.remotes[p[0]], self._fds[p[0]], p[1], p[2]), parts))
        for name in {n for n, _, _ in gaps}:
            os.fdatasync(self._fds[name])  # on disk before the journal says so

    def _save(self) -> None:
        have: dict[str, list[Span]] = {name: [] for name in self.remotes}
        for name, start, end in [*self._lru, *self._kept]:
            have[name].append((start, end))
        data = {"repo": self.transfer.repo_id, "commit": self.transfer.commit, "files": self._files(),
                "headers": self._headers, "have": {name: merge(spans) for name, spans in have.items()}}  # fmt: skip
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.journal)


def _overlaps(key: Key, wanted: dict[str, list[Span]]) -> bool:
    name, start, end = key
    return any(s < end and start < e for s, e in wanted.get(name, ()))
