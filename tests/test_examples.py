"""The examples run, as subprocesses, so they never rot.

Every ``examples/*.py`` must answer ``--help`` and, with small arguments, run to
the end. ``examples/train.py`` is also killed part way (``--crash-at``) and
restarted: it must resume from the newest checkpoint and end exactly where an
uninterrupted run ends (same per-step losses, same weights digest).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gpusaver as gs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Every example script; train.py is required even before anyone writes it.
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")) or ["train.py"]

STEP_LOSS = re.compile(r"^\s*step\s+(\d+)\s+loss\s+(\S+)\s*$", re.MULTILINE)
RESUMED = re.compile(r"resumed from step (\d+)")
DIGEST = re.compile(r"weights digest (\S+)")


def run_example(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    path = EXAMPLES / script
    assert path.is_file(), f"{path} does not exist"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run(
        [sys.executable, str(path), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses(stdout: str) -> dict[int, str]:
    return {int(step): loss for step, loss in STEP_LOSS.findall(stdout)}


def small_args(help_text: str, tmp_path: Path) -> list[str]:
    """Small values for the flags an example declares."""
    args = []
    for flag, value in (("--ckpt-dir", str(tmp_path / "ckpts")), ("--steps", "6"), ("--save-every", "3")):
        if flag in help_text:
            args += [flag, value]
    return args


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_to_the_end(script: str, tmp_path: Path) -> None:
    shown = run_example(script, "--help")
    assert shown.returncode == 0, shown.stderr
    done = run_example(script, *small_args(shown.stdout, tmp_path))
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"


def test_train_with_async_saves_crashes_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    ckpts, reference = tmp_path / "ckpts", tmp_path / "reference"
    common = ["--steps", "30", "--save-every", "5", "--async-save"]
    crashed = run_example("train.py", "--ckpt-dir", str(ckpts), *common, "--crash-at", "17")
    assert crashed.returncode != 0, "--crash-at must kill the run"
    # step 15's save was in flight or done when the process died: the newest whole one is 10 or 15
    latest = gs.latest_checkpoint(str(ckpts))
    assert latest in (str(ckpts / "model-10"), str(ckpts / "model-15")), latest
    resumed = run_example("train.py", "--ckpt-dir", str(ckpts), *common, "--print-digest")
    assert resumed.returncode == 0, f"{resumed.stdout}\n{resumed.stderr}"
    assert [int(s) for s in RESUMED.findall(resumed.stdout)] == [int(latest.rsplit("-", 1)[1])]
    straight = run_example("train.py", "--ckpt-dir", str(reference), *common[:-1], "--print-digest")
    assert DIGEST.findall(resumed.stdout) == DIGEST.findall(straight.stdout) != []
    assert sorted(p.name for p in ckpts.glob("*.index")) == ["model-20.index", "model-25.index", "model-30.index"]


def test_train_crashes_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    ckpts, reference = tmp_path / "ckpts", tmp_path / "reference"
    common = ["--steps", "30", "--save-every", "5"]

    crashed = run_example("train.py", "--ckpt-dir", str(ckpts), *common, "--crash-at", "17")
    assert crashed.returncode != 0, "--crash-at must kill the run"
    assert max(losses(crashed.stdout)) == 17, crashed.stdout
    assert gs.latest_checkpoint(str(ckpts)) == str(ckpts / "model-15")

    resumed = run_example("train.py", "--ckpt-dir", str(ckpts), *common, "--print-digest")
    assert resumed.returncode == 0, f"{resumed.stdout}\n{resumed.stderr}"
    assert "resumed from step 15" in resumed.stdout
    assert [int(s) for s in RESUMED.findall(resumed.stdout)] == [15]
    resumed_losses = losses(resumed.stdout)
    assert sorted(resumed_losses) == list(range(16, 31)), "the resumed run must start after step 15"

    straight = run_example("train.py", "--ckpt-dir", str(reference), *common, "--print-digest")
    assert straight.returncode == 0, f"{straight.stdout}\n{straight.stderr}"
    assert "resumed" not in straight.stdout
    straight_losses = losses(straight.stdout)
    assert sorted(straight_losses) == list(range(1, 31))
    crashed_losses = losses(crashed.stdout)
    assert {s: straight_losses[s] for s in crashed_losses} == crashed_losses
    assert {s: straight_losses[s] for s in resumed_losses} == resumed_losses
    assert DIGEST.findall(resumed.stdout) == DIGEST.findall(straight.stdout) != []

    # Retention carried over the restart: the checkpoints of the first run were
    # adopted and aged out, three kept in all.
    indexes = sorted(p.name for p in ckpts.glob("*.index"))
    assert indexes == ["model-20.index", "model-25.index", "model-30.index"]
    state = gs.get_checkpoint_state(str(ckpts))
    assert state is not None
    assert list(state.all_model_checkpoint_paths) == [str(ckpts / f"model-{s}") for s in (20, 25, 30)]
    assert not [p for p in os.listdir(ckpts) if "_temp_" in p]
