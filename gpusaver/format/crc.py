"""crc32c (Castagnoli) and the format's checksum masking.

The checksums are computed by the C-accelerated ``crc32c`` package (hardware
instructions where the CPU has them; the GIL is released for large buffers,
so checksums overlap with file I/O on other threads).
"""

from __future__ import annotations

from typing import Any

import crc32c as _crc32c
import numpy as np

__all__ = ["MASK_DELTA", "value", "extend", "mask", "unmask", "mask_array", "unmask_array"]

MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def value(data: Any) -> int:
    """Returns the crc32c of ``data`` (any C-contiguous buffer)."""
    return _crc32c.crc32c(data)


def extend(crc: int, data: Any) -> int:
    """Continues ``crc`` over the bytes of ``data``."""
    return _crc32c.crc32c(data, crc)


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
