"""The write engine: a pool of threads that checksum buffers and write them at their file offsets.

Writes go through a :class:`~gpusaver.storage.fileops.FileOps` (``pwrite``). The segment size and the
thread count are settings (:mod:`gpusaver.config`), read when a pool is made.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from gpusaver import config
from gpusaver.errors import CheckpointWriteError, write_error
from gpusaver.storage.fileops import FileOps, io_threads

__all__ = ["Pack", "Piece", "WriterPool", "os_error", "writer_count"]

_QUEUE_DEPTH = 16


def os_error(e: OSError, what: str, path: str | None) -> CheckpointWriteError:
    """Wraps an OSError, keeping its errno, naming the operation and the file."""
    if isinstance(e, CheckpointWriteError):
        return e
    return write_error(e.errno, f"{what} {path!r} failed: {e.strerror or e}", path)


#: ``(crc slot, bytes)``: the bytes extend the running crc32c in that slot (-1: none).
Piece = tuple[int, Any]


class Pack:
    """A job for the C extension: copy ``arrays[start:stop]`` back to back into the
    writer thread's staging buffer, checksumming each into ``crcs``, and write it."""

    __slots__ = ("lib", "arrays", "start", "stop", "crcs")

    def __init__(self, lib: Any, arrays: Sequence[np.ndarray], start: int, stop: int, crcs: np.ndarray) -> None:
        self.lib, self.arrays, self.start, self.stop, self.crcs = lib, arrays, start, stop, crcs


def writer_count() -> int:
    """Writer threads of a bundle: the ``writer_threads`` setting, or one per CPU, at most 4
    (writes and crc32c release the GIL)."""
    return io_threads("writer_threads")


class WriterPool:
    """Checksums buffers and writes them at their file offsets, on threads of their own.

    Each job is a run of buffers with the file offset where it starts; jobs
    run concurrently, each on one thread, so one tensor's bytes are always
    checksummed in order. A large buffer is checksummed and written a segment
    at a time, so the write reads it from the CPU cache.
    """

    def __init__(
        self,
        fileops: FileOps,
        fd: int,
        path: str,
        thread_init: Callable[[], None] | None,
        crcs: list[int],
        progress: Any = None,
    ) -> None:
        self._fileops = fileops
        self._progress = progress
        self._segment = config.get("segment_bytes")
        self._staging_bytes = config.get("pack_bytes") + config.get("pack_limit")
        self._thread_init = thread_init
        self._fd = fd
        self._path = path
        self._crcs = crcs
        from gpusaver.format import crc  # here, not at import: gpusaver.format itself imports this package

        self._extend = crc.extend
        self._queue: "queue.Queue[tuple[int, list[Piece], Callable[[], None] | None] | None]" = queue.Queue(
            _QUEUE_DEPTH
        )
        self.error: BaseException | None = None
        self._local = threading.local()
        #: thread-seconds spent checksumming (and packing) and writing, summed over the threads
        self.seconds = {"checksum": 0.0, "write": 0.0}
        self._seconds_lock = threading.Lock()
        # One pwrite at a time: the kernel serialises writes to one file anyway, and a
        # thread waiting here sleeps, where one waiting on the inode lock may spin and
        # take the CPU another thread needs for checksums.
        self._write_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name="gpusaver-writer", daemon=True) for _ in range(writer_count())
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        if self._thread_init is not None:
            try:
                self._thread_init()
            except Exception:  # noqa: BLE001 - placement is a hint, never a failure
                pass
        while True:
            job = self._queue.get()
            if job is None:
                return
            offset, pieces, done = job
            if self.error is None:
                try:
                    self._write(offset, pieces)
                except BaseException as e:  # noqa: BLE001 - reported to the caller
                    self.error = e
            if done is not None:
                try:
                    done()
                except BaseException as e:  # noqa: BLE001
                    if self.error is None:
                        self.error = e

    def _write(self, offset: int, pieces: "list[Piece] | Pack") -> None:
        crcs, extend, fd, clock, pwrite = self._crcs, self._extend, self._fd, time.perf_counter, self._pwrite
        seg = self._segment
        checksum = write = 0.0
        t0 = clock()
        if isinstance(pieces, Pack):
            staging = getattr(self._local, "staging", None)
            if staging is None:
                staging = self._local.staging = bytearray(self._staging_bytes)
            n = pieces.lib.pack(pieces.arrays, pieces.start, pieces.stop, staging, pieces.crcs)
            checksum = clock() - t0
            write = pwrite(fd, [memoryview(staging)[:n]], offset)
        elif len(pieces) == 1 and len(pieces[0][1]) > seg and pieces[0][0] >= 0:
            slot, view = pieces[0]
            for lo in range(0, len(view), seg):
                segment = view[lo : lo + seg]
                t0 = clock()
                if slot >= 0:
                    crcs[slot] = extend(crcs[slot], segment)
                checksum += clock() - t0
                write += pwrite(fd, [segment], offset + lo)
        else:
            for slot, view in pieces:
                if slot >= 0:
                    crcs[slot] = extend(crcs[slot], view)
            checksum = clock() - t0
            write = pwrite(fd, [view for _, view in pieces], offset)
        with self._seconds_lock:
            self.seconds["checksum"] += checksum
            self.seconds["write"] += write

    def _pwrite(self, fd: int, buffers: list[Any], offset: int) -> float:
        """Writes under the pool's write lock; returns the seconds spent writing (not waiting)."""
        with self._write_lock:
            t0 = time.perf_counter()
            self._fileops.pwrite(fd, buffers, offset)
            seconds = time.perf_counter() - t0
        if self._progress is not None:
            self._progress.add(sum(len(b) for b in buffers))
        return seconds

    def submit(self, offset: int, pieces: "list[Piece] | Pack", done: Callable[[], None] | None = None) -> None:
        self.check()
        self._queue.put((offset, pieces, done))

    def check(self) -> None:
        if self.error is not None:
            err = self.error
            if isinstance(err, OSError):
                raise os_error(err, "writing", self._path) from err
            raise err

    def close(self) -> None:
        """Waits for every queued write; raises the first error."""
        alive = [t for t in self._threads if t.is_alive()]
        for _ in alive:
            self._queue.put(None)
        for t in alive:
            t.join()
        self.check()
