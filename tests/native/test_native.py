"""The C extension ``gpusaver._native`` against its pure-Python twins.

Every function of the extension has a reference: the ``crc32c`` package for
checksums, NumPy itself for ``describe``/``pack``/``unpack``/``check_arrays``,
:mod:`gpusaver.format.entry` (and protobuf's generated classes) for the entry
codec, and :mod:`gpusaver.format.table` for the index table. The tests compare
the two on fixed cases, on seeded random data and on hypothesis-generated
inputs, including malformed bytes, where the C code must reject exactly what
Python rejects (and must not crash).

All tests but :func:`test_extension_is_built` are skipped when the extension
is not built; that one fails instead, because CI always builds it.
"""

from __future__ import annotations

import importlib
import os
import struct
from typing import Any, Iterator, Sequence

import crc32c as crc32c_pkg
import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from gpusaver import native
from gpusaver._proto.tensor_bundle_pb2 import BundleEntryProto
from gpusaver.errors import UnsupportedDTypeError
from gpusaver.format import crc as crcmod
from gpusaver.format import dtypes, entry, table
from gpusaver.format.wire import Malformed, decode_varint, encode_varint

#: The skip for every test that calls the extension (all but test_extension_is_built).
needs_native = pytest.mark.skipif(not native.available(), reason=f"gpusaver._native unavailable: {native.reason}")

#: The extension module itself (not ``native.lib``, which other tests may switch off).
C: Any = importlib.import_module("gpusaver._native") if native.available() else None

CODES = native.type_codes()

#: hypothesis settings for the properties: enough examples to find layout bugs, quick overall.
PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Every storable NumPy dtype except object (strings take the general path).
NUMERIC_DTYPES = [dt for dt in dtypes.supported_numpy_dtypes() if dt.kind != "O"]


@pytest.fixture(scope="module", autouse=True)
def _pure_python_twins() -> Iterator[None]:
    """Turns the extension off in gpusaver for this module, restoring it after.

    The twins (``table.encode_table``, ``table._parse_block``, ``TableReader`` ...)
    call the extension themselves when it is on, which would compare the C code
    with itself; the tests call the extension directly, through :data:`C`.
    """
    was_on = native.lib is not None
    native.use(False)
    try:
        yield
    finally:
        native.use(was_on)


def _random_array(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous array of ``dtype`` and ``shape`` holding random bytes."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = rng.integers(0, 256, count * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape).copy()


def _mixed_arrays(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """``n`` random arrays of every numeric dtype, with 0-d, zero-size and larger shapes."""
    shapes = [(), (0,), (1,), (3,), (2, 3), (3, 0, 2), (4, 5, 6), (1, 1, 1, 1), (17,), (100,)]
    out = []
    for i in range(n):
        dt = NUMERIC_DTYPES[i % len(NUMERIC_DTYPES)]
        shape = shapes[int(rng.integers(len(shapes)))]
        out.append(_random_array(rng, dt, shape))
    return out


def _unmasked_crcs(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([crc32c_pkg.crc32c(a.tobytes()) for a in arrays], dtype=np.uint32)


# --------------------------------------------------------------------- build


def test_extension_is_built() -> None:
    """The extension is built and current, unless GPUSAVER_NATIVE=0 turns it off.

    CI builds the extension (``pip install`` compiles ``gpusaver/_native.c``), so
    a missing or stale build is a failure here, not a skip: without this test a
    broken build would silently skip the rest of this file and run the
    pure-Python fallbacks everywhere else.
    """
    if os.environ.get("GPUSAVER_NATIVE", "1").strip() == "0":
        pytest.skip("GPUSAVER_NATIVE=0: the pure-Python code is requested")
    assert native.available(), native.reason
    assert C.HARDWARE_CRC in (0, 1)


@needs_native
def test_references_are_pure_python() -> None:
    """The twins this module compares with run in Python: the extension is off in gpusaver."""
    assert native.lib is None
    assert C is not None


# -------------------------------------------------------------------- crc32c


@needs_native
def test_crc32c_every_length_and_alignment() -> None:
    """Lengths 0..300 at start offsets 0..8 (unaligned memoryview slices) match the crc32c package."""
    rng = np.random.default_rng(1)
    buf = rng.bytes(320)
    view = memoryview(buf)
    for start in range(9):
        for n in range(301):
            piece = view[start : start + n]
            assert C.crc32c(piece) == crc32c_pkg.crc32c(piece), (start, n)


@needs_native
def test_crc32c_extends_and_takes_buffers() -> None:
    """Extending over a split equals the whole; bytes, bytearray, memoryview and ndarrays all work."""
    rng = np.random.default_rng(2)
    data = rng.bytes(5000)
    whole = crc32c_pkg.crc32c(data)
    for cut in (0, 1, 7, 8, 9, 63, 64, 1000, 4999, 5000):
        assert C.crc32c(data[cut:], C.crc32c(data[:cut])) == whole
    assert C.crc32c(b"") == 0
    assert C.crc32c(b"", 0x12345678) == 0x12345678
    assert C.crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert C.crc32c(bytearray(data)) == whole
    assert C.crc32c(np.frombuffer(data, np.uint8)) == whole
    assert C.crc32c(np.frombuffer(data, np.float32).reshape(50, 25)) == whole
    big = rng.bytes(1 << 20)
    assert C.crc32c(big, 0xFFFFFFFF) == crc32c_pkg.crc32c(big, 0xFFFFFFFF)


@needs_native
@PROPERTY
@given(st.binary(max_size=2000), st.integers(0, 2**32 - 1), st.integers(0, 15))
def test_crc32c_property(data: bytes, seed_crc: int, skip: int) -> None:
    """Any bytes, any starting crc, any start offset: equal to the crc32c package."""
    piece = memoryview(data)[min(skip, len(data)) :]
    assert C.crc32c(piece, seed_crc) == crc32c_pkg.crc32c(piece, seed_crc)


# The C crc32c chains three lanes at a time in blocks of 3 x 8192, 3 x 512 and 3 x 64 bytes, then
# the rest 8 bytes at a time: lengths on both sides of each block size, and their sums.
_LANE_BLOCKS = (3 * 8192, 3 * 512, 3 * 64)
_LANE_EDGES = sorted({n + d for b in _LANE_BLOCKS for k in (1, 2) for n in (k * b,) for d in (-9, -8, -1, 0, 1, 7, 8)}
                     | {sum(_LANE_BLOCKS) + d for d in (-1, 0, 1, 8)} | {2 * _LANE_BLOCKS[0] + _LANE_BLOCKS[2] + 5})


@needs_native
def test_crc32c_lane_block_edges() -> None:
    """Every length around a lane block, at every start alignment and with any starting crc: the crc32c package."""
    rng = np.random.default_rng(11)
    buf = memoryview(rng.bytes(max(_LANE_EDGES) + 16))
    for n in _LANE_EDGES:
        for start in range(9):
            seed = int(rng.integers(0, 2**32))
            piece = buf[start : start + n]
            assert C.crc32c(piece, seed) == crc32c_pkg.crc32c(piece, seed), (n, start)


@needs_native
@PROPERTY
@given(st.integers(0, 3 * 8192 * 3 + 777), st.integers(0, 15), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_crc32c_long_property(n: int, skip: int, seed_crc: int, seed: int) -> None:
    """Random bytes of any length up to several of the largest lane blocks, any offset and starting crc."""
    data = np.random.default_rng(seed).bytes(n + skip)
    piece = memoryview(data)[skip:]
    assert C.crc32c(piece, seed_crc) == crc32c_pkg.crc32c(piece, seed_crc)
    flipped = bytearray(piece)
    if flipped:  # a flipped bit anywhere changes it
        at = seed % len(flipped)
        flipped[at] ^= 1 << (seed_crc % 8)
        assert C.crc32c(flipped, seed_crc) != C.crc32c(piece, seed_crc)


# -------------------------------------------------------------- stream copy

# stream_copy takes memcpy below 256 KiB; above, a head up to the destination's 32-byte
# boundary, 128-byte blocks in streaming stores, then the tail.
_STREAM_MIN = 256 << 10


@needs_native
@pytest.mark.parametrize("n", [0, 1, 127, 128, 4096, _STREAM_MIN - 1, _STREAM_MIN, _STREAM_MIN + 1,
                               _STREAM_MIN + 127, _STREAM_MIN + 128, (3 << 20) + 77])
def test_stream_copy_every_size_and_alignment(n: int) -> None:
    """The bytes arrive exactly, whatever the sizes and the two buffers' alignments; nothing around them is written."""
    rng = np.random.default_rng(n)
    src_buf = rng.integers(0, 256, n + 64, dtype=np.uint8)
    for s_off, d_off in ((0, 0), (1, 0), (0, 1), (31, 33), (7, 63), (32, 32)):
        dst_buf = np.full(n + 128, 0xAB, np.uint8)
        C.stream_copy(dst_buf[d_off : d_off + n], src_buf[s_off : s_off + n])
        assert np.array_equal(dst_buf[d_off : d_off + n], src_buf[s_off : s_off + n]), (s_off, d_off)
        assert (dst_buf[:d_off] == 0xAB).all() and (dst_buf[d_off + n :] == 0xAB).all()


@needs_native
def test_stream_copy_takes_buffers_and_refuses_bad_ones() -> None:
    """Any contiguous buffers of equal length; a length mismatch, an overlap or a read-only destination raises,
    writing nothing."""
    src = np.arange(_STREAM_MIN, dtype=np.uint8)
    out = bytearray(_STREAM_MIN)
    C.stream_copy(out, src.tobytes())
    assert bytes(out) == src.tobytes()
    C.stream_copy(memoryview(out), memoryview(bytes(_STREAM_MIN)))
    assert out == bytearray(_STREAM_MIN)
    with pytest.raises(ValueError, match="holds"):
        C.stream_copy(bytearray(10), b"x" * 11)
    buf = np.zeros(2 * _STREAM_MIN, np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        C.stream_copy(buf[: _STREAM_MIN + 1], buf[_STREAM_MIN - 1 :])
    assert not buf.any()
    with pytest.raises((TypeError, BufferError)):
        C.stream_copy(bytes(10), b"y" * 10)
    with pytest.raises((TypeError, BufferError, ValueError)):
        C.stream_copy(np.zeros((4, 4), np.uint8)[:, ::2], b"z" * 8)  # not contiguous


@needs_native
def test_stream_copy_from_many_threads() -> None:
    """Parts of one big copy on several threads at once (as a snapshot does) leave the whole copy exact."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (16 << 20) + 5, dtype=np.uint8)
    dst = np.zeros_like(src)
    cuts = [0, 3 << 20, (7 << 20) + 1, (12 << 20) + 3, len(src)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda ab: C.stream_copy(dst[ab[0] : ab[1]], src[ab[0] : ab[1]]), zip(cuts, cuts[1:])))
    assert np.array_equal(dst, src)


# ------------------------------------------------------------------ describe


def _expect_describe(arrays: Sequence[Any]) -> tuple[list[int], list[int], list[int], list[int]]:
    """The oracle: what describe must return, computed from NumPy attributes."""
    enums, sizes, ndims, dims = [], [], [], []
    for a in arrays:
        enum = -1
        if (
            isinstance(a, np.ndarray)
            and a.flags.c_contiguous
            and a.dtype.byteorder in "=|"
            and a.dtype.kind not in "OSUMm"
            and a.dtype.names is None
        ):
            try:
                enum = dtypes.from_numpy(a.dtype)
            except UnsupportedDTypeError:
                pass
        if enum >= 0:
            enums.append(enum)
            sizes.append(a.nbytes)
            ndims.append(a.ndim)
            dims.extend(a.shape)
        else:
            enums.append(-1)
            sizes.append(0)
            ndims.append(0)
    return enums, sizes, ndims, dims


def _check_describe(arrays: Sequence[Any]) -> None:
    enums, sizes, ndims, dims = C.describe(arrays, CODES)
    assert (enums.dtype, sizes.dtype, ndims.dtype, dims.dtype) == (np.int32, np.int64, np.int32, np.int64)
    want = _expect_describe(arrays)
    assert enums.tolist() == want[0]
    accepted = enums >= 0
    assert sizes[accepted].tolist() == [s for s, e in zip(want[1], want[0]) if e >= 0]
    assert ndims[accepted].tolist() == [r for r, e in zip(want[2], want[0]) if e >= 0]
    assert dims.tolist() == want[3]


@needs_native
def test_type_codes_cover_every_numeric_dtype() -> None:
    """Every storable numeric dtype (ml_dtypes included) has a fast-path code equal to from_numpy."""
    for dt in NUMERIC_DTYPES:
        assert CODES.get(dt.num) == dtypes.from_numpy(dt), dt
    for dt in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.int4, ml_dtypes.uint2, np.bool_):
        assert np.dtype(dt).num in CODES


@needs_native
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=str)
def test_describe_every_dtype(dtype: np.dtype) -> None:
    """Each numeric dtype, at ranks 0..10 and with zero-size shapes, maps to from_numpy's enum."""
    rng = np.random.default_rng(3)
    shapes = [(), (0,), (1,), (7,), (3, 0, 2), (2, 3), (1, 2, 1, 3, 1, 2, 1, 1, 2, 1)]
    arrays = [_random_array(rng, dtype, s) for s in shapes]
    _check_describe(arrays)
    enums, sizes, _, _ = C.describe(arrays, CODES)
    assert set(enums.tolist()) == {dtypes.from_numpy(dtype)}
    assert sizes.tolist() == [a.nbytes for a in arrays]


@needs_native
def test_describe_rejects_the_general_path() -> None:
    """-1 for non-ndarrays, strided, transposed, byte-swapped, object, string, structured and
    other unsupported arrays; only the accepted arrays' dims are listed, in order."""
    base = np.arange(24, dtype=np.float32).reshape(2, 12)
    bf = np.zeros(3, np.dtype(ml_dtypes.bfloat16).newbyteorder(">"))
    arrays: list[Any] = [
        np.arange(6, dtype=np.int64).reshape(2, 3),  # accepted
        [1.0, 2.0],
        (1, 2),
        np.float32(1.5),  # a NumPy scalar, not an ndarray
        3,
        None,
        b"bytes",
        np.arange(10, dtype=np.float32)[::2],
        base.T,
        base[:, :6],
        np.zeros(4, ">f4"),
        np.zeros((2, 2), ">i8"),
        bf,
        np.array([b"a", None], dtype=object),
        np.array(["abc", "d"]),
        np.array([b"abc", b"d"]),
        np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]),
        np.zeros(3, dtype="V4"),
        np.zeros(3, dtype="datetime64[s]"),
        np.zeros(3, dtype="timedelta64[s]"),
        np.zeros(3, dtype=np.longdouble),
        np.array(5, dtype=np.uint16),  # accepted 0-d
        np.zeros((3, 0, 2), np.complex128),  # accepted zero-size
        np.zeros(4, "<f4"),  # accepted (explicit native order)
        np.zeros(5, ml_dtypes.float8_e5m2),  # accepted
        base[:1],  # accepted: a contiguous view
    ]
    _check_describe(arrays)
    enums, _, _, dims = C.describe(arrays, CODES)
    assert [i for i, e in enumerate(enums) if e >= 0] == [0, 21, 22, 23, 24, 25]
    assert dims.tolist() == [2, 3, 3, 0, 2, 4, 5, 1, 12]


@needs_native
def test_describe_random_mixes_and_errors() -> None:
    """Seeded random mixes of accepted and rejected items; empty input; bad arguments."""
    rng = np.random.default_rng(4)
    for _ in range(30):
        arrays: list[Any] = _mixed_arrays(rng, 40)
        for k in rng.choice(len(arrays), 10, replace=False):
            a = arrays[k]
            choice = int(rng.integers(4))
            if choice == 0:
                arrays[k] = a.tolist()
            elif choice == 1 and a.size > 1:
                arrays[k] = np.concatenate([a.ravel(), a.ravel()])[::2]
            elif choice == 2 and a.dtype.itemsize > 1 and a.dtype.kind in "iufc":
                arrays[k] = a.astype(a.dtype.newbyteorder(">"))
        _check_describe(arrays)
        _check_describe(tuple(arrays))
    enums, sizes, ndims, dims = C.describe([], CODES)
    assert enums.shape == sizes.shape == ndims.shape == dims.shape == (0,)
    with pytest.raises(TypeError):
        C.describe([np.zeros(2)], list(CODES.items()))
    with pytest.raises(TypeError):
        C.describe(5, CODES)
    with pytest.raises(TypeError):  # a code that is not an int
        C.describe([np.zeros(2, np.float32)], {np.dtype(np.float32).num: "x"})


# ---------------------------------------------------------------------- pack


@needs_native
def test_pack_matches_tobytes() -> None:
    """pack copies arrays[start:stop] back to back and writes their unmasked crcs at their indices."""
    rng = np.random.default_rng(5)
    for trial in range(20):
        arrays = _mixed_arrays(rng, 30)
        if trial % 3 == 0:  # byte-swapped arrays are contiguous: pack takes their bytes as they are
            arrays.append(np.arange(7, dtype=">f8"))
        n = len(arrays)
        start = int(rng.integers(0, n + 1))
        stop = int(rng.integers(start, n + 1))
        want = b"".join(a.tobytes() for a in arrays[start:stop])
        out = np.full(len(want) + 64, 0xAB, np.uint8) if trial % 2 else bytearray(b"\xab" * (len(want) + 64))
        crcs = np.full(n, 0xDEADBEEF, np.uint32)
        assert C.pack(arrays, start, stop, out, crcs) == len(want)
        assert bytes(out[: len(want)]) == want
        assert bytes(out[len(want) :]) == b"\xab" * 64
        expect = np.full(n, 0xDEADBEEF, np.uint32)
        expect[start:stop] = _unmasked_crcs(arrays[start:stop])
        assert crcs.tolist() == expect.tolist()
    # An exact fit, an empty range, and a tuple of arrays.
    arrays = [np.arange(5, dtype=np.int16), np.ones((2, 2), np.float64)]
    out = bytearray(42)
    crcs = np.zeros(2, np.uint32)
    assert C.pack(tuple(arrays), 0, 2, out, crcs) == 42
    assert bytes(out) == arrays[0].tobytes() + arrays[1].tobytes()
    assert C.pack(arrays, 1, 1, bytearray(0), np.zeros(2, np.uint32)) == 0


@needs_native
@PROPERTY
@given(st.lists(st.integers(0, 3000), max_size=40), st.integers(0, 63), st.integers(0, 2**32 - 1))
def test_pack_stream_equals_pack(sizes: list[int], out_offset: int, seed: int) -> None:
    """pack(..., stream=True) writes the same bytes and crcs as the plain pack, at any output alignment and with
    tensors on both sides of the 256-byte size from which it streams."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    total = sum(sizes)
    outs = [np.full(total + out_offset + 64, 0xCD, np.uint8) for _ in range(2)]
    crcs = [np.zeros(len(arrays), np.uint32) for _ in range(2)]
    for out, c, stream in zip(outs, crcs, (False, True)):
        assert C.pack(arrays, 0, len(arrays), out[out_offset:], c, stream) == total
    assert np.array_equal(outs[0], outs[1])
    assert crcs[0].tolist() == crcs[1].tolist() == _unmasked_crcs(arrays).tolist()


@needs_native
def test_pack_errors() -> None:
    """Too small an out buffer or crcs buffer, bad items and bad ranges raise."""
    arrays = [np.arange(4, dtype=np.float32), np.arange(6, dtype=np.int64)]
    crcs = np.zeros(2, np.uint32)
    with pytest.raises(ValueError):
        C.pack(arrays, 0, 2, bytearray(63), crcs)
    with pytest.raises(ValueError):
        C.pack(arrays, 0, 2, bytearray(64), np.zeros(1, np.uint32))
    with pytest.raises(ValueError):  # not a whole number of uint32
        C.pack(arrays, 0, 2, bytearray(64), bytearray(9))
    with pytest.raises(TypeError):
        C.pack([arrays[0], np.arange(12, dtype=np.int64)[::2]], 0, 2, bytearray(64), crcs)
    with pytest.raises(TypeError):
        C.pack([arrays[0], [1, 2, 3]], 0, 2, bytearray(64), crcs)
    with pytest.raises(TypeError):
        C.pack([arrays[0], np.arange(6.0).reshape(2, 3).T], 0, 2, bytearray(64), crcs)
    for start, stop in ((-1, 1), (0, 3), (2, 1), (3, 3)):
        with pytest.raises(IndexError):
            C.pack(arrays, start, stop, bytearray(64), crcs)
    with pytest.raises(BufferError):  # bytes are read-only
        C.pack(arrays, 0, 2, bytes(64), crcs)
    # A strided item outside the range is not looked at.
    assert C.pack([arrays[0], np.arange(12)[::2]], 0, 1, bytearray(16), crcs) == 16


# -------------------------------------------------------------------- unpack


def _layout(rng: np.random.Generator, arrays: Sequence[np.ndarray], base: int) -> tuple[bytearray, np.ndarray]:
    """A source buffer holding the arrays' bytes at random gaps; offsets are relative to file
    position ``base`` (so offsets[i] - base indexes the buffer)."""
    src = bytearray()
    offsets = np.zeros(len(arrays), np.int64)
    for i, a in enumerate(arrays):
        src += rng.bytes(int(rng.integers(0, 9)))
        offsets[i] = base + len(src)
        src += a.tobytes()
    src += rng.bytes(3)
    return src, offsets


@needs_native
def test_unpack_restores_in_any_order() -> None:
    """Arrays come back from a source at base != 0, in a shuffled order, over sub-ranges."""
    rng = np.random.default_rng(6)
    for trial in range(20):
        arrays = _mixed_arrays(rng, 25)
        base = int(rng.integers(0, 1 << 40)) if trial % 2 else 0
        src, offsets = _layout(rng, arrays, base)
        crcs = _unmasked_crcs(arrays)
        order = rng.permutation(len(arrays)).astype(np.int64)
        start = int(rng.integers(0, len(arrays) + 1))
        stop = int(rng.integers(start, len(arrays) + 1))
        dests = [np.zeros_like(a) for a in arrays]
        before = [d.tobytes() for d in dests]
        source: Any = bytes(src) if trial % 3 == 0 else memoryview(src)
        assert C.unpack(source, base, dests, order, start, stop, offsets, crcs) == []
        chosen = set(order[start:stop].tolist())
        for i, (a, d) in enumerate(zip(arrays, dests)):
            assert d.tobytes() == (a.tobytes() if i in chosen else before[i]), i


@needs_native
def test_unpack_reports_every_bad_crc_and_restores_the_rest() -> None:
    """Corrupted tensors are reported by index, in the order met, and left untouched; every
    other tensor, before or after them, is restored."""
    rng = np.random.default_rng(7)
    for trial in range(20):
        arrays = [
            _random_array(rng, NUMERIC_DTYPES[k % len(NUMERIC_DTYPES)], (int(rng.integers(1, 20)),)) for k in range(12)
        ]
        base = 4096 * trial
        src, offsets = _layout(rng, arrays, base)
        crcs = _unmasked_crcs(arrays)
        order = rng.permutation(len(arrays)).astype(np.int64)
        damaged = sorted(int(k) for k in rng.choice(len(arrays), int(rng.integers(1, 4)), replace=False))
        for k_bad in damaged:
            bad = int(order[k_bad])
            if trial % 2:
                pos = int(offsets[bad] - base + rng.integers(0, arrays[bad].nbytes))
                src[pos] ^= 1 << int(rng.integers(8))
            else:
                crcs[bad] ^= 0x80000000  # the stored crc is wrong instead
        dests = [np.zeros_like(a) for a in arrays]
        assert C.unpack(bytes(src), base, dests, order, 0, len(arrays), offsets, crcs) == [int(order[k]) for k in damaged]
        for k, i in enumerate(order.tolist()):
            expect = bytes(arrays[i].nbytes) if k in damaged else arrays[i].tobytes()
            assert dests[i].tobytes() == expect, (k, damaged)


@needs_native
def test_unpack_errors_leave_every_array_untouched() -> None:
    """Read-only destinations and tensors outside the source raise ValueError before copying;
    bad order indices and ranges raise IndexError; short index buffers raise ValueError."""
    rng = np.random.default_rng(8)
    arrays = [_random_array(rng, dt, (n,)) for dt, n in ((np.float32, 5), (np.int8, 3), (np.float64, 2))]
    base = 100
    src, offsets = _layout(rng, arrays, base)
    src = bytes(src)
    crcs = _unmasked_crcs(arrays)
    order = np.arange(3, dtype=np.int64)

    def fresh() -> list[np.ndarray]:
        return [np.zeros_like(a) for a in arrays]

    dests = fresh()
    dests[2].setflags(write=False)
    with pytest.raises(ValueError):
        C.unpack(src, base, dests, order, 0, 3, offsets, crcs)
    assert not any(d.any() for d in dests)

    for bad_offsets in (
        offsets - 200,  # before the buffer
        np.array([offsets[0], offsets[1], base + len(src) - 15], np.int64),  # runs past its end
        np.array([offsets[0], offsets[1], base + len(src) + 1], np.int64),  # starts past its end
        np.array([offsets[0], offsets[1], -(2**63)], np.int64),
    ):
        dests = fresh()
        with pytest.raises(ValueError):
            C.unpack(src, base, dests, order, 0, 3, bad_offsets, crcs)
        assert not any(d.any() for d in dests)
    dests = fresh()
    with pytest.raises(ValueError):  # base past the tensors
        C.unpack(src, base + 50, dests, order, 0, 3, offsets, crcs)
    with pytest.raises(ValueError):  # a buffer one byte short of the last tensor
        C.unpack(src[: int(offsets[2] - base) + 15], base, fresh(), order, 0, 3, offsets, crcs)
    # A tensor that ends exactly at the end of the buffer fits.
    assert C.unpack(src[: int(offsets[2] - base) + 16], base, fresh(), order, 0, 3, offsets, crcs) == []

    dests = fresh()
    with pytest.raises(IndexError):
        C.unpack(src, base, dests, np.array([0, 3, 1], np.int64), 0, 3, offsets, crcs)
    with pytest.raises(IndexError):
        C.unpack(src, base, dests, np.array([0, -1, 1], np.int64), 0, 3, offsets, crcs)
    with pytest.raises(IndexError):
        C.unpack(src, base, dests, order, 2, 1, offsets, crcs)
    with pytest.raises(IndexError):
        C.unpack(src, base, dests, order, -1, 2, offsets, crcs)
    with pytest.raises(ValueError):  # order shorter than stop
        C.unpack(src, base, dests, order[:2], 0, 3, offsets, crcs)
    with pytest.raises(ValueError):
        C.unpack(src, base, dests, order, 0, 3, offsets[:2], crcs)
    with pytest.raises(ValueError):
        C.unpack(src, base, dests, order, 0, 3, offsets, crcs[:2])
    with pytest.raises(TypeError):
        C.unpack(src, base, [dests[0], [0, 0], dests[2]], order, 0, 3, offsets, crcs)
    with pytest.raises(TypeError):
        C.unpack(src, base, [dests[0], np.zeros(6, np.int8)[::2], dests[2]], order, 0, 3, offsets, crcs)
    assert not any(d.any() for d in dests)
    # Only order[start:stop] is looked at: a read-only array outside the range is fine.
    dests = fresh()
    dests[0].setflags(write=False)
    assert C.unpack(src, base, dests, order, 1, 3, offsets, crcs) == []
    assert dests[1].tobytes() == arrays[1].tobytes() and dests[2].tobytes() == arrays[2].tobytes()


# ----------------------------------------------------------- encode_entries

DIMS = st.one_of(st.integers(0, 2**40), st.sampled_from([0, 1, 127, 128, 16383, 16384, 2**21, 2**35]))
ENTRIES = st.lists(
    st.tuples(
        st.integers(0, 40),
        st.lists(DIMS, max_size=8).map(tuple),
        st.one_of(st.integers(0, 2**62), st.sampled_from([0, 1, 127, 128])),
        st.one_of(st.integers(0, 2**62), st.sampled_from([0, 1, 127, 128])),
        st.one_of(st.integers(0, 2**32 - 1), st.just(0)),
    ),
    max_size=8,
)


def _encode_args(items: Sequence[tuple[int, tuple[int, ...], int, int, int]]) -> tuple[np.ndarray, ...]:
    enums = np.array([e[0] for e in items], np.int32)
    ndims = np.array([len(e[1]) for e in items], np.int32)
    dims = np.array([d for e in items for d in e[1]], np.int64)
    offsets = np.array([e[2] for e in items], np.int64)
    sizes = np.array([e[3] for e in items], np.int64)
    crcs = np.array([e[4] for e in items], np.uint32)
    return enums, ndims, dims, offsets, sizes, crcs


def _proto_bytes(dtype: int, shape: Sequence[int], shard: int, offset: int, size: int, crc: int) -> bytes:
    proto = BundleEntryProto(dtype=dtype, shard_id=shard, offset=offset, size=size, crc32c=crc)
    proto.shape.SetInParent()  # the shape is always present, as the writers emit it
    for d in shape:
        proto.shape.dim.add().size = d
    return proto.SerializeToString()


def _check_encode(items: Sequence[tuple[int, tuple[int, ...], int, int, int]], shard: int) -> None:
    got = C.encode_entries(*_encode_args(items), shard)
    assert isinstance(got, list) and all(type(b) is bytes for b in got)
    want = [entry.encode_entry(dt, shape, shard, off, size, crc) for dt, shape, off, size, crc in items]
    assert got == want
    assert got == entry.encode_entries(items, shard)
    assert got == [_proto_bytes(dt, shape, shard, off, size, crc) for dt, shape, off, size, crc in items]


@needs_native
@PROPERTY
@given(ENTRIES, st.one_of(st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 127, 128])))
def test_encode_entries_property(items: list[tuple[int, tuple[int, ...], int, int, int]], shard: int) -> None:
    """Random dtypes, shapes, offsets, sizes, crcs and shard: the bytes of encode_entry and protobuf."""
    _check_encode(items, shard)


@needs_native
def test_encode_entries_long_shapes() -> None:
    """Shapes whose encoding needs a two-byte length, huge dims and the maximal rank 254."""
    items = [
        (1, tuple([2**62, 3] * 10), 5, 6, 7),
        (19, tuple(range(40)), 0, 0, 0),
        (14, (0,) * 70, 2**62, 2**62, 0xFFFFFFFF),
        (3, (1,) * 254, 1, 2, 3),
        (2, (2**63 - 1,), 2**63 - 1, 2**63 - 1, 1),
        (0, (), 0, 0, 0),
    ]
    _check_encode(items, 0)
    _check_encode(items, 2**31 - 1)


@needs_native
def test_encode_entries_errors() -> None:
    """Ranks above 254 or below 0, too few dims, negative dims and short buffers raise ValueError."""
    args = list(_encode_args([(1, (2, 3), 0, 24, 5)]))

    def call(**changes: np.ndarray) -> Any:
        names = ["enums", "ndims", "dims", "offsets", "sizes", "crcs"]
        a = [changes.get(n, v) for n, v in zip(names, args)]
        return C.encode_entries(*a, 0)

    assert call() == [entry.encode_entry(1, (2, 3), 0, 0, 24, 5)]
    with pytest.raises(ValueError):
        call(ndims=np.array([255], np.int32), dims=np.ones(255, np.int64))
    with pytest.raises(ValueError):
        call(ndims=np.array([-1], np.int32))
    with pytest.raises(ValueError):
        call(ndims=np.array([3], np.int32))
    with pytest.raises(ValueError):
        call(dims=np.array([2, -3], np.int64))
    with pytest.raises(ValueError):
        call(offsets=np.zeros(0, np.int64))
    with pytest.raises(ValueError):
        call(sizes=np.zeros(0, np.int64))
    with pytest.raises(ValueError):
        call(crcs=np.zeros(0, np.uint32))
    with pytest.raises(ValueError):
        call(ndims=np.zeros(0, np.int32))
    with pytest.raises(ValueError):  # dims not a whole number of int64
        call(dims=np.zeros(3, np.int32))
    assert C.encode_entries(*_encode_args([]), 0) == []


# ----------------------------------------------------------- decode_entries


def _check_decode(values: Sequence[Any]) -> None:
    """decode_entries accepts exactly what entry._decode_common accepts, with the same fields."""
    ok, enums, shards, offsets, sizes, crcs, ndims, starts, dims = C.decode_entries(values)
    n = len(values)
    assert [a.dtype for a in (ok, enums, shards, offsets, sizes, crcs, ndims, starts, dims)] == [
        np.uint8, np.int32, np.int64, np.int64, np.int64, np.uint32, np.int32, np.int64, np.int64
    ]
    assert ok.shape == enums.shape == ndims.shape == (n,) and starts.shape == (n + 1,)
    assert starts[0] == 0 and starts[-1] == len(dims)
    assert (np.diff(starts) == ndims).all()
    for i, v in enumerate(values):
        want = entry._decode_common(v) if type(v) is bytes else None
        assert ok[i] == (want is not None), (i, v)
        if want is None:
            continue
        got = (
            int(enums[i]),
            tuple(dims[starts[i] : starts[i + 1]].tolist()),
            int(shards[i]),
            int(offsets[i]),
            int(sizes[i]),
            int(crcs[i]),
        )
        assert got == (want.dtype, want.shape, want.shard_id, want.offset, want.size, want.crc32c), v


def _varint_padded(value: int, extra: int) -> bytes:
    """``value`` as a varint padded with ``extra`` redundant continuation bytes."""
    raw = bytearray(encode_varint(value))
    for _ in range(extra):
        raw[-1] |= 0x80
        raw.append(0)
    return bytes(raw)


@st.composite
def _valid_entry(draw: st.DrawFn) -> bytes:
    """An entry as writers emit it, with fields near every limit the decoder checks."""
    dims = draw(
        st.lists(
            st.one_of(
                st.integers(0, 300),
                st.sampled_from([2**31, 2**61, 2**62 - 1, 2**62, 2**63 - 1, 3]),
                st.integers(0, 2**40),
            ),
            max_size=6,
        )
    )
    return entry.encode_entry(
        draw(st.one_of(st.integers(0, 130), st.sampled_from([0, 1, 127, 128]))),
        dims,
        draw(st.one_of(st.integers(0, 2**31 - 1), st.sampled_from([0, 2**31 - 1, 2**31, 2**32, 2**40]))),
        draw(st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 2**56 - 1, 2**56, 2**63, 2**64 - 1]))),
        draw(st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 2**63 - 1, 2**63]))),
        draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def _mutated_entry(draw: st.DrawFn) -> bytes:
    """A valid entry with flipped bytes, a truncation, appended or inserted bytes."""
    data = bytearray(draw(_valid_entry()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 4))
        if kind == 0 and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.sampled_from([0x00, 0x08, 0x12, 0x18, 0x20, 0x28, 0x35, 0x3A, 0x7F, 0x80, 0xFF])) if draw(
                st.booleans()
            ) else data[i] ^ (1 << draw(st.integers(0, 7)))
        elif kind == 1:
            del data[draw(st.integers(0, len(data))) :]
        elif kind == 2:
            data += draw(st.binary(min_size=1, max_size=6))
        elif kind == 3:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=3))
        elif data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i]
    return bytes(data)


@st.composite
def _crafted_entry(draw: st.DrawFn) -> bytes:
    """Hand-assembled entries: redundant varint bytes, high bits, unusual field orders."""
    dtype = draw(st.integers(0, 200))
    shape = b""
    for _ in range(draw(st.integers(0, 4))):
        d = draw(st.sampled_from([0, 1, 5, 2**31, 2**61, 2**62 - 1, 2**62, 2**63 - 1]))
        pad = draw(st.integers(0, 3))
        body = b"\x08" + _varint_padded(d, pad)
        if d == 0 and draw(st.booleans()):
            body = b""
        shape += b"\x12" + bytes([len(body)]) + body
    out = (b"\x08" + _varint_padded(dtype, draw(st.integers(0, 1))) if dtype or draw(st.booleans()) else b"")
    out += b"\x12" + _varint_padded(len(shape), draw(st.sampled_from([0, 0, 0, 1]))) + shape
    for tag in draw(st.lists(st.sampled_from([0x18, 0x20, 0x28, 0x35, 0x3A]), max_size=4)):
        if tag == 0x35:
            out += b"\x35" + draw(st.binary(min_size=4, max_size=4))
        elif tag == 0x3A:
            out += b"\x3a\x00"
        else:
            value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**56 - 1, 2**56, 2**63 - 1, 2**63, 2**64 - 1]))
            out += bytes([tag]) + _varint_padded(value, draw(st.integers(0, 2)))
    return out


ANY_VALUE = st.one_of(
    st.binary(max_size=64),
    _valid_entry(),
    _mutated_entry(),
    _crafted_entry(),
    st.sampled_from([None, b"", 0, "text", bytearray(b"\x12\x00"), memoryview(b"\x12\x00")]),
)


@needs_native
@PROPERTY
@given(st.lists(ANY_VALUE, max_size=10))
def test_decode_entries_property(values: list[Any]) -> None:
    """Any bytes (random, valid, mutated, crafted) and non-bytes: ok exactly where Python decodes,
    and then every field equal."""
    _check_decode(values)


@needs_native
def test_decode_entries_edge_cases() -> None:
    """Fixed cases at each limit: ranks 64 and above 254, element-count overflow, dims >= 2**62,
    shard >= 2**31, varints of 9 and 10 bytes, truncated crcs, non-bytes values."""
    enc = entry.encode_entry
    values: list[Any] = [
        enc(1, (2, 3), 1, 2, 3, 4),
        enc(0, ()),
        b"\x12\x00",
        enc(1, (0,) * 63),  # shape of 126 bytes: the longest one-byte length
        enc(1, (0,) * 64),  # 128 bytes: a two-byte length, not the common layout
        enc(1, (1,) * 255),  # rank above 254
        enc(1, (2**31, 2**31, 2)),  # 2**63 elements: overflows
        enc(1, (2**31, 2**31, 1)),
        enc(1, (2**61, 3)),
        enc(1, (2**61, 4)),
        enc(1, (2**61, 2**61, 0)),  # overflows before the zero
        enc(1, (0, 2**61, 2**61)),  # zero first: no overflow
        enc(1, (2**62 - 1,)),
        enc(1, (2**62,)),
        enc(1, (5,), 2**31 - 1),
        enc(1, (5,), 2**31),
        enc(1, (5,), 0, 2**63 - 1, 2**63 - 1),
        enc(1, (5,), 0, 2**63),
        enc(1, (5,), 0, 2**56 - 1),
        enc(1, (5,), 0, 2**56),  # a 9-byte varint
        enc(127, (5,)),
        enc(128, (5,)),  # a two-byte dtype
        enc(1, (5,), 0, 0, 0, 1)[:-1],  # truncated crc
        enc(1, (5,), 0, 0, 0, 1) + b"\x00",
        enc(1, (5,), 0, 0, 0, 0) + b"\x35\x00\x00\x00\x00",  # an explicit zero crc
        b"\x08",
        b"\x08\x01",
        b"\x08\x01\x12",
        b"\x12\x02\x12",
        b"\x12\x03\x12\x01\x08",
        b"\x12\x04\x12\x02\x08\x80",
        b"\x12\x04\x12\x02\x08\x05\x18",
        b"\x12\x0c\x12\x0a\x08" + b"\xff" * 8 + b"\x01",  # dim of 9 bytes with high bits: >= 2**62
        b"\x12\x0d\x12\x0b\x08" + b"\x80" * 9 + b"\x00",  # dim of 10 bytes: too long
        b"\x12\x00\x20" + b"\x80" * 8 + b"\x01",  # offset 2**56 in 9 bytes
        b"\x12\x00\x20" + b"\xff" * 8 + b"\x7f",  # offset 2**63 - 1
        b"\x12\x00\x20" + b"\x80" * 9 + b"\x01",  # offset in 10 bytes
        b"\x12\x00\x18\x80\x80\x80\x80\x08",  # shard 2**31
        b"\x12\x00\x3a\x00",  # a slice: not the common layout
        b"\x20\x01\x12\x00",  # fields out of order
        b"\x12\x00\x20\x00",  # an explicit zero offset
        None,
        "text",
        3,
        bytearray(enc(1, (2,))),
        memoryview(enc(1, (2,))),
        b"",
    ]
    _check_decode(values)
    ok = C.decode_entries(values)[0]
    assert ok[0] and ok[1] and ok[2] and ok[3] and not ok[4] and not ok[5] and not ok[6]
    assert C.decode_entries([])[0].shape == (0,)
    assert C.decode_entries(tuple(values))[0].tolist() == ok.tolist()
    with pytest.raises(TypeError):
        C.decode_entries(5)


@needs_native
def test_decode_entries_many() -> None:
    """Thousands of valid entries of rank up to 63 (growing the dims buffer), mixed with invalid ones."""
    rng = np.random.default_rng(9)
    values: list[Any] = []
    for i in range(3000):
        rank = int(rng.integers(0, 64)) if i % 10 == 0 else int(rng.integers(0, 5))
        shape = tuple(int(d) for d in rng.integers(0, 3, rank))
        v = entry.encode_entry(int(rng.integers(0, 30)), shape, i % 3, i * 64, int(rng.integers(0, 1 << 20)), i)
        values.append(v if i % 7 else v + b"\x01")
    values.insert(1234, None)
    _check_decode(values)


# ------------------------------------------------------------- check_arrays


def _expect_check(a: Any, ok: bool, enum: int, shape: tuple[int, ...], size: int) -> int:
    """The oracle: restorable in place by the fast path."""
    return int(
        ok
        and isinstance(a, np.ndarray)
        and a.flags.c_contiguous
        and a.flags.writeable
        and a.dtype.byteorder in "=|"
        and CODES.get(a.dtype.num) == enum
        and a.shape == shape
        and a.nbytes == size
    )


def _run_check(arrays: Sequence[Any], values: Sequence[Any]) -> np.ndarray:
    ok, enums, _, _, sizes, _, ndims, starts, dims = C.decode_entries(values)
    got = C.check_arrays(arrays, CODES, ok, enums, ndims, starts, dims, sizes)
    assert got.dtype == np.uint8 and got.shape == (len(arrays),)
    for i, (a, v) in enumerate(zip(arrays, values)):
        e = entry._decode_common(v) if type(v) is bytes else None
        want = _expect_check(a, e is not None, e.dtype if e else -1, e.shape if e else (), e.size if e else -1)
        assert got[i] == want, (i, a if not isinstance(a, np.ndarray) else (a.dtype, a.shape, a.flags))
    return got


@needs_native
def test_check_arrays_accepts_matching_arrays() -> None:
    """Every numeric dtype at several shapes (0-d and zero-size included) passes its own entry."""
    rng = np.random.default_rng(10)
    arrays = _mixed_arrays(rng, 120)
    values = [entry.encode_entry(dtypes.from_numpy(a.dtype), a.shape, 0, 0, a.nbytes, 1) for a in arrays]
    assert _run_check(arrays, values).all()


@needs_native
def test_check_arrays_rejects_mismatches() -> None:
    """Read-only, wrong dtype, reshaped, non-contiguous, byte-swapped, wrong size, not-ok
    entries and non-ndarrays all give 0."""
    f32 = np.zeros((2, 3), np.float32)
    good = entry.encode_entry(1, (2, 3), 0, 0, 24, 0)
    read_only = np.zeros((2, 3), np.float32)
    read_only.setflags(write=False)
    cases: list[tuple[Any, Any, int]] = [
        (f32, good, 1),
        (read_only, good, 0),
        (np.zeros((2, 3), np.int32), good, 0),  # same item size, other dtype
        (np.zeros((3, 2), np.float32), good, 0),  # same element count, reshaped
        (np.zeros((6,), np.float32), good, 0),
        (np.zeros((2, 3, 1), np.float32), good, 0),
        (np.zeros((2, 6), np.float32)[:, ::2], good, 0),
        (np.zeros((3, 2), np.float32).T, good, 0),
        (np.zeros((2, 3), ">f4"), good, 0),
        (np.zeros((2, 3), np.float32), entry.encode_entry(1, (2, 3), 0, 0, 25, 0), 0),  # size disagrees
        (np.zeros((2, 3), np.float32), entry.encode_entry(1, (2, 3), 0, 0, 0, 0), 0),
        (np.zeros((2, 3), np.float32), None, 0),
        (np.zeros((2, 3), np.float32), good + b"\x00", 0),  # not the common layout
        ([[0.0] * 3] * 2, good, 0),
        (np.float32(0), entry.encode_entry(1, (), 0, 0, 4, 0), 0),  # a scalar, not an ndarray
        (np.array(0, np.float32), entry.encode_entry(1, (), 0, 0, 4, 0), 1),
        (np.zeros((3, 0, 2), np.float64), entry.encode_entry(2, (3, 0, 2), 0, 0, 0, 0), 1),
        (np.zeros((3, 0, 2), np.float64), entry.encode_entry(2, (3, 2, 0), 0, 0, 0, 0), 0),
        (np.zeros(4, ml_dtypes.bfloat16), entry.encode_entry(14, (4,), 0, 0, 8, 0), 1),
        (np.zeros(4, np.float16), entry.encode_entry(14, (4,), 0, 0, 8, 0), 0),
        (np.zeros(4, ml_dtypes.int4), entry.encode_entry(29, (4,), 0, 0, 4, 0), 1),
        (np.zeros(4, np.bool_), entry.encode_entry(10, (4,), 0, 0, 4, 0), 1),
        (np.zeros(4, np.uint8), entry.encode_entry(10, (4,), 0, 0, 4, 0), 0),
        (np.array([b"a"] * 4, object), entry.encode_entry(7, (4,), 0, 0, 4, 0), 0),
        (np.zeros(3, [("a", "<f4")]), entry.encode_entry(1, (3,), 0, 0, 12, 0), 0),
    ]
    arrays = [c[0] for c in cases]
    values = [c[1] for c in cases]
    got = _run_check(arrays, values)
    assert got.tolist() == [c[2] for c in cases]


@needs_native
def test_check_arrays_random_and_errors() -> None:
    """Seeded random perturbations agree with the oracle; short index buffers raise ValueError."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        arrays: list[Any] = _mixed_arrays(rng, 40)
        values: list[Any] = [entry.encode_entry(dtypes.from_numpy(a.dtype), a.shape, 0, 8, a.nbytes, 3) for a in arrays]
        for k in rng.choice(40, 15, replace=False):
            a = arrays[k]
            kind = int(rng.integers(6))
            if kind == 0:
                a.setflags(write=False)
            elif kind == 1 and a.ndim >= 1:
                arrays[k] = a.reshape(a.shape[::-1] + (1,))
            elif kind == 2:
                values[k] = None
            elif kind == 3:
                arrays[k] = a.tolist()
            elif kind == 4 and a.size > 1:
                arrays[k] = np.repeat(a.ravel(), 2)[::2]
            elif kind == 5:
                values[k] = entry.encode_entry(int(rng.integers(1, 34)), a.shape, 0, 8, a.nbytes, 3)
        _run_check(arrays, values)
    ok, enums, _, _, sizes, _, ndims, starts, dims = C.decode_entries([entry.encode_entry(1, (2,), 0, 0, 8, 0)] * 2)
    arrays = [np.zeros(2, np.float32)] * 2
    assert C.check_arrays(arrays, CODES, ok, enums, ndims, starts, dims, sizes).tolist() == [1, 1]
    for bad in (
        (ok[:1], enums, ndims, starts, dims, sizes),
        (ok, enums[:1], ndims, starts, dims, sizes),
        (ok, enums, ndims[:1], starts, dims, sizes),
        (ok, enums, ndims, starts[:2], dims, sizes),
        (ok, enums, ndims, starts, dims, sizes[:1]),
    ):
        with pytest.raises(ValueError):
            C.check_arrays(arrays, CODES, *bad)
    # dim_starts that point past dims are not trusted.
    bad_starts = np.array([0, 5, 6], np.int64)
    assert C.check_arrays(arrays, CODES, ok, enums, ndims, bad_starts, dims, sizes).tolist() == [1, 0]


# --------------------------------------------------------------- build_table

_KEY_BYTES = st.sampled_from([0x00, 0x01, 0x2F, 0x61, 0x62, 0x7F, 0x80, 0xFE, 0xFF])
KEYS = st.one_of(
    st.binary(max_size=12),
    st.lists(_KEY_BYTES, max_size=12).map(bytes),
    st.tuples(st.sampled_from([b"", b"model/layer_", b"\xff\xff\xff", b"a\xff"]), st.lists(_KEY_BYTES, max_size=5)).map(
        lambda t: t[0] + bytes(t[1])
    ),
)


@st.composite
def _table_items(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], int]:
    """Sorted unique keys (sometimes the empty key first) with small, threshold and huge values."""
    block_size = draw(st.one_of(st.integers(16, 4096), st.sampled_from([16, 17, 32, 100, 4096])))
    keys = draw(st.sets(KEYS, max_size=60))
    if draw(st.booleans()):
        keys.add(b"")
    items = []
    for k in sorted(keys):
        kind = draw(st.integers(0, 12))
        if kind == 0:  # around and above the 2 * block_size threshold of its own block
            n = 2 * block_size - len(k) + draw(st.one_of(st.sampled_from([-1, 0, 1]), st.integers(-1, block_size)))
            v = bytes([draw(st.integers(0, 255))]) * n
        elif kind == 1:
            v = bytes([draw(st.integers(0, 255))]) * draw(st.integers(0, block_size))
        else:
            v = draw(st.binary(max_size=40))
        items.append((k, v))
    return items, block_size


def _check_table(items: list[tuple[bytes, bytes]], block_size: int) -> bytes:
    got = C.build_table(items, block_size)
    assert type(got) is bytes
    assert got == table.encode_table(items, block_size)
    assert table.TableReader(got).items() == items
    return got


@needs_native
@PROPERTY
@given(_table_items())
def test_build_table_property(case: tuple[list[tuple[bytes, bytes]], int]) -> None:
    """Random sorted tables at block sizes 16..4096: byte-identical to TableWriter, and readable."""
    _check_table(*case)


@needs_native
def test_build_table_default_block_size() -> None:
    """A checkpoint-like index of several default-size blocks, with a value over 2 * BLOCK_SIZE."""
    rng = np.random.default_rng(12)
    items = [(b"", entry.encode_header(1))]
    for i in range(30000):
        key = f"model/layer_{i:05d}/kernel/.ATTRIBUTES/VARIABLE_VALUE".encode()
        items.append((key, rng.bytes(int(rng.integers(10, 60)))))
    huge = (b"model/layer_14999/kernel/.ATTRIBUTES/VARIABLE_VALUE\xff", rng.bytes(2 * table.BLOCK_SIZE + 1))
    items.insert(15001, huge)  # right after layer_14999: a value over 2 * BLOCK_SIZE
    data = _check_table(items, table.BLOCK_SIZE)
    assert len(table.TableReader(data)._handles) > 5
    assert C.build_table(items, table.BLOCK_SIZE) == data  # deterministic
    for items in ([], [(b"", b"")], [(b"\xff\xff", b"x")], [(b"a", b"")]):
        _check_table(items, table.BLOCK_SIZE)
        _check_table(items, 16)


@needs_native
def test_build_table_flush_thresholds_and_many_blocks() -> None:
    """Entries of exactly 2 * block_size - 1, 2 * block_size and 2 * block_size + 1 bytes after a
    non-empty block; and hundreds of blocks (many separators and restart points)."""
    for block_size in (16, 17, 64, 100, 1000):
        for delta in (-2, -1, 0, 1, 2):
            for first in ([], [(b"a", b"")], [(b"a", b"x" * 5), (b"ab", b"")]):
                key = b"b\xff"
                items = first + [(key, b"v" * (2 * block_size - len(key) + delta)), (b"c", b"1")]
                _check_table(items, block_size)
    rng = np.random.default_rng(14)
    keys = sorted({rng.bytes(int(rng.integers(0, 6))) for _ in range(3000)})
    items = [(k, rng.bytes(int(rng.integers(0, 30)))) for k in keys]
    for block_size in (16, 64, 300):
        data = _check_table(items, block_size)
        assert len(table.TableReader(data)._handles) > 70
    _check_table([(b"k%05d" % i, b"") for i in range(5000)], table.BLOCK_SIZE)  # restarts > 64 in one block


@needs_native
def test_build_table_errors() -> None:
    """Unsorted or duplicate keys raise ValueError (as TableWriter does); items that are not
    (bytes, bytes) pairs raise TypeError; so does a non-positive block size (ValueError)."""
    for items in (
        [(b"b", b""), (b"a", b"")],
        [(b"a", b""), (b"a", b"")],
        [(b"ab", b""), (b"a", b"")],
        [(b"", b""), (b"", b"")],
        [(b"a", b"1"), (b"b", b"2"), (b"c", b"3"), (b"b\xff", b"4")],
    ):
        with pytest.raises(ValueError):
            C.build_table(items, 64)
        with pytest.raises(ValueError):
            table.encode_table(items, 64)
    for items in (
        [("a", b"")],
        [(b"a", "x")],
        [[b"a", b""]],
        [(b"a", b"", b"")],
        [(b"a",)],
        [(bytearray(b"a"), b"")],
        [(b"a", memoryview(b""))],
        [b"a"],
        [None],
    ):
        with pytest.raises(TypeError):
            C.build_table(items, 64)
    with pytest.raises(TypeError):
        C.build_table(5, 64)
    for size in (0, -1):
        with pytest.raises(ValueError):
            C.build_table([(b"a", b"")], size)


# ----------------------------------------------------------- build_run_table


@st.composite
def _run_columns(draw: st.DrawFn) -> dict[str, Any]:
    """A run of tensors' columns in a layout order unrelated to the keys' (or sorted, or with an
    out-of-order pair), ranks 0..MAX, dimensions and offsets around varint byte boundaries."""
    keys = sorted(draw(st.sets(KEYS.filter(bool), max_size=80)))
    n = len(keys)
    layout = draw(st.permutations(range(n)))
    how = draw(st.sampled_from(["order", "sorted", "none-unsorted"]))
    if how == "sorted":
        layout = list(range(n))
    run_keys = [keys[p] for p in layout]
    order = np.argsort(np.array(layout, np.int64), kind="stable").astype(np.int64) if how == "order" else None
    edge = st.sampled_from([0, 1, 127, 128, 16383, 16384, 2**31 - 1, 2**32, 2**62])
    ndims = np.array([draw(st.integers(0, 5)) for _ in range(n)], np.int32)
    dims = np.array([draw(st.one_of(edge, st.integers(0, 2**40))) for _ in range(int(ndims.sum()))], np.int64)
    col = lambda dt, s: np.array([draw(s) for _ in range(n)], dt)  # noqa: E731
    return {
        "header": draw(st.binary(max_size=20)),
        "keys": run_keys,
        "order": order,
        "enums": col(np.int32, st.integers(0, 30)),
        "ndims": ndims,
        "dims": dims,
        "offsets": col(np.int64, st.one_of(edge, st.integers(0, 2**50))),
        "sizes": col(np.int64, st.one_of(edge, st.integers(0, 2**40))),
        "crcs": col(np.uint32, st.one_of(st.just(0), st.integers(0, 2**32 - 1))),
        "shard": draw(st.sampled_from([0, 1, 127, 128, 2**33])),
        "block_size": draw(st.sampled_from([16, 17, 100, 4096, table.BLOCK_SIZE])),
    }


def _run_table(c: dict[str, Any], order: Any = ...) -> Any:
    return C.build_run_table(
        c["header"], c["keys"], c["order"] if order is ... else order, c["enums"], c["ndims"], c["dims"],
        c["offsets"], c["sizes"], c["crcs"], c["shard"], c["block_size"],
    )


@needs_native
@PROPERTY
@given(_run_columns())
def test_build_run_table_property(c: dict[str, Any]) -> None:
    """The index table straight from a run's columns is byte-identical to build_table (and the Python
    TableWriter) over the header and the encoded entries sorted by key; keys that do not strictly
    increase in the order given build nothing (None)."""
    values = C.encode_entries(c["enums"], c["ndims"], c["dims"], c["offsets"], c["sizes"], c["crcs"], c["shard"])
    items = [(b"", c["header"])] + sorted(zip(c["keys"], values))
    got = _run_table(c)
    in_order = c["order"] is not None or all(a < b for a, b in zip(c["keys"], c["keys"][1:]))
    if not in_order:
        assert got is None
        return
    assert got == C.build_table(items, c["block_size"]) == table.encode_table(items, c["block_size"])
    assert table.TableReader(got).items() == items
    # prepared with stand-in crcs, then patched: the same table; a crc of 0 cannot be patched in
    n = len(c["keys"])
    crc_at = np.full(n, -7, np.int64)
    stand_in = np.full(n, 0xFFFFFFFF, np.uint32)
    prepared, blocks = C.build_run_table(
        c["header"], c["keys"], c["order"], c["enums"], c["ndims"], c["dims"], c["offsets"], c["sizes"], stand_in,
        c["shard"], c["block_size"], crc_at,
    )
    assert type(prepared) is bytearray and blocks.dtype == np.int64 and len(blocks) % 2 == 0
    before = bytes(prepared)
    patched = C.patch_run_table(prepared, crc_at, c["crcs"], blocks)
    if (c["crcs"] == 0).any():
        assert patched is False and bytes(prepared) == before
    else:
        assert patched is True and bytes(prepared) == got
    if n and (c["crcs"] == 0).any():
        with pytest.raises(ValueError, match="non-zero"):
            C.build_run_table(c["header"], c["keys"], c["order"], c["enums"], c["ndims"], c["dims"], c["offsets"],
                              c["sizes"], c["crcs"], c["shard"], c["block_size"], crc_at)
    if len(c["keys"]) > 1:  # the same columns in a wrong order: nothing built
        wrong = (np.arange(len(c["keys"]))[::-1] if c["order"] is None else c["order"][::-1]).astype(np.int64)
        assert _run_table(c, wrong) is None


@needs_native
def test_build_run_table_errors() -> None:
    """Out-of-range order positions, bad ranks, negative dimensions, short columns, keys that
    are not bytes and a non-positive block size raise; duplicates in order build nothing."""
    z32, z64 = np.zeros(2, np.int32), np.zeros(2, np.int64)
    base = dict(header=b"h", keys=[b"a", b"b"], order=None, enums=z32, ndims=z32, dims=np.zeros(0, np.int64),
                offsets=z64, sizes=z64, crcs=np.zeros(2, np.uint32), shard=0, block_size=64)
    assert table.TableReader(_run_table(base)).items() == [(b"", b"h")] + list(
        zip([b"a", b"b"], C.encode_entries(z32, z32, base["dims"], z64, z64, base["crcs"], 0))
    )
    assert _run_table(dict(base, order=np.array([0, 0], np.int64))) is None
    for bad in (
        dict(order=np.array([0, 2], np.int64)),
        dict(order=np.array([-1, 0], np.int64)),
        dict(ndims=np.array([0, 99], np.int32)),
        dict(ndims=np.array([0, 1], np.int32)),  # no dimension left for it
        dict(ndims=np.array([1, 0], np.int32), dims=np.array([-3], np.int64)),
        dict(order=np.zeros(1, np.int64)),
        dict(sizes=np.zeros(1, np.int64)),
        dict(block_size=0),
    ):
        with pytest.raises(ValueError):
            _run_table(dict(base, **bad))
    for bad in (dict(keys=["a", b"b"]), dict(keys=[b"a", None]), dict(keys=5)):
        with pytest.raises(TypeError):
            _run_table(dict(base, **bad))
    with pytest.raises(ValueError):  # crc_at too short
        C.build_run_table(b"h", [b"a", b"b"], None, z32, z32, base["dims"], z64, z64, np.ones(2, np.uint32), 0, 64,
                          np.zeros(1, np.int64))
    with pytest.raises(BufferError):  # crc_at read-only
        C.build_run_table(b"h", [b"a", b"b"], None, z32, z32, base["dims"], z64, z64, np.ones(2, np.uint32), 0, 64,
                          bytes(16))


@needs_native
def test_patch_run_table_refuses_positions_outside_the_table() -> None:
    """crc positions or block handles outside the table raise ValueError, writing nothing; a
    read-only table raises TypeError."""
    z32, z64 = np.zeros(3, np.int32), np.zeros(3, np.int64)
    at = np.zeros(3, np.int64)
    t, blocks = C.build_run_table(b"h", [b"a", b"b", b"c"], None, z32, z32, np.zeros(0, np.int64), z64, z64,
                                  np.ones(3, np.uint32), 0, 64, at)
    crcs = np.array([5, 6, 7], np.uint32)
    before = bytes(t)
    for bad_at, bad_blocks in (
        (np.array([0, 1, len(t) - 3], np.int64), blocks),
        (np.array([-1, 0, 0], np.int64), blocks),
        (at, np.array([0, len(t)], np.int64)),
        (at, np.array([-1, 4], np.int64)),
        (at, np.array([len(t) + 1, 0], np.int64)),
    ):
        with pytest.raises(ValueError):
            C.patch_run_table(t, bad_at, crcs, bad_blocks)
        assert bytes(t) == before
    with pytest.raises(ValueError):  # fewer crcs than positions
        C.patch_run_table(t, at, crcs[:2], blocks)
    with pytest.raises(BufferError):
        C.patch_run_table(before, at, crcs, blocks)
    assert C.patch_run_table(bytearray(), np.zeros(0, np.int64), np.zeros(0, np.uint32), np.zeros(0, np.int64))
    assert C.patch_run_table(t, at, crcs, blocks) is True
    values = [v for k, v in table.TableReader(bytes(t)).items() if k]
    assert [entry.decode_entry(v).crc32c for v in values] == [5, 6, 7]


# --------------------------------------------------------------- parse_block


def _parse_both(data: bytes, offset: int, size: int) -> Any:
    """Both parsers on one block: equal results, or ValueError from both (Malformed is one)."""
    try:
        want: Any = table._parse_block(memoryview(data), offset, size)
    except Malformed:
        want = ValueError
    try:
        got: Any = C.parse_block(data, offset, size)
        got = (list(got[0]), list(got[1]))
    except ValueError:
        got = ValueError
    assert got == (want if want is ValueError else (want[0], want[1])), (offset, size)
    return got


def _blocks(data: bytes) -> list[tuple[int, int]]:
    """Every block of a table: its data blocks, then the metaindex and index blocks."""
    foot = len(data) - table.FOOTER_SIZE
    meta_off, pos = decode_varint(data, foot, foot + 40)
    meta_size, pos = decode_varint(data, pos, foot + 40)
    idx_off, pos = decode_varint(data, pos, foot + 40)
    idx_size, pos = decode_varint(data, pos, foot + 40)
    return list(table.TableReader(data)._handles) + [(meta_off, meta_size), (idx_off, idx_size)]


@needs_native
@PROPERTY
@given(_table_items(), st.integers(0, 2**32 - 1))
def test_parse_block_property(case: tuple[list[tuple[bytes, bytes]], int], seed: int) -> None:
    """Every block of a random table parses as in Python; so do corrupted copies (flipped bytes,
    truncations, blocks that end the buffer): same result or ValueError from both."""
    items, block_size = case
    data = C.build_table(items, block_size)
    rng = np.random.default_rng(seed)
    parsed_keys: list[bytes] = []
    blocks = _blocks(data)
    for n, (off, size) in enumerate(blocks):
        keys, _ = _parse_both(data, off, size)
        if n < len(blocks) - 2:
            parsed_keys += keys
        _parse_both(data[off : off + size], 0, size)  # the block ends the buffer
        for _ in range(4):
            bad = bytearray(data[off : off + size])
            for _ in range(int(rng.integers(1, 4))):
                if bad:
                    bad[int(rng.integers(len(bad)))] = int(rng.integers(256))
            _parse_both(bytes(bad), 0, len(bad))
            cut = int(rng.integers(0, size + 1))
            _parse_both(data[: off + cut], off, cut)  # truncated, at the end of the buffer
            _parse_both(data, off, cut)
    assert parsed_keys == [k for k, _ in items]


BLOCK_TAIL = st.integers(0, 5).map(lambda n: b"\x00\x00\x00\x00" * n + struct.pack("<I", n))


@needs_native
@PROPERTY
@given(
    st.binary(max_size=8),
    st.one_of(
        st.binary(max_size=48),
        st.lists(
            st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6)).map(
                lambda t: encode_varint(t[0]) + encode_varint(t[1]) + encode_varint(t[2]) + b"k" * t[1] + b"v" * t[2]
            ),
            max_size=6,
        ).map(b"".join),
        st.sampled_from(
            [
                b"\x00\xff\xff\xff\xff\x0f\x00",  # unshared 2**32 - 1
                b"\x00\x80\x80\x80\x80\x10\x00",  # unshared 2**32: overflows 32 bits
                b"\x00\x80\x80\x80\x80\x80\x01\x00",  # 6-byte varint
                b"\x00\x01\x00a\x05\x01\x00b",  # shared beyond the last key
                b"\x00\x01\x00a\x01\x01\x00b",
            ]
        ),
    ),
    st.one_of(BLOCK_TAIL, st.binary(max_size=8)),
    st.binary(max_size=8),
)
def test_parse_block_crafted(prefix: bytes, body: bytes, tail: bytes, suffix: bytes) -> None:
    """Hand-made blocks (random bodies, overlong varints, bad shared lengths, restart counts)
    placed at an offset inside a larger buffer: the same result or ValueError as Python."""
    block = body + tail
    data = prefix + block + suffix
    _parse_both(data, len(prefix), len(block))
    _parse_both(block, 0, len(block))


@needs_native
def test_parse_block_bounds() -> None:
    """A block outside the buffer, a negative offset or size, or one under 4 bytes raises ValueError."""
    data = C.build_table([(b"a", b"1")], 64)
    off, size = _blocks(data)[0]
    assert C.parse_block(data, off, size) == ([b"a"], [b"1"])
    for o, s in ((-1, size), (off, -1), (off, len(data)), (len(data), 1), (len(data) + 1, 0), (off, 3), (0, 0)):
        with pytest.raises(ValueError):
            C.parse_block(data, o, s)
    assert C.parse_block(b"\x00\x00\x00\x00", 0, 4) == ([], [])
    assert C.parse_block(memoryview(b"xx\x00\x00\x00\x00"), 2, 4) == ([], [])


# --------------------------------------------------------------- end to end


@needs_native
def test_round_trip_through_every_function() -> None:
    """describe -> pack -> encode_entries -> build_table -> parse_block -> decode_entries ->
    check_arrays -> unpack restores every array, as the Python path would."""
    rng = np.random.default_rng(13)
    arrays = _mixed_arrays(rng, 200)
    enums, sizes, ndims, dims = C.describe(arrays, CODES)
    assert (enums >= 0).all()
    out = bytearray(int(sizes.sum()))
    crcs = np.zeros(len(arrays), np.uint32)
    assert C.pack(arrays, 0, len(arrays), out, crcs) == len(out)
    offsets = (np.cumsum(sizes) - sizes).astype(np.int64)
    masked = np.array([crcmod.mask(int(c)) for c in crcs], np.uint32)
    values = C.encode_entries(enums, ndims, dims, offsets, sizes, masked, 0)
    names = [f"var_{i:04d}".encode() for i in range(len(arrays))]
    index = C.build_table([(b"", entry.encode_header(1))] + list(zip(names, values)), 1024)
    read = table.TableReader(index).items()[1:]
    assert [k for k, _ in read] == names
    ok, r_enums, _, r_offsets, r_sizes, r_crcs, r_ndims, starts, r_dims = C.decode_entries([v for _, v in read])
    assert ok.all() and (r_offsets == offsets).all() and (r_sizes == sizes).all()
    dests = [np.zeros_like(a) for a in arrays]
    assert C.check_arrays(dests, CODES, ok, r_enums, r_ndims, starts, r_dims, r_sizes).all()
    unmasked = np.array([crcmod.unmask(int(c)) for c in r_crcs], np.uint32)
    order = np.argsort(r_offsets).astype(np.int64)
    assert C.unpack(bytes(out), 0, dests, order, 0, len(arrays), r_offsets, unmasked) == []
    assert all(a.tobytes() == d.tobytes() for a, d in zip(arrays, dests))
