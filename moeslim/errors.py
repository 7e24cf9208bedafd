"""Errors a user can fix. The CLI prints each as one line on stderr and exits with code 2."""

from __future__ import annotations


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


class SourceChangedError(HubError):
    """A Hub source read in place changed on the Hub during the run (commit gone, file size or ETag different)."""
