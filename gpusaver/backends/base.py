"""The interface every array backend implements, and the pieces they share.

A backend moves one device group's bytes between its memory and the format
layer: on save it streams the tensors into a :class:`~gpusaver.format.BundleWriter`
(host arrays as zero-copy views; device arrays through pinned host staging
buffers with asynchronous copies), on restore it reads tensors from a
:class:`~gpusaver.format.BundleReader` straight into the destination arrays.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from gpusaver.devices import DeviceSpec
from gpusaver.format import BundleReader, BundleWriter

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
