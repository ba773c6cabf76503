"""The GPU backend: CuPy arrays, pinned host staging, async copies, CUDA kernels.

Save, per GPU, on a stream of its own:

* the crc32c of every tensor is computed on the device in one kernel launch
  (:func:`gpusaver.cuda.kernels.crc32c_ranges`), so the host never checksums;
* small tensors are packed by one kernel launch into a device staging slab,
  copied to a pinned host buffer in one copy, and written as one run;
* large tensors are copied in chunks into a ring of pinned host buffers
  (allocated once per device, reused across saves); the copy of chunk i+1
  overlaps the write of chunk i by the writer threads, which hand each buffer
  back to the ring once it is on disk.

Restore, per GPU: file ranges are read into pinned buffers and copied to the
destination arrays' own memory asynchronously; small tensors travel as one
contiguous run and an unpack kernel scatters them. Checksums are verified as
the bytes are read. Device memory used beyond the arrays: one staging slab.

Every CUDA call is checked (CuPy raises ``CUDARuntimeError``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from gpusaver import config
from gpusaver.cuda import nvml
from gpusaver.backends.base import TensorList, describe
from gpusaver.devices import DeviceSpec
from gpusaver.errors import (
    ChecksumError,
    CorruptCheckpointError,
    InsufficientDeviceMemoryError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
)
from gpusaver.format import BundleReader, BundleWriter, crc
from gpusaver.storage import read_exact, read_workers

__all__ = ["CupyBackend", "probe", "PinnedRing"]

# The pinned buffers' size and count (slot_bytes, slots; also the device staging slab's size) are
# settings (gpusaver.config), read when a device is first used; the packing limit
# (device_small_bytes) is read at each save and restore.


def probe() -> str | None:
    """None when CuPy can use a GPU here, else the reason it cannot."""
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - any import failure means no CuPy
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - no driver, no device, ...
        return f"no usable CUDA driver or GPU ({type(e).__name__}: {e})"
    if count <= 0:
        return "no CUDA GPU is present"
    return None


class PinnedRing:
    """A fixed set of pinned host buffers, handed out and given back in any order."""

    def __init__(self, cupy: Any, slots: int | None = None, slot_bytes: int | None = None) -> None:
        slots = config.get("slots") if slots is None else slots
        slot_bytes = config.get("slot_bytes") if slot_bytes is None else slot_bytes
        if slots < 2:
            raise InvalidArgumentError("the pinned ring needs at least 2 buffers (one copying while one is written)")
        self.slot_bytes = slot_bytes
        self._mems = [cupy.cuda.alloc_pinned_memory(slot_bytes) for _ in range(slots)]
        self._views = [np.frombuffer(m, dtype=np.uint8, count=slot_bytes) for m in self._mems]
        self._free = collections.deque(range(slots))
        self._cond = threading.Condition()

    def acquire(self) -> int:
        """Blocks until a buffer is free; returns its slot number."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.popleft()

    def release(self, slot: int) -> None:
        with self._cond:
            if slot not in self._free:
                self._free.append(slot)
                self._cond.notify()

    @property
    def slots(self) -> int:
        return len(self._mems)

    def view(self, slot: int) -> np.ndarray:
        return self._views[slot]

    def ptr(self, slot: int) -> int:
        return int(self._mems[slot].ptr)


class _DeviceState:
    """Per-GPU resources, created on first use and kept: stream, pinned ring, staging slab."""

    def __init__(self, cupy: Any, device_id: int) -> None:
        self.device_id = device_id
        with cupy.cuda.Device(device_id):
            self.stream = cupy.cuda.Stream(non_blocking=True)
            self.ring = PinnedRing(cupy)
            self.slab = cupy.empty(self.ring.slot_bytes, dtype=cupy.uint8)
        self.lock = threading.Lock()  # one save or restore per device at a time

    def release(self) -> None:
        """Hands the pinned buffers and the staging slab back to CuPy's pools."""
        self.stream.synchronize()
        self.slab = None
        self.ring = None


_CHECK_BYTES_PER_TENSOR = 32
_CHECK_BYTES = 4096


def _stand_in(value: np.ndarray, array: Any) -> np.ndarray:
    """``value`` as the bits ``array`` holds: a bfloat16/float8 value viewed as the same-size integer dtype of
    the CuPy array standing in for a CUDA tensor of that type (CuPy has no such dtype)."""
    want = np.dtype(array.dtype)
    if value.dtype != want and value.dtype.itemsize == want.itemsize and value.dtype.kind == "V":
        return value.view(want)
    return value


def _runs(nbytes: np.ndarray, start: int, stop: int, limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``(a, b)`` ranges of ``start:stop`` whose bytes add up to at most ``limit`` (a tensor
    larger than ``limit`` alone in its range)."""
    ends = np.cumsum(nbytes[start:stop])
    lo, base = 0, 0
    while lo < stop - start:
        hi = max(lo + 1, int(np.searchsorted(ends, base + limit, side="right")))
        yield start + lo, start + hi
        base = int(ends[hi - 1])
        lo = hi


def _quietly(fn: Any) -> None:
    """Calls ``fn`` while another error is on its way out; its own error would only hide that one."""
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass


def _overlapping(ptrs: np.ndarray, nbytes: np.ndarray) -> bool:
    """Whether any two of these byte ranges of one device (C-contiguous arrays) share bytes."""
    keep = nbytes > 0
    starts, sizes = ptrs[keep].astype(np.uint64), nbytes[keep].astype(np.uint64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], starts[order] + sizes[order]
    return bool(np.any(starts[1:] < ends[:-1]))


class _Columns:
    """Where each tensor of a restore lies: ``ok`` (a plain entry inside its data file), shard, offset,
    size and unmasked crc32c, as arrays (decoded by the C extension when it is built)."""

    __slots__ = ("ok", "shards", "offsets", "sizes", "crcs")

    @classmethod
    def of(cls, reader: BundleReader, listed: TensorList) -> "_Columns":
        self = cls()
        cols = reader.columns(listed.keys) if not reader.big_endian else None
        if cols is not None:
            self.ok = cols.ok.astype(bool)
            self.shards, self.offsets, self.sizes = cols.shards.astype(np.int64), cols.offsets, cols.sizes
            self.crcs = cols.crcs.astype(np.uint32)
        else:
            entries = [reader.entry(name) for name in listed.names]
            n = len(entries)
            self.ok = np.fromiter((not e.slices and not reader.big_endian for e in entries), bool, n)
            self.shards = np.fromiter((e.shard_id for e in entries), np.int64, n)
            self.offsets = np.fromiter((e.offset for e in entries), np.int64, n)
            self.sizes = np.fromiter((e.size for e in entries), np.int64, n)
            self.crcs = crc.unmask_array(np.fromiter((e.crc32c for e in entries), np.uint32, n))
        # Entries past the end of their data file (or naming a missing one) take the general path.
        self.ok = reader.inside_data_files(self.shards, self.offsets, self.sizes, self.ok)
        return self


class CupyBackend:
    """CuPy arrays on NVIDIA GPUs."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self._cp = cupy
        self._states: dict[int, _DeviceState] = {}
        self._states_lock = threading.Lock()

    # ------------------------------------------------------------ placement
    def owns(self, array: Any) -> bool:
        return isinstance(array, self._cp.ndarray)

    def default_device(self, array: Any) -> DeviceSpec:
        return DeviceSpec(device_type="GPU", index=int(array.device.id))

    def check_device(self, array: Any, device: DeviceSpec) -> None:
        if not device.is_gpu or device.index != int(array.device.id):
            raise InvalidArgumentError(
                f"a CuPy array on /gpu:{array.device.id} cannot be placed on {device.short}; "
                "copy it there first"
            )

    def dtype(self, array: Any) -> np.dtype:
        return np.dtype(array.dtype)

    def _state(self, device_id: int) -> _DeviceState:
        with self._states_lock:
            state = self._states.get(device_id)
            if state is None:
                state = self._states[device_id] = _DeviceState(self._cp, device_id)
            return state

    @contextlib.contextmanager
    def _locked(self, device_id: int) -> Iterator[_DeviceState]:
        """The device's state, locked for one save or restore; made again if a close() released it
        between the lookup and the lock."""
        while True:
            state = self._state(device_id)
            with state.lock:
                if state.ring is not None:
                    yield state
                    return

    def close(self, devices: Sequence[int] | None = None) -> None:
        """Releases the pinned host buffers and the device staging slab of these GPUs (default: all).

        They are made again on the next save or restore. Waits for a save or restore in flight on them.
        """
        with self._states_lock:
            ids = list(self._states) if devices is None else [d for d in devices if d in self._states]
            states = [self._states.pop(d) for d in ids]
        for state in states:
            with state.lock, self._cp.cuda.Device(state.device_id):
                state.release()
        pinned = getattr(self._cp, "get_default_pinned_memory_pool", None)
        if states and pinned is not None:
            pinned().free_all_blocks()

    @contextlib.contextmanager
    def _ordered(self, state: _DeviceState) -> Iterator[None]:
        """Runs the block on the backend's stream, after all work queued on the caller's.

        Temporaries, ``arr[...] = tmp`` and allocations inside the block then go
        on the backend's stream too, ordered with its copies and kernels.
        """
        cp = self._cp
        state.stream.wait_event(cp.cuda.get_current_stream().record())
        with state.stream:
            yield

    def thread_init(self, device: DeviceSpec) -> None:
        """Keeps the calling (writer) thread on CPUs near the GPU, where NVML says which.

        NVML numbers GPUs its own way (CUDA_VISIBLE_DEVICES does not apply), so the
        CUDA device is matched to NVML's by PCI bus id.
        """
        gpu = nvml.by_pci_bus_id(self._cp.cuda.Device(device.index).pci_bus_id)
        if gpu is not None:
            nvml.pin_current_thread_near(gpu.index)

    # ----------------------------------------------------------------- save
    def save_group(self, tensors: Sequence[tuple[str, Any]], writer: BundleWriter) -> None:
        """Saves one GPU's tensors: crc32c of all of them in one launch, small ones packed on the device
        into pinned runs (one copy and one write each), large ones copied in pinned chunks while the
        writer threads write the previous ones."""
        if not tensors:
            return
        cp = self._cp
        listed = tensors if isinstance(tensors, TensorList) else TensorList(tensors)
        arrays = listed.arrays
        device_id = int(arrays[0].device.id)
        with self._locked(device_id) as state, cp.cuda.Device(device_id), self._ordered(state):
            n = len(arrays)
            # One pass over the arrays' attributes; the rest is vectorised.
            contiguous = np.fromiter((a.flags.c_contiguous for a in arrays), bool, n)
            nbytes = np.fromiter((a.nbytes for a in arrays), np.int64, n)
            ptrs = np.fromiter((a.data.ptr for a in arrays), np.uint64, n)
            crcs = np.zeros(n, np.uint32)  # crc32c of no bytes is 0
            todo = np.flatnonzero(contiguous & (nbytes > 0))
            if len(todo):
                crcs[todo] = self._device_crcs(ptrs[todo], nbytes[todo], state)
            small = contiguous & (nbytes < self._small_limit(state))
            start = 0
            for stop in [*np.flatnonzero(~small).tolist(), n]:
                for a, b in _runs(nbytes, start, stop, state.ring.slot_bytes):  # each fits one pinned buffer
                    self._write_run(listed, a, b, nbytes, ptrs, crcs, writer, state)
                if stop < n:
                    name, arr = listed[stop]
                    checksum = int(crcs[stop]) if contiguous[stop] else None
                    dtype = listed.logical.get(stop, arr.dtype)
                    writer.add_raw(name, dtype, arr.shape, self._chunks(arr, state), crc32c=checksum)
                start = stop + 1
            state.stream.synchronize()

    @staticmethod
    def _small_limit(state: _DeviceState) -> int:
        """Tensors below this travel packed: the ``device_small_bytes`` setting, never above one pinned buffer."""
        return min(config.get("device_small_bytes"), state.ring.slot_bytes + 1)

    def _device_crcs(self, ptrs: np.ndarray, sizes: np.ndarray, state: _DeviceState) -> np.ndarray:
        from gpusaver.cuda import kernels as _kernels

        out = _kernels.crc32c_ranges(ptrs, sizes, stream=state.stream, device_id=state.device_id)
        return np.asarray(out.get(stream=state.stream), np.uint32)

    def _write_run(
        self,
        listed: TensorList,
        a: int,
        b: int,
        nbytes: np.ndarray,
        ptrs: np.ndarray,
        crcs: np.ndarray,
        writer: BundleWriter,
        state: _DeviceState,
    ) -> None:
        """Packs tensors ``a:b`` with one kernel, copies them with one D2H copy, writes them as one run."""
        from gpusaver.cuda import kernels as _kernels

        cp = self._cp
        sizes = nbytes[a:b]
        offsets = np.zeros(b - a, np.int64)
        np.cumsum(sizes[:-1], out=offsets[1:])
        total = int(sizes.sum())
        slot = state.ring.acquire()
        try:
            if total:
                keep = np.flatnonzero(sizes)
                _kernels.pack(_kernels.Ranges(ptrs[a:b][keep], sizes[keep]), state.slab, offsets[keep],
                              stream=state.stream)
                cp.cuda.runtime.memcpyAsync(
                    state.ring.ptr(slot), state.slab.data.ptr, total, cp.cuda.runtime.memcpyDeviceToHost,
                    state.stream.ptr,
                )
            state.stream.synchronize()
        except BaseException:
            _quietly(state.stream.synchronize)  # a copy already queued must not write into a buffer given back
            state.ring.release(slot)
            raise
        host = memoryview(state.ring.view(slot)[:total])
        done = functools.partial(state.ring.release, slot)
        arrays = listed.arrays[a:b]
        if writer.packs_runs:
            # The entries as arrays, the layout the C extension encodes: no Python object per tensor.
            logical = {i - a: dt for i, dt in listed.logical.items() if a <= i < b}
            enums, ndims, dims = describe(arrays, logical)
            writer.add_packed_run(listed.keys[a:b], enums, sizes, ndims, dims, crcs[a:b], host, done=done)
            return
        tensors = [
            (name, listed.logical.get(i, arr.dtype), arr.shape, host[int(off) : int(off) + int(size)], int(c))
            for i, (name, arr), off, size, c in zip(range(a, b), listed[a:b], offsets, sizes, crcs[a:b])
        ]
        writer.add_packed(tensors, done=done)

    def _chunks(self, arr: Any, state: _DeviceState) -> Iterator[tuple[memoryview, Any]]:
        """D2H copies of ``arr`` in slot-sized chunks, one ahead of the writer."""
        cp = self._cp
        if not arr.flags.c_contiguous:
            rows = arr.shape[0] if arr.ndim else 1
            row_bytes = max(1, arr.nbytes // max(rows, 1))
            step = max(1, state.ring.slot_bytes // row_bytes)
            for start in range(0, rows, step):
                part = cp.ascontiguousarray(arr[start : start + step] if arr.ndim else arr)
                yield from self._chunks(part, state)
            return
        base, total = int(arr.data.ptr), int(arr.nbytes)
        ahead = max(1, state.ring.slots // 2)  # copies queued before the writer takes the oldest
        pending: collections.deque = collections.deque()
        try:
            for off in range(0, total, state.ring.slot_bytes):
                n = min(state.ring.slot_bytes, total - off)
                slot = state.ring.acquire()
                try:
                    cp.cuda.runtime.memcpyAsync(
                        state.ring.ptr(slot), base + off, n, cp.cuda.runtime.memcpyDeviceToHost, state.stream.ptr
                    )
                    event = cp.cuda.Event(block=False, disable_timing=True)
                    event.record(state.stream)
                except BaseException:
                    _quietly(state.stream.synchronize)
                    state.ring.release(slot)
                    raise
                pending.append((slot, n, event))
                if len(pending) > ahead:
                    yield self._ready(pending.popleft(), state)
            while pending:
                yield self._ready(pending.popleft(), state)
        finally:  # the consumer stopped early (a failed write, a CUDA fault): give back what it never took
            while pending:
                slot, _, event = pending.popleft()
                _quietly(event.synchronize)
                state.ring.release(slot)

    @staticmethod
    def _ready(item: tuple[int, int, Any], state: _DeviceState) -> tuple[memoryview, Any]:
        slot, n, event = item
        try:
            event.synchronize()
        except BaseException:
            state.ring.release(slot)
            raise
        return memoryview(state.ring.view(slot)[:n]), functools.partial(state.ring.release, slot)

    # -------------------------------------------------------------- restore
    def restore_group(self, reader: BundleReader, tensors: Sequence[tuple[str, Any]], *, sequential: bool) -> None:
        """Restores one GPU's tensors in place.

        Small contiguous tensors travel in runs: a pinned buffer read from the file (on reader
        threads, ahead of the GPU), one H2D copy, their crc32c computed on the device and compared,
        and one unpack launch for the ones that match: a damaged small tensor keeps its old values.
        A large tensor is read in pinned chunks on reader threads, copied into a device staging
        buffer, verified there and only then copied into place; when device memory is too short
        for the staging buffer it is copied straight into place and a damaged one holds the
        unverified bytes when ChecksumError is raised. ChecksumError names the first damaged
        tensor in ``tensors`` order, once every other tensor is restored.
        """
        if not tensors:
            return
        cp = self._cp
        listed = tensors if isinstance(tensors, TensorList) else TensorList(tensors)
        arrays = listed.arrays
        device_id = int(arrays[0].device.id)
        failures: list[tuple[int, ChecksumError]] = []
        with self._locked(device_id) as state, cp.cuda.Device(device_id), self._ordered(state):
            try:
                self._restore_group(reader, listed, sequential, state, failures)
            except BaseException:  # no copy or kernel of a failed restore may land after it returns
                _quietly(state.stream.synchronize)
                raise
            state.stream.synchronize()
        if failures:
            raise min(failures, key=lambda f: f[0])[1]

    def _restore_group(
        self, reader: BundleReader, listed: TensorList, sequential: bool, state: _DeviceState,
        failures: list[tuple[int, ChecksumError]],
    ) -> None:
        cp = self._cp
        arrays = listed.arrays
        n = len(arrays)
        contiguous = np.fromiter((a.flags.c_contiguous for a in arrays), bool, n)
        nbytes = np.fromiter((a.nbytes for a in arrays), np.int64, n)
        cols = _Columns.of(reader, listed)
        small = (
            cols.ok & contiguous & (cols.sizes == nbytes) & (nbytes < self._small_limit(state))
        ) if not sequential else np.zeros(n, bool)
        ptrs = np.fromiter((a.data.ptr for a in arrays), np.uint64, n) if small.any() else None
        if ptrs is not None and _overlapping(ptrs[small], nbytes[small]):
            small[:] = False  # views sharing memory cannot be scattered by one launch: one at a time
        if small.any():
            failures += self._restore_small(reader, listed, np.flatnonzero(small & (nbytes > 0)), cols, ptrs, state)
        for i in np.flatnonzero(~small).tolist():
            name, arr = listed[i]
            try:
                if not cols.ok[i] or reader.big_endian:  # get_tensor assembles slices, converts byte order
                    entry = reader.entry(name)
                    if entry.slices or reader.big_endian:
                        arr[...] = cp.asarray(_stand_in(reader.get_tensor(name), arr).reshape(arr.shape))
                        continue
                if not arr.flags.c_contiguous:
                    self._restore_strided(reader, name, arr, state)
                else:
                    self._restore_large(reader, name, arr, state)
            except ChecksumError as e:
                failures.append((i, e))

    def _pipeline(self, jobs: list[Any], read: Any, use: Any, total: int, state: _DeviceState) -> None:
        """``read(job, slot)`` on reader threads, ahead of ``use(job, slot)`` in job order here.

        This thread takes pinned buffers in job order and hands each back once ``use`` returns, so
        the reads run ahead by as many buffers as the ring holds.
        """
        from concurrent.futures import ThreadPoolExecutor

        workers = min(read_workers(total, config.get("parallel_chunked_bytes")), len(jobs))
        if workers <= 1:
            for job in jobs:
                slot = state.ring.acquire()
                try:
                    read(job, slot)
                    use(job, slot)
                except BaseException:
                    _quietly(state.stream.synchronize)
                    raise
                finally:
                    state.ring.release(slot)
            return
        inflight: collections.deque = collections.deque()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpusaver-read") as pool:
            try:
                for job in jobs:
                    while len(inflight) >= state.ring.slots:
                        self._use_oldest(inflight, use, state)
                    slot = state.ring.acquire()
                    inflight.append((job, slot, pool.submit(read, job, slot)))
                while inflight:
                    self._use_oldest(inflight, use, state)
            finally:  # an error: let the reads in flight finish, then give their buffers back
                for _job, slot, future in inflight:
                    future.cancel()
                    _quietly(future.exception)
                    state.ring.release(slot)

    @staticmethod
    def _use_oldest(inflight: collections.deque, use: Any, state: _DeviceState) -> None:
        job, slot, future = inflight.popleft()
        try:
            future.result()
            use(job, slot)
        except BaseException:
            _quietly(state.stream.synchronize)  # a copy already queued must not read a buffer given back
            raise
        finally:
            state.ring.release(slot)

    def _restore_small(
        self,
        reader: BundleReader,
        listed: TensorList,
        which: np.ndarray,
        cols: "_Columns",
        ptrs: np.ndarray,
        state: _DeviceState,
    ) -> list[tuple[int, ChecksumError]]:
        """Runs of small tensors: read, copied to the slab, checked on the device, then unpacked."""
        from gpusaver.cuda import kernels as _kernels

        if not len(which):
            return []
        cp = self._cp
        order = which[np.lexsort((cols.offsets[which], cols.shards[which]))]
        starts = cols.offsets[order]
        sizes = cols.sizes[order]
        ends = starts + sizes
        shards = cols.shards[order]
        limit, gap = state.ring.slot_bytes, config.get("gap_bytes")
        brk = np.ones(len(order), bool)
        brk[1:] = (shards[1:] != shards[:-1]) | (starts[1:] > ends[:-1] + gap) | (starts[1:] < ends[:-1])
        cuts = np.append(np.flatnonzero(brk), len(order)).tolist()
        jobs: list[tuple[int, int]] = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):  # each run no larger than one pinned buffer
            while lo < hi:
                stop = int(np.searchsorted(ends[lo:hi], starts[lo] + limit, side="right")) + lo
                stop = max(stop, lo + 1)
                jobs.append((lo, stop))
                lo = stop
        failures: list[tuple[int, ChecksumError]] = []

        def read(job: tuple[int, int], slot: int) -> None:
            a, b = job
            fd, _, path = reader._data_file(int(shards[a]))
            lo = int(starts[a])
            read_exact(fd, memoryview(state.ring.view(slot)[: int(ends[b - 1]) - lo]), lo, path, reader.fileops)

        def use(job: tuple[int, int], slot: int) -> None:
            a, b = job
            lo = int(starts[a])
            span = int(ends[b - 1]) - lo
            slab = int(state.slab.data.ptr)
            cp.cuda.runtime.memcpyAsync(
                slab, state.ring.ptr(slot), span, cp.cuda.runtime.memcpyHostToDevice, state.stream.ptr
            )
            rel = (starts[a:b] - lo).astype(np.uint64)
            got = self._device_crcs(rel + np.uint64(slab), sizes[a:b], state)  # waits: the buffer is free again
            good = got == cols.crcs[order[a:b]]
            keep = np.flatnonzero(good)
            if len(keep):
                _kernels.unpack(state.slab, _kernels.Ranges(ptrs[order[a:b]][keep], sizes[a:b][keep]), rel[keep],
                                stream=state.stream)
            for k in np.flatnonzero(~good).tolist():
                i = int(order[a + k])
                path = reader._data_file(int(shards[a]))[2]
                failures.append((i, ChecksumError(path, listed.names[i], int(cols.crcs[i]), int(got[k]))))

        self._pipeline(jobs, read, use, int(sizes.sum()), state)
        return failures

    def _restore_strided(self, reader: BundleReader, name: str, arr: Any, state: _DeviceState) -> None:
        """A non-contiguous destination.

        Its bytes are contiguous in the file (C order). Up to one pinned buffer: read, verified, copied
        into the slab and scattered by ``arr[...] = block``, so a damaged one changes nothing. Larger:
        restored and verified in a contiguous device temporary, then scattered, when free device memory
        holds one (always when a single row exceeds the slab: the restore's memory check counted it);
        else a block of rows at a time through the slab, verified at the end (a damaged one then holds
        the file's bytes).
        """
        cp = self._cp
        entry = reader.entry(name)
        fd, offset, size, path = reader.data_location(name, entry)
        if size != arr.nbytes:
            raise CorruptCheckpointError(
                f"tensor {name!r} in {path!r} has {size} bytes stored; its shape and dtype need {arr.nbytes}", path
            )
        rows = arr.shape[0] if arr.ndim else 1
        row_bytes = arr.nbytes // rows if rows else 0
        slot_bytes = state.ring.slot_bytes
        if size <= slot_bytes:
            self._through_slab(fd, offset, size, path, arr, slice(None), reader, state, entry.crc32c, name)
            return
        wide = row_bytes > slot_bytes
        if wide or size <= self._free_bytes(state.device_id):
            try:
                tmp = cp.empty(arr.shape, dtype=arr.dtype)
            except cp.cuda.memory.OutOfMemoryError:
                if wide:
                    raise
                tmp = None
            if tmp is not None:
                self._restore_large(reader, name, tmp, state, stage=False)  # verified before arr changes
                arr[...] = tmp
                return
        step = max(1, slot_bytes // row_bytes)
        running = crc.Running(entry.crc32c, path, name)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            self._through_slab(fd, offset + start * row_bytes, (stop - start) * row_bytes, path, arr,
                               slice(start, stop), reader, state, None, name, running)
        running.check()

    def _through_slab(
        self, fd: int, offset: int, n: int, path: str, arr: Any, rows: slice, reader: BundleReader,
        state: _DeviceState, stored_crc: int | None, name: str, running: Any = None,
    ) -> None:
        """File bytes -> a pinned buffer -> (checked against ``stored_crc``, or added to ``running``) ->
        the slab -> scattered into ``arr[rows]`` on the device."""
        cp = self._cp
        slot = state.ring.acquire()
        try:
            view = state.ring.view(slot)[:n]
            read_exact(fd, memoryview(view), offset, path, reader.fileops)
            if stored_crc is not None:
                crc.check(crc.value(view), stored_crc, path, name)  # before anything changes
            else:
                running.update(view)
            cp.cuda.runtime.memcpyAsync(
                state.slab.data.ptr, state.ring.ptr(slot), n, cp.cuda.runtime.memcpyHostToDevice, state.stream.ptr
            )
            target = arr[rows]
            target[...] = state.slab[:n].view(arr.dtype).reshape(target.shape)
            state.stream.synchronize()  # the slab and the pinned buffer are free again
        except BaseException:
            _quietly(state.stream.synchronize)
            raise
        finally:
            state.ring.release(slot)

    def _restore_large(self, reader: BundleReader, name: str, arr: Any, state: _DeviceState, stage: bool = True) -> None:
        """File -> pinned chunks (reader threads) -> H2D copies -> crc32c on the device -> in place.

        With ``stage`` and room on the device, the bytes land in a staging buffer first and reach
        ``arr`` only once verified; otherwise they are copied straight into ``arr``.
        """
        cp = self._cp
        entry = reader.entry(name)
        fd, offset, size, path = reader.data_location(name, entry)
        if size != arr.nbytes:
            raise CorruptCheckpointError(
                f"tensor {name!r} in {path!r} has {size} bytes stored; its shape and dtype need {arr.nbytes}",
                path,
            )
        if size == 0:
            return
        staged = self._staging(size, state) if stage else None
        target = int(staged.data.ptr) if staged is not None else int(arr.data.ptr)
        step = state.ring.slot_bytes
        jobs = [(off, min(step, size - off)) for off in range(0, size, step)]

        def read(job: tuple[int, int], slot: int) -> None:
            off, n = job
            read_exact(fd, memoryview(state.ring.view(slot)[:n]), offset + off, path, reader.fileops)

        def use(job: tuple[int, int], slot: int) -> None:
            off, n = job
            cp.cuda.runtime.memcpyAsync(
                target + off, state.ring.ptr(slot), n, cp.cuda.runtime.memcpyHostToDevice, state.stream.ptr
            )
            state.stream.synchronize()  # the buffer is free again once this copy is done

        self._pipeline(jobs, read, use, size, state)
        actual = int(self._device_crcs(np.array([target], np.uint64), np.array([size], np.int64), state)[0])
        crc.check(actual, entry.crc32c, path, name)
        if staged is not None:
            cp.cuda.runtime.memcpyAsync(
                int(arr.data.ptr), target, size, cp.cuda.runtime.memcpyDeviceToDevice, state.stream.ptr
            )
            state.stream.synchronize()

    def _staging(self, nbytes: int, state: _DeviceState) -> Any:
        """A device buffer of ``nbytes`` for verifying a large tensor before it lands, or None if it would
        not fit in free device memory (CuPy's cached blocks included)."""
        cp = self._cp
        if nbytes > self._free_bytes(state.device_id):
            return None
        try:
            return cp.empty(nbytes, dtype=cp.uint8)
        except cp.cuda.memory.OutOfMemoryError:
            return None

    def _free_bytes(self, device_id: int) -> int:
        """Device memory free for new arrays: the driver's free bytes plus blocks cached in CuPy's pool."""
        cp = self._cp
        with cp.cuda.Device(device_id):
            free, _total = cp.cuda.runtime.memGetInfo()
            pool = getattr(cp, "get_default_memory_pool", None)
            return int(free) + (int(pool().free_bytes()) if pool is not None else 0)

    def read_tensor(self, reader: BundleReader, name: str, device_id: int) -> Any:
        """A stored tensor as a new CuPy array on GPU ``device_id``."""
        cp = self._cp
        entry = reader.entry(name)
        dtype = reader.dtype(name)
        if dtype == np.dtype(object):
            raise InvalidArgumentTypeError(f"tensor {name!r} holds strings, which CuPy cannot hold; read it without device=")
        first_use = 0 if device_id in self._states else config.get("slot_bytes")  # the staging slab
        self.check_free_memory(
            DeviceSpec(device_type="GPU", index=device_id), entry.num_elements * dtype.itemsize + first_use
        )
        with cp.cuda.Device(device_id):
            if entry.slices:
                return cp.asarray(reader.get_tensor(name))
            reader.data_location(name, entry)  # a truncated or corrupt entry is found before allocating
            if entry.size != entry.num_elements * dtype.itemsize:
                raise CorruptCheckpointError(
                    f"invalid size in the entry of tensor {name!r} in {reader.index_path!r}: {entry.size} bytes "
                    f"for shape {list(entry.shape)} of {dtype}",
                    reader.index_path,
                )
            with self._locked(device_id) as state, self._ordered(state):
                out = cp.empty(entry.shape, dtype=dtype)  # allocated on the backend's stream
                if out.nbytes:  # a new array: nothing to protect by staging
                    self._restore_large(reader, name, out, state, stage=False)
                state.stream.synchronize()
            return out

    def assign(self, array: Any, value: np.ndarray) -> None:
        state = self._state(array.device.id)
        with self._ordered(state):
            value = _stand_in(np.ascontiguousarray(value), array)
            if array.flags.c_contiguous:
                array.set(value.reshape(array.shape), stream=state.stream)
            else:
                array[...] = self._cp.asarray(value)
        state.stream.synchronize()

    def check_restore_memory(self, device: DeviceSpec, tensors: Sequence[tuple[str, Any]], reader: BundleReader) -> None:
        """The slab (first use only), the checks' small tables, and temporaries: partitioned arrays,
        and strided ones whose single row does not fit the slab. Staging buffers for verifying large
        tensors are used only when they fit, so they are not counted."""
        state = self._states.get(device.index)
        slot_bytes = state.ring.slot_bytes if state is not None else config.get("slot_bytes")
        # The slab (first use only), and the device checks' argument tables and results: about
        # 32 bytes per tensor, plus CuPy's 512-byte allocation granularity for each launch.
        need = (0 if state is not None else slot_bytes) + _CHECK_BYTES_PER_TENSOR * len(tensors) + _CHECK_BYTES
        listed = tensors if isinstance(tensors, TensorList) else TensorList(tensors)
        arrays = listed.arrays
        n = len(arrays)
        contiguous = np.fromiter((a.flags.c_contiguous for a in arrays), bool, n)
        cols = reader.columns(listed.keys) if not reader.big_endian else None
        plain = cols.ok.astype(bool) if cols is not None else np.zeros(n, bool)
        for i in np.flatnonzero(~contiguous | ~plain).tolist():
            name, arr = listed[i]
            rows = arr.shape[0] if arr.ndim else 1
            wide = not contiguous[i] and (arr.ndim == 0 or (rows and arr.nbytes // rows > slot_bytes))
            if wide or (not plain[i] and reader.entry(name).slices):
                need += int(arr.nbytes)
        self.check_free_memory(device, need)

    def check_free_memory(self, device: DeviceSpec, nbytes: int) -> None:
        """Raises before any copy if ``nbytes`` of new device memory would not fit."""
        free = self._free_bytes(device.index)
        if nbytes > free:
            raise InsufficientDeviceMemoryError(
                f"restoring needs {nbytes} bytes on {device.short} but only {free} are free"
            )
