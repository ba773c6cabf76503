"""Defects an independent review of the GPU path found (2026-11-30), each reproduced here on the fake CuPy.

1. ``device_small_bytes`` above ``slot_bytes`` (both valid settings): a "small" tensor larger than a pinned
   buffer overran it on restore and failed on save.
2. A bfloat16/float8 stand-in's dtype was not checked when the Saver had several groups, or on a partial restore.
3. Partitioned checkpoints and ``cast=True`` into stand-ins converted values instead of carrying bits.
4. ``offset + size`` overflowed int64 in the bounds checks: a forged entry passed them.
5-6. A damaged non-contiguous tensor was overwritten before its check (small), or without staging (large).
7. A CUDA fault in a strided restore kept a pinned buffer.
8. A failed restore left device work queued that landed on the arrays after it returned.
9. ``close()`` from another Saver between a save's state lookup and its lock broke the save.
Also: ``add_packed_run`` checks each size against its dtype and shape; JAX 4-bit types are refused on a GPU.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fakecupy
import gpusaver as gs
from gpusaver import backends, config
from gpusaver.backends import cupy_backend
from gpusaver.format import BundleReader, BundleWriter
from gpusaver.format.entry import decode_entry, encode_entry
from gpusaver.format.table import encode_table
from gpu_fake import SLOT, assert_ring_idle, damage, fake, fill, put, same, values  # noqa: F401

BF16 = np.dtype(ml_dtypes.bfloat16)


def _stand_in(fake, host_int16: np.ndarray, name: str, device: int = 0) -> gs.Variable:
    v = gs.Variable(put(fake, host_int16, device), name)
    v.logical_dtype = BF16
    return v


# 1
def test_a_small_threshold_above_the_pinned_buffer_is_capped(fake, tmp_path) -> None:
    host = values((SLOT + 1000,), np.uint8)
    with config.set(device_small_bytes=4 * SLOT):
        arr = put(fake, host, 0)
        prefix = gs.Saver({"a": arr}, durable=False).save(str(tmp_path / "m"))
        fill(fake, arr, 0)
        gs.Saver({"a": arr}, durable=False).restore(prefix)
    assert same(arr.get(), host)
    with gs.load_checkpoint(prefix) as reader:
        assert same(reader.get_tensor("a"), host)
    assert_ring_idle(fake)


# 2
@pytest.mark.parametrize("other", ["cpu", "gpu1", "missing"])
def test_a_stand_ins_dtype_is_checked_in_every_restore(fake, tmp_path, other) -> None:
    prefix = gs.Saver({"w": values((8,), np.int16), "x": values((4,), np.float32)}, durable=False).save(
        str(tmp_path / "m")
    )  # "w" stored as int16
    v = _stand_in(fake, np.zeros(8, np.int16), "w")
    if other == "cpu":
        x = gs.Variable(np.zeros(4, np.float32), "x")
    elif other == "gpu1":
        x = gs.Variable(put(fake, np.zeros(4, np.float32), 1), "x")
    else:
        x = gs.Variable(put(fake, np.zeros(3, np.float32), 0), "not_there")
    with pytest.raises(gs.DTypeMismatchError):
        gs.Saver([v, x], durable=False).restore(prefix, strict=other != "missing")
    assert not v.array.get().any()


# 3
def test_cast_into_a_stand_in_carries_bfloat16_bits(fake, tmp_path) -> None:
    stored = np.array([1.5, -2.0, 3.25], np.float32)
    prefix = gs.Saver({"w": stored}, durable=False).save(str(tmp_path / "m"))
    v = _stand_in(fake, np.zeros(3, np.int16), "w")
    gs.Saver([v], durable=False).restore(prefix, cast=True)
    assert v.array.get().tolist() == stored.astype(BF16).view(np.int16).tolist()


def test_a_partitioned_bfloat16_tensor_into_a_stand_in(fake, tmp_path) -> None:
    full = np.array([1.5, -2.0, 3.25, 8.0], np.float32).astype(BF16)
    (tmp_path / "s").mkdir()
    with BundleWriter(str(tmp_path / "s" / "m"), durable=False) as w:
        w.add("a_z", values((5,), np.float32))
        w.add_slice("w", [4], "0,2", full[:2])
        w.add_slice("w", [4], "2,2", full[2:])
    v = _stand_in(fake, np.zeros(4, np.int16), "w")
    gs.Saver([gs.Variable(put(fake, np.zeros(5, np.float32), 0), "a_z"), v], durable=False).restore(
        str(tmp_path / "s" / "m")
    )
    assert v.array.get().tolist() == full.view(np.int16).tolist()


# 4
def _forge_offset(prefix: str, name: str, offset: int) -> None:
    with BundleReader(prefix) as r:
        items = list(r._table)
    out = []
    for k, v in items:
        if k == name.encode():
            e = decode_entry(v)
            v = encode_entry(e.dtype, e.shape, e.shard_id, offset, e.size, e.crc32c)
        out.append((k, v))
    with open(prefix + ".index", "wb") as f:
        f.write(encode_table(out))


@pytest.mark.parametrize("n", [4, 4096])  # packed and chunked
def test_an_offset_that_overflows_int64_is_refused_before_any_change(fake, tmp_path, n) -> None:
    hosts = {"a": values((16,), np.float32), "b": values((n,), np.float32)}
    prefix = gs.Saver(hosts, durable=False).save(str(tmp_path / "m"))
    _forge_offset(prefix, "b", (1 << 63) - 8)
    arrays = {k: put(fake, np.zeros_like(h), 0) for k, h in hosts.items()}
    with pytest.raises(gs.CorruptCheckpointError):
        gs.Saver(arrays, durable=False).restore(prefix)
    assert not arrays["a"].get().any() and not arrays["b"].get().any()
    assert_ring_idle(fake)


# 5, 6
@pytest.mark.parametrize("shape", [(6, 8), (64, 64)], ids=["small", "large"])
def test_a_damaged_strided_tensor_keeps_its_values(fake, tmp_path, shape) -> None:
    host = values(shape, np.float32)
    base = put(fake, np.zeros((shape[0], 2 * shape[1]), np.float32), 0)
    view = base[:, ::2]
    fill(fake, view, host)
    saver = gs.Saver({"v": view}, durable=False)
    prefix = saver.save(str(tmp_path / "m"))
    damage(prefix, "v")
    fill(fake, view, 7)
    with pytest.raises(gs.ChecksumError):
        saver.restore(prefix)
    assert (view.get() == 7).all()
    assert not base.get()[:, 1::2].any()
    assert_ring_idle(fake)


# 7
def test_a_cuda_fault_in_a_strided_restore_gives_the_buffer_back(fake, tmp_path, monkeypatch) -> None:
    base = put(fake, np.zeros((6, 16), np.float32), 0)
    view = base[:, ::2]
    fill(fake, view, values((6, 8), np.float32))
    saver = gs.Saver({"v": view}, durable=False)
    prefix = saver.save(str(tmp_path / "m"))
    saver.restore(prefix)
    cls = type(backends._cupy_backend._states[0].stream)
    real, armed = cls.synchronize, [True]

    def failing(self) -> None:
        if armed[0]:
            armed[0] = False
            raise fakecupy.CUDARuntimeError(700, "cudaErrorIllegalAddress")
        real(self)

    monkeypatch.setattr(cls, "synchronize", failing)
    with pytest.raises(fakecupy.CUDARuntimeError):
        saver.restore(prefix)
    monkeypatch.setattr(cls, "synchronize", real)
    assert_ring_idle(fake)


# 8
def test_a_failed_restore_leaves_no_device_work_behind(fake, tmp_path, monkeypatch) -> None:
    z = values((5,), np.float32)
    prefix = gs.Saver({"a_z": z, "b": values((3,), np.float32)}, durable=False).save(str(tmp_path / "m"))
    zz = put(fake, np.zeros(5, np.float32), 0)
    bb = put(fake, np.zeros(3, np.float32), 0)
    saver = gs.Saver({"a_z": zz, "b": bb}, durable=False)
    saver.restore(prefix)

    def broken(*args, **kwargs):
        raise RuntimeError("a failure after the small tensors were queued")

    monkeypatch.setattr(cupy_backend.CupyBackend, "_restore_large", broken)
    monkeypatch.setattr(cupy_backend.CupyBackend, "_small_limit", staticmethod(lambda state: 16))  # "b" is large
    fill(fake, zz, 0)
    with pytest.raises(RuntimeError):
        saver.restore(prefix)
    assert fake.pending(backends._cupy_backend._states[0].stream) == 0
    cp = fake.module
    with cp.cuda.Device(0):
        zz[...] = -1  # the caller re-initialises after the failure, on its own stream
        cp.cuda.get_current_stream().synchronize()
    cp.cuda.Device(0).synchronize()
    assert (zz.get() == -1).all()


# 9
def test_a_close_between_lookup_and_lock_does_not_break_a_save(fake, tmp_path, monkeypatch) -> None:
    a = gs.Saver({"x": put(fake, values((100,), np.float32), 0)}, durable=False)
    b = gs.Saver({"y": put(fake, values((100,), np.float32), 0)}, durable=False)
    a.save(str(tmp_path / "warm"))
    original, fired = cupy_backend.CupyBackend._state, []

    def racing(self, device_id):
        state = original(self, device_id)
        if not fired:
            fired.append(1)
            b.close()  # another thread's close, interleaved here
        return state

    monkeypatch.setattr(cupy_backend.CupyBackend, "_state", racing)
    prefix = a.save(str(tmp_path / "m"))
    with gs.load_checkpoint(prefix) as reader:
        assert reader.has_tensor("x")


def test_add_packed_run_checks_sizes_against_dtype_and_shape(tmp_path) -> None:
    from gpusaver import native
    from gpusaver.format import dtypes

    if not native.available():
        pytest.skip("add_packed_run needs the C extension")
    with BundleWriter(str(tmp_path / "m"), durable=False) as w:
        enum = dtypes.from_numpy(np.dtype(np.float32))
        with pytest.raises(gs.InvalidArgumentError, match="got 8 bytes for 4 elements"):
            w.add_packed_run([b"w"], np.array([enum], np.int32), np.array([8]), np.array([1], np.int32),
                             np.array([4]), np.zeros(1, np.uint32), bytearray(8))


@pytest.mark.parametrize("sequential", [False, True])
def test_damage_on_two_gpus_names_the_first_in_the_savers_order(fake, tmp_path, sequential) -> None:
    """Whichever GPU's restore finds its damage first, the error names the Saver's first damaged variable,
    and every undamaged variable on both GPUs is restored."""
    from gpu_fake import SLOT

    hosts = {"a": values((3 * SLOT,), np.uint8), "b": values((10,), np.float32), "c": values((12,), np.float32)}
    arrays = {"a": put(fake, hosts["a"], 1), "b": put(fake, hosts["b"], 0), "c": put(fake, hosts["c"], 1)}
    saver = gs.Saver(arrays, durable=False, restore_sequentially=sequential)
    prefix = saver.save(str(tmp_path / "m"))
    damage(prefix, "a")
    damage(prefix, "b")
    for _ in range(5):
        for arr in arrays.values():
            fill(fake, arr, 0)
        with pytest.raises(gs.ChecksumError) as info:
            saver.restore(prefix)
        assert info.value.tensor == "a"
        assert same(arrays["c"].get(), hosts["c"])
