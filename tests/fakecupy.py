"""A fake of the parts of CuPy that gpusaver's CuPy backend uses, on host memory.

"Device memory" is host memory: every pointer is a real address and every copy
is a ``ctypes.memmove``, so the backend's pointer arithmetic runs for real.
The fake keeps a registry of what each address is (device memory of GPU k,
pinned host memory, or neither) and checks every copy and every kernel range
against it *before* touching memory: a device-to-host copy into device memory,
a host-to-device copy from pageable memory, a range that runs past the end of
its buffer, memory of the wrong GPU, a stream of another device, all raise
:class:`Violation` (and are recorded in :attr:`FakeCuda.violations`, so a
violation swallowed by the code under test still fails the test).

Streams are modelled as queues. With ``deferred=True`` nothing queued on a
stream runs until the host waits for it (``Stream.synchronize``,
``Event.synchronize``, ``ndarray.get``, ``Device.synchronize``, or a stream
that waits on an event of it): the latest schedule CUDA allows. Reading a
pinned buffer before waiting for the copy into it sees stale bytes, and work
on two streams that the code did not order runs in the wrong order. With
``deferred=False`` every operation runs when it is issued: the earliest
schedule. The legacy null stream's implicit ordering with *blocking* streams
is modelled; non-blocking streams are ordered with nothing.

Fresh device memory holds ``DEVICE_FILL`` bytes and fresh pinned memory
``PINNED_FILL`` bytes, so reads of never-written memory are visible.

The CUDA kernels of :mod:`gpusaver.cuda.kernels` are replaced by
:meth:`FakeCuda.pack`, :meth:`FakeCuda.unpack` and
:meth:`FakeCuda.crc32c_ranges`: the same signatures and argument checks (the
real launchers' own validation helpers are reused), executed on the stream's
queue on the real addresses.

Usage (in a test)::

    fake = fakecupy.FakeCuda(device_count=2, deferred=True)
    fakecupy.install(monkeypatch, fake)   # sys.modules["cupy"] and the kernels
    cp = fake.module
    with cp.cuda.Device(1):
        a = cp.asarray(np.arange(10))
    ...
    fake.check()                          # no violations

Deliberately stricter than CUDA in two places, both of which a correct
backend satisfies: an asynchronous copy must use a stream of the current
device, and its host side must be pinned memory.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import itertools
import sys
import threading
import types
import weakref
from typing import Any, Callable, Iterable, Sequence

import crc32c as _crc32c
import numpy as np

__all__ = ["DEVICE_FILL", "PINNED_FILL", "FakeCuda", "PinnedMemoryPointer", "Violation", "install"]

#: The byte fresh device memory holds (``cupy.empty`` does not clear memory).
DEVICE_FILL = 0xA5
#: The byte fresh pinned host memory holds.
PINNED_FILL = 0x5A
_ALIGN = 256  # cudaMalloc's alignment

# cudaMemcpyKind
memcpyHostToHost = 0
memcpyHostToDevice = 1
memcpyDeviceToHost = 2
memcpyDeviceToDevice = 3
memcpyDefault = 4
_KIND_NAMES = {0: "HostToHost", 1: "HostToDevice", 2: "DeviceToHost", 3: "DeviceToDevice", 4: "Default"}


class Violation(AssertionError):
    """A misuse of CUDA that real hardware might not report, or would report as a crash."""


class CUDARuntimeError(RuntimeError):
    """``cupy.cuda.runtime.CUDARuntimeError``."""

    def __init__(self, status: int, message: str = "") -> None:
        self.status = status
        super().__init__(f"cudaError {status}: {message}")


class OutOfMemoryError(MemoryError):
    """``cupy.cuda.memory.OutOfMemoryError``."""

    def __init__(self, size: int, total: int) -> None:
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes).")


class CompileException(Exception):
    """``cupy.cuda.compiler.CompileException``."""


class PinnedMemoryPointer(bytearray):
    """``cupy.cuda.PinnedMemoryPointer``: ``.ptr``, ``.size``, and the buffer protocol."""

    ptr: int
    size: int


class _Allocation:
    """One live buffer in the address registry."""

    def __init__(self, kind: str, device: int | None, start: int, size: int, keep: Any, stream: Any) -> None:
        self.kind = kind  # "device" or "pinned"
        self.device = device
        self.start = start
        self.size = size
        self.stream = stream  # the stream current when it was allocated (device memory)
        self.freed = False
        # device memory: the buffer itself; pinned memory: a weak reference to the
        # user's object (which owns the bytes), so dropping it frees the memory.
        self._keep = keep

    def obj(self) -> Any:
        """A strong reference that keeps the bytes valid (for queued operations)."""
        return self._keep() if self.kind == "pinned" else self._keep

    def describe(self) -> str:
        where = f"device memory of GPU {self.device}" if self.kind == "device" else "pinned host memory"
        return f"{where} [{self.start:#x}, {self.start + self.size:#x})"


class _Owner:
    """Held by every array viewing one device allocation; its death frees the memory."""

    __slots__ = ("alloc", "__weakref__")

    def __init__(self, alloc: _Allocation) -> None:
        self.alloc = alloc


class _Flags:
    def __init__(self, c: bool, f: bool, owndata: bool) -> None:
        self.c_contiguous = c
        self.f_contiguous = f
        self.owndata = owndata

    def __repr__(self) -> str:
        return f"  C_CONTIGUOUS : {self.c_contiguous}\n  F_CONTIGUOUS : {self.f_contiguous}\n  OWNDATA : {self.owndata}"


class _MemoryPointer:
    """``cupy.cuda.MemoryPointer``: ``.ptr`` and ``.device_id``."""

    def __init__(self, ptr: int, device_id: int, owner: _Owner) -> None:
        self.ptr = ptr
        self.device_id = device_id
        self.mem = owner

    def __int__(self) -> int:
        return self.ptr


def _shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(d) for d in shape)


def _basic_key(key: Any) -> tuple:
    """An index that makes NumPy return a view, even for a single element."""
    key = key if isinstance(key, tuple) else (key,)
    for k in key:
        if not (k is Ellipsis or k is None or isinstance(k, (slice, int, np.integer))):
            raise NotImplementedError("fake cupy supports basic indexing only (ints, slices, ..., None)")
    return key + (Ellipsis,) if Ellipsis not in key else key


# ---------------------------------------------------------------- the classes
# Each FakeCuda binds subclasses of these to itself (class attribute ``_rt``).


class _NdarrayBase:
    """``cupy.ndarray`` over a view of a fake device allocation."""

    _rt: "FakeCuda"
    __array_priority__ = 100

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None, strides: Any = None, order: str = "C") -> None:
        if memptr is not None or strides is not None:
            raise NotImplementedError("fake cupy: ndarray(memptr=..., strides=...)")
        made = self._rt._new_array(_shape(shape), np.dtype(dtype), order=order)
        self._a, self._owner, self._root = made._a, made._owner, True

    # -------------------------------------------------------- attributes
    @property
    def shape(self) -> tuple[int, ...]:
        return self._a.shape

    @property
    def dtype(self) -> np.dtype:
        return self._a.dtype

    @property
    def ndim(self) -> int:
        return self._a.ndim

    @property
    def size(self) -> int:
        return self._a.size

    @property
    def itemsize(self) -> int:
        return self._a.itemsize

    @property
    def nbytes(self) -> int:
        return self._a.size * self._a.itemsize

    @property
    def strides(self) -> tuple[int, ...]:
        return self._a.strides

    @property
    def flags(self) -> _Flags:
        return _Flags(bool(self._a.flags.c_contiguous), bool(self._a.flags.f_contiguous), self._root)

    @property
    def device(self) -> Any:
        return self._rt.Device(self._owner.alloc.device)

    @property
    def data(self) -> _MemoryPointer:
        alloc = self._owner.alloc
        ptr = 0 if alloc.size == 0 else int(self._a.__array_interface__["data"][0])
        return _MemoryPointer(ptr, alloc.device, self._owner)

    @property
    def T(self) -> "_NdarrayBase":
        return self.transpose()

    def __len__(self) -> int:
        if not self._a.ndim:
            raise TypeError("len() of unsized object")
        return self._a.shape[0]

    def __repr__(self) -> str:
        return f"<fake cupy.ndarray shape={self.shape} dtype={self.dtype} device={self._owner.alloc.device}>"

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
        )

    def __iter__(self) -> Any:
        raise TypeError("fake cupy: iterating a device array copies element by element; use .get()")

    # ------------------------------------------------------------- views
    def _view(self, a: np.ndarray) -> "_NdarrayBase":
        return self._rt._wrap(a, self._owner, root=False)

    def __getitem__(self, key: Any) -> "_NdarrayBase":
        return self._view(self._a[_basic_key(key)])

    def transpose(self, *axes: Any) -> "_NdarrayBase":
        return self._view(self._a.transpose(*axes))

    def view(self, dtype: Any = None) -> "_NdarrayBase":
        return self._view(self._a if dtype is None else self._a.view(dtype))

    def reshape(self, *shape: Any, order: str = "C") -> "_NdarrayBase":
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)) else shape
        shaped = self._a.reshape(_shape(shape), order=order)
        if shaped.size and not np.may_share_memory(shaped, self._a):  # NumPy had to copy
            return self.copy().reshape(shape, order=order)
        return self._view(shaped)

    def ravel(self) -> "_NdarrayBase":
        return self.reshape(-1) if self._a.flags.c_contiguous else self.copy().reshape(-1)

    # ------------------------------------------------------- device work
    def __setitem__(self, key: Any, value: Any) -> None:
        rt = self._rt
        target = self._a[_basic_key(key)]
        rt._require_current([self] + ([value] if isinstance(value, rt.ndarray) else []), "setitem")
        if isinstance(value, rt.ndarray):
            src = value._a
            if np.broadcast_shapes(src.shape, target.shape) != target.shape:
                raise ValueError(f"could not broadcast {src.shape} into {target.shape}")
            rt._enqueue_device_op(
                rt.current_stream(), [self._owner.alloc, value._owner.alloc],
                lambda: np.copyto(target, src, casting="unsafe"), "setitem",
            )
        else:
            snap = np.array(value, copy=True)
            if snap.dtype.kind in "OUS":
                raise ValueError(f"Unsupported dtype {snap.dtype}")
            if np.broadcast_shapes(snap.shape, target.shape) != target.shape:
                raise ValueError(f"could not broadcast {snap.shape} into {target.shape}")
            rt._enqueue_device_op(
                rt.current_stream(), [self._owner.alloc], lambda: np.copyto(target, snap, casting="unsafe"), "setitem"
            )

    def fill(self, value: Any) -> None:
        self[...] = value

    def copy(self, order: str = "C") -> "_NdarrayBase":
        rt = self._rt
        with rt.Device(self._owner.alloc.device):
            out = rt._new_array(self.shape, self.dtype, order=order)
            out[...] = self
        return out

    def astype(self, dtype: Any, copy: bool = True) -> "_NdarrayBase":
        dtype = np.dtype(dtype)
        if dtype == self.dtype and not copy:
            return self
        rt = self._rt
        with rt.Device(self._owner.alloc.device):
            out = rt._new_array(self.shape, dtype)
            out[...] = self
        return out

    def get(self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True) -> np.ndarray:
        """A host copy, once ``stream`` (default: the current stream) has reached this point."""
        rt = self._rt
        if not blocking:
            raise NotImplementedError("fake cupy: get(blocking=False)")
        if stream is None:
            stream = rt.current_stream(self._owner.alloc.device)
        rt.stats["get"] += 1
        stream.synchronize()
        host = np.array(self._a, order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr: Any, stream: Any = None) -> None:
        rt = self._rt
        snap = np.array(arr, copy=True)
        if snap.shape != self.shape:
            raise ValueError(f"shape mismatch: {snap.shape} vs {self.shape}")
        stream = stream or rt.current_stream(self._owner.alloc.device)
        target = self._a
        rt._enqueue_device_op(stream, [self._owner.alloc], lambda: np.copyto(target, snap, casting="unsafe"), "set")

    def item(self) -> Any:
        return self.get().item()


class _DeviceBase:
    """``cupy.cuda.Device``."""

    _rt: "FakeCuda"

    def __init__(self, device: Any = None) -> None:
        rt = self._rt
        self.id = rt.current_device() if device is None else int(device)

    def _check(self) -> None:
        if not 0 <= self.id < self._rt.device_count:
            raise CUDARuntimeError(101, f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")

    def __enter__(self) -> "_DeviceBase":
        self._check()
        rt = self._rt
        rt._device_stack().append(rt.current_device())
        rt._local.device = self.id
        return self

    def __exit__(self, *exc: Any) -> None:
        rt = self._rt
        rt._local.device = rt._device_stack().pop()

    def use(self) -> None:
        self._check()
        self._rt._local.device = self.id

    @property
    def pci_bus_id(self) -> str:
        self._check()
        return self._rt.pci_bus_id(self.id)

    @property
    def compute_capability(self) -> str:
        self._check()
        return "90"

    @property
    def mem_info(self) -> tuple[int, int]:
        self._check()
        return self._rt.mem_get_info(self.id)

    def synchronize(self) -> None:
        self._check()
        self._rt.synchronize_device(self.id)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _DeviceBase) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("device", self.id))

    def __int__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


class _StreamBase:
    """``cupy.cuda.Stream``: a queue of device work."""

    _rt: "FakeCuda"

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False, priority: Any = None) -> None:
        rt = self._rt
        if null or ptds:
            raise NotImplementedError("fake cupy: use cupy.cuda.get_current_stream() for the null stream")
        dev = rt.current_device()
        self._setup(dev, next(rt._handles), is_null=False, non_blocking=bool(non_blocking))

    def _setup(self, device: int, ptr: int, *, is_null: bool, non_blocking: bool) -> None:
        rt = self._rt
        if not 0 <= device < rt.device_count:
            raise CUDARuntimeError(101, f"invalid device ordinal {device}")
        self.device_id = device
        self.ptr = ptr
        self.is_null = is_null
        self.non_blocking = non_blocking
        self._queue: collections.deque = collections.deque()
        self._enqueued = 0
        self._executed = 0
        if not is_null:
            with rt.lock:
                rt._streams[ptr] = self

    def synchronize(self) -> None:
        rt = self._rt
        rt.stats["stream.synchronize"] += 1
        with rt.lock:
            rt._run_until(self, self._enqueued)

    @property
    def done(self) -> bool:
        return self._executed >= self._enqueued

    def record(self, event: Any = None) -> Any:
        event = event if event is not None else self._rt.Event()
        event.record(self)
        return event

    def wait_event(self, event: Any) -> None:
        rt = self._rt
        src, marker = event._stream, event._marker
        if src is None:
            return
        rt._enqueue(self, lambda: rt._run_until(src, marker), "wait_event", [])

    def __enter__(self) -> "_StreamBase":
        rt = self._rt
        if self.device_id != rt.current_device():
            rt._violation(f"stream of GPU {self.device_id} made current while GPU {rt.current_device()} is current")
        rt._stream_stack(self.device_id).append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._rt._stream_stack(self.device_id).pop()

    def use(self) -> "_StreamBase":
        self._rt._local.__dict__.setdefault("current", {})[self.device_id] = self
        return self

    def __repr__(self) -> str:
        kind = "null" if self.is_null else ("non-blocking" if self.non_blocking else "blocking")
        return f"<fake {kind} stream {self.ptr:#x} of GPU {self.device_id}>"


class _EventBase:
    """``cupy.cuda.Event``: a marker in a stream's queue."""

    _rt: "FakeCuda"

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        rt = self._rt
        self.device_id = rt.current_device()
        self.ptr = next(rt._handles)
        self._stream: Any = None
        self._marker = 0

    def record(self, stream: Any = None) -> None:
        rt = self._rt
        stream = stream if stream is not None else rt.current_stream()
        if stream.device_id != self.device_id:
            rt._violation(f"event of GPU {self.device_id} recorded on {stream!r}")
        rt.stats["event.record"] += 1
        with rt.lock:
            self._stream, self._marker = stream, stream._enqueued

    def synchronize(self) -> None:
        rt = self._rt
        rt.stats["event.synchronize"] += 1
        if self._stream is not None:
            with rt.lock:
                rt._run_until(self._stream, self._marker)

    @property
    def done(self) -> bool:
        return self._stream is None or self._stream._executed >= self._marker


# ----------------------------------------------------------------- the fake


class FakeCuda:
    """The state of a fake CUDA machine, and the ``cupy`` module that drives it.

    Args:
        device_count: how many GPUs ``getDeviceCount`` reports.
        free_bytes: device memory ``memGetInfo`` reports free on each GPU
            (allocations beyond it raise ``OutOfMemoryError``); see :meth:`set_free`.
        total_bytes: device memory ``memGetInfo`` reports in total.
        deferred: queue device work until the host waits for it (else run it at once).

    Attributes:
        module: the fake ``cupy`` module.
        violations: every misuse found, as messages.
        stats: counts of copies, launches, synchronisations, ...
    """

    def __init__(
        self,
        device_count: int = 2,
        *,
        free_bytes: int = 1 << 30,
        total_bytes: int = 1 << 32,
        deferred: bool = True,
    ) -> None:
        self.device_count = device_count
        self.deferred = deferred
        self.total = [total_bytes] * device_count
        self._capacity = [free_bytes] * device_count  # used + free
        self.pool_cached = [0] * device_count  # part of the free bytes held by CuPy's pool
        self.used = [0] * device_count
        self.lock = threading.RLock()
        self.violations: list[str] = []
        self.stats: collections.Counter = collections.Counter()
        self._allocs: dict[int, _Allocation] = {}
        self._starts: list[int] = []
        self._handles = itertools.count(0x5EED0000, 0x100)
        self._local = threading.local()
        self._streams: dict[int, Any] = {}
        self.live_pinned = 0
        self.pinned_bytes = 0

        def bind(base: type, name: str, module: str) -> type:
            return type(name, (base,), {"_rt": self, "__module__": module})

        self.ndarray = bind(_NdarrayBase, "ndarray", "cupy")
        self.Device = bind(_DeviceBase, "Device", "cupy.cuda.device")
        self.Stream = bind(_StreamBase, "Stream", "cupy.cuda.stream")
        self.Event = bind(_EventBase, "Event", "cupy.cuda.stream")
        self.null_streams = []
        for d in range(device_count):
            s = self.Stream.__new__(self.Stream)
            s._setup(d, 0, is_null=True, non_blocking=False)
            self.null_streams.append(s)
        self.module = self._build_module()
        self.modules = {
            "cupy": self.module,
            "cupy.cuda": self.module.cuda,
            "cupy.cuda.runtime": self.module.cuda.runtime,
            "cupy.cuda.memory": self.module.cuda.memory,
            "cupy.cuda.compiler": self.module.cuda.compiler,
        }

    # ------------------------------------------------------------ checks
    def _violation(self, message: str, *, raise_: bool = True) -> None:
        self.violations.append(message)
        if raise_:
            raise Violation(message)

    def check(self) -> None:
        """Raises AssertionError listing every violation recorded so far."""
        if self.violations:
            raise AssertionError("fake CUDA violations:\n  " + "\n  ".join(self.violations))

    def pending(self, stream: Any = None) -> int:
        """Operations on memory queued and not yet run (on ``stream``, or on every stream).

        A queued wait for another stream's event touches no memory and is not counted.
        """
        with self.lock:
            streams = [stream] if stream is not None else self._all_streams()
            return sum(1 for s in streams for op in s._queue if op[2] != "wait_event")

    def _all_streams(self) -> list[Any]:
        return list(self.null_streams) + list(self._streams.values())

    def set_free(self, device: int, nbytes: int, *, cached: int = 0) -> None:
        """Makes ``memGetInfo`` on ``device`` report ``nbytes`` free from now on, and CuPy's memory
        pool hold ``cached`` more bytes in free blocks (usable, but not free to the driver)."""
        with self.lock:
            self._capacity[device] = self.used[device] + nbytes + cached
            self.pool_cached[device] = cached

    def pci_bus_id(self, device: int) -> str:
        return "0000:%02X:00.0" % (0x1B + 0x20 * device)

    # ----------------------------------------------------- thread state
    def current_device(self) -> int:
        return getattr(self._local, "device", 0)

    def _device_stack(self) -> list[int]:
        stack = getattr(self._local, "device_stack", None)
        if stack is None:
            stack = self._local.device_stack = []
        return stack

    def _stream_stack(self, device: int) -> list[Any]:
        stacks = self._local.__dict__.setdefault("stream_stacks", {})
        return stacks.setdefault(device, [])

    def current_stream(self, device: int | None = None) -> Any:
        device = self.current_device() if device is None or device < 0 else device
        stack = self._stream_stack(device)
        if stack:
            return stack[-1]
        current = self._local.__dict__.get("current", {}).get(device)
        return current if current is not None else self.null_streams[device]

    def _stream_from_ptr(self, ptr: int) -> Any:
        ptr = int(ptr)
        if ptr == 0:
            return self.null_streams[self.current_device()]
        with self.lock:
            stream = self._streams.get(ptr)
        if stream is None:
            self._violation(f"invalid stream handle {ptr:#x}")
        return stream

    def _require_current(self, arrays: Iterable[Any], what: str) -> None:
        cur = self.current_device()
        for a in arrays:
            dev = a._owner.alloc.device
            if dev != cur:
                raise ValueError(
                    f"Array device must be same as the current device: array device = {dev} while current = {cur} ({what})"
                )

    # ---------------------------------------------------------- memory
    def _register(self, alloc: _Allocation) -> None:
        with self.lock:
            bisect.insort(self._starts, alloc.start)
            self._allocs[alloc.start] = alloc

    def _unregister(self, alloc: _Allocation) -> None:
        with self.lock:
            if self._allocs.get(alloc.start) is alloc:
                del self._allocs[alloc.start]
                self._starts.pop(bisect.bisect_left(self._starts, alloc.start))

    def find(self, ptr: int) -> _Allocation | None:
        """The live allocation holding address ``ptr``."""
        with self.lock:
            i = bisect.bisect_right(self._starts, ptr) - 1
            if i < 0:
                return None
            alloc = self._allocs[self._starts[i]]
            return alloc if ptr < alloc.start + alloc.size else None

    def describe(self, ptr: int, size: int) -> str:
        alloc = self.find(ptr)
        if alloc is None:
            return "memory the fake did not allocate (pageable host memory, or out of bounds)"
        end = alloc.start + alloc.size
        if ptr + size > end:
            return f"a range running {ptr + size - end} bytes past the end of {alloc.describe()}"
        return alloc.describe()

    def _expect(self, ptr: int, size: int, kind: str, device: int | None, what: str) -> _Allocation:
        alloc = self.find(ptr)
        ok = alloc is not None and alloc.kind == kind and ptr + size <= alloc.start + alloc.size
        if ok and kind == "device" and alloc.device != device:
            ok = False
        if not ok:
            want = f"device memory of GPU {device}" if kind == "device" else "pinned host memory"
            self._violation(f"{what}: [{ptr:#x}, +{size}) should be {want} but is {self.describe(ptr, size)}")
        assert alloc is not None
        return alloc

    def mem_get_info(self, device: int) -> tuple[int, int]:
        with self.lock:
            free = self._capacity[device] - self.used[device] - self.pool_cached[device]
            return max(0, free), self.total[device]

    def pool_free_bytes(self, device: int) -> int:
        """``cupy.get_default_memory_pool().free_bytes()``: cached blocks, until allocations use them."""
        with self.lock:
            return min(self.pool_cached[device], max(0, self._capacity[device] - self.used[device]))

    def _alloc_device(self, nbytes: int, device: int) -> _Owner:
        if not 0 <= device < self.device_count:
            raise CUDARuntimeError(101, f"invalid device ordinal {device}")
        with self.lock:
            if self.used[device] + nbytes > self._capacity[device]:
                self.stats["out_of_memory"] += 1
                raise OutOfMemoryError(nbytes, self.used[device])
            self.used[device] += nbytes
            self.stats["device.alloc"] += 1
        stream = self.current_stream(device)
        if nbytes == 0:
            alloc = _Allocation("device", device, 0, 0, np.empty(0, np.uint8), stream)
        else:
            raw = np.empty(nbytes + _ALIGN, np.uint8)
            off = (-raw.ctypes.data) % _ALIGN
            buf = raw[off : off + nbytes]
            buf.fill(DEVICE_FILL)
            alloc = _Allocation("device", device, buf.ctypes.data, nbytes, buf, stream)
            self._register(alloc)
        owner = _Owner(alloc)
        weakref.finalize(owner, self._free_device, alloc)
        return owner

    def _free_device(self, alloc: _Allocation) -> None:
        with self.lock:
            alloc.freed = True
            self.used[alloc.device] -= alloc.size
            if alloc.size:
                self._unregister(alloc)

    def alloc_pinned_memory(self, size: int) -> PinnedMemoryPointer:
        size = int(size)
        mem = PinnedMemoryPointer(size)
        if size:
            view = (ctypes.c_char * size).from_buffer(mem)
            mem.ptr = ctypes.addressof(view)
            del view  # keeping it would make a reference cycle: the memory would outlive its last user
            ctypes.memset(mem.ptr, PINNED_FILL, size)
        else:
            mem.ptr = 0
        mem.size = size
        alloc = _Allocation("pinned", None, mem.ptr, size, weakref.ref(mem), None)
        if size:
            self._register(alloc)
        with self.lock:
            self.live_pinned += 1
            self.pinned_bytes += size
            self.stats["pinned.alloc"] += 1
        weakref.finalize(mem, self._free_pinned, alloc)
        return mem

    def _free_pinned(self, alloc: _Allocation) -> None:
        with self.lock:
            alloc.freed = True
            self.live_pinned -= 1
            self.pinned_bytes -= alloc.size
            if alloc.size:
                self._unregister(alloc)

    # --------------------------------------------------------- arrays
    def _wrap(self, a: np.ndarray, owner: _Owner, root: bool) -> Any:
        arr = self.ndarray.__new__(self.ndarray)
        arr._a, arr._owner, arr._root = a, owner, root
        return arr

    def _new_array(self, shape: tuple[int, ...], dtype: np.dtype, device: int | None = None, order: str = "C") -> Any:
        if dtype.kind in "OUSV":
            raise ValueError(f"Unsupported dtype {dtype}")
        device = self.current_device() if device is None else device
        count = 1
        for d in shape:
            if d < 0:
                raise ValueError("negative dimensions are not allowed")
            count *= d
        nbytes = count * dtype.itemsize
        owner = self._alloc_device(nbytes, device)
        flat = owner.alloc.obj()[:nbytes].view(dtype)
        a = flat.reshape(shape, order="F" if order == "F" else "C")
        return self._wrap(a, owner, root=True)

    # ---------------------------------------------------------- queues
    def _implicit_deps(self, stream: Any) -> list[tuple[Any, int]]:
        """The legacy null stream waits for blocking streams of its device, and they for it."""
        if stream.is_null:
            return [
                (s, s._enqueued)
                for s in self._streams.values()
                if s.device_id == stream.device_id and not s.non_blocking
            ]
        if not stream.non_blocking:
            null = self.null_streams[stream.device_id]
            return [(null, null._enqueued)]
        return []

    def _enqueue(self, stream: Any, fn: Callable[[], None], what: str, deps: list[tuple[Any, int]] | None = None) -> None:
        with self.lock:
            op = (fn, self._implicit_deps(stream) if deps is None else deps, what)
            stream._enqueued += 1
            if self.deferred:
                stream._queue.append(op)
            else:
                stream._executed += 1
                self._run_op(op)

    def _run_until(self, stream: Any, marker: int) -> None:
        with self.lock:
            while stream._executed < marker:
                op = stream._queue.popleft()
                stream._executed += 1
                self._run_op(op)

    def _run_op(self, op: tuple[Callable[[], None], list[tuple[Any, int]], str]) -> None:
        fn, deps, what = op
        for dep_stream, dep_marker in deps:
            self._run_until(dep_stream, dep_marker)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded: device work cannot raise to the host
            self._violation(f"device operation {what} failed: {type(e).__name__}: {e}", raise_=False)

    def _enqueue_device_op(self, stream: Any, allocs: Sequence[_Allocation], body: Callable[[], None], what: str) -> None:
        """Queues ``body``; when it runs, memory freed meanwhile (by another stream's user) is a violation."""
        keep = [a.obj() for a in allocs]

        def run() -> None:
            for a in allocs:
                if a.freed and a.stream is not stream:
                    self._violation(
                        f"{what} on {stream!r} touches {a.describe()}, freed (by its owner on {a.stream!r}) "
                        "before the stream reached the operation",
                        raise_=False,
                    )
            body()
            del keep[:]

        self._enqueue(stream, run, what)

    def synchronize_device(self, device: int) -> None:
        with self.lock:
            for s in self._all_streams():
                if s.device_id == device:
                    self._run_until(s, s._enqueued)

    def synchronize_all(self) -> None:
        """Runs every queued operation on every device (as ``cudaDeviceSynchronize`` on each)."""
        for d in range(self.device_count):
            self.synchronize_device(d)

    # ---------------------------------------------------------- copies
    def memcpyAsync(self, dst: int, src: int, size: int, kind: int, stream: int) -> None:
        """``cudaMemcpyAsync``, checked against the registry, queued on the stream."""
        dst, src, size, kind = int(dst), int(src), int(size), int(kind)
        s = self._stream_from_ptr(stream)
        if s.device_id != self.current_device():
            self._violation(f"memcpyAsync on {s!r} while GPU {self.current_device()} is current")
        if size < 0:
            self._violation(f"memcpyAsync of {size} bytes")
        name = _KIND_NAMES.get(kind)
        if name is None:
            self._violation(f"memcpyAsync with invalid kind {kind}")
        self.stats[f"memcpy.{name}"] += 1
        self.stats[f"memcpy.{name}.bytes"] += size
        if size == 0:
            return
        what = f"memcpyAsync {name} of {size} bytes"
        if kind == memcpyDeviceToHost:
            a_src = self._expect(src, size, "device", s.device_id, f"{what}: source")
            a_dst = self._expect(dst, size, "pinned", None, f"{what}: destination")
        elif kind == memcpyHostToDevice:
            a_src = self._expect(src, size, "pinned", None, f"{what}: source")
            a_dst = self._expect(dst, size, "device", s.device_id, f"{what}: destination")
        elif kind == memcpyDeviceToDevice:
            a_src = self._expect(src, size, "device", s.device_id, f"{what}: source")
            a_dst = self._expect(dst, size, "device", s.device_id, f"{what}: destination")
        else:
            a_src, a_dst = self.find(src), self.find(dst)
            for a, p, role in ((a_src, src, "source"), (a_dst, dst, "destination")):
                if a is None or p + size > a.start + a.size:
                    self._violation(f"{what}: {role} is {self.describe(p, size)}")
        self._enqueue_device_op(s, [a_src, a_dst], lambda: ctypes.memmove(dst, src, size), what)

    def memcpy(self, dst: int, src: int, size: int, kind: int) -> None:
        """``cudaMemcpy``: on the null stream, returning when done."""
        null = self.null_streams[self.current_device()]
        self.memcpyAsync(dst, src, size, kind, 0)
        null.synchronize()

    # --------------------------------------------------------- kernels
    def _launch_stream(self, device: int, stream: Any) -> Any:
        if stream is None:
            return self.current_stream(device)
        if stream.device_id != device:
            self._violation(f"kernel for GPU {device} launched on {stream!r}")
        return stream

    def _copy_kernel(
        self, kernel: str, items: Sequence[Any], staging: Any, offsets: Sequence[int], stream: Any,
        device_id: int | None, chunk_bytes: int,
    ) -> None:
        from gpusaver.cuda import kernels as K

        n = len(items)
        if chunk_bytes <= 0 or chunk_bytes % 16:
            raise ValueError(f"chunk_bytes must be a positive multiple of 16, got {chunk_bytes}")
        _, limit, dev = K._staging(staging, device_id)
        ptrs, sizes = K._ranges(items, dev, "source" if kernel == "gs_pack" else "destination")
        offs = K._offsets(offsets, n)
        K._check_staging_ranges(offs, sizes, limit)
        if kernel == "gs_pack":
            K._check_disjoint(offs, sizes, "staging")
        else:
            K._check_disjoint(ptrs, sizes, "destination")
        self.stats[kernel] += 1
        if int(sizes.sum()) == 0:
            return
        st = self._launch_stream(dev, stream)
        base = int(staging.data.ptr) if isinstance(staging, self.ndarray) else int(staging[0])
        stage = self.find(base)
        if stage is None or base + limit > stage.start + stage.size or (stage.kind == "device" and stage.device != dev):
            self._violation(f"{kernel}: staging [{base:#x}, +{limit}) is {self.describe(base, limit)}")
        assert stage is not None
        allocs = [stage]
        moves = []
        for i in range(n):
            p, s, o = int(ptrs[i]), int(sizes[i]), int(offs[i])
            if not s:
                continue
            allocs.append(self._expect(p, s, "device", dev, f"{kernel}: range {i}"))
            moves.append((base + o, p, s) if kernel == "gs_pack" else (p, base + o, s))

        def body() -> None:
            for d, sp, s in moves:
                ctypes.memmove(d, sp, s)

        self._enqueue_device_op(st, allocs, body, kernel)
        K._finish(st)

    def pack(
        self, sources: Sequence[Any], staging: Any, offsets: Sequence[int], *, stream: Any = None,
        device_id: int | None = None, chunk_bytes: int = 16 * 1024,
    ) -> None:
        """:func:`gpusaver.cuda.kernels.pack` on the fake."""
        self._copy_kernel("gs_pack", sources, staging, offsets, stream, device_id, chunk_bytes)

    def unpack(
        self, staging: Any, destinations: Sequence[Any], offsets: Sequence[int], *, stream: Any = None,
        device_id: int | None = None, chunk_bytes: int = 16 * 1024,
    ) -> None:
        """:func:`gpusaver.cuda.kernels.unpack` on the fake."""
        self._copy_kernel("gs_unpack", destinations, staging, offsets, stream, device_id, chunk_bytes)

    def crc32c_ranges(
        self, ptrs: Sequence[Any], sizes: Sequence[int] | None = None, *, stream: Any = None,
        device_id: int | None = None, masked: bool = False, chunk_bytes: int = 4 * 1024,
    ) -> Any:
        """:func:`gpusaver.cuda.kernels.crc32c_ranges` on the fake: a uint32 device array, valid once the stream gets there."""
        from gpusaver.cuda import kernels as K
        from gpusaver.format.crc import mask as crc32c_mask

        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        dev, ptr_arr, size_arr = K.crc_ranges(ptrs, sizes, device_id)
        n = int(ptr_arr.size)
        self.stats["gs_crc32c"] += 1
        st = self._launch_stream(dev, stream)
        with self.Device(dev), st:
            out = self._new_array((n,), np.dtype(np.uint32))
        allocs = [out._owner.alloc]
        ranges = []
        for i in range(n):
            p, s = int(ptr_arr[i]), int(size_arr[i])
            if s:
                allocs.append(self._expect(p, s, "device", dev, f"crc32c_ranges: range {i}"))
            ranges.append((p, s))
        target = out._a

        def body() -> None:
            for i, (p, s) in enumerate(ranges):
                c = _crc32c.crc32c(ctypes.string_at(p, s)) if s else 0
                target[i] = crc32c_mask(c) if masked else c

        self._enqueue_device_op(st, allocs, body, "gs_crc32c")
        K._finish(st)
        return out

    # ---------------------------------------------------------- module
    def _build_module(self) -> types.ModuleType:
        rt = self
        cp = types.ModuleType("cupy", "A fake CuPy (tests/fakecupy.py): device memory is host memory.")
        cuda = types.ModuleType("cupy.cuda")
        runtime = types.ModuleType("cupy.cuda.runtime")
        memory = types.ModuleType("cupy.cuda.memory")
        compiler = types.ModuleType("cupy.cuda.compiler")
        cp.__version__ = "0.0.0+fake"
        cp.fake = rt  # type: ignore[attr-defined]
        cp.ndarray = rt.ndarray
        for name in (
            "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "float16", "float32", "float64", "complex64", "complex128",
        ):
            setattr(cp, name, getattr(np, name))
        cp.dtype = np.dtype

        def empty(shape: Any, dtype: Any = float, order: str = "C") -> Any:
            return rt._new_array(_shape(shape), np.dtype(dtype), order=order)

        def zeros(shape: Any, dtype: Any = float, order: str = "C") -> Any:
            out = empty(shape, dtype, order)
            out[...] = 0
            return out

        def empty_like(a: Any, dtype: Any = None) -> Any:
            return empty(a.shape, a.dtype if dtype is None else dtype)

        def zeros_like(a: Any, dtype: Any = None) -> Any:
            return zeros(a.shape, a.dtype if dtype is None else dtype)

        def asarray(a: Any, dtype: Any = None, order: Any = None) -> Any:
            if isinstance(a, rt.ndarray):
                return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
            host = np.asarray(a, dtype=dtype)
            if host.dtype.kind in "OUSV":
                raise ValueError(f"Unsupported dtype {host.dtype}")
            out = rt._new_array(host.shape, host.dtype, order="F" if order == "F" else "C")
            out.set(host)  # a snapshot: the host buffer may change once this returns
            return out

        def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K") -> Any:
            if isinstance(obj, rt.ndarray):
                if copy:
                    return obj.astype(obj.dtype if dtype is None else dtype)
                return asarray(obj, dtype)
            return asarray(obj, dtype)

        def ascontiguousarray(a: Any, dtype: Any = None) -> Any:
            if not isinstance(a, rt.ndarray):
                return asarray(np.ascontiguousarray(a), dtype)
            dt = a.dtype if dtype is None else np.dtype(dtype)
            if a.flags.c_contiguous and dt == a.dtype:
                return a
            rt._require_current([a], "ascontiguousarray")
            out = rt._new_array(a.shape, dt)
            out[...] = a
            return out

        def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
            if isinstance(a, rt.ndarray):
                return a.get(stream=stream, order=order, out=out)
            return np.asarray(a, order=order)

        def get_array_module(*args: Any) -> Any:
            return cp if any(isinstance(a, rt.ndarray) for a in args) else np

        class RawModule:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise CompileException(
                    "fake cupy compiles no CUDA code; the tests replace gpusaver.cuda.kernels' launchers"
                )

        class MemoryPool:
            def free_bytes(self) -> int:
                return rt.pool_free_bytes(rt.current_device())

            def free_all_blocks(self) -> None:
                return None

        pool, pinned_pool = MemoryPool(), MemoryPool()

        def get_default_memory_pool() -> Any:
            return pool

        def get_default_pinned_memory_pool() -> Any:
            return pinned_pool

        for f in (empty, zeros, empty_like, zeros_like, asarray, array, ascontiguousarray, asnumpy, get_array_module,
                  get_default_memory_pool, get_default_pinned_memory_pool):
            setattr(cp, f.__name__, f)
        cp.RawModule = RawModule

        # cupy.cuda
        cuda.Device = rt.Device
        cuda.Stream = rt.Stream
        cuda.Event = rt.Event
        cuda.PinnedMemoryPointer = PinnedMemoryPointer
        cuda.alloc_pinned_memory = rt.alloc_pinned_memory
        cuda.get_current_stream = lambda device_id=-1: rt.current_stream(device_id)
        cuda.is_available = lambda: rt.device_count > 0
        cuda.runtime = runtime
        cuda.memory = memory
        cuda.compiler = compiler
        memory.OutOfMemoryError = OutOfMemoryError
        memory.alloc_pinned_memory = rt.alloc_pinned_memory
        compiler.CompileException = CompileException

        # cupy.cuda.runtime
        runtime.CUDARuntimeError = CUDARuntimeError
        for kind, value in (
            ("memcpyHostToHost", memcpyHostToHost), ("memcpyHostToDevice", memcpyHostToDevice),
            ("memcpyDeviceToHost", memcpyDeviceToHost), ("memcpyDeviceToDevice", memcpyDeviceToDevice),
            ("memcpyDefault", memcpyDefault),
        ):
            setattr(runtime, kind, value)

        def getDeviceCount() -> int:
            return rt.device_count

        def getDevice() -> int:
            return rt.current_device()

        def setDevice(device: int) -> None:
            rt.Device(device).use()

        def memGetInfo() -> tuple[int, int]:
            return rt.mem_get_info(rt.current_device())

        def deviceSynchronize() -> None:
            rt.synchronize_device(rt.current_device())

        def streamSynchronize(stream: int) -> None:
            rt._stream_from_ptr(stream).synchronize()

        for f in (getDeviceCount, getDevice, setDevice, memGetInfo, deviceSynchronize, streamSynchronize):
            setattr(runtime, f.__name__, f)
        runtime.memcpyAsync = rt.memcpyAsync
        runtime.memcpy = rt.memcpy
        cp.cuda = cuda
        return cp


def install(monkeypatch: Any, fake: FakeCuda) -> None:
    """Makes ``import cupy`` give ``fake.module`` and routes gpusaver's kernel launchers to the fake.

    Everything is undone by ``monkeypatch`` when the test ends.
    """
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    from gpusaver.cuda import kernels as _kernels

    monkeypatch.setattr(_kernels, "pack", fake.pack)
    monkeypatch.setattr(_kernels, "unpack", fake.unpack)
    monkeypatch.setattr(_kernels, "crc32c_ranges", fake.crc32c_ranges)
