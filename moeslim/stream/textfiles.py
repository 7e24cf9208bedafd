"""Local calibration text: the regular files of a folder or of the standard library, read in blocks as they are
consumed and cut into newline-aligned pieces for the tokenizer.

A file holding a NUL byte or bytes that are not UTF-8 is binary (``NotText``). A file up to ``READ_BYTES`` is checked
whole before any piece of it is given; a larger one as far as it is read, so a huge file costs a block of memory and
is read no further than needed. Only regular files are read: a named pipe, socket or device would block the run
(holding its lock) or never end; in a folder they are skipped with one note on stderr.
"""

from __future__ import annotations

import codecs
import os
import stat
import sys
import sysconfig
from collections.abc import Callable, Generator
from pathlib import Path
from typing import BinaryIO

from moeslim.safefs import CLOEXEC

STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
READ_BYTES = 8 << 20  # files are read in blocks of this size


class NotText(Exception):
    """A file turned out binary (a NUL byte) or not UTF-8 while it was read."""


def walk_files(root: Path, skip_dir: Callable[[str], bool], keep: Callable[[str], bool]) -> list[Path]:
    """Regular files under ``root`` whose name passes ``keep``, not descending into skipped folders; sorted by relative
    path. Other entries (named pipes, sockets, devices, broken links) are skipped, said in one note on stderr."""
    found, others = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not skip_dir(d)]  # prune in place: os.walk does not descend into them
        for path in (Path(folder, f) for f in files if keep(f)):
            if (kind := not_regular(path)) is None:
                found.append(path)
            else:
                others.append(f"{path.relative_to(root).as_posix()} ({kind})")
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        shown = ", ".join(sorted(others)[:3]) + more
        print(f"moeslim: note: calibration reads only regular files; skipped in {root}: {shown}", file=sys.stderr)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def not_regular(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file (links followed), e.g. "a named pipe"; None for a file."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken link" if path.is_symlink() else "unreadable"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device",
             stat.S_ISBLK: "a device", stat.S_ISDIR: "a folder"}  # fmt: skip
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")


def folder_files(root: Path) -> list[Path]:
    """Every file under ``root``, hidden files and folders (``.git``) left out; binary ones are skipped on read."""
    return walk_files(root, skip_dir=lambda d: d.startswith("."), keep=lambda f: not f.startswith("."))


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library, without site-packages, tests and idlelib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return walk_files(root, skip_dir=lambda d: d in STDLIB_SKIP or d.startswith("."), keep=lambda f: f.endswith(".py"))


def read_text(path: Path) -> str | None:
    """The file's UTF-8 text, or None when it is binary (holds a NUL byte) or not UTF-8."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def file_pieces(path: Path, size: int) -> Generator[str, None, None]:
    """``pieces(read_text(path), size)``, read as consumed: the file is read in blocks of ``READ_BYTES`` and decoded
    incrementally; raises ``NotText`` where ``read_text`` gives None, as soon as the bad bytes are read."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    text = ""
    with open_regular(path) as f:
        final = False
        while not final:
            block = f.read(READ_BYTES)
            final = len(block) < READ_BYTES
            if b"\0" in block:
                raise NotText(path)
            try:
                text += decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                raise NotText(path) from e
            while text and (final or len(text) > size):  # more text may follow: cut only with enough read
                end = piece_end(text, 0, size)
                yield text[:end]
                text = text[end:]


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading in binary, only if it is a regular file (never blocking on a named pipe)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since it was listed
            raise NotText(path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def pieces(text: str, size: int) -> Generator[str, None, None]:
    """``text`` in consecutive pieces of at most ``size`` characters, each ending at a newline where one exists."""
    start = 0
    while start < len(text):
        end = piece_end(text, start, size)
        yield text[start:end]
        start = end


def piece_end(text: str, start: int, size: int) -> int:
    """Where the piece of ``text`` starting at ``start`` ends: after its last newline within ``size`` characters."""
    return len(text) if len(text) - start <= size else (text.rfind("\n", start, start + size) + 1 or start + size)
