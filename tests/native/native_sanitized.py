"""Drives every function of gpusaver._native, on good and malformed input, for a sanitizer build.

``test_native_build.py`` runs this file in a child process whose
``gpusaver._native`` was compiled with AddressSanitizer and UBSan: any
out-of-bounds access, use after free or undefined behaviour aborts the child.
It checks results too, against the pure-Python twins, but its job is to give
the C code hostile input; ``test_native.py`` is the behavioural suite.
"""

from __future__ import annotations

import os
import sys
import tempfile

import crc32c
import numpy as np

from gpusaver import native
from gpusaver.format import entry as entry_mod
from gpusaver.format import table as table_mod

lib = native.lib
assert lib is not None, native.reason
rng = np.random.default_rng(7)
codes = native.type_codes()

# crc32c at every length and alignment
data = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
for lo in range(8):
    for n in range(0, 80):
        assert lib.crc32c(data[lo : lo + n]) == crc32c.crc32c(data[lo : lo + n])

# crc32c across the three lane-block sizes (3 x 64, 3 x 512, 3 x 8192 bytes) and their edges
long = rng.integers(0, 256, 3 * 8192 * 2 + 3 * 512 + 200, dtype=np.uint8).tobytes()
for n in (191, 192, 193, 1535, 1536, 1537, 24575, 24576, 24577, len(long) - 9, len(long) - 1):
    for lo in (0, 1, 5, 8):
        assert lib.crc32c(long[lo : lo + n], 7) == crc32c.crc32c(long[lo : lo + n], 7)

# stream_copy: sizes around its streaming threshold and block size, odd alignments, refused buffers
for n in (0, 1, 300, (256 << 10) - 1, 256 << 10, (256 << 10) + 129):
    src_b = rng.integers(0, 256, n + 40, dtype=np.uint8)
    dst_b = np.zeros(n + 80, np.uint8)
    lib.stream_copy(dst_b[3 : 3 + n], src_b[5 : 5 + n])
    assert bytes(dst_b[3 : 3 + n]) == bytes(src_b[5 : 5 + n])
    assert not dst_b[:3].any() and not dst_b[3 + n :].any()
shared = np.zeros(9, np.uint8)
for bad in ((bytearray(3), b"abcd"), (bytes(4), b"abcd"), (shared[1:], shared[:8])):
    try:
        lib.stream_copy(*bad)
    except (TypeError, ValueError, BufferError):
        pass
    else:
        raise AssertionError(f"stream_copy accepted {bad!r}")

# describe / pack / unpack, including zero-size, 0-d and refused arrays
arrays = [rng.standard_normal(int(k)).astype(np.float32) for k in rng.integers(0, 50, 200)]
arrays += [np.zeros((3, 0, 2), np.int8), np.array(2.5), np.arange(6)[::2], np.zeros(2, ">f4"), "x"]
enums, sizes, ndims, dims = lib.describe(arrays, codes)
ok = [i for i in range(len(arrays)) if enums[i] >= 0]
take = [arrays[i] for i in ok]
out = bytearray(int(sizes.sum()))
crcs = np.zeros(len(take), np.uint32)
assert lib.pack(take, 0, len(take), out, crcs) == len(out)
streamed, crcs2 = bytearray(len(out) + 3), np.zeros(len(take), np.uint32)
assert lib.pack(take, 0, len(take), memoryview(streamed)[3:], crcs2, True) == len(out)
assert bytes(streamed[3:]) == bytes(out) and crcs2.tolist() == crcs.tolist()
for bad in ((take, 0, len(take), bytearray(1), crcs), (arrays, 0, len(arrays), out, np.zeros(len(arrays), np.uint32))):
    try:
        lib.pack(*bad)
    except (TypeError, ValueError, IndexError):
        pass
offsets = np.zeros(len(take), np.int64)
np.cumsum(sizes[ok][:-1], out=offsets[1:])
order = np.arange(len(take), dtype=np.int64)
dest = [np.zeros_like(a) for a in take]
assert lib.unpack(out, 0, dest, order, 0, len(take), offsets, crcs) == []
wrong = crcs.copy()
wrong[[1, len(take) - 1]] ^= 1
assert lib.unpack(out, 0, dest, order, 0, len(take), offsets, wrong) == [1, len(take) - 1]
assert all(np.array_equal(a, b) for a, b in zip(take, dest))
for src, base, offs in ((out[:10], 0, offsets), (out, 100, np.full(len(take), -(2**63), np.int64))):
    try:  # a short source; an offset whose distance to base overflows int64
        lib.unpack(src, base, dest, order, 0, len(take), offs, crcs)
    except ValueError:
        pass

# entries: encode, decode, and decode of mutated bytes against the Python fast decoder
masked = rng.integers(0, 2**32, len(take), dtype=np.uint64).astype(np.uint32)
values = lib.encode_entries(enums[ok], ndims[ok], dims, offsets, sizes[ok], masked, 3)
mutants: list[object] = [None, b"", b"\x08", b"\x12", 42]
for v in values[:60]:
    for _ in range(20):
        b = bytearray(v)
        b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        mutants.append(bytes(b[: int(rng.integers(0, len(b) + 1))]))
mutants += [rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8).tobytes() for _ in range(2000)]
mutants.append(b"\x08\x01\x12" + bytes([0x7F]) + b"\x12\x00" * 63 + b"\x12\x01")
decoded = lib.decode_entries(values + mutants)
for i, v in enumerate(values + mutants):
    py = entry_mod._decode_common(v) if isinstance(v, bytes) and v else None
    assert bool(decoded[0][i]) == (py is not None), (i, v)
lib.check_arrays(take, codes, *[decoded[k][: len(take)] for k in (0, 1, 6)], decoded[7][: len(take) + 1], decoded[8], decoded[4][: len(take)])

# tables: build at several block sizes; parse every block, then damaged blocks
items = sorted({bytes(rng.integers(0, 256, int(rng.integers(0, 12)), dtype=np.uint8)): b"v" * int(rng.integers(0, 90)) for _ in range(3000)}.items())
items += [(b"\xff" * 20, b"z" * 700)]
for block_size in (16, 64, 1000, table_mod.BLOCK_SIZE):
    raw = lib.build_table(items, block_size)
    parts: list[bytes] = []
    writer = table_mod.TableWriter(parts.append, block_size)
    writer.add_all(items)
    writer.finish()
    assert raw == b"".join(parts)
    reader = table_mod.TableReader(raw)
    view = memoryview(raw)
    for off, size in reader._handles:
        assert lib.parse_block(view, off, size) == table_mod._parse_block_py(view, off, size)
    for off, size in reader._handles[:40]:
        for _ in range(30):
            damaged = bytearray(raw[off : off + size])  # exactly the block: a read past it is caught
            damaged[int(rng.integers(0, size))] ^= 1 << int(rng.integers(0, 8))
            for cut in (size, int(rng.integers(0, size + 1))):
                try:
                    lib.parse_block(bytes(damaged[:cut]), 0, cut)
                except ValueError:
                    pass
only_empty = lib.build_table([(b"", b"v")], 64)  # every separator key is empty
assert table_mod.TableReader(only_empty).items() == [(b"", b"v")]
for bad in ([(b"b", b""), (b"a", b"")], [(b"a", 1)], [("a", b"")]):
    try:
        lib.build_table(bad, 64)
    except (TypeError, ValueError):
        pass

# build_run_table: the same bytes as build_table over the encoded pairs, any order; refusals
perm = rng.permutation(len(take))
keys_run = [b"k%05d" % p for p in perm]
order_run = np.argsort(perm).astype(np.int64)
vals_run = lib.encode_entries(enums[ok], ndims[ok], dims, offsets, sizes[ok], masked, 2)
for block_size in (16, 64, table_mod.BLOCK_SIZE):
    want = lib.build_table([(b"", b"hdr")] + sorted(zip(keys_run, vals_run)), block_size)
    assert lib.build_run_table(b"hdr", keys_run, order_run, enums[ok], ndims[ok], dims, offsets, sizes[ok], masked, 2, block_size) == want
at_run = np.zeros(len(take), np.int64)
stand_in = np.full(len(take), 0xFFFFFFFF, np.uint32)
prepared, run_blocks = lib.build_run_table(b"hdr", keys_run, order_run, enums[ok], ndims[ok], dims, offsets, sizes[ok], stand_in, 2, 64, at_run)
real = np.where(masked == 0, 1, masked).astype(np.uint32)
assert lib.patch_run_table(prepared, at_run, real, run_blocks)
assert bytes(prepared) == lib.build_run_table(b"hdr", keys_run, order_run, enums[ok], ndims[ok], dims, offsets, sizes[ok], real, 2, 64)
for bad_at in (np.full(len(take), len(prepared), np.int64), np.full(len(take), -1, np.int64)):
    try:
        lib.patch_run_table(prepared, bad_at, real, run_blocks)
    except ValueError:
        pass
for bad_order in (order_run[::-1].copy(), np.full(len(take), len(take), np.int64), np.full(len(take), -1, np.int64)):
    try:
        assert lib.build_run_table(b"h", keys_run, bad_order, enums[ok], ndims[ok], dims, offsets, sizes[ok], masked, 0, 64) is None
    except ValueError:
        pass
for bad_ndims in (np.full(len(take), 99, np.int32), np.full(len(take), 1 << 20, np.int32)):
    try:
        lib.build_run_table(b"h", keys_run, None, enums[ok], bad_ndims, dims, offsets, sizes[ok], masked, 0, 64)
    except ValueError:
        pass

# a whole save and restore through the Saver
import gpusaver  # noqa: E402

with tempfile.TemporaryDirectory() as d:
    variables = {f"v{i:04d}": rng.standard_normal(int(rng.integers(0, 40_000))).astype(np.float32) for i in range(300)}
    saver = gpusaver.Saver(variables, durable=False)
    prefix = saver.save(os.path.join(d, "m"))
    expect = {k: v.copy() for k, v in variables.items()}
    for v in variables.values():
        v[...] = 0
    saver.restore(prefix)
    assert all(np.array_equal(variables[k], expect[k]) for k in variables)
print("sanitized run ok", file=sys.stderr)
