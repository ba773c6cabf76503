"""crc32c (Castagnoli), the format's checksum masking, and the crc algebra.

The checksums are computed by the C-accelerated ``crc32c`` package (hardware
instructions where the CPU has them; the GIL is released for large buffers,
so checksums overlap with file I/O on other threads). :func:`combine` gives the
crc32c of ``A + B`` from those of ``A`` and ``B`` (GF(2) matrix method), so parts
checksummed apart (on a GPU, on other threads) need no second pass.

Notation: ``raw(v, D)`` is the crc register after feeding the bytes ``D`` into
register ``v`` without initial value or final xor, so
``crc32c(D) == raw(0xFFFFFFFF, D) ^ 0xFFFFFFFF``.  Feeding ``m`` zero bytes is
the GF(2)-linear map ``Z_m`` (multiplication by ``x^(8m)`` modulo the
polynomial).  An operator is stored as its 32 columns: ``op[i]`` is the image
of the register value ``1 << i``.
"""

from __future__ import annotations

import threading
from typing import Any

import crc32c as _crc32c
import numpy as np

from gpusaver.errors import ChecksumError, InvalidArgumentError

__all__ = [
    "CRC32C_POLY", "MASK_DELTA", "Running", "check", "value", "extend", "mask", "unmask", "mask_array", "unmask_array",
    "shift", "combine",
]

#: Reflected Castagnoli polynomial.
CRC32C_POLY = 0x82F63B78
#: The constant the checkpoint format adds after rotating a crc (kMaskDelta).
MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
Operator = tuple[int, ...]


def value(data: Any) -> int:
    """Returns the crc32c of ``data`` (any C-contiguous buffer)."""
    return _crc32c.crc32c(data)


def extend(crc: int, data: Any) -> int:
    """Continues ``crc`` over the bytes of ``data``."""
    return _crc32c.crc32c(data, crc)


def check(actual: int, stored: int, path: str | None, name: str | None) -> None:
    """Raises ChecksumError unless ``actual`` (a plain crc32c) matches ``stored`` (as the format stores
    it: masked). Every tensor's verification ends here."""
    expected = unmask(stored)
    if actual != expected:
        raise ChecksumError(path, name, expected, actual)


class Running:
    """A tensor's crc32c over its bytes as they arrive in order; :meth:`check` compares it with the
    entry's (streamed reads: verify, the CLI, conversion, strided GPU restores)."""

    __slots__ = ("value", "stored", "path", "name")

    def __init__(self, stored: int, path: str | None, name: str | None) -> None:
        self.value, self.stored, self.path, self.name = 0, stored, path, name

    def update(self, data: Any) -> None:
        self.value = _crc32c.crc32c(data, self.value)

    def check(self) -> None:
        check(self.value, self.stored, self.path, self.name)


def mask(crc: int) -> int:
    """Masks a crc32c as the format stores it: rotate right 15, add a constant."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """Inverts :func:`mask`."""
    rot = (masked - MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def mask_array(crcs: np.ndarray) -> np.ndarray:
    """:func:`mask` of every crc in an array (uint32 arithmetic wraps as the format's does)."""
    c = crcs.astype(np.uint32, copy=False)
    return ((c >> np.uint32(15)) | (c << np.uint32(17))) + np.uint32(MASK_DELTA)


def unmask_array(masked: np.ndarray) -> np.ndarray:
    """:func:`unmask` of every crc in an array."""
    rot = masked.astype(np.uint32, copy=False) - np.uint32(MASK_DELTA)
    return (rot >> np.uint32(17)) | (rot << np.uint32(15))


# --- the crc algebra: GF(2) operators -------------------------------------


def _apply(op: Operator, vec: int) -> int:
    """Applies a 32x32 GF(2) operator (32 columns) to a 32-bit vector."""
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= op[i]
        vec >>= 1
        i += 1
    return out


def compose(outer: Operator, inner: Operator) -> Operator:
    """The operator ``outer(inner(v))``."""
    return tuple(_apply(outer, col) for col in inner)


_ONE_ZERO_BIT: Operator = (CRC32C_POLY, *(1 << (i - 1) for i in range(1, 32)))
_POWERS_LOCK = threading.Lock()
_ZERO_BYTE_POWERS: list[Operator] = []  # [k] = Z_{2**k}


def _zero_bytes_power(k: int) -> Operator:
    """Returns ``Z_{2**k}``, the operator feeding ``2**k`` zero bytes."""
    with _POWERS_LOCK:
        if not _ZERO_BYTE_POWERS:
            op = _ONE_ZERO_BIT
            for _ in range(3):
                op = compose(op, op)
            _ZERO_BYTE_POWERS.append(op)
        while len(_ZERO_BYTE_POWERS) <= k:
            last = _ZERO_BYTE_POWERS[-1]
            _ZERO_BYTE_POWERS.append(compose(last, last))
        return _ZERO_BYTE_POWERS[k]


def zero_bytes_operator(nbytes: int) -> Operator:
    """Returns ``Z_nbytes`` as 32 columns."""
    op: Operator = tuple(1 << i for i in range(32))
    k = 0
    while nbytes:
        if nbytes & 1:
            op = compose(_zero_bytes_power(k), op)
        nbytes >>= 1
        k += 1
    return op


def shift(register: int, nbytes: int) -> int:
    """Returns ``Z_nbytes(register)``: the raw register after ``nbytes`` zeros.

    Args:
        register: a raw crc register value (no final xor applied).
        nbytes: how many zero bytes to feed; must be >= 0.
    """
    if nbytes < 0:
        raise InvalidArgumentError(f"nbytes must be >= 0, got {nbytes}")
    register &= _U32
    k = 0
    while nbytes and register:
        if nbytes & 1:
            register = _apply(_zero_bytes_power(k), register)
        nbytes >>= 1
        k += 1
    return register


def combine(crc1: int, crc2: int, len2: int) -> int:
    """Returns ``crc32c(A + B)`` given ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``.

    Because ``raw`` is affine in the register,
    ``crc32c(A + B) = Z_len2(crc32c(A)) ^ crc32c(B)``: the initial value and
    the final xor cancel out.

    Args:
        crc1: crc32c of the first part.
        crc2: crc32c of the second part.
        len2: length in bytes of the second part.
    """
    return shift(crc1, len2) ^ (crc2 & _U32)
