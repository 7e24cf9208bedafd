"""Where moeslim writes: one run per target at a time, folders built beside the target and swapped into place,
leftovers of killed runs swept away, and ``--overwrite`` limited to what moeslim itself made.

A target ``T`` in folder ``P`` uses these names in ``P``:

- ``.T.moeslim-lock``: held (``flock``) by the run writing ``T``; the kernel releases it when that process dies,
  so a killed run never blocks the next one.
- ``.T.<random>.moeslim-tmp``: the output being built; renamed to ``T`` only when complete.
- ``.T.<random>.moeslim-old``: a replaced output on its way out.

Temp folders whose target's lock nobody holds belong to dead runs; the next run in ``P`` removes them. Those that
hold finished shards (a ``moeslim-finished.json``) are left to the next run of ``T`` itself, which keeps them until
it releases the lock, so that its writer can adopt those shards (``surgery/finished.py``) rather than make them
again. Such a folder is also left by a run that is stopped (Ctrl-C, SIGTERM) or loses the Hub while writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from moeslim.errors import HubError, OutputError, SourceChangedError, naming, os_error_line
from moeslim.safefs import NOFOLLOW, folder_fd, open_own
from moeslim.stopping import deferred, is_stop

LOCK_SUFFIX = ".moeslim-lock"
TMP_SUFFIX = ".moeslim-tmp"
OLD_SUFFIX = ".moeslim-old"
FINISHED = "moeslim-finished.json"  # in a temp folder: its finished shards, which a rerun may adopt


class TargetLock:
    """An exclusive, non-blocking lock on ``target`` (a file beside it), released by the kernel on death.

    The lock file is opened relative to its folder and never through a link (``safefs.open_own``): a link planted
    at its name is removed, not written through.
    """

    def __init__(self, target: Path) -> None:
        target = _absolute(target)  # "." has no name, and its parent is not where it lies
        self.path = target.parent / f".{target.name}{LOCK_SUFFIX}"
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when a live process holds it."""
        with folder_fd(self.path.parent) as dfd:
            while True:
                fd = open_own(dfd, self.path.name)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return False
                if _same_file(fd, dfd, self.path.name):  # not unlinked by a releasing holder since our open
                    break
                os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:  # a full disk: held by no one, and gone
            self.release()
            raise
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if _same_file(self._fd, None, str(self.path)):  # our file: never a name planted since
                    self.path.unlink()  # before closing: a waiter that opened the old file re-checks and retries
            os.close(self._fd)
            self._fd = None

    def holder(self) -> str:
        """The pid written by the holder, or ``?``."""
        try:
            fd = os.open(self.path, os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return "?"
        try:
            return os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        finally:
            os.close(fd)


def _same_file(fd: int, dir_fd: int | None, name: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold ``target``'s lock for the block (refusing when another run holds it); sweep dead runs' leftovers."""
    target = _absolute(target)
    lock = TargetLock(target)
    kept: list[Path] = []
    try:
        with deferred():  # a stopping signal waits until the lock, once made, is this block's to release
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                acquired = lock.acquire()
            except OSError as e:
                said = os_error_line(OSError(e.errno, e.strerror)) or f"{e.strerror}; choose another --out"
                raise OutputError(f"cannot write {target}: {said}") from e
            if not acquired:
                raise OutputError(
                    f"{target} is being written by another moeslim run (pid {lock.holder()});"
                    " wait for it to finish or choose another --out"
                )
        sweep(target.parent, own=target.name, kept=kept)
        yield
    finally:
        try:
            for path in kept:  # adopted from, or not needed: dead either way
                _remove(path)
        finally:
            lock.release()


def sweep(parent: Path, own: str | None = None, kept: list[Path] | None = None) -> list[Path]:
    """Remove the temp folders in ``parent`` left by dead runs (their target's lock is free); return them.

    ``own`` is the target whose lock the caller holds: its leftovers are dead by definition. Those that hold
    finished shards are appended to ``kept`` instead of being removed, when it is given; other targets' are left
    for a run of their own target (a run writing another output beside them must not lose them).
    """
    removed = []
    for path in sorted(parent.glob(f".*{TMP_SUFFIX}")) + sorted(parent.glob(f".*{OLD_SUFFIX}")):
        name = target_of(path.name)
        if name is None or path.is_symlink() or not path.is_dir():  # a planted link is not a leftover
            continue
        if _resumable(path) and (name != own or kept is not None):  # only a run of its target adopts or removes it
            if name == own and kept is not None:
                kept.append(path)
            continue
        if name == own:
            removed.append(_remove(path))
            continue
        lock = TargetLock(parent / name)
        if lock.acquire():
            try:
                removed.append(_remove(path))
            finally:
                lock.release()
    return removed


def resumable(target: Path) -> list[Path]:
    """The temp folders of ``target`` left by dead runs that hold finished shards; call it holding the target's
    lock, before this run makes a temp folder that could hold some itself."""
    target = _absolute(target)
    return [p for p in sorted(target.parent.glob(f".{glob.escape(target.name)}.*{TMP_SUFFIX}"))
            if target_of(p.name) == target.name and _resumable(p)]  # fmt: skip


def _resumable(path: Path) -> bool:
    """A temp folder made by a run of this user (``mkdtemp``'s: a real folder of ours, closed to others) that
    records finished shards."""
    try:
        st = path.lstat()
        return (
            stat.S_ISDIR(st.st_mode)
            and st.st_uid == os.geteuid()
            and not st.st_mode & 0o077
            and stat.S_ISREG((path / FINISHED).lstat().st_mode)
        )
    except OSError:
        return False


def target_of(leftover: str) -> str | None:
    """``.T.<random>.moeslim-tmp`` → ``T`` (None for other names)."""
    for suffix in (TMP_SUFFIX, OLD_SUFFIX):
        if leftover.startswith(".") and leftover.endswith(suffix):
            name, dot, _random = leftover[1 : -len(suffix)].rpartition(".")
            return name if dot and name else None
    return None


def _remove(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    print(f"moeslim: note: removed {path}, left by an interrupted run", file=sys.stderr)
    return path


def temp_beside(target: Path) -> tempfile.TemporaryDirectory[str]:
    """A private temporary folder beside ``target``, removed when closed, named as ``target``'s temp folders
    (``.T.<random>.moeslim-tmp``): if the run is killed, the next run there removes it. The caller holds
    ``locked(target)``, and closes the folder before releasing it."""
    target = _absolute(target)
    return _TempFolder(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent, ignore_cleanup_errors=True)


class _TempFolder(tempfile.TemporaryDirectory[str]):
    """A temporary folder whose removal a stopping signal does not cut short (it is raised once it is gone)."""

    def cleanup(self) -> None:
        with deferred():
            super().cleanup()


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target``, on failure it is gone.

    The caller holds ``locked(target)``. A full disk becomes an ``OutputError`` with nothing left behind.
    """
    target = _absolute(target)
    tmp: Path | None = None
    keep = False  # the finished shards of a run that was stopped or lost the Hub: the next run adopts them
    try:
        with deferred():  # a stopping signal waits until the folder is made and this block owns its removal
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent))
        yield tmp  # private (mkdtemp's 0700) while built: nobody else can plant a name inside it
        tmp.chmod(0o777 & ~_umask())  # the result should look like any new folder
        _replace(tmp, target)
    except BaseException as e:
        keep = tmp is not None and _resumable(tmp) and _passing(e)
        if not isinstance(e, OSError) or isinstance(e, (OutputError, HubError)):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"no space left on device while writing {target}; free space or choose another --out"
            ) from e
        if e.filename is None:  # a failed write names no file
            raise naming(e, target) from e
        raise
    finally:
        if not keep and tmp is not None:
            with deferred():  # a stopping signal waits until it is gone
                shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the replaced output


def _passing(e: BaseException) -> bool:
    """Whether a run failed for a reason that a rerun of the same command does not meet again: it was stopped
    (Ctrl-C, SIGTERM, SIGHUP) or the Hub kept failing. Not a full disk, nor a source that changed (its shards are
    of no use to the rerun)."""
    return (
        isinstance(e, KeyboardInterrupt)
        or is_stop(e)
        or (isinstance(e, HubError) and not isinstance(e, SourceChangedError))
    )


def _replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing target is swapped out atomically, so it is never absent."""
    if not target.exists():
        os.rename(tmp, target)
    elif not _exchange(tmp, target):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=OLD_SUFFIX, dir=target.parent))
        os.rename(target, old / "previous")
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)


RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def check_target(source: Path, target: Path, overwrite: bool, foreign: Callable[[Path], str | None]) -> None:
    """Refuse a target that overlaps the source, or exists without ``overwrite``, or is not replaceable.

    ``foreign(target)`` says what in an existing target moeslim did not write (None: all of it is its own).
    Never replaced: the working directory or a folder above it, a non-folder, a folder holding other files.
    """
    check_outside(source, target)
    if os.path.ismount(target):  # renaming onto it fails (EBUSY), with or without --overwrite
        raise OutputError(
            f"{target} is a mount point, and moeslim builds an output beside its target and renames it into place;"
            f" pass a folder inside it, such as --out {target / source.name}-pruned"
        )
    if not target.exists() and not target.is_symlink():  # a dangling link is there too
        return
    if not overwrite:
        raise OutputError(f"{target} already exists; pass --overwrite to replace it or choose another --out")
    check_replaceable(target, foreign)


def check_outside(source: Path, target: Path) -> None:
    """Refuse a target that is, lies inside, or holds the source: as written and with links resolved."""
    for src, dst in ((source.resolve(), target.resolve()), (_absolute(source), _absolute(target))):
        if dst == src or src in dst.parents or dst in src.parents:
            raise OutputError(f"--out {target} overlaps the source folder {source}; choose a folder outside it")


def _absolute(path: Path) -> Path:
    """``path`` made absolute as the files written through it are: ``~`` is a folder name here (the CLI expands a
    leading ``~`` before any path reaches this module)."""
    return Path(os.path.abspath(path))


def check_replaceable(target: Path, foreign: Callable[[Path], str | None], *, whole: bool = True) -> None:
    """Only a folder moeslim made may be replaced (``whole``) or cleared of moeslim's files; a folder the user is
    working in is never replaced."""
    if not target.is_dir() or target.is_symlink():
        raise OutputError(f"{target} exists and is not a folder; remove it yourself or choose another --out")
    here = Path.cwd().resolve()
    if whole and (target.resolve() == here or target.resolve() in here.parents):
        raise OutputError(f"{target} is the working directory or holds it; moeslim will not replace it")
    if (why := foreign(target)) is not None:
        raise OutputError(
            f"{target} {why}; moeslim only replaces or clears what it wrote itself:"
            " remove the folder yourself or choose another --out"
        )


def files_under(folder: Path) -> Iterator[str]:
    """Relative POSIX paths of every file and link under ``folder`` (folders themselves are not listed)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(filenames) + [d for d in sorted(dirnames) if (Path(dirpath) / d).is_symlink()]:
            yield (Path(dirpath) / name).relative_to(folder).as_posix()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
