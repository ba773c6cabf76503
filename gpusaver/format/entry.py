"""BundleHeaderProto and BundleEntryProto, encoded and decoded by hand.

A checkpoint of 100,000 tensors has 100,000 entries, so these codecs sit on
the hot path; they produce exactly the bytes protobuf's serializer produces
(fields in number order, proto3 defaults omitted, the shape always present),
which the test suite checks against the generated protobuf classes. Decoding
validates as TensorFlow's reader does and raises :class:`Malformed` (a
``ValueError``), never IndexError or a protobuf error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from gpusaver.format import slices as _slices
from gpusaver.format.wire import FIXED32, Malformed, decode_varint, encode_varint

__all__ = [
    "BundleEntry",
    "BundleHeader",
    "encode_entry",
    "decode_entry",
    "encode_shape",
    "encode_header",
    "decode_header",
    "FORMAT_VERSION",
]

#: The bundle format version this package writes and the consumer version it reads as.
FORMAT_VERSION = 1
MAX_RANK = 254
_INT64_MAX = (1 << 63) - 1
_U64 = (1 << 64) - 1

_SCALAR_SHAPE = b"\x12\x00"


@dataclass
class BundleEntry:
    """One tensor's metadata in the index.

    Attributes:
        dtype: the ``DataType`` enum value.
        shape: the tensor's shape (the full tensor's, for a sliced entry).
        shard_id: which data file holds the bytes.
        offset: where the bytes start in that file.
        size: how many bytes.
        crc32c: the masked crc32c of those bytes, as stored.
        slices: for a partitioned tensor, the extents of each stored slice.
    """

    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    slices: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def num_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class BundleHeader:
    """The header entry (key ``b""``)."""

    num_shards: int = 1
    endianness: int = 0  # 0 little, 1 big
    producer: int = FORMAT_VERSION
    min_consumer: int = 0
    bad_consumers: list[int] = field(default_factory=list)
    version_bytes: bytes = b""


def _encode_dims(shape: Sequence[int]) -> bytes:
    out = bytearray()
    for d in shape:
        if d:
            inner = b"\x08" + encode_varint(d)
            out += b"\x12" + encode_varint(len(inner)) + inner
        else:
            out += b"\x12\x00"
    return bytes(out)


_SHAPE_CACHE: dict[tuple[int, ...], bytes] = {}


def encode_shape(shape: Sequence[int]) -> bytes:
    """The entry's field 2 (tag, length and TensorShapeProto) for ``shape``."""
    key = tuple(shape)
    cached = _SHAPE_CACHE.get(key)
    if cached is None:
        body = _encode_dims(key)
        cached = b"\x12" + encode_varint(len(body)) + body
        if len(_SHAPE_CACHE) < 4096:
            _SHAPE_CACHE[key] = cached
    return cached


def encode_entry(
    dtype: int,
    shape: Sequence[int],
    shard_id: int = 0,
    offset: int = 0,
    size: int = 0,
    crc32c: int = 0,
    slices: Sequence[Sequence[tuple[int, int]]] = (),
) -> bytes:
    """Serialises a BundleEntryProto exactly as protobuf does."""
    parts = [b"\x08" + encode_varint(dtype) if dtype else b"", encode_shape(shape)]
    if shard_id:
        parts.append(b"\x18" + encode_varint(shard_id))
    if offset:
        parts.append(b"\x20" + encode_varint(offset))
    if size:
        parts.append(b"\x28" + encode_varint(size))
    if crc32c:
        parts.append(b"\x35" + FIXED32.pack(crc32c))
    for extents in slices:
        body = _slices.encode_slice_proto(extents)
        parts.append(b"\x3a" + encode_varint(len(body)) + body)
    return b"".join(parts)


def encode_entries(
    entries: Iterable[tuple[int, tuple[int, ...], int, int, int]], shard_id: int = 0
) -> list[bytes]:
    """Encodes many unsliced entries ``(dtype, shape, offset, size, masked crc)`` at once.

    The same bytes as :func:`encode_entry`, with the dtype-and-shape head of
    each distinct (dtype, shape) encoded once.
    """
    heads: dict[tuple[int, tuple[int, ...]], bytes] = {}
    shard = b"\x18" + encode_varint(shard_id) if shard_id else b""
    pack = FIXED32.pack
    varint = encode_varint
    out = []
    append = out.append
    for dtype, shape, offset, size, checksum in entries:
        head = heads.get((dtype, shape))
        if head is None:
            head = heads[(dtype, shape)] = (b"\x08" + varint(dtype) if dtype else b"") + encode_shape(shape) + shard
        append(
            head
            + (b"\x20" + varint(offset) if offset else b"")
            + (b"\x28" + varint(size) if size else b"")
            + (b"\x35" + pack(checksum) if checksum else b"")
        )
    return out


def _skip(data: bytes, tag: int, pos: int, end: int) -> int:
    return _slices._skip_field(data, tag, pos, end)


def _decode_shape(data: bytes, pos: int, end: int) -> tuple[int, ...]:
    dims: list[int] = []
    while pos < end:
        tag, pos = decode_varint(data, pos, end)
        if tag == 0x12:
            n, pos = decode_varint(data, pos, end)
            stop = pos + n
            if stop > end:
                raise Malformed("truncated shape dim")
            size = 0
            while pos < stop:
                t, pos = decode_varint(data, pos, stop)
                if t == 0x08:
                    v, pos = decode_varint(data, pos, stop)
                    size = v - (1 << 64) if v >> 63 else v
                else:
                    pos = _skip(data, t, pos, stop)
            dims.append(size)
        else:
            pos = _skip(data, tag, pos, end)
    if len(dims) > MAX_RANK:
        raise Malformed(f"invalid tensor shape: rank {len(dims)} exceeds {MAX_RANK}")
    total = 1
    for d in dims:
        if d < 0:
            raise Malformed(f"invalid tensor shape {dims}: negative dimension")
        total *= d
        if total > _INT64_MAX:
            raise Malformed(f"invalid tensor shape {dims}: element count overflows")
    return tuple(dims)


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 56:
            raise IndexError  # too long for the fast path


def _decode_common(data: bytes) -> BundleEntry | None:
    """The layout every writer emits (fields 1..6 in order, no slices), decoded fast.

    Returns None for anything else, which then takes the general decoder.
    """
    try:
        pos, end = 0, len(data)
        dtype = 0
        if data[0] == 0x08:
            dtype = data[1]
            if dtype & 0x80:
                return None
            pos = 2
        if data[pos] != 0x12:
            return None
        shape_len = data[pos + 1]
        if shape_len & 0x80:
            return None
        pos += 2
        stop = pos + shape_len
        dims = []
        total = 1
        while pos < stop:
            dim_len = data[pos + 1]
            if data[pos] != 0x12 or dim_len & 0x80:
                return None
            if dim_len == 0:
                dims.append(0)
                total = 0
                pos += 2
                continue
            if data[pos + 2] != 0x08:
                return None
            size, after = _varint_at(data, pos + 3)
            if after != pos + 2 + dim_len or size >> 62:
                return None
            dims.append(size)
            total *= size
            if total > _INT64_MAX:
                return None
            pos = after
        if pos != stop or len(dims) > MAX_RANK or total > _INT64_MAX:
            return None
        shard = offset = size = checksum = 0
        if pos < end and data[pos] == 0x18:
            shard, pos = _varint_at(data, pos + 1)
        if pos < end and data[pos] == 0x20:
            offset, pos = _varint_at(data, pos + 1)
        if pos < end and data[pos] == 0x28:
            size, pos = _varint_at(data, pos + 1)
        if pos < end and data[pos] == 0x35:
            if pos + 5 > end:
                return None
            checksum = FIXED32.unpack_from(data, pos + 1)[0]
            pos += 5
        if pos != end or shard >> 31 or offset > _INT64_MAX or size > _INT64_MAX:
            return None
        return BundleEntry(dtype, tuple(dims), shard, offset, size, checksum)
    except IndexError:
        return None


def decode_entry(data: bytes) -> BundleEntry:
    """Parses a BundleEntryProto.

    Raises:
        Malformed: the bytes are not a valid entry.
    """
    common = _decode_common(data) if data else None
    if common is not None:
        return common
    entry = BundleEntry(0, ())
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = decode_varint(data, pos, end)
        if tag == 0x08:
            entry.dtype, pos = decode_varint(data, pos, end)
        elif tag == 0x12:
            n, pos = decode_varint(data, pos, end)
            if pos + n > end:
                raise Malformed("truncated entry shape")
            entry.shape = _decode_shape(data, pos, pos + n)
            pos += n
        elif tag == 0x18:
            entry.shard_id, pos = decode_varint(data, pos, end, 32)
        elif tag == 0x20:
            entry.offset, pos = decode_varint(data, pos, end)
        elif tag == 0x28:
            entry.size, pos = decode_varint(data, pos, end)
        elif tag == 0x35:
            if pos + 4 > end:
                raise Malformed("truncated entry crc32c")
            entry.crc32c = FIXED32.unpack_from(data, pos)[0]
            pos += 4
        elif tag == 0x3A:
            n, pos = decode_varint(data, pos, end)
            if pos + n > end:
                raise Malformed("truncated entry slice")
            entry.slices.append(_slices.decode_slice_proto(data[pos : pos + n]))
            pos += n
        else:
            pos = _skip(data, tag, pos, end)
    if entry.offset > _INT64_MAX or entry.size > _INT64_MAX or entry.shard_id >> 31:
        raise Malformed("entry offset, size or shard id out of range")
    for extents in entry.slices:
        try:
            _slices.check_fits(entry.shape, extents, "stored slice")
        except ValueError as e:
            raise Malformed(str(e)) from None
        for start, length in extents:
            if start < 0 or length < -1 or (length == -1 and start != 0):
                raise Malformed(f"invalid stored slice extent {start},{length}")
    return entry


def encode_header(num_shards: int) -> bytes:
    """The header TensorFlow's writer emits: ``num_shards``, little-endian, version {producer: 1}."""
    out = b""
    if num_shards:
        out += b"\x08" + encode_varint(num_shards)
    return out + b"\x1a\x02\x08" + encode_varint(FORMAT_VERSION)


def decode_header(data: bytes) -> BundleHeader:
    """Parses a BundleHeaderProto and checks its version as TensorFlow does.

    Raises:
        Malformed: undecodable bytes.
        UnsupportedVersionError: written for a newer reader than this one.
    """
    from gpusaver.errors import UnsupportedVersionError

    header = BundleHeader(num_shards=0, producer=0)
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = decode_varint(data, pos, end)
        if tag == 0x08:
            v, pos = decode_varint(data, pos, end)
            header.num_shards = v - (1 << 64) if v >> 63 else v
        elif tag == 0x10:
            header.endianness, pos = decode_varint(data, pos, end)
        elif tag == 0x1A:
            n, pos = decode_varint(data, pos, end)
            stop = pos + n
            if stop > end:
                raise Malformed("truncated header version")
            header.version_bytes = bytes(data[pos:stop])
            while pos < stop:
                t, pos = decode_varint(data, pos, stop)
                if t == 0x08:
                    v, pos = decode_varint(data, pos, stop)
                    header.producer = v - (1 << 64) if v >> 63 else v
                elif t == 0x10:
                    v, pos = decode_varint(data, pos, stop)
                    header.min_consumer = v - (1 << 64) if v >> 63 else v
                elif t == 0x18:
                    v, pos = decode_varint(data, pos, stop)
                    header.bad_consumers.append(v)
                elif t == 0x1A:  # packed repeated
                    n2, pos = decode_varint(data, pos, stop)
                    s2 = pos + n2
                    if s2 > stop:
                        raise Malformed("truncated bad_consumers")
                    while pos < s2:
                        v, pos = decode_varint(data, pos, s2)
                        header.bad_consumers.append(v)
                else:
                    pos = _skip(data, t, pos, stop)
        else:
            pos = _skip(data, tag, pos, end)
    if header.num_shards <= 0 or header.num_shards >> 31:
        raise Malformed(f"invalid num_shards {header.num_shards} in the checkpoint header")
    if header.endianness not in (0, 1):
        raise Malformed(f"invalid endianness {header.endianness} in the checkpoint header")
    if header.producer < 0:
        raise UnsupportedVersionError(f"invalid checkpoint producer version {header.producer}")
    if header.min_consumer > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"checkpoint min consumer version {header.min_consumer} is above this reader's "
            f"version {FORMAT_VERSION}: it was written by a newer format; upgrade gpusaver"
        )
    if FORMAT_VERSION in header.bad_consumers:
        raise UnsupportedVersionError(f"checkpoint disallows reader version {FORMAT_VERSION}")
    return header
