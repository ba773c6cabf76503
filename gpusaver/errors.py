"""The errors gpusaver raises.

Every error derives from :class:`GpuSaverError` and also from the built-in
exception a caller would naturally catch: a corrupt checkpoint is a
``ValueError``, a missing tensor a ``KeyError``, a missing checkpoint a
``FileNotFoundError``, a failed write an ``OSError`` that keeps its errno.
Messages name the file, the tensor, what was expected and what was found.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "GpuSaverError",
    "CorruptCheckpointError",
    "ChecksumError",
    "UnsupportedVersionError",
    "UnsupportedDTypeError",
    "TensorNotFoundError",
    "CheckpointNotFoundError",
    "InvalidCheckpointPathError",
    "StatePathConflictError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "UnsupportedSchemeError",
    "SaverBusyError",
    "StepAlreadyExistsError",
    "ShapeMismatchError",
    "DTypeMismatchError",
    "CheckpointWriteError",
    "CheckpointPermissionError",
    "BackendUnavailableError",
    "InsufficientDeviceMemoryError",
    "CoordinatorError",
]


class GpuSaverError(Exception):
    """Base class of every error gpusaver raises on purpose."""


class CorruptCheckpointError(GpuSaverError, ValueError):
    """A checkpoint file is malformed, truncated or otherwise unreadable.

    Attributes:
        path: the file that is damaged, when known.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ChecksumError(CorruptCheckpointError):
    """Stored and recomputed crc32c disagree.

    Attributes:
        path: the damaged file.
        tensor: the tensor (or ``None`` for an index block).
        expected: the crc32c stored in the checkpoint (unmasked).
        actual: the crc32c of the bytes read (unmasked).
    """

    def __init__(
        self,
        path: str | None,
        tensor: str | None,
        expected: int,
        actual: int,
        what: str = "data",
    ) -> None:
        where = f"tensor {tensor!r}" if tensor is not None else what
        super().__init__(
            f"checksum mismatch in {path!r} ({where}): expected crc32c "
            f"0x{expected:08x}, got 0x{actual:08x}; the file is corrupt",
            path,
        )
        self.tensor = tensor
        self.expected = expected
        self.actual = actual


class UnsupportedVersionError(CorruptCheckpointError):
    """The checkpoint was written by a newer format version than this reader."""


class UnsupportedDTypeError(GpuSaverError, TypeError, ValueError):
    """A dtype that the V2 format (or this package) cannot store or read."""


class TensorNotFoundError(GpuSaverError, KeyError):
    """A tensor name is not in the checkpoint."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class CheckpointNotFoundError(GpuSaverError, FileNotFoundError):
    """No checkpoint exists at the given path."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(_errno.ENOENT, message)
        self.filename = path

    def __str__(self) -> str:
        return str(self.strerror)


class InvalidCheckpointPathError(CheckpointNotFoundError, ValueError):
    """A path that names no checkpoint, where TensorFlow raises ValueError.

    Both a ``FileNotFoundError`` and a ``ValueError``, so code written for
    either convention catches it.
    """


class StatePathConflictError(GpuSaverError, ValueError, RuntimeError):
    """The ``checkpoint`` state file would overwrite the checkpoint itself."""


class InvalidArgumentError(GpuSaverError, ValueError):
    """An argument gpusaver cannot accept: an empty or unencodable name, the same
    memory under two names, a path that cannot be a checkpoint."""


class UnsupportedSchemeError(InvalidArgumentError):
    """A path is a URL of a scheme gpusaver does not serve (``s3://``, ``gs://``, ...).

    Attributes:
        scheme: the URL's scheme, as spelled.
    """

    def __init__(self, message: str, scheme: str = "") -> None:
        super().__init__(message)
        self.scheme = scheme

    def __reduce__(self):  # type: ignore[no-untyped-def] - picklable with its attribute
        return (type(self), (str(self.args[0]) if self.args else "", self.scheme))


class StepAlreadyExistsError(InvalidArgumentError, FileExistsError):
    """A CheckpointManager's save of a step that exists already, or that is not newer than its newest."""


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type (also a ``TypeError``)."""


class ShapeMismatchError(GpuSaverError, ValueError):
    """A stored tensor's shape does not fit the destination."""


class DTypeMismatchError(GpuSaverError, ValueError):
    """A stored tensor's dtype differs from the destination's."""


class CheckpointWriteError(GpuSaverError, OSError):
    """Writing a checkpoint failed; ``errno`` is the operating system's."""

    def __init__(self, err: int | None, message: str, filename: str | None = None) -> None:
        super().__init__(err, message)
        self.filename = filename

    def __str__(self) -> str:
        code = _errno.errorcode.get(self.errno or 0, "")
        prefix = f"[{code}] " if code else ""
        return f"{prefix}{self.strerror}"


class CheckpointPermissionError(CheckpointWriteError, PermissionError):
    """Writing a checkpoint was not permitted (EACCES, EPERM, EROFS); also a ``PermissionError``."""


def write_error(err: int | None, message: str, filename: str | None = None) -> CheckpointWriteError:
    """A :class:`CheckpointWriteError`, or its :class:`CheckpointPermissionError` kind for permission errnos."""
    if err in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        return CheckpointPermissionError(err, message, filename)
    return CheckpointWriteError(err, message, filename)


class BackendUnavailableError(GpuSaverError, RuntimeError):
    """The requested array backend (e.g. CuPy) cannot run on this machine."""


class InsufficientDeviceMemoryError(GpuSaverError, MemoryError):
    """A restore would not fit in the free memory of a device."""


class SaveTimeoutError(GpuSaverError, TimeoutError):
    """An asynchronous save had not finished within the time its caller waited (it goes on)."""


class SaverBusyError(GpuSaverError, RuntimeError):
    """A Saver was called from inside one of its own calls on the same thread (from a ``progress``
    or ``on_phase`` callback): the outer call holds the Saver until it returns. Calls from other
    threads wait their turn instead."""


class CoordinatorError(GpuSaverError, RuntimeError):
    """The processes (ranks) of a multi-process operation could not finish it together.

    Raised on every rank that takes part: when a rank reports a failure (``rank`` names
    the lowest such rank and ``error_type`` its exception's type; on a rank that failed
    itself ``__cause__`` is its own exception), when a rank dies or leaves, when the ranks
    fall out of step, or when the others do not answer within ``coordinator_timeout``
    seconds (``rank`` is None when no rank can be named).

    Attributes:
        rank: the rank whose failure this reports, or None.
        error_type: the qualified name of that rank's exception type, or None.
    """

    def __init__(self, message: str, rank: int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.error_type = error_type

    def __reduce__(self):  # type: ignore[no-untyped-def] - picklable with its attributes
        return (type(self), (str(self.args[0]) if self.args else "", self.rank, self.error_type))
