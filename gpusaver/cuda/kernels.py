"""gpusaver's CUDA kernels: where their sources live, lazy compilation, launchers.

The kernels are plain ``.cu`` files (``kernels/`` in a source checkout, shipped
as ``gpusaver/kernels/`` in the wheel).  They are compiled with NVRTC through
:class:`cupy.RawModule` the first time a device needs them, once per device
(memoised, thread-safe), never at import time.  CuPy is imported inside the
functions that need it, so importing this module works without CuPy.

Launchers (all asynchronous on ``stream``, default: the current stream of the
device):

* :func:`pack`: gather many device byte ranges into one staging buffer.
* :func:`unpack`: scatter a staging buffer into many device byte ranges.
* :func:`crc32c_ranges`: crc32c of many device byte ranges.

Each launcher uploads its small argument table with one host-to-device copy
and launches one kernel (two for a masked crc).  The caller keeps every buffer
it names alive until the stream has finished with it.  Set the environment
variable ``GPUSAVER_KERNEL_SYNC=1`` to synchronise after every launch, so an
asynchronous kernel fault surfaces at the call that caused it.

The crc32c kernel's lookup tables are built here (:func:`crc32c_tables`); the
CPU reference for every kernel, which tests compare against, is in
:mod:`gpusaver.cuda.reference`.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from gpusaver import config
from gpusaver.format.crc import CRC32C_POLY, Operator, compose, zero_bytes_operator
from gpusaver.errors import BackendUnavailableError, InvalidArgumentError, InvalidArgumentTypeError

if TYPE_CHECKING:
    import cupy

__all__ = [
    "BLOCK_THREADS",
    "SHIFT_LEVELS",
    "chunk_starts",
    "crc32c_tables",
    "slicing_tables",
    "CRC_CHUNK_BYTES",
    "KERNELS",
    "PACK_CHUNK_BYTES",
    "DeviceRange",
    "Ranges",
    "clear_cache",
    "crc32c_ranges",
    "get_function",
    "get_module",
    "kernel_source_dir",
    "kernel_sources",
    "pack",
    "unpack",
]

#: Kernel entry points of each source file (``kernels/<name>.cu``).
KERNELS: dict[str, tuple[str, ...]] = {
    "pack": ("gs_pack", "gs_unpack"),
    "crc32c": ("gs_crc32c_chunks", "gs_crc32c_mask"),
}
#: Threads per block of every launch (a multiple of 32; the kernels'
#: ``__launch_bounds__``).
BLOCK_THREADS = 256
#: Bytes one warp copies per chunk in pack/unpack.
PACK_CHUNK_BYTES = 16 * 1024
#: Bytes one thread checksums per chunk in crc32c_ranges.
CRC_CHUNK_BYTES = 4 * 1024

_MAX_GRID = 1 << 16  # blocks; the kernels loop (grid-stride) beyond it
_NVRTC_OPTIONS = ("-std=c++17",)

DeviceRange = tuple[int, int]
"""A device byte range given as ``(device pointer, number of bytes)``."""

Source = Union["cupy.ndarray", DeviceRange]


class Ranges:
    """Many device byte ranges as two arrays, for :func:`pack` and :func:`unpack` without a Python
    object per range: ``ptrs[i]`` is the device address of range ``i``, ``sizes[i]`` its length."""

    __slots__ = ("ptrs", "sizes")

    def __init__(self, ptrs: Any, sizes: Any) -> None:
        self.ptrs = np.ascontiguousarray(ptrs, dtype=np.uint64).reshape(-1)
        signed = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if self.ptrs.size != signed.size:
            raise InvalidArgumentError(f"{self.ptrs.size} pointers but {signed.size} sizes")
        if np.any(signed < 0):
            raise InvalidArgumentError("range sizes must be >= 0")
        self.sizes = signed.astype(np.uint64)

    def __len__(self) -> int:
        return int(self.ptrs.size)

#: Shift operators in the crc32c kernel's table: ranges may span up to ``2**SHIFT_LEVELS`` chunks.
SHIFT_LEVELS = 40

_lock = threading.Lock()
# One lock per (source, device): several GPUs compile their modules at the same time.
_compile_locks: dict[tuple[str, int], threading.Lock] = {}
_modules: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}
_tables: dict[tuple[int, int], Any] = {}


# --- the crc32c kernel's tables (its CPU model is gpusaver.cuda.reference.crc32c_chunked_ref)


def _byte_tables(op: Operator) -> np.ndarray:
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
        raise InvalidArgumentError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    parts = [slicing_tables().reshape(-1)]
    op = zero_bytes_operator(chunk_bytes)
    for _ in range(levels):
        parts.append(_byte_tables(op).reshape(-1))
        op = compose(op, op)
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


def _cupy() -> Any:
    """Imports CuPy on first use, turning its absence into a gpusaver error."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            "the CUDA kernels need CuPy; install gpusaver[cuda12] or gpusaver[cuda13]"
        ) from exc
    return cupy


def kernel_source_dir() -> pathlib.Path:
    """Returns the directory holding the ``.cu`` kernel sources.

    An installed wheel has them in ``gpusaver/kernels/``; a source checkout or
    an editable install in ``<repo>/kernels/``.

    Raises:
        BackendUnavailableError: neither directory holds every kernel source.
    """
    package = pathlib.Path(__file__).resolve().parent.parent  # gpusaver/
    candidates = (package / "kernels", package.parent / "kernels")
    for candidate in candidates:
        if all((candidate / f"{name}.cu").is_file() for name in KERNELS):
            return candidate
    raise BackendUnavailableError(
        "gpusaver's CUDA kernel sources were not found in "
        + " or ".join(str(c) for c in candidates)
        + "; reinstall gpusaver"
    )


def kernel_sources() -> dict[str, str]:
    """Returns every kernel source, keyed by file stem (``"pack"``, ...)."""
    directory = kernel_source_dir()
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(directory.glob("*.cu"))}


def _device_id(device_id: int | None) -> int:
    return _cupy().cuda.Device().id if device_id is None else int(device_id)


def _load(name: str, device_id: int | None) -> tuple[Any, dict[str, Any]]:
    """Returns (module, {entry point: kernel}) for a source on a device."""
    if name not in KERNELS:
        raise InvalidArgumentError(f"unknown kernel source {name!r}; known: {sorted(KERNELS)}")
    cupy = _cupy()
    dev = _device_id(device_id)
    key = (name, dev)
    loaded = _modules.get(key)
    if loaded is not None:
        return loaded
    with _lock:
        compile_lock = _compile_locks.setdefault(key, threading.Lock())
    with compile_lock:
        loaded = _modules.get(key)
        if loaded is None:
            source = (kernel_source_dir() / f"{name}.cu").read_text(encoding="utf-8")
            with cupy.cuda.Device(dev):
                module = cupy.RawModule(code=source, options=_NVRTC_OPTIONS)
                try:
                    # The first lookup compiles and loads the module here.
                    kernels = {k: module.get_function(k) for k in KERNELS[name]}
                except cupy.cuda.compiler.CompileException as exc:
                    raise BackendUnavailableError(
                        f"compiling gpusaver kernel source {name}.cu for device {dev} failed: {exc}"
                    ) from exc
                except RuntimeError as exc:  # e.g. the NVRTC library is missing
                    raise BackendUnavailableError(
                        f"cannot build gpusaver kernel source {name}.cu for device {dev} "
                        f"(CuPy compiles it with NVRTC at run time; is the NVRTC library "
                        f"installed?): {exc}"
                    ) from exc
            loaded = (module, kernels)
            _modules[key] = loaded
    return loaded


def get_module(name: str, device_id: int | None = None) -> cupy.RawModule:
    """Returns kernel source ``name`` compiled and loaded for a device.

    Compiles on the first call per (name, device) and memoises the module;
    concurrent first calls compile once.  CuPy's on-disk kernel cache makes
    later processes skip NVRTC.

    Args:
        name: a key of :data:`KERNELS` (``"pack"`` or ``"crc32c"``).
        device_id: the CUDA device; default: the current device.

    Raises:
        KeyError: unknown kernel source.
        BackendUnavailableError: CuPy or NVRTC is missing, or the source does
            not compile (the message carries the compiler log).
    """
    return _load(name, device_id)[0]


def get_function(name: str, kernel: str, device_id: int | None = None) -> cupy.RawKernel:
    """Returns entry point ``kernel`` of source ``name`` for a device (memoised).

    Launch it with that device current.

    Raises:
        KeyError: unknown source or entry point.
        BackendUnavailableError: as for :func:`get_module`.
    """
    kernels = _load(name, device_id)[1]
    if kernel not in kernels:
        raise InvalidArgumentError(f"{name}.cu has no kernel {kernel!r}; known: {sorted(kernels)}")
    return kernels[kernel]


def clear_cache() -> None:
    """Forgets every compiled module and uploaded table (tests use this)."""
    with _lock:
        _modules.clear()
        _tables.clear()
        _compile_locks.clear()


def _crc_tables(device_id: int, chunk_bytes: int) -> cupy.ndarray:
    """Returns the crc32c kernel's lookup tables on a device (memoised)."""
    key = (device_id, chunk_bytes)
    table = _tables.get(key)
    if table is not None:
        return table
    cupy = _cupy()
    with _lock:
        table = _tables.get(key)
        if table is None:
            with cupy.cuda.Device(device_id):
                table = cupy.asarray(crc32c_tables(chunk_bytes, SHIFT_LEVELS))
                # Other streams will read it: finish the upload first.
                cupy.cuda.get_current_stream().synchronize()
            _tables[key] = table
    return table


@contextlib.contextmanager
def _on(device_id: int, stream: Any) -> Iterator[Any]:
    """Makes ``device_id`` and ``stream`` current; yields the stream used."""
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        if stream is None:
            yield cupy.cuda.get_current_stream()
        else:
            with stream:
                yield stream


def _finish(stream: Any) -> None:
    """Synchronises after a launch when GPUSAVER_KERNEL_SYNC is set."""
    if config.get("kernel_sync"):
        stream.synchronize()


def _grid(threads: int) -> tuple[int]:
    return (max(1, min(_MAX_GRID, -(-threads // BLOCK_THREADS))),)


def _ranges(items: Sequence[Source], device_id: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (pointers, sizes) as uint64 arrays for arrays or (ptr, nbytes)."""
    if isinstance(items, Ranges):
        return items.ptrs, items.sizes
    cupy = _cupy()
    ptrs = np.empty(len(items), dtype=np.uint64)
    sizes = np.empty(len(items), dtype=np.uint64)
    for i, item in enumerate(items):
        if isinstance(item, cupy.ndarray):
            if not item.flags.c_contiguous:
                raise InvalidArgumentError(f"{what} {i} is not C-contiguous; pass cupy.ascontiguousarray(a)")
            if item.device.id != device_id:
                raise InvalidArgumentError(
                    f"{what} {i} is on device {item.device.id}, expected device {device_id}"
                )
            ptr, size = item.data.ptr, item.nbytes
        elif isinstance(item, tuple) and len(item) == 2:
            ptr, size = (int(v) for v in item)
        else:
            raise InvalidArgumentTypeError(
                f"{what} {i}: expected a cupy.ndarray or a (pointer, nbytes) tuple, "
                f"got {type(item).__name__}"
            )
        if size < 0 or ptr < 0:
            raise InvalidArgumentError(f"{what} {i}: invalid range ({ptr:#x}, {size})")
        ptrs[i] = ptr
        sizes[i] = size
    return ptrs, sizes


def _staging(staging: Source, device_id: int | None) -> tuple[Any, int, int]:
    """Returns (kernel argument, size in bytes, device id) of a staging buffer."""
    cupy = _cupy()
    if isinstance(staging, cupy.ndarray):
        if not staging.flags.c_contiguous:
            raise InvalidArgumentError("the staging buffer must be C-contiguous")
        dev = staging.device.id
        if device_id is not None and int(device_id) != dev:
            raise InvalidArgumentError(f"the staging buffer is on device {dev}, not {device_id}")
        return staging, staging.nbytes, dev
    if not (isinstance(staging, tuple) and len(staging) == 2):
        raise InvalidArgumentTypeError(
            "the staging buffer must be a cupy.ndarray or a (pointer, nbytes) tuple, "
            f"got {type(staging).__name__}"
        )
    ptr, size = (int(v) for v in staging)
    if ptr < 0 or size < 0:
        raise InvalidArgumentError(f"invalid staging range ({ptr:#x}, {size})")
    return np.uint64(ptr), size, _device_id(device_id)


def _check_staging_ranges(offsets: np.ndarray, sizes: np.ndarray, limit: int) -> None:
    """Raises ValueError unless every range fits in the staging buffer."""
    if np.any(offsets + sizes < offsets) or np.any(offsets + sizes > np.uint64(limit)):
        bad = int(np.argmax((offsets + sizes < offsets) | (offsets + sizes > np.uint64(limit))))
        raise InvalidArgumentError(
            f"range {bad} ({int(sizes[bad])} bytes at offset {int(offsets[bad])}) does "
            f"not fit in the {limit}-byte staging buffer"
        )


def _check_disjoint(starts: np.ndarray, sizes: np.ndarray, what: str) -> None:
    """Raises ValueError if two non-empty ranges overlap."""
    keep = np.nonzero(sizes)[0]
    order = keep[np.argsort(starts[keep], kind="stable")]
    ends = starts[order] + sizes[order]
    clash = np.nonzero(starts[order][1:] < ends[:-1])[0]
    if clash.size:
        i, j = int(order[clash[0]]), int(order[clash[0] + 1])
        raise InvalidArgumentError(f"{what} ranges {i} and {j} overlap")


def _offsets(offsets: Sequence[int], n: int) -> np.ndarray:
    values = np.asarray(offsets, dtype=np.int64).reshape(-1)
    if values.size != n:
        raise InvalidArgumentError(f"{n} ranges but {values.size} offsets")
    if np.any(values < 0):
        raise InvalidArgumentError("offsets must be >= 0")
    return values.astype(np.uint64)


def _copy(
    kernel: str,
    items: Sequence[Source],
    staging: Source,
    offsets: Sequence[int],
    stream: Any,
    device_id: int | None,
    chunk_bytes: int,
) -> None:
    """Shared body of pack (items -> staging) and unpack (staging -> items)."""
    n = len(items)
    if n >= 2**31:
        raise InvalidArgumentError(f"too many ranges for one launch: {n}")
    if chunk_bytes <= 0 or chunk_bytes % 16:
        raise InvalidArgumentError(f"chunk_bytes must be a positive multiple of 16, got {chunk_bytes}")
    staging_arg, limit, dev = _staging(staging, device_id)
    ptrs, sizes = _ranges(items, dev, "source" if kernel == "gs_pack" else "destination")
    offs = _offsets(offsets, n)
    _check_staging_ranges(offs, sizes, limit)
    if kernel == "gs_pack":
        _check_disjoint(offs, sizes, "staging")
    else:
        _check_disjoint(ptrs, sizes, "destination")
    starts = chunk_starts(sizes, chunk_bytes)
    total = int(starts[-1])
    if total == 0:
        return
    cupy = _cupy()
    fn = get_function("pack", kernel, dev)
    plan = np.concatenate([ptrs, offs, sizes, starts])
    with _on(dev, stream) as used:
        table = cupy.asarray(plan)
        fn(
            _grid(total * 32),
            (BLOCK_THREADS,),
            (
                table[:n],
                table[n : 2 * n],
                table[2 * n : 3 * n],
                table[3 * n :],
                np.int32(n),
                np.uint64(chunk_bytes),
                staging_arg,
            ),
        )
        _finish(used)


def pack(
    sources: Sequence[Source],
    staging: Source,
    offsets: Sequence[int],
    *,
    stream: cupy.cuda.Stream | None = None,
    device_id: int | None = None,
    chunk_bytes: int = PACK_CHUNK_BYTES,
) -> None:
    """Copies every source's bytes into ``staging`` at its offset, in one launch.

    Args:
        sources: C-contiguous CuPy arrays (all their bytes) or
            ``(device pointer, nbytes)`` ranges, on the staging buffer's device;
            or one :class:`Ranges` holding them all.
        staging: the destination: a C-contiguous CuPy array (its bytes), or a
            ``(pointer, nbytes)`` range the device can write (device memory or
            mapped pinned host memory).
        offsets: byte offset in ``staging`` of each source; the destination
            ranges must not overlap.
        stream: the stream to run on; default: the device's current stream.
        device_id: the device, when ``staging`` is a raw range; default: the
            current device.
        chunk_bytes: bytes per warp (a multiple of 16).

    Raises:
        ValueError: mismatched lengths, a range outside the staging buffer,
            overlapping destinations, a non-contiguous array, or an array on
            another device.
        BackendUnavailableError: CuPy is missing or the kernel cannot compile.
    """
    _copy("gs_pack", sources, staging, offsets, stream, device_id, chunk_bytes)


def unpack(
    staging: Source,
    destinations: Sequence[Source],
    offsets: Sequence[int],
    *,
    stream: cupy.cuda.Stream | None = None,
    device_id: int | None = None,
    chunk_bytes: int = PACK_CHUNK_BYTES,
) -> None:
    """Fills every destination from ``staging`` at its offset, in one launch.

    Args:
        staging: the source bytes: a C-contiguous CuPy array or a
            ``(pointer, nbytes)`` range the device can read.
        destinations: C-contiguous CuPy arrays (each receives ``nbytes``) or
            ``(device pointer, nbytes)`` ranges, or one :class:`Ranges`; they must not overlap.
        offsets: byte offset in ``staging`` of each destination's bytes.
        stream: the stream to run on; default: the device's current stream.
        device_id: the device, when ``staging`` is a raw range; default: the
            current device.
        chunk_bytes: bytes per warp (a multiple of 16).

    Raises:
        ValueError: as for :func:`pack`.
        BackendUnavailableError: CuPy is missing or the kernel cannot compile.
    """
    _copy("gs_unpack", destinations, staging, offsets, stream, device_id, chunk_bytes)


def crc_ranges(
    ptrs: Sequence[Source], sizes: Sequence[int] | None, device_id: int | None
) -> tuple[int, np.ndarray, np.ndarray]:
    """The device and the uint64 pointer and size arrays of :func:`crc32c_ranges`' arguments.

    Raises:
        ValueError: mismatched lengths or a negative size.
    """
    if sizes is None:
        items = list(ptrs)
        if device_id is None:
            device_id = next((a.device.id for a in items if isinstance(a, _cupy().ndarray)), None)
        dev = _device_id(device_id)
        return (dev, *_ranges(items, dev, "range"))
    dev = _device_id(device_id)
    ptr_arr = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
    signed = np.asarray(sizes, dtype=np.int64).reshape(-1)
    if ptr_arr.size != signed.size:
        raise InvalidArgumentError(f"{ptr_arr.size} pointers but {signed.size} sizes")
    if np.any(signed < 0):
        raise InvalidArgumentError("sizes must be >= 0")
    return dev, ptr_arr, signed.astype(np.uint64)


def crc32c_ranges(
    ptrs: Sequence[int] | Sequence[Source],
    sizes: Sequence[int] | None = None,
    *,
    stream: cupy.cuda.Stream | None = None,
    device_id: int | None = None,
    masked: bool = False,
    chunk_bytes: int = CRC_CHUNK_BYTES,
) -> cupy.ndarray:
    """Computes the crc32c of many device byte ranges in one launch.

    Args:
        ptrs: device pointers, one per range; or, with ``sizes`` omitted,
            C-contiguous CuPy arrays and/or ``(pointer, nbytes)`` ranges.
        sizes: byte count of each range.
        stream: the stream to run on; default: the device's current stream.
        device_id: the device holding the ranges; default: the current device
            (or the device of the first CuPy array given).
        masked: return the checkpoint format's masked crcs
            (:func:`gpusaver.format.crc.mask`) instead of plain ones.
        chunk_bytes: bytes per thread.

    Returns:
        A uint32 CuPy array on the device, one crc per range, valid once the
        stream reaches this point (``.get()`` waits for it).

    Raises:
        ValueError: mismatched lengths, a negative size, or a range longer
            than ``chunk_bytes * 2**SHIFT_LEVELS`` bytes.
        BackendUnavailableError: CuPy is missing or the kernel cannot compile.
    """
    cupy = _cupy()
    if chunk_bytes <= 0:
        raise InvalidArgumentError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    dev, ptr_arr, size_arr = crc_ranges(ptrs, sizes, device_id)
    n = int(ptr_arr.size)
    if n >= 2**31:
        raise InvalidArgumentError(f"too many ranges for one launch: {n}")
    starts = chunk_starts(size_arr, chunk_bytes)
    if n and int(np.max(np.diff(starts))) > 2**SHIFT_LEVELS:
        raise InvalidArgumentError(
            f"a range is longer than {chunk_bytes * 2**SHIFT_LEVELS} bytes; "
            "use a larger chunk_bytes"
        )
    total = int(starts[-1])
    with _on(dev, stream) as used:
        out = cupy.zeros(n, dtype=cupy.uint32)  # crc32c("") == 0
        if total:
            fn = get_function("crc32c", "gs_crc32c_chunks", dev)
            tables = _crc_tables(dev, chunk_bytes)
            plan = cupy.asarray(np.concatenate([ptr_arr, size_arr, starts]))
            fn(
                _grid(total),
                (BLOCK_THREADS,),
                (
                    plan[:n],
                    plan[n : 2 * n],
                    plan[2 * n :],
                    np.int32(n),
                    np.uint64(chunk_bytes),
                    tables,
                    out,
                ),
            )
        if masked and n:
            get_function("crc32c", "gs_crc32c_mask", dev)(
                _grid(n), (BLOCK_THREADS,), (out, np.int32(n))
            )
        _finish(used)
    return out
