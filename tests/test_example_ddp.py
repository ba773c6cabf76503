"""examples/train_ddp.py under torchrun, 2 processes (gloo on the CPU), as the README shows it:
trained, checkpointed by both ranks, killed (rank 1 SIGKILLs itself, torchrun ends the job),
resumed from the newest checkpoint on both ranks, and ending with exactly the weights of an
uninterrupted run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gpusaver as gs

pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"weights digest (\S+)")
STEP = re.compile(r"^step\s+(\d+)\s+loss", re.MULTILINE)


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), str(ROOT / "examples" / "train_ddp.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def test_ddp_example_crashes_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    ckpts, reference = tmp_path / "ckpts", tmp_path / "reference"
    common = ["--steps", "20", "--save-every", "5"]
    crashed = torchrun("--ckpt-dir", str(ckpts), *common, "--crash-at", "13")
    assert crashed.returncode != 0, "rank 1 must have killed the job"
    assert gs.latest_checkpoint(str(ckpts)) == str(ckpts / "model-10")
    resumed = torchrun("--ckpt-dir", str(ckpts), *common, "--print-digest")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step 10" in resumed.stdout
    assert sorted(int(s) for s in STEP.findall(resumed.stdout)) == list(range(11, 21))
    straight = torchrun("--ckpt-dir", str(reference), *common, "--print-digest")
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert DIGEST.findall(resumed.stdout) == DIGEST.findall(straight.stdout) != []
    # two shards (one per rank); the replicated parameters spread over both
    assert sorted(p.name for p in ckpts.glob("model-20.*")) == [
        "model-20.data-00000-of-00002", "model-20.data-00001-of-00002", "model-20.index"
    ]
    assert all(p.stat().st_size > 0 for p in ckpts.glob("model-20.data-*"))
    state = gs.get_checkpoint_state(str(ckpts))
    assert list(state.all_model_checkpoint_paths) == [str(ckpts / f"model-{s}") for s in (10, 15, 20)]
