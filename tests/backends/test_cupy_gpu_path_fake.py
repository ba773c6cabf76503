"""The GPU path's guarantees, on the fake CuPy (``tests/fakecupy.py``): what a GPU run cannot be trusted to show.

* many small tensors of random sizes on both sides of the packing threshold and the pinned buffer's
  size save to the same bytes as a NumPy save and restore bit-exactly, with and without the C extension;
* restore verifies every small tensor on the device before it changes anything: a damaged one keeps its
  old values, every other one is restored; a damaged large tensor keeps its old values when a staging
  buffer fits, and holds the file's bytes (as the README says) when it does not;
* free device memory counts blocks cached in CuPy's pool (B1);
* a CUDA error in the middle of a save gives every pinned buffer back, so the next save runs (B3);
* ``Saver.close()`` and ``with Saver(...)`` release the pinned buffers and the staging slab (B6);
* kernels for two GPUs compile at the same time (B5).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fakecupy
import gpusaver as gs
from gpusaver import backends, native
from gpusaver.cuda import kernels as _kernels
from gpu_fake import (  # noqa: F401 - the fixture
    SLOT,
    SMALL,
    assert_ring_idle,
    damage,
    fake,
    fill,
    put,
    same,
    values,
)


def _backend():
    return backends._cupy_backend


# ------------------------------------------------------------- many small tensors
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 4), st.integers(SMALL - 3, SMALL + 3), st.integers(SLOT - 3, SLOT + 3),
                  st.integers(0, 3 * SLOT)),
        min_size=1, max_size=40,
    ),
    use_native=st.booleans(),
)
def test_random_sizes_round_trip_like_numpy(fake, tmp_path_factory, sizes, use_native) -> None:
    tmp = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(len(sizes))
    hosts = {f"t{i:03d}": rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate(sizes)}
    arrays = {k: put(fake, h, 0) for k, h in hosts.items()}
    native.use(use_native)
    try:
        saver = gs.Saver(arrays, durable=False)
        prefix = saver.save(str(tmp / "m"))
        cpu = gs.Saver(dict(hosts), durable=False).save(str(tmp / "cpu"))
        for suffix in (".index", ".data-00000-of-00001"):
            assert open(prefix + suffix, "rb").read() == open(cpu + suffix, "rb").read()
        for arr in arrays.values():
            fill(fake, arr, 0)
        saver.restore(prefix)
    finally:
        native.use(True)
    for k, h in hosts.items():
        assert same(arrays[k].get(), h), k
    assert_ring_idle(fake)


# ---------------------------------------------------------------- damage on restore
def _saved(fake, tmp_path, hosts):
    arrays = {k: put(fake, h, 0) for k, h in hosts.items()}
    saver = gs.Saver(arrays, durable=False)
    return arrays, saver, saver.save(str(tmp_path / "m"))


@pytest.mark.parametrize("victim", ["s0", "s2", "s4"])
def test_a_damaged_small_tensor_keeps_its_values_and_every_other_is_restored(fake, tmp_path, victim) -> None:
    hosts = {f"s{i}": values((40 + i,), np.float32) for i in range(5)}
    hosts["big"] = values((3 * SLOT + 5,), np.uint8)
    arrays, saver, prefix = _saved(fake, tmp_path, hosts)
    damage(prefix, victim)
    for arr in arrays.values():
        fill(fake, arr, 7)
    with pytest.raises(gs.ChecksumError) as info:
        saver.restore(prefix)
    assert info.value.tensor == victim
    for k, h in hosts.items():
        got = arrays[k].get()
        assert (got == 7).all() if k == victim else same(got, h), k
    assert_ring_idle(fake)


def test_a_damaged_large_tensor_keeps_its_values_when_staging_fits(fake, tmp_path) -> None:
    hosts = {"big": values((3 * SLOT + 5,), np.uint8), "after": values((10,), np.float32)}
    arrays, saver, prefix = _saved(fake, tmp_path, hosts)
    damage(prefix, "big")
    for arr in arrays.values():
        fill(fake, arr, 7)
    with pytest.raises(gs.ChecksumError) as info:
        saver.restore(prefix)
    assert info.value.tensor == "big"
    assert (arrays["big"].get() == 7).all()  # verified in the staging buffer, never copied in
    assert same(arrays["after"].get(), hosts["after"])
    assert_ring_idle(fake)


def test_a_damaged_large_tensor_without_room_to_stage_holds_the_file_bytes(fake, tmp_path) -> None:
    hosts = {"big": values((3 * SLOT + 5,), np.uint8)}
    arrays, saver, prefix = _saved(fake, tmp_path, hosts)
    damage(prefix, "big")
    fill(fake, arrays["big"], 7)
    fake.set_free(0, 8192)  # the checks' tables fit; a staging buffer of the tensor's size does not
    with pytest.raises(gs.ChecksumError):
        saver.restore(prefix)
    got, want = arrays["big"].get(), hosts["big"]
    differs = np.flatnonzero(got != want)
    assert len(differs) == 1  # the file's bytes, the damaged one included, as the README states
    assert_ring_idle(fake)


# ---------------------------------------------------------------- B1: pool free bytes
def test_free_memory_counts_blocks_cached_in_cupys_pool(fake, tmp_path) -> None:
    host = values((5 * SLOT,), np.uint8)
    prefix = gs.Saver({"x": host}, durable=False).save(str(tmp_path / "m"))
    with gs.load_checkpoint(prefix) as reader:
        fake.set_free(0, 64)
        with pytest.raises(gs.InsufficientDeviceMemoryError):
            reader.get_tensor("x", device=0)
        fake.set_free(0, 64, cached=8 * SLOT)  # the driver sees almost nothing free; CuPy's pool holds plenty
        assert same(reader.get_tensor("x", device=0).get(), host)


# ---------------------------------------------------------------- B3: CUDA fault mid-save
@pytest.mark.parametrize("where", ["stream", "event"])
def test_a_cuda_error_mid_save_gives_every_pinned_buffer_back(fake, tmp_path, monkeypatch, where) -> None:
    """An asynchronous fault surfaces at a synchronize (of the stream or of a copy's event): at each
    such point in turn, the save raises it, and the next save finds every pinned buffer free
    instead of waiting forever."""
    hosts = {"a": values((3 * SLOT,), np.uint8), "b": values((10,), np.float32), "c": values((4 * SLOT,), np.uint8)}
    arrays = {k: put(fake, h, 0) for k, h in hosts.items()}
    saver = gs.Saver(arrays, durable=False)
    saver.save(str(tmp_path / "warm"))  # the device state exists
    import cupy

    cls = type(_backend()._states[0].stream) if where == "stream" else cupy.cuda.Event
    real = cls.synchronize
    calls = {"n": 0, "fail_at": 0}

    def counting(self) -> None:
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise fakecupy.CUDARuntimeError(700, "cudaErrorIllegalAddress: an illegal memory access was encountered")
        real(self)

    monkeypatch.setattr(cls, "synchronize", counting)
    saver.save(str(tmp_path / "count"))
    points = calls["n"]
    assert points >= 2
    for k in range(1, points + 1):
        calls.update(n=0, fail_at=k)
        with pytest.raises(fakecupy.CUDARuntimeError):
            saver.save(str(tmp_path / f"broken{k}"))
        calls.update(n=0, fail_at=0)
        done = threading.Event()
        result: list = []
        worker = threading.Thread(target=lambda: (result.append(saver.save(str(tmp_path / f"next{k}"))), done.set()),
                                  daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert done.is_set(), f"fault at synchronize {k}: the next save waits for a pinned buffer never given back"
        assert_ring_idle(fake)
        with gs.load_checkpoint(result[0]) as reader:
            for name, h in hosts.items():
                assert same(reader.get_tensor(name), h)


# ---------------------------------------------------------------- B6: close
def test_close_and_the_context_manager_release_the_staging(fake, tmp_path) -> None:
    arrays = {"a": put(fake, values((2 * SLOT,), np.uint8), 0), "b": put(fake, values((8,), np.float32), 1)}
    with gs.Saver(arrays, durable=False) as saver:
        saver.save(str(tmp_path / "m"))
        assert set(_backend()._states) == {0, 1}
        used = list(fake.used)
    assert _backend()._states == {}
    import gc

    gc.collect()
    assert all(now < before for now, before in zip(fake.used, used))  # the slabs went back
    saver.save(str(tmp_path / "again"))  # made again on demand
    saver.close()
    saver.close()  # twice is fine


# ---------------------------------------------------------------- B5: concurrent compiles
def test_kernels_for_two_gpus_compile_at_the_same_time(fake, monkeypatch) -> None:
    """Each compile waits inside NVRTC until the other GPU's has started: under one lock they never meet."""
    both_inside = threading.Barrier(2, timeout=60)

    class MeetingModule:
        def __init__(self, code: str, options: tuple) -> None:
            pass

        def get_function(self, name: str) -> str:
            both_inside.wait()  # BrokenBarrierError (after the timeout) if compiles are serialised
            return name

    import cupy

    monkeypatch.setattr(cupy, "RawModule", MeetingModule)
    _kernels.clear_cache()
    errors: list[BaseException] = []

    def compile_on(device: int) -> None:
        try:
            _kernels.get_module("crc32c", device)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    try:
        threads = [threading.Thread(target=compile_on, args=(d,)) for d in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert _kernels.get_function("crc32c", "gs_crc32c_mask", 1) == "gs_crc32c_mask"
    finally:
        _kernels.clear_cache()


# ---------------------------------------------------------------- dtypes CuPy lacks
@pytest.mark.parametrize("size", [5, SMALL + 1, 3 * SLOT])  # packed, chunked
def test_a_stand_in_array_saves_under_its_real_dtype(fake, tmp_path, size) -> None:
    """A CUDA bfloat16 tensor reaches CuPy as its int16 view, with bfloat16 beside it
    (``Variable.logical_dtype``): the checkpoint says bfloat16, TensorFlow's code 14."""
    import ml_dtypes

    host = values((size,), np.int16)
    v = gs.Variable(put(fake, host, 0), "w")
    v.logical_dtype = np.dtype(ml_dtypes.bfloat16)
    saver = gs.Saver([v], durable=False)
    prefix = saver.save(str(tmp_path / "m"))
    with gs.load_checkpoint(prefix) as reader:
        assert reader.get_variable_to_dtype_map()["w"] == np.dtype(ml_dtypes.bfloat16)
        assert reader.get_tensor("w").view(np.int16).tobytes() == host.tobytes()
    fill(fake, v.array, 0)
    saver.restore(prefix)
    assert same(v.array.get(), host)
    plain = gs.Saver({"w": put(fake, host, 0)}, durable=False)
    with pytest.raises(gs.DTypeMismatchError):
        plain.restore(prefix)
