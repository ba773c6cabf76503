"""The CuPy backend's Python logic, run without a GPU against a faithful fake of CuPy.

``tests/fakecupy.py`` stands in for CuPy: device memory is host memory, copies
are real ``memmove``s checked against a registry of what every address is, and
stream work is queued. Every test runs twice: with ``deferred`` queues (device
work runs only when the host waits for it: stale reads and unordered streams
show) and ``eager`` ones (work runs when issued). The backend's pinned ring is
the real one, sized small (``SLOTS`` buffers of ``SLOT`` bytes) so that saves
and restores wrap around it, and instrumented: a slot handed out twice or
released twice is recorded, and a released buffer is overwritten with
``POISON`` so a read after release corrupts the checkpoint visibly.
"""

from __future__ import annotations

import errno
import math
import os
import threading
import time

import numpy as np
import pytest

import fakecupy
import gpusaver as gs
from gpusaver import backends
from gpusaver.backends import cupy_backend
from gpusaver.storage.fileops import PosixFileOps
from gpusaver.format import BundleWriter

from gpu_fake import (  # noqa: F401 - fake is the fixture
    SLOT,
    SLOTS,
    SMALL,
    assert_ring_idle,
    backend,
    damage,
    data_files,
    fake,
    fill,
    gpu_variables,
    put,
    same,
    values,
)
# ------------------------------------------------------------- the fake itself
def test_fake_checks_copy_kinds_and_bounds(fake):
    """The fake refuses copies the real hardware would do wrongly, before touching memory."""
    cp = fake.module
    rt = cp.cuda.runtime
    with cp.cuda.Device(0):
        dev = cp.empty(64, cp.uint8)
        other = cp.empty(64, cp.uint8)
        stream = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.Device(1):
        dev1 = cp.empty(64, cp.uint8)
    pinned = cp.cuda.alloc_pinned_memory(64)
    host = np.zeros(64, np.uint8)
    bad = [
        (pinned.ptr, dev.data.ptr, 64, rt.memcpyHostToDevice),  # H2D from device memory
        (other.data.ptr, dev.data.ptr, 64, rt.memcpyDeviceToHost),  # D2H into device memory
        (host.ctypes.data, dev.data.ptr, 64, rt.memcpyDeviceToHost),  # pageable host memory
        (pinned.ptr + 8, dev.data.ptr, 64, rt.memcpyDeviceToHost),  # runs past the pinned buffer
        (pinned.ptr, dev.data.ptr + 1, 64, rt.memcpyDeviceToHost),  # runs past the device buffer
        (pinned.ptr, dev1.data.ptr, 64, rt.memcpyDeviceToHost),  # memory of another GPU
    ]
    with cp.cuda.Device(0):
        for dst, src, size, kind in bad:
            with pytest.raises(fakecupy.Violation):
                rt.memcpyAsync(dst, src, size, kind, stream.ptr)
    with cp.cuda.Device(1), pytest.raises(fakecupy.Violation, match="GPU 1 is current"):
        rt.memcpyAsync(pinned.ptr, dev.data.ptr, 64, rt.memcpyDeviceToHost, stream.ptr)
    assert len(fake.violations) == len(bad) + 1
    fake.violations.clear()
    assert fake.live_pinned == 1
    del pinned
    assert fake.live_pinned == 0


def test_fake_queues_work_until_the_host_waits(fake):
    """Deferred: a copy lands when its event or stream is waited for, not before; events mark positions."""
    cp = fake.module
    rt = cp.cuda.runtime
    pinned = cp.cuda.alloc_pinned_memory(16)
    view = np.frombuffer(pinned, np.uint8, count=16)
    assert (view == fakecupy.PINNED_FILL).all()
    with cp.cuda.Device(1):
        dev = put(fake, np.arange(16, dtype=np.uint8), 1)
        stream = cp.cuda.Stream(non_blocking=True)
        rt.memcpyAsync(pinned.ptr, dev.data.ptr, 8, rt.memcpyDeviceToHost, stream.ptr)
        first = cp.cuda.Event(block=False, disable_timing=True)
        first.record(stream)
        rt.memcpyAsync(pinned.ptr + 8, dev.data.ptr + 8, 8, rt.memcpyDeviceToHost, stream.ptr)
        if fake.deferred:
            assert (view == fakecupy.PINNED_FILL).all() and not first.done
        first.synchronize()
        assert list(view[:8]) == list(range(8))
        if fake.deferred:
            assert (view[8:] == fakecupy.PINNED_FILL).all()
        stream.synchronize()
        assert list(view) == list(range(16))
        # work on the null stream is not ordered with a non-blocking stream
        dev[...] = 0
        rt.memcpyAsync(pinned.ptr, dev.data.ptr, 16, rt.memcpyDeviceToHost, stream.ptr)
        stream.synchronize()
        assert list(view) == (list(range(16)) if fake.deferred else [0] * 16)
        # ... unless the stream waits for it
        dev[...] = 3
        stream.wait_event(cp.cuda.get_current_stream().record())
        rt.memcpyAsync(pinned.ptr, dev.data.ptr, 16, rt.memcpyDeviceToHost, stream.ptr)
        stream.synchronize()
        assert list(view) == [3] * 16
        # ... or is a blocking stream (the legacy null stream orders those)
        blocking = cp.cuda.Stream()
        dev[...] = 4
        rt.memcpyAsync(pinned.ptr, dev.data.ptr, 16, rt.memcpyDeviceToHost, blocking.ptr)
        blocking.synchronize()
        assert list(view) == [4] * 16
    assert (dev.get() == 4).all()


def test_fake_kernels_match_the_references(fake):
    """pack, unpack and crc32c_ranges on the fake agree with gpusaver.cuda.reference and check their arguments."""
    from gpusaver.cuda import kernels as _kernels
    from gpusaver.cuda.reference import crc32c_ranges_ref

    cp = fake.module
    hosts = [values((n,), np.uint8) for n in (5, 0, 64, 17)]
    with cp.cuda.Device(1):
        arrays = [put(fake, h, 1) for h in hosts]
        slab = cp.empty(128, cp.uint8)
        stream = cp.cuda.Stream(non_blocking=True)
        offsets = [0, 5, 5, 69]
        _kernels.pack(arrays, slab, offsets, stream=stream)
        crcs = _kernels.crc32c_ranges(arrays, stream=stream)
        assert list(crcs.get(stream=stream)) == list(crc32c_ranges_ref(hosts))
        assert slab.get(stream=stream)[:86].tobytes() == b"".join(h.tobytes() for h in hosts)
        outs = [cp.empty(h.shape, h.dtype) for h in hosts]
        _kernels.unpack(slab, outs, offsets, stream=stream)
        assert all(same(o.get(stream=stream), h) for o, h in zip(outs, hosts))
        with pytest.raises(ValueError, match="does not fit"):
            _kernels.pack(arrays, slab, [0, 5, 5, 120], stream=stream)
        with pytest.raises(ValueError, match="overlap"):
            _kernels.pack(arrays, slab, [0, 5, 3, 69], stream=stream)
        with pytest.raises(ValueError, match="not C-contiguous"):
            _kernels.pack([arrays[2][::2]], slab, [0], stream=stream)
    with cp.cuda.Device(0):
        other = cp.empty(8, cp.uint8)
    with pytest.raises(ValueError, match="device 0, expected device 1"):
        _kernels.pack([other], slab, [0], stream=stream)


# ------------------------------------------------------------------ selection
def test_probe_selects_the_cupy_backend(fake):
    cp = fake.module
    assert cupy_backend.probe() is None
    b = backends.gpu_backend()
    assert isinstance(b, cupy_backend.CupyBackend)
    assert backends.array_module() is cp
    arr = put(fake, np.ones(3, np.float32), 1)
    assert backends.backend_for(arr, "x") is b
    assert gs.Variable(arr, name="x").device.short == "/gpu:1"
    with pytest.raises(ValueError, match="/gpu:1"):
        gs.Variable(arr, name="x", device="/gpu:0")
    with pytest.raises(ValueError, match="cannot be placed on /cpu:0"):
        gs.Variable(arr, name="x", device="/cpu:0")
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(arr)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("n_gpus", [1, 2])
def test_saver_round_trip(fake, tmp_path, n_gpus, sharded):
    """Fake-GPU arrays on 1 or 2 GPUs beside NumPy variables on /cpu:0 and /cpu:1: save, read, restore in place."""
    gpu = gpu_variables(fake, n_gpus)
    cpu = {"cpu0/w": values((6, 4), np.float32), "cpu1/w": values((300,), np.int64)}
    var_list = {name: arr for name, (_, arr) in gpu.items()}
    var_list["cpu0/w"] = gs.Variable(cpu["cpu0/w"], device="/cpu:0")
    var_list["cpu1/w"] = gs.Variable(cpu["cpu1/w"], device="/cpu:1")
    saver = gs.Saver(var_list, sharded=sharded)
    path = saver.save(str(tmp_path / "model"), global_step=3)
    assert_ring_idle(fake)
    assert len(data_files(path)) == ((n_gpus + 2) if sharded else 1)
    assert fake.live_pinned == n_gpus * SLOTS
    if sharded:  # each shard's writer thread is placed near its GPU
        assert sorted(set(fake.bus_ids)) == sorted(fake.pci_bus_id(d) for d in range(n_gpus))

    reader = gs.load_checkpoint(path)
    expected = {**{k: h for k, (h, _) in gpu.items()}, **cpu}
    assert sorted(reader.get_variable_to_shape_map()) == sorted(expected)
    for name, host in expected.items():
        assert same(reader.get_tensor(name), host), name
    reader.close()

    ptrs = {}
    for name, (host, arr) in gpu.items():
        ptrs[name] = arr.data.ptr
        fill(fake, arr, 0)
    saved_cpu = {name: host.copy() for name, host in cpu.items()}
    for host in cpu.values():
        host[...] = 0
    saver.restore(path)
    assert_ring_idle(fake)
    for name, (host, arr) in gpu.items():
        assert saver.variables[name] is arr and arr.data.ptr == ptrs[name]
        assert same(arr.get(), host), name
    for name, host in cpu.items():
        assert saver.variables[name] is host and same(host, saved_cpu[name]), name

    saver.save(str(tmp_path / "model"), global_step=4)  # the rings are reused, not reallocated
    assert fake.live_pinned == n_gpus * SLOTS
    assert_ring_idle(fake)


def test_restore_onto_another_device_layout(fake, tmp_path):
    """Saved from GPU 0 and 1, restored into arrays placed the other way round."""
    gpu = gpu_variables(fake, 2)
    saver = gs.Saver({name: arr for name, (_, arr) in gpu.items()}, sharded=True, durable=False)
    path = saver.save(str(tmp_path / "model"))
    swapped = {}
    for name, (host, _) in gpu.items():
        d = 1 - int(name[1])
        swapped[name] = put(fake, np.zeros_like(host), d)
    gs.Saver(swapped, durable=False).restore(path)
    for name, (host, _) in gpu.items():
        assert same(swapped[name].get(), host), name
    assert_ring_idle(fake)


def test_many_small_tensors_wrap_the_ring(fake, tmp_path):
    """Small tensors go packed, several slabs' worth: the ring wraps around many times."""
    dtypes = [np.uint8, np.int16, np.float32, np.float64, np.complex64, np.bool_, np.uint64]
    hosts = {}
    for i in range(90):
        dtype = np.dtype(dtypes[i % len(dtypes)])
        count = max(1, (i * 37) % (SMALL // dtype.itemsize))
        hosts[f"s/{i:03d}"] = values((count,), dtype)
    total = sum(h.nbytes for h in hosts.values())
    assert total > 4 * SLOT
    arrays = {name: put(fake, h, 1) for name, h in hosts.items()}
    saver = gs.Saver(arrays, durable=False)
    path = saver.save(str(tmp_path / "model"))
    ring = backend()._states[1].ring
    assert fake.stats["gs_pack"] >= math.ceil(total / SLOT)
    assert fake.stats["gs_crc32c"] == 1  # every tensor's crc32c in one launch
    assert ring.acquired >= math.ceil(total / SLOT) > SLOTS
    assert_ring_idle(fake)
    with gs.load_checkpoint(path) as reader:
        for name, host in hosts.items():
            assert same(reader.get_tensor(name), host), name
    for arr in arrays.values():
        fill(fake, arr, 0)
    saver.restore(path)
    assert fake.stats["gs_unpack"] >= math.ceil(total / SLOT)
    for name, host in hosts.items():
        assert same(arrays[name].get(), host), name
    assert_ring_idle(fake)


def test_large_tensors_span_several_slots(fake, tmp_path):
    """Tensors of one slot and more are copied slot by slot, including a partial last slot."""
    hosts = {
        "exact": values((3 * SLOT // 8,), np.float64),
        "partial": values((3 * SLOT + 8,), np.uint8),
        "matrix": values((37, 61), np.float32),
        "at_small": values((SMALL,), np.uint8),
        "below_small": values((SMALL - 8,), np.uint8),
    }
    arrays = {name: put(fake, h, 0) for name, h in hosts.items()}
    saver = gs.Saver(arrays, durable=False)
    path = saver.save(str(tmp_path / "model"))
    chunks = sum(math.ceil(h.nbytes / SLOT) for name, h in hosts.items() if h.nbytes >= SMALL)
    assert fake.stats["memcpy.DeviceToHost"] == chunks + 1  # + one packed slab
    assert fake.stats["memcpy.DeviceToHost.bytes"] == sum(h.nbytes for h in hosts.values())
    assert_ring_idle(fake)
    for arr in arrays.values():
        fill(fake, arr, 1)
    saver.restore(path)
    for name, host in hosts.items():
        assert same(arrays[name].get(), host), name
    assert fake.stats["memcpy.HostToDevice.bytes"] == sum(h.nbytes for h in hosts.values())
    assert_ring_idle(fake)
    with gs.load_checkpoint(path) as reader:
        for name, host in hosts.items():
            assert same(reader.get_tensor(name, device=0).get(), host), name
    assert_ring_idle(fake)


@pytest.mark.parametrize("sequential", [False, True], ids=["batched", "sequential"])
def test_zero_size_tensors(fake, tmp_path, sequential):
    shapes = {"e1": ((0,), np.float32), "e2": ((4, 0), np.int64), "e3": ((0, 3, 2), np.uint8)}
    hosts = {name: values(shape, dtype) for name, (shape, dtype) in shapes.items()}
    hosts["small"] = values((10,), np.float32)
    hosts["large"] = values((SLOT + 1,), np.uint8)
    arrays = {name: put(fake, h, 1) for name, h in hosts.items()}
    saver = gs.Saver(arrays, durable=False, restore_sequentially=sequential)
    path = saver.save(str(tmp_path / "model"))
    with gs.load_checkpoint(path) as reader:
        for name, host in hosts.items():
            assert same(reader.get_tensor(name), host), name
        out = reader.get_tensor("e2", device=1)
        assert isinstance(out, fake.module.ndarray) and out.shape == (4, 0) and out.device.id == 1
    for name in ("small", "large"):
        fill(fake, arrays[name], 0)
    saver.restore(path)
    for name, host in hosts.items():
        assert same(arrays[name].get(), host), name
    assert_ring_idle(fake)


def test_restore_sequentially(fake, tmp_path):
    """restore_sequentially=True: every tensor on its own, no packed batches, same values."""
    gpu = gpu_variables(fake, 2)
    saver = gs.Saver({n: a for n, (_, a) in gpu.items()}, restore_sequentially=True, durable=False)
    path = saver.save(str(tmp_path / "model"))
    for _, arr in gpu.values():
        fill(fake, arr, 0)
    saver.restore(path)
    assert fake.stats["gs_unpack"] == 0
    for name, (host, arr) in gpu.items():
        assert same(arr.get(), host), name
    assert_ring_idle(fake)


def test_save_non_contiguous_arrays(fake, tmp_path):
    """Strided views (rows longer than a slot, transposed, reversed, small) are saved as their C-order values."""
    bases = {
        "wide": values((5, 2 * SLOT // 8 + 10), np.float64),  # a row of the view is > one slot
        "tall": values((300, 6), np.float32),
        "rev": values((700,), np.int32),
        "tiny": values((12,), np.int16),
    }
    dev = {name: put(fake, h, 0) for name, h in bases.items()}
    views = {
        "wide": (dev["wide"][:, ::2], bases["wide"][:, ::2]),
        "tall_t": (dev["tall"].T, bases["tall"].T),
        "rev": (dev["rev"][::-1], bases["rev"][::-1]),
        "tiny": (dev["tiny"][::3], bases["tiny"][::3]),
    }
    assert not any(v.flags.c_contiguous for v, _ in views.values())
    saver = gs.Saver({name: v for name, (v, _) in views.items()}, durable=False)
    path = saver.save(str(tmp_path / "model"))
    with gs.load_checkpoint(path) as reader:
        for name, (_, host) in views.items():
            assert same(reader.get_tensor(name), np.ascontiguousarray(host)), name
    assert_ring_idle(fake)


def test_restore_into_non_contiguous_arrays(fake, tmp_path):
    """Restoring into strided views writes the view's elements only."""
    bases = {"wide": values((5, 2 * SLOT // 8 + 10), np.float64), "rev": values((700,), np.int32)}
    stored = {"wide": values((5, SLOT // 8 + 5), np.float64), "rev": values((700,), np.int32)}
    path = gs.Saver(dict(stored), durable=False).save(str(tmp_path / "model"))  # a NumPy save
    dev = {name: put(fake, h, 1) for name, h in bases.items()}
    views = {"wide": dev["wide"][:, ::2], "rev": dev["rev"][::-1]}
    gs.Saver(views, durable=False).restore(path)
    want_wide = bases["wide"].copy()
    want_wide[:, ::2] = stored["wide"]
    assert same(dev["wide"].get(), want_wide)
    assert same(dev["rev"].get(), stored["rev"][::-1].copy())
    assert_ring_idle(fake)


@pytest.mark.parametrize("seed", range(4))
def test_random_layouts(fake, tmp_path, seed):
    """Random sizes around every threshold, on random GPUs, sharded or not, batched or sequential."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, SMALL - 1, SMALL, SMALL + 1, SLOT - 1, SLOT, SLOT + 1, 2 * SLOT + 3]
    dtypes = [np.uint8, np.int32, np.float64]
    hosts, placement = {}, {}
    for i in range(int(rng.integers(5, 30))):
        dtype = np.dtype(dtypes[int(rng.integers(len(dtypes)))])
        nbytes = int(rng.choice(sizes)) if rng.random() < 0.5 else int(rng.integers(0, 3 * SLOT))
        hosts[f"t{i:02d}"] = values((nbytes // dtype.itemsize,), dtype)
        placement[f"t{i:02d}"] = int(rng.integers(2))
    arrays = {n: put(fake, h, placement[n]) for n, h in hosts.items()}
    saver = gs.Saver(arrays, sharded=bool(seed % 2), restore_sequentially=seed >= 2, durable=False)
    path = saver.save(str(tmp_path / "model"))
    with gs.load_checkpoint(path) as reader:
        for name, host in hosts.items():
            assert same(reader.get_tensor(name), host), name
    for arr in arrays.values():
        fill(fake, arr, 0)
    saver.restore(path)
    for name, host in hosts.items():
        assert same(arrays[name].get(), host), name
    assert_ring_idle(fake)


def test_concurrent_saves_share_each_gpus_ring(fake, tmp_path):
    """Savers on several threads use the same GPUs at once: each ring is shared, never double-booked."""
    jobs = []
    for t in range(3):
        hosts = {f"w{t}/{i}": values((int(n),), np.uint8) for i, n in enumerate((100, 900, 3 * SLOT, 2000, SLOT))}
        arrays = {n: put(fake, h, i % 2) for i, (n, h) in enumerate(hosts.items())}
        jobs.append((hosts, gs.Saver(arrays, sharded=t == 1, durable=False)))
    errors: list[BaseException] = []
    paths: dict[int, list[str]] = {t: [] for t in range(len(jobs))}

    def work(t: int) -> None:
        try:
            (tmp_path / f"saver{t}").mkdir()
            for k in range(4):
                paths[t].append(jobs[t][1].save(str(tmp_path / f"saver{t}" / "model"), global_step=k))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(jobs))]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 300  # one hang guard for all: never a bound on speed
    for th in threads:
        th.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(th.is_alive() for th in threads), "a save hung"
    assert not errors, errors
    for t, (hosts, _) in enumerate(jobs):
        for path in paths[t]:
            with gs.load_checkpoint(path) as reader:
                for name, host in hosts.items():
                    assert same(reader.get_tensor(name), host), (path, name)
    assert_ring_idle(fake)


# -------------------------------------------------------------- get_tensor
def test_get_tensor_on_a_device(fake, tmp_path):
    """load_checkpoint(p).get_tensor(name, device=k): a new array on GPU k, verified, from any checkpoint."""
    prefix = str(tmp_path / "bundle")
    stored = {
        "large": values((3 * SLOT + 5,), np.uint8),
        "small": values((3, 7), np.float32),
        "scalar": values((), np.int64),
        "empty": values((0, 2), np.float64),
    }
    part = values((6, 4), np.float32)
    with BundleWriter(prefix, durable=False) as w:
        for name, arr in stored.items():
            w.add(name, arr)
        w.add_slice("part", [6, 4], "0,3:-", part[:3])
        w.add_slice("part", [6, 4], "3,3:-", part[3:])
        w.add("text", np.array([b"a", b"bc"], dtype=object))
    stored["part"] = part
    with gs.load_checkpoint(prefix) as reader:
        for device in (1, 0):
            for name, host in stored.items():
                out = reader.get_tensor(name, device=device)
                assert isinstance(out, fake.module.ndarray)
                assert out.device.id == device
                if out.nbytes:
                    assert fake.find(out.data.ptr).device == device
                assert same(out.get(), host), (name, device)
        with pytest.raises(TypeError, match="strings"):
            reader.get_tensor("text", device=0)
    assert_ring_idle(fake)


def test_restore_partitioned_variable_into_gpu_array(fake, tmp_path):
    """A variable stored as slices (as TensorFlow's partitioned variables are) restores into a GPU array."""
    prefix = str(tmp_path / "bundle")
    part = values((6, 4), np.float32)
    with BundleWriter(prefix, durable=False) as w:
        w.add_slice("part", [6, 4], "0,2:-", part[:2])
        w.add_slice("part", [6, 4], "2,4:-", part[2:])
        w.add("small", part[0].copy())
    target = put(fake, np.zeros((6, 4), np.float32), 1)
    small = put(fake, np.zeros(4, np.float32), 1)
    gs.Saver({"part": target, "small": small}, durable=False).restore(prefix)
    assert same(target.get(), part) and same(small.get(), part[0])
    assert_ring_idle(fake)


# ---------------------------------------------------------- TF-format bytes
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_same_bytes_as_a_numpy_save(fake, tmp_path, sharded):
    """A save from fake GPUs writes the very bytes (data and index) a NumPy save of the same values writes."""
    hosts = {
        "a/small": values((5, 3), np.float32),
        "a/large": values((SLOT,), np.float16),
        "b/empty": values((0,), np.int32),
        "b/small": values((100,), np.uint8),
        "b/large": values((2, SLOT + 3), np.int16),
        "c/scalar": values((), np.complex128),
    }
    placement = {name: i % 2 for i, name in enumerate(hosts)}
    gpu = gs.Saver({n: put(fake, h, placement[n]) for n, h in hosts.items()}, sharded=sharded, durable=False)
    cpu = gs.Saver(
        [gs.Variable(h.copy(), name=n, device=f"/cpu:{placement[n]}") for n, h in hosts.items()],
        sharded=sharded,
        durable=False,
    )
    (tmp_path / "gpu").mkdir()
    (tmp_path / "cpu").mkdir()
    p_gpu = gpu.save(str(tmp_path / "gpu" / "model"), write_state=False)
    p_cpu = cpu.save(str(tmp_path / "cpu" / "model"), write_state=False)
    files_gpu = sorted(os.listdir(tmp_path / "gpu"))
    assert files_gpu == sorted(os.listdir(tmp_path / "cpu"))
    for f in files_gpu:
        assert (tmp_path / "gpu" / f).read_bytes() == (tmp_path / "cpu" / f).read_bytes(), f
    with gs.load_checkpoint(p_gpu) as r_gpu, gs.load_checkpoint(p_cpu) as r_cpu:
        for name, host in hosts.items():
            assert same(r_gpu.get_tensor(name), host) and same(r_cpu.get_tensor(name), host), name
    assert_ring_idle(fake)


# ----------------------------------------------------------------- checksums
@pytest.mark.parametrize("victim", ["packed", "chunked"])
def test_corrupt_byte_raises_checksum_error(fake, tmp_path, victim):
    hosts = {"packed": values((200,), np.float32), "chunked": values((2 * SLOT + 7,), np.uint8)}
    arrays = {name: put(fake, h, 0) for name, h in hosts.items()}
    saver = gs.Saver(arrays, durable=False)
    path = saver.save(str(tmp_path / "model"))
    damage(path, victim)
    with pytest.raises(gs.ChecksumError) as info:
        saver.restore(path)
    assert info.value.tensor == victim
    assert_ring_idle(fake)
    with gs.load_checkpoint(path) as reader, pytest.raises(gs.ChecksumError):
        reader.get_tensor(victim, device=1)
    assert_ring_idle(fake)


@pytest.mark.parametrize("victim", ["s1", "big", "s3"])
def test_checksum_error_restores_every_variable_before_it(fake, tmp_path, victim):
    """The damaged variable is named, and every variable before it in the Saver's order is
    restored, including small ones still waiting in a pinned batch when a large one fails."""
    names = ["s0", "s1", "big", "s2", "s3"]
    hosts = {n: values((2 * SLOT + 7,) if n == "big" else (64,), np.float32 if n != "big" else np.uint8) for n in names}
    arrays = {n: put(fake, h, 0) for n, h in hosts.items()}
    saver = gs.Saver(arrays, durable=False)
    path = saver.save(str(tmp_path / "model"))
    damage(path, victim)
    for arr in arrays.values():
        fill(fake, arr, 0)
    with pytest.raises(gs.ChecksumError) as info:
        saver.restore(path)
    assert info.value.tensor == victim
    for name in names[: names.index(victim)]:
        assert same(arrays[name].get(), hosts[name]), name
    assert_ring_idle(fake)


# ------------------------------------------------------------- write failures
class FailingWrites(PosixFileOps):
    """Every write to a data file fails with ENOSPC (other files are written)."""

    def __init__(self) -> None:
        self.data_fds: set[int] = set()
        self.failed = 0

    def create(self, path):
        fd = super().create(path)
        if ".data-" in os.path.basename(path):
            self.data_fds.add(fd)
        return fd

    def close(self, fd):
        self.data_fds.discard(fd)
        super().close(fd)

    def write(self, fd, buffers):
        if fd in self.data_fds:
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write(fd, buffers)

    def pwrite(self, fd, buffers, offset):
        if fd in self.data_fds:
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().pwrite(fd, buffers, offset)


@pytest.mark.parametrize("layout", ["chunked", "packed"])
def test_write_failure_gives_every_pinned_buffer_back(fake, tmp_path, layout):
    """ENOSPC while writing: the save fails cleanly and the ring ends with all its slots free."""
    if layout == "chunked":
        hosts = {"big": values((6 * SLOT,), np.uint8)}
    else:  # three slabs of four tensors: the third needs a buffer the failed write gives back
        hosts = {f"s{i:02d}": values((1000,), np.uint8) for i in range(12)}
    arrays = {name: put(fake, h, 0) for name, h in hosts.items()}
    ops = FailingWrites()
    saver = gs.Saver(arrays, durable=False, fileops=ops)
    with pytest.raises(gs.CheckpointWriteError) as info:
        saver.save(str(tmp_path / "model"))
    assert info.value.errno == errno.ENOSPC and ops.failed
    assert not os.path.exists(str(tmp_path / "model.index"))
    assert_ring_idle(fake)

    done: list[str] = []
    worker = threading.Thread(
        target=lambda: done.append(gs.Saver(arrays, durable=False).save(str(tmp_path / "again"))), daemon=True
    )
    worker.start()
    worker.join(timeout=300)  # a hang guard
    assert done, "the next save on the device hung waiting for a pinned buffer"
    with gs.load_checkpoint(done[0]) as reader:
        for name, host in hosts.items():
            assert same(reader.get_tensor(name), host)


# ------------------------------------------------------------ device memory
def test_get_tensor_checks_free_memory_first(fake, tmp_path):
    path = gs.Saver({"w": values((1000,), np.float64)}, durable=False).save(str(tmp_path / "model"))
    fake.set_free(1, 100)
    with gs.load_checkpoint(path) as reader, pytest.raises(gs.InsufficientDeviceMemoryError, match="/gpu:1"):
        reader.get_tensor("w", device=1)
    assert fake.used[1] == 0
    assert fake.stats["memcpy.HostToDevice"] == 0


def test_get_tensor_counts_the_staging_slab_on_first_use(fake, tmp_path):
    """The first use of a GPU also allocates the staging slab: a tensor that fits without it is not enough."""
    path = gs.Saver({"w": values((100,), np.float64)}, durable=False).save(str(tmp_path / "model"))
    fake.set_free(1, 800 + SLOT // 2)  # the tensor fits, the tensor and the slab do not
    with gs.load_checkpoint(path) as reader, pytest.raises(gs.InsufficientDeviceMemoryError):
        reader.get_tensor("w", device=1)
    assert fake.stats["memcpy.HostToDevice"] == 0


def test_restore_checks_free_memory_for_temporaries(fake, tmp_path):
    """Strided destinations go through the staging slab; only one whose row exceeds the slab needs a
    temporary, and too little free memory for it (or for the slab) fails before any copy."""
    stored = {"c": values((64,), np.float32), "v": values((50, 8), np.float32), "w": values((2, 1536), np.float32)}
    path = gs.Saver(dict(stored), durable=False).save(str(tmp_path / "model"))  # a NumPy save
    contiguous = put(fake, np.zeros(64, np.float32), 0)
    base = put(fake, np.zeros((50, 16), np.float32), 0)
    view = base[:, ::2]  # rows of 32 bytes: through the slab, no temporary
    wide_base = put(fake, np.zeros((2, 3072), np.float32), 0)
    wide = wide_base[:, ::2]  # rows of 6 KiB > SLOT: needs a temporary
    saver = gs.Saver({"c": contiguous, "v": view}, durable=False)

    fake.set_free(0, SLOT - 1)  # not even the staging slab of a first restore
    with pytest.raises(gs.InsufficientDeviceMemoryError):
        saver.restore(path)
    assert fake.stats["memcpy.HostToDevice"] == 0

    fake.set_free(0, 1 << 20)
    gs.Saver({"c": contiguous}, durable=False).restore(path)  # the device's state now exists
    fill(fake, contiguous, 0)
    fake.set_free(0, 4096 + 2 * 32)  # strided rows that fit the slab need no new memory but the checks' tables
    saver.restore(path)
    assert same(contiguous.get(), stored["c"]) and same(view.get(), stored["v"])
    assert not base.get()[:, 1::2].any()  # the other columns are untouched

    wide_saver = gs.Saver({"c": contiguous, "w": wide}, durable=False)
    fill(fake, contiguous, 0)
    copies = fake.stats["memcpy.HostToDevice"]
    checks = 4096 + 2 * 32  # the device checks' tables
    fake.set_free(0, wide.nbytes + checks - 1)
    with pytest.raises(gs.InsufficientDeviceMemoryError, match=str(wide.nbytes + checks)):
        wide_saver.restore(path)
    assert fake.stats["memcpy.HostToDevice"] == copies
    assert not contiguous.get().any() and not wide_base.get().any()
    fake.set_free(0, wide.nbytes + checks)
    wide_saver.restore(path)
    assert same(contiguous.get(), stored["c"]) and same(wide.get(), stored["w"])
    assert_ring_idle(fake)


# ------------------------------------------------------ ordering with the caller
def test_save_sees_work_queued_on_the_current_stream(fake, tmp_path):
    """Values written on the caller's stream just before save() are the ones saved.

    CuPy work is asynchronous: ``a[...] = x`` is queued on the current stream
    and returns. The backend's stream is non-blocking, so unless it waits for
    the current stream it may copy the arrays before that work has run.
    """
    cp = fake.module
    hosts = {"small": values((40,), np.float32), "large": values((2 * SLOT,), np.uint8)}
    arrays = {name: put(fake, np.zeros_like(h), 0) for name, h in hosts.items()}
    with cp.cuda.Device(0):
        for name, host in hosts.items():
            arrays[name][...] = host  # queued on the null stream, not waited for
    path = gs.Saver(arrays, durable=False).save(str(tmp_path / "model"))
    with gs.load_checkpoint(path) as reader:
        for name, host in hosts.items():
            assert same(reader.get_tensor(name), host), name


def test_restore_waits_for_reads_queued_on_the_current_stream(fake, tmp_path):
    """Work queued before restore() that reads an array sees its old value, not the restored one."""
    cp = fake.module
    old = values((40,), np.float32)
    new = values((40,), np.float32)
    path = gs.Saver({"w": new.copy()}, durable=False).save(str(tmp_path / "model"))
    w = put(fake, old, 0)
    snapshot = put(fake, np.zeros_like(old), 0)
    with cp.cuda.Device(0):
        snapshot[...] = w  # queued on the null stream: reads w's old value
    gs.Saver({"w": w}, durable=False).restore(path)
    assert same(snapshot.get(), old)
    assert same(w.get(), new)


def test_overlapping_device_views_are_refused_and_adjacent_ones_restore(fake, tmp_path):
    """Views of one device buffer that share bytes save, but a restore into them is refused, naming both;
    adjacent ones restore."""
    host = values((64,), np.float32)
    base = put(fake, host, 0)
    overlapping = gs.Saver({"first": base[:40], "second": base[24:]}, durable=False)
    saved = overlapping.save(str(tmp_path / "overlap"))
    assert same(gs.load(saved)["second"], host[24:])
    with pytest.raises(gs.InvalidArgumentError, match="'first' and 'second' share memory"):
        overlapping.restore(saved)
    first, second = base[:24], base[24:]
    saver = gs.Saver({"first": first, "second": second}, durable=False)
    path = saver.save(str(tmp_path / "model"))
    fill(fake, base, 0)
    saver.restore(path)
    assert same(base.get(), host)
    assert_ring_idle(fake)
