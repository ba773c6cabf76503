"""The pack, unpack and crc32c kernels on a real GPU, against the CPU reference.

Skipped unless CuPy sees a usable CUDA device.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from gpusaver.cuda import kernels as _kernels, reference as _kernels_ref


def _gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy, no driver, no device
        return 0


GPUS = _gpu_count()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS == 0, reason="needs a usable CUDA GPU and CuPy"),
]

MiB = 1 << 20


@pytest.fixture()
def cp() -> Iterator[Any]:
    import cupy

    with cupy.cuda.Device(0):
        yield cupy
        cupy.cuda.get_current_stream().synchronize()


def _sizes(rng: np.random.Generator) -> list[int]:
    """Empty, 1-byte, odd, thousands of small and a few > 16 MiB ranges."""
    sizes = [0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 255, 4095, 4096, 4097, 16383, 16384, 16385]
    sizes += [1] * 200 + [0] * 50
    sizes += [int(x) for x in rng.integers(0, 200, 3000)]
    sizes += [int(x) for x in rng.integers(200, 70000, 100)]
    sizes += [16 * MiB + 3, 17 * MiB, 33 * MiB - 5]
    order = rng.permutation(len(sizes))
    return [sizes[i] for i in order]


def _layout(rng: np.random.Generator, sizes: list[int], max_gap: int) -> list[int]:
    """Offsets placing the ranges in order with random (unaligned) gaps."""
    offsets, pos = [], 0
    for size in sizes:
        pos += int(rng.integers(0, max_gap + 1))
        offsets.append(pos)
        pos += size
    return offsets


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=np.uint8)


def test_module_compiled_once_per_device(cp: Any) -> None:
    _kernels.clear_cache()
    results: list[Any] = []

    def load() -> None:
        results.append(_kernels.get_module("pack", 0))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(m is results[0] for m in results)
    assert _kernels.get_module("pack", 0) is results[0]
    first = _kernels.get_function("pack", "gs_pack", 0)
    assert _kernels.get_function("pack", "gs_pack", 0) is first
    if GPUS > 1:
        assert _kernels.get_module("pack", 1) is not results[0]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64, np.complex128])
def test_pack_unpack_arrays(cp: Any, dtype: Any) -> None:
    rng = np.random.default_rng(7)
    shapes = [(0,), (1,), (3, 5), (17,), (1000,), (2, 3, 7), (4099,), (0, 4), (65537,)]
    shapes += [(int(n),) for n in rng.integers(0, 50, 500)]
    host = [rng.integers(-100, 100, s).astype(dtype) for s in shapes]
    arrays = [cp.asarray(h) for h in host]
    offsets = _layout(rng, [h.nbytes for h in host], 13)
    total = offsets[-1] + host[-1].nbytes + 9
    staging = cp.full(total, 0xAB, dtype=cp.uint8)
    _kernels.pack(arrays, staging, offsets)
    want = np.full(total, 0xAB, dtype=np.uint8)
    _kernels_ref.pack_ref(host, want, offsets)
    np.testing.assert_array_equal(staging.get(), want)

    back = [cp.zeros_like(a) for a in arrays]
    _kernels.unpack(staging, back, offsets)
    for got, h in zip(back, host):
        np.testing.assert_array_equal(got.get(), h)


def test_pack_unaligned_ranges(cp: Any) -> None:
    rng = np.random.default_rng(11)
    sizes = _sizes(rng)
    src_offsets = _layout(rng, sizes, 37)
    stage_offsets = _layout(rng, sizes, 29)
    host = _random_bytes(rng, src_offsets[-1] + sizes[-1] + 64)
    src = cp.asarray(host)
    ranges = [(src.data.ptr + o, s) for o, s in zip(src_offsets, sizes)]
    stage_size = stage_offsets[-1] + sizes[-1] + 64
    staging = cp.full(stage_size, 0x5A, dtype=cp.uint8)
    _kernels.pack(ranges, staging, stage_offsets)
    want = np.full(stage_size, 0x5A, dtype=np.uint8)
    _kernels_ref.pack_ref(
        [host[o : o + s] for o, s in zip(src_offsets, sizes)], want, stage_offsets
    )
    np.testing.assert_array_equal(staging.get(), want)


def test_unpack_unaligned_ranges(cp: Any) -> None:
    rng = np.random.default_rng(12)
    sizes = _sizes(rng)
    dst_offsets = _layout(rng, sizes, 41)
    stage_offsets = _layout(rng, sizes, 23)
    packed = _random_bytes(rng, stage_offsets[-1] + sizes[-1] + 32)
    staging = cp.asarray(packed)
    dst_size = dst_offsets[-1] + sizes[-1] + 32
    dst = cp.full(dst_size, 0xC3, dtype=cp.uint8)
    ranges = [(dst.data.ptr + o, s) for o, s in zip(dst_offsets, sizes)]
    _kernels.unpack(staging, ranges, stage_offsets)
    want = np.full(dst_size, 0xC3, dtype=np.uint8)
    _kernels_ref.unpack_ref(
        packed, [want[o : o + s] for o, s in zip(dst_offsets, sizes)], stage_offsets
    )
    np.testing.assert_array_equal(dst.get(), want)


def test_pack_every_alignment_pair(cp: Any) -> None:
    rng = np.random.default_rng(13)
    host = _random_bytes(rng, 64 * 1024)
    src = cp.asarray(host)
    sizes, src_offsets, stage_offsets, pos = [], [], [], 0
    for a in range(16):
        for b in range(16):
            for size in (1, 9, 40, 1000):
                src_offsets.append(1024 * ((a * 16 + b) % 48) + a)
                pos += (b - pos) % 16
                stage_offsets.append(pos)
                sizes.append(size)
                pos += size
    staging = cp.zeros(pos + 16, dtype=cp.uint8)
    _kernels.pack(
        [(src.data.ptr + o, s) for o, s in zip(src_offsets, sizes)], staging, stage_offsets
    )
    want = np.zeros(pos + 16, dtype=np.uint8)
    _kernels_ref.pack_ref(
        [host[o : o + s] for o, s in zip(src_offsets, sizes)], want, stage_offsets
    )
    np.testing.assert_array_equal(staging.get(), want)


def test_pack_on_a_stream_with_small_chunks(cp: Any) -> None:
    rng = np.random.default_rng(14)
    sizes = [int(x) for x in rng.integers(0, 5000, 300)]
    host = [_random_bytes(rng, s) for s in sizes]
    offsets = _layout(rng, sizes, 5)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        arrays = [cp.asarray(h) for h in host]
        staging = cp.zeros(offsets[-1] + sizes[-1], dtype=cp.uint8)
    _kernels.pack(arrays, staging, offsets, stream=stream, chunk_bytes=64)
    stream.synchronize()
    want = np.zeros(staging.size, dtype=np.uint8)
    _kernels_ref.pack_ref(host, want, offsets)
    np.testing.assert_array_equal(staging.get(), want)


def test_pack_rejects_bad_ranges(cp: Any) -> None:
    a = cp.arange(10, dtype=cp.uint8)
    staging = cp.zeros(16, dtype=cp.uint8)
    with pytest.raises(ValueError):
        _kernels.pack([a], staging, [7])
    with pytest.raises(ValueError):
        _kernels.pack([a, a], staging, [0, 5])
    with pytest.raises(ValueError):
        _kernels.pack([cp.zeros((4, 4))[:, ::2]], staging, [0])


def test_crc32c_ranges(cp: Any) -> None:
    rng = np.random.default_rng(21)
    sizes = _sizes(rng)
    offsets = _layout(rng, sizes, 19)
    host = _random_bytes(rng, offsets[-1] + sizes[-1] + 16)
    buf = cp.asarray(host)
    ptrs = [buf.data.ptr + o for o in offsets]
    pieces = [host[o : o + s] for o, s in zip(offsets, sizes)]
    got = _kernels.crc32c_ranges(ptrs, sizes)
    assert got.dtype == cp.uint32
    np.testing.assert_array_equal(got.get(), _kernels_ref.crc32c_ranges_ref(pieces))
    masked = _kernels.crc32c_ranges(ptrs, sizes, masked=True)
    np.testing.assert_array_equal(masked.get(), _kernels_ref.crc32c_ranges_ref(pieces, masked=True))


@pytest.mark.parametrize("chunk_bytes", [16, 48, 64, 1000, 65536])
def test_crc32c_chunk_sizes(cp: Any, chunk_bytes: int) -> None:
    rng = np.random.default_rng(chunk_bytes)
    sizes = [0, 1, chunk_bytes - 1, chunk_bytes, chunk_bytes + 1, 3 * chunk_bytes + 5]
    sizes += [int(x) for x in rng.integers(0, 20 * chunk_bytes, 100)]
    sizes += [5 * MiB + 7]
    offsets = _layout(rng, sizes, 17)
    host = _random_bytes(rng, offsets[-1] + sizes[-1])
    buf = cp.asarray(host)
    got = _kernels.crc32c_ranges(
        [buf.data.ptr + o for o in offsets], sizes, chunk_bytes=chunk_bytes
    )
    want = _kernels_ref.crc32c_ranges_ref([host[o : o + s] for o, s in zip(offsets, sizes)])
    np.testing.assert_array_equal(got.get(), want)


def test_crc32c_of_arrays_and_spec_vectors(cp: Any) -> None:
    arrays = [
        cp.zeros(32, dtype=cp.uint8),
        cp.arange(32, dtype=cp.uint8),
        cp.full(32, 0xFF, dtype=cp.uint8),
        cp.zeros((0,), dtype=cp.float32),
        cp.arange(12, dtype=cp.float32).reshape(3, 4),
    ]
    got = _kernels.crc32c_ranges(arrays).get().tolist()
    assert got[:4] == [0x8A9136AA, 0x46DD794E, 0x62A8AB43, 0]
    assert got[4] == _kernels_ref.crc32c_ranges_ref([np.arange(12, dtype=np.float32)])[0]
    masked = _kernels.crc32c_ranges(arrays[3:4], masked=True).get().tolist()
    assert masked == [0xA282EAD8]


def test_crc32c_one_huge_range(cp: Any) -> None:
    rng = np.random.default_rng(31)
    host = _random_bytes(rng, 96 * MiB + 13)
    buf = cp.asarray(host)
    got = _kernels.crc32c_ranges([buf.data.ptr + 13], [host.size - 13]).get()
    assert int(got[0]) == int(_kernels_ref.crc32c_ranges_ref([host[13:]])[0])


def test_crc32c_on_every_device() -> None:
    import cupy

    for dev in range(GPUS):
        with cupy.cuda.Device(dev):
            a = cupy.arange(32, dtype=cupy.uint8)
            stream = cupy.cuda.Stream()
            got = _kernels.crc32c_ranges([a], stream=stream, device_id=dev)
            stream.synchronize()
            assert got.device.id == dev
            assert got.get().tolist() == [0x46DD794E]


def test_pack_crc_round_trip_many_small(cp: Any) -> None:
    """The save path: pack thousands of tensors, checksum them, unpack them."""
    rng = np.random.default_rng(41)
    host = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(0, 64, 5000)]
    arrays = [cp.asarray(h) for h in host]
    offsets = _layout(rng, [h.nbytes for h in host], 0)
    staging = cp.empty(offsets[-1] + host[-1].nbytes, dtype=cp.uint8)
    _kernels.pack(arrays, staging, offsets)
    crcs = _kernels.crc32c_ranges(
        [staging.data.ptr + o for o in offsets], [h.nbytes for h in host], masked=True
    )
    np.testing.assert_array_equal(crcs.get(), _kernels_ref.crc32c_ranges_ref(host, masked=True))
    back = [cp.empty_like(a) for a in arrays]
    _kernels.unpack(staging, back, offsets)
    for got, h in zip(back, host):
        np.testing.assert_array_equal(got.get(), h)
