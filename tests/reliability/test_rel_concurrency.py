"""Several savers in one directory: all commit, none touches another's temp directory,
shards never mix, and stale temp directories are cleaned up safely.

* Four processes save distinct prefixes (each with its own state file) at the
  same time, pausing inside each save so that saves' clean-ups of stale temp
  directories run while the others' are live; all commit, and a reader polling
  meanwhile only ever sees complete checkpoints holding its own values. Half way,
  each holds its save (temp directory live) until the reader has read all four
  prefixes and checked that a clean-up keeps the four live temp directories, so
  the reads and the overlap happen however the processes are scheduled.
* A save held in the middle keeps its temp directory through another process's
  saves and explicit ``clean_stale_temp_dirs`` calls, even when it looks old.
* Two threads of one process save different prefixes concurrently.
* The stale-directory rules one by one: a live owner (same host, pid and start
  time) is kept, a dead one removed, a reused pid removed, another host kept, an
  owner-less directory kept while young and removed once old.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

import gpusaver as gs
from gpusaver.pipeline import clean_stale_temp_dirs
import relkit

SPECS = relkit.SPECS["small"]


def _check_prefix(directory: str, name: str, salt: int, steps: int) -> list[str]:
    problems = []
    latest = gs.latest_checkpoint(directory, f"state_{name}")
    if relkit.step_of(latest) != steps - 1:
        problems.append(f"{name}: latest is {latest}")
    state = gs.get_checkpoint_state(directory, f"state_{name}")
    for prefix in list(state.all_model_checkpoint_paths) if state else []:
        bad = relkit.restore_mismatches(prefix, SPECS, relkit.step_of(prefix), salt)
        if bad:
            problems.append(f"{prefix}: holds values of another save in {bad}")
    return problems


def test_processes_saving_distinct_prefixes_all_commit(tmp_path, forkserver: relkit.ForkServer) -> None:
    directory = str(tmp_path / "ckpt")
    os.mkdir(directory)
    names, steps, hold = ["p0", "p1", "p2", "p3"], 8, 4
    gate = str(tmp_path / "gate")
    ready = {n: str(tmp_path / f"ready_{n}") for n in names}
    pids = [forkserver.spawn({"kind": "concurrent", "dir": directory, "scale": "small", "name": n, "salt": j,
                              "steps": steps, "pause": 0.003, "gate": gate, "ready": ready[n], "hold_step": hold})
            for j, n in enumerate(names)]
    seen: list[str] = []
    reads = reads_while_held = 0
    held_temp_dirs: list[str] = []
    cleaned_while_held: list[str] | None = None
    deadline = time.monotonic() + relkit.HANG_GUARD  # a hang guard, never reached by a slow machine
    done: set[str] = set()
    try:
        while len(done) < len(names):
            assert time.monotonic() < deadline, f"the savers did not finish:\n{forkserver.log()}"
            gone = {n for n, pid in zip(names, pids) if relkit.exited(pid)}
            all_held = not os.path.exists(gate) and all(os.path.exists(ready[n]) for n in names)
            for j, n in enumerate(names):
                latest = gs.latest_checkpoint(directory, f"state_{n}")
                if latest is None:
                    continue
                reads += 1
                reads_while_held += all_held
                try:
                    bad = relkit.restore_mismatches(latest, SPECS, relkit.step_of(latest), j)
                except gs.GpuSaverError as e:
                    # A slow reader may lose the race with retention (max_to_keep=2): fine only
                    # if two newer checkpoints were committed meanwhile.
                    newest = relkit.step_of(gs.latest_checkpoint(directory, f"state_{n}"))
                    bad = [] if newest >= relkit.step_of(latest) + 2 else [repr(e)]
                if bad:
                    seen.append(f"reader saw {latest} holding other values in {bad}")
                if relkit.step_of(latest) == steps - 1:
                    done.add(n)
            if all_held:
                # Every saver is inside a save with its temp directory live: a clean-up keeps them all.
                held_temp_dirs = relkit.debris(directory)["temp_dirs"]
                cleaned_while_held = clean_stale_temp_dirs(directory)
                open(gate, "w").close()
            if gone - done:
                break  # a saver ended early: its exit code says why
    finally:
        open(gate, "w").close()
    codes = [forkserver.wait(pid) for pid in pids]
    assert codes == [0] * len(names), forkserver.log()
    assert not seen, "\n".join(seen)
    # The reader read every prefix while all four saves were held half way, and again at the end.
    assert reads_while_held == len(names) and reads > len(names), (reads_while_held, reads)
    assert len(held_temp_dirs) == len(names) and cleaned_while_held == [], (held_temp_dirs, cleaned_while_held)
    problems = [p for j, n in enumerate(names) for p in _check_prefix(directory, n, j, steps)]
    assert not problems, "\n".join(problems)
    keep = {f"state_{n}" for n in names}
    for n in names:
        state = gs.get_checkpoint_state(directory, f"state_{n}")
        for prefix in state.all_model_checkpoint_paths:
            base = os.path.basename(prefix)
            keep |= {f for f in os.listdir(directory) if f == base + ".index" or f.startswith(base + ".data-")}
    assert sorted(set(os.listdir(directory)) - keep) == []


def test_a_live_save_keeps_its_temp_dir_through_other_saves(tmp_path, forkserver: relkit.ForkServer) -> None:
    directory = str(tmp_path / "ckpt")
    os.mkdir(directory)
    gate, ready = str(tmp_path / "gate"), str(tmp_path / "ready")
    held = forkserver.spawn({"kind": "concurrent", "dir": directory, "scale": "small", "name": "held", "salt": 1,
                             "steps": 1, "gate": gate, "ready": ready})
    try:
        assert relkit.wait_until(lambda: os.path.exists(ready), held, "the held save"), forkserver.log()
        temp_dirs = relkit.debris(directory)["temp_dirs"]
        assert len(temp_dirs) == 1
        with open(os.path.join(directory, temp_dirs[0], "OWNER")) as f:
            host, pid, *_ = f.read().split()
        assert (host, int(pid)) == (socket.gethostname(), held), "OWNER does not name the saving process"
        relkit.age_everything(directory)  # old, but its owner is alive
        assert clean_stale_temp_dirs(directory) == []
        code = forkserver.run({"kind": "concurrent", "dir": directory, "scale": "small", "name": "other",
                               "salt": 2, "steps": 3})
        assert code == 0, forkserver.log()
        assert relkit.debris(directory)["temp_dirs"] == temp_dirs
    finally:
        open(gate, "w").close()
    assert forkserver.wait(held) == 0, forkserver.log()
    assert not _check_prefix(directory, "held", 1, 1) and not _check_prefix(directory, "other", 2, 3)
    assert relkit.debris(directory)["temp_dirs"] == []


def test_threads_saving_distinct_prefixes_never_mix(tmp_path) -> None:
    directory = str(tmp_path)
    errors: list[BaseException] = []

    def run(name: str, salt: int) -> None:
        try:
            relkit.job_concurrent({"dir": directory, "scale": "small", "name": name, "salt": salt, "steps": 6,
                                   "pause": 0.001})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f"t{j}", j)) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    problems = [p for j in range(3) for p in _check_prefix(directory, f"t{j}", j, 6)]
    assert not problems, "\n".join(problems)
    assert relkit.debris(directory)["temp_dirs"] == []


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()[19].decode()


def _temp_dir(directory: str, owner: str | None, age: float = 0.0,
              files: tuple[str, ...] = ("part-00000-of-00001.data-00000-of-00001",)) -> str:
    name = f"model-1_temp_{uuid.uuid4().hex}"
    path = os.path.join(directory, name)
    os.mkdir(path)
    for file in files:
        with open(os.path.join(path, file), "wb") as f:
            f.write(b"x")
    if owner is not None:
        with open(os.path.join(path, "OWNER"), "w") as f:
            f.write(owner)
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return name


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to tell process start times")
def test_stale_temp_dir_rules(tmp_path) -> None:
    directory = str(tmp_path)
    host = socket.gethostname()
    # A live process until killed, however long the test takes (it blocks reading its stdin).
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = f"{host} {sleeper.pid} {_start_time(sleeper.pid)}\n"
        keep = {
            _temp_dir(directory, live, age=7200): "live owner, old",
            _temp_dir(directory, f"{host} {os.getpid()} {_start_time(os.getpid())}\n"): "this process",
            _temp_dir(directory, f"another-host-{uuid.uuid4().hex[:6]} 1 1\n", age=7200): "another host",
            _temp_dir(directory, None): "no owner, young",
            # A temp-like name whose contents are not a save's is not ours (a user's directory).
            _temp_dir(directory, None, age=7200, files=("best.index", "notes.txt")): "a user's directory, old",
        }
        go = {
            _temp_dir(directory, f"{host} {sleeper.pid} 1\n"): "pid reused (other start time)",
            _temp_dir(directory, None, age=7200): "its owner record gone (a removal cut short), old",
            _temp_dir(directory, None, age=7200, files=("OWNER.tmp",)): "died writing its owner record, old",
            _temp_dir(directory, None, age=7200, files=()): "empty, old",
        }
        os.mkdir(os.path.join(directory, "model-1_temp_notahexid"))
        with open(os.path.join(directory, f"model-1_temp_{uuid.uuid4().hex}"), "w") as f:
            f.write("a file, not a directory")
        bystanders = sorted(n for n in os.listdir(directory) if n not in keep and n not in go)
        removed = sorted(os.path.basename(p) for p in clean_stale_temp_dirs(directory))
        assert removed == sorted(go), {go.get(n, keep.get(n, n)) for n in set(removed) ^ set(go)}
        assert sorted(os.listdir(directory)) == sorted(list(keep) + bystanders)
        sleeper.kill()
        sleeper.wait()
        removed = [os.path.basename(p) for p in clean_stale_temp_dirs(directory)]
        assert [keep[n] for n in removed] == ["live owner, old"]
    finally:
        sleeper.kill()
        sleeper.wait()
        sleeper.stdin.close()


@pytest.mark.parametrize("record", ["", "garbage\n", f"{socket.gethostname()} notapid 5\n"],
                         ids=["empty", "garbage", "bad-pid"])
def test_temp_dir_with_unreadable_owner_record_goes_once_stale(tmp_path, record: str) -> None:
    name = _temp_dir(str(tmp_path), record, age=7200)
    assert [os.path.basename(p) for p in clean_stale_temp_dirs(str(tmp_path))] == [name]
