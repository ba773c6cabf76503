"""The fault-injection seam: every file operation of a save goes through its ``FileOps``.

* While a save runs (sharded over four virtual devices, replacing a prefix,
  cleaning a stale temp directory, applying retention), every function that can
  change the file system (``os.open`` for writing, ``os.write``, ``os.fsync``,
  ``os.rename``, ``os.remove``, ``os.mkdir``, ``os.rmdir``, ``shutil.rmtree``, ``open``
  for writing, ...) is watched: each call must come from inside a method of the
  save's ``FileOps``. A restore changes nothing at all.
* The phases are reported in the order ``gpusaver.pipeline`` documents.
* A failure raised at any phase (the in-process counterpart of the crashes in
  ``test_rel_crash_phases.py``): before the commit point the save raises, the new
  prefix is not a checkpoint, the previous one restores bit-identically, the
  save's temp directory is gone and the next save succeeds; at or after it, the
  new checkpoint is complete.
"""

from __future__ import annotations

import builtins
import errno
import os
import re
import shutil
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import gpusaver as gs
import gpusaver.pipeline
from gpusaver.storage.fileops import PosixFileOps
from gpusaver.format import BundleWriter, merge_bundles
import relkit

SPECS = relkit.SPECS["small"]
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_inside = threading.local()


class SeamOps(PosixFileOps):
    """POSIX file operations that mark the calling thread as inside the seam."""


def _marked(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_inside, "depth", 0)
        _inside.depth = depth + 1
        try:
            return fn(self, *args, **kwargs)
        finally:
            _inside.depth = depth

    return call


for _name in ("phase", "create", "write", "pwrite", "fsync", "close", "rename", "remove", "mkdir", "rmdir", "rmtree", "fsync_dir"):
    setattr(SeamOps, _name, _marked(getattr(PosixFileOps, _name)))


@contextmanager
def watch_mutations() -> Iterator[list[str]]:
    """Records every file-system mutation made outside a :class:`SeamOps` method."""
    outside: list[str] = []
    patched: list[tuple[Any, str, Any]] = []

    def guard(owner: Any, name: str, is_mutation: Callable[..., bool] = lambda *a, **k: True) -> None:
        real = getattr(owner, name, None)
        if real is None:
            return

        def call(*args: Any, **kwargs: Any) -> Any:
            if not getattr(_inside, "depth", 0) and is_mutation(*args, **kwargs):
                outside.append(f"{getattr(owner, '__name__', owner)}.{name}{args[:2]!r}")
            return real(*args, **kwargs)

        patched.append((owner, name, real))
        setattr(owner, name, call)

    for name in ("write", "writev", "pwrite", "pwritev", "fsync", "fdatasync", "rename", "replace", "remove",
                 "unlink", "rmdir", "mkdir", "makedirs", "truncate", "ftruncate", "link", "symlink", "chmod",
                 "utime", "removedirs", "renames"):
        guard(os, name)
    guard(os, "open", lambda path, flags, *a, **k: bool(flags & _WRITE_FLAGS))
    guard(shutil, "rmtree")
    guard(shutil, "move")
    guard(builtins, "open", lambda file, mode="r", *a, **k: isinstance(mode, str) and any(c in mode for c in "wax+"))
    try:
        yield outside
    finally:
        for owner, name, real in reversed(patched):
            setattr(owner, name, real)


def _saver(arrays: dict[str, np.ndarray], **kwargs: Any) -> gs.Saver:
    return relkit.make_saver(arrays, SPECS, max_to_keep=2, save_relative_paths=True, **kwargs)


def test_every_mutation_of_a_save_goes_through_fileops(tmp_path) -> None:
    directory = str(tmp_path)
    arrays = relkit.zeros(SPECS)
    saver = _saver(arrays)
    for step in (1, 2):
        relkit.fill(arrays, SPECS, step)
        saver.save(os.path.join(directory, "model"), global_step=step)
    stale = os.path.join(directory, f"model-9_temp_{'0' * 32}")
    os.mkdir(stale)
    with open(os.path.join(stale, "part-00000-of-00001.data-00000-of-00001"), "wb") as f:
        f.write(b"x")
    os.utime(stale, (0, 0))  # owner-less and old: stale
    saver = _saver(arrays, fileops=SeamOps())
    saver.recover_last_checkpoints([os.path.join(directory, "model-1"), os.path.join(directory, "model-2")])
    with watch_mutations() as outside:
        for step in (2, 3):  # replaces model-2, then retention drops model-1
            relkit.fill(arrays, SPECS, step)
            saver.save(os.path.join(directory, "model"), global_step=step)
    assert not outside, f"file operations outside the FileOps: {outside}"
    assert not os.path.exists(stale) and not os.path.exists(os.path.join(directory, "model-1.index"))
    relkit.assert_restores(gs.latest_checkpoint(directory), SPECS, 3)
    restored = relkit.zeros(SPECS)
    with watch_mutations() as outside:
        relkit.make_saver(restored, SPECS).restore(os.path.join(directory, "model-3"))
        with gs.load_checkpoint(directory) as reader:
            reader.get_tensor("d0/w")
    assert not outside, f"a restore changed the file system: {outside}"


def test_merge_bundles_goes_through_fileops(tmp_path) -> None:
    parts = []
    for k in range(2):
        prefix = str(tmp_path / f"in{k}" / "part")
        with BundleWriter(prefix, fileops=SeamOps()) as w:
            w.add(f"t{k}", np.arange(5, dtype=np.int32) + k)
        parts.append(prefix)
    with watch_mutations() as outside:
        merge_bundles(parts, str(tmp_path / "merged"), fileops=SeamOps())
    assert not outside, f"file operations outside the FileOps: {outside}"


def test_watch_mutations_sees_a_bypass(tmp_path) -> None:
    """The watcher has teeth."""
    with watch_mutations() as outside:
        with open(tmp_path / "x", "w") as f:
            f.write("x")
        os.remove(tmp_path / "x")
        SeamOps().mkdir(str(tmp_path / "inside"))
    assert len(outside) == 2 and os.path.isdir(tmp_path / "inside")


def _generic(phase: str) -> str:
    return re.sub(r"^retention:removed:.*$", "retention:removed:<prefix>", re.sub(r":\d+$", ":<k>", phase))


def test_phases_come_in_the_documented_order(tmp_path) -> None:
    documented = re.findall(r"``([a-z_]+:[a-z_:<>]+)``", gpusaver.pipeline.__doc__ or "")
    directory = str(tmp_path)
    arrays = relkit.zeros(SPECS)
    ops = relkit.EventOps(directory)
    saver = _saver(arrays, fileops=ops)
    for step in (1, 2, 2, 3):  # the third save replaces model-2, the fourth drops model-1
        saver.save(os.path.join(directory, "model"), global_step=step)
    phases = [_generic(e[len("phase:"):]) for e, _ in ops.trace if e.startswith("phase:")]
    compressed = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    saves = []
    for p in compressed:
        if p == "save:start":
            saves.append([])
        saves[-1].append(p)
    for seq in saves:
        positions = [documented.index(p) for p in seq]
        assert positions == sorted(positions), f"phases out of the documented order: {seq}"
    assert any("merge:old_index_removed" in s for s in saves) and any("retention:removed:<prefix>" in s for s in saves)


def _template(directory: str) -> None:
    arrays = relkit.zeros(SPECS)
    saver = relkit.make_saver(arrays, SPECS, max_to_keep=3, save_relative_paths=True)
    for step in (1, 2, 3):
        relkit.fill(arrays, SPECS, step)
        saver.save(os.path.join(directory, "model"), global_step=step)


def _save4(directory: str, ops: Any) -> str:
    arrays = relkit.zeros(SPECS)
    saver = relkit.make_saver(arrays, SPECS, max_to_keep=3, save_relative_paths=True, fileops=ops)
    saver.recover_last_checkpoints(list(gs.get_checkpoint_state(directory).all_model_checkpoint_paths))
    relkit.fill(arrays, SPECS, 4)
    return saver.save(os.path.join(directory, "model"), global_step=4)


PRE_COMMIT = {"save:start", "shard:written:<k>", "merge:start", "merge:locked", "merge:data_renamed:<k>", "merge:index_written",
              "merge:index_fsynced", "merge:before_index_rename"}
UNRECORDED = PRE_COMMIT | {"merge:index_renamed", "merge:dir_fsynced", "save:committed"}


@pytest.mark.parametrize("error", [OSError(errno.EIO, "injected"), KeyboardInterrupt()], ids=["EIO", "interrupt"])
def test_a_failure_at_each_phase(tmp_path, error: BaseException) -> None:
    template = str(tmp_path / "template")
    os.mkdir(template)
    _template(template)
    trace_ops = relkit.EventOps(str(tmp_path / "trace"))
    shutil.copytree(template, tmp_path / "trace")
    _save4(str(tmp_path / "trace"), trace_ops)
    phases = [e for e, _ in trace_ops.trace if e.startswith("phase:")]
    problems = []
    for i, phase in enumerate(phases):
        directory = str(tmp_path / f"p{i}")
        shutil.copytree(template, directory)
        ops = RaiseAt(directory, phase, error)
        state_before = open(os.path.join(directory, "checkpoint"), "rb").read()
        try:
            _save4(directory, ops)
            problems.append(f"{phase}: the save did not raise")
            continue
        except BaseException as e:  # noqa: BLE001 - checked below
            if isinstance(error, OSError) and not (isinstance(e, OSError) and e.errno == errno.EIO):
                problems.append(f"{phase}: raised {e!r}")
            if not isinstance(error, OSError) and not isinstance(e, KeyboardInterrupt):
                problems.append(f"{phase}: raised {e!r}")
        new = os.path.join(directory, "model-4")
        # A failure before the state file names model-4 leaves no model-4: before the commit
        # point nothing was committed, after it the save takes its commit back.
        if _generic(phase[len("phase:"):]) in UNRECORDED:
            if gs.checkpoint_exists(new):
                problems.append(f"{phase}: model-4 exists")
            if open(os.path.join(directory, "checkpoint"), "rb").read() != state_before:
                problems.append(f"{phase}: the state file changed")
            if relkit.debris(directory)["temp_dirs"]:
                problems.append(f"{phase}: the failed save left its temp dir")
        elif relkit.restore_mismatches(new, SPECS, 4):
            problems.append(f"{phase}: model-4 does not restore after the commit")
        for step in (2, 3):
            if relkit.restore_mismatches(os.path.join(directory, f"model-{step}"), SPECS, step):
                problems.append(f"{phase}: model-{step} does not restore")
        arrays = relkit.zeros(SPECS)
        relkit.fill(arrays, SPECS, 5)
        saver = relkit.make_saver(arrays, SPECS, max_to_keep=3, save_relative_paths=True)
        saver.save(os.path.join(directory, "model"), global_step=5)
        if relkit.step_of(gs.latest_checkpoint(directory)) != 5 or relkit.debris(directory)["temp_dirs"]:
            problems.append(f"{phase}: the next save did not recover cleanly")
        shutil.rmtree(directory)
    assert len(phases) >= 14
    assert not problems, "\n".join(problems)


class RaiseAt(relkit.EventOps):
    """Raises ``error`` (once) when the save reaches ``phase``."""

    def __init__(self, root: str, phase: str, error: BaseException) -> None:
        super().__init__(root)
        self.target, self.error, self.fired = phase, error, False

    def hook(self, event: str, when: str) -> None:
        if event == self.target and not self.fired:
            self.fired = True
            raise self.error
