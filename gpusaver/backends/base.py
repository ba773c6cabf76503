"""The interface every array backend implements, and the pieces they share.

A backend moves one device group's bytes between its memory and the format
layer: on save it streams the tensors into a :class:`~gpusaver.format.BundleWriter`
(host arrays as zero-copy views; device arrays through pinned host staging
buffers with asynchronous copies), on restore it reads tensors from a
:class:`~gpusaver.format.BundleReader` straight into the destination arrays.
"""

from __future__ import annotations

import itertools
from functools import cached_property
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from gpusaver.devices import DeviceSpec
from gpusaver.format import BundleReader, BundleWriter, dtypes

__all__ = ["Backend", "Tensor", "TensorList"]

#: ``(checkpoint key, array)``
Tensor = tuple[str, Any]


class TensorList(list):  # type: ignore[type-arg]
    """A group's ``(name, array)`` pairs, with their columns cached for batch paths.

    A Saver's variables are fixed when it is built, so each group makes this
    list once and every save and restore reuses its names, encoded keys and arrays.
    """

    def __init__(self, pairs: Iterable[Tensor]) -> None:
        super().__init__(pairs)
        #: position -> the dtype to save where the array holds a same-size integer stand-in for it
        self.logical: dict[int, np.dtype] = {}

    @cached_property
    def names(self) -> list[str]:
        return [name for name, _ in self]

    @cached_property
    def keys(self) -> list[bytes]:  # type: ignore[override]
        return [name.encode("utf-8") for name, _ in self]

    @cached_property
    def key_column(self) -> Any:
        """The keys checked once (unique, non-empty) and their sorted order: a ``KeyColumn``."""
        from gpusaver.format.writer import KeyColumn

        return KeyColumn(self.keys)

    @cached_property
    def arrays(self) -> list[Any]:
        return [array for _, array in self]


@runtime_checkable
class Backend(Protocol):
    """What the pipeline needs from an array library."""

    name: str

    def owns(self, array: Any) -> bool:
        """True if ``array`` is this backend's array type."""

    def default_device(self, array: Any) -> DeviceSpec:
        """Where ``array`` lives (NumPy: ``/cpu:0``; CuPy: ``/gpu:<id>``)."""

    def check_device(self, array: Any, device: DeviceSpec) -> None:
        """Raises ValueError unless ``array`` may be placed on ``device``."""

    def dtype(self, array: Any) -> np.dtype:
        """The array's NumPy dtype."""

    def save_group(self, tensors: Sequence[Tensor], writer: BundleWriter) -> None:
        """Streams the group's tensors, in order, into ``writer``."""

    def restore_group(self, reader: BundleReader, tensors: Sequence[Tensor], *, sequential: bool) -> None:
        """Reads each tensor's stored value into the array, in place, verifying checksums.

        The caller has already checked names, dtypes and shapes.
        """

    def assign(self, array: Any, value: np.ndarray) -> None:
        """Writes the host array ``value`` (same shape and dtype) into ``array`` in place."""
        ...

    def check_restore_memory(self, device: DeviceSpec, tensors: Sequence[Tensor], reader: BundleReader) -> None:
        """Raises InsufficientDeviceMemoryError, before any copy, if restoring needs
        more new device memory (staging, temporaries) than is free."""


def describe(arrays: Sequence[Any], logical: Mapping[int, np.dtype] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(enums, ndims, dims)`` of arrays the C extension cannot inspect (device arrays), as its
    ``describe`` gives them for NumPy's: TensorFlow dtype codes (int32, -1 where there is none), ranks
    (int32) and every array's dimensions back to back (int64). ``logical`` maps a position to the
    dtype to use instead of the array's own (the dtype a same-size integer stand-in holds the bits of)."""
    codes: dict[Any, int] = {}

    def code(dt: Any) -> int:
        c = codes.get(dt)
        if c is None:
            try:
                c = dtypes.from_numpy(np.dtype(dt))
            except Exception:  # noqa: BLE001 - the caller's checks name what is wrong
                c = -1
            codes[dt] = c
        return c

    n = len(arrays)
    enums = np.fromiter((code(a.dtype) for a in arrays), np.int32, n)
    for i, dt in (logical or {}).items():
        enums[i] = code(dt)
    shapes = [a.shape for a in arrays]
    ndims = np.fromiter(map(len, shapes), np.int32, n)
    dims = np.fromiter(itertools.chain.from_iterable(shapes), np.int64, int(ndims.sum()))
    return enums, ndims, dims
