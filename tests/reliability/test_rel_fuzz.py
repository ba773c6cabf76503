"""A time-boxed, deterministic fuzz of the reader: only gpusaver's own errors escape.

``BundleReader(prefix)``, ``variables()``, ``keys()``, ``dtype``, ``shape`` and
``get_tensor`` are driven with three kinds of index files:

* random bytes;
* a real checkpoint's index, mutated (bit flips, byte stores, insertions,
  deletions, truncations), in its native layout and re-blocked in small blocks;
* well-formed tables (valid block crcs) holding random headers and entries --
  random dtypes, shapes up to 2**64, shard ids, offsets, sizes, crcs, slices --
  so that the checks behind the crcs are exercised too.

Whatever the input, the reader returns values or raises ``GpuSaverError``; no
``IndexError``, ``struct.error``, ``UnicodeDecodeError``, protobuf
``DecodeError``, ``OverflowError`` or ``MemoryError`` escapes. Partitioned
entries are generated with small full shapes: ``test_rel_corruption.py`` covers
a huge one separately (a known bug).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gpusaver as gs
from gpusaver.format import BundleReader
from gpusaver.format.entry import encode_entry, encode_header
from gpusaver.format.slices import encode_slice_key
from gpusaver.format.table import TableReader, encode_table
from gpusaver.format.wire import encode_varint
import relkit

SPECS = relkit.SPECS["small"]
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A real four-shard checkpoint; fuzzed indexes are written beside its data files."""
    directory = str(tmp_path_factory.mktemp("fuzz"))
    arrays = relkit.zeros(SPECS)
    relkit.fill(arrays, SPECS, 3)
    prefix = relkit.make_saver(arrays, SPECS).save(os.path.join(directory, "model"), global_step=3)
    with open(prefix + ".index", "rb") as f:
        native = f.read()
    reblocked = encode_table(TableReader.from_bytes(native).items(), block_size=24)
    fuzz_prefix = os.path.join(directory, "fuzz")
    for n in os.listdir(directory):
        if ".data-" in n:
            os.link(os.path.join(directory, n), os.path.join(directory, n.replace("model-3", "fuzz")))
    # Extra data files for the shard counts the generated headers use.
    for shards in range(1, 5):
        for k in range(shards):
            path = f"{fuzz_prefix}.data-{k:05d}-of-{shards:05d}"
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(bytes(range(256)) * 2)
    return {"prefix": fuzz_prefix, "indexes": [native, reblocked]}


def _exercise(prefix: str, index: bytes) -> None:
    """Reads everything the index names; fails on any error that is not gpusaver's."""
    with open(prefix + ".index", "wb") as f:
        f.write(index)
    try:
        reader = BundleReader(prefix)
    except gs.GpuSaverError:
        return
    try:
        try:
            names = list(reader.variables())
            reader.keys()
        except gs.GpuSaverError:
            names = []
        for name in names[:12] + sorted(SPECS)[:3]:
            for call in (reader.get_tensor, reader.dtype, reader.shape, reader.has_tensor):
                try:
                    call(name)
                except gs.GpuSaverError:
                    pass
    finally:
        reader.close()


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(base, data: bytes) -> None:
    _exercise(base["prefix"], data)


_MUTATION = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.integers(min_value=0, max_value=255),
)


@FUZZ
@given(which=st.integers(0, 1), mutations=st.lists(_MUTATION, min_size=1, max_size=6))
def test_mutated_real_indexes(base, which: int, mutations) -> None:
    data = bytearray(base["indexes"][which])
    for kind, pos, byte in mutations:
        if not data:
            break
        pos %= len(data)
        if kind == "flip":
            data[pos] ^= 1 << (byte % 8)
        elif kind == "set":
            data[pos] = byte
        elif kind == "insert":
            data[pos:pos] = bytes([byte])
        elif kind == "delete":
            del data[pos]
        else:
            del data[pos:]
    _exercise(base["prefix"], bytes(data))


_DIM = st.one_of(st.integers(0, 8), st.integers(0, (1 << 64) - 1), st.sampled_from([1 << 31, 1 << 32, 1 << 63]))
_U64 = st.one_of(st.integers(0, 600), st.integers(0, (1 << 64) - 1))


@st.composite
def _entries(draw) -> list[tuple[bytes, bytes]]:
    """``(key, encoded BundleEntryProto)`` pairs of one tensor: one, or a partitioned tensor and its slice."""
    name = draw(st.sampled_from([b"d0/w", b"d1/x", b"t", b"\xff\xfe", b"a" * 40]) | st.binary(min_size=1, max_size=12))
    dtype = draw(st.integers(0, 40) | st.sampled_from([1, 2, 7, 10, 14, 19, 29]))
    if draw(st.booleans()):
        full = draw(st.lists(st.integers(1, 16), min_size=1, max_size=3))
        extents = [(0, -1) if draw(st.booleans()) else (0, d // 2 or 1) for d in full]
        body = encode_entry(dtype, full, 0, slices=[extents])
        shape = [d if length == -1 else length for d, (_, length) in zip(full, extents)]
        crc = draw(st.integers(0, 2**32 - 1))
        part = encode_entry(dtype, shape, draw(st.integers(0, 4)), draw(_U64), draw(_U64), crc)
        return [(name, body), (encode_slice_key(name, extents), part)]
    if draw(st.integers(0, 9)) == 0:
        return [(name, draw(st.binary(max_size=40)))]
    shape = draw(st.lists(_DIM, max_size=4))
    return [(name, encode_entry(
        dtype, shape, draw(st.integers(0, 5) | st.integers(0, (1 << 32))), draw(_U64), draw(_U64),
        draw(st.integers(0, 2**32 - 1)),
    ))]


@st.composite
def _table(draw) -> bytes:
    shards = draw(st.integers(1, 4) | st.integers(-3, 1 << 40))
    header = draw(st.sampled_from([
        encode_header(shards) if shards >= 0 else b"\x08" + encode_varint(shards & ((1 << 64) - 1)),
        encode_header(shards if shards >= 0 else 1) + b"\x10\x01",  # big-endian
        b"\x08\x01\x1a\x04\x08\x01\x10\x05",  # min_consumer above ours
    ]) | st.binary(max_size=16))
    items = {b"": header}
    for pairs in draw(st.lists(_entries(), max_size=8)):
        items.update(pairs)
    return encode_table(sorted(items.items()), block_size=draw(st.sampled_from([16, 64, 262144])))


@FUZZ
@given(table=_table())
def test_well_formed_tables_with_random_entries(base, table: bytes) -> None:
    _exercise(base["prefix"], table)


def test_the_fuzzed_reader_still_reads_the_real_checkpoint(base) -> None:
    _exercise(base["prefix"], base["indexes"][1])
    with gs.load_checkpoint(base["prefix"]) as reader:
        got = reader.get_tensor("d0/w")
    assert relkit.same(got, relkit.value("d0/w", SPECS["d0/w"], 3))
    assert np.dtype(got.dtype) == np.float32
