"""The read engine: exact reads, and big reads in jobs taken by several threads, checksummed while in cache.

Every read goes through a :class:`~gpusaver.storage.fileops.FileOps` (``preadv``), so faults can be
injected into restores as into saves. The sizes are settings (:mod:`gpusaver.config`), read when a
read starts: reads go in jobs of ``read_chunk_bytes``, each checksummed right after it arrives;
reads of ``parallel_read_bytes`` and more are shared by ``reader_threads`` threads.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from gpusaver import config
from gpusaver.storage.parallel import run_jobs
from gpusaver.errors import CorruptCheckpointError
from gpusaver.storage.fileops import POSIX, FileOps, io_threads

__all__ = [
    "read_exact", "scatter_read", "checked_read_jobs", "read_with_checksums", "read_workers", "track_progress",
    "untrack_progress",
]

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


def read_exact(fd: int, out: memoryview, offset: int, path: str, ops: FileOps = POSIX, counted: int | None = None) -> None:
    """Fills ``out`` from ``fd`` at ``offset``; a short file raises CorruptCheckpointError.

    ``counted``: the bytes a restore's progress counts for this read (default all of them; a chunk of
    small tensors counts only theirs, not the gaps between them it reads too).
    """
    done, n = 0, len(out)
    while done < n:
        got = ops.preadv(fd, [out[done:]], offset + done)
        if got <= 0:
            raise CorruptCheckpointError(
                f"{path!r} is truncated: needed bytes up to {offset + n}, file ended at {offset + done}", path
            )
        done += got
    _count(fd, n if counted is None else counted)


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


def checked_read_jobs(
    runs: list[tuple[int, int, str, list[Any]]], count: int, ops: FileOps = POSIX
) -> tuple[list[Callable[[], None]], Callable[[], list[int]]]:
    """Plans reading every run into its buffers as jobs of about ``read_chunk_bytes`` each, every piece
    checksummed right after it arrives.

    Returns the jobs (for :func:`~gpusaver.storage.parallel.run_jobs`, in any order and on any threads) and a
    function that, once they have all run, returns each buffer's crc32c in order: a buffer split over several
    jobs has each piece checksummed apart and the pieces' crcs combined. A job is one ``preadv`` of at most
    ``read_chunk_bytes``: large enough for the kernel to read a cold file in big requests (1 MiB reads took
    twice as long as 64 MiB ones from a cold page cache here, the same bytes), and small enough that the
    crc32c mostly reads bytes still in the CPU's cache.
    """
    from gpusaver.format import crc  # here, not at import: gpusaver.format itself imports this package

    value = crc.value
    seg_max = config.get("read_chunk_bytes")
    crcs = [0] * count
    split: dict[int, list[int]] = {}  # buffer -> its pieces' crcs, for buffers read in several pieces
    sizes: dict[int, int] = {}  # their byte sizes: every piece but the last is seg_max long
    jobs: list[Callable[[], None]] = []

    def job(fd: int, pos: int, path: str, pieces: list[tuple[int, int, Any]]) -> Callable[[], None]:
        def run() -> None:
            scatter_read(fd, [p for _, _, p in pieces], pos, path, ops)
            for i, k, p in pieces:
                if k < 0:
                    crcs[i] = value(p)
                else:
                    split[i][k] = value(p)
        return run

    index = 0
    for fd, start, path, views in runs:
        pieces: list[tuple[int, int, Any]] = []
        seg_bytes, pos = 0, start
        for view in views:
            n = len(view)
            if n > seg_max:
                cuts = range(0, n, seg_max)
                split[index] = [0] * len(cuts)
                sizes[index] = n
                parts = [(index, k, view[lo : lo + seg_max]) for k, lo in enumerate(cuts)]
            else:
                parts = [(index, -1, view)]
            for part in parts:
                pieces.append(part)
                seg_bytes += len(part[2])
                if seg_bytes >= seg_max or len(pieces) >= _IOV_MAX:
                    jobs.append(job(fd, pos, path, pieces))
                    pos += seg_bytes
                    pieces, seg_bytes = [], 0
            index += 1
        if pieces:
            jobs.append(job(fd, pos, path, pieces))

    def finish() -> list[int]:
        for i, parts_crc in split.items():
            c = parts_crc[0]
            for k in range(1, len(parts_crc)):
                c = crc.combine(c, parts_crc[k], min(seg_max, sizes[i] - k * seg_max))
            crcs[i] = c
        return crcs

    return jobs, finish


def read_workers(total: int, threshold: int | None = None) -> int:
    """Threads for a read of ``total`` bytes: from ``threshold`` bytes up (default: the
    ``parallel_read_bytes`` setting), the ``reader_threads`` setting or one per CPU, at most 4."""
    if total < (config.get("parallel_read_bytes") if threshold is None else threshold):
        return 1
    return io_threads("reader_threads")


def read_with_checksums(runs: list[tuple[int, int, str, list[Any]]], count: int, ops: FileOps = POSIX) -> list[int]:
    """Reads every run into its buffers and returns each buffer's crc32c, in order.

    The reads go in jobs of about ``read_chunk_bytes`` (:func:`checked_read_jobs`), taken in turn by
    :func:`read_workers` threads: preadv and crc32c release the GIL, so the jobs proceed on all CPUs at once.
    """
    jobs, finish = checked_read_jobs(runs, count, ops)
    run_jobs(jobs, read_workers(sum(len(v) for run in runs for v in run[3])), "gpusaver-read")
    return finish()
