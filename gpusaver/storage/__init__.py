"""Where gpusaver's bytes meet the file system: one layer for reads and writes.

* :mod:`~gpusaver.storage.fileops`: the :class:`FileOps` seam. Every open, read, write, fsync,
  rename and removal of a save or a restore's data goes through one; tests inject faults there.
* :mod:`~gpusaver.storage.writes`: :class:`WriterPool`, threads that checksum buffers and write them
  at their file offsets, handing each buffer back (``done``) once it is on disk.
* :mod:`~gpusaver.storage.reads`: exact reads, and big reads split across threads and checksummed
  while still in the CPU cache.

The bundle format (:mod:`gpusaver.format`) encodes bytes and leaves moving them to this package;
both backends read and write through it. It is also where later transports plug in: an
asynchronous save hands a :class:`WriterPool` its buffers and waits on it elsewhere; several
processes each write their own shard file through their own :class:`FileOps`; GPUDirect Storage is
a :class:`FileOps` whose ``pwrite``/``preadv`` take device buffers.
"""

from gpusaver.storage.fileops import IOV_MAX, POSIX, FileOps, PosixFileOps
from gpusaver.storage.reads import checked_read_jobs, read_exact, read_with_checksums, read_workers, scatter_read
from gpusaver.storage.writes import Pack, Piece, WriterPool, os_error, writer_count

__all__ = [
    "IOV_MAX",
    "POSIX",
    "FileOps",
    "Pack",
    "Piece",
    "PosixFileOps",
    "WriterPool",
    "os_error",
    "read_exact",
    "checked_read_jobs",
    "read_with_checksums",
    "read_workers",
    "scatter_read",
    "writer_count",
]
