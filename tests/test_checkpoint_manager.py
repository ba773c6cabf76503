"""CheckpointManager: a numbered series that survives restarts, and never deletes another writer's files.

* real restarts: a child process saving steps 1..N (max_to_keep=3) is SIGKILLed right after a
  commit before the state file is written, after the state file before retention, after a save
  returned, and at an arbitrary instant of a save; a new process with a new manager continues:
  exactly the 3 newest remain, latest_step() is right, restore gives the last saved values;
* a directory left by a Saver that forgot its old checkpoints on a restart is trimmed by the next save;
* random sequences of save / restart / restore (hypothesis) match a model, and foreign files,
  another prefix's checkpoint and a user's temp-like directory are never touched;
* torch + AdamW trained, killed, resumed in a new process: the losses after the resume are those
  of an uninterrupted run, bit for bit;
* async_save: returns once captured, next call waits, an error is raised by the next call once;
* keep_checkpoint_every_n_hours with a controllable clock, across a restart;
* two managers (threads, processes) of distinct prefixes on one directory keep both series;
* bad input is refused with typed errors before anything is written.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gpusaver import checkpoint_management as cm
from gpusaver.api import flatten
from gpusaver.checkpoint_manager import CheckpointManager
from gpusaver.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    InvalidCheckpointPathError,
)
from gpusaver.pipeline.tempdirs import make_temp_dir
from gpusaver.storage.fileops import POSIX, PosixFileOps

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_manager_worker.py")
HANG_GUARD = 300  # seconds; only a guard against a hang, never a timing expectation


def state(step: int) -> dict:
    return {"w": np.full(4, float(step)), "b": {"n": np.array([step], np.int64)}}


def steps_on_disk(directory, prefix: str = "ckpt") -> list[int]:
    out = []
    for name in os.listdir(directory):
        if name.startswith(prefix + "-") and name.endswith(".index"):
            middle = name[len(prefix) + 1 : -len(".index")]
            if middle.isdigit() and (middle == "0" or not middle.startswith("0")):
                out.append(int(middle))
    return sorted(out)


def listed(directory, prefix: str = "ckpt") -> list[int]:
    st_ = cm.get_checkpoint_state(str(directory))
    if st_ is None:
        return []
    return [int(os.path.basename(p).rsplit("-", 1)[1]) for p in st_.all_model_checkpoint_paths
            if os.path.basename(p).startswith(prefix + "-")]


def run_worker(job: dict, *, expect_kill: bool = False) -> list[str]:
    done = subprocess.run([sys.executable, WORKER, json.dumps(job)], capture_output=True, text=True,
                          timeout=HANG_GUARD)
    if expect_kill:
        assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr)
    else:
        assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def snapshot_files(directory) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, directory)] = fh.read()
    return out


# ------------------------------------------------------------------ restarts
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    "phase,step",
    [("save:committed", 5), ("state:written", 5), ("returned", 5), ("save:committed", 2), ("state:written", 4)],
)
def test_a_process_killed_at_a_phase_is_continued_by_a_new_process_keeping_exactly_the_newest(
    tmp_path, phase, step, async_save
):
    d = str(tmp_path / "run")
    job = {"dir": d, "max_to_keep": 3, "async": async_save, "stop": 9}
    lines = run_worker({**job, "kill_phase": phase, "kill_step": step}, expect_kill=True)
    assert lines[0] == "resumed None"
    # Killed after the commit of `step`: it is on disk, whatever the state file says.
    assert step in steps_on_disk(d)
    if phase == "save:committed":
        assert step not in listed(d)  # the crash this test is about: committed, never recorded
    assert CheckpointManager(d, max_to_keep=3).latest_step() == step

    lines = run_worker(job)
    assert lines[0] == f"resumed {step}"  # and the worker checked restore() == state(step) before going on
    assert lines[-1] == "saved 9"
    assert steps_on_disk(d) == [7, 8, 9]
    assert listed(d) == [7, 8, 9]
    manager = CheckpointManager(d, max_to_keep=3)
    assert manager.latest_step() == 9 and manager.all_steps() == [7, 8, 9]
    back = manager.restore()
    back = flatten(back)
    assert back["w"].tolist() == [9.0] * 4 and back["b/n"].tolist() == [9]
    assert not [n for n in os.listdir(d) if "_temp_" in n]  # no tombstone or temp dir left


def test_a_process_killed_at_an_arbitrary_instant_of_a_save_is_continued(tmp_path):
    d = str(tmp_path / "run")
    job = {"dir": d, "max_to_keep": 3, "stop": 40}
    child = subprocess.Popen([sys.executable, WORKER, json.dumps({**job, "pause_after": 6})],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:  # type: ignore[union-attr]
            if line.strip() == "paused":
                break
        child.stdin.write("\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        child.stdout.readline()  # type: ignore[union-attr]  # "saved 7": it is in the middle of step 8 or later
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=HANG_GUARD)
    before = steps_on_disk(d)
    assert before and before[-1] >= 7
    latest = CheckpointManager(d, max_to_keep=3).latest_step()
    assert latest == before[-1]
    lines = run_worker(job)
    assert lines[0] == f"resumed {latest}"
    assert steps_on_disk(d) == [38, 39, 40] and listed(d) == [38, 39, 40]


def test_a_directory_a_restarted_saver_left_with_too_many_is_trimmed_by_the_next_save(tmp_path):
    import gpusaver as gs

    d = tmp_path / "run"
    d.mkdir()
    for run in (range(1, 4), range(4, 7)):  # two runs of a Saver(max_to_keep=3), no recover_last_checkpoints
        w = np.zeros(3)
        saver = gs.Saver({"w": w}, max_to_keep=3)
        for s in run:
            w[:] = s
            saver.save(str(d / "ckpt"), global_step=s)
    assert steps_on_disk(d) == [1, 2, 3, 4, 5, 6]
    manager = CheckpointManager(d, max_to_keep=3)
    assert manager.all_steps() == [1, 2, 3, 4, 5, 6]
    manager.save(7, {"w": np.full(3, 7.0)})
    assert steps_on_disk(d) == [5, 6, 7] == manager.all_steps() == listed(d)


# ------------------------------------------------------------ property test
FOREIGN = {
    "notes.txt": b"mine",
    "ckpt-007.index": b"not a step of the series (leading zero)",
    "ckpt-3.meta": b"a user's file next to the series",
    "ckpt-x.index": b"x",
    "ckpt-3.index.bak": b"backup",
}


@settings(max_examples=20)
@given(
    max_to_keep=st.one_of(st.none(), st.integers(1, 4)),
    interval=st.integers(1, 3),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("save"), st.integers(0, 3), st.booleans()),
            st.tuples(st.just("restart"), st.one_of(st.none(), st.integers(1, 4)), st.booleans()),
            st.tuples(st.just("restore"), st.integers(0, 5), st.booleans()),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_random_sequences_of_saves_restarts_and_restores_match_the_model(tmp_path_factory, max_to_keep, interval, ops):
    import gpusaver as gs

    d = tmp_path_factory.mktemp("seq")
    for name, data in FOREIGN.items():
        (d / name).write_bytes(data)
    gs.save({"v": np.arange(3.0)}, str(d / "other-2"))  # another prefix's checkpoint
    user_dir = d / ("ckpt-2_temp_" + "ab" * 16)  # a user's directory named like a temp dir
    user_dir.mkdir()
    (user_dir / "data.txt").write_bytes(b"user")
    foreign = snapshot_files(d)

    manager = CheckpointManager(d, max_to_keep=max_to_keep, save_interval_steps=interval)
    keep = max_to_keep
    model: list[int] = []
    next_step = 0
    for op, arg, flag in ops:
        if op == "save":
            step = next_step + arg
            next_step = step + 1
            got = manager.save(step, state(step), force=flag)
            if step % interval and not flag:
                assert got is None
            else:
                assert got == os.path.join(str(d), f"ckpt-{step}")
                model = model + [step]
                if keep is not None:
                    model = model[-keep:]
        elif op == "restart":
            keep = arg
            manager = CheckpointManager(d, max_to_keep=keep, save_interval_steps=interval)
        else:
            if not model:
                with pytest.raises(CheckpointNotFoundError, match="to restore in"):
                    manager.restore()
            else:
                step = model[-1] if flag else model[arg % len(model)]
                back = manager.restore(None if flag else step)
                assert back["w"].tolist() == [float(step)] * 4
        assert steps_on_disk(d) == model
        assert manager.all_steps() == model
        assert manager.latest_step() == (model[-1] if model else None)
        if model and any(o == "save" for o, *_ in ops):
            assert listed(d) == model or listed(d) == []  # recorded once a save happened since a restart
        now = snapshot_files(d)
        for name, data in foreign.items():
            assert now.get(name) == data, name


def test_a_live_saves_temp_dir_and_another_prefixs_checkpoint_are_never_touched(tmp_path):
    import gpusaver as gs

    d = tmp_path / "run"
    d.mkdir()
    live = make_temp_dir(str(d / "ckpt-1"), POSIX)  # a save of ckpt-1 in progress in this process
    try:
        gs.save({"v": np.ones(2)}, str(d / "ckpt-run2-1"))  # another run whose prefix starts with ours
        manager = CheckpointManager(d, max_to_keep=1)
        for s in range(1, 5):
            manager.save(s, state(s))
        assert os.path.isdir(live.path) and os.path.exists(os.path.join(live.path, "OWNER"))
        assert os.path.exists(d / "ckpt-run2-1.index")
        assert steps_on_disk(d) == [4]
    finally:
        live.remove(POSIX)


# ------------------------------------------------------------------- torch
def test_torch_adamw_killed_and_resumed_in_a_new_process_gives_identical_losses(tmp_path):
    pytest.importorskip("torch")

    def losses(lines):
        return {int(l.split()[1]): l.split()[2] for l in lines if l.startswith("loss ")}

    whole = losses(run_worker({"dir": str(tmp_path / "whole"), "kind": "torch", "stop": 8}))
    d = str(tmp_path / "cut")
    job = {"dir": d, "kind": "torch", "stop": 8, "max_to_keep": 2}
    first = losses(run_worker({**job, "kill_phase": "save:committed", "kill_step": 5}, expect_kill=True))
    lines = run_worker(job)
    assert lines[0] == "resumed 5"
    second = losses(lines)
    assert sorted(first) == [1, 2, 3, 4, 5] and sorted(second) == [6, 7, 8]
    assert {**first, **second} == whole
    assert steps_on_disk(d) == [7, 8]


# ------------------------------------------------------------------- async
class FailingOps(PosixFileOps):
    """Fails the creation of a data file once armed (ENOSPC)."""

    def __init__(self) -> None:
        self.armed = False
        self.phases: list[str] = []

    def phase(self, name: str) -> None:
        self.phases.append(name)

    def create(self, path: str) -> int:
        if self.armed and ".data-" in path:
            self.armed = False
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return super().create(path)


def test_async_save_returns_a_captured_state_and_the_next_call_waits(tmp_path):
    manager = CheckpointManager(tmp_path, max_to_keep=2, async_save=True)
    tree = state(1)
    assert manager.save(1, tree) == os.path.join(str(tmp_path), "ckpt-1")
    tree["w"][:] = -1.0  # changed the moment save returned: the checkpoint holds the old values
    for s in (2, 3):
        manager.save(s, state(s))  # waits for the previous save first
    with pytest.raises(InvalidArgumentError, match="exists already"):
        manager.save(3, state(3))  # the pending step counts
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3] == steps_on_disk(tmp_path) == listed(tmp_path)
    assert manager.restore(3)["w"].tolist() == [3.0] * 4
    manager.close()
    m1 = CheckpointManager(tmp_path / "b", async_save=True)
    m1.save(1, tree)
    assert m1.restore()["w"].tolist() == [-1.0] * 4  # restore waits for the pending save
    m1.close()


def test_an_async_save_error_is_raised_by_the_next_call_once_and_commits_nothing(tmp_path):
    ops = FailingOps()
    manager = CheckpointManager(tmp_path, max_to_keep=2, async_save=True, fileops=ops)
    manager.save(1, state(1))
    manager.wait_until_finished()
    ops.armed = True
    manager.save(2, state(2))
    with pytest.raises(CheckpointWriteError) as e:
        manager.save(3, state(3))
    assert e.value.errno == errno.ENOSPC
    assert steps_on_disk(tmp_path) == [1] == manager.all_steps()
    manager.save(3, state(3))  # raised once: the next save goes on
    manager.close()
    assert steps_on_disk(tmp_path) == [1, 3] == listed(tmp_path)


# ------------------------------------------------------- keep hours (clock)
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_keep_every_n_hours_keeps_one_per_interval_for_good_across_restarts(tmp_path, async_save):
    clock = Clock()
    kw = dict(max_to_keep=2, keep_checkpoint_every_n_hours=1, async_save=async_save, clock=clock)
    manager = CheckpointManager(tmp_path, **kw)  # constructed at t=0: the first hour starts here
    for s in range(1, 7):
        clock.now = s * 1800.0  # every half hour
        manager.save(s, state(s))
        manager.wait_until_finished()
    # As TensorFlow 2: 1 (0.5 h) dropped, 2 (1 h) kept for good, 3 (1.5 h) dropped, 4 (2 h) kept for good.
    assert steps_on_disk(tmp_path) == [2, 4, 5, 6] == manager.all_steps()
    manager.close()
    manager = CheckpointManager(tmp_path, **kw)
    assert manager.all_steps() == [2, 4, 5, 6]
    clock.now = 7 * 1800.0
    manager.save(7, state(7))  # 5 (2.5 h) leaves the window: not an hour after 4: dropped
    manager.wait_until_finished()
    assert steps_on_disk(tmp_path) == [2, 4, 6, 7]
    for s in range(8, 11):
        clock.now = s * 1800.0
        manager.save(s, state(s))
        manager.wait_until_finished()
    assert steps_on_disk(tmp_path) == [2, 4, 6, 8, 9, 10]
    manager.close()


def test_a_clock_that_stands_still_does_not_make_recent_checkpoints_kept_for_good(tmp_path):
    clock = Clock()  # always 0
    manager = CheckpointManager(tmp_path, max_to_keep=2, keep_checkpoint_every_n_hours=1, clock=clock)
    for s in range(1, 4):
        manager.save(s, state(s))
    manager = CheckpointManager(tmp_path, max_to_keep=2, keep_checkpoint_every_n_hours=1, clock=clock)
    manager.save(4, state(4))
    assert steps_on_disk(tmp_path) == [3, 4]


# ------------------------------------------------------------- concurrency
def test_two_managers_of_distinct_prefixes_in_threads_keep_both_series(tmp_path):
    errors: list[BaseException] = []

    def run(prefix: str) -> None:
        try:
            m = CheckpointManager(tmp_path, max_to_keep=2, prefix=prefix)
            for s in range(1, 9):
                m.save(s, state(s))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD)
    assert not errors
    for p in ("a", "b"):
        assert steps_on_disk(tmp_path, p) == [7, 8] == listed(tmp_path, p)
        assert CheckpointManager(tmp_path, prefix=p).all_steps() == [7, 8]


def test_two_processes_of_distinct_prefixes_keep_both_series(tmp_path):
    d = str(tmp_path)
    children = [
        subprocess.Popen([sys.executable, WORKER, json.dumps({"dir": d, "prefix": p, "stop": 12, "max_to_keep": 3})],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for p in ("left", "right")
    ]
    for c in children:
        _, err = c.communicate(timeout=HANG_GUARD)
        assert c.returncode == 0, err
    for p in ("left", "right"):
        assert steps_on_disk(d, p) == [10, 11, 12] == listed(d, p)


# ---------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_typed_errors_before_anything_is_written(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        CheckpointManager(a_file)
    for kw, error in [
        ({"max_to_keep": 0}, InvalidArgumentError),
        ({"max_to_keep": -1}, InvalidArgumentError),
        ({"max_to_keep": True}, InvalidArgumentTypeError),
        ({"max_to_keep": 2.0}, InvalidArgumentTypeError),
        ({"save_interval_steps": 0}, InvalidArgumentError),
        ({"keep_checkpoint_every_n_hours": -1}, InvalidArgumentError),
        ({"keep_checkpoint_every_n_hours": "2"}, InvalidArgumentTypeError),
        ({"prefix": "a/b"}, InvalidArgumentError),
        ({"prefix": ""}, InvalidArgumentError),
    ]:
        with pytest.raises(error):
            CheckpointManager(tmp_path / "d", **kw)
    manager = CheckpointManager(tmp_path / "d")
    for step, error in [(-1, InvalidArgumentError), (True, InvalidArgumentTypeError),
                        (1.0, InvalidArgumentTypeError), ("1", InvalidArgumentTypeError)]:
        with pytest.raises(error):
            manager.save(step, state(1))
    with pytest.raises(CheckpointNotFoundError, match="to restore in") as e:
        manager.restore()
    assert str(tmp_path / "d") in str(e.value)
    assert not os.path.exists(tmp_path / "d")  # nothing written
    manager.save(np.int64(3), state(3))
    with pytest.raises(InvalidArgumentError, match="exists already"):
        manager.save(3, state(3))
    with pytest.raises(InvalidArgumentError, match="not newer"):
        manager.save(2, state(2))
    with pytest.raises(InvalidCheckpointPathError, match="no checkpoint of step 1"):
        manager.restore(1)
    assert manager.all_steps() == [3]


def test_restore_into_a_tree_in_place(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(5, state(5))
    into = {"w": np.zeros(4), "b": {"n": np.zeros(1, np.int64)}}
    back = manager.restore(into=into)
    assert back["w"] is into["w"] and into["w"].tolist() == [5.0] * 4 and into["b"]["n"].tolist() == [5]
    assert manager.checkpoints == [os.path.join(str(tmp_path), "ckpt-5")]
    assert manager.directory == str(tmp_path)


def test_an_async_save_restores_the_same_tree_as_a_synchronous_one(tmp_path):
    tree = {"w": np.arange(3.0), "b": {"n": np.array([7], np.int64)}}
    got = []
    for async_save in (False, True):
        manager = CheckpointManager(tmp_path / str(async_save), async_save=async_save)
        manager.save(1, tree)
        got.append(manager.restore())
        manager.close()
    sync, background = got
    assert type(sync) is type(background) and sorted(sync) == sorted(background)
    assert {k: v.tolist() for k, v in flatten(sync).items()} == {k: v.tolist() for k, v in flatten(background).items()}


def test_two_managers_of_one_prefix_taking_turns_keep_one_consistent_series(tmp_path):
    first = CheckpointManager(tmp_path, max_to_keep=2)
    second = CheckpointManager(tmp_path, max_to_keep=2)  # constructed before first saved anything
    first.save(1, state(1))
    second.save(2, state(2))  # re-reads the directory: step 1 is part of the series
    with pytest.raises(InvalidArgumentError, match="exists already"):
        first.save(2, state(2))  # the other manager's step counts
    with pytest.raises(InvalidArgumentError, match="not newer"):
        first.save(0, state(0))
    first.save(3, state(3))
    assert steps_on_disk(tmp_path) == [2, 3] == listed(tmp_path) == first.all_steps()
    assert CheckpointManager(tmp_path).restore(3)["w"].tolist() == [3.0] * 4
