"""Data-parallel training with torch DistributedDataParallel, checkpointed by every rank together.

Run with torchrun (gloo, on the CPU):

    torchrun --nproc-per-node 2 examples/train_ddp.py --ckpt-dir /tmp/ddp --steps 40 --save-every 5 --crash-at 23
    torchrun --nproc-per-node 2 examples/train_ddp.py --ckpt-dir /tmp/ddp --steps 40 --save-every 5

Every rank builds the same Saver over its model's parameters and its optimizer's
momentum buffers (``coordinator="torch"``). DDP keeps them equal on every rank, so
they are replicated variables: each is written once, the ranks taking turns, and
the last rank commits the checkpoint. ``--crash-at N`` makes rank 1 kill itself
with SIGKILL at step N, and torchrun ends the job; the next run restores the newest
checkpoint on every rank and continues. Each rank's batch depends only on the step
and the rank, so the resumed run ends with exactly the weights of an uninterrupted
one (``--print-digest``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gpusaver as gs


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(32, 16, generator=g)
    y = torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] ** 2
    return x, y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--crash-at", type=int, default=None, help="rank 1 SIGKILLs itself at this step")
    ap.add_argument("--print-digest", action="store_true")
    args = ap.parse_args(argv)

    if "RANK" not in os.environ:  # run without torchrun: a job of one process
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for p in model.parameters():  # momentum buffers exist from the start (zero), so they can be checkpointed
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad()
    step_var = torch.zeros((), dtype=torch.int64)

    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        state[f"optimizer/{name}/momentum"] = opt.state[p]["momentum_buffer"]
    state["global_step"] = step_var
    saver = gs.Saver(state, coordinator="torch", max_to_keep=3)

    os.makedirs(args.ckpt_dir, exist_ok=True)
    latest = gs.latest_checkpoint(args.ckpt_dir)
    if latest is not None:
        saver.restore(latest)  # every rank, in place: weights, momentum and step
        if rank == world - 1:  # the committing rank keeps retention going across the restart
            saver.recover_last_checkpoints(list(gs.get_checkpoint_state(args.ckpt_dir).all_model_checkpoint_paths))
        if rank == 0:
            print(f"resumed from step {int(step_var)} ({latest})", flush=True)
    prefix = os.path.join(args.ckpt_dir, "model")
    for step in range(int(step_var), args.steps):
        if args.crash_at is not None and step == args.crash_at and rank == 1:
            print(f"rank 1 at step {step}: simulating a crash (SIGKILL)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(step, rank)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_var.fill_(step + 1)
        if rank == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.5f}", flush=True)
        if (step + 1) % args.save_every == 0:
            path = saver.save(prefix, global_step=step + 1)  # every rank, the same arguments
            if rank == 0:
                print(f"           saved {path}", flush=True)
    if args.print_digest and rank == 0:
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(np.ascontiguousarray(state[k].detach().numpy()).tobytes())
        print(f"weights digest {h.hexdigest()[:16]}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
