"""CPU reference for the CUDA kernels, and the crc32c algebra they rely on.

The functions here define what ``kernels/pack.cu`` and ``kernels/crc32c.cu``
compute, using NumPy and the ``crc32c`` package only, so tests can compare the
device results against them and the host can use the same arithmetic:

* :func:`pack_ref` / :func:`unpack_ref`: gather ranges into a staging buffer
  and scatter them back.
* :func:`crc32c_ranges_ref`: the plain crc32c of each range.
* :func:`crc32c_combine`: the crc32c of ``A + B`` from the crc32c of ``A``, the
  crc32c of ``B`` and ``len(B)`` (GF(2) matrix method).
* :func:`crc32c_mask` / :func:`crc32c_unmask`: the checkpoint format's masking.
* :func:`crc32c_tables`: the lookup tables the crc32c kernel takes as an
  argument (slicing-by-8 tables and the chunk-shift operators), and
  :func:`crc32c_chunked_ref`, a CPU model of the kernel's chunked algorithm
  built on those tables.

Notation: ``raw(v, D)`` is the crc register after feeding the bytes ``D`` into
register ``v`` without initial value or final xor, so
``crc32c(D) == raw(0xFFFFFFFF, D) ^ 0xFFFFFFFF``.  Feeding ``m`` zero bytes is
the GF(2)-linear map ``Z_m`` (multiplication by ``x^(8m)`` modulo the
polynomial).  An operator is stored as its 32 columns: ``op[i]`` is the image
of the register value ``1 << i``.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Sequence

import crc32c as _crc32c
import numpy as np

__all__ = [
    "CRC32C_POLY",
    "MASK_DELTA",
    "SHIFT_LEVELS",
    "chunk_starts",
    "crc32c_chunked_ref",
    "crc32c_combine",
    "crc32c_mask",
    "crc32c_ranges_ref",
    "crc32c_shift",
    "crc32c_tables",
    "crc32c_unmask",
    "pack_ref",
    "slicing_tables",
    "unpack_ref",
]

#: Reflected Castagnoli polynomial.
CRC32C_POLY = 0x82F63B78
#: The constant the checkpoint format adds after rotating a crc (kMaskDelta).
MASK_DELTA = 0xA282EAD8
#: Shift operators in the kernel's table: ranges may span up to
#: ``2**SHIFT_LEVELS`` chunks.
SHIFT_LEVELS = 40

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
        out[i] = crc32c_mask(crc) if masked else crc
    return out


def crc32c_mask(crc: int) -> int:
    """The format's Mask: rotate right by 15, add 0xA282EAD8 (mod 2**32)."""
    crc &= _U32
    return ((((crc >> 15) | (crc << 17)) & _U32) + MASK_DELTA) & _U32


def crc32c_unmask(masked: int) -> int:
    """Inverse of :func:`crc32c_mask`."""
    rot = (masked - MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


# --- GF(2) operators -------------------------------------------------------


def _apply(op: _Operator, vec: int) -> int:
    """Applies a 32x32 GF(2) operator (32 columns) to a 32-bit vector."""
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= op[i]
        vec >>= 1
        i += 1
    return out


def _compose(outer: _Operator, inner: _Operator) -> _Operator:
    """The operator ``outer(inner(v))``."""
    return tuple(_apply(outer, col) for col in inner)


_ONE_ZERO_BIT: _Operator = (CRC32C_POLY, *(1 << (i - 1) for i in range(1, 32)))
_POWERS_LOCK = threading.Lock()
_ZERO_BYTE_POWERS: list[_Operator] = []  # [k] = Z_{2**k}


def _zero_bytes_power(k: int) -> _Operator:
    """Returns ``Z_{2**k}``, the operator feeding ``2**k`` zero bytes."""
    with _POWERS_LOCK:
        if not _ZERO_BYTE_POWERS:
            op = _ONE_ZERO_BIT
            for _ in range(3):
                op = _compose(op, op)
            _ZERO_BYTE_POWERS.append(op)
        while len(_ZERO_BYTE_POWERS) <= k:
            last = _ZERO_BYTE_POWERS[-1]
            _ZERO_BYTE_POWERS.append(_compose(last, last))
        return _ZERO_BYTE_POWERS[k]


def _zero_bytes_operator(nbytes: int) -> _Operator:
    """Returns ``Z_nbytes`` as 32 columns."""
    op: _Operator = tuple(1 << i for i in range(32))
    k = 0
    while nbytes:
        if nbytes & 1:
            op = _compose(_zero_bytes_power(k), op)
        nbytes >>= 1
        k += 1
    return op


def crc32c_shift(register: int, nbytes: int) -> int:
    """Returns ``Z_nbytes(register)``: the raw register after ``nbytes`` zeros.

    Args:
        register: a raw crc register value (no final xor applied).
        nbytes: how many zero bytes to feed; must be >= 0.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    register &= _U32
    k = 0
    while nbytes and register:
        if nbytes & 1:
            register = _apply(_zero_bytes_power(k), register)
        nbytes >>= 1
        k += 1
    return register


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """Returns ``crc32c(A + B)`` given ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``.

    Because ``raw`` is affine in the register,
    ``crc32c(A + B) = Z_len2(crc32c(A)) ^ crc32c(B)``: the initial value and
    the final xor cancel out.

    Args:
        crc1: crc32c of the first part.
        crc2: crc32c of the second part.
        len2: length in bytes of the second part.
    """
    return crc32c_shift(crc1, len2) ^ (crc2 & _U32)


# --- Kernel tables ---------------------------------------------------------


def _byte_tables(op: _Operator) -> np.ndarray:
    """Returns a (4, 256) table: row q, column b holds ``op(b << 8q)``."""
    cols = np.asarray(op, dtype=np.uint32)
    rows = []
    for q in range(4):
        table = np.zeros(1, dtype=np.uint32)
        for bit in range(8):
            table = np.concatenate([table, table ^ cols[8 * q + bit]])
        rows.append(table)
    return np.stack(rows)


@functools.cache
def slicing_tables() -> np.ndarray:
    """Returns the slicing-by-8 tables as a read-only (8, 256) uint32 array.

    ``T[0][b]`` is the classic byte table ``raw(b, one zero byte)``;
    ``T[k][b] = Z_k(T[0][b])``.
    """
    t0: np.ndarray = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t0 = (t0 >> 1) ^ np.where(t0 & 1, np.uint32(CRC32C_POLY), np.uint32(0))
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append((prev >> 8) ^ t0[prev & 0xFF])
    out = np.stack(tables).astype(np.uint32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def crc32c_tables(chunk_bytes: int, levels: int = SHIFT_LEVELS) -> np.ndarray:
    """Returns the table argument of the ``gs_crc32c_chunks`` kernel.

    Layout (uint32, read-only): the 2048 slicing-by-8 words, then for each
    level ``l < levels`` the (4, 256) byte tables of ``Z_{chunk_bytes * 2**l}``.

    Args:
        chunk_bytes: the kernel's chunk size C.
        levels: number of shift operators; ranges may span up to
            ``2**levels`` chunks.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    parts = [slicing_tables().reshape(-1)]
    op = _zero_bytes_operator(chunk_bytes)
    for _ in range(levels):
        parts.append(_byte_tables(op).reshape(-1))
        op = _compose(op, op)
    out = np.concatenate(parts).astype(np.uint32)
    out.flags.writeable = False
    return out


def chunk_starts(sizes: np.ndarray, chunk_bytes: int) -> np.ndarray:
    """Returns the n + 1 exclusive prefix sums of ``ceil(sizes / chunk_bytes)``.

    Args:
        sizes: uint64 byte counts of the n ranges.
        chunk_bytes: chunk size (> 0).
    """
    sizes = np.asarray(sizes, dtype=np.uint64)
    counts = (sizes + np.uint64(chunk_bytes - 1)) // np.uint64(chunk_bytes)
    out = np.zeros(sizes.size + 1, dtype=np.uint64)
    np.cumsum(counts, out=out[1:])
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
