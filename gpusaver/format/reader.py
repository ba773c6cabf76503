"""BundleReader: lazy, verified reads of a checkpoint bundle.

Opening a bundle reads and checks its index (every block's crc). Tensors are
read on demand, each reading only its own bytes, and every tensor's crc32c is
verified. Sizes are checked against the entry and the data file before any
memory is allocated, so a corrupt index cannot trigger a huge allocation.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from gpusaver import config, native
from gpusaver.storage.parallel import run_jobs
from gpusaver.errors import (
    CheckpointNotFoundError,
    ChecksumError,
    CorruptCheckpointError,
    InvalidArgumentError,
    ShapeMismatchError,
    TensorNotFoundError,
)
from gpusaver.format import crc, dtypes, slices as _slices
from gpusaver.format.entry import BundleEntry, BundleHeader, decode_entry, decode_header
from gpusaver.format.naming import data_filename, index_filename
from gpusaver.format.table import TableReader
from gpusaver.format.tensors import decode_strings, empty_array
from gpusaver.format.wire import Malformed
from gpusaver.storage.paths import local_path, read_regular
from gpusaver.storage import POSIX, FileOps, checked_read_jobs, read_exact, read_with_checksums, read_workers
from gpusaver.storage.reads import track_progress, untrack_progress

__all__ = ["BundleReader"]

_IOV_MAX = 1024
# The sizes are settings (gpusaver.config), read when a read starts: reads go in chunks of
# read_chunk_bytes, each checksummed as it arrives; reads of parallel_read_bytes and more
# are split across threads; with the C extension, tensors below pack_limit are read in chunks of
# about pack_bytes (gaps under gap_bytes included) and unpacked into their arrays, on several
# threads from parallel_chunked_bytes.


def _flat_bytes(out: Any) -> memoryview:
    """``out`` as a flat memoryview of its bytes (``len`` of a multi-dimensional one is its first dimension)."""
    if isinstance(out, memoryview) and out.format == "B" and out.ndim == 1:
        return out
    return memoryview(out).cast("B")


class _StagingPool:
    """Staging buffers for chunked reads, kept from one restore to the next (at most ``keep`` of
    them): a new one is fresh memory, whose page faults cost more than reading a few MiB into it."""

    def __init__(self, keep: int) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        with self._lock:
            for i, buf in enumerate(self._free):
                if size <= len(buf) <= 2 * size:
                    return self._free.pop(i)
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


_staging = _StagingPool(keep=4)


class EntryColumns:
    """Many tensors' decoded entries, as arrays (see ``_native.decode_entries``).

    ``ok[i]`` is 1 where entry ``i`` exists, is in the common layout and names
    a data file of this checkpoint; the rest need :meth:`BundleReader.entry`.
    ``crcs`` are unmasked.
    """

    __slots__ = ("ok", "enums", "shards", "offsets", "sizes", "crcs", "ndims", "dim_starts", "dims")

    def __init__(self, decoded: tuple[np.ndarray, ...], num_shards: int | None) -> None:
        """``decoded``: ``decode_entries``' columns, or with ``num_shards`` None, columns whose ``ok``
        already requires a shard of this checkpoint and whose crcs are unmasked."""
        ok, self.enums, self.shards, self.offsets, self.sizes, crcs, self.ndims, self.dim_starts, self.dims = decoded
        if num_shards is None:
            self.ok, self.crcs = ok, crcs
        else:
            self.ok = ok & (self.shards < num_shards)
            self.crcs = crc.unmask_array(crcs)


class BundleReader:
    """Reads one checkpoint (``prefix.index`` and its data files).

    Args:
        prefix: the checkpoint prefix.
        fileops: the file operations the data files are opened and read with (tests inject faults
            here); the index is read whole with plain I/O.

    Raises:
        CheckpointNotFoundError: ``prefix.index`` does not exist.
        CorruptCheckpointError: the index is damaged (a ``ValueError``).
        UnsupportedVersionError: written by a newer format.
    """

    def __init__(self, prefix: str, fileops: FileOps | None = None) -> None:
        #: the file operations every data read goes through
        self.fileops: FileOps = fileops or POSIX
        self.prefix = local_path(prefix)
        self.index_path = index_filename(self.prefix)
        try:
            data = read_regular(self.index_path, "checkpoint index")
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointNotFoundError(
                f"no checkpoint at {self.prefix!r}: {self.index_path!r} does not exist", self.prefix
            ) from None
        try:
            self._table = TableReader(data, self.index_path)
            first = self._table.first()
            if first is None or first[0] != b"":
                raise Malformed("the index has no header entry")
            self.header: BundleHeader = decode_header(first[1])
        except Malformed as e:
            raise CorruptCheckpointError(f"{self.index_path!r} is not a valid checkpoint index: {e}", self.index_path) from None
        self._entries: dict[bytes, BundleEntry] = {}
        self._files: dict[int, tuple[int, int, str]] = {}
        self._columns: tuple[list[bytes], EntryColumns] | None = None
        self._fits: tuple[EntryColumns, Sequence[Any], np.ndarray] | None = None
        #: check_arrays' answer made by columns() in its pass: (columns, arrays, uint8 mask)
        self._checked: tuple[EntryColumns, Sequence[Any], np.ndarray] | None = None
        self._lock = threading.Lock()
        self._progress: Any = None

    # ---------------------------------------------------------------- metadata
    def verify_index(self) -> None:
        """Checks the whole index: every block's crc, the metaindex block, the footer padding.

        Raises:
            CorruptCheckpointError: damage anywhere in the index file.
        """
        try:
            self._table.verify()
        except Malformed as e:
            raise self._corrupt(e) from None

    def _corrupt(self, e: Exception) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.index_path!r} is corrupt: {e}", self.index_path)

    def entry(self, name: str | bytes) -> BundleEntry:
        """The index entry of ``name``.

        Raises:
            TensorNotFoundError: no such tensor (a ``KeyError``).
        """
        key = name.encode("utf-8") if isinstance(name, str) else name
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        try:
            value = self._table.get(key) if key else None
            if value is None:
                raise TensorNotFoundError(
                    f"tensor {key.decode('utf-8', 'replace')!r} not found in checkpoint {self.prefix!r}",
                    key.decode("utf-8", "replace"),
                )
            entry = decode_entry(value)
        except Malformed as e:
            raise self._corrupt(e) from None
        if entry.shard_id >= self.header.num_shards and not entry.slices:
            raise self._corrupt(ValueError(f"tensor {key!r} names shard {entry.shard_id} of {self.header.num_shards}"))
        self._entries[key] = entry
        return entry

    def entries(self, names: Sequence[str]) -> list[BundleEntry]:
        """The entries of many tensors at once (faster than :meth:`entry` for each).

        Raises:
            TensorNotFoundError: the first name that is not in the checkpoint.
        """
        keys = [n.encode("utf-8") for n in names]
        cache = self._entries
        missing = [k for k in keys if k not in cache]
        if missing:
            num_shards = self.header.num_shards
            try:
                for key, value in zip(missing, self._table.get_many(missing)):
                    if value is None or not key:
                        continue
                    entry = decode_entry(value)
                    if entry.shard_id >= num_shards and not entry.slices:
                        raise self._corrupt(
                            ValueError(f"tensor {key!r} names shard {entry.shard_id} of {num_shards}")
                        )
                    cache[key] = entry
            except Malformed as e:
                raise self._corrupt(e) from None
        out = []
        for name, key in zip(names, keys):
            entry = cache.get(key)
            if entry is None:
                raise TensorNotFoundError(f"tensor {name!r} not found in checkpoint {self.prefix!r}", name)
            out.append(entry)
        return out

    def columns(self, keys: list[bytes], arrays: Sequence[Any] | None = None) -> EntryColumns | None:
        """The entries of many tensors decoded as arrays by the C extension (None without it).

        The result for the same ``keys`` list object is cached: a restore's check
        and its reads share it. Given the arrays the tensors are restored into (one per key),
        the first part of :meth:`fits` is done in the same pass over them.
        """
        lib = native.lib
        if lib is None:
            return None
        cached = self._columns
        if cached is not None and cached[0] is keys:
            return cached[1]
        num_shards = self.header.num_shards
        try:
            decoded = self._table.get_many_decoded(
                keys, num_shards, *((arrays, native.type_codes()) if arrays is not None else ())
            )
            if decoded is not None:
                cols = EntryColumns(decoded[:9], None)
                if arrays is not None:
                    self._checked = (cols, arrays, decoded[9])
            else:
                cols = EntryColumns(lib.decode_entries(self._table.get_many(keys)), num_shards)
        except Malformed as e:
            raise self._corrupt(e) from None
        self._columns = (keys, cols)
        return cols

    def _all_entries(self) -> Iterator[tuple[bytes, BundleEntry]]:
        try:
            for key, value in self._table:
                if key:
                    entry = self._entries.get(key)
                    if entry is None:
                        entry = self._entries[key] = decode_entry(value)
                    yield key, entry
        except Malformed as e:
            raise self._corrupt(e) from None

    def variables(self) -> dict[str, BundleEntry]:
        """Every variable's entry by name; slice entries are hidden as TensorFlow hides them."""
        all_entries = dict(self._all_entries())
        hidden = set()
        for key, entry in all_entries.items():
            for extents in entry.slices:
                hidden.add(_slices.encode_slice_key(key, extents))
        return {k.decode("utf-8", "replace"): e for k, e in all_entries.items() if k not in hidden}

    def variable_names(self) -> list[str]:
        """Every variable's name, from the index's keys alone (no entry is decoded; slices hidden)."""
        try:
            return [k.decode("utf-8", "replace") for k, _ in self._table if k and not k.startswith(b"\x00")]
        except Malformed as e:
            raise self._corrupt(e) from None

    def keys(self) -> list[str]:
        """Variable names, sorted."""
        return sorted(self.variables())

    def has_tensor(self, name: str) -> bool:
        """True if ``name`` is a variable of this checkpoint (stored slices are not variables)."""
        if name.encode("utf-8").startswith(b"\x00"):
            return name in self.variables()
        try:
            self.entry(name)
        except TensorNotFoundError:
            return False
        return True

    def dtype(self, name: str) -> np.dtype:
        """The NumPy dtype of a stored tensor."""
        return dtypes.to_numpy(self.entry(name).dtype, path=self.index_path, tensor=name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a stored tensor."""
        return self.entry(name).shape

    # -------------------------------------------------------------------- data
    def _data_file(self, shard_id: int) -> tuple[int, int, str]:
        with self._lock:
            cached = self._files.get(shard_id)
            if cached is None:
                path = data_filename(self.prefix, shard_id, self.header.num_shards)
                try:
                    fd = self.fileops.open_read(path, "data file")
                except (FileNotFoundError, NotADirectoryError):
                    raise CorruptCheckpointError(
                        f"checkpoint {self.prefix!r} is incomplete: data file {path!r} is missing", path
                    ) from None
                cached = self._files[shard_id] = (fd, os.fstat(fd).st_size, path)
                if self._progress is not None:
                    track_progress(fd, self._progress)
            return cached

    def data_file_size(self, shard_id: int) -> int:
        """The size of data file ``shard_id`` (opening it; a missing file raises)."""
        cached = self._files.get(shard_id)
        return (cached or self._data_file(shard_id))[1]

    def inside_data_files(
        self, shards: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, where: np.ndarray
    ) -> np.ndarray:
        """Where each of the entries marked in ``where`` has its bytes inside a data file that exists: a
        bool mask (False outside ``where``). A missing file or bytes past its end are left to the general
        path, which raises the precise error, in order."""
        lib = native.lib
        if getattr(lib, "extents_inside", None) is not None:
            sizes_of: dict[int, int] = {}
            while True:
                inside, needed = lib.extents_inside(where, shards, offsets, sizes, self.header.num_shards, sizes_of)
                if not needed:
                    return inside  # type: ignore[no-any-return]
                for shard in needed:
                    try:
                        sizes_of[shard] = self.data_file_size(shard)
                    except CorruptCheckpointError:
                        sizes_of[shard] = -1
        # a shard id this checkpoint does not have: the general path says so
        inside = where & (shards >= 0) & (shards < self.header.num_shards)
        # offset and size are each below 2**63 (the decoder checks): their sum fits a uint64, not an int64
        ends = offsets.astype(np.uint64) + sizes.astype(np.uint64)
        for shard in np.flatnonzero(np.bincount(shards[inside])).tolist():
            in_shard = shards == shard
            try:
                size = self.data_file_size(int(shard))
            except CorruptCheckpointError:
                inside &= ~in_shard
                continue
            inside &= ~(in_shard & (ends > np.uint64(size)))
        return inside

    def data_location(self, name: str, entry: BundleEntry | None = None) -> tuple[int, int, int, str]:
        """``(fd, offset, size, path)`` of a tensor's bytes, checked against the file's size."""
        entry = entry or self.entry(name)
        fd, file_size, path = self._data_file(entry.shard_id)
        if entry.offset + entry.size > file_size:
            raise CorruptCheckpointError(
                f"{path!r} is truncated: tensor {name!r} needs bytes [{entry.offset}, "
                f"{entry.offset + entry.size}) but the file has {file_size}",
                path,
            )
        return fd, entry.offset, entry.size, path

    def check_size(self, name: str, entry: BundleEntry) -> None:
        """Raises CorruptCheckpointError when an entry's byte size cannot hold its shape.

        Numeric tensors need exactly elements x itemsize bytes; a string tensor at
        least a length varint per element and a crc32c.
        """
        dtype = dtypes.to_numpy(entry.dtype, path=self.index_path, tensor=name)
        if dtype != dtypes.OBJECT:
            self._check_size(name, entry, dtype)
        elif entry.size < entry.num_elements + 4:
            raise CorruptCheckpointError(
                f"string tensor {name!r} in {self.index_path!r}: {entry.size} bytes cannot hold "
                f"{entry.num_elements} strings",
                self.index_path,
            )

    @property
    def big_endian(self) -> bool:
        """The data files hold big-endian values (a checkpoint from a big-endian machine);
        only :meth:`get_tensor` converts them, so restores go through it."""
        return self.header.endianness == 1

    def _check_size(self, name: str, entry: BundleEntry, dtype: np.dtype) -> None:
        expect = entry.num_elements * dtype.itemsize
        if entry.size != expect:
            raise CorruptCheckpointError(
                f"invalid size in the entry of tensor {name!r} in {self.index_path!r}: "
                f"{entry.size} bytes stored, {expect} expected for shape {list(entry.shape)} of {dtype}",
                self.index_path,
            )

    def read_into(self, name: str, out: Any, *, verify: bool = True) -> None:
        """Reads a numeric tensor's bytes straight into ``out`` and verifies them.

        Args:
            name: the tensor.
            out: a writable C-contiguous buffer of exactly the tensor's byte size
                (e.g. a flat uint8 view of the destination array).
            verify: check the crc32c (on by default).

        Raises:
            ChecksumError: the bytes do not match their checksum.
        """
        self._read_into(name, self.entry(name), out, verify)

    def _read_into(self, name: str, entry: BundleEntry, out: Any, verify: bool = True) -> None:
        dtype = dtypes.to_numpy(entry.dtype, path=self.index_path, tensor=name)
        if entry.slices or dtype == dtypes.OBJECT:
            raise InvalidArgumentError(f"tensor {name!r} is {'partitioned' if entry.slices else 'a string tensor'}; use get_tensor")
        self._check_size(name, entry, dtype)
        view = _flat_bytes(out)
        if len(view) != entry.size:
            raise ShapeMismatchError(f"tensor {name!r} has {entry.size} bytes; the destination has {len(view)}")
        fd, offset, size, path = self.data_location(name, entry)
        read_exact(fd, view, offset, path, self.fileops)
        if verify:
            crc.check(crc.value(view), entry.crc32c, path, name)

    def read_many_into(self, items: Sequence[tuple[str, Any]]) -> None:
        """Reads many numeric tensors into their buffers, verifying every crc32c.

        Tensors that lie back to back in one data file are read with one
        scatter read (``preadv``) into all their buffers at once.

        Args:
            items: ``(name, out)`` pairs; ``out`` as for :meth:`read_into`.
        """
        runs, checks = self._plan_many(items)
        actual = read_with_checksums(runs, len(checks), self.fileops)
        self._check_many(checks, actual)

    def _check_many(self, checks: list[tuple[str, Any, int, str]], actual: list[int]) -> None:
        """Raises ChecksumError for the first of ``checks`` whose bytes read do not match."""
        for (name, view, stored, path), got in zip(checks, actual):
            if got != crc.unmask(stored):
                raise ChecksumError(path, name, crc.unmask(stored), got)

    def _plan_many(
        self, items: Sequence[tuple[str, Any]]
    ) -> tuple[list[tuple[int, int, str, list[Any]]], list[tuple[str, Any, int, str]]]:
        """The scatter reads of :meth:`read_many_into` (fd, offset, path, buffers) and, per tensor, what to check;
        every argument error is raised here, before anything is read."""
        runs: list[tuple[int, int, str, list[Any]]] = []  # fd, start, path, views
        checks: list[tuple[str, Any, int, str]] = []
        run_fd = run_end = -1
        files = self._files
        entries = self.entries([name for name, _ in items])
        for (name, out), entry in zip(items, entries):
            dtype = dtypes.to_numpy(entry.dtype, path=self.index_path, tensor=name)
            if entry.slices or dtype == dtypes.OBJECT:
                raise InvalidArgumentError(f"tensor {name!r} is {'partitioned' if entry.slices else 'a string tensor'}; use get_tensor")
            view = _flat_bytes(out)
            size = entry.size
            if size != entry.num_elements * dtype.itemsize:
                self._check_size(name, entry, dtype)
            if len(view) != size:
                raise ShapeMismatchError(f"tensor {name!r} has {size} bytes; the destination has {len(view)}")
            fd, file_size, path = files.get(entry.shard_id) or self._data_file(entry.shard_id)
            offset = entry.offset
            if offset + size > file_size:
                self.data_location(name, entry)  # raises, naming the file
            checks.append((name, view, entry.crc32c, path))
            if fd == run_fd and offset == run_end and len(runs[-1][3]) < _IOV_MAX:
                runs[-1][3].append(view)
            else:
                runs.append((fd, offset, path, [view]))
            run_fd, run_end = fd, offset + size
        return runs, checks

    def fits(self, cols: EntryColumns, arrays: Sequence[Any]) -> np.ndarray:
        """Where each array can be restored by :meth:`read_columns_into`: a bool mask.

        True where the entry decoded (``cols.ok``), the array is a writable
        C-contiguous native-order ndarray of the stored dtype, shape and byte
        size, and its bytes lie inside a data file that exists. Everything else
        is for the general path, which also raises the precise error, in order.
        """
        lib = native.lib
        assert lib is not None
        if self.big_endian:
            return np.zeros(len(arrays), bool)
        cached = self._fits
        if cached is not None and cached[0] is cols and cached[1] is arrays:
            return cached[2].copy()  # a restore's check and its reads ask for the same arrays
        checked = self._checked
        if checked is not None and checked[0] is cols and checked[1] is arrays:
            good = checked[2].view(bool)  # 0 or 1
        else:
            good = lib.check_arrays(
                arrays, native.type_codes(), cols.ok, cols.enums, cols.ndims, cols.dim_starts, cols.dims, cols.sizes
            ).view(bool)
        good = self.inside_data_files(cols.shards, cols.offsets, cols.sizes, good)
        self._fits = (cols, arrays, good.copy())
        return good

    def read_columns_into(self, keys: list[bytes], arrays: Sequence[Any], cols: EntryColumns, which: np.ndarray) -> None:
        """Restores ``arrays[i]`` for every ``i`` in ``which`` (all passed :meth:`fits`), crc32c verified.

        Large tensors are read straight into their arrays' memory; small ones in
        chunks of a few MiB that the C extension checks and copies into place.
        Both kinds of reads are jobs in one queue, taken by several threads for
        big restores. A damaged tensor does not stop the other reads; every
        thread has stopped before an error is raised.

        Raises:
            ChecksumError: for the first damaged tensor in ``keys`` order. Every
                tensor before it holds checkpoint values; a small damaged one
                keeps its old values, a large one holds the unverified bytes.
        """
        lib = native.lib
        assert lib is not None
        sizes = cols.sizes
        unpack_limit = config.get("pack_limit")
        big = which[sizes[which] >= unpack_limit]
        small = which[sizes[which] < unpack_limit]
        failures: list[tuple[int, ChecksumError]] = []
        jobs: list[Callable[[], None]] = []
        workers = 1
        if len(big):
            from gpusaver.format.tensors import byte_view

            names = [keys[i].decode("utf-8") for i in big]
            runs, checks = self._plan_many(list(zip(names, (byte_view(arrays[i]) for i in big))))
            big_jobs, finish = checked_read_jobs(runs, len(checks), self.fileops)
            jobs += big_jobs
            workers = read_workers(int(sizes[big].sum()))
        if len(small):
            small_jobs, small_bytes = self._small_jobs(keys, arrays, cols, small, failures)
            jobs += small_jobs
            workers = max(workers, read_workers(small_bytes, config.get("parallel_chunked_bytes")))
        # one queue for both: no thread waits at the end of the large reads while the other finishes its share
        run_jobs(jobs, workers, "gpusaver-read")
        if len(big):
            try:
                self._check_many(checks, finish())
            except ChecksumError as e:  # the first damaged large one, in order
                failures.append((int(big[names.index(e.tensor)]), e))
        if failures:
            raise min(failures, key=lambda f: f[0])[1]

    def _small_jobs(
        self, keys: list[bytes], arrays: Sequence[Any], cols: EntryColumns, small: np.ndarray,
        failures: list[tuple[int, ChecksumError]],
    ) -> tuple[list[Callable[[], None]], int]:
        """Jobs that read small tensors in chunks, verified and copied by the C extension (the damaged ones are
        appended to ``failures``), and the bytes they read."""
        lib = native.lib
        sizes = cols.sizes
        chunk_bytes, gap = config.get("pack_bytes"), config.get("gap_bytes")
        staging_bytes = chunk_bytes + config.get("pack_limit")  # a chunk plus the tensor that crosses its end
        starts, shards = cols.offsets[small], cols.shards[small]
        if len(small) > 1 and not (
            (shards[1:] > shards[:-1]) | ((shards[1:] == shards[:-1]) & (starts[1:] >= starts[:-1]))
        ).all():  # not yet in file order (a Saver restoring what it saved needs no sort)
            by_file = np.lexsort((starts, shards))
            small, starts, shards = small[by_file], starts[by_file], shards[by_file]
        order = small.astype(np.int64, copy=False)
        ends = starts + sizes[order]
        brk = np.ones(len(order), bool)
        brk[1:] = (shards[1:] != shards[:-1]) | (starts[1:] > ends[:-1] + gap) | (starts[1:] < ends[:-1])
        seg_start = starts[brk][np.cumsum(brk) - 1]
        chunk = (ends - seg_start - 1) // chunk_bytes
        brk[1:] |= chunk[1:] != chunk[:-1]
        cuts = np.append(np.flatnonzero(brk), len(order))
        held = np.zeros(len(order) + 1, np.int64)  # the tensors' bytes before each: a chunk's progress
        np.cumsum(sizes[order], out=held[1:])
        lock = threading.Lock()

        def job(a: int, b: int) -> Callable[[], None]:
            def run() -> None:
                staging = _staging.take(staging_bytes)
                try:
                    view = memoryview(staging)
                    fd, _, path = self._data_file(int(shards[a]))
                    lo, hi = int(starts[a]), int(ends[b - 1])
                    read_exact(fd, view[: hi - lo], lo, path, self.fileops, int(held[b] - held[a]))
                    for bad in lib.unpack(view[: hi - lo], lo, arrays, order, a, b, cols.offsets, cols.crcs):
                        at = int(cols.offsets[bad]) - lo
                        actual = crc.value(view[at : at + int(sizes[bad])])
                        name = keys[bad].decode("utf-8", "replace")
                        with lock:
                            failures.append((bad, ChecksumError(path, name, int(cols.crcs[bad]), actual)))
                finally:
                    _staging.give(staging)
            return run

        total = int((ends - starts).sum())
        return [job(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])], total

    def get_tensor(self, name: str) -> np.ndarray:
        """Reads a whole tensor as a NumPy array, checksums verified.

        Partitioned tensors are assembled from their stored slices.

        Raises:
            TensorNotFoundError: no such tensor.
            CorruptCheckpointError: a damaged entry or data file (ChecksumError: bytes that do not
                match their crc32c).
            UnsupportedDTypeError: a dtype gpusaver cannot read, or a valid tensor NumPy cannot hold
                (a zero-element ``[0, 2**61]`` float32 one, more than 64 dimensions), naming it.
        """
        entry = self.entry(name)
        if entry.slices:
            return self._assemble(name, entry, [(0, -1)] * len(entry.shape))
        return self._read_entry(name, entry)

    def _read_entry(self, name: str, entry: BundleEntry) -> np.ndarray:
        dtype = dtypes.to_numpy(entry.dtype, path=self.index_path, tensor=name)
        if dtype == dtypes.OBJECT:
            self.check_size(name, entry)
            fd, offset, size, path = self.data_location(name, entry)
            buf = bytearray(size)
            read_exact(fd, memoryview(buf), offset, path, self.fileops)
            return decode_strings(buf, entry.shape, crc.unmask(entry.crc32c), path, name)
        self._check_size(name, entry, dtype)
        self.data_location(name, entry)  # truncation is found before allocating
        out = empty_array(entry.shape, dtype, name, self.index_path)
        self._read_into(name, entry, out.reshape(-1).view(np.uint8))
        if self.header.endianness == 1 and dtype.itemsize > 1:
            out = out.view(dtype.newbyteorder(">")).astype(dtype)
        return out

    def read_slice(self, name: str, slice_spec: str) -> np.ndarray:
        """Reads the region ``slice_spec`` (e.g. ``"2,3:-"``) of a tensor, from whole or sliced storage."""
        entry = self.entry(name)
        extents = _slices.parse_slice_spec(slice_spec)
        _slices.check_fits(entry.shape, extents, f"slice {slice_spec!r} of {name!r}")
        if not entry.slices:
            full = self._read_entry(name, entry)
            region = tuple(slice(a, b) for a, b in _slices.normalize(entry.shape, extents))
            return np.ascontiguousarray(full[region])
        return self._assemble(name, entry, extents)

    def check_slice(self, name: str, slice_spec: str) -> None:
        """Every check :meth:`read_slice` makes before it reads, without reading: the tensor and the region
        exist, and each stored slice the region needs (or the whole tensor) lies inside its data file.

        Raises:
            TensorNotFoundError, InvalidArgumentError: no such tensor, or a region outside it.
            CorruptCheckpointError: a slice listed but not stored, stored with another shape or dtype,
                past the end of its data file, or too few slices to cover the region.
        """
        entry = self.entry(name)
        extents = _slices.parse_slice_spec(slice_spec)
        _slices.check_fits(entry.shape, extents, f"slice {slice_spec!r} of {name!r}")
        if entry.slices:
            self._slice_plan(name, entry, extents)
            return
        dtype = dtypes.to_numpy(entry.dtype, path=self.index_path, tensor=name)
        if dtype != dtypes.OBJECT:
            self._check_size(name, entry, dtype)
        self.data_location(name, entry)

    def _assemble(self, name: str, entry: BundleEntry, want: list[tuple[int, int]]) -> np.ndarray:
        """Cuts the region ``want`` out of the stored slices (checked first by :meth:`_slice_plan`)."""
        dtype, region, region_shape, plan = self._slice_plan(name, entry, want)
        out = empty_array(tuple(region_shape), dtype, name, self.index_path)
        covered = np.zeros(out.shape, dtype=bool)
        for inter, stored, part_entry in plan:
            part = self._read_entry(name, part_entry)
            src = tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inter, stored))
            dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, region))
            out[dst] = part[src]
            covered[dst] = True
        if not covered.all():
            raise CorruptCheckpointError(
                f"tensor {name!r} in {self.index_path!r} does not have sufficient slices to cover "
                f"{_slices.format_slice_spec(want)}",
                self.index_path,
            )
        return out

    def _slice_plan(
        self, name: str, entry: BundleEntry, want: list[tuple[int, int]]
    ) -> tuple[np.dtype, list[tuple[int, int]], list[int], list[Any]]:
        """The stored slices the region ``want`` needs, each with its overlap.

        Every slice needed is looked up and checked against its data file, and
        the slices must hold at least as many elements as the region, before
        anything is allocated: a corrupt entry cannot claim a huge tensor.
        """
        dtype = dtypes.to_numpy(entry.dtype, path=self.index_path, tensor=name)
        region = _slices.normalize(entry.shape, want)
        region_shape = [b - a for a, b in region]
        key = name.encode("utf-8")
        plan = []
        available = 0
        for extents in entry.slices:
            stored = _slices.normalize(entry.shape, extents)
            inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(region, stored)]
            if any(lo >= hi for lo, hi in inter):
                continue
            slice_key = _slices.encode_slice_key(key, extents)
            try:
                part_entry = self.entry(slice_key)
            except TensorNotFoundError:
                raise CorruptCheckpointError(
                    f"slice {_slices.format_slice_spec(extents)} of {name!r} is listed but not stored in "
                    f"{self.index_path!r}",
                    self.index_path,
                ) from None
            want_shape = tuple(b - a for a, b in stored)
            if part_entry.shape != want_shape or part_entry.dtype != entry.dtype:
                raise CorruptCheckpointError(
                    f"slice {_slices.format_slice_spec(extents)} of {name!r} is stored as "
                    f"{dtypes.dtype_name(part_entry.dtype)} {list(part_entry.shape)}, expected "
                    f"{dtypes.dtype_name(entry.dtype)} {list(want_shape)}",
                    self.index_path,
                )
            if dtype != dtypes.OBJECT:
                self._check_size(name, part_entry, dtype)
            self.data_location(name, part_entry)  # its bytes are really in the file
            overlap = 1
            for lo, hi in inter:
                overlap *= hi - lo
            available += overlap
            plan.append((inter, stored, part_entry))
        needed = 1
        for d in region_shape:
            needed *= d
        if available < needed:
            raise CorruptCheckpointError(
                f"tensor {name!r} in {self.index_path!r} does not have sufficient slices to cover "
                f"{_slices.format_slice_spec(want)}",
                self.index_path,
            )
        return dtype, region, region_shape, plan

    def close(self) -> None:
        """Closes the data files."""
        with self._lock:
            for fd, _, _ in self._files.values():
                untrack_progress(fd)
                os.close(fd)
            self._files.clear()
            self._progress = None

    def set_progress(self, progress: Any) -> None:
        """Counts every byte read from the data files towards ``progress`` (a
        :class:`gpusaver.progress.Progress`), or stops counting (None)."""
        with self._lock:
            self._progress = progress
            for fd, _, _ in self._files.values():
                if progress is None:
                    untrack_progress(fd)
                else:
                    track_progress(fd, progress)

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
