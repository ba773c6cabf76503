"""Power loss, modelled through the FileOps seam (after LevelDB's fault-injection env).

A :class:`Journal` runs every file operation of five saves and records it, with
the bytes written. :class:`Disk` replays any prefix of that journal and answers
what a power cut at that instant leaves on stable storage:

* data not fsynced is lost (a file keeps what its last ``fsync`` covered);
* creations, renames and removals in a directory not followed by an fsync of
  that directory are undone.

The surviving files are written into a fresh directory, and a reader checks
that every save that had returned survived: ``latest_checkpoint()`` is at or
after it and restores bit-identically, as does every checkpoint the state file
lists. That holds with ``durable=True`` (the default) at every cut, under the
full model and under each half of it (file data lost, or directory operations
lost). With ``durable=False`` the model loses saves that returned: that option
trades durability against power loss for speed (a process crash is still safe;
see ``test_rel_kill9.py``).

Also here: the order of durable operations itself (data fsynced before the
index that names it, index fsynced before its rename, directory fsynced after,
state file only then, retention last).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import pytest

import gpusaver as gs
from gpusaver.storage.fileops import PosixFileOps
import relkit

SPECS = relkit.SPECS["small"]
STEPS = range(1, 6)


class Journal(PosixFileOps):
    """POSIX file operations, each recorded in order (one at a time) with the bytes written."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def _run(self, entry: tuple[Any, ...], fn: Any, *args: Any) -> Any:
        with self._lock:
            result = fn(*args)
            self.log.append(entry if entry[0] != "create" else entry + (result,))
            return result

    def create(self, path: str) -> int:
        return self._run(("create", os.path.abspath(path)), super().create, path)

    def write(self, fd: int, buffers: Sequence[Any]) -> None:
        data = b"".join(bytes(b) for b in buffers)
        self._run(("write", fd, data), super().write, fd, buffers)

    def pwrite(self, fd: int, buffers: Sequence[Any], offset: int) -> None:
        data = b"".join(bytes(b) for b in buffers)
        self._run(("pwrite", fd, data, offset), super().pwrite, fd, buffers, offset)

    def fsync(self, fd: int) -> None:
        self._run(("fsync", fd), super().fsync, fd)

    def close(self, fd: int) -> None:
        self._run(("close", fd), super().close, fd)

    def rename(self, src: str, dst: str) -> None:
        self._run(("rename", os.path.abspath(src), os.path.abspath(dst)), super().rename, src, dst)

    def remove(self, path: str) -> None:
        self._run(("remove", os.path.abspath(path)), super().remove, path)

    def mkdir(self, path: str) -> None:
        self._run(("mkdir", os.path.abspath(path)), super().mkdir, path)

    def rmtree(self, path: str) -> None:
        self._run(("rmtree", os.path.abspath(path)), super().rmtree, path)

    def fsync_dir(self, path: str) -> None:
        self._run(("fsync_dir", os.path.abspath(path or ".")), super().fsync_dir, path)

    def mark_returned(self, step: int) -> None:
        with self._lock:
            self.log.append(("returned", step))


@dataclass
class Inode:
    data: bytearray = field(default_factory=bytearray)
    synced: bytes = b""


class Disk:
    """What is on stable storage after a prefix of a journal, under a loss model."""

    def __init__(self, root: str, lose_data: bool = True, lose_dirops: bool = True) -> None:
        self.root = root
        self.lose_data, self.lose_dirops = lose_data, lose_dirops
        self.names: dict[str, Inode] = {}  # path -> inode, as the running system sees it
        self.durable: dict[str, Inode] = {}  # path -> inode, as the disk holds it
        self.fds: dict[int, Inode] = {}

    def apply(self, entry: tuple[Any, ...]) -> None:
        op = entry[0]
        if op == "create":
            ino = self.names[entry[1]] = Inode()
            self.fds[entry[2]] = ino
        elif op == "write":
            self.fds[entry[1]].data += entry[2]
        elif op == "pwrite":
            data, offset = self.fds[entry[1]].data, entry[3]
            if len(data) < offset:
                data += bytes(offset - len(data))
            data[offset : offset + len(entry[2])] = entry[2]
        elif op == "fsync":
            ino = self.fds[entry[1]]
            ino.synced = bytes(ino.data)
        elif op == "rename":
            self.names[entry[2]] = self.names.pop(entry[1])
        elif op == "remove":
            del self.names[entry[1]]
        elif op == "rmtree":
            for p in [p for p in self.names if p.startswith(entry[1] + os.sep)]:
                del self.names[p]
        elif op == "fsync_dir":
            d = entry[1]
            for p in [p for p in self.durable if os.path.dirname(p) == d]:
                del self.durable[p]
            self.durable.update({p: i for p, i in self.names.items() if os.path.dirname(p) == d})

    def surviving(self) -> dict[str, bytes]:
        """File name -> contents, of the files directly in ``root`` after a power cut now."""
        entries = self.durable if self.lose_dirops else self.names
        return {
            os.path.basename(p): (ino.synced if self.lose_data else bytes(ino.data))
            for p, ino in entries.items()
            if os.path.dirname(p) == self.root
        }


class _NoDirSync(Journal):
    """A broken saver's file operations: directory fsyncs do nothing."""

    def fsync_dir(self, path: str) -> None:
        return None


class _NoFileSync(Journal):
    """A broken saver's file operations: file fsyncs do nothing."""

    def fsync(self, fd: int) -> None:
        return None


def _journal(directory: str, durable: bool, journal: Journal | None = None) -> Journal:
    journal = journal or Journal()
    arrays = relkit.zeros(SPECS)
    saver = relkit.make_saver(arrays, SPECS, max_to_keep=3, save_relative_paths=True, durable=durable, fileops=journal)
    for step in STEPS:
        relkit.fill(arrays, SPECS, step)
        saver.save(os.path.join(directory, "model"), global_step=step)
        journal.mark_returned(step)
    return journal


def _replay(files: dict[str, bytes], directory: str) -> None:
    os.mkdir(directory)
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def _cuts(journal: Journal, root: str, replay_root: str, **model: bool) -> list[str]:
    """Replays a power cut after every journal entry; returns the broken guarantees."""
    disk = Disk(root, **model)
    problems: list[str] = []
    returned = -1
    seen: set[tuple[tuple[str, bytes], ...]] = set()
    for i, entry in enumerate(journal.log):
        if entry[0] == "returned":
            returned = entry[1]
        else:
            disk.apply(entry)
        files = disk.surviving()
        key = (returned,) + tuple(sorted(files.items()))
        if key in seen:
            continue
        seen.add(key)
        replay = os.path.join(replay_root, f"cut{i}")
        _replay(files, replay)
        where = f"power cut after entry {i} ({entry[0]}), last returned save {returned}"
        try:
            latest = gs.latest_checkpoint(replay)
            state = gs.get_checkpoint_state(replay)
        except gs.GpuSaverError as e:
            problems.append(f"{where}: the state file is unreadable: {e!r}")
            continue
        if returned >= 0 and (latest is None or relkit.step_of(latest) < returned):
            problems.append(f"{where}: latest is {latest}")
            continue
        for prefix in ([latest] if latest else []) + (list(state.all_model_checkpoint_paths) if state else []):
            try:
                bad = relkit.restore_mismatches(prefix, SPECS, relkit.step_of(prefix))
            except gs.GpuSaverError as e:
                bad = [repr(e)]
            if bad:
                problems.append(f"{where}: {os.path.basename(prefix)} does not restore: {bad}")
    return problems


@pytest.fixture(scope="module")
def durable_journal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Journal, str]:
    directory = str(tmp_path_factory.mktemp("power") / "ckpt")
    os.mkdir(directory)
    return _journal(directory, durable=True), directory


@pytest.mark.parametrize(
    "model",
    [
        pytest.param({"lose_data": True, "lose_dirops": True}, id="lose-unsynced-data-and-dirops"),
        pytest.param({"lose_data": True, "lose_dirops": False}, id="lose-unsynced-data"),
        pytest.param({"lose_data": False, "lose_dirops": True}, id="lose-unsynced-dirops"),
    ],
)
def test_power_cut_anywhere_keeps_every_returned_save(durable_journal, tmp_path, model) -> None:
    journal, directory = durable_journal
    assert sum(1 for e in journal.log if e[0] == "fsync_dir") >= len(STEPS), "durable saves must fsync directories"
    problems = _cuts(journal, directory, str(tmp_path), **model)
    assert not problems, f"{len(problems)} returned saves lost:\n" + "\n".join(problems[:20])


@pytest.mark.parametrize("broken", [_NoDirSync, _NoFileSync], ids=["no-dir-fsync", "no-file-fsync"])
def test_the_model_catches_a_saver_that_skips_fsyncs(tmp_path, broken) -> None:
    """The check has teeth: the same saves with one kind of fsync dropped lose returned saves."""
    directory = str(tmp_path / "ckpt")
    os.mkdir(directory)
    journal = _journal(directory, durable=True, journal=broken())
    os.mkdir(tmp_path / "replays")
    assert _cuts(journal, directory, str(tmp_path / "replays"))


def test_power_cut_without_durability_loses_returned_saves(tmp_path) -> None:
    """Documents ``durable=False``: no fsync, so a power cut may lose saves that returned."""
    directory = str(tmp_path / "ckpt")
    os.mkdir(directory)
    journal = _journal(directory, durable=False)
    assert not [e for e in journal.log if e[0] in ("fsync", "fsync_dir")], "durable=False still fsyncs"
    disk = Disk(directory)
    for entry in journal.log:
        if entry[0] != "returned":
            disk.apply(entry)
    _replay(disk.surviving(), str(tmp_path / "replay"))
    assert gs.latest_checkpoint(str(tmp_path / "replay")) is None
    # The files themselves are all there and fine: only a power cut loses them.
    assert relkit.step_of(gs.latest_checkpoint(directory)) == STEPS[-1]


def test_durable_operations_are_ordered(durable_journal) -> None:
    """Per save: data fsynced before the index names it; index fsynced, renamed, then the
    directory fsynced; only then the state file (fsynced, renamed, directory fsynced);
    retention last."""
    journal, directory = durable_journal
    log = journal.log
    fd_inode: dict[int, int] = {}
    path_inode: dict[str, int] = {}
    synced: set[int] = set()
    next_inode = 0
    checks: list[str] = []
    dir_synced_after: dict[str, int] = {}  # path renamed into root -> journal position, until the root is fsynced
    state_durable_at: dict[int, int] = {}
    index_durable_at: dict[int, int] = {}
    step = STEPS[0]
    for i, entry in enumerate(log):
        op = entry[0]
        if op == "create":
            fd_inode[entry[2]] = path_inode[entry[1]] = next_inode
            next_inode += 1
        elif op == "fsync":
            synced.add(fd_inode[entry[1]])
        elif op == "rename":
            src, dst = entry[1], entry[2]
            ino = path_inode.pop(src)
            path_inode[dst] = ino
            name = os.path.basename(dst)
            if os.path.dirname(dst) == directory and ino not in synced:
                checks.append(f"entry {i}: {name} renamed into place before its data was fsynced")
            if re.fullmatch(r"model-\d+\.index", name):
                data_files = [p for p in path_inode if p.startswith(dst[: -len(".index")] + ".data-")]
                unsynced = [os.path.basename(p) for p in data_files if path_inode[p] not in synced]
                if not data_files or unsynced:
                    checks.append(f"entry {i}: {name} committed with data files {unsynced or 'missing'} not durable")
            if os.path.dirname(dst) == directory:
                dir_synced_after[name] = i
        elif op == "fsync_dir" and entry[1] == directory:
            for name in list(dir_synced_after):
                if re.fullmatch(r"model-\d+\.index", name):
                    index_durable_at[int(name[6:-6])] = i
                elif name == "checkpoint":
                    state_durable_at[step] = i
                del dir_synced_after[name]
        elif op == "returned":
            step = entry[1] + 1
        if op == "create" and os.path.basename(entry[1]).startswith("checkpoint.tmp"):
            if step not in index_durable_at:
                checks.append(f"entry {i}: state file of step {step} written before model-{step}.index was durable")
        if op == "remove" and step not in state_durable_at and os.path.basename(entry[1]).startswith("model-"):
            name = os.path.basename(entry[1])
            checks.append(f"entry {i}: retention removed {name} before the state file was durable")
        if op == "returned" and (entry[1] not in state_durable_at or dir_synced_after.get("checkpoint") is not None):
            checks.append(f"save {entry[1]} returned before its state file was durable")
    assert not checks, "\n".join(checks)
