"""Temporary directories of saves and deletions, and the cleaning of what crashes leave.

A save writes its shards under ``<prefix>_temp_<uuid>/``; a deletion marks its
work with such a directory too (a *tombstone*). Each holds an ``OWNER`` file
(host, pid and process start time), written atomically. A directory whose
owner is dead is stale; cleaning it also finishes what its owner left half
done:

* a crashed save: the new checkpoint never appeared, so ``<prefix>.data-*``
  files without ``<prefix>.index`` and ``<prefix>.index.tempstate*`` files
  are debris and are removed;
* a crashed deletion: the checkpoint was being deleted, so its remaining
  files are removed, index first.

A directory of a live process is never touched; one without a readable owner
record is stale only after :data:`ORPHAN_AGE` seconds. Leftover temporary
``checkpoint`` state files (``*.tmp<32 hex>``) older than that are removed too.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import time
import uuid

from gpusaver.fileops import POSIX, FileOps
from gpusaver.format.naming import data_file_glob, index_filename

__all__ = ["ORPHAN_AGE", "make_temp_dir", "clean_stale_temp_dirs"]

TEMP_RE = re.compile(r"^(?P<base>.+)_temp_(?P<id>[0-9a-f]{32})$")
#: Temporary files of an atomic write (the state file; a standalone BundleWriter), removed once old.
_STATE_TMP_RE = re.compile(r"^.+(\.tmp[0-9a-f]{32}|\.(index|data-\d+-of-\d+)\.tempstate[0-9a-f]+)$")
OWNER = "OWNER"
#: Seconds after which a temp directory (or state temp file) with no readable owner is stale.
ORPHAN_AGE = 600.0


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
    return f"{socket.gethostname()} {pid} {_process_start_time(pid) or '-'} {kind} {state_file or '-'}\n".encode()


def _owner_state(record: str) -> tuple[str, bool, str | None]:
    """``(state, deleting, state file)``: state is ``alive``, ``dead`` or ``unknown``."""
    parts = record.split()
    if len(parts) == 3:
        parts.append("save")
    if len(parts) == 4:
        parts.append("checkpoint")
    if len(parts) != 5 or parts[3] not in ("save", "delete"):
        return "unknown", False, None
    deleting = parts[3] == "delete"
    state_file = None if parts[4] == "-" else parts[4]
    state, _ = _liveness(parts)
    return state, deleting, state_file


def _liveness(parts: list[str]) -> tuple[str, None]:
    if parts[0] != socket.gethostname():
        return "alive", None  # another host's: never touch it
    try:
        pid = int(parts[1])
    except ValueError:
        return "unknown", None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead", None
    except PermissionError:
        pass
    if parts[2] == "-" or _process_start_time(pid) == parts[2]:
        return "alive", None
    return "dead", None  # the pid was reused by another process


def make_temp_dir(prefix: str, ops: FileOps, *, deleting: bool = False, state_file: str | None = None) -> str:
    """Creates ``<prefix>_temp_<uuid>`` with its owner record; removes it again on failure.

    Args:
        prefix: the checkpoint being saved or deleted.
        ops: file operations.
        deleting: a tombstone of a deletion rather than a save.
        state_file: the state file that will record a save (None: none will).
    """
    temp_dir = f"{prefix}_temp_{uuid.uuid4().hex}"
    ops.mkdir(temp_dir)
    try:
        tmp = os.path.join(temp_dir, OWNER + ".tmp")
        fd = ops.create(tmp)
        try:
            ops.write(fd, [memoryview(_owner_record(deleting, state_file))])
        finally:
            ops.close(fd)
        ops.rename(tmp, os.path.join(temp_dir, OWNER))
    except BaseException:
        try:
            ops.rmtree(temp_dir)
        except OSError:
            pass
        raise
    return temp_dir


def _remove_quietly(ops: FileOps, path: str) -> None:
    try:
        ops.remove(path)
    except OSError:
        pass


def _recorded(prefix: str, state_file: str | None) -> bool:
    """Whether the state file lists ``prefix`` (True when that cannot be told)."""
    if state_file is None:
        return False
    from gpusaver.checkpoint_management import get_checkpoint_state

    directory = os.path.dirname(prefix)
    path = os.path.join(directory, state_file)
    if not os.path.exists(path):
        return False
    try:
        state = get_checkpoint_state(directory or ".", state_file)
    except Exception:  # noqa: BLE001 - unreadable: keep the checkpoint
        return True
    if state is None:
        return True
    listed = {os.path.abspath(p) for p in [state.model_checkpoint_path, *state.all_model_checkpoint_paths]}
    return os.path.abspath(prefix) in listed


def _finish_for_dead_owner(
    ops: FileOps, prefix: str, deleting: bool, state_file: str | None, known_owner: bool = True
) -> None:
    index = index_filename(prefix)
    for leftover in glob.glob(glob.escape(index) + ".tempstate*"):
        _remove_quietly(ops, leftover)
    committed = os.path.lexists(index)
    if committed and (not known_owner or _recorded(prefix, state_file)):
        # A save that finished but for removing its temp dir; a deletion whose state
        # file never stopped listing the checkpoint; or who knows: keep it.
        return
    # A deletion cut short, a save that never committed, or one that committed but
    # died before it was recorded (it never returned): its files go, index first.
    if committed:
        _remove_quietly(ops, index)
    for data in glob.glob(data_file_glob(prefix)):
        _remove_quietly(ops, data)


def _has_owner_record(path: str) -> bool:
    try:
        with open(os.path.join(path, OWNER)) as f:
            return _owner_state(f.read())[0] != "unknown"
    except (OSError, UnicodeDecodeError):
        return False


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
    for name in names:
        path = os.path.join(directory, name)
        if _STATE_TMP_RE.match(name):
            try:
                if now - os.stat(path).st_mtime >= ORPHAN_AGE:
                    _remove_quietly(ops, path)
            except OSError:
                pass
            continue
        m = TEMP_RE.match(name)
        if m is None:
            continue
        try:
            with open(os.path.join(path, OWNER)) as f:
                state, deleting, state_file = _owner_state(f.read())
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            state, deleting, state_file = "unknown", False, None
        except OSError:
            continue
        if state == "unknown":
            try:
                state = "dead" if now - os.stat(path).st_mtime >= ORPHAN_AGE else "alive"
            except OSError:
                continue
        if state != "dead":
            continue
        known = state_file is not None or deleting or _has_owner_record(path)
        _finish_for_dead_owner(ops, os.path.join(directory, m.group("base")), deleting, state_file, known)
        try:
            ops.rmtree(path)
            removed.append(path)
        except OSError:
            pass
    return removed


