"""The snapshot of an asynchronous save: every variable's bytes captured into a bounded pool of host memory.

:meth:`gpusaver.Saver.save_async` runs each device group's backend against a
:class:`Recorder` instead of a :class:`~gpusaver.format.BundleWriter`. The
recorder has the writer's adding methods; each copies the bytes it is handed
into the :class:`SnapshotPool` and queues a record of the call. On a
background thread the save pipeline replays the records onto real writers
(:class:`ReplayGroup`), in the same order, so the files are the same as a
synchronous save's, byte for byte. A device backend hands the recorder host
buffers it has already copied from the GPU (its pinned ring), so a GPU array
is captured by the same code as a NumPy array.

The pool is a set of slabs (``snapshot_slab_bytes`` each) up to
``snapshot_bytes`` in all, allocated as first needed and reused by every later
save of the Saver: memory does not grow from one save to the next. A state
larger than the pool is captured in pieces: when every slab is in use, the
capture waits for the background writers to write one (its records carry a
``done`` callback that hands the slab back once written), so it blocks only
as long as it must.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from gpusaver import config, native
from gpusaver.backends.base import TensorList
from gpusaver.errors import GpuSaverError, InvalidArgumentError
from gpusaver.format import dtypes
from gpusaver.format.tensors import byte_view

__all__ = ["SnapshotPool", "Recorder", "ReplayGroup", "default_snapshot_bytes", "available_memory"]

_END = ("end",)


class _Stopped(Exception):
    """The save this capture feeds has failed: capturing more is pointless."""


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup (v2, then v1) may still use, or None without a limit."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_memory() -> int:
    """Host memory a new allocation can use now: the kernel's MemAvailable, bounded by the cgroup's room."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 1 << 30
    room = _cgroup_room()
    return available if room is None else min(available, room)


def default_snapshot_bytes() -> int:
    """The ``snapshot_bytes`` setting, or a quarter of the available host memory when it is 0."""
    configured = config.get("snapshot_bytes")
    return configured if configured else available_memory() // 4


_COPY_SPLIT = 4 << 20  # copies at least this big are split over the copy threads
_copy_threads: Any = None
_copy_lock = threading.Lock()


def _forget_copy_threads_in_child() -> None:
    """A forked child has none of its parent's copy threads; an executor that believes it has idle ones
    would queue the child's copies for them forever."""
    global _copy_threads, _copy_lock
    _copy_threads = None
    _copy_lock = threading.Lock()  # the parent may have held it while forking


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_copy_threads_in_child)


def _copy_pool() -> ThreadPoolExecutor:
    """The snapshot's copy threads (one fewer than the copies' ways: the caller copies a part too)."""
    global _copy_threads
    with _copy_lock:
        if _copy_threads is None:
            _copy_threads = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1) - 1),
                                               thread_name_prefix="gpusaver-snapshot-copy")
        return _copy_threads


def _submit(fn: Callable[..., Any], *args: Any) -> Future:
    """Runs ``fn(*args)`` on a copy thread; once the interpreter has begun shutting down (an atexit handler,
    a thread outliving the main one), executors refuse new work, and it runs here instead."""
    try:
        return _copy_pool().submit(fn, *args)
    except RuntimeError:
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            done.set_exception(e)
        return done


def _copy_part(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[:] = src``: with the C extension, in non-temporal stores (twice the copy rate measured here on a 1 GiB
    snapshot, see ``stream_copy``), else NumPy's copy. Both release the GIL."""
    lib = native.lib
    if lib is not None:
        lib.stream_copy(dst, src)
    else:
        dst[:] = src


def _ways(nbytes: int) -> int:
    """Into how many parts a copy of ``nbytes`` is split (one per CPU, at most 4, each at least _COPY_SPLIT)."""
    return min(4, os.cpu_count() or 1, nbytes // _COPY_SPLIT)


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[:] = src`` (bytes), a large copy split over a few threads: one core alone does not reach the memory
    bandwidth."""
    n = len(dst)
    ways = _ways(n)
    if ways < 2:
        _copy_part(dst, src)
        return
    step = -(-n // ways)
    step += -step % 4096  # page-aligned parts
    cuts = list(range(0, n, step)) + [n]
    parts = [_submit(_copy_part, dst[a:b], src[a:b]) for a, b in zip(cuts[1:-1], cuts[2:])]
    _copy_part(dst[: cuts[1]], src[: cuts[1]])
    for part in parts:
        part.result()


def _pack(lib: Any, arrays: Sequence[Any], start: int, stop: int, out: np.ndarray, crcs: np.ndarray,
          starts: np.ndarray) -> int:
    """``lib.pack`` of ``arrays[start:stop]`` into ``out`` (in streaming stores), split by bytes over the copy
    threads when it is large: the parts go to their final offsets (``starts``: each array's byte offset in the
    run), so the result is the same bytes and crcs as one call."""
    total = int(starts[stop] - starts[start])
    ways = _ways(total)
    if ways < 2:
        return lib.pack(arrays, start, stop, memoryview(out), crcs, True)
    base = int(starts[start])
    cuts = [start]
    for k in range(1, ways):
        cut = int(np.searchsorted(starts, base + total * k // ways, side="left"))
        cuts.append(min(max(cut, cuts[-1]), stop))
    cuts.append(stop)

    def part(a: int, b: int) -> int:
        at = int(starts[a]) - base
        return lib.pack(arrays, a, b, memoryview(out[at : at + int(starts[b] - starts[a])]), crcs, True)

    futures = [_submit(part, a, b) for a, b in zip(cuts[1:-1], cuts[2:])]
    done = part(cuts[0], cuts[1])
    return done + sum(f.result() for f in futures)


class _Slab:
    """One slab of the pool: its bytes, and how many queued records still use it."""

    __slots__ = ("buf", "refs", "sealed")

    def __init__(self, nbytes: int) -> None:
        self.buf = np.empty(nbytes, np.uint8)
        self.refs = 0
        self.sealed = False


class SnapshotPool:
    """Host memory for snapshots: at most ``capacity`` bytes in slabs, kept and reused.

    Args:
        capacity: the pool's bytes; at least two slabs are always allowed (one
            being filled while another is written).
        slab_bytes: each slab's size (``snapshot_slab_bytes``); smaller when
            ``capacity`` holds fewer than two.
    """

    def __init__(self, capacity: int, slab_bytes: int | None = None) -> None:
        if capacity <= 0:
            raise InvalidArgumentError(f"snapshot_bytes must be positive, not {capacity}")
        slab = slab_bytes or config.get("snapshot_slab_bytes")
        slab = max(4096, min(slab, capacity // 2))
        self.slab_bytes = slab
        self.capacity = capacity
        self.max_slabs = max(2, capacity // slab)
        self._slabs: list[_Slab] = []
        self._free: list[_Slab] = []
        self._cond = threading.Condition()
        self._stopped = False
        #: capture seconds spent waiting for a slab to be written (the pool was full)
        self.waited = 0.0
        #: called (outside the lock) before the capture first waits for a slab: starts the writing
        self.on_full: Callable[[], None] | None = None

    @property
    def allocated_bytes(self) -> int:
        """Bytes the pool holds now (never more than ``max_slabs`` slabs)."""
        return len(self._slabs) * self.slab_bytes

    def begin(self) -> None:
        """Starts a save: every slab is free again (the previous save and its capture are over)."""
        with self._cond:
            for slab in self._slabs:
                slab.refs, slab.sealed = 0, False
            self._free = list(self._slabs)
            self._stopped = False
            self.waited = 0.0

    def stop(self) -> None:
        """The save failed: a capture waiting for a slab raises instead of waiting."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def acquire(self) -> _Slab:
        """A free slab: a reused one, a new one while under the cap, or the next one written."""
        with self._cond:
            full = not self._free and len(self._slabs) >= self.max_slabs
        if full and self.on_full is not None:
            self.on_full()  # nothing is freed unless the writing has started
        with self._cond:
            t0 = None
            while True:
                if self._stopped:
                    raise _Stopped()
                if self._free:
                    slab = self._free.pop()
                    break
                if len(self._slabs) < self.max_slabs:
                    slab = _Slab(self.slab_bytes)
                    self._slabs.append(slab)
                    break
                if t0 is None:
                    t0 = time.perf_counter()
                self._cond.wait()
            if t0 is not None:
                self.waited += time.perf_counter() - t0
            slab.refs, slab.sealed = 0, False
            return slab

    def ref(self, slab: _Slab) -> Callable[[], None]:
        """Counts one more record using ``slab``; returns the callback that ends that use."""
        with self._cond:
            slab.refs += 1
        done = False

        def unref() -> None:
            nonlocal done
            with self._cond:
                if done:
                    return
                done = True
                slab.refs -= 1
                self._release_if_idle(slab)

        return unref

    def seal(self, slab: _Slab) -> None:
        """The capture has moved past ``slab``: it is free once its records are written."""
        with self._cond:
            slab.sealed = True
            self._release_if_idle(slab)

    def _release_if_idle(self, slab: _Slab) -> None:
        if slab.sealed and slab.refs == 0 and slab not in self._free:
            self._free.append(slab)
            self._cond.notify()

    def close(self) -> None:
        """Drops every slab (the memory goes back once no record refers to it)."""
        with self._cond:
            self._slabs, self._free = [], []
            self._stopped = True
            self._cond.notify_all()


class Recorder:
    """Takes a backend's writes for one device group: copies their bytes into the pool, queues the records.

    It offers what backends call on a :class:`~gpusaver.format.BundleWriter`
    (``add_many``, ``add``, ``add_raw``, ``add_packed``, ``add_packed_run``,
    ``packs_runs``) and ``add_slice``; each returns once the bytes are copied, so
    the caller may reuse or change its buffers right away.
    """

    def __init__(self, pool: SnapshotPool) -> None:
        self._pool = pool
        self.feed: "queue.SimpleQueue[tuple[Any, ...]]" = queue.SimpleQueue()
        self._lib = native.lib
        self._pack_limit = config.get("pack_limit")
        self._slab: _Slab | None = None
        self._used = 0
        self.captured = 0  # bytes copied

    # ------------------------------------------------------------ the slabs
    def _room(self) -> tuple[_Slab, int, int]:
        """The current slab, where its free space starts and how much there is (a new slab if full)."""
        slab = self._slab
        if slab is None or self._used >= len(slab.buf):
            if slab is not None:
                self._pool.seal(slab)
                self._slab = None
            slab = self._slab = self._pool.acquire()
            self._used = 0
        return slab, self._used, len(slab.buf) - self._used

    def _put(self, record: tuple[Any, ...], slab: _Slab | None = None) -> None:
        """Queues a record; with ``slab``, the record's last element is the callback that ends its use."""
        if slab is not None:
            record = record + (self._pool.ref(slab),)
        self.feed.put(record)

    def _copy_bytes(self, src: memoryview) -> None:
        """Copies ``src`` into slabs as ``chunk`` records (a raw tensor's bytes)."""
        n, done = len(src), 0
        source = np.frombuffer(src, np.uint8) if n else None
        while done < n:
            slab, at, room = self._room()
            k = min(room, n - done)
            _copy(slab.buf[at : at + k], source[done : done + k])  # type: ignore[index]
            self._used += k
            self._put(("chunk", memoryview(slab.buf[at : at + k])), slab)
            done += k
        self.captured += n

    def close(self) -> None:
        """The group is captured: seals the last slab and ends the feed."""
        if self._slab is not None:
            self._pool.seal(self._slab)
            self._slab = None
        self.feed.put(_END)

    def fail(self, error: BaseException) -> None:
        """The capture failed: the replay raises ``error`` instead of committing anything."""
        if self._slab is not None:
            self._pool.seal(self._slab)
            self._slab = None
        self.feed.put(("abort", error))

    # -------------------------------------------------- the writer's methods
    @property
    def packs_runs(self) -> bool:
        return self._lib is not None

    def add(self, name: str, array: Any) -> None:
        arr = np.asarray(array)
        if arr.dtype.kind == "O" or arr.dtype.kind in "SU":
            self._put(("add", name, arr.copy()))  # strings: Python objects, immutable, copied by reference
            return
        if not arr.flags.c_contiguous or arr.dtype.byteorder == ">":
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        self.add_raw(name, arr.dtype, arr.shape, [(byte_view(arr), None)])

    def add_raw(
        self,
        name: str,
        dtype: Any,
        shape: Sequence[int],
        chunks: Any,
        crc32c: int | None = None,
    ) -> None:
        dtype = np.dtype(dtype)
        dtypes.from_numpy(dtype, tensor=name)  # an unsupported dtype fails here, not in the background
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        self._put(("raw", name, dtype, tuple(shape), crc32c, nbytes))
        try:
            for buf, done in chunks:
                try:
                    self._copy_bytes(memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf)
                finally:
                    if done is not None:
                        done()  # copied: the backend may reuse its buffer now
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def add_slice(self, name: str, full_shape: Any, slice_spec: str, array: Any) -> None:
        """A region of a partitioned tensor: copied whole (outside the pool), written as a slice."""
        self._put(("slice", name, tuple(full_shape), slice_spec, np.array(array, copy=True)))

    def add_packed(self, tensors: Sequence[tuple[str, Any, Sequence[int], Any, int | None]], done: Any = None) -> None:
        try:
            for name, dtype, shape, buf, checksum in tensors:
                self.add_raw(name, dtype, shape, [(buf, None)], crc32c=checksum)
        finally:
            if done is not None:
                done()

    def add_packed_run(
        self,
        keys: list[bytes],
        enums: np.ndarray,
        sizes: np.ndarray,
        ndims: np.ndarray,
        dims: np.ndarray,
        crcs: np.ndarray,
        buf: Any,
        done: Any = None,
    ) -> None:
        try:
            view = np.frombuffer(memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf, np.uint8)
            sizes = np.asarray(sizes, np.int64)
            starts = np.zeros(len(keys) + 1, np.int64)
            np.cumsum(sizes, out=starts[1:])
            dim_at = np.zeros(len(keys) + 1, np.int64)
            np.cumsum(ndims, out=dim_at[1:])
            a = 0
            while a < len(keys):
                slab, at, room = self._room()
                # as many whole tensors as fit in the slab's free space
                b = int(np.searchsorted(starts, starts[a] + room, side="right")) - 1
                if b <= a:
                    if room < self._pool.slab_bytes and sizes[a] <= self._pool.slab_bytes:
                        self._pool.seal(slab)  # the next tensor fits a fresh slab: start one
                        self._slab = None
                        continue
                    # larger than a slab: its bytes as a raw tensor, its known crc kept
                    name = keys[a].decode("utf-8")
                    dtype = dtypes.to_numpy(int(enums[a]))
                    shape = tuple(int(d) for d in dims[dim_at[a] : dim_at[a + 1]])
                    self._put(("raw", name, dtype, shape, int(crcs[a]), int(sizes[a])))
                    self._copy_bytes(memoryview(view[starts[a] : starts[a + 1]]))
                    a += 1
                    continue
                n = int(starts[b] - starts[a])
                slab.buf[at : at + n] = view[starts[a] : starts[b]]
                self._used += n
                self.captured += n
                self._put(
                    (
                        "run", keys[a:b], enums[a:b], sizes[a:b], ndims[a:b], dims[dim_at[a] : dim_at[b]],
                        np.array(crcs[a:b], np.uint32), memoryview(slab.buf[at : at + n]),
                    ),
                    slab,
                )
                a = b
        finally:
            if done is not None:
                done()

    def add_many(
        self,
        names: Sequence[Any],
        arrays: Sequence[Any],
        fallback: Callable[[Any, Any], None] | None = None,
        *,
        checked: Any = None,  # BundleWriter.add_many's: not used here (the writer checks the runs it is fed)
    ) -> None:
        add = fallback or (lambda name, arr: self.add(name.decode("utf-8") if isinstance(name, bytes) else name, arr))
        keys = [n if type(n) is bytes else str(n).encode("utf-8") for n in names]
        lib = self._lib
        if lib is None:
            for name, arr in zip(names, arrays):
                add(name, arr)
            return
        enums, sizes, ndims, dims = lib.describe(arrays, native.type_codes())
        n = len(keys)
        dim_at = np.zeros(n + 1, np.int64)
        np.cumsum(ndims, out=dim_at[1:])
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(sizes, out=starts[1:])
        # packed below this: never more than a slab, so a small tensor always fits a fresh one
        small = (enums >= 0) & (sizes < min(self._pack_limit, self._pool.slab_bytes))
        crcs = np.zeros(n, np.uint32)
        i = 0
        while i < n:
            if not small[i]:
                if enums[i] >= 0:  # a large numeric tensor: its bytes, checksummed in the background
                    arr = arrays[i]
                    self._put(("raw", keys[i].decode("utf-8"), arr.dtype, tuple(arr.shape), None, int(sizes[i])))
                    self._copy_bytes(byte_view(arr))
                else:
                    add(names[i], arrays[i])
                i += 1
                continue
            stop = i + 1  # a run of small tensors: packed with their crc32c by the C extension
            while stop < n and small[stop]:
                stop += 1
            while i < stop:
                slab, at, room = self._room()
                b = min(stop, int(np.searchsorted(starts, starts[i] + room, side="right")) - 1)
                if b <= i:  # the next tensor does not fit the rest of this slab: start a fresh one
                    self._pool.seal(slab)
                    self._slab = None
                    continue
                total = _pack(lib, arrays, i, b, slab.buf[at:], crcs, starts)
                self._used += total
                self.captured += total
                self._put(
                    (
                        "run", keys[i:b], enums[i:b], sizes[i:b], ndims[i:b], dims[dim_at[i] : dim_at[b]],
                        crcs[i:b].copy(), memoryview(slab.buf[at : at + total]),
                    ),
                    slab,
                )
                i = b


class ReplayGroup:
    """A device group whose "backend" replays a :class:`Recorder`'s records onto the pipeline's writer."""

    def __init__(self, device: Any, recorder: Recorder) -> None:
        self.device = device
        self.backend = self
        self._feed = recorder.feed

    def tensors(self) -> TensorList:
        return TensorList(())

    def save_group(self, tensors: Sequence[Any], writer: Any) -> None:
        feed = self._feed
        while True:
            record = feed.get()
            kind = record[0]
            if kind == "end":
                return
            if kind == "abort":
                raise record[1]
            if kind == "run":
                _, keys, enums, sizes, ndims, dims, crcs, view, done = record
                writer.add_packed_run(list(keys), enums, sizes, ndims, dims, crcs, view, done=done)
            elif kind == "raw":
                _, name, dtype, shape, checksum, nbytes = record
                writer.add_raw(name, dtype, shape, self._chunks(nbytes), crc32c=checksum)
            elif kind == "add":
                writer.add(record[1], record[2])
            elif kind == "slice":
                writer.add_slice(*record[1:])
            else:  # pragma: no cover - a record this module never makes
                raise GpuSaverError(f"unknown snapshot record {kind!r}")

    def _chunks(self, nbytes: int) -> Iterator[tuple[memoryview, Callable[[], None]]]:
        left = nbytes
        while left > 0:
            record = self._feed.get()
            if record[0] == "abort":
                raise record[1]
            if record[0] != "chunk":  # pragma: no cover - the recorder queues a raw tensor's chunks together
                raise GpuSaverError(f"snapshot record {record[0]!r} inside a tensor's bytes")
            _, view, done = record
            left -= len(view)
            yield view, done
