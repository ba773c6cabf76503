"""Checkpoint paths: spellings, identities, and opening files that must be regular.

One checkpoint can be named many ways: ``ck/model``, ``./ck/model``, an
absolute path, a path through a symlinked directory, or a ``file://`` URI.
gpusaver keeps the caller's spelling wherever it is shown or recorded (as
TensorFlow does), turns it into a local path only to touch the file system
(:func:`local_path`), and compares checkpoints by what they are on disk, never
by their strings (:func:`checkpoint_identity`): the directory's device and inode
plus the prefix's last component.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import stat
from typing import Hashable

from gpusaver.errors import CorruptCheckpointError, UnsupportedSchemeError

__all__ = [
    "local_path",
    "spelling_for_state",
    "checkpoint_identity",
    "same_checkpoint",
    "directory_identity",
    "literal_or_glob",
    "open_regular",
    "read_regular",
]

_FILE_SCHEME = "file://"
#: ``scheme://`` at the start of a path (RFC 3986's scheme characters)
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
#: a path whose first part is ``scheme:`` then one slash: a URL pathlib folded (two letters at least,
#: so that a drive letter's ``C:/`` stays a path)
_MANGLED_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def local_path(path: "str | os.PathLike[str]") -> str:
    """The local file-system path of ``path``: ``file:///a/b`` and ``file://localhost/a/b`` are ``/a/b``.

    Other strings are returned unchanged (``os.fspath``); nothing is unquoted, as in TensorFlow.

    Raises:
        UnsupportedSchemeError: a URL of any other scheme (``s3://``, ``gs://``, ``hdfs://``,
            ``file://host/`` of another host): never taken for a local directory named ``s3:``.
    """
    p = os.fspath(path)
    if not isinstance(p, str):
        p = os.fsdecode(p)
    mangled = _MANGLED_URL.match(p)  # pathlib folds "s3://b/x" into "s3:/b/x", and str() keeps that
    if mangled is not None and mangled.group(1).lower() != "file":
        raise UnsupportedSchemeError(
            f"{p!r} looks like a {mangled.group(1)}:// URL that lost a slash (pathlib folds Path('s3://b/x') "
            "into 's3:/b/x'); gpusaver reads and writes local paths and file:// URLs only",
            mangled.group(1),
        )
    url = _URL.match(p)
    if url is not None and url.group(1).lower() == "file" and not p.startswith(_FILE_SCHEME):
        p = _FILE_SCHEME + p[len("file://"):]  # schemes are case-insensitive: FILE:///x is file:///x
    if url is not None and url.group(1).lower() != "file":
        raise UnsupportedSchemeError(
            f"{p!r} is a {url.group(1)}:// URL; gpusaver reads and writes local paths and file:// URLs only "
            f"(a {url.group(1)}:// path would otherwise become a local directory named {url.group(1) + ':'!r})",
            url.group(1),
        )
    if p.startswith(_FILE_SCHEME):
        rest = p[len(_FILE_SCHEME) :]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise UnsupportedSchemeError(
                f"{p!r} names a file on another host ({rest.split('/')[0]!r}); file:// URLs here are "
                "file:///path or file://localhost/path", "file"
            )
        return rest
    return p


def _style(path: str) -> str:
    if path.startswith(_FILE_SCHEME):
        return "uri"
    return "abs" if os.path.isabs(path) else "rel"


def spelling_for_state(path: str, state_dir: str) -> str:
    """``path`` as a state file in ``state_dir`` should list it, so that reading it back finds it.

    TensorFlow stores paths as given, rewriting cwd-relative ones relative to a
    relative directory; so a cwd-relative path under an absolute directory, or
    a ``file://`` URI under a relative one, would be read back as another path.
    A path spelled in the directory's own style is kept (the bytes TensorFlow
    writes); one in another style is stored absolute.
    """
    if _style(path) == _style(state_dir):
        return path
    return os.path.abspath(local_path(path))


def directory_identity(directory: str) -> Hashable:
    """What a directory is: ``(st_dev, st_ino)``, or its resolved path when it cannot be stat'ed."""
    d = local_path(directory) or "."
    try:
        st = os.stat(d)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(d))


def checkpoint_identity(prefix: "str | os.PathLike[str]") -> Hashable:
    """What a checkpoint prefix names, whatever its spelling.

    Two prefixes have the same identity when their directories are the same
    directory (same device and inode: through symlinks, ``..``, bind mounts)
    and their last components are equal.
    """
    p = local_path(prefix)
    directory, base = os.path.split(p)
    if base in ("", ".", ".."):
        return ("path", os.path.realpath(p or "."))
    return (directory_identity(directory), base)


def same_checkpoint(a: "str | os.PathLike[str]", b: "str | os.PathLike[str]") -> bool:
    """Whether two prefixes name the same checkpoint."""
    return checkpoint_identity(a) == checkpoint_identity(b)


def literal_or_glob(pattern: str) -> list[str]:
    """The files ``pattern`` names: itself when it exists literally, else its glob matches (sorted).

    TensorFlow treats checkpoint paths as glob patterns; a real path that holds
    ``[``, ``*`` or ``?`` is taken literally first, so it always finds itself
    and never widens to other files. Likewise a directory part that exists is
    taken literally: only the last component may then be a pattern.
    """
    if os.path.lexists(pattern):
        return [pattern]
    if not glob.has_magic(pattern):
        return []
    directory, base = os.path.split(pattern)
    if directory and os.path.isdir(directory):
        if not glob.has_magic(base):
            return []
        return sorted(glob.glob(os.path.join(glob.escape(directory), base)))
    return sorted(glob.glob(pattern))


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str, what: str) -> int:
    """Opens ``path`` for reading, refusing anything but a regular file, without blocking.

    A FIFO is opened non-blocking (so no writer is waited for) and refused, as
    are devices, sockets and directories.

    Args:
        path: the file (symlinks are followed).
        what: what the file is, for the error message (``"checkpoint index"``).

    Returns:
        A file descriptor (close-on-exec, blocking mode restored).

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptCheckpointError: it is not a regular file (a ValueError).
        OSError: it cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise CorruptCheckpointError(f"{what} {path!r} is a directory, not a regular file", path) from None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket, or a FIFO without writers on some systems
            raise CorruptCheckpointError(f"{what} {path!r} is not a regular file", path) from None
        if e.errno == errno.ELOOP:
            raise CorruptCheckpointError(f"{what} {path!r} is a symlink loop, not a regular file", path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CorruptCheckpointError(f"{what} {path!r} is {_kind(mode)}, not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, what: str, limit: int | None = None) -> bytes:
    """The whole content of a regular file (see :func:`open_regular`).

    Args:
        limit: refuse files larger than this many bytes.

    Raises:
        CorruptCheckpointError: not a regular file, or larger than ``limit``.
    """
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise CorruptCheckpointError(f"{what} {path!r} is {size} bytes, more than the {limit} allowed", path)
        chunks = []
        while True:
            chunk = os.read(fd, max(size, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
