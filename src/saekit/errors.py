"""saekit's error types.

:class:`SaekitError` and its subclasses are *user* errors: bad input, configuration, files
or environment. The CLI prints them as one line (``saekit CMD: error: ...``) and exits 1;
every other exception is a bug and keeps its traceback. Each subclass also derives from the
builtin a caller would have caught before (``ValueError``, ``OSError``, ``RuntimeError``), so
``except ValueError`` keeps working. A message names the file, field or flag and the fix.
"""

from __future__ import annotations


class SaekitError(Exception):
    """Base class of user errors (shown by the CLI as one line, no traceback)."""


class ConfigError(SaekitError, ValueError):
    """An invalid option, config field or combination of them."""


class DataError(SaekitError, ValueError):
    """Unusable input data: wrong shapes, non-finite values, an empty or tiny corpus."""


class FormatError(SaekitError, ValueError):
    """A file that is missing, unreadable, of an unknown layout or corrupt."""


class MissingFileError(FormatError, FileNotFoundError):
    """A file or directory the user named (or that a run/cache must hold) does not exist."""


class IntegrityError(FormatError):
    """A file whose checksum does not match the one recorded for it."""


class CheckpointError(FormatError):
    """A checkpoint that cannot be used (corrupt, incomplete or from another run)."""


class EnvironmentProblem(SaekitError, RuntimeError):
    """The environment cannot do what was asked (no CUDA in this torch, a missing extra)."""


class PathError(SaekitError, OSError):
    """A user's path cannot be written or read: a file where a directory should be, a
    read-only filesystem, a full disk, missing permission."""


class OutputExistsError(ConfigError, FileExistsError):
    """The output path exists and the command would not overwrite it."""


class TrainingError(SaekitError, RuntimeError):
    """Training cannot continue (non-finite activations, loss or gradients)."""


class LockedError(SaekitError, RuntimeError):
    """Another live process holds the run or cache directory."""


class DistributedError(EnvironmentProblem):
    """Another rank of a multi-process run died, failed or timed out (or disagrees)."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "EnvironmentProblem",
    "FormatError",
    "IntegrityError",
    "LockedError",
    "MissingFileError",
    "OutputExistsError",
    "PathError",
    "SaekitError",
    "TrainingError",
]
