"""Partitioned tensors: slice specs, slice protos and the ordered-code slice keys.

A slice is a list of ``(start, length)`` extents, one per dimension, where
``length == -1`` means the whole dimension. Specs are written as TensorFlow
writes them, e.g. ``"0,5:-"``; a ``shape_and_slice`` string prefixes the full
shape, e.g. ``"10 4 0,5:-"``.
"""

from __future__ import annotations

import re
from typing import Sequence

from gpusaver.errors import InvalidArgumentError
from gpusaver.format.wire import Malformed, decode_varint, encode_varint

__all__ = [
    "Extent",
    "parse_slice_spec",
    "parse_shape_and_slice",
    "format_slice_spec",
    "normalize",
    "is_full",
    "slice_shape",
    "encode_slice_proto",
    "decode_slice_proto",
    "encode_slice_key",
]

Extent = tuple[int, int]  # (start, length); length -1 = the whole dimension

_H1 = (0x00, 0x80, 0xC0, 0xE0, 0xF0, 0xF8, 0xFC, 0xFE, 0xFF, 0xFF, 0xFF)
_H2 = (0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0xC0)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def parse_slice_spec(spec: str) -> list[Extent]:
    """Parses ``"0,5:-"`` into ``[(0, 5), (0, -1)]``.

    Raises:
        ValueError: a malformed spec.
    """
    extents: list[Extent] = []
    for piece in spec.split(":"):
        if not piece:
            continue
        if piece == "-":
            extents.append((0, -1))
            continue
        parts = piece.split(",")
        if len(parts) != 2:
            raise InvalidArgumentError(f"invalid slice spec {spec!r}: expected 'start,length' or '-', got {piece!r}")
        try:
            start, length = int(parts[0]), int(parts[1])
        except ValueError:
            raise InvalidArgumentError(f"invalid slice spec {spec!r}: {piece!r} is not two integers") from None
        if start < 0 or length <= 0 or start + length > _INT64_MAX:
            raise InvalidArgumentError(f"invalid slice spec {spec!r}: need start >= 0 and length > 0 in {piece!r}")
        extents.append((start, length))
    return extents


def parse_shape_and_slice(text: str) -> tuple[list[int], list[Extent]]:
    """Parses ``"10 4 0,5:-"`` into the full shape and the slice.

    Raises:
        ValueError: malformed text, or a slice that does not fit the shape.
    """
    tokens = text.split(" ")
    if len(tokens) < 2:
        raise InvalidArgumentError(f"invalid shape_and_slice {text!r}: need 'dims... slice'")
    try:
        shape = [int(t) for t in tokens[:-1]]
    except ValueError:
        raise InvalidArgumentError(f"invalid shape_and_slice {text!r}: bad dimension") from None
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(f"invalid shape_and_slice {text!r}: negative dimension")
    extents = parse_slice_spec(tokens[-1])
    check_fits(shape, extents, text)
    return shape, extents


def check_fits(shape: Sequence[int], extents: Sequence[Extent], what: str = "slice") -> None:
    """Raises ValueError unless ``extents`` has one extent per dim, inside the shape."""
    if len(extents) != len(shape):
        raise InvalidArgumentError(f"{what}: slice has {len(extents)} dims but the shape has {len(shape)}")
    for dim, (start, length) in zip(shape, extents):
        if length != -1 and start + length > dim:
            raise InvalidArgumentError(f"{what}: extent {start},{length} exceeds dimension {dim}")


def format_slice_spec(extents: Sequence[Extent]) -> str:
    """The inverse of :func:`parse_slice_spec`."""
    return ":".join("-" if length == -1 else f"{start},{length}" for start, length in extents)


def normalize(shape: Sequence[int], extents: Sequence[Extent]) -> list[tuple[int, int]]:
    """Concrete ``(start, stop)`` per dimension."""
    return [(0, dim) if length == -1 else (start, start + length) for dim, (start, length) in zip(shape, extents)]


def is_full(shape: Sequence[int], extents: Sequence[Extent]) -> bool:
    """True when the slice covers the whole tensor."""
    return all(length == -1 or (start == 0 and length == dim) for dim, (start, length) in zip(shape, extents))


def slice_shape(shape: Sequence[int], extents: Sequence[Extent]) -> list[int]:
    """The shape of the slice's tensor."""
    return [stop - start for start, stop in normalize(shape, extents)]


def _zigzag_free_int64(value: int) -> bytes:
    # int64 fields are varints of the two's complement value.
    return encode_varint(value & 0xFFFFFFFFFFFFFFFF)


def encode_slice_proto(extents: Sequence[Extent]) -> bytes:
    """Serialises a TensorSliceProto as TensorFlow does (a full dim is an empty Extent)."""
    out = bytearray()
    for start, length in extents:
        if length == -1 and start == 0:
            out += b"\x0a\x00"
            continue
        body = bytearray()
        if start:
            body += b"\x08" + _zigzag_free_int64(start)
        if length != -1:
            body += b"\x10" + _zigzag_free_int64(length)
        out += b"\x0a" + encode_varint(len(body)) + body
    return bytes(out)


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def decode_slice_proto(data: bytes) -> list[Extent]:
    """Parses a TensorSliceProto into extents (a missing length is -1).

    Raises:
        Malformed: the bytes are not a TensorSliceProto.
    """
    extents: list[Extent] = []
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = decode_varint(data, pos, end)
        if tag != 0x0A:
            pos = _skip_field(data, tag, pos, end)
            continue
        n, pos = decode_varint(data, pos, end)
        if pos + n > end:
            raise Malformed("truncated slice extent")
        start, length = 0, -1
        p, e = pos, pos + n
        while p < e:
            t, p = decode_varint(data, p, e)
            if t == 0x08:
                v, p = decode_varint(data, p, e)
                start = _as_int64(v)
            elif t == 0x10:
                v, p = decode_varint(data, p, e)
                length = _as_int64(v)
            else:
                p = _skip_field(data, t, p, e)
        extents.append((start, length))
        pos = e
    return extents


def _skip_field(data: bytes | memoryview, tag: int, pos: int, end: int) -> int:
    wire_type = tag & 7
    if wire_type == 0:
        return decode_varint(data, pos, end)[1]
    if wire_type == 1:
        pos += 8
    elif wire_type == 2:
        n, pos = decode_varint(data, pos, end)
        pos += n
    elif wire_type == 5:
        pos += 4
    else:
        raise Malformed(f"unsupported protobuf wire type {wire_type}")
    if pos > end:
        raise Malformed("truncated protobuf field")
    return pos


def _num_increasing(value: int) -> bytes:
    n = (value.bit_length() + 7) // 8
    return bytes((n,)) + value.to_bytes(n, "big")


def _signed_num_increasing(value: int) -> bytes:
    x = value if value >= 0 else ~value
    if x < 64:
        return bytes(((0x80 ^ value) & 0xFF,))
    n = 2
    while x >= 1 << (7 * n - 1):
        n += 1
    raw = bytearray((value & ((1 << 80) - 1)).to_bytes(10, "big")[10 - n :])
    raw[0] ^= _H1[n]
    raw[1] ^= _H2[n]
    return bytes(raw)


_ESCAPE_RE = re.compile(b"[\\x00\\xff]")


def _escape_byte(match: "re.Match[bytes]") -> bytes:
    return b"\x00\xff" if match.group() == b"\x00" else b"\xff\x00"


def encode_slice_key(name: str | bytes, extents: Sequence[Extent]) -> bytes:
    """The table key of one stored slice of tensor ``name``."""
    raw = name.encode("utf-8") if isinstance(name, str) else bytes(name)
    escaped = _ESCAPE_RE.sub(_escape_byte, raw)
    out = [_num_increasing(0), escaped, b"\x00\x01", _num_increasing(len(extents))]
    for start, length in extents:
        if not (_INT64_MIN <= start <= _INT64_MAX and _INT64_MIN <= length <= _INT64_MAX):
            raise InvalidArgumentError(f"slice extent {start},{length} out of int64 range")
        out.append(_signed_num_increasing(start))
        out.append(_signed_num_increasing(length))
    return b"".join(out)
