"""BundleWriter: one data file and one index, written the way TensorFlow writes them.

Bytes go to disk straight from the arrays' memory. The calling thread lays
the tensors out (each one's file offset is known when it is added) and hands
them to a pool of writer threads, one per CPU, which checksum each tensor a
cache-sized segment at a time and write it at its offset (``pwrite``); small
tensors travel in batches written with one ``pwritev``. The data file is
written under a temporary name and renamed, then the index likewise, so the
index appears last.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gpusaver import config, native
from gpusaver.errors import InvalidArgumentError, InvalidArgumentTypeError
from gpusaver.storage import POSIX, FileOps, Pack, Piece, WriterPool, os_error
from gpusaver.format import crc, dtypes, slices as _slices
from gpusaver.format.entry import BundleEntry, encode_entries, encode_entry, encode_header
from gpusaver.format.naming import data_filename, index_filename
from gpusaver.format.table import BLOCK_SIZE, encode_table
from gpusaver.format.tensors import as_host_array, byte_view, encode_strings
from gpusaver.storage.paths import local_path

__all__ = ["BundleWriter", "KeyColumn", "os_error"]

# The sizes (small_bytes, batch_bytes, batch_count, segment_bytes, pack_limit, pack_bytes) and the
# thread count are settings (gpusaver.config), read when a writer is made.


def encode_name(name: Any) -> bytes:
    """A tensor name's key: its UTF-8 bytes.

    Raises:
        InvalidArgumentError: a str that UTF-8 cannot encode (a lone surrogate).
        InvalidArgumentTypeError: neither str nor bytes.
    """
    if isinstance(name, str):
        try:
            return name.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgumentError(
                f"tensor name {name!r} cannot be encoded as UTF-8 ({e.reason} at position {e.start})"
            ) from None
    if isinstance(name, (bytes, bytearray, memoryview)):
        return bytes(name)
    raise InvalidArgumentTypeError(f"a tensor name is a str or bytes, not {type(name).__name__}")


class KeyColumn:
    """Tensor keys checked once for many saves of the same tensors (a Saver's).

    ``keys``: a copy of the keys, its own (a writer's index reads them after ``add_many`` returns);
    ``valid``: all bytes, none empty, no two alike (a writer then skips those checks);
    ``order``: the positions that sort them (None: in order already). Pass it to
    :meth:`BundleWriter.add_many` as ``checked``, with ``checked.keys`` as the names.
    """

    __slots__ = ("keys", "set", "valid", "order")

    def __init__(self, keys: Sequence[bytes]) -> None:
        keys = self.keys = list(keys)
        typed = all(type(k) is bytes for k in keys)
        self.set: frozenset[bytes] = frozenset(keys) if typed else frozenset()
        self.valid = typed and len(self.set) == len(keys) and b"" not in self.set
        self.order: np.ndarray | None = None
        if self.valid and any(a > b for a, b in zip(keys, keys[1:])):
            self.order = np.array(sorted(range(len(keys)), key=keys.__getitem__), np.int64)


class _Run:
    """Tensors added in one batch through the C extension: their layout as arrays.

    ``big`` lists ``(index, crc slot)`` of the tensors written from their own
    memory (too large to pack), whose crc32c the writer pool computes into a slot.
    """

    __slots__ = ("keys", "enums", "sizes", "ndims", "dims", "offsets", "crcs", "big", "order")

    def __init__(
        self,
        keys: list[bytes],
        enums: np.ndarray,
        sizes: np.ndarray,
        ndims: np.ndarray,
        dims: np.ndarray,
        base: int,
        order: np.ndarray | None = None,
    ) -> None:
        self.keys, self.enums, self.sizes, self.ndims, self.dims = keys, enums, sizes, ndims, dims
        self.order = order  # the positions that sort keys (None: unknown, maybe in order)
        self.offsets = np.empty(len(keys), np.int64)
        if len(keys):
            self.offsets[0] = base
            np.cumsum(sizes[:-1], out=self.offsets[1:])
            self.offsets[1:] += base
        self.crcs = np.zeros(len(keys), np.uint32)
        self.big: list[tuple[int, int]] = []  # (position, crc slot) of the tensors written from their own memory


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
        thread_init: run first on each writer thread (e.g. to pin it near a GPU).
        progress: a :class:`gpusaver.progress.Progress` counting the bytes written.
    """

    def __init__(
        self,
        prefix: str,
        *,
        durable: bool = True,
        fileops: FileOps | None = None,
        thread_init: Callable[[], None] | None = None,
        progress: Any = None,
    ) -> None:
        self.prefix = local_path(prefix)
        self._fileops = fileops or POSIX
        self._small = config.get("small_bytes")
        self._batch_limit = config.get("batch_bytes")
        self._batch_count = config.get("batch_count")
        self._pack_limit = config.get("pack_limit")
        self._pack_bytes = config.get("pack_bytes")
        self._durable = durable
        # key -> (dtype, shape, offset, size, crc slot); encoded when the index is written
        self._entries: dict[bytes, tuple[int, tuple[int, ...], int, int, int]] = {}
        self._sliced: dict[bytes, BundleEntry] = {}
        self._lib = native.lib  # the C extension, or None: fixed for this writer's life
        self._runs: list[_Run] = []  # batches laid out by the C extension
        self._run_keys: set[bytes] | frozenset[bytes] = set()
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
        self._drained = False
        self._prepared: tuple[bytes, int, bytearray, np.ndarray, np.ndarray] | None = None  # see prepare_index
        self._fsync_seconds = 0.0
        self._crcs: list[int] = []  # running crc32c of each tensor, filled in by the writer threads
        self._writer = WriterPool(self._fileops, self._fd, self._tmp_data, thread_init, self._crcs, progress)

    # ------------------------------------------------------------------ adding
    def _key(self, name: str | bytes) -> bytes:
        if self._finished:
            raise InvalidArgumentError(f"BundleWriter for {self.prefix!r} is already finished")
        key = encode_name(name)
        if not key:
            raise InvalidArgumentError("a tensor name must not be empty (the empty key holds the header)")
        if key in self._entries or key in self._sliced or key in self._run_keys:
            raise InvalidArgumentError(f"duplicate tensor name {key.decode('utf-8', 'replace')!r}")
        return key

    def _flush_batch(self) -> None:
        if self._batch:
            self._writer.submit(self._offset - self._batch_bytes, self._batch)
            self._batch, self._batch_bytes = [], 0

    def _slot(self, value: int = 0) -> int:
        """A new crc slot holding ``value``."""
        self._crcs.append(value)
        return len(self._crcs) - 1

    def _write(self, view: memoryview, slot: int) -> int:
        """Queues ``view`` (checksummed into ``slot`` unless -1) at the current offset; returns that offset."""
        n = len(view)
        if n >= self._small:
            # The pending batch ends at the current offset: queue it before moving past it.
            self._flush_batch()
        offset = self._offset
        self._offset += n
        if n == 0:
            return offset
        if n < self._small:
            self._batch.append((slot, view))
            self._batch_bytes += n
            if self._batch_bytes >= self._batch_limit or len(self._batch) >= self._batch_count:
                self._flush_batch()
        else:
            self._writer.submit(offset, [(slot, view)], None)
        return offset

    def _add_array(self, key: bytes, arr: np.ndarray, name: str) -> tuple[int, tuple[int, ...], int, int, int]:
        dtype_enum = dtypes.from_numpy(arr.dtype, tensor=name)
        if dtype_enum == dtypes.DT_STRING:
            data, checksum = encode_strings(arr, name)
            view = memoryview(data)
            slot = self._slot(checksum)
            offset = self._write(view, -1)
        else:
            view = byte_view(arr)  # the views keep their arrays alive until written
            slot = self._slot()
            offset = self._write(view, slot)  # a writer thread checksums it
        return dtype_enum, tuple(arr.shape), offset, len(view), slot

    def add(self, name: str, array: Any) -> None:
        """Appends a tensor (a NumPy array, or an object array of bytes for strings)."""
        key = self._key(name)
        arr = as_host_array(array, name)
        self._entries[key] = self._add_array(key, arr, name)

    def add_many(
        self,
        names: Sequence[str | bytes],
        arrays: Sequence[Any],
        fallback: Callable[[str, Any], None] | None = None,
        *,
        checked: KeyColumn | None = None,
    ) -> None:
        """Appends many tensors; the same result as :meth:`add` for each, with less overhead.

        Arrays that are numeric, C-contiguous and native-order take a fast path
        (with the C extension: laid out as one batch, small ones packed and
        checksummed by the writer threads); the others go to ``fallback(name,
        array)`` (default :meth:`add`), in order. ``checked``: the names' keys,
        checked once for many saves (``names`` must be ``checked.keys``).
        """
        if self._finished:
            raise InvalidArgumentError(f"BundleWriter for {self.prefix!r} is already finished")
        order = None
        fresh: frozenset[bytes] | set[bytes]
        if (
            checked is not None
            and checked.valid
            and checked.keys is names
            and len(names) == len(arrays)
            and not (self._run_keys or self._entries or self._sliced)
        ):
            keys, fresh, clash, order = checked.keys, checked.set, False, checked.order
        else:
            # Savers pass their names encoded already: take bytes as they are, cheaply.
            try:
                keys = [n if type(n) is bytes else n.encode("utf-8") if isinstance(n, str) else bytes(n) for n in names]
            except (UnicodeEncodeError, TypeError):
                keys = [encode_name(n) for n in names]  # raises, naming the culprit
            fresh = set(keys)
            clash = (
                len(fresh) != len(keys)
                or b"" in fresh
                or not fresh.isdisjoint(self._run_keys)
                or not fresh.isdisjoint(self._entries)
                or not fresh.isdisjoint(self._sliced)
            )
        add = fallback or self._add_named
        if clash:
            for name, arr in zip(names, arrays):  # the slow path names the offending tensor
                self.add(name, arr)
            return
        if self._lib is None:
            self._add_many_py(names, keys, arrays, add)
            return
        cols = self._lib.describe(arrays, native.type_codes())
        if not (cols[0] < 0).any():
            self._add_run(keys, arrays, *cols, register=False, order=order)
            self._register_keys(fresh)
            return
        self._add_split(names, keys, arrays, cols, add)

    def _register_keys(self, keys: frozenset[bytes] | set[bytes]) -> None:
        """Notes the keys of runs just added (for the duplicate checks of later additions)."""
        if not self._run_keys:
            self._run_keys = keys  # the first run: its set, not a copy (a save adds one run of 100k names)
        else:
            if not isinstance(self._run_keys, set):  # a caller's frozenset: never changed here
                self._run_keys = set(self._run_keys)
            self._run_keys.update(keys)

    def _add_split(
        self, names: Sequence[Any], keys: list[bytes], arrays: Sequence[Any], cols: tuple[np.ndarray, ...],
        add: Callable[[Any, Any], None],
    ) -> None:
        """Tensors the C extension described, some refused (``enums < 0``): the runs between
        those as runs, each refused one through ``add``, in order."""
        enums, sizes, ndims, dims = cols
        refused = np.flatnonzero(enums < 0)
        dim_at = np.zeros(len(keys) + 1, np.int64)
        np.cumsum(ndims, out=dim_at[1:])
        start = 0
        for stop in list(refused) + [len(keys)]:
            if stop > start:
                self._add_run(
                    keys[start:stop], arrays[start:stop], enums[start:stop], sizes[start:stop],
                    ndims[start:stop], dims[dim_at[start] : dim_at[stop]],
                )
            if stop < len(keys):
                add(names[stop], arrays[stop])
            start = stop + 1

    def _add_named(self, name: str | bytes, arr: Any) -> None:
        self.add(name.decode("utf-8") if isinstance(name, bytes) else name, arr)

    def _add_run(
        self,
        keys: list[bytes],
        arrays: Sequence[np.ndarray],
        enums: np.ndarray,
        sizes: np.ndarray,
        ndims: np.ndarray,
        dims: np.ndarray,
        register: bool = True,
        order: np.ndarray | None = None,
    ) -> None:
        """Lays out a batch the C extension described, and queues its writes (``order``: the positions
        that sort ``keys``). Its keys are noted for the duplicate checks unless ``register`` is False
        (the caller notes them itself, with :meth:`_register_keys`)."""
        self._flush_batch()
        arrays = list(arrays)
        run = _Run(keys, enums, sizes, ndims, dims, self._offset, order)
        self._runs.append(run)
        if register:
            self._register_keys(set(keys))
        n = len(keys)
        big = np.flatnonzero(sizes >= self._pack_limit)
        start = 0
        for stop in list(big) + [n]:
            if stop > start:  # small tensors: packed jobs of about pack_bytes each
                ends = np.cumsum(sizes[start:stop])
                group = (ends - 1) // self._pack_bytes
                cuts = [start] + list(np.flatnonzero(group[1:] != group[:-1]) + 1 + start) + [stop]
                for a, b in zip(cuts, cuts[1:]):
                    self._writer.submit(int(run.offsets[a]), Pack(self._lib, arrays, a, b, run.crcs))
            if stop < n:  # a large tensor: written from its own memory, in segments
                slot = self._slot()
                run.big.append((stop, slot))
                self._writer.submit(int(run.offsets[stop]), [(slot, byte_view(arrays[stop]))])
            start = stop + 1
        if n:
            self._offset = int(run.offsets[-1] + sizes[-1])

    def _add_many_py(
        self, names: Sequence[Any], keys: list[bytes], arrays: Sequence[Any], add: Callable[[Any, Any], None]
    ) -> None:
        """add_many without the C extension: one buffer view and one queued piece per tensor."""
        entries = self._entries
        enums: dict[np.dtype, int] = {}
        crcs = self._crcs
        batch, batch_bytes = self._batch, self._batch_bytes
        offset = self._offset
        for name, key, arr in zip(names, keys, arrays):
            dt = getattr(arr, "dtype", None)
            enum = enums.get(dt) if isinstance(dt, np.dtype) else -1
            if enum is None:
                enum = enums[dt] = -1 if dt.kind in "OSU" or dt.byteorder == ">" else dtypes.from_numpy(dt, tensor=name)
            if enum < 0 or not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
                self._batch, self._batch_bytes, self._offset = batch, batch_bytes, offset
                add(name, arr)
                batch, batch_bytes, offset = self._batch, self._batch_bytes, self._offset
                continue
            try:
                view = memoryview(arr).cast("B")
            except (TypeError, ValueError):  # ml_dtypes, zero-size shapes
                view = byte_view(arr)
            n = len(view)
            slot = len(crcs)
            crcs.append(0)
            entries[key] = (enum, arr.shape, offset, n, slot)
            offset += n
            if n:
                batch.append((slot, view))
                batch_bytes += n
                if batch_bytes >= self._batch_limit or len(batch) >= self._batch_count:
                    self._writer.submit(offset - batch_bytes, batch)
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
                called once the buffer is written (or, on failure, dropped), so a
                staging buffer can be reused. A generator is closed on the way out.
            crc32c: the unmasked crc32c of all the bytes, when already known
                (computed on the device); otherwise it is computed here.
        """
        key = self._key(name)
        dtype_enum = dtypes.from_numpy(dtype, tensor=name)
        if dtype_enum == dtypes.DT_STRING:
            raise InvalidArgumentError("add_raw takes numeric tensors; use add() for strings")
        self._flush_batch()
        offset = self._offset
        slot = self._slot(crc32c or 0)
        try:
            for buf, done in chunks:
                view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
                try:
                    if crc32c is None:  # chunks may be written concurrently: checksum them in order here
                        self._crcs[slot] = crc.extend(self._crcs[slot], view)
                    self._writer.submit(self._offset, [(-1, view)], done)
                except BaseException:
                    if done is not None:
                        done()  # the buffer was never queued: hand it back
                    raise
                self._offset += len(view)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a generator gives back the buffers it still holds
        size = self._offset - offset
        expect = int(np.dtype(dtype).itemsize) * int(np.prod(shape, dtype=np.int64))
        if size != expect:
            raise InvalidArgumentError(f"tensor {name!r}: got {size} bytes for shape {tuple(shape)} of {np.dtype(dtype)}")
        self._entries[key] = (dtype_enum, tuple(shape), offset, size, slot)

    def add_packed(
        self,
        tensors: Sequence[tuple[str, Any, Sequence[int], Any, int | None]],
        done: Callable[[], None] | None = None,
    ) -> None:
        """Appends tensors whose bytes lie back to back in one staging buffer, written as one run.

        Args:
            tensors: ``(name, dtype, shape, bytes, crc32c or None)`` each, numeric
                only; the buffers are written in order, contiguously.
            done: called once all of them are written (or dropped on failure),
                so the staging buffer can be reused.
        """
        try:
            keys = [self._key(name) for name, *_ in tensors]
            if len(set(keys)) != len(keys):
                raise InvalidArgumentError("duplicate tensor names in one packed run")
            self._flush_batch()
            start = offset = self._offset
            pieces: list[Piece] = []
            for key, (name, dtype, shape, buf, checksum) in zip(keys, tensors):
                dtype_enum = dtypes.from_numpy(dtype, tensor=name)
                view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
                expect = int(np.dtype(dtype).itemsize) * int(np.prod(shape, dtype=np.int64))
                if len(view) != expect:
                    raise InvalidArgumentError(f"tensor {name!r}: got {len(view)} bytes for shape {tuple(shape)} of {np.dtype(dtype)}")
                slot = self._slot(checksum or 0)
                pieces.append((slot if checksum is None else -1, view))
                self._entries[key] = (dtype_enum, tuple(shape), offset, len(view), slot)
                offset += len(view)
            self._offset = offset
            self._writer.submit(start, pieces, done)
        except BaseException:
            if done is not None:
                done()  # never queued: hand the buffer back
            raise

    def add_packed_run(
        self,
        keys: list[bytes],
        enums: np.ndarray,
        sizes: np.ndarray,
        ndims: np.ndarray,
        dims: np.ndarray,
        crcs: np.ndarray,
        buf: Any,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Appends tensors described by arrays, their bytes back to back in ``buf``: one write, no
        Python object per tensor (for a device backend's many small tensors; needs the C extension).

        Args:
            keys: the names, UTF-8 encoded.
            enums, sizes, ndims, dims: dtype codes (int32), byte sizes (int64), ranks (int32) and every
                tensor's dimensions back to back (int64), as ``_native.describe`` gives them.
            crcs: each tensor's unmasked crc32c (uint32), computed by the caller.
            buf: ``sizes.sum()`` bytes.
            done: called once ``buf`` is written (or dropped on failure).
        """
        try:
            if self._lib is None:
                raise InvalidArgumentError("add_packed_run needs gpusaver's C extension; use add_packed")
            if self._finished:
                raise InvalidArgumentError(f"BundleWriter for {self.prefix!r} is already finished")
            fresh = set(keys)
            if (
                len(fresh) != len(keys)
                or b"" in fresh
                or not fresh.isdisjoint(self._run_keys)
                or not fresh.isdisjoint(self._entries)
                or not fresh.isdisjoint(self._sliced)
            ):
                for key in keys:  # names the offending tensor
                    self._key(key)
                    fresh.discard(key)
                raise InvalidArgumentError("duplicate tensor names in one packed run")
            sizes = np.ascontiguousarray(sizes, np.int64)
            enums = np.ascontiguousarray(enums, np.int32)
            ndims = np.ascontiguousarray(ndims, np.int32)
            dims = np.ascontiguousarray(dims, np.int64)
            if len(ndims) != len(keys) or len(enums) != len(keys) or len(sizes) != len(keys) or int(ndims.sum()) != len(dims):
                raise InvalidArgumentError("add_packed_run: keys, enums, sizes, ndims and dims do not describe the same tensors")
            if np.any(dims < 0):
                raise InvalidArgumentError("add_packed_run: a negative dimension")
            counts = np.ones(len(keys), np.int64)
            np.multiply.at(counts, np.repeat(np.arange(len(keys)), ndims), dims)
            itemsizes = np.zeros(len(keys), np.int64)
            for enum in set(enums.tolist()):  # not np.unique: it imports numpy.ma on first use
                itemsizes[enums == enum] = dtypes.to_numpy(enum).itemsize
            bad = np.flatnonzero(counts * itemsizes != sizes)
            if len(bad):
                i = int(bad[0])
                raise InvalidArgumentError(
                    f"tensor {keys[i].decode('utf-8', 'replace')!r}: got {int(sizes[i])} bytes for "
                    f"{int(counts[i])} elements of {dtypes.dtype_name(int(enums[i]))}"
                )
            view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
            if len(view) != int(sizes.sum()):
                raise InvalidArgumentError(f"a packed run of {int(sizes.sum())} bytes got a {len(view)}-byte buffer")
            self._flush_batch()
            run = _Run(list(keys), enums, sizes, ndims, dims, self._offset)
            run.crcs[:] = np.asarray(crcs, np.uint32)
            self._runs.append(run)
            self._register_keys(fresh)
            start = self._offset
            self._offset += len(view)
            if len(view):
                self._writer.submit(start, [(-1, view)], done)
            elif done is not None:
                done()
        except BaseException:
            if done is not None:
                done()  # never queued: hand the buffer back
            raise

    def add_slice(self, name: str, full_shape: Sequence[int], slice_spec: str, array: Any) -> None:
        """Appends one slice of a partitioned tensor.

        Args:
            name: the full tensor's name.
            full_shape: the full tensor's shape.
            slice_spec: TensorFlow's slice form, e.g. ``"0,5:-"``.
            array: the slice's values; its shape must be the slice's shape.
        """
        if self._finished:
            raise InvalidArgumentError(f"BundleWriter for {self.prefix!r} is already finished")
        full_shape = [int(d) for d in full_shape]
        extents = _slices.parse_slice_spec(slice_spec)
        _slices.check_fits(full_shape, extents, f"slice {slice_spec!r} of {name!r}")
        arr = as_host_array(array, name)
        want = _slices.slice_shape(full_shape, extents)
        if list(arr.shape) != want:
            raise InvalidArgumentError(
                f"slice {slice_spec!r} of {name!r} has shape {want} but the array's shape is {list(arr.shape)}"
            )
        if _slices.is_full(full_shape, extents):
            self.add(name, arr)
            return
        key = encode_name(name)
        if key in self._entries or key in self._run_keys:
            raise InvalidArgumentError(f"duplicate tensor name {name!r}: already added unsliced")
        dtype_enum = dtypes.from_numpy(arr.dtype, tensor=name)
        full = self._sliced.get(key)
        if full is None:
            full = self._sliced[key] = BundleEntry(dtype_enum, tuple(full_shape))
        elif full.dtype != dtype_enum or list(full.shape) != full_shape:
            raise InvalidArgumentError(
                f"slices of {name!r} disagree: {dtypes.dtype_name(full.dtype)} {list(full.shape)} "
                f"vs {dtypes.dtype_name(dtype_enum)} {full_shape}"
            )
        if list(extents) in full.slices:
            raise InvalidArgumentError(f"slice {slice_spec!r} of {name!r} was already added")
        slice_key = _slices.encode_slice_key(key, extents)
        record = self._add_array(slice_key, arr, name)
        full.slices.append(list(extents))
        self._entries[slice_key] = record

    # --------------------------------------------------------------- finishing
    @property
    def packs_runs(self) -> bool:
        """Whether :meth:`add_packed_run` is available (the C extension is built)."""
        return self._lib is not None

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent so far: ``checksum`` and ``write`` summed over the writer threads
        (``checksum`` includes packing small tensors, done in the same pass), and ``fsync``
        of the data file."""
        return {**self._writer.seconds, "fsync": self._fsync_seconds}

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
        if not self._drained:
            raise InvalidArgumentError("index_items() is available once finish() has written the data")
        crcs, mask = self._crcs, crc.mask
        records = ((dt, shape, offset, size, mask(crcs[slot])) for dt, shape, offset, size, slot in self._entries.values())
        items = list(zip(self._entries, encode_entries(records, shard_id)))  # keys are unique
        for run in self._runs:
            self._fill_crcs(run)
            values = self._lib.encode_entries(
                run.enums, run.ndims, run.dims, run.offsets, run.sizes, crc.mask_array(run.crcs), shard_id
            )
            items.extend(zip(run.keys, values))
        for key, full in self._sliced.items():
            items.append((key, encode_entry(full.dtype, full.shape, shard_id, slices=full.slices)))
        items.sort()
        return ([(b"", encode_header(1))] if header else []) + items

    def _fill_crcs(self, run: _Run) -> None:
        """Copies the crcs of a run's tensors written from their own memory into its column."""
        for i, slot in run.big:
            run.crcs[i] = self._crcs[slot]

    def _one_run(self) -> _Run | None:
        """The run of tensors this writer holds when it holds nothing else, with the C extension."""
        if self._lib is None or len(self._runs) != 1 or self._entries or self._sliced:
            return None
        return self._runs[0]

    def prepare_index(self, header: bytes, shard_id: int = 0) -> None:
        """Builds the index table now, while the writer threads may still be writing, with a
        stand-in for each crc (a field of fixed width): :meth:`index_table` then only writes the
        crcs in and checksums the blocks again. Call it once everything is added (an addition
        after it makes :meth:`index_table` build the table anew)."""
        run = self._one_run()
        if run is None:
            return
        n = len(run.keys)
        crc_at = np.empty(n, np.int64)
        built = self._lib.build_run_table(
            header, run.keys, run.order, run.enums, run.ndims, run.dims, run.offsets, run.sizes,
            np.full(n, 0xFFFFFFFF, np.uint32), shard_id, BLOCK_SIZE, crc_at,
        )
        if built is not None:
            self._prepared = (header, shard_id, built[0], crc_at, built[1])

    def index_table(self, header: bytes, shard_id: int = 0) -> bytes | bytearray | None:
        """The whole index table, built in C straight from the one run of tensors this writer
        holds (finishing the one :meth:`prepare_index` made, where it did), or None where that
        does not apply (then build it from :meth:`index_items`).

        Args:
            header: the encoded header entry (key ``b""``).
            shard_id: the data file id the entries name.
        """
        if not self._drained:
            raise InvalidArgumentError("index_table() is available once finish() has written the data")
        run = self._one_run()
        if run is None:
            return None
        self._fill_crcs(run)
        masked = crc.mask_array(run.crcs)
        prepared = self._prepared
        if prepared is not None and prepared[0] == header and prepared[1] == shard_id:
            _, _, table, crc_at, blocks = prepared
            if len(crc_at) == len(run.keys) and self._lib.patch_run_table(table, crc_at, masked, blocks):
                return table
            # a crc of 0 once masked: protobuf leaves that field out, so the entry is shorter
        return self._lib.build_run_table(  # type: ignore[no-any-return]
            header, run.keys, run.order, run.enums, run.ndims, run.dims, run.offsets, run.sizes, masked,
            shard_id, BLOCK_SIZE,
        )

    def finish(self, write_index: bool = True) -> None:
        """Writes everything out: data file (fsynced, renamed), then the index, last.

        Args:
            write_index: False when the caller merges this bundle from memory
                (see :func:`gpusaver.format.merge.commit_merged`) and needs no index file.
        """
        if self._finished:
            raise InvalidArgumentError(f"BundleWriter for {self.prefix!r} is already finished")
        ops = self._fileops
        try:
            self._flush_batch()
            if write_index:
                self.prepare_index(encode_header(1))  # while the writer threads finish
            self._writer.close()
            self._drained = True
            fd, self._fd = self._fd, None
            assert fd is not None
            try:
                if self._durable:
                    t0 = time.perf_counter()
                    ops.fsync(fd)
                    self._fsync_seconds = time.perf_counter() - t0
            finally:
                ops.close(fd)
            ops.rename(self._tmp_data, self._data_path)
            self._tmp_data = ""
            if write_index:
                table = self.index_table(encode_header(1))
                self._write_index(table if table is not None else encode_table(self.index_items()))
            if self._durable:
                ops.fsync_dir(os.path.dirname(self.prefix) or ".")
        except OSError as e:
            self.abort()
            raise os_error(e, "writing checkpoint", self.prefix) from e
        except BaseException:
            self.abort()
            raise
        self._finished = True

    def _write_index(self, table: bytes | bytearray) -> None:
        ops = self._fileops
        path = index_filename(self.prefix)
        self._tmp_index = f"{path}.tempstate{uuid.uuid4().int & ((1 << 63) - 1)}"
        fd = ops.create(self._tmp_index)
        try:
            ops.write(fd, [memoryview(table)])
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
