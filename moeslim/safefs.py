"""Creating files without following links: every file moeslim writes outside a folder it has just made itself
goes through here.

A folder shared with other users may hold a link planted under a name moeslim is about to use (its lock, a
report, a statistics file). Opening such a name for writing would write through the link into whatever it points
at. So names are opened relative to their folder's descriptor with ``O_NOFOLLOW``, new files are made with
``O_EXCL`` under a fresh random name, and finished files are renamed over the old name, which replaces a link
rather than following it. A failed write leaves the previous file as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from moeslim.errors import MoeslimError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
PART_SUFFIX = ".moeslim-part"  # a file being written: ``.NAME.<random>.moeslim-part`` beside NAME


@contextlib.contextmanager
def folder_fd(folder: Path) -> Iterator[int]:
    """A descriptor of ``folder``, so the names opened in it stay in it even if a path above it is swapped."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def open_own(dir_fd: int, name: str, mode: int = 0o644) -> int:
    """Open ``name`` in the folder ``dir_fd`` for reading and writing, creating it if absent, and only if it is a
    plain file of ours: a link, a file with other names (a hard link) or another user's file is removed first
    (its target untouched); where it cannot be removed, ``OSError`` (``ELOOP``) is raised."""
    for _ in range(100):  # a racing process may recreate the name between our checks
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | NOFOLLOW | CLOEXEC, mode, dir_fd=dir_fd)
        except OSError:
            if not _planted(dir_fd, name):
                raise
            _unlink_planted(dir_fd, name)
            continue
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
            return fd
        os.close(fd)
        _unlink_planted(dir_fd, name)
    raise OSError(40, "the name keeps being replaced by a link", name)  # ELOOP


def _planted(dir_fd: int, name: str) -> bool:
    """Whether a link or another non-file stands where ``name`` should be (else opening it failed for another
    reason, such as permissions)."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return not stat.S_ISREG(st.st_mode)


def _unlink_planted(dir_fd: int, name: str) -> None:
    """Remove the name (never what a link points at); refuse with ELOOP where the folder does not let us."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OSError(40, f"{name} is a link or a file moeslim did not make, and cannot be removed", name) from e


def write_atomic(path: Path, data: bytes | Callable[[int], object]) -> None:
    """Write ``path`` in one step: ``data`` (bytes, or a function writing to a file descriptor) goes to a new
    file beside it, which then replaces ``path``. A link at ``path`` is replaced, never followed; on any failure
    the previous file is intact and the new one is gone."""
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | CLOEXEC)
    except OSError as e:  # said of the file the caller wanted, not of its folder
        raise OSError(e.errno, e.strerror, str(path)) from e
    part = f".{path.name}.{secrets.token_hex(4)}{PART_SUFFIX}"
    try:
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o666, dir_fd=dfd)
            try:
                if isinstance(data, bytes):
                    write_all(fd, data)
                else:
                    data(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(part, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=dfd)
            raise
    except OSError as e:  # a write names no file, and a name opened in the folder only itself
        if isinstance(e, MoeslimError):  # said already (by a ``data`` function)
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        os.close(dfd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


def is_part(name: str) -> bool:
    """Whether ``name`` is a file left half-written by ``write_atomic`` (a killed run's)."""
    return name.startswith(".") and name.endswith(PART_SUFFIX)


def remove_path(path: Path) -> None:
    """Remove ``path`` whatever it is: a folder with its contents, or a file or link (never what a link points
    at); absent is fine."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
