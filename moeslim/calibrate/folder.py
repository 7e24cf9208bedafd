"""The statistics folder of ``moeslim calibrate --out``: outside the model, locked while written, and cleared
(on ``--overwrite``) of moeslim's own files only: never the folder itself, never anything else in it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from moeslim.names import STATS_ARRAYS, STATS_JSON
from moeslim.safefs import PART_SUFFIX, is_part, remove_path
from moeslim.targets import check_outside, check_replaceable, files_under, locked

STATS_FILES = (STATS_JSON, STATS_ARRAYS)
WORK_DIRS = ("resume", "resume.tmp")  # boundary activations kept for resuming an interrupted calibration


@contextlib.contextmanager
def claim_stats_folder(model: Path, out: Path) -> Iterator[None]:
    """Hold ``out`` for this calibration: outside the ``model`` folder, locked, and absent, empty or a
    statistics folder (resumed or, with ``--overwrite``, cleared by the caller through ``clear_stats``)."""
    check_outside(model, out)  # before the lock, whose file lies beside the folder
    with locked(out):
        if out.exists():
            check_replaceable(out, foreign_in_stats, whole=False)  # only its files are ever removed
        yield


def foreign_in_stats(folder: Path) -> str | None:
    """What in ``folder`` is not part of a moeslim statistics folder (None: all of it is)."""
    other = next((f for f in files_under(folder) if not _ours(f)), None)  # e.g. a run stopped before stats.json
    return None if other is None else f"holds {other}, which moeslim did not write"


def clear_stats(folder: Path) -> None:
    """Remove the statistics and resume files from ``folder``, and nothing else."""
    for name in STATS_FILES:
        (folder / name).unlink(missing_ok=True)
    for path in [*folder.glob("stats.*.tmp"), *folder.glob(f".*{PART_SUFFIX}")]:
        path.unlink(missing_ok=True)
    for name in WORK_DIRS:
        remove_path(folder / name)
    for path in folder.glob("resume.rank*"):  # the boundaries of the processes of a torchrun
        remove_path(path)


def _ours(rel: str) -> bool:
    first = rel.split("/", 1)[0]
    return (
        first in STATS_FILES
        or first in WORK_DIRS
        or first.startswith("resume.rank")
        or (first.startswith("stats.") and first.endswith(".tmp"))  # written by moeslim before 0.2
        or is_part(first)
    )
