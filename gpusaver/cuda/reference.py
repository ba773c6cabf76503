"""CPU reference for the CUDA kernels: what tests compare the device results against.

The functions here define what ``kernels/pack.cu`` and ``kernels/crc32c.cu``
compute, using NumPy and the ``crc32c`` package only. Nothing in the package
imports this module; the crc32c algebra lives in :mod:`gpusaver.format.crc`
and the kernel's tables in :mod:`gpusaver.cuda.kernels`.

* :func:`pack_ref` / :func:`unpack_ref`: gather ranges into a staging buffer
  and scatter them back.
* :func:`crc32c_ranges_ref`: the plain (or masked) crc32c of each range.
* :func:`crc32c_chunked_ref`: a CPU model of the kernel's chunked algorithm,
  built on :func:`gpusaver.cuda.kernels.crc32c_tables` (notation: :mod:`gpusaver.format.crc`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import crc32c as _crc32c
import numpy as np

from gpusaver.cuda.kernels import SHIFT_LEVELS, crc32c_tables, slicing_tables
from gpusaver.format.crc import mask

__all__ = ["crc32c_chunked_ref", "crc32c_ranges_ref", "pack_ref", "unpack_ref"]

_U32 = 0xFFFFFFFF

Buffer = bytes | bytearray | memoryview | np.ndarray
"""Anything exposing contiguous bytes through the buffer protocol."""

_Operator = tuple[int, ...]


def _as_bytes(buf: Buffer) -> np.ndarray:
    """Returns a flat uint8 view of a C-contiguous buffer."""
    arr = np.asarray(memoryview(buf)) if not isinstance(buf, np.ndarray) else buf
    if not arr.flags.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return arr.reshape(-1).view(np.uint8)


def _check_ranges(offsets: Sequence[int], sizes: Sequence[int], limit: int, what: str) -> None:
    """Raises ValueError unless every range lies in [0, limit) and none overlap."""
    spans = []
    for i, (off, size) in enumerate(zip(offsets, sizes)):
        if off < 0 or size < 0 or off + size > limit:
            raise ValueError(
                f"range {i} ({size} bytes at offset {off}) does not fit in the {limit}-byte {what}"
            )
        if size:
            spans.append((off, off + size, i))
    spans.sort()
    for (_, end, i), (start, _, j) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"ranges {i} and {j} overlap in the {what}")


def pack_ref(sources: Sequence[Buffer], staging: np.ndarray, offsets: Sequence[int]) -> None:
    """Copies each source's bytes into ``staging`` at its offset.

    Args:
        sources: C-contiguous buffers (any dtype); source i contributes all of
            its bytes.
        staging: a writable uint8 array, the destination.
        offsets: byte offset in ``staging`` of each source.

    Raises:
        ValueError: lengths differ, a range does not fit, or ranges overlap.
    """
    if len(sources) != len(offsets):
        raise ValueError(f"{len(sources)} sources but {len(offsets)} offsets")
    views = [_as_bytes(s) for s in sources]
    stage = _as_bytes(staging)
    _check_ranges(offsets, [v.size for v in views], stage.size, "staging buffer")
    for view, off in zip(views, offsets):
        stage[off : off + view.size] = view


def unpack_ref(staging: Buffer, destinations: Sequence[np.ndarray], offsets: Sequence[int]) -> None:
    """Fills each destination with its bytes from ``staging``.

    Args:
        staging: the source bytes.
        destinations: writable C-contiguous arrays (any dtype); destination i
            receives ``destinations[i].nbytes`` bytes.
        offsets: byte offset in ``staging`` of each destination's bytes.

    Raises:
        ValueError: lengths differ or a range does not fit.
    """
    if len(destinations) != len(offsets):
        raise ValueError(f"{len(destinations)} destinations but {len(offsets)} offsets")
    stage = _as_bytes(staging)
    views = [_as_bytes(d) for d in destinations]
    sizes = [v.size for v in views]
    for i, (off, size) in enumerate(zip(offsets, sizes)):
        if off < 0 or off + size > stage.size:
            raise ValueError(
                f"range {i} ({size} bytes at offset {off}) does not fit in the "
                f"{stage.size}-byte staging buffer"
            )
    for view, off in zip(views, offsets):
        view[:] = stage[off : off + view.size]


def crc32c_ranges_ref(ranges: Sequence[Buffer], *, masked: bool = False) -> np.ndarray:
    """Returns the crc32c of every buffer, like the device kernel.

    Args:
        ranges: the byte ranges.
        masked: apply :func:`crc32c_mask` to every crc.

    Returns:
        A uint32 array with one crc per range.
    """
    out = np.empty(len(ranges), dtype=np.uint32)
    for i, buf in enumerate(ranges):
        crc = _crc32c.crc32c(_as_bytes(buf))
        out[i] = mask(crc) if masked else crc
    return out


def _apply_byte_tables(tables: np.ndarray, v: int) -> int:
    """Applies an operator stored as (4, 256) byte tables."""
    return int(
        tables[0, v & 0xFF]
        ^ tables[1, (v >> 8) & 0xFF]
        ^ tables[2, (v >> 16) & 0xFF]
        ^ tables[3, v >> 24]
    )


def _raw_slicing(register: int, data: np.ndarray) -> int:
    """``raw(register, data)`` with the slicing tables, one byte at a time."""
    t0 = slicing_tables()[0]
    for byte in data.tolist():
        register = (register >> 8) ^ int(t0[(register ^ byte) & 0xFF])
    return register


def crc32c_chunked_ref(data: Buffer, chunk_bytes: int, *, use_slicing: bool = False) -> int:
    """Computes crc32c exactly the way ``gs_crc32c_chunks`` does, on the CPU.

    The range is cut into chunks aligned to its end, each chunk's raw crc is
    shifted by its distance from the end with the table operators of
    :func:`crc32c_tables`, and the terms are XORed (see ``kernels/crc32c.cu``).

    Args:
        data: the bytes.
        chunk_bytes: the chunk size C.
        use_slicing: compute the per-chunk raw crcs with the kernel's byte
            table instead of the ``crc32c`` package (slow; small inputs only).

    Returns:
        The plain crc32c of ``data``.
    """
    buf = _as_bytes(data)
    size = buf.size
    if size == 0:
        return 0
    k = -(-size // chunk_bytes)
    levels = max(1, (k - 1).bit_length())
    shifts = crc32c_tables(chunk_bytes, max(levels, SHIFT_LEVELS))[2048:].reshape(-1, 4, 256)
    first = size - (k - 1) * chunk_bytes
    out = 0
    for j in range(k):
        if j == 0:
            piece, init = buf[:first], _U32
        else:
            start = first + (j - 1) * chunk_bytes
            piece, init = buf[start : start + chunk_bytes], 0
        if use_slicing:
            term = _raw_slicing(init, piece)
        else:
            term = _crc32c.crc32c(piece, value=init ^ _U32) ^ _U32
        e = k - 1 - j
        level = 0
        while e:
            if e & 1:
                term = _apply_byte_tables(shifts[level], term)
            e >>= 1
            level += 1
        if j == 0:
            term ^= _U32
        out ^= term
    return out
