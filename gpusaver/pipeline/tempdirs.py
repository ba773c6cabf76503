"""Temporary directories of saves and deletions, and the cleaning of what crashes leave.

A save writes its shards under ``<prefix>_temp_<uuid>/``; a deletion marks its
work with such a directory too (a *tombstone*). Each holds an ``OWNER`` file
(host, pid, process start time, kind, state file), written atomically, and its
process holds an exclusive ``flock`` on that file from before it appears until
the directory is gone. A directory is stale when its lock can be taken: the
kernel drops the lock when the owner dies, whatever pid namespace (container)
the owner and the cleaner live in. Cleaning happens under that lock, so two
cleaners never clean one directory, and it finishes what the owner left half
done:

* a crashed save: the new checkpoint never appeared, so ``<prefix>.data-*``
  files without ``<prefix>.index`` and ``<prefix>.index.tempstate*`` files
  are debris and are removed; a checkpoint that was committed but that its
  state file does not list (the save died, or failed, before recording it, and
  never returned) is removed too, index first;
* a crashed deletion: the checkpoint was being deleted, so its remaining
  files are removed, index first.

A directory whose owner record is on another host, or holds the lock, is never
touched. Records written by older versions (no lock) are judged by their pid.
One without a readable owner record is stale only after :data:`ORPHAN_AGE`
seconds. Leftover temporary ``checkpoint`` state files (``*.tmp<32 hex>``) older
than that are removed too.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import socket
import threading
import time
import uuid
from urllib.parse import quote, unquote

from gpusaver.errors import CorruptCheckpointError
from gpusaver.storage.fileops import POSIX, FileOps
from gpusaver.format.naming import data_files, index_filename
from gpusaver.storage.paths import checkpoint_identity, open_regular, read_regular

__all__ = ["ORPHAN_AGE", "TempDir", "make_temp_dir", "clean_stale_temp_dirs", "roll_back_unrecorded"]

TEMP_RE = re.compile(r"^(?P<base>.+)_temp_(?P<id>[0-9a-f]{32})$")
#: Temporary files of an atomic write (the state file; a standalone BundleWriter), removed once old.
_STATE_TMP_RE = re.compile(r"^.+(\.tmp[0-9a-f]{32}|\.(index|data-\d+-of-\d+)\.tempstate[0-9a-f]+)$")
OWNER = "OWNER"
#: Created in a save's temp directory just before its commit begins (the old index is removed
#: first): without it, a dead save never touched its prefix's checkpoint files.
COMMITTING = "COMMITTING"
#: The last field of an owner record whose liveness is its flock.
_LOCKED = "flock"
#: Seconds after which a temp directory (or state temp file) with no readable owner is stale.
ORPHAN_AGE = 600.0
#: Owner records are a line; anything longer is not one.
_OWNER_LIMIT = 1 << 16


def _process_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


def _owner_record(deleting: bool, state_file: str | None) -> bytes:
    pid = os.getpid()
    kind = "delete" if deleting else "save"
    state = quote(state_file, safe="") if state_file else "-"
    return f"{socket.gethostname()} {pid} {_process_start_time(pid) or '-'} {kind} {state} {_LOCKED}\n".encode()


class _Owner:
    """A parsed owner record."""

    def __init__(self, record: str) -> None:
        parts = record.split()
        self.valid = False
        self.locked = len(parts) == 6 and parts[5] == _LOCKED
        if self.locked:
            parts = parts[:5]
        if len(parts) == 3:
            parts.append("save")
        if len(parts) == 4:
            parts.append("checkpoint")
        if len(parts) != 5 or parts[3] not in ("save", "delete"):
            return
        self.valid = True
        self.host, self.pid, self.start = parts[0], parts[1], parts[2]
        self.deleting = parts[3] == "delete"
        self.state_file = None if parts[4] == "-" else (unquote(parts[4]) if self.locked else parts[4])

    def pid_state(self) -> str:
        """``alive``, ``dead`` or ``unknown`` from the pid (records without a lock)."""
        try:
            pid = int(self.pid)
        except ValueError:
            return "unknown"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "dead"
        except PermissionError:
            pass
        if self.start == "-" or _process_start_time(pid) == self.start:
            return "alive"
        return "dead"  # the pid was reused by another process


#: The lock descriptors this process holds, so that a forked child closes its copies: the
#: lock then dies with the process that took it, not with its longest-lived child.
_held: "dict[int, TempDir]" = {}
_held_lock = threading.Lock()


def _forget_locks_in_child() -> None:
    for fd, temp in list(_held.items()):
        temp._fd = None
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


class TempDir:
    """A temp directory this process owns, locked until :meth:`remove` or :meth:`release`."""

    def __init__(self, path: str, lock_fd: int | None) -> None:
        self.path = path
        self._fd = lock_fd
        if lock_fd is not None:
            with _held_lock:
                _held[lock_fd] = self

    def release(self) -> None:
        """Drops the lock and leaves the directory: a later save treats it as stale and finishes it."""
        with _held_lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                _held.pop(fd, None)
        if fd is not None:
            os.close(fd)

    def remove(self, ops: FileOps) -> None:
        """Removes the directory, then drops the lock (errors are ignored: a later save cleans up)."""
        try:
            ops.rmtree(self.path)
        except OSError:
            pass
        finally:
            self.release()

    def __fspath__(self) -> str:
        return self.path


def make_temp_dir(prefix: str, ops: FileOps, *, deleting: bool = False, state_file: str | None = None) -> TempDir:
    """Creates ``<prefix>_temp_<uuid>`` with its owner record, locked; removes it again on failure.

    The record is written to ``OWNER.tmp``, locked, then renamed to ``OWNER``:
    no cleaner ever sees an unlocked ``OWNER`` of a live directory.

    Args:
        prefix: the checkpoint being saved or deleted (a local path).
        ops: file operations.
        deleting: a tombstone of a deletion rather than a save.
        state_file: the state file that will record a save (None: none will).
    """
    temp_dir = f"{prefix}_temp_{uuid.uuid4().hex}"
    ops.mkdir(temp_dir)
    lock_fd = None
    try:
        tmp = os.path.join(temp_dir, OWNER + ".tmp")
        fd = ops.create(tmp)
        try:
            ops.write(fd, [memoryview(_owner_record(deleting, state_file))])
        finally:
            ops.close(fd)
        lock_fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        ops.rename(tmp, os.path.join(temp_dir, OWNER))
    except BaseException:
        try:
            ops.rmtree(temp_dir)
        except OSError:
            pass
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return TempDir(temp_dir, lock_fd)


def _remove_quietly(ops: FileOps, path: str) -> None:
    try:
        ops.remove(path)
    except OSError:
        pass


def recorded(prefix: str, state_file: str | None) -> bool:
    """Whether the state file next to ``prefix`` lists it (True when that cannot be told).

    Paths are compared by identity (:func:`gpusaver.storage.paths.checkpoint_identity`),
    so a checkpoint recorded through a symlink, a relative path or a
    ``file://`` URI is found whatever spelling ``prefix`` has.
    """
    if state_file is None:
        return False
    from gpusaver.checkpoint_management import get_checkpoint_state

    directory = os.path.dirname(prefix)
    path = os.path.join(directory, state_file)
    if not os.path.isfile(path):
        return False  # missing, or a directory, FIFO or device: it lists nothing
    try:
        state = get_checkpoint_state(directory or ".", state_file)
    except Exception:  # noqa: BLE001 - unreadable: keep the checkpoint
        return True
    if state is None:
        return True
    mine = checkpoint_identity(prefix)
    return any(checkpoint_identity(p) == mine for p in [state.model_checkpoint_path, *state.all_model_checkpoint_paths])


def _finish_for_dead_owner(
    ops: FileOps, prefix: str, kind: str, state_file: str | None
) -> bool:
    """Finishes what a dead save or deletion of ``prefix`` left; True when nothing is left to do.

    ``kind``: ``delete`` (a tombstone), ``committing`` (a save that had begun its
    commit, see :data:`COMMITTING`), ``writing`` (a save that had not: the
    checkpoint files of ``prefix``, if any, are an earlier save's and stay),
    ``unknown`` (no readable owner record: only temporary files go), or
    ``rollback`` (a live save that failed after its commit takes it back).
    """
    index = index_filename(prefix)
    for leftover in glob.glob(glob.escape(index) + ".tempstate*"):
        _remove_quietly(ops, leftover)
    if kind in ("writing", "unknown"):
        return True
    committed = os.path.lexists(index)
    if committed and recorded(prefix, state_file):
        # A save that finished but for removing its temp dir, or a deletion whose
        # state file never stopped listing the checkpoint: keep it.
        return True
    if committed and kind == "committing" and state_file is None:
        return True  # a save that records nothing: its index rename was its commit
    # A deletion cut short, a commit cut short (the old index went first, so these
    # files are the new save's), or a commit that was never recorded (the save never
    # returned): the files go, index first.
    ok = True
    for path in ([index] if committed else []) + data_files(prefix):
        try:
            ops.remove(path)
        except FileNotFoundError:
            pass
        except OSError:
            ok = False
    return ok


def roll_back_unrecorded(prefix: str, state_file: str | None, ops: FileOps) -> bool:
    """Removes the committed checkpoint ``prefix`` unless its state file lists it.

    For a save whose commit succeeded but whose recording failed (the disk
    filled at the state file): nothing it made stays. Returns False when a file
    could not be removed (the caller then leaves its temp directory, unlocked,
    for the next save to finish).
    """
    return _finish_for_dead_owner(ops, prefix, "rollback", state_file)


def _try_lock(owner_path: str) -> tuple[str, int | None]:
    """``("dead", fd holding the lock)`` or ``("alive", None)`` for a locked owner record."""
    try:
        fd = open_regular(owner_path, "owner record")
    except (OSError, CorruptCheckpointError):
        return "alive", None  # gone meanwhile, or not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return "alive", None
        return "alive", None  # locks unsupported here: never guess
    return "dead", fd


#: What a save or deletion puts in its temp directory.
_OURS_RE = re.compile(
    r"^(OWNER|OWNER\.tmp|COMMITTING|part-\d{5}-of-\d{5}(\.index|\.data-\d{5}-of-\d{5})?(\.tempstate[0-9a-f]+)?)$"
)


def _looks_like_ours(path: str) -> bool:
    """A temp-named directory without a valid owner record is ours only if everything in it is
    what a save puts there (a crash in the middle of removing it leaves such a directory); a
    user's directory that happens to have such a name is never touched."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return all(_OURS_RE.match(n) for n in names)


def _is_our_temp_file(name: str, path: str) -> bool:
    """An old ``*.tmp<32 hex>`` file is a state file's temporary only if it reads as a state file;
    ``.tempstate`` files of an index or data file are a bundle writer's."""
    if ".tempstate" in name:
        return True
    try:
        text = read_regular(path, "temporary state file", _OWNER_LIMIT).decode("utf-8")
    except (OSError, CorruptCheckpointError, UnicodeDecodeError):
        return False
    return text == "" or text.lstrip().startswith(("model_checkpoint_path", "all_model_checkpoint_paths"))


def clean_stale_temp_dirs(directory: str, fileops: FileOps | None = None) -> list[str]:
    """Removes the temp directories (and debris) of saves and deletions whose process is gone.

    Returns:
        The temp directories removed.
    """
    ops = fileops or POSIX
    removed: list[str] = []
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return removed
    now = time.time()
    host = socket.gethostname()
    for name in names:
        path = os.path.join(directory, name)
        if _STATE_TMP_RE.match(name):
            try:
                if now - os.lstat(path).st_mtime >= ORPHAN_AGE and _is_our_temp_file(name, path):
                    _remove_quietly(ops, path)
            except OSError:
                pass
            continue
        m = TEMP_RE.match(name)
        if m is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        owner_path = os.path.join(path, OWNER)
        lock_fd = None
        try:
            owner = _Owner(read_regular(owner_path, "owner record", _OWNER_LIMIT).decode("utf-8"))
        except (FileNotFoundError, UnicodeDecodeError, CorruptCheckpointError):
            owner = _Owner("")
        except OSError:
            continue
        if not owner.valid:
            # Ours only if it holds an owner record we could not read, or the one being
            # written when a save died: a user's directory of that name is never touched.
            if not _looks_like_ours(path):
                continue
            try:
                state = "dead" if now - os.stat(path).st_mtime >= ORPHAN_AGE else "alive"
            except OSError:
                continue
        elif owner.host != host:
            state = "alive"  # another host's: never touch it
        elif owner.locked:
            state, lock_fd = _try_lock(owner_path)
        else:
            state = owner.pid_state()
            if state == "unknown":
                try:
                    state = "dead" if now - os.stat(path).st_mtime >= ORPHAN_AGE else "alive"
                except OSError:
                    continue
        if state != "dead":
            continue
        try:
            base = os.path.join(directory, m.group("base"))
            if not owner.valid:
                kind = "unknown"
            elif owner.deleting:
                kind = "delete"
            elif os.path.lexists(os.path.join(path, COMMITTING)) or not owner.locked:
                kind = "committing"  # (records of older versions carry no marker: as they were judged)
            else:
                kind = "writing"
            _finish_for_dead_owner(ops, base, kind, owner.state_file if owner.valid else None)
            try:
                ops.rmtree(path)
                removed.append(path)
            except OSError:
                pass
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
    return removed
