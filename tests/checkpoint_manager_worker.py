"""Subprocess worker of tests/test_checkpoint_manager.py: a training loop that a test kills.

Usage: ``python checkpoint_manager_worker.py '<json job>'``. Job keys:

* ``dir``, ``max_to_keep``, ``prefix`` (``"ckpt"``), ``async`` (False): the CheckpointManager;
* ``kind``: ``"arrays"`` (the state of step s is ``{"w": full(4, s), "b": {"n": [s]}}``) or
  ``"torch"`` (a small model + AdamW trained one batch per step; batches drawn from the step);
* ``stop``: the last step to save; the loop resumes after the manager's ``latest_step()``;
* ``kill_phase``, ``kill_step``: SIGKILL this process when the manager's file operations
  reach that phase during the save of that step (``"save:committed"``: committed, state file
  not written; ``"state:written"``: recorded, retention not applied; ``"returned"``: once
  ``save`` has returned);
* ``pause_after``: print ``saved <step>`` and wait for a line on stdin after that step (the
  test kills the process at some instant of the next save).

Prints ``resumed <latest step or None>`` first, then ``saved <step>`` (and for torch ``loss
<step> <float.hex()>``) per step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpusaver.checkpoint_manager import CheckpointManager  # noqa: E402
from gpusaver.storage.fileops import PosixFileOps  # noqa: E402


class KillAt(PosixFileOps):
    """POSIX file operations that SIGKILL the process at one phase of one step's save."""

    def __init__(self, phase: str | None, step: int | None) -> None:
        self.kill_phase = phase
        self.kill_step = step
        self.step: int | None = None

    def phase(self, name: str) -> None:
        if name == self.kill_phase and self.step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)


def as_flat(back: Any) -> dict:
    """A restored tree as ``{"a/b": value}`` (gpusaver.load gives the nested tree where it stores
    the structure, the flat dict where it does not)."""
    from gpusaver.api import flatten

    return flatten(back)


def arrays_state(step: int) -> dict:
    return {"w": np.full(4, float(step)), "b": {"n": np.array([step], np.int64)}}


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_arrays(job: dict, manager: CheckpointManager, ops: KillAt) -> None:
    start = (manager.latest_step() or 0) + 1
    if start > 1:
        back = manager.restore()
        flat = as_flat(back)
        assert flat["w"].tolist() == [float(start - 1)] * 4 and flat["b/n"].tolist() == [start - 1], back
    for step in range(start, job["stop"] + 1):
        manager.wait_until_finished()  # async: the previous step's phases are heard before this one's
        ops.step = step
        manager.save(step, arrays_state(step))
        after_save(job, manager, step)


def after_save(job: dict, manager: CheckpointManager, step: int) -> None:
    if job.get("kill_phase") == "returned" and job.get("kill_step") == step:
        manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    say(f"saved {step}")
    if job.get("pause_after") == step:
        manager.wait_until_finished()
        say("paused")
        sys.stdin.readline()


def torch_setup():  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    return torch, model, opt


def torch_state(model, opt) -> dict:  # type: ignore[no-untyped-def]
    """The model's state_dict, and AdamW's moments by hand: gpusaver's trees take str keys only
    (the optimizer's state_dict is keyed by parameter index)."""
    optim = {}
    for index, state in opt.state_dict()["state"].items():
        optim[f"p{index}"] = {name: value for name, value in state.items()}
    return {"model": model.state_dict(), "optim": optim}


def torch_load(torch, model, opt, flat: dict) -> None:  # type: ignore[no-untyped-def]
    model.load_state_dict({k[len("model/"):]: torch.from_numpy(v) for k, v in flat.items() if k.startswith("model/")})
    sd = opt.state_dict()
    state: dict = {}
    for key, value in flat.items():
        if key.startswith("optim/"):
            _, p, name = key.split("/")
            state.setdefault(int(p[1:]), {})[name] = torch.from_numpy(np.array(value))
    sd["state"] = state
    opt.load_state_dict(sd)


def run_torch(job: dict, manager: CheckpointManager, ops: KillAt) -> None:
    torch, model, opt = torch_setup()
    start = (manager.latest_step() or 0) + 1
    if start > 1:
        torch_load(torch, model, opt, as_flat(manager.restore()))
    for step in range(start, job["stop"] + 1):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(16, 6, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        say(f"loss {step} {float(loss.item()).hex()}")
        manager.wait_until_finished()
        ops.step = step
        manager.save(step, torch_state(model, opt))
        after_save(job, manager, step)


def main() -> None:
    job = json.loads(sys.argv[1])
    ops = KillAt(job.get("kill_phase"), job.get("kill_step"))
    manager = CheckpointManager(
        job["dir"], max_to_keep=job.get("max_to_keep", 3), async_save=job.get("async", False),
        prefix=job.get("prefix", "ckpt"), fileops=ops,
    )
    say(f"resumed {manager.latest_step()}")
    (run_torch if job.get("kind") == "torch" else run_arrays)(job, manager, ops)
    manager.close()


if __name__ == "__main__":
    main()
