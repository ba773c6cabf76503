"""Varints and fixed-width integers, with bounds checks that raise typed errors."""

from __future__ import annotations

import struct

from gpusaver.errors import CorruptCheckpointError

__all__ = ["Malformed", "encode_varint", "decode_varint", "FIXED32", "FIXED64"]

FIXED32 = struct.Struct("<I")
FIXED64 = struct.Struct("<Q")

_ONE_BYTE = [bytes((i,)) for i in range(128)]


class Malformed(CorruptCheckpointError):
    """Bytes that do not decode; callers re-raise with the file's name."""


def encode_varint(value: int) -> bytes:
    """Encodes a non-negative integer as an unsigned LEB128 varint."""
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int, end: int, limit_bits: int = 64) -> tuple[int, int]:
    """Decodes a varint at ``buf[pos:end]``.

    Returns:
        (value, position after the varint).

    Raises:
        Malformed: the varint runs past ``end`` or is longer than ``limit_bits``.
    """
    if pos >= end:
        raise Malformed("truncated varint")
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result = b & 0x7F
    shift = 7
    pos += 1
    while True:
        if pos >= end:
            raise Malformed("truncated varint")
        if shift >= limit_bits:
            raise Malformed("varint too long")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    if result >> limit_bits:
        raise Malformed("varint overflows %d bits" % limit_bits)
    return result, pos
