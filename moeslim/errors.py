"""Errors a user can fix. The CLI prints each as one line on stderr and exits with code 2; so it does for an
operating-system error of a class ``os_error_line`` has advice for (a full disk, a read-only filesystem, ...)."""

from __future__ import annotations

import errno
import os


class MoeslimError(Exception):
    """Base of every error moeslim reports to the user; the message says what is wrong and what to do."""


class CheckpointError(MoeslimError, ValueError):
    """The source checkpoint is corrupt, inconsistent with its config, or not a kind moeslim reads."""


class MissingFileError(MoeslimError, FileNotFoundError):
    """A file that must exist (source folder, config, shard, plan) does not."""


class UnsupportedModelError(MoeslimError, ValueError):
    """The model family is not one moeslim knows how to prune."""


class PlanError(MoeslimError, ValueError):
    """The requested pruning cannot be served: bad --keep, --top-k, groups, or a plan that does not fit."""


class OutputError(MoeslimError, OSError):
    """The output cannot be written: target exists without --overwrite, overlaps the source, or no space."""


class UsageError(MoeslimError, ValueError):
    """Options that contradict each other or do not apply to this source."""


class HubError(MoeslimError, OSError):
    """The Hub cannot serve the request: repo or revision missing, offline with nothing cached, unreachable."""


class HubAuthError(HubError, PermissionError):
    """No token, a token the Hub rejects, or one without the access the request needs (gated, read-only)."""


class DeviceError(MoeslimError, ValueError):
    """The requested compute device or dtype is not available."""


class CalibrationDataError(MoeslimError, ValueError):
    """The calibration data cannot be read or does not hold enough tokens for the requested shape."""


class StructureError(CheckpointError):
    """A pruned checkpoint's tensors do not match what its config makes transformers expect."""


# An operating-system error moeslim has no message of its own for at the place it happened: what it means, and
# what to do. Each is something the user can fix (exit code 2); other error numbers keep the system's text (exit 1).
_OS_ADVICE = {
    errno.ENOSPC: (
        "no space left on the device",
        "free space there or choose another --out, then run the same"
        " command again (a calibration resumes, an output is replaced whole)",
    ),
    errno.EDQUOT: (
        "disk quota exceeded",
        "free space within your quota or choose another --out, then run the same command again",
    ),
    errno.EFBIG: (
        "file too large for the filesystem or for `ulimit -f`",
        "raise the limit, or choose another --out (a smaller --max-shard-size makes smaller files)",
    ),
    errno.EROFS: ("read-only filesystem", "choose a folder on a writable filesystem (--out, --json)"),
    errno.EACCES: ("permission denied", "choose a folder you may write (--out, --json), or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you own (--out, --json), or change its permissions"),
    errno.EBUSY: (
        "busy (a mount point, or held by another program)",
        "choose another --out, such as a folder inside the mount point",
    ),
    errno.ETXTBSY: ("busy (held by another program)", "stop that program or choose another --out"),
    errno.EXDEV: (
        "on another filesystem than its folder (a mount point or bind mount), and moeslim moves files"
        " into place by renaming",
        "choose another --out, such as a folder inside the mount point",
    ),
    errno.ENAMETOOLONG: (
        "name too long for its filesystem",
        "choose a shorter --out (moeslim adds up to 30 characters to the name for its temporary and lock files)",
    ),
    errno.ELOOP: ("a link stands where moeslim writes", "remove the link or choose another --out"),
    errno.EMFILE: ("too many open files", "raise the limit (`ulimit -n`) and run again"),
    errno.ENFILE: ("too many open files on this system", "close other programs' files and run again"),
    errno.EIO: ("input/output error", "the disk or network filesystem failed: check it, then run again"),
}


def os_error_line(e: OSError) -> str | None:
    """The one line for an operating-system error of a known class: what happened to which file and what to do;
    None for another error number."""
    if e.errno not in _OS_ADVICE:
        return None
    what, advice = _OS_ADVICE[e.errno]
    if e.errno == errno.ELOOP and e.strerror not in (None, os.strerror(errno.ELOOP)):  # safefs's refusal says more
        what = e.strerror
    where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
    return f"{where}{what}; {advice}"


def naming(e: OSError, path: object) -> OSError:
    """``e`` said of ``path`` when it names no file (a failed ``write`` on a descriptor names none)."""
    if e.filename is not None:
        return e
    return OSError(e.errno, e.strerror if e.strerror is not None else str(e), str(path))  # OSError("text") keeps it


class SourceChangedError(HubError):
    """A Hub source read in place changed on the Hub during the run (commit gone, file size or ETag different)."""
