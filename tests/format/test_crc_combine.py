"""CPU tests of the crc32c algebra and of the kernels' CPU reference."""

from __future__ import annotations

from typing import Any

import crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpusaver.cuda import kernels as _kernels, reference as ref
from gpusaver.format import crc as crc_algebra

U32 = 0xFFFFFFFF
SPEC_VECTORS = [
    (bytes(32), 0x8A9136AA),
    (bytes(range(32)), 0x46DD794E),
    (b"\xff" * 32, 0x62A8AB43),
]


def _raw_bitwise(register: int, data: bytes) -> int:
    """raw(register, data), one bit at a time: the definition."""
    for byte in data:
        register ^= byte
        for _ in range(8):
            register = (register >> 1) ^ (crc_algebra.CRC32C_POLY if register & 1 else 0)
    return register


@pytest.mark.parametrize(("data", "want"), SPEC_VECTORS)
def test_spec_vectors(data: bytes, want: int) -> None:
    assert crc32c.crc32c(data) == want
    assert _raw_bitwise(U32, data) ^ U32 == want
    assert ref.crc32c_ranges_ref([data]).tolist() == [want]
    assert ref.crc32c_chunked_ref(data, 16, use_slicing=True) == want
    # Any split of the data combines back to the same crc.
    for cut in range(33):
        a, b = data[:cut], data[cut:]
        assert crc_algebra.combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == want


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_combine_matches_concatenation(a: bytes, b: bytes) -> None:
    assert crc_algebra.combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=64))
def test_combine_is_associative(a: bytes, b: bytes, c: bytes) -> None:
    ca, cb, cc = (crc32c.crc32c(x) for x in (a, b, c))
    left = crc_algebra.combine(crc_algebra.combine(ca, cb, len(b)), cc, len(c))
    right = crc_algebra.combine(ca, crc_algebra.combine(cb, cc, len(c)), len(b) + len(c))
    assert left == right == crc32c.crc32c(a + b + c)


def test_combine_edge_cases() -> None:
    c = crc32c.crc32c(b"hello")
    assert crc_algebra.combine(c, 0, 0) == c
    assert crc_algebra.combine(0, c, 5) == c  # crc32c(b"") == 0
    big = 10 * 1024 * 1024 + 3
    zeros = bytes(big)
    assert crc_algebra.combine(c, crc32c.crc32c(zeros), big) == crc32c.crc32c(b"hello" + zeros)


def test_combine_huge_length_is_fast() -> None:
    # Only the algebra: 2**50 bytes would take days to checksum directly.
    x = crc_algebra.combine(0x12345678, 0x9ABCDEF0, 2**50 + 12345)
    assert 0 <= x <= U32
    # Z_{m+n} = Z_m o Z_n.
    assert crc_algebra.shift(crc_algebra.shift(0xDEADBEEF, 2**40), 2**40 + 7) == crc_algebra.shift(
        0xDEADBEEF, 2**41 + 7
    )


@given(st.integers(0, U32), st.integers(0, 200))
def test_shift_matches_feeding_zeros(register: int, n: int) -> None:
    assert crc_algebra.shift(register, n) == _raw_bitwise(register, bytes(n))


def test_shift_rejects_negative_length() -> None:
    with pytest.raises(ValueError):
        crc_algebra.shift(1, -1)


def test_mask_and_unmask() -> None:
    assert crc_algebra.mask(0) == 0xA282EAD8
    assert crc_algebra.unmask(0xA282EAD8) == 0
    c = 0x8A9136AA
    assert crc_algebra.mask(c) == ((((c >> 15) | (c << 17)) & U32) + 0xA282EAD8) & U32
    for value in (0, 1, 0x7FFF, 0x8000, 0xFFFFFFFF, 0x12345678, 0x5D7D1528):
        assert crc_algebra.unmask(crc_algebra.mask(value)) == value
        assert crc_algebra.mask(crc_algebra.unmask(value)) == value


@given(st.integers(0, U32))
def test_mask_round_trip(value: int) -> None:
    assert crc_algebra.unmask(crc_algebra.mask(value)) == value


def test_ranges_ref() -> None:
    rng = np.random.default_rng(5)
    pieces = [bytes(rng.integers(0, 256, int(n), dtype=np.uint8)) for n in rng.integers(0, 100, 50)]
    pieces += [b"", b"\x00", bytes(32)]
    got = ref.crc32c_ranges_ref(pieces)
    assert got.dtype == np.uint32 and got.shape == (len(pieces),)
    assert got.tolist() == [crc32c.crc32c(p) for p in pieces]
    masked = ref.crc32c_ranges_ref(pieces, masked=True)
    assert masked.tolist() == [crc_algebra.mask(crc32c.crc32c(p)) for p in pieces]
    assert ref.crc32c_ranges_ref([]).shape == (0,)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert (
        ref.crc32c_ranges_ref([arr, memoryview(arr.tobytes())]).tolist()
        == [crc32c.crc32c(arr.tobytes())] * 2
    )
    with pytest.raises(ValueError):
        ref.crc32c_ranges_ref([arr[:, ::2]])


def test_slicing_tables() -> None:
    tables = _kernels.slicing_tables()
    assert tables.shape == (8, 256) and tables.dtype == np.uint32
    for b in range(256):
        assert int(tables[0, b]) == _raw_bitwise(b, b"\x00")
        for k in range(1, 8):
            assert int(tables[k, b]) == crc_algebra.shift(int(tables[0, b]), k)
    # One slicing-by-8 step, as kernels/crc32c.cu does it, over random words.
    rng = np.random.default_rng(3)
    data = bytes(rng.integers(0, 256, 800, dtype=np.uint8))
    crc = U32
    for i in range(0, len(data), 8):
        lo = int.from_bytes(data[i : i + 4], "little")
        hi = int.from_bytes(data[i + 4 : i + 8], "little")
        crc ^= lo
        t = tables
        crc = int(
            t[7, crc & 0xFF]
            ^ t[6, (crc >> 8) & 0xFF]
            ^ t[5, (crc >> 16) & 0xFF]
            ^ t[4, crc >> 24]
            ^ t[3, hi & 0xFF]
            ^ t[2, (hi >> 8) & 0xFF]
            ^ t[1, (hi >> 16) & 0xFF]
            ^ t[0, hi >> 24]
        )
    assert crc ^ U32 == crc32c.crc32c(data)


@pytest.mark.parametrize("chunk", [1, 16, 48, 4096])
def test_kernel_tables_layout(chunk: int) -> None:
    tables = _kernels.crc32c_tables(chunk)
    assert tables.dtype == np.uint32
    assert tables.shape == (2048 + 1024 * _kernels.SHIFT_LEVELS,)
    assert not tables.flags.writeable
    np.testing.assert_array_equal(tables[:2048], _kernels.slicing_tables().reshape(-1))
    shifts = tables[2048:].reshape(_kernels.SHIFT_LEVELS, 4, 256)
    rng = np.random.default_rng(chunk)
    for level in (0, 1, 5, _kernels.SHIFT_LEVELS - 1):
        for v in [int(x) for x in rng.integers(0, 2**32, 20, dtype=np.uint64)]:
            applied = int(
                shifts[level, 0, v & 0xFF]
                ^ shifts[level, 1, (v >> 8) & 0xFF]
                ^ shifts[level, 2, (v >> 16) & 0xFF]
                ^ shifts[level, 3, v >> 24]
            )
            assert applied == crc_algebra.shift(v, chunk << level)


def test_chunk_starts() -> None:
    sizes = np.array([0, 1, 4096, 4097, 0, 8192, 12289], dtype=np.uint64)
    starts = _kernels.chunk_starts(sizes, 4096)
    assert starts.dtype == np.uint64
    assert starts.tolist() == [0, 0, 1, 2, 4, 4, 6, 10]
    assert _kernels.chunk_starts(np.zeros(0, np.uint64), 16).tolist() == [0]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 20000), st.sampled_from([1, 16, 48, 100, 4096]), st.integers(0, 2**32 - 1))
def test_chunked_model_matches_crc32c(size: int, chunk: int, seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert ref.crc32c_chunked_ref(data, chunk) == crc32c.crc32c(data)


def test_chunked_model_with_slicing_tables() -> None:
    data = bytes(range(256)) * 3 + b"xyz"
    for chunk in (16, 33, 64, 4096):
        assert ref.crc32c_chunked_ref(data, chunk, use_slicing=True) == crc32c.crc32c(data)


def test_pack_ref_and_unpack_ref() -> None:
    sources: list[Any] = [
        np.arange(5, dtype=np.int16),
        b"abc",
        np.zeros(0, np.float32),
        bytearray(b"\x01"),
    ]
    offsets = [3, 0, 13, 13]
    staging = np.full(16, 0xEE, dtype=np.uint8)
    ref.pack_ref(sources, staging, offsets)
    assert staging[:3].tobytes() == b"abc"
    assert staging[3:13].tobytes() == np.arange(5, dtype=np.int16).tobytes()
    assert staging[13] == 1 and staging[14] == 0xEE
    out: list[Any] = [np.empty(5, np.int16), np.empty(3, np.uint8), np.empty(0, np.float32)]
    ref.unpack_ref(staging, out, [3, 0, 13])
    np.testing.assert_array_equal(out[0], np.arange(5, dtype=np.int16))
    assert out[1].tobytes() == b"abc"


def test_pack_ref_rejects_bad_ranges() -> None:
    staging = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        ref.pack_ref([b"abcd", b"efgh"], staging, [0, 2])
    with pytest.raises(ValueError, match="does not fit"):
        ref.pack_ref([b"abcd"], staging, [5])
    with pytest.raises(ValueError):
        ref.pack_ref([b"abcd"], staging, [0, 4])
    with pytest.raises(ValueError, match="does not fit"):
        ref.unpack_ref(staging, [np.empty(4, np.uint8)], [6])
