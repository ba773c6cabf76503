"""The C extension's table scans against the Python table reader they stand in for.

``lookup_entries`` (a restore's lookup of every variable in one pass over the index),
``first_entry`` (a bundle's header) and ``extents_inside`` (the data-file bounds check)
must give what :class:`~gpusaver.format.table.TableReader`, ``decode_entries`` and
:meth:`~gpusaver.format.reader.BundleReader.inside_data_files`' NumPy code give, and hand
damage back to the Python path (which raises the precise error) instead of deciding it.
"""

from __future__ import annotations

import importlib
import random
import struct
from typing import Any, Iterator

import numpy as np
import pytest

from gpusaver import native
from gpusaver.errors import ChecksumError
from gpusaver.format import crc as crcmod
from gpusaver.format import entry, table

pytestmark = pytest.mark.skipif(not native.available(), reason=f"gpusaver._native unavailable: {native.reason}")

C: Any = importlib.import_module("gpusaver._native") if native.available() else None


@pytest.fixture(autouse=True)
def _python_reader() -> Iterator[None]:
    """The TableReader under test runs its Python code; the tests call the extension directly."""
    was_on = native.lib is not None
    native.use(False)
    try:
        yield
    finally:
        native.use(was_on)


def _table(n: int, seed: int, block_size: int = 512) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    rng = random.Random(seed)
    keys = sorted({b"" if i == 0 else f"v{rng.randrange(10 * n + 1):06d}/{'x' * rng.randrange(4)}".encode() for i in range(n)})
    items = []
    for k in keys:
        shape = [rng.randrange(1, 5) for _ in range(rng.randrange(0, 4))]
        size = 4 * int(np.prod(shape)) if shape else 4
        value = entry.encode_entry(1, shape, rng.randrange(3), rng.randrange(1 << 20), size, rng.randrange(1 << 32))
        items.append((k, value if rng.random() > 0.1 else bytes(rng.randrange(256) for _ in range(rng.randrange(6)))))
    return table.encode_table(items, block_size), items


def _blocks(reader: table.TableReader) -> np.ndarray:
    return np.array(reader._handles, np.int64).reshape(-1, 2)


def _queries(items: list[tuple[bytes, bytes]], rng: random.Random, order: str) -> list[Any]:
    keys = [k for k, _ in items]
    picked = rng.sample(keys, len(keys) // 2) + [b"absent", b"v", b"zzz"]
    if order == "sorted":
        return sorted(set(picked))
    picked += picked[:5] + ["a str", None]  # the same key twice; things that are not bytes
    rng.shuffle(picked)
    return picked


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
@pytest.mark.parametrize("seed", range(6))
def test_lookup_gives_get_many_and_decode_entries(order: str, seed: int) -> None:
    data, items = _table(300, seed)
    reader = table.TableReader(data)
    queries = _queries(items, random.Random(seed), order)
    stored = dict(items)
    values = C.lookup_entries(data, _blocks(reader), queries)
    assert values == [stored.get(q) if isinstance(q, bytes) else None for q in queries]
    bytes_only = [q if isinstance(q, bytes) else b"\xff-none" for q in queries]
    assert values == [v if isinstance(q, bytes) else None for q, v in zip(queries, reader.get_many(bytes_only))]
    expect = C.decode_entries(values)
    got = C.lookup_entries(data, _blocks(reader), queries, 2)
    ok, shards, crcs = expect[0], expect[2], expect[5]
    assert got[0].tolist() == (ok.astype(bool) & (shards < 2)).astype(np.uint8).tolist()
    found = ok.astype(bool)  # the crc of an entry that did not decode is never read
    assert got[5][found].tolist() == crcmod.unmask_array(crcs)[found].tolist()
    for k in (1, 2, 3, 4, 6, 7, 8):
        assert got[k].tolist() == expect[k].tolist()


def test_lookup_of_nothing_and_of_an_empty_table() -> None:
    data, items = _table(50, 1)
    reader = table.TableReader(data)
    assert C.lookup_entries(data, _blocks(reader), []) == []
    assert all(len(col) == 0 for i, col in enumerate(C.lookup_entries(data, _blocks(reader), [], 1)) if i != 7)
    empty = table.encode_table([])
    assert C.lookup_entries(empty, _blocks(table.TableReader(empty)), [b"a", b""]) == [None, None]
    assert C.first_entry(empty, _blocks(table.TableReader(empty))) is None


def _corrupt_entry_byte(data: bytes, reader: table.TableReader, block: int, at: int, value: int) -> bytes:
    """``data`` with one byte of a data block changed and the block's crc made right again."""
    off, size = reader._handles[block]
    buf = bytearray(data)
    buf[off + at] = value
    crc = crcmod.mask(crcmod.extend(crcmod.value(bytes(buf[off : off + size])), b"\x00"))
    buf[off + size + 1 : off + size + 5] = struct.pack("<I", crc)
    return bytes(buf)


def test_a_key_stored_twice_takes_the_later_value_as_the_dict_does() -> None:
    items = [(b"", b"h"), (b"k1", b"first"), (b"k2", b"second"), (b"k3", b"third")]
    data = table.encode_table(items)
    reader = table.TableReader(data)
    # "k2" is stored as (shared 1, unshared "2"): make it "k1", a key out of order
    off, _ = reader._handles[0]
    where = data.index(b"2second", off)
    damaged = _corrupt_entry_byte(data, reader, 0, where - off, ord("1"))
    r2 = table.TableReader(damaged)
    for queries in ([b"k1", b"k3"], [b"k3", b"k1"]):  # the merge notices the order and hashes instead
        assert C.lookup_entries(damaged, _blocks(r2), queries) == [dict(r2)[q] for q in queries]
    assert dict(r2)[b"k1"] == b"second"


def test_damaged_blocks_go_back_to_the_python_reader() -> None:
    data, items = _table(200, 3, block_size=256)
    reader = table.TableReader(data)
    keys = [k for k, _ in items]
    off, size = reader._handles[2]
    flipped = bytearray(data)
    flipped[off + 3] ^= 0x40  # the crc no longer matches
    assert C.lookup_entries(bytes(flipped), _blocks(reader), keys) is None
    assert C.lookup_entries(bytes(flipped), _blocks(reader), keys, 1) is None
    with pytest.raises(ChecksumError):
        table.TableReader(bytes(flipped)).get_many(keys)
    # a restart count too large, the crc right: the parse fails
    bad_restarts = bytearray(data)
    bad_restarts[off + size - 4 : off + size] = struct.pack("<I", 1 << 30)
    fixed = _corrupt_entry_byte(bytes(bad_restarts), reader, 2, 0, bad_restarts[off])
    assert C.lookup_entries(fixed, _blocks(reader), keys) is None
    blocks = _blocks(reader)
    blocks[1, 1] = len(data)  # a handle outside the file
    assert C.lookup_entries(data, blocks, keys) is None


@pytest.mark.parametrize("seed", range(4))
def test_first_entry_is_the_table_readers_first(seed: int) -> None:
    data, items = _table(100, seed, block_size=128)
    reader = table.TableReader(data)
    assert C.first_entry(data, _blocks(reader)) == reader.first() == items[0]
    off, size = reader._handles[0]
    flipped = bytearray(data)
    flipped[off + size - 6] ^= 1  # inside the first block, after its first entry
    assert C.first_entry(bytes(flipped), _blocks(reader)) is False
    keys, values = reader._block(1)
    assert C.first_entry(data, _blocks(reader)[1:]) == (keys[0], values[0])


def test_the_table_reader_uses_the_extension_and_agrees() -> None:
    data, items = _table(400, 5, block_size=256)
    keys = [k for k, _ in items]
    python = table.TableReader(data).get_many(keys[::-1])
    native.use(True)
    reader = table.TableReader(data)
    assert reader.first() == items[0]
    assert reader.get_many(keys[::-1]) == python
    cols = reader.get_many_decoded(keys[::-1], 3)
    assert cols is not None and cols[0].tolist() == [
        int(v is not None and C.decode_entries([v])[0][0] == 1) for v in python
    ]


@pytest.mark.parametrize("seed", range(5))
def test_extents_inside_is_the_numpy_check(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 500
    where = rng.random(n) < 0.8
    shards = rng.integers(-1, 5, n).astype(np.int64)
    offsets = rng.integers(0, 1000, n).astype(np.int64)
    sizes = rng.integers(0, 200, n).astype(np.int64)
    offsets[:3] = np.iinfo(np.int64).max  # a sum past 2**63 wraps in uint64, as NumPy's does
    file_sizes = {0: 900, 1: 1200, 2: -1, 3: 0}
    num_shards = 4
    inside, needed = C.extents_inside(where, shards, offsets, sizes, num_shards, {})
    assert needed == sorted({int(s) for s, w in zip(shards, where) if w and 0 <= s < num_shards})
    assert not inside.any()
    inside, needed = C.extents_inside(where.view(np.uint8), shards, offsets, sizes, num_shards, file_sizes)
    assert needed == []
    ends = offsets.astype(np.uint64) + sizes.astype(np.uint64)
    expect = where & (shards >= 0) & (shards < num_shards)
    for s, size in file_sizes.items():
        expect &= ~((shards == s) & ((ends > np.uint64(max(size, 0))) | (size < 0)))
    assert inside.dtype == bool and inside.tolist() == expect.tolist()
