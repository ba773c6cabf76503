"""Real ``kill -9`` at random instants of a process that saves in a loop.

A worker (forked from a warm fork server, so each costs milliseconds, not a
Python start-up) saves steps ``s, s+1, ...`` of variables on four virtual devices
``/cpu:0..3`` with ``sharded=True, max_to_keep=3``, and appends each step to a log
file, fsynced, after ``save()`` returns. The test sends it SIGKILL after a
seeded random delay, ``ROUNDS`` times; each new worker resumes as a restarted
trainer does (adopting the state file's checkpoints). After every kill:

* ``latest_checkpoint()`` exists once any save returned, is never behind the
  last save that returned, and restores bit-identically to the values of its step;
* every checkpoint the state file lists exists and restores bit-identically.

And debris does not accumulate: a temp directory left by a killed save (with
its ``OWNER`` record) is gone once a later save has returned, and after a final save nothing is left but the
checkpoints the state file lists (no temp directory or file, no data file
without its index, no checkpoint that retention forgot).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import pytest

import gpusaver as gs
import relkit

ROUNDS = 240
MAX_DELAY = 0.07  # seconds: about three saves of the "large" variables, fsyncs included
SEED = 20240607


@dataclass
class KillRun:
    directory: str
    kills: int = 0
    returned_saves: int = 0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)  # broken restore guarantees
    debris_events: list[str] = field(default_factory=list)  # temp dirs that outlived a save
    final_listing: list[str] = field(default_factory=list)
    final_listed: list[str] = field(default_factory=list)


def _check(directory: str, log: str, specs: relkit.Spec, where: str, out: list[str]) -> None:
    """Appends to ``out`` every broken guarantee after a kill."""
    logged = relkit.read_log(log)
    latest = gs.latest_checkpoint(directory)
    if logged and latest is None:
        out.append(f"{where}: save of step {logged[-1]} returned, but latest_checkpoint() is None")
        return
    if latest is None:
        return
    if logged and relkit.step_of(latest) < logged[-1]:
        out.append(f"{where}: latest_checkpoint() {latest} is behind step {logged[-1]}, whose save returned")
    state = gs.get_checkpoint_state(directory)
    listed = list(state.all_model_checkpoint_paths) if state is not None else []
    if latest not in listed or len(listed) > 3:
        out.append(f"{where}: state file lists {listed}, latest {latest}")
    for prefix in [latest] + listed:
        try:
            bad = relkit.restore_mismatches(prefix, specs, relkit.step_of(prefix))
        except gs.GpuSaverError as e:
            out.append(f"{where}: {prefix} does not restore: {e!r}")
            continue
        if bad:
            out.append(f"{where}: {prefix} restores values differing from its step in {bad}")


@pytest.fixture(scope="module")
def kill_run(tmp_path_factory: pytest.TempPathFactory, forkserver: relkit.ForkServer) -> KillRun:
    root = tmp_path_factory.mktemp("kill9")
    directory = str(root / "ckpt")
    os.mkdir(directory)
    log = str(root / "returned.log")
    specs = relkit.SPECS["large"]
    job = {"kind": "loop", "dir": directory, "log": log, "scale": "large"}
    run = KillRun(directory)
    rng = random.Random(SEED)
    first_seen: dict[str, int] = {}
    started = time.monotonic()
    for r in range(ROUNDS):
        before = len(relkit.read_log(log))
        pid = forkserver.spawn(job)
        time.sleep(rng.uniform(0.0, MAX_DELAY))
        forkserver.kill(pid)
        code = forkserver.wait(pid)
        assert code == -9, f"round {r}: the saver exited with {code} before the kill:\n{forkserver.log()}"
        run.kills += 1
        _check(directory, log, specs, f"after kill {r}", run.violations)
        returned = len(relkit.read_log(log)) - before
        run.returned_saves += returned
        temp_dirs = relkit.owned_temp_dirs(directory)
        for name in temp_dirs:
            first = first_seen.setdefault(name, r)
            # A save that returned in round r started after the owner of every older
            # temp dir had died, so its clean-up should have removed them.
            if returned and first < r:
                run.debris_events.append(f"round {r}: {name} (left in round {first}) survived a save")
        first_seen = {k: v for k, v in first_seen.items() if k in temp_dirs}
    # The last save runs when everything left is old: debris of any kind is stale.
    relkit.age_everything(directory)
    code = forkserver.run(dict(job, max_saves=1))
    assert code == 0, forkserver.log()
    _check(directory, log, specs, "after the final save", run.violations)
    run.seconds = time.monotonic() - started
    run.final_listing = sorted(os.listdir(directory))
    state = gs.get_checkpoint_state(directory)
    run.final_listed = list(state.all_model_checkpoint_paths) if state is not None else []
    return run


def test_kill9_latest_checkpoint_is_never_behind_and_restores(kill_run: KillRun) -> None:
    assert kill_run.kills == ROUNDS
    assert kill_run.returned_saves > ROUNDS // 10, "too few saves returned: the kills came too early"
    assert not kill_run.violations, "\n".join(kill_run.violations[:20])
    assert kill_run.seconds < 120, f"{ROUNDS} kills took {kill_run.seconds:.0f} s"


def test_kill9_debris_does_not_accumulate(kill_run: KillRun) -> None:
    keep = {"checkpoint"}
    for prefix in kill_run.final_listed:
        base = os.path.basename(prefix)
        keep |= {n for n in kill_run.final_listing if n == base + ".index" or n.startswith(base + ".data-")}
    left = [n for n in kill_run.final_listing if n not in keep]
    assert not kill_run.debris_events, "\n".join(kill_run.debris_events[:10])
    assert not left, f"{len(left)} leftover entries after {kill_run.kills} kills, e.g. {left[:12]}"
