"""The GPU backend: CuPy arrays, pinned host staging, async copies, CUDA kernels.

Save, per GPU, on a stream of its own:

* the crc32c of every tensor is computed on the device in one kernel launch
  (:func:`gpusaver._kernels.crc32c_ranges`), so the host never checksums;
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
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from gpusaver import config, nvml
from gpusaver.devices import DeviceSpec
from gpusaver.errors import (
    ChecksumError,
    CorruptCheckpointError,
    InsufficientDeviceMemoryError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
)
from gpusaver.format import BundleReader, BundleWriter, crc
from gpusaver.format.reader import read_exact

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
            self._free.append(slot)
            self._cond.notify()

    def view(self, slot: int) -> np.ndarray:
        return self._views[slot]

    def ptr(self, slot: int) -> int:
        return int(self._mems[slot].ptr)


class _DeviceState:
    """Per-GPU resources, created on first use and kept: stream, pinned ring, staging slab."""

    def __init__(self, cupy: Any, device_id: int) -> None:
        with cupy.cuda.Device(device_id):
            self.stream = cupy.cuda.Stream(non_blocking=True)
            self.ring = PinnedRing(cupy)
            self.slab = cupy.empty(self.ring.slot_bytes, dtype=cupy.uint8)
        self.lock = threading.Lock()  # one save or restore per device at a time


def _overlapping(arrays: list[Any]) -> bool:
    """Whether any two of these C-contiguous device arrays share bytes."""
    spans = sorted((int(a.device.id), int(a.data.ptr), int(a.data.ptr) + int(a.nbytes)) for a in arrays if a.nbytes)
    return any(a[0] == b[0] and b[1] < a[2] for a, b in zip(spans, spans[1:]))


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
        if not tensors:
            return
        cp = self._cp
        device_id = int(tensors[0][1].device.id)
        state = self._state(device_id)
        with state.lock, cp.cuda.Device(device_id), self._ordered(state):
            arrays = [a if a.flags.c_contiguous else None for _, a in tensors]
            crcs = self._device_crcs([a for a in arrays if a is not None and a.nbytes], state)
            crc_iter = iter(crcs)
            batch: list[tuple[str, Any, int | None]] = []
            batch_bytes = 0
            small_limit = config.get("device_small_bytes")
            for (name, arr), contiguous in zip(tensors, arrays):
                checksum = next(crc_iter) if contiguous is not None and arr.nbytes else (0 if arr.nbytes == 0 else None)
                if contiguous is not None and arr.nbytes < small_limit:
                    if batch_bytes + arr.nbytes > state.ring.slot_bytes:
                        self._write_packed(batch, writer, state)
                        batch, batch_bytes = [], 0
                    batch.append((name, arr, checksum))
                    batch_bytes += arr.nbytes
                    continue
                self._write_packed(batch, writer, state)
                batch, batch_bytes = [], 0
                writer.add_raw(name, arr.dtype, arr.shape, self._chunks(arr, state), crc32c=checksum)
            self._write_packed(batch, writer, state)
            state.stream.synchronize()

    def _device_crcs(self, arrays: list[Any], state: _DeviceState) -> list[int]:
        if not arrays:
            return []
        from gpusaver import _kernels

        out = _kernels.crc32c_ranges(arrays, stream=state.stream)
        return [int(c) for c in out.get(stream=state.stream)]

    def _write_packed(self, batch: list[tuple[str, Any, int | None]], writer: BundleWriter, state: _DeviceState) -> None:
        """Packs small tensors with one kernel, copies them with one D2H copy, writes each."""
        if not batch:
            return
        from gpusaver import _kernels

        cp = self._cp
        offsets, pos = [], 0
        for _, arr, _ in batch:
            offsets.append(pos)
            pos += arr.nbytes
        nonempty = [(arr, off) for (_, arr, _), off in zip(batch, offsets) if arr.nbytes]
        slot = state.ring.acquire()
        try:
            if nonempty:
                _kernels.pack([a for a, _ in nonempty], state.slab, [o for _, o in nonempty], stream=state.stream)
                cp.cuda.runtime.memcpyAsync(
                    state.ring.ptr(slot), state.slab.data.ptr, pos, cp.cuda.runtime.memcpyDeviceToHost, state.stream.ptr
                )
            state.stream.synchronize()
        except BaseException:
            state.ring.release(slot)
            raise
        host = state.ring.view(slot)
        tensors = [
            (name, arr.dtype, arr.shape, memoryview(host[off : off + arr.nbytes]), checksum)
            for (name, arr, checksum), off in zip(batch, offsets)
        ]
        # One run, one write; the slot comes back once it is on disk (or on failure).
        writer.add_packed(tensors, done=lambda: state.ring.release(slot))

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
                    state.stream.synchronize()
                    state.ring.release(slot)
                    raise
                pending.append((slot, n, event))
                if len(pending) > 1:
                    yield self._ready(pending.popleft(), state)
            while pending:
                yield self._ready(pending.popleft(), state)
        finally:  # the consumer stopped early (a failed write): give back what it never took
            while pending:
                slot, _, event = pending.popleft()
                event.synchronize()
                state.ring.release(slot)

    @staticmethod
    def _ready(item: tuple[int, int, Any], state: _DeviceState) -> tuple[memoryview, Any]:
        slot, n, event = item
        event.synchronize()
        return memoryview(state.ring.view(slot)[:n]), (lambda: state.ring.release(slot))

    # -------------------------------------------------------------- restore
    def restore_group(self, reader: BundleReader, tensors: Sequence[tuple[str, Any]], *, sequential: bool) -> None:
        if not tensors:
            return
        cp = self._cp
        device_id = int(tensors[0][1].device.id)
        state = self._state(device_id)
        with state.lock, cp.cuda.Device(device_id), self._ordered(state):
            small: list[tuple[str, Any]] = []
            small_bytes = 0
            small_limit = config.get("device_small_bytes")
            try:
                for name, arr in tensors:
                    entry = reader.entry(name)
                    if entry.slices or reader.big_endian:  # get_tensor assembles slices and converts byte order
                        arr[...] = cp.asarray(reader.get_tensor(name).reshape(arr.shape))
                    elif not arr.flags.c_contiguous:
                        self._restore_strided(reader, name, arr, state)
                    elif arr.nbytes < small_limit and not sequential:
                        if small_bytes + arr.nbytes > state.ring.slot_bytes:
                            self._restore_small(reader, small, state)
                            small, small_bytes = [], 0
                        small.append((name, arr))
                        small_bytes += arr.nbytes
                    else:
                        self._restore_large(reader, name, arr, state)
            except ChecksumError:
                # The small tensors still waiting come before the damaged one: restore them
                # first (a damaged one among them is earlier still, and is raised instead).
                self._restore_small(reader, small, state)
                raise
            self._restore_small(reader, small, state)
            state.stream.synchronize()

    def _restore_small(self, reader: BundleReader, items: list[tuple[str, Any]], state: _DeviceState) -> None:
        """Reads small tensors into one pinned run, one H2D copy, one unpack launch."""
        if not items:
            return
        from gpusaver import _kernels

        if _overlapping([arr for _, arr in items]):
            # Views that share memory cannot be scattered by one launch: copy them in turn.
            for name, arr in items:
                self._restore_large(reader, name, arr, state)
            return
        cp = self._cp
        slot = state.ring.acquire()
        try:
            host = state.ring.view(slot)
            offsets, pos = [], 0
            damaged: ChecksumError | None = None
            for k, (name, arr) in enumerate(items):
                try:
                    reader.read_into(name, host[pos : pos + arr.nbytes])  # crc verified here
                except ChecksumError as e:  # the ones before it are verified: they still go to the GPU
                    damaged, items = e, items[:k]
                    break
                offsets.append(pos)
                pos += arr.nbytes
            if pos:
                cp.cuda.runtime.memcpyAsync(
                    state.slab.data.ptr, state.ring.ptr(slot), pos, cp.cuda.runtime.memcpyHostToDevice, state.stream.ptr
                )
                nonempty = [(arr, off) for (_, arr), off in zip(items, offsets) if arr.nbytes]
                _kernels.unpack(state.slab, [a for a, _ in nonempty], [o for _, o in nonempty], stream=state.stream)
        finally:
            state.stream.synchronize()  # no copy may still read the buffer we give back
            state.ring.release(slot)
        if damaged is not None:
            raise damaged

    def _restore_strided(self, reader: BundleReader, name: str, arr: Any, state: _DeviceState) -> None:
        """A non-contiguous destination, a block of leading rows at a time through the staging slab.

        Each block's bytes are contiguous in the file (C order): read into a
        pinned buffer, copied into the slab, then scattered by ``arr[rows] = block``
        on the device. No device memory is allocated unless one row exceeds the slab.
        """
        cp = self._cp
        rows = arr.shape[0] if arr.ndim else 1
        row_bytes = arr.nbytes // rows if rows else 0
        if arr.ndim == 0 or row_bytes > state.ring.slot_bytes:
            tmp = cp.empty(arr.shape, dtype=arr.dtype)
            self._restore_large(reader, name, tmp, state)
            arr[...] = tmp
            return
        entry = reader.entry(name)
        fd, offset, size, path = reader.data_location(name, entry)
        if size != arr.nbytes:
            raise CorruptCheckpointError(
                f"tensor {name!r} in {path!r} has {size} bytes stored; its shape and dtype need {arr.nbytes}", path
            )
        step = max(1, state.ring.slot_bytes // row_bytes)
        running = 0
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            n = (stop - start) * row_bytes
            slot = state.ring.acquire()
            try:
                view = state.ring.view(slot)[:n]
                read_exact(fd, memoryview(view), offset + start * row_bytes, path)
                running = crc.extend(running, view)
                cp.cuda.runtime.memcpyAsync(
                    state.slab.data.ptr, state.ring.ptr(slot), n, cp.cuda.runtime.memcpyHostToDevice, state.stream.ptr
                )
                arr[start:stop] = state.slab[:n].view(arr.dtype).reshape((stop - start,) + arr.shape[1:])
            finally:
                state.stream.synchronize()  # the slab and the pinned buffer are free again
                state.ring.release(slot)
        expected = crc.unmask(entry.crc32c)
        if running != expected:
            raise ChecksumError(path, name, expected, running)

    def _restore_large(self, reader: BundleReader, name: str, arr: Any, state: _DeviceState) -> None:
        """File -> pinned chunk -> H2D copy into ``arr``'s memory; the next read overlaps the copy."""
        cp = self._cp
        entry = reader.entry(name)
        fd, offset, size, path = reader.data_location(name, entry)
        if size != arr.nbytes:
            raise CorruptCheckpointError(
                f"tensor {name!r} in {path!r} has {size} bytes stored; its shape and dtype need {arr.nbytes}",
                path,
            )
        base = int(arr.data.ptr)
        running = 0
        in_flight: collections.deque = collections.deque()
        try:
            for off in range(0, size, state.ring.slot_bytes):
                n = min(state.ring.slot_bytes, size - off)
                if len(in_flight) >= 2:
                    slot_done, event = in_flight.popleft()
                    event.synchronize()
                    state.ring.release(slot_done)
                slot = state.ring.acquire()
                view = state.ring.view(slot)[:n]
                try:
                    read_exact(fd, memoryview(view), offset + off, path)
                    running = crc.extend(running, view)
                    cp.cuda.runtime.memcpyAsync(
                        base + off, state.ring.ptr(slot), n, cp.cuda.runtime.memcpyHostToDevice, state.stream.ptr
                    )
                except BaseException:
                    state.ring.release(slot)
                    raise
                event = cp.cuda.Event(block=False, disable_timing=True)
                event.record(state.stream)
                in_flight.append((slot, event))
        finally:
            while in_flight:
                slot_done, event = in_flight.popleft()
                event.synchronize()
                state.ring.release(slot_done)
        expected = crc.unmask(entry.crc32c)
        if running != expected:
            raise ChecksumError(path, name, expected, running)

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
            state = self._state(device_id)
            with state.lock, self._ordered(state):
                out = cp.empty(entry.shape, dtype=dtype)  # allocated on the backend's stream
                if out.nbytes:
                    self._restore_large(reader, name, out, state)
                state.stream.synchronize()
            return out

    def assign(self, array: Any, value: np.ndarray) -> None:
        state = self._state(array.device.id)
        with self._ordered(state):
            if array.flags.c_contiguous:
                array.set(np.ascontiguousarray(value).reshape(array.shape), stream=state.stream)
            else:
                array[...] = self._cp.asarray(value)
        state.stream.synchronize()

    def check_restore_memory(self, device: DeviceSpec, tensors: Sequence[tuple[str, Any]], reader: BundleReader) -> None:
        """The slab (first use only) plus temporaries: partitioned arrays, and strided ones
        whose single row does not fit the slab."""
        state = self._states.get(device.index)
        slot_bytes = state.ring.slot_bytes if state is not None else config.get("slot_bytes")
        need = 0 if state is not None else slot_bytes
        for name, arr in tensors:
            rows = arr.shape[0] if arr.ndim else 1
            wide = not arr.flags.c_contiguous and (arr.ndim == 0 or (rows and arr.nbytes // rows > slot_bytes))
            if wide or reader.entry(name).slices:
                need += int(arr.nbytes)
        self.check_free_memory(device, need)

    def check_free_memory(self, device: DeviceSpec, nbytes: int) -> None:
        """Raises before any copy if ``nbytes`` of new device memory would not fit."""
        with self._cp.cuda.Device(device.index):
            free, _total = self._cp.cuda.runtime.memGetInfo()
        if nbytes > free:
            raise InsufficientDeviceMemoryError(
                f"restoring needs {nbytes} bytes on {device.short} but only {free} are free"
            )
