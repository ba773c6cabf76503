"""The fake-CuPy fixture and helpers shared by the backend, storage and GPU-path tests.

``fake`` installs ``tests/fakecupy.py`` as ``cupy`` (two GPUs; ``deferred`` and ``eager`` queues) with the
backend's pinned ring replaced by :class:`CheckedRing`, which records misuse and poisons released buffers.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import fakecupy
from gpusaver import backends, config
from gpusaver.backends import cupy_backend
from gpusaver.cuda import nvml
from gpusaver.format import BundleReader

SLOT = 4096  # bytes per pinned buffer and of the staging slab
SMALL = 1024  # tensors below this are packed
SLOTS = 2  # pinned buffers per device
POISON = 0xDB  # what a released pinned buffer holds


class CheckedRing(cupy_backend.PinnedRing):
    """The backend's PinnedRing, small, recording misuse and poisoning released buffers."""

    def __init__(self, cupy, slots: int = SLOTS, slot_bytes: int = SLOT) -> None:
        super().__init__(cupy, slots, slot_bytes)
        self.in_use: set[int] = set()
        self.errors: list[str] = []
        self.acquired = 0

    def acquire(self) -> int:
        slot = super().acquire()
        with self._cond:
            if slot in self.in_use:
                self.errors.append(f"slot {slot} handed out while in use")
            self.in_use.add(slot)
            self.acquired += 1
        return slot

    def release(self, slot: int) -> None:
        with self._cond:
            if slot not in self.in_use:
                self.errors.append(f"slot {slot} released while not in use")
            self.in_use.discard(slot)
            self._views[slot][:] = POISON  # whoever still reads it now reads poison
        super().release(slot)


@pytest.fixture(params=["deferred", "eager"])
def fake(request, monkeypatch):
    """A fake machine with two GPUs, installed as ``cupy``; the backend setting is ``cupy``."""
    machine = fakecupy.FakeCuda(device_count=2, deferred=request.param == "deferred")
    fakecupy.install(monkeypatch, machine)
    overrides = config.set(
        backend="cupy", kernel_sync=False, slot_bytes=SLOT, device_small_bytes=SMALL, slots=SLOTS
    )
    monkeypatch.setattr(backends, "_cupy_backend", None)
    monkeypatch.setattr(backends, "_cupy_error", None)
    monkeypatch.setattr(cupy_backend, "PinnedRing", CheckedRing)  # a ring that checks its own use
    bus_ids: list[str] = []
    monkeypatch.setattr(nvml, "by_pci_bus_id", lambda bus_id: bus_ids.append(bus_id))  # no NVML GPU: None
    machine.bus_ids = bus_ids
    try:
        yield machine
    finally:
        overrides.__exit__(None, None, None)
    machine.check()
    backend = backends._cupy_backend
    if backend is not None:
        for device, state in backend._states.items():
            assert not state.ring.errors, f"GPU {device}: {state.ring.errors}"


# ------------------------------------------------------------------ helpers
_RNG = np.random.default_rng(20240531)


def values(shape, dtype) -> np.ndarray:
    """Random host values; every bit pattern (NaNs included) for numeric types."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if dtype == np.bool_:
        return _RNG.integers(0, 2, size=shape).astype(np.bool_)
    raw = _RNG.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def put(fake, host: np.ndarray, device: int):
    """A fake-GPU copy of ``host`` on ``device``, uploaded (as a careful user would wait for it)."""
    cp = fake.module
    with cp.cuda.Device(device):
        arr = cp.asarray(host)
    cp.cuda.Device(device).synchronize()
    return arr


def fill(fake, arr, value) -> None:
    """Overwrites a fake array and waits for it."""
    cp = fake.module
    with cp.cuda.Device(arr.device.id):
        arr[...] = value
    cp.cuda.Device(arr.device.id).synchronize()


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-equal values, shapes and dtypes."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def backend():
    return backends._cupy_backend


def assert_ring_idle(fake) -> None:
    """Every pinned buffer of every device is back in its ring, and no backend stream has work left."""
    b = backend()
    assert b is not None
    for device, state in b._states.items():
        assert sorted(state.ring._free) == list(range(SLOTS)), (
            f"GPU {device}: pinned slots {sorted(state.ring.in_use)} were never given back "
            f"(free: {list(state.ring._free)})"
        )
        assert fake.pending(state.stream) == 0, f"GPU {device}: the backend left work queued on its stream"


def gpu_variables(fake, n_gpus: int) -> dict[str, tuple[np.ndarray, object]]:
    """Small, large, zero-size and scalar tensors on each of ``n_gpus`` fake GPUs."""
    out = {}
    for d in range(n_gpus):
        specs = {
            f"g{d}/small_f32": ((7, 5), np.float32),
            f"g{d}/small_i16": ((33,), np.int16),
            f"g{d}/small_bool": ((9,), np.bool_),
            f"g{d}/small_c64": ((3, 2), np.complex64),
            f"g{d}/scalar": ((), np.float64),
            f"g{d}/empty": ((0, 3), np.float32),
            f"g{d}/large": ((SLOT * 5 // 16 + 3, 2), np.float64),  # 2.5 slots and a bit
            f"g{d}/boundary": ((SMALL // 4,), np.int32),  # exactly SMALL_BYTES: the chunked path
        }
        for name, (shape, dtype) in specs.items():
            host = values(shape, dtype)
            out[name] = (host, put(fake, host, d))
    return out


def data_files(prefix: str) -> list[str]:
    directory, base = os.path.split(prefix)
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.startswith(base + ".data-"))


def damage(path: str, name: str) -> None:
    """Flips a bit in the middle of tensor ``name``'s bytes in the (single) data file."""
    with BundleReader(path) as reader:
        entry = reader.entry(name)
    (data,) = data_files(path)
    with open(data, "r+b") as f:
        f.seek(entry.offset + entry.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
