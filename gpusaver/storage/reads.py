"""The read engine: exact reads, and big reads split across threads and checksummed while in cache.

Every read goes through a :class:`~gpusaver.storage.fileops.FileOps` (``preadv``), so faults can be
injected into restores as into saves. The sizes are settings (:mod:`gpusaver.config`), read when a
read starts: reads go in chunks of ``read_chunk_bytes``, each checksummed right after it arrives;
reads of ``parallel_read_bytes`` and more are split across ``reader_threads`` threads.
"""

from __future__ import annotations

import threading
from typing import Any

from gpusaver import config
from gpusaver.storage.parallel import run_parallel
from gpusaver.errors import CorruptCheckpointError
from gpusaver.storage.fileops import POSIX, FileOps, io_threads

__all__ = ["read_exact", "scatter_read", "read_with_checksums", "read_workers", "track_progress", "untrack_progress"]

_IOV_MAX = 1024

# data file descriptor -> the Progress its reads count towards (see BundleReader.set_progress)
_progress_of_fd: dict[int, Any] = {}
_progress_lock = threading.Lock()


def track_progress(fd: int, progress: Any) -> None:
    """Counts every byte later read from ``fd`` towards ``progress`` (a :class:`gpusaver.progress.Progress`)."""
    with _progress_lock:
        _progress_of_fd[fd] = progress


def untrack_progress(fd: int) -> None:
    with _progress_lock:
        _progress_of_fd.pop(fd, None)


def _count(fd: int, n: int) -> None:
    progress = _progress_of_fd.get(fd)
    if progress is not None:
        progress.add(n)


def read_exact(fd: int, out: memoryview, offset: int, path: str, ops: FileOps = POSIX) -> None:
    """Fills ``out`` from ``fd`` at ``offset``; a short file raises CorruptCheckpointError."""
    done, n = 0, len(out)
    while done < n:
        got = ops.preadv(fd, [out[done:]], offset + done)
        if got <= 0:
            raise CorruptCheckpointError(
                f"{path!r} is truncated: needed bytes up to {offset + n}, file ended at {offset + done}", path
            )
        done += got
    _count(fd, n)


def scatter_read(fd: int, views: list[Any], start: int, path: str, ops: FileOps = POSIX) -> None:
    """Fills ``views`` from consecutive file bytes at ``start`` (one preadv when it can)."""
    total = sum(len(v) for v in views)
    got = ops.preadv(fd, views, start) if total else 0
    if got != total:  # a short read: finish piece by piece (errors name the file)
        pos = start
        for v in views:
            read_exact(fd, v, pos, path, ops)
            pos += len(v)
        return
    _count(fd, total)


Run = tuple[int, int, str, list[Any], int]  # fd, file offset, path, buffers, index of the first buffer


def _read_runs(runs: list[Run], crcs: list[int], ops: FileOps) -> None:
    """Reads runs in chunks of ``read_chunk_bytes`` and checksums each chunk right after it arrives.

    The chunk is large enough for the kernel to read a cold file in big requests (1 MiB reads
    took twice as long as 64 MiB ones from a cold page cache here, the same bytes), and small
    enough that the crc32c mostly reads bytes still in the CPU's last-level cache.
    """
    from gpusaver.format import crc  # here, not at import: gpusaver.format itself imports this package

    extend = crc.extend
    seg_max = config.get("read_chunk_bytes")
    for fd, start, path, views, index in runs:
        segment: list[tuple[int, Any]] = []
        seg_bytes, pos = 0, start
        for view in views:
            n = len(view)
            for lo in range(0, n, seg_max) if n > seg_max else (0,):
                piece = view[lo : lo + seg_max] if n > seg_max else view
                segment.append((index, piece))
                seg_bytes += len(piece)
                if seg_bytes >= seg_max or len(segment) >= _IOV_MAX:
                    scatter_read(fd, [p for _, p in segment], pos, path, ops)
                    for i, p in segment:
                        crcs[i] = extend(crcs[i], p)
                    pos += seg_bytes
                    segment, seg_bytes = [], 0
            index += 1
        if segment:
            scatter_read(fd, [p for _, p in segment], pos, path, ops)
            for i, p in segment:
                crcs[i] = extend(crcs[i], p)


def read_workers(total: int, threshold: int | None = None) -> int:
    """Threads for a read of ``total`` bytes: from ``threshold`` bytes up (default: the
    ``parallel_read_bytes`` setting), the ``reader_threads`` setting or one per CPU, at most 4."""
    if total < (config.get("parallel_read_bytes") if threshold is None else threshold):
        return 1
    return io_threads("reader_threads")


def read_with_checksums(runs: list[tuple[int, int, str, list[Any]]], count: int, ops: FileOps = POSIX) -> list[int]:
    """Reads every run into its buffers and returns each buffer's crc32c, in order.

    A big read is split, at buffer boundaries, into contiguous parts of about
    equal size, read and checksummed by one thread each: preadv and crc32c
    release the GIL, so the parts proceed on all CPUs at once.
    """
    crcs = [0] * count
    total = sum(len(v) for run in runs for v in run[3])
    workers = read_workers(total)
    parts: list[list[Run]] = [[] for _ in range(workers)]
    quota = total / workers
    done_bytes, index = 0, 0
    for fd, start, path, views in runs:
        current: list[Any] = []
        part = first = 0
        pos = begin = start
        for view in views:
            want = min(int(done_bytes // quota), workers - 1) if quota else 0
            if current and want != part:
                parts[part].append((fd, begin, path, current, first))
                current = []
            if not current:
                part, begin, first = want, pos, index
            current.append(view)
            pos += len(view)
            done_bytes += len(view)
            index += 1
        if current:
            parts[part].append((fd, begin, path, current, first))
    run_parallel(lambda runs_of_part: _read_runs(runs_of_part, crcs, ops), parts, "gpusaver-read")
    return crcs
