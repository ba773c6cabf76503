"""BundleWriter: one data file and one index, written the way TensorFlow writes them.

Bytes go to disk straight from the arrays' memory: the calling thread hands
buffers to a writer thread and computes their crc32c while the writer thread
writes them. Small tensors are batched into one ``writev``. The data file is
written under a temporary name and renamed, then the index likewise, so the
index appears last.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gpusaver.errors import CheckpointWriteError
from gpusaver.fileops import POSIX, FileOps
from gpusaver.format import crc, dtypes, slices as _slices
from gpusaver.format.entry import BundleEntry, encode_entries, encode_entry, encode_header
from gpusaver.format.naming import data_filename, index_filename
from gpusaver.format.table import TableWriter
from gpusaver.format.tensors import as_host_array, byte_view, encode_strings

__all__ = ["BundleWriter", "os_error"]

_BATCH_BYTES = 4 << 20  # flush a batch of small tensors at this many bytes ...
_BATCH_COUNT = 1024  # ... or this many buffers
_SMALL = 1 << 20  # tensors below this size are batched
_QUEUE_DEPTH = 16


def os_error(e: OSError, what: str, path: str | None) -> CheckpointWriteError:
    """Wraps an OSError, keeping its errno, naming the operation and the file."""
    if isinstance(e, CheckpointWriteError):
        return e
    return CheckpointWriteError(e.errno, f"{what} {path!r} failed: {e.strerror or e}", path)


class _WriterThread:
    """Appends buffers to a file descriptor on a thread of its own, in order."""

    def __init__(self, fileops: FileOps, fd: int, path: str, thread_init: Callable[[], None] | None) -> None:
        self._fileops = fileops
        self._thread_init = thread_init
        self._fd = fd
        self._path = path
        self._queue: "queue.Queue[tuple[list[Any], Callable[[], None] | None] | None]" = queue.Queue(_QUEUE_DEPTH)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gpusaver-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._thread_init is not None:
            try:
                self._thread_init()
            except Exception:  # noqa: BLE001 - placement is a hint, never a failure
                pass
        while True:
            job = self._queue.get()
            if job is None:
                return
            buffers, done = job
            if self.error is None:
                try:
                    self._fileops.write(self._fd, buffers)
                except BaseException as e:  # noqa: BLE001 - reported to the caller
                    self.error = e
            if done is not None:
                try:
                    done()
                except BaseException as e:  # noqa: BLE001
                    if self.error is None:
                        self.error = e

    def submit(self, buffers: list[Any], done: Callable[[], None] | None = None) -> None:
        self.check()
        self._queue.put((buffers, done))

    def check(self) -> None:
        if self.error is not None:
            err = self.error
            if isinstance(err, OSError):
                raise os_error(err, "writing", self._path) from err
            raise err

    def close(self) -> None:
        """Waits for every queued write; raises the first error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.check()


class BundleWriter:
    """Writes one checkpoint bundle: ``prefix.index`` and ``prefix.data-00000-of-00001``.

    Arrays are written from their own memory, possibly after ``add`` returns:
    do not modify them until ``finish`` has returned.

    Example:
        >>> w = BundleWriter("/tmp/ckpt/model")
        >>> w.add("w", np.ones((2, 3), np.float32))
        >>> w.add_slice("part", [10, 4], "0,5:-", np.zeros((5, 4), np.float32))
        >>> w.finish()

    Args:
        prefix: the checkpoint prefix; its directory is created if missing
            (not recursively).
        durable: fsync the files and the directory (on by default).
        fileops: the file operations to use (tests inject faults here).
        thread_init: run first on the writer thread (e.g. to pin it near a GPU).
    """

    def __init__(
        self,
        prefix: str,
        *,
        durable: bool = True,
        fileops: FileOps | None = None,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self.prefix = os.fspath(prefix)
        self._fileops = fileops or POSIX
        self._durable = durable
        # key -> (dtype, shape, offset, size, masked crc32c); encoded when the index is written
        self._entries: dict[bytes, tuple[int, tuple[int, ...], int, int, int]] = {}
        self._sliced: dict[bytes, BundleEntry] = {}
        self._offset = 0
        self._batch: list[Any] = []
        self._batch_bytes = 0
        self._finished = False
        self._data_path = data_filename(self.prefix, 0, 1)
        self._tmp_data = f"{self._data_path}.tempstate{uuid.uuid4().int & ((1 << 63) - 1)}"
        self._tmp_index: str | None = None
        directory = os.path.dirname(self.prefix)
        if directory and not os.path.isdir(directory):
            try:
                self._fileops.mkdir(directory)
            except FileExistsError:
                pass
            except OSError as e:
                raise os_error(e, "creating directory", directory) from e
        try:
            self._fd: int | None = self._fileops.create(self._tmp_data)
        except OSError as e:
            raise os_error(e, "creating", self._tmp_data) from e
        self._writer = _WriterThread(self._fileops, self._fd, self._tmp_data, thread_init)

    # ------------------------------------------------------------------ adding
    def _key(self, name: str | bytes) -> bytes:
        if self._finished:
            raise ValueError(f"BundleWriter for {self.prefix!r} is already finished")
        key = name.encode("utf-8") if isinstance(name, str) else bytes(name)
        if not key:
            raise ValueError("a tensor name must not be empty (the empty key holds the header)")
        if key in self._entries or key in self._sliced:
            raise ValueError(f"duplicate tensor name {key.decode('utf-8', 'replace')!r}")
        return key

    def _flush_batch(self) -> None:
        if self._batch:
            self._writer.submit(self._batch)
            self._batch, self._batch_bytes = [], 0

    def _write(self, view: memoryview) -> int:
        """Queues ``view`` for writing at the current offset; returns that offset."""
        offset = self._offset
        n = len(view)
        self._offset += n
        if n == 0:
            return offset
        if n < _SMALL:
            self._batch.append(view)
            self._batch_bytes += n
            if self._batch_bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_COUNT:
                self._flush_batch()
        else:
            self._flush_batch()
            self._writer.submit([view], None)
        return offset

    def _add_array(self, key: bytes, arr: np.ndarray, name: str) -> tuple[int, tuple[int, ...], int, int, int]:
        dtype_enum = dtypes.from_numpy(arr.dtype, tensor=name)
        if dtype_enum == dtypes.DT_STRING:
            data, checksum = encode_strings(arr, name)
            view = memoryview(data)
            offset = self._write(view)
        else:
            view = byte_view(arr)  # the views keep their arrays alive until written
            offset = self._write(view)
            checksum = crc.value(view)  # runs while the writer thread writes
        return dtype_enum, tuple(arr.shape), offset, len(view), checksum

    def add(self, name: str, array: Any) -> None:
        """Appends a tensor (a NumPy array, or an object array of bytes for strings)."""
        key = self._key(name)
        arr = as_host_array(array, name)
        dtype_enum, shape, offset, size, checksum = self._add_array(key, arr, name)
        self._entries[key] = (dtype_enum, shape, offset, size, crc.mask(checksum))

    def add_many(self, names: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
        """Appends many tensors; the same result as :meth:`add` for each, with less overhead.

        Arrays that are numeric, C-contiguous and little-endian take a fast path
        (one buffer view and one crc32c call each); the others go through :meth:`add`.
        """
        if self._finished:
            raise ValueError(f"BundleWriter for {self.prefix!r} is already finished")
        entries, sliced = self._entries, self._sliced
        keys = [n.encode("utf-8") if isinstance(n, str) else bytes(n) for n in names]
        if len(set(keys)) != len(keys) or any(k in entries or k in sliced or not k for k in keys):
            for name, arr in zip(names, arrays):  # the slow path names the offending tensor
                self.add(name, arr)
            return
        enums: dict[np.dtype, int] = {}
        checksum_of = crc.value
        masked = crc.mask
        batch, batch_bytes = self._batch, self._batch_bytes
        offset = self._offset
        for name, key, arr in zip(names, keys, arrays):
            dt = arr.dtype
            enum = enums.get(dt)
            if enum is None:
                enum = enums[dt] = -1 if dt.kind in "OSU" or dt.byteorder == ">" else dtypes.from_numpy(dt, tensor=name)
            if enum < 0 or not arr.flags.c_contiguous:
                self._batch, self._batch_bytes, self._offset = batch, batch_bytes, offset
                self.add(name, arr)
                batch, batch_bytes, offset = self._batch, self._batch_bytes, self._offset
                continue
            try:
                view = memoryview(arr).cast("B")
            except (TypeError, ValueError):  # ml_dtypes, zero-size shapes
                view = byte_view(arr)
            n = len(view)
            entries[key] = (enum, arr.shape, offset, n, masked(checksum_of(view)))
            offset += n
            if n:
                batch.append(view)
                batch_bytes += n
                if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_COUNT:
                    self._writer.submit(batch)
                    batch, batch_bytes = [], 0
        self._batch, self._batch_bytes, self._offset = batch, batch_bytes, offset

    def add_raw(
        self,
        name: str,
        dtype: Any,
        shape: Sequence[int],
        chunks: Iterable[tuple[Any, Callable[[], None] | None]],
        crc32c: int | None = None,
    ) -> None:
        """Appends a tensor given as raw little-endian byte chunks (for device backends).

        Args:
            name: the tensor's name.
            dtype: its NumPy dtype (numeric types only).
            shape: its shape.
            chunks: ``(buffer, done)`` pairs in order; ``done`` (or None) is
                called once the buffer is written, so a staging buffer can be reused.
            crc32c: the unmasked crc32c of all the bytes, when already known
                (computed on the device); otherwise it is computed here.
        """
        key = self._key(name)
        dtype_enum = dtypes.from_numpy(dtype, tensor=name)
        if dtype_enum == dtypes.DT_STRING:
            raise ValueError("add_raw takes numeric tensors; use add() for strings")
        self._flush_batch()
        offset = self._offset
        running = 0
        for buf, done in chunks:
            view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
            self._offset += len(view)
            self._writer.submit([view], done)
            if crc32c is None:
                running = crc.extend(running, view)
        size = self._offset - offset
        expect = int(np.dtype(dtype).itemsize) * int(np.prod(shape, dtype=np.int64))
        if size != expect:
            raise ValueError(f"tensor {name!r}: got {size} bytes for shape {tuple(shape)} of {np.dtype(dtype)}")
        checksum = running if crc32c is None else crc32c
        self._entries[key] = (dtype_enum, tuple(shape), offset, size, crc.mask(checksum))

    def add_slice(self, name: str, full_shape: Sequence[int], slice_spec: str, array: Any) -> None:
        """Appends one slice of a partitioned tensor.

        Args:
            name: the full tensor's name.
            full_shape: the full tensor's shape.
            slice_spec: TensorFlow's slice form, e.g. ``"0,5:-"``.
            array: the slice's values; its shape must be the slice's shape.
        """
        if self._finished:
            raise ValueError(f"BundleWriter for {self.prefix!r} is already finished")
        full_shape = [int(d) for d in full_shape]
        extents = _slices.parse_slice_spec(slice_spec)
        _slices.check_fits(full_shape, extents, f"slice {slice_spec!r} of {name!r}")
        arr = as_host_array(array, name)
        want = _slices.slice_shape(full_shape, extents)
        if list(arr.shape) != want:
            raise ValueError(
                f"slice {slice_spec!r} of {name!r} has shape {want} but the array's shape is {list(arr.shape)}"
            )
        if _slices.is_full(full_shape, extents):
            self.add(name, arr)
            return
        key = name.encode("utf-8")
        if key in self._entries:
            raise ValueError(f"duplicate tensor name {name!r}: already added unsliced")
        dtype_enum = dtypes.from_numpy(arr.dtype, tensor=name)
        full = self._sliced.get(key)
        if full is None:
            full = self._sliced[key] = BundleEntry(dtype_enum, tuple(full_shape))
        elif full.dtype != dtype_enum or list(full.shape) != full_shape:
            raise ValueError(
                f"slices of {name!r} disagree: {dtypes.dtype_name(full.dtype)} {list(full.shape)} "
                f"vs {dtypes.dtype_name(dtype_enum)} {full_shape}"
            )
        if list(extents) in full.slices:
            raise ValueError(f"slice {slice_spec!r} of {name!r} was already added")
        slice_key = _slices.encode_slice_key(key, extents)
        _, shape, offset, size, checksum = self._add_array(slice_key, arr, name)
        full.slices.append(list(extents))
        self._entries[slice_key] = (dtype_enum, shape, offset, size, crc.mask(checksum))

    # --------------------------------------------------------------- finishing
    @property
    def num_tensors(self) -> int:
        return len(self._entries) + len(self._sliced)

    @property
    def data_path(self) -> str:
        """The data file (its final name, once :meth:`finish` has renamed it)."""
        return self._data_path

    def index_items(self, shard_id: int = 0, header: bool = True) -> list[tuple[bytes, bytes]]:
        """The index's sorted ``(key, value)`` pairs, header first.

        Args:
            shard_id: the data file id the entries name (non-zero when this
                bundle becomes shard ``shard_id`` of a merged checkpoint).
            header: include the header entry.
        """
        entries = dict(zip(self._entries, encode_entries(self._entries.values(), shard_id)))
        for key, full in self._sliced.items():
            entries[key] = encode_entry(full.dtype, full.shape, shard_id, slices=full.slices)
        items = sorted(entries.items())
        return ([(b"", encode_header(1))] if header else []) + items

    def finish(self, write_index: bool = True) -> None:
        """Writes everything out: data file (fsynced, renamed), then the index, last.

        Args:
            write_index: False when the caller merges this bundle from memory
                (see :func:`gpusaver.format.merge.commit_merged`) and needs no index file.
        """
        if self._finished:
            raise ValueError(f"BundleWriter for {self.prefix!r} is already finished")
        ops = self._fileops
        try:
            self._flush_batch()
            self._writer.close()
            fd, self._fd = self._fd, None
            assert fd is not None
            try:
                if self._durable:
                    ops.fsync(fd)
            finally:
                ops.close(fd)
            ops.rename(self._tmp_data, self._data_path)
            self._tmp_data = ""
            if write_index:
                self._write_index(self.index_items())
            if self._durable:
                ops.fsync_dir(os.path.dirname(self.prefix) or ".")
        except OSError as e:
            self.abort()
            raise os_error(e, "writing checkpoint", self.prefix) from e
        except BaseException:
            self.abort()
            raise
        self._finished = True

    def _write_index(self, items: list[tuple[bytes, bytes]]) -> None:
        ops = self._fileops
        path = index_filename(self.prefix)
        self._tmp_index = f"{path}.tempstate{uuid.uuid4().int & ((1 << 63) - 1)}"
        parts: list[bytes] = []
        writer = TableWriter(parts.append)
        writer.add_all(items)
        writer.finish()
        fd = ops.create(self._tmp_index)
        try:
            ops.write(fd, [memoryview(b"".join(parts))])
            if self._durable:
                ops.fsync(fd)
        finally:
            ops.close(fd)
        ops.rename(self._tmp_index, path)
        self._tmp_index = None

    def abort(self) -> None:
        """Stops writing and removes the temporary files; nothing is committed."""
        self._finished = True
        try:
            self._writer.close()
        except BaseException:  # noqa: BLE001 - already failing
            pass
        if self._fd is not None:
            try:
                self._fileops.close(self._fd)
            except OSError:
                pass
            self._fd = None
        for path in (self._tmp_data, self._tmp_index):
            if path:
                try:
                    self._fileops.remove(path)
                except OSError:
                    pass

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._finished:
                self.finish()
        else:
            self.abort()
