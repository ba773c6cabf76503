"""The sorted key/value table of a checkpoint's ``.index`` file.

This is the LevelDB table layout without filter blocks, as TensorFlow writes it:
data blocks of prefix-compressed entries with restart points, each followed by a
5-byte trailer (type byte 0 and a masked crc32c), an empty metaindex block, an
index block mapping a separator key to each data block, and a 48-byte footer
ending in the table magic. For the same entries :class:`TableWriter` produces
the same bytes as TensorFlow; :class:`TableReader` verifies every block's crc.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from gpusaver.errors import InvalidArgumentError
from gpusaver import native
from gpusaver.format import crc
from gpusaver.format.wire import FIXED32, Malformed, decode_varint, encode_varint

__all__ = [
    "BLOCK_SIZE",
    "FOOTER_SIZE",
    "MAGIC",
    "TableWriter",
    "TableReader",
    "encode_table",
    "shortest_separator",
    "short_successor",
]

BLOCK_SIZE = 262144
RESTART_INTERVAL = 16
FOOTER_SIZE = 48
TRAILER_SIZE = 5
MAGIC = 0xDB4775248B80FB57
_MAGIC_BYTES = MAGIC.to_bytes(8, "little")
_TYPE_NONE = b"\x00"


def _shared_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    # The highest set bit of the XOR lies in the first byte that differs.
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n - (x.bit_length() + 7) // 8


def shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key ``k`` with ``start <= k < limit`` (``start`` itself when none is shorter)."""
    i = _shared_prefix(start, limit)
    if i >= min(len(start), len(limit)):
        return start
    byte = start[i]
    if byte < 0xFF and byte + 1 < limit[i]:
        return start[:i] + bytes((byte + 1,))
    return start


def short_successor(key: bytes) -> bytes:
    """A short key ``>= key``: the first byte that is not 0xFF, incremented, then cut."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes((byte + 1,))
    return key


class _BlockBuilder:
    __slots__ = ("buf", "restarts", "counter", "last_key", "interval")

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        if self.counter < self.interval:
            shared = _shared_prefix(self.last_key, key)
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
            shared = 0
        buf = self.buf
        buf += encode_varint(shared)
        buf += encode_varint(len(key) - shared)
        buf += encode_varint(len(value))
        buf += key[shared:]
        buf += value
        self.last_key = key
        self.counter += 1

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        restarts = self.restarts
        tail = b"".join(FIXED32.pack(r) for r in restarts) + FIXED32.pack(len(restarts))
        return bytes(self.buf) + tail


def _encode_handle(offset: int, size: int) -> bytes:
    return encode_varint(offset) + encode_varint(size)


class TableWriter:
    """Writes a table through ``write`` (called with successive byte strings).

    Keys must be added in strictly increasing bytewise order.
    """

    def __init__(self, write: Callable[[bytes], object], block_size: int = BLOCK_SIZE) -> None:
        self._write = write
        self._block_size = block_size
        self._offset = 0
        self._data = _BlockBuilder(RESTART_INTERVAL)
        self._index = _BlockBuilder(1)
        self._last_key: bytes | None = None
        self._pending: tuple[int, int] | None = None
        self._finished = False

    def add(self, key: bytes, value: bytes) -> None:
        """Adds one entry; ``key`` must sort after every key added before."""
        if self._finished:
            raise InvalidArgumentError("table already finished")
        last = self._last_key
        if last is not None and key <= last:
            raise InvalidArgumentError(f"table keys must be strictly increasing: {key!r} after {last!r}")
        if last is not None and len(key) + len(value) >= 2 * self._block_size:
            self._flush()
        if self._pending is not None:
            sep = shortest_separator(last or b"", key)
            self._index.add(sep, _encode_handle(*self._pending))
            self._pending = None
        self._last_key = key
        self._data.add(key, value)
        if self._data.size_estimate() >= self._block_size:
            self._flush()

    def add_all(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Adds many sorted entries; the same table as :meth:`add` one by one, faster."""
        limit = 2 * self._block_size
        block_size = self._block_size
        for key, value in items:
            block = self._data
            last = self._last_key
            if last is None or key <= last or len(key) + len(value) >= limit or self._pending is not None:
                self.add(key, value)  # the rare paths: first key, order errors, flushes
                continue
            block.add(key, value)
            self._last_key = key
            if block.size_estimate() >= block_size:
                self._flush()

    def _write_block(self, contents: bytes) -> tuple[int, int]:
        checksum = crc.mask(crc.extend(crc.value(contents), _TYPE_NONE))
        handle = (self._offset, len(contents))
        self._write(contents)
        self._write(_TYPE_NONE + FIXED32.pack(checksum))
        self._offset += len(contents) + TRAILER_SIZE
        return handle

    def _flush(self) -> None:
        if not self._data.buf:
            return
        self._pending = self._write_block(self._data.finish())
        self._data = _BlockBuilder(RESTART_INTERVAL)

    def finish(self) -> int:
        """Writes the remaining blocks and the footer; returns the table's size."""
        self._flush()
        meta = self._write_block(_BlockBuilder(RESTART_INTERVAL).finish())
        if self._pending is not None:
            self._index.add(short_successor(self._last_key or b""), _encode_handle(*self._pending))
            self._pending = None
        index = self._write_block(self._index.finish())
        footer = _encode_handle(*meta) + _encode_handle(*index)
        footer += bytes(40 - len(footer)) + _MAGIC_BYTES
        self._write(footer)
        self._offset += FOOTER_SIZE
        self._finished = True
        return self._offset


def encode_table(items: Iterable[tuple[bytes, bytes]], block_size: int = BLOCK_SIZE) -> bytes:
    """Encodes sorted ``(key, value)`` pairs as a whole table (in C when the extension is built).

    Raises:
        ValueError: the keys do not strictly increase.
    """
    lib = native.lib
    if lib is not None:
        items = items if isinstance(items, list) else list(items)
        try:
            return lib.build_table(items, block_size)
        except TypeError:
            pass  # not all (bytes, bytes): the Python writer takes any bytes-like pair
    parts: list[bytes] = []
    writer = TableWriter(parts.append, block_size)
    writer.add_all(items)
    writer.finish()
    return b"".join(parts)


def _parse_block(data: memoryview, offset: int, size: int) -> tuple[list[bytes], list[bytes]]:
    """Decodes all entries of one block (crc already checked), in C when the extension is built."""
    lib = native.lib
    if lib is not None:
        try:
            return lib.parse_block(data, offset, size)  # type: ignore[no-any-return]
        except ValueError as e:
            raise Malformed(str(e)) from None
    return _parse_block_py(data, offset, size)


def _parse_block_py(data: memoryview, offset: int, size: int) -> tuple[list[bytes], list[bytes]]:
    """:func:`_parse_block` in Python: the reference the C version is tested against."""
    if size < 4:
        raise Malformed("block too short")
    end = offset + size
    num_restarts = FIXED32.unpack_from(data, end - 4)[0]
    if num_restarts > (size - 4) // 4:
        raise Malformed("bad restart count")
    limit = end - 4 - 4 * num_restarts
    keys: list[bytes] = []
    values: list[bytes] = []
    if num_restarts == 0:
        return keys, values
    pos = offset
    key = b""
    while pos < limit:
        shared, pos = decode_varint(data, pos, limit, 32)
        unshared, pos = decode_varint(data, pos, limit, 32)
        vlen, pos = decode_varint(data, pos, limit, 32)
        if shared > len(key) or pos + unshared + vlen > limit:
            raise Malformed("bad block entry")
        key = key[:shared] + bytes(data[pos : pos + unshared])
        pos += unshared
        keys.append(key)
        values.append(bytes(data[pos : pos + vlen]))
        pos += vlen
    return keys, values


class TableReader:
    """Reads a table held in memory; every block's crc32c is verified on read.

    Blocks are decoded lazily, on first use, and cached.
    """

    def __init__(self, data: bytes | bytearray | memoryview, path: str | None = None) -> None:
        self.path = path
        self._data = memoryview(data)
        try:
            self._index_keys, self._handles = self._read_index()
        except Malformed as e:
            raise Malformed(f"{path!r} is not a valid checkpoint index: {e}", path) from None
        self._blocks: dict[int, tuple[list[bytes], list[bytes]]] = {}
        self._dict: dict[bytes, bytes] | None = None
        self._handle_array: np.ndarray | None = None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, path: str | None = None) -> "TableReader":
        """Opens a table from its bytes; ``path`` only names it in errors."""
        return cls(data, path)

    @classmethod
    def open(cls, path: str) -> "TableReader":
        """Reads a whole table file (a regular file: FIFOs and devices are refused)."""
        from gpusaver.storage.paths import read_regular

        return cls(read_regular(path, "table"), path)

    def _checked_block(self, offset: int, size: int, what: str) -> None:
        data = self._data
        body_end = len(data) - FOOTER_SIZE
        if offset + size + TRAILER_SIZE > body_end:
            raise Malformed(f"{what} block handle ({offset}, {size}) lies outside the file")
        block_type = data[offset + size]
        stored = FIXED32.unpack_from(data, offset + size + 1)[0]
        actual = crc.extend(crc.value(data[offset : offset + size]), data[offset + size : offset + size + 1])
        if crc.mask(actual) != stored:  # the crc first: it covers the type byte too
            from gpusaver.errors import ChecksumError

            raise ChecksumError(self.path, None, crc.unmask(stored), actual, what=f"{what} block at offset {offset}")
        if block_type not in (0, 1):
            raise Malformed(f"bad {what} block type {block_type}")
        if block_type == 1:
            raise Malformed(f"{what} block is Snappy-compressed, which checkpoints never use")

    def verify(self) -> None:
        """Checks every byte TensorFlow's reader would skip too: the metaindex block's crc,
        the footer's padding, and every data block's crc.

        Raises:
            ChecksumError / Malformed: damage anywhere in the table.
        """
        data = self._data
        foot = len(data) - FOOTER_SIZE
        try:
            off, pos = decode_varint(data, foot, foot + 40)
            size, pos = decode_varint(data, pos, foot + 40)
            self._checked_block(off, size, "metaindex")
            _, pos = decode_varint(data, pos, foot + 40)
            _, pos = decode_varint(data, pos, foot + 40)
            if any(data[pos : foot + 40]):
                raise Malformed("footer padding is not zero")
        except Malformed as e:
            raise Malformed(f"{self.path!r}: {e}", self.path) from None
        for i in range(len(self._handles)):
            self._block(i)

    def _read_index(self) -> tuple[list[bytes], list[tuple[int, int]]]:
        data = self._data
        if len(data) < FOOTER_SIZE:
            raise Malformed(f"file is too short ({len(data)} bytes) to be a table")
        foot = len(data) - FOOTER_SIZE
        if bytes(data[foot + 40 :]) != _MAGIC_BYTES:
            raise Malformed("bad table magic number")
        pos = foot
        _, pos = decode_varint(data, pos, foot + 40)
        _, pos = decode_varint(data, pos, foot + 40)
        off, pos = decode_varint(data, pos, foot + 40)
        size, pos = decode_varint(data, pos, foot + 40)
        self._checked_block(off, size, "index")
        keys, values = _parse_block(data, off, size)
        handles = []
        for value in values:
            h_off, p = decode_varint(value, 0, len(value))
            h_size, p = decode_varint(value, p, len(value))
            if h_off + h_size + TRAILER_SIZE > foot:
                raise Malformed(f"data block handle ({h_off}, {h_size}) lies outside the file")
            handles.append((h_off, h_size))
        for a, b in zip(keys, keys[1:]):
            if a >= b:
                raise Malformed("index block keys are not sorted")
        return keys, handles

    def _block(self, i: int) -> tuple[list[bytes], list[bytes]]:
        cached = self._blocks.get(i)
        if cached is None:
            off, size = self._handles[i]
            try:
                self._checked_block(off, size, "data")
                cached = _parse_block(self._data, off, size)
            except Malformed as e:
                raise Malformed(f"{self.path!r}: {e}", self.path) from None
            self._blocks[i] = cached
        return cached

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""
        i = bisect.bisect_left(self._index_keys, key)
        if i >= len(self._index_keys):
            return None
        keys, values = self._block(i)
        j = bisect.bisect_left(keys, key)
        if j < len(keys) and keys[j] == key:
            return values[j]
        return None

    def _native_blocks(self) -> tuple[Any, np.ndarray] | None:
        """The C extension's table functions and the data blocks' handles as they take them."""
        lib = native.lib
        if getattr(lib, "lookup_entries", None) is None:
            return None
        if self._handle_array is None:
            self._handle_array = np.array(self._handles, np.int64).reshape(-1, 2)
        return lib, self._handle_array

    def _scan(self, keys: list[bytes], *args: Any) -> Any:
        """``lib.lookup_entries`` over every data block (see :meth:`get_many`), or None: without the
        C extension, for fewer keys than a scan pays for, or where a block is damaged (the Python
        path then raises the precise error)."""
        found = self._native_blocks()
        if found is None or len(keys) < 8 * len(self._handles):
            return None
        lib, blocks = found
        return lib.lookup_entries(self._data, blocks, keys, *args)

    def get_many_decoded(
        self, keys: list[bytes], num_shards: int, arrays: Sequence[Any] | None = None, codes: dict[int, int] | None = None
    ) -> tuple[np.ndarray, ...] | None:
        """The entries of ``keys`` decoded by the C extension in one pass over the blocks, with no
        Python object per entry: ``decode_entries(self.get_many(keys))``, except that ``ok`` also
        requires a shard below ``num_shards`` and the crcs are unmasked (as
        :class:`~gpusaver.format.reader.EntryColumns` keeps them). Given ``arrays`` (one per key)
        and ``codes`` (:func:`gpusaver.native.type_codes`), a tenth column: ``check_arrays`` of
        the arrays against those entries, made in the same pass. None where :meth:`get_many` must
        run instead."""
        if arrays is None:
            return self._scan(keys, num_shards)  # type: ignore[no-any-return]
        return self._scan(keys, num_shards, arrays, codes)  # type: ignore[no-any-return]

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """The values of many keys (None where missing); reads the whole table once when that is cheaper.

        Where a key is stored twice (a damaged table), the later value wins.
        """
        if len(keys) < 8 * len(self._handles):
            return [self.get(k) for k in keys]
        scanned = self._scan(keys, None)
        if scanned is not None:
            return scanned  # type: ignore[no-any-return]
        table = self._dict
        if table is None:
            table = {}
            for i in range(len(self._handles)):
                block_keys, block_values = self._block(i)
                table.update(zip(block_keys, block_values))
            self._dict = table  # published whole: a reader on another thread never sees it half built
        get = table.get
        return [get(k) for k in keys]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for i in range(len(self._handles)):
            keys, values = self._block(i)
            yield from zip(keys, values)

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every ``(key, value)`` in order, checking that keys increase."""
        out = list(self)
        for (a, _), (b, _) in zip(out, out[1:]):
            if a >= b:
                raise Malformed(f"{self.path!r}: table keys are not sorted", self.path)
        return out

    def first(self) -> tuple[bytes, bytes] | None:
        """The first entry (a bundle's header), or None for an empty table.

        The blocks up to the first one with an entry are checked and parsed whole (in C, when the
        extension is built: a block of thousands of entries makes no Python object but two).
        """
        found = self._native_blocks()
        if found is not None:
            lib, blocks = found
            entry = lib.first_entry(self._data, blocks)
            if entry is not False:  # False: a damaged block, which the loop below names
                return entry  # type: ignore[no-any-return]
        for i in range(len(self._handles)):
            keys, values = self._block(i)
            if keys:
                return keys[0], values[0]
        return None
