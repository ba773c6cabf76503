"""How one tensor's values become the bytes of a data file, and back.

Numeric and bool tensors are their raw little-endian element bytes in C order;
strings are varint lengths, a masked crc of the lengths, then the bytes (see
the format spec, section 5.3).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from gpusaver.errors import ChecksumError, CorruptCheckpointError, UnsupportedDTypeError
from gpusaver.format import crc, dtypes
from gpusaver.format.wire import FIXED32, Malformed, decode_varint, encode_varint

__all__ = ["as_host_array", "byte_view", "empty_array", "encode_strings", "decode_strings", "verify_strings"]

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def as_host_array(value: Any, name: str | None = None) -> np.ndarray:
    """Returns ``value`` as a C-contiguous little-endian NumPy array (no copy when it is one).

    Raises:
        UnsupportedDTypeError: not an array, or a dtype the format cannot hold.
    """
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, (bytes, str)) or np.isscalar(value):
        arr = np.asarray(value, dtype=object if isinstance(value, (bytes, str)) else None)
    elif hasattr(value, "__array_interface__") or isinstance(value, (list, tuple)):
        arr = np.asarray(value)
    else:
        raise UnsupportedDTypeError(
            f"tensor {name!r} is a {type(value).__module__}.{type(value).__qualname__}; "
            "gpusaver saves NumPy and CuPy arrays"
        )
    if arr.dtype.kind in "SU":
        arr = arr.astype(object)
    dtypes.from_numpy(arr.dtype, tensor=name)  # validates
    if arr.dtype.kind != "O" and arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # ascontiguousarray makes 0-d arrays 1-d
    return arr


def empty_array(shape: tuple[int, ...], dtype: np.dtype, name: str, path: str) -> np.ndarray:
    """A new uninitialised array to read a stored tensor into.

    A tensor TensorFlow can hold may be one NumPy cannot make: a shape whose nonzero
    dimensions times the item size pass NumPy's largest size (a zero-element
    ``[0, 2**61]`` float32 tensor, which holds no values), or more dimensions than
    NumPy allows (TensorFlow allows 254). Such a tensor is valid; it cannot be read.

    Raises:
        UnsupportedDTypeError: NumPy cannot make an array of this shape and dtype
            (naming the tensor, the file and NumPy's reason).
    """
    try:
        return np.empty(shape, dtype=dtype)
    except ValueError as e:
        raise UnsupportedDTypeError(
            f"cannot read tensor {name!r} of {path!r} as a NumPy array: NumPy cannot make a {dtype} array "
            f"of shape {list(shape)} ({str(e).rstrip('.')}); the checkpoint itself is valid, and list_variables() or "
            "'gpusaver inspect' show the tensor's dtype and shape"
        ) from None


def byte_view(arr: np.ndarray) -> memoryview:
    """A flat byte memoryview of a C-contiguous numeric array (no copy)."""
    return memoryview(arr.reshape(-1).view(np.uint8))


def _as_bytes(item: Any, name: str | None) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (bytearray, memoryview, np.bytes_)):
        return bytes(item)
    raise UnsupportedDTypeError(
        f"string tensor {name!r} holds a {type(item).__name__}; string tensors hold bytes or str"
    )


def encode_strings(arr: np.ndarray, name: str | None = None) -> tuple[bytes, int]:
    """Encodes an object array of bytes; returns ``(data, unmasked crc32c)``."""
    items = [_as_bytes(x, name) for x in arr.reshape(-1).tolist()]
    lengths = [len(b) for b in items]
    len_crc = 0
    for n in lengths:
        len_crc = crc.extend(len_crc, _U32.pack(n) if n <= 0xFFFFFFFF else _U64.pack(n))
    masked = FIXED32.pack(crc.mask(len_crc))
    head = b"".join(encode_varint(n) for n in lengths) + masked
    body = b"".join(items)
    total = crc.extend(crc.extend(len_crc, masked), body)
    return head + body, total


def decode_strings(
    buf: bytes | memoryview, shape: tuple[int, ...], expected_crc: int, path: str, name: str
) -> np.ndarray:
    """Decodes and verifies a string tensor's bytes.

    Raises:
        CorruptCheckpointError: malformed bytes.
        ChecksumError: the lengths' or the tensor's crc32c does not match.
        UnsupportedDTypeError: a valid tensor whose shape NumPy cannot make (see :func:`empty_array`).
    """
    lengths, pos = _checked_lengths(buf, shape, expected_crc, path, name)
    out = empty_array(shape, dtypes.OBJECT, name, path)
    flat = out.reshape(-1)
    mv = memoryview(buf)
    for i, n in enumerate(lengths):
        flat[i] = bytes(mv[pos : pos + n])
        pos += n
    return out


def verify_strings(buf: bytes | memoryview, shape: tuple[int, ...], expected_crc: int, path: str, name: str) -> None:
    """Every check :func:`decode_strings` makes, without making the array.

    Raises:
        CorruptCheckpointError: malformed bytes.
        ChecksumError: the lengths' or the tensor's crc32c does not match.
    """
    _checked_lengths(buf, shape, expected_crc, path, name)


def _checked_lengths(
    buf: bytes | memoryview, shape: tuple[int, ...], expected_crc: int, path: str, name: str
) -> tuple[list[int], int]:
    """The strings' lengths and where their bytes start, every crc32c checked."""
    count = 1
    for d in shape:
        count *= d
    end = len(buf)
    pos = 0
    lengths = []
    len_crc = 0
    try:
        for _ in range(count):
            n, pos = decode_varint(buf, pos, end)
            lengths.append(n)
            len_crc = crc.extend(len_crc, _U32.pack(n) if n <= 0xFFFFFFFF else _U64.pack(n))
    except Malformed:
        raise CorruptCheckpointError(
            f"string tensor {name!r} in {path!r} has malformed lengths", path
        ) from None
    if pos + 4 > end:
        raise CorruptCheckpointError(f"string tensor {name!r} in {path!r} is truncated", path)
    stored_len_crc = crc.unmask(FIXED32.unpack_from(buf, pos)[0])
    if stored_len_crc != len_crc:
        raise ChecksumError(path, name, stored_len_crc, len_crc, what="string lengths")
    running = crc.extend(len_crc, buf[pos : pos + 4])
    pos += 4
    if pos + sum(lengths) != end:
        raise CorruptCheckpointError(
            f"string tensor {name!r} in {path!r}: lengths add up to {sum(lengths)} bytes "
            f"but the entry holds {end - pos}",
            path,
        )
    actual = crc.extend(running, buf[pos:end])
    if actual != expected_crc:
        raise ChecksumError(path, name, expected_crc, actual)
    return lengths, pos
