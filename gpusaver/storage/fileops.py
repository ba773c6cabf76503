"""The file operations of a save and a restore, behind one small interface.

Every byte gpusaver puts on disk or reads back from a data file goes through a
:class:`FileOps`. The default, :class:`PosixFileOps`, is plain POSIX I/O. Tests
substitute their own to fail or crash at any operation (reads included) or at a
named *phase* of the commit protocol (see ``gpusaver.pipeline`` for the list of
phases), or to model a power loss.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

__all__ = ["FileOps", "PosixFileOps", "POSIX", "IOV_MAX", "io_threads"]

IOV_MAX = getattr(os, "sysconf", lambda _: 1024)("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
if not isinstance(IOV_MAX, int) or IOV_MAX <= 0:
    IOV_MAX = 1024
_MAX_WRITE = 1 << 30  # keep each writev below Linux's 2 GiB per-call limit


@runtime_checkable
class FileOps(Protocol):
    """What a save needs from the file system. Every method raises ``OSError``."""

    def phase(self, name: str) -> None:
        """Marks that the save reached the named phase (a fault-injection point)."""

    def create(self, path: str) -> int:
        """Creates ``path`` exclusively for writing and returns a file descriptor."""

    def write(self, fd: int, buffers: Sequence[Any]) -> None:
        """Appends every byte of ``buffers`` (byte-format memoryviews) to ``fd``."""

    def pwrite(self, fd: int, buffers: Sequence[Any], offset: int) -> None:
        """Writes every byte of ``buffers`` to ``fd`` starting at file ``offset``."""

    def fsync(self, fd: int) -> None:
        """Flushes ``fd``'s data and metadata to stable storage."""

    def close(self, fd: int) -> None:
        """Closes ``fd``."""

    def rename(self, src: str, dst: str) -> None:
        """Atomically renames ``src`` to ``dst``, replacing ``dst``."""

    def remove(self, path: str) -> None:
        """Removes a file; a missing file raises FileNotFoundError."""

    def mkdir(self, path: str) -> None:
        """Creates one directory; an existing one raises FileExistsError."""

    def rmdir(self, path: str) -> None:
        """Removes an empty directory."""

    def rmtree(self, path: str) -> None:
        """Removes a directory and everything in it."""

    def fsync_dir(self, path: str) -> None:
        """Makes the directory's entries (creations, renames, removals) durable."""

    def open_read(self, path: str, what: str) -> int:
        """Opens an existing regular file for reading (``what`` names it in errors: "data file", ...)."""

    def preadv(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        """Reads into ``buffers`` from file ``offset``; returns the bytes read (fewer at end of file)."""


class PosixFileOps:
    """Plain POSIX file operations."""

    def phase(self, name: str) -> None:
        return None

    def create(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)

    def write(self, fd: int, buffers: Sequence[Any]) -> None:
        for batch, total in _batches(buffers):
            _write_all(fd, batch, total, None)

    def pwrite(self, fd: int, buffers: Sequence[Any], offset: int) -> None:
        for batch, total in _batches(buffers):
            _write_all(fd, batch, total, offset)
            offset += total

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove(self, path: str) -> None:
        os.remove(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path)

    def fsync_dir(self, path: str) -> None:
        if os.name == "nt":  # directories cannot be opened; renames are journaled
            return
        fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        except OSError as e:
            # Some file systems cannot fsync a directory; their renames are as durable as they get.
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise
        finally:
            os.close(fd)

    def open_read(self, path: str, what: str) -> int:
        from gpusaver.storage.paths import open_regular

        return open_regular(path, what)

    def preadv(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        return os.preadv(fd, buffers, offset)


def _batches(buffers: Sequence[Any]) -> Iterator[tuple[list[Any], int]]:
    """Groups buffers into system calls of at most IOV_MAX buffers and about _MAX_WRITE bytes."""
    views = [v for v in buffers if len(v)]
    i, n = 0, len(views)
    while i < n:
        j, total = i, 0
        while j < n and j - i < IOV_MAX and (total == 0 or total + len(views[j]) <= _MAX_WRITE):
            total += len(views[j])
            j += 1
        if total > _MAX_WRITE:  # one huge buffer: in pieces
            view = views[i]
            views[i] = view[_MAX_WRITE:]
            yield [view[:_MAX_WRITE]], _MAX_WRITE
            continue
        yield views[i:j], total
        i = j


def _write_all(fd: int, views: list[Any], total: int, offset: int | None) -> None:
    """One writev (or pwritev at ``offset``), resumed after short writes."""
    while True:
        written = os.writev(fd, views) if offset is None else os.pwritev(fd, views, offset)
        if written >= total:
            return
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        rest, skip = [], written
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            rest.append(v[skip:])
            skip = 0
        views, total = rest, total - written
        if offset is not None:
            offset += written


#: The default file operations.
POSIX = PosixFileOps()


def io_threads(setting: str) -> int:
    """Threads for reads or writes: the ``setting`` (``reader_threads``, ``writer_threads``), or one per
    usable CPU, at most 4 (file I/O and crc32c release the GIL)."""
    from gpusaver import config

    configured = config.get(setting)
    if configured:
        return int(configured)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))
