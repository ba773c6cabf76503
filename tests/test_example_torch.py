"""examples/train_torch.py, run as a user runs it: straight through, killed, resumed.

Three subprocesses: an uninterrupted run that writes its final state
(``--final``), a run that SIGKILLs itself at step 23 (``--die-at``), and a
restart that must resume from the step-20 checkpoint and end with parameters
and Adam state bit-identical to the uninterrupted run (``--compare``). A fourth
run checks that the comparison is not vacuous: one flipped bit in Adam's state
of the reference must be reported.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpusaver as gs

# The example needs torch; this process does not (importing it here would only cost seconds).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_torch.py"
HANG_GUARD_S = 300  # only against a hang; no timing is asserted

STEP_LOSS = re.compile(r"^\s*step\s+(\d+)\s+loss\s+(\S+)\s*$", re.MULTILINE)
RESUMED = re.compile(r"^resumed from step (\d+) ", re.MULTILINE)
OK_LINE = "OK: the resumed torch run matches the uninterrupted run exactly"
PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias")  # the two Linear layers of the MLP
ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")


def run(*args: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def losses(stdout: str) -> dict[int, str]:
    return {int(step): loss for step, loss in STEP_LOSS.findall(stdout)}


def show(p: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def test_torch_run_killed_and_resumed_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, ckpts = tmp_path / "reference", tmp_path / "run"
    final = tmp_path / "final" / "state"
    common = ["--steps", 30, "--save-every", 5, "--device", "auto"]

    # 1. Uninterrupted, writing its final state.
    straight = run("--ckpt-dir", reference, *common, "--final", final)
    assert straight.returncode == 0, show(straight)
    assert not RESUMED.findall(straight.stdout), show(straight)
    straight_losses = losses(straight.stdout)
    assert sorted(straight_losses) == list(range(1, 31)), show(straight)

    # 2. Killed at step 23: by SIGKILL, after the step-20 checkpoint, before any later one.
    killed = run("--ckpt-dir", ckpts, *common, "--die-at", 23)
    assert killed.returncode == -signal.SIGKILL, show(killed)
    assert "step 23: dying (SIGKILL)" in killed.stdout, show(killed)
    assert "done at step" not in killed.stdout, show(killed)
    killed_losses = losses(killed.stdout)
    assert sorted(killed_losses) == list(range(1, 24)), show(killed)
    assert killed_losses == {s: straight_losses[s] for s in killed_losses}
    assert gs.latest_checkpoint(str(ckpts)) == str(ckpts / "model-20")

    # The checkpoint holds the parameters and Adam's whole state (created lazily by torch,
    # so this shows the example made it before the Saver was built), at step 20.
    latest = str(ckpts / "model-20")
    stored = dict(gs.list_variables(latest))
    for p in PARAMS:
        assert f"model/{p}" in stored
        for key in ADAM_STATE:
            assert f"optimizer/{p}/{key}" in stored
        assert stored[f"optimizer/{p}/exp_avg"] == stored[f"model/{p}"]
    state = gs.load(latest)
    assert int(state["train/global_step"]) == 20
    assert all(float(state[f"optimizer/{p}/step"]) == 20.0 for p in PARAMS)
    assert all(np.any(state[f"optimizer/{p}/exp_avg_sq"] != 0) for p in PARAMS)

    # 3. Restarted: resumes from step 20 and ends bit-identical to the uninterrupted run.
    resumed = run("--ckpt-dir", ckpts, *common, "--compare", final)
    assert resumed.returncode == 0, show(resumed)
    assert [int(s) for s in RESUMED.findall(resumed.stdout)] == [20], show(resumed)
    assert f"resumed from step 20 ({latest})" in resumed.stdout
    resumed_losses = losses(resumed.stdout)
    assert sorted(resumed_losses) == list(range(21, 31)), show(resumed)
    assert resumed_losses == {s: straight_losses[s] for s in resumed_losses}
    assert OK_LINE in resumed.stdout.splitlines(), show(resumed)
    assert "MISMATCH" not in resumed.stdout

    # Retention carried over the restart: three kept in all, no debris.
    assert sorted(p.name for p in ckpts.glob("*.index")) == ["model-20.index", "model-25.index", "model-30.index"]
    assert not [p for p in os.listdir(ckpts) if "_temp_" in p]

    # 4. The comparison is not vacuous: one bit of one Adam moment differs -> named, exit status 1.
    tampered = {name: np.array(value, copy=True) for name, value in gs.load(final).items()}
    target = "optimizer/2.bias/exp_avg_sq"
    assert tampered[target].dtype == np.float32
    tampered[target].view(np.uint32).reshape(-1)[0] ^= 1
    gs.save(tampered, tmp_path / "tampered" / "state")
    caught = run("--ckpt-dir", ckpts, *common, "--compare", tmp_path / "tampered" / "state")
    assert caught.returncode == 1, show(caught)
    assert [int(s) for s in RESUMED.findall(caught.stdout)] == [30], show(caught)
    assert not losses(caught.stdout), show(caught)
    assert [line for line in caught.stdout.splitlines() if line.startswith("MISMATCH")] == [
        f"MISMATCH {target}: values differ"
    ], show(caught)
    assert "OK:" not in caught.stdout
