"""The host backend: NumPy arrays, written from and read into their own memory."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from gpusaver import config, native
from gpusaver.backends.base import TensorList
from gpusaver.devices import CPU0, DeviceSpec
from gpusaver.errors import ChecksumError, InvalidArgumentError
from gpusaver.format import BundleReader, BundleWriter
from gpusaver.format.tensors import byte_view

__all__ = ["NumpyBackend"]


def _row_chunks(arr: np.ndarray) -> Iterator[tuple[memoryview, None]]:
    """C-order bytes of a non-contiguous array, a few leading-axis rows at a time."""
    if arr.ndim == 0 or arr.shape[0] == 0:
        yield byte_view(np.ascontiguousarray(arr)), None
        return
    row_bytes = max(1, arr[0].size * arr.dtype.itemsize)
    step = max(1, config.get("host_chunk_bytes") // row_bytes)  # contiguous copies of about this size
    for start in range(0, arr.shape[0], step):
        yield byte_view(np.ascontiguousarray(arr[start : start + step])), None


class NumpyBackend:
    """Host arrays; also the path every backend's host staging shares."""

    name = "numpy"

    def owns(self, array: Any) -> bool:
        return isinstance(array, np.ndarray)

    def default_device(self, array: Any) -> DeviceSpec:
        return CPU0  # frozen: one object serves every host array

    def check_device(self, array: Any, device: DeviceSpec) -> None:
        if device.is_gpu:
            raise InvalidArgumentError(
                f"a NumPy array lives in host memory and cannot be placed on {device.short}; "
                "use a CuPy array for a GPU, or a CPU device such as '/cpu:1'"
            )

    def dtype(self, array: Any) -> np.dtype:
        return array.dtype

    def save_group(self, tensors: Sequence[tuple[str, Any]], writer: BundleWriter) -> None:
        listed = tensors if isinstance(tensors, TensorList) else TensorList(tensors)
        checked = listed.key_column
        writer.add_many(
            checked.keys, listed.arrays, fallback=lambda name, arr: self._save_one(name, arr, writer), checked=checked
        )

    @staticmethod
    def _save_one(name: str | bytes, arr: np.ndarray, writer: BundleWriter) -> None:
        """A tensor the batch path does not take: strings, non-contiguous or byte-swapped arrays."""
        name = name.decode("utf-8") if isinstance(name, bytes) else name
        if arr.dtype.kind == "O" or (arr.flags.c_contiguous and arr.dtype.byteorder != ">"):
            writer.add(name, arr)
            return
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        writer.add_raw(name, arr.dtype, arr.shape, _row_chunks(arr))

    def restore_group(self, reader: BundleReader, tensors: Sequence[tuple[str, Any]], *, sequential: bool) -> None:
        """Restores in place. A damaged tensor raises ChecksumError once every other read is
        done: the first damaged one in ``tensors`` order, every tensor before it restored."""
        if native.lib is None or sequential:
            self._restore_each(reader, tensors, sequential)
            return
        listed = tensors if isinstance(tensors, TensorList) else TensorList(tensors)
        cols = reader.columns(listed.keys)
        assert cols is not None
        good = reader.fits(cols, listed.arrays)
        failures: list[ChecksumError] = []
        try:
            reader.read_columns_into(listed.keys, listed.arrays, cols, np.flatnonzero(good))
        except ChecksumError as e:
            failures.append(e)
        if not good.all():
            try:
                self._restore_each(reader, [listed[i] for i in np.flatnonzero(~good)], sequential)
            except ChecksumError as e:
                failures.append(e)
        if failures:
            position = {name: i for i, name in enumerate(listed.names)}
            raise min(failures, key=lambda e: position.get(e.tensor or "", len(position)))

    def _restore_each(self, reader: BundleReader, tensors: Sequence[tuple[str, Any]], sequential: bool) -> None:
        """The general path: any array, any entry (partitioned, strings, big-endian files).

        A damaged tensor does not stop the others: every tensor is read, then the ChecksumError of the
        first damaged one in ``tensors`` order is raised (a damaged tensor read through a staging copy,
        or as strings, keeps its old values; one read in place holds the unverified bytes).
        """
        direct: list[tuple[int, str, Any]] = []  # read straight into the arrays' memory, batched
        failures: list[tuple[int, ChecksumError]] = []
        for position, (name, arr) in enumerate(tensors):
            try:
                entry = reader.entry(name)
                if entry.slices or arr.dtype.kind == "O" or reader.big_endian:
                    arr[...] = reader.get_tensor(name).reshape(arr.shape)
                elif arr.flags.c_contiguous and arr.flags.writeable and arr.dtype.byteorder != ">":
                    try:
                        view = memoryview(arr).cast("B")
                    except (TypeError, ValueError):  # ml_dtypes, zero-size shapes
                        view = byte_view(arr)
                    if sequential:
                        reader.read_into(name, view)
                    else:
                        direct.append((position, name, view))
                else:
                    staged = np.empty(arr.shape, dtype=arr.dtype.newbyteorder("="))
                    reader.read_into(name, byte_view(staged))
                    arr[...] = staged
            except ChecksumError as e:
                failures.append((position, e))
        if direct:
            try:
                reader.read_many_into([(name, view) for _, name, view in direct])
            except ChecksumError as e:  # the first damaged one of the batch, every read done
                failures.append((next((p for p, name, _ in direct if name == e.tensor), len(tensors)), e))
        if failures:
            raise min(failures, key=lambda f: f[0])[1]

    def assign(self, array: Any, value: np.ndarray) -> None:
        array[...] = value

    def check_restore_memory(self, device: DeviceSpec, tensors: Sequence[tuple[str, Any]], reader: BundleReader) -> None:
        return None
