"""Finished output shards of a killed run, adopted by its rerun instead of being written (and, from the Hub,
downloaded) again.

Each shard, once written whole, is recorded in a manifest beside it in the output being built: its name, size,
sha256, and its *recipe*, a digest of everything that defines its bytes (the source's identity, the shard's
safetensors header, and the source ranges it is copied from, named relative to the source). A rerun of the same
command finds the killed run's temp folder (``targets.resumable``) and, for each shard it is about to write
whose recipe it finds there, verifies the file (a plain file of ours, of the recorded size and sha256, opened
without following links) and moves it into its own output; anything else is written as usual. The manifest is
removed before the output is renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
from pathlib import Path

from moeslim.safefs import CLOEXEC, NOFOLLOW, folder_fd, write_atomic
from moeslim.source import Checkpoint
from moeslim.surgery.mapping import OutputTensor, safetensors_header
from moeslim.targets import FINISHED as MANIFEST
from moeslim.targets import resumable
from moeslim.units import human_bytes

HASH_CHUNK = 16 * 2**20


def finished_shards(ckpt: Checkpoint, out: Path) -> Finished | None:
    """For a Hub source read in place, what records and adopts finished shards of ``out`` (None for other
    sources: a local copy is as fast as reading the shards back to verify them, and the Hub cache resumes by
    itself). Call it holding ``out``'s lock, before making the temp folder the output is built in."""
    from moeslim.remote.store import Store

    if not isinstance(ckpt.fetcher, Store):
        return None
    transfer = ckpt.fetcher.transfer
    return Finished(f"{transfer.repo_id}@{transfer.commit}", ckpt.root, resumable(out))


class Finished:
    """The finished shards of an output, from a source known as ``source`` (a Hub repo and commit) whose files lie
    under ``root``; ``leftovers``: killed runs' temp folders to adopt shards from."""

    def __init__(self, source: str, root: Path, leftovers: list[Path]) -> None:
        self.source, self.root = source, root
        self.found = {path: _manifest(path) for path in leftovers}
        self.done: dict[str, dict] = {}  # shard name → {"size", "sha256", "recipe"}: this output's finished shards
        self.adopted = 0  # bytes of tensors adopted

    def recipe(self, tensors: list[OutputTensor], metadata: dict[str, str]) -> str | None:
        """What defines the bytes of a shard of ``tensors``; None when a piece lies outside the source (a corrected
        tensor's patch file, made anew by each run): such a shard is always written."""
        digest = hashlib.sha256(json.dumps(self.source).encode() + safetensors_header(tensors, metadata))
        for t in tensors:
            for file, start, end in t.pieces:
                if not file.is_relative_to(self.root):
                    return None
                digest.update(json.dumps([file.relative_to(self.root).as_posix(), start, end]).encode())
        return digest.hexdigest()

    def reusable(self, shards: dict[str, list[OutputTensor]], metadata: dict[str, str]) -> int:
        """Bytes of the shards that a leftover promises (by recipe, before verifying): disk not needed anew."""
        return sum(sum(t.nbytes for t in ts) for file, ts in shards.items() if self._offers(file, ts, metadata))

    def adopt(self, folder: Path, file: str, tensors: list[OutputTensor], metadata: dict[str, str]) -> bool:
        """Move a leftover's finished ``file`` into ``folder`` when its recipe is this shard's and its bytes are as
        recorded; False (nothing moved) otherwise. Leftovers of several killed runs may list it: a rerun killed
        after adopting it holds it in its own, and the folder it came from still lists it."""
        for source, entry in self._offers(file, tensors, metadata):
            if _move_verified(source, folder, file, entry):
                self._record(folder, file, entry)
                self.adopted += sum(t.nbytes for t in tensors)
                return True
        return False

    def record(self, folder: Path, file: str, tensors: list[OutputTensor], metadata: dict[str, str]) -> None:
        """Record ``file``, just written whole into ``folder``, as finished (its sha256 read back from disk)."""
        recipe = self.recipe(tensors, metadata)
        if recipe is not None:
            size, digest = _sha256(folder, file)
            self._record(folder, file, {"size": size, "sha256": digest, "recipe": recipe})

    def close(self, folder: Path) -> None:
        """Remove the manifest from ``folder`` (it is no part of an output) and say what was adopted."""
        with contextlib.suppress(FileNotFoundError):
            (folder / MANIFEST).unlink()
        if self.adopted:
            print(f"moeslim: note: reused {human_bytes(self.adopted)} of finished shards from an interrupted run",
                  file=sys.stderr)  # fmt: skip

    def _offers(self, file: str, tensors: list[OutputTensor], metadata: dict[str, str]) -> list[tuple[Path, dict]]:
        """The leftovers whose manifest lists ``file`` with this shard's recipe and size."""
        recipe = self.recipe(tensors, metadata)
        size = len(safetensors_header(tensors, metadata)) + sum(t.nbytes for t in tensors)
        return [
            (folder, entry)
            for folder, entries in self.found.items()
            if (entry := entries.get(file)) is not None
            and recipe is not None
            and (entry["recipe"], entry["size"]) == (recipe, size)
        ]

    def _record(self, folder: Path, file: str, entry: dict) -> None:
        self.done[file] = entry
        write_atomic(folder / MANIFEST, json.dumps({"shards": self.done}, indent=1).encode())


def _manifest(folder: Path) -> dict[str, dict]:
    """The finished shards a leftover's manifest lists (nothing when it is absent, not a plain file of ours, or
    malformed)."""
    try:
        with folder_fd(folder) as dfd:
            fd = os.open(MANIFEST, os.O_RDONLY | NOFOLLOW | CLOEXEC, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                if not _ours(os.fstat(f.fileno())):
                    return {}
                shards = json.loads(f.read())["shards"]
        return {
            str(name): {"size": int(e["size"]), "sha256": str(e["sha256"]), "recipe": str(e["recipe"])}
            for name, e in shards.items()
            if _plain_name(str(name))
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..", MANIFEST) and "/" not in name and "\0" not in name


def _ours(st: os.stat_result) -> bool:
    """A plain file of this user with no other name (a hard link could be changed through its other name)."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def _move_verified(source: Path, folder: Path, name: str, entry: dict) -> bool:
    """Rename ``source/name`` into ``folder`` if it is a plain file of ours with the size and sha256 of ``entry``;
    the file renamed is checked to be the one verified."""
    with folder_fd(source) as src, folder_fd(folder) as dst:
        try:
            fd = os.open(name, os.O_RDONLY | NOFOLLOW | CLOEXEC, dir_fd=src)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not _ours(st) or st.st_size != entry["size"] or _digest(fd) != entry["sha256"]:
                return False
            try:
                os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
            except OSError:
                return False
            if os.path.samestat(st, os.stat(name, dir_fd=dst, follow_symlinks=False)):
                return True
            os.unlink(name, dir_fd=dst)  # swapped between the check and the move: not what was verified
            return False
        finally:
            os.close(fd)


def _sha256(folder: Path, name: str) -> tuple[int, str]:
    with folder_fd(folder) as dfd:
        fd = os.open(name, os.O_RDONLY | NOFOLLOW | CLOEXEC, dir_fd=dfd)
        try:
            return os.fstat(fd).st_size, _digest(fd)
        finally:
            os.close(fd)


def _digest(fd: int) -> str:
    digest, at = hashlib.sha256(), 0
    while chunk := os.pread(fd, HASH_CHUNK, at):
        digest.update(chunk)
        at += len(chunk)
    return digest.hexdigest()
