"""Reading checkpoints as TensorFlow's ``tf.train.load_checkpoint`` does."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gpusaver.errors import CheckpointNotFoundError, InvalidCheckpointPathError
from gpusaver.format import BundleReader
from gpusaver.format.naming import DATA_SUFFIX_RE
from gpusaver.storage.paths import local_path

__all__ = ["CheckpointReader", "load_checkpoint", "list_variables", "resolve_checkpoint_path"]


def resolve_checkpoint_path(path: str | os.PathLike[str]) -> str:
    """The checkpoint prefix that ``path`` names.

    ``path`` may be a prefix, a directory with a ``checkpoint`` state file, the
    ``.index`` file or one of the data files; a ``file://`` URI of any of them.

    Raises:
        InvalidCheckpointPathError: a directory whose state file names no
            existing checkpoint (a FileNotFoundError and a ValueError).
    """
    from gpusaver.checkpoint_management import latest_checkpoint

    path = os.fspath(path)
    local = local_path(path)
    if os.path.isdir(local) and not os.path.isfile(local + ".index"):
        prefix = latest_checkpoint(path)
        if prefix is None:
            raise InvalidCheckpointPathError(
                f"no checkpoint in directory {path!r}: it has no 'checkpoint' state file naming an "
                "existing checkpoint; pass a checkpoint prefix instead",
                path,
            )
        return prefix
    if not os.path.exists(local + ".index") and os.path.isfile(local):
        if path.endswith(".index"):
            return path[: -len(".index")]
        match = DATA_SUFFIX_RE.search(path)
        if match:
            return path[: match.start()]
    return path


class CheckpointReader:
    """A lazy reader of one checkpoint; each tensor read checks its crc32c.

    Args:
        prefix: the checkpoint prefix.
    """

    def __init__(self, prefix: str) -> None:
        self._bundle = BundleReader(prefix)
        self.prefix = self._bundle.prefix

    @property
    def bundle(self) -> BundleReader:
        """The underlying :class:`~gpusaver.format.BundleReader`."""
        return self._bundle

    def get_tensor(self, name: str, device: int | None = None) -> Any:
        """The tensor's value: a NumPy array, or a CuPy array on GPU ``device`` when given.

        Raises:
            TensorNotFoundError: no such tensor (a KeyError).
            ChecksumError: its bytes do not match their crc32c.
            UnsupportedDTypeError: a dtype gpusaver cannot read, or a valid tensor no NumPy array can
                hold (``[0, 2**61]`` float32, more than 64 dimensions), naming it.
        """
        if device is None:
            return self._bundle.get_tensor(name)
        from gpusaver import backends

        backend = backends.gpu_backend()
        if backend is None:
            raise backends.BackendUnavailableError(
                f"get_tensor({name!r}, device={device}) needs a usable GPU: "
                f"{backends.unavailable_reason() or 'GPUSAVER_BACKEND=numpy'}"
            )
        return backend.read_tensor(self._bundle, name, device)

    def has_tensor(self, name: str) -> bool:
        """True if the checkpoint holds variable ``name``."""
        return self._bundle.has_tensor(name)

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        """Every variable's shape (partitioned variables with their full shape)."""
        return {k: list(e.shape) for k, e in self._bundle.variables().items()}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
        """Every variable's NumPy dtype (``object`` for strings)."""
        from gpusaver.format import dtypes

        return {
            k: dtypes.to_numpy(e.dtype, path=self._bundle.index_path, tensor=k)
            for k, e in self._bundle.variables().items()
        }

    def close(self) -> None:
        self._bundle.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_checkpoint(ckpt_dir_or_file: str | os.PathLike[str]) -> CheckpointReader:
    """Opens a checkpoint: a prefix, or a directory resolved through its ``checkpoint`` file.

    Raises:
        CheckpointNotFoundError: nothing to open (also a ValueError, as in TensorFlow).
        CorruptCheckpointError: a damaged index.
    """
    prefix = resolve_checkpoint_path(ckpt_dir_or_file)
    try:
        return CheckpointReader(prefix)
    except CheckpointNotFoundError as e:
        raise InvalidCheckpointPathError(str(e), prefix) from None


def list_variables(ckpt_dir_or_file: str | os.PathLike[str]) -> list[tuple[str, list[int]]]:
    """``[(name, shape), ...]`` of every variable, sorted by name."""
    with load_checkpoint(ckpt_dir_or_file) as reader:
        return sorted(reader.get_variable_to_shape_map().items())
