"""A small training loop that checkpoints with gpusaver, dies, and resumes.

A two-layer regression model whose parameters live on several devices: on
GPUs when CuPy can use them, else on virtual CPU devices ``/cpu:0`` and
``/cpu:1`` (NumPy). Every ``--save-every`` steps it saves a sharded checkpoint
(one shard per device, ``max_to_keep=3``). ``--crash-at N`` kills the process
with SIGKILL at step N, as if the job died; the next run finds the newest
checkpoint with ``latest_checkpoint``, restores the parameters in place and
continues where the checkpoint left off. Each step's batch depends only on the
step number, so a resumed run ends with exactly the weights of an
uninterrupted one (``--print-digest`` prints their hash to show it).
``--async-save`` checkpoints with ``save_async``: training goes on while the
checkpoint is written, and a crash loses at most the save in flight.

    python examples/train.py --ckpt-dir /tmp/run --steps 40 --save-every 5 --crash-at 23
    python examples/train.py --ckpt-dir /tmp/run --steps 40 --save-every 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time

import numpy as np

import gpusaver as gs
from gpusaver import backends


def make_params(xp, devices, hidden):
    """Parameters on the given devices: layer 1 on the first, layer 2 on the last."""
    rng = np.random.default_rng(0)
    init = {
        "dense1/w": rng.standard_normal((16, hidden)).astype(np.float32) * 0.3,
        "dense1/b": np.zeros(hidden, np.float32),
        "dense2/w": rng.standard_normal((hidden, 1)).astype(np.float32) * 0.3,
        "dense2/b": np.zeros(1, np.float32),
    }
    placement = {"dense1/w": devices[0], "dense1/b": devices[0], "dense2/w": devices[-1], "dense2/b": devices[-1]}
    params = {}
    for name, value in init.items():
        dev = placement[name]
        if xp is np:
            params[name] = gs.Variable(value, name, device=dev)
        else:
            with xp.cuda.Device(dev):
                params[name] = gs.Variable(xp.asarray(value), name)
    return params


def batch(step, xp, device):
    """The batch of a step: a function of the step number only."""
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    y = (np.sin(x[:, :1] * 2.0) + 0.5 * x[:, 1:2] ** 2).astype(np.float32)
    if xp is np:
        return x, y
    with xp.cuda.Device(device):
        return xp.asarray(x), xp.asarray(y)


def to_device(xp, array, device):
    if xp is np:
        return array
    with xp.cuda.Device(device):
        return xp.asarray(array)


def train_step(xp, p, step, lr, devices):
    """One SGD step on the MSE; updates the arrays in place; returns the loss."""
    w1, b1, w2, b2 = (p[k].value for k in ("dense1/w", "dense1/b", "dense2/w", "dense2/b"))
    x, y = batch(step, xp, devices[0])
    h = xp.tanh(x @ w1 + b1)
    h2 = to_device(xp, h, devices[-1])
    y2 = to_device(xp, y, devices[-1])
    pred = h2 @ w2 + b2
    err = pred - y2
    loss = float((err**2).mean())
    g_pred = 2.0 * err / err.shape[0]
    g_w2 = h2.T @ g_pred
    g_b2 = g_pred.sum(axis=0)
    g_h = to_device(xp, g_pred @ w2.T, devices[0]) * (1.0 - h**2)
    g_w1 = x.T @ g_h
    g_b1 = g_h.sum(axis=0)
    w1 -= lr * g_w1
    b1 -= lr * g_b1
    w2 -= lr * g_w2
    b2 -= lr * g_b2
    return loss


def digest(xp, params):
    h = hashlib.sha256()
    for name in sorted(params):
        value = params[name].value
        h.update(np.ascontiguousarray(value if xp is np else value.get()).tobytes())
    return h.hexdigest()[:16]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", required=True, help="directory for checkpoints")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--crash-at", type=int, default=None, help="SIGKILL this process at this step")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--print-digest", action="store_true", help="print a hash of the final weights")
    ap.add_argument("--async-save", action="store_true", help="checkpoint with save_async (written in the background)")
    ap.add_argument("--print-time", action="store_true", help="print the training loop's wall time")
    args = ap.parse_args(argv)

    gpu = backends.gpu_backend()
    if gpu is not None:
        import cupy as xp

        n = xp.cuda.runtime.getDeviceCount()
        devices = [0, 1 % n]
        where = f"CuPy on GPU {devices[0]} and GPU {devices[1]}"
    else:
        xp = np
        devices = ["/cpu:0", "/cpu:1"]
        where = "NumPy on virtual devices /cpu:0 and /cpu:1 (no usable GPU)"
    print(f"training with {where}")

    params = make_params(xp, devices, args.hidden)
    step_var = gs.Variable(np.zeros((), np.int64), "global_step", device="/cpu:0")
    saver = gs.Saver(list(params.values()) + [step_var], sharded=True, max_to_keep=3)
    print(f"saver shards: {len(saver.devices)} ({', '.join(saver.devices)})")

    os.makedirs(args.ckpt_dir, exist_ok=True)
    latest = gs.latest_checkpoint(args.ckpt_dir)
    if latest is not None:
        saver.restore(latest)  # in place: params[...] and step_var now hold the saved values
        saver.recover_last_checkpoints(gs.get_checkpoint_state(args.ckpt_dir).all_model_checkpoint_paths)
        print(f"resumed from step {int(step_var.value)} ({latest})")
    start = int(step_var.value)

    prefix = os.path.join(args.ckpt_dir, "model")
    t0 = time.perf_counter()
    for step in range(start, args.steps):
        if args.crash_at is not None and step == args.crash_at:
            print(f"step {step}: simulating a crash (SIGKILL)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        loss = train_step(xp, params, step, args.lr, devices)
        step_var.value[...] = step + 1
        print(f"step {step + 1:4d}  loss {loss:.5f}", flush=True)
        if (step + 1) % args.save_every == 0:
            if args.async_save:
                # Returns once the values are copied; the next step may change them at once.
                handle = saver.save_async(prefix, global_step=step + 1)
                print(f"           saving {handle.prefix} in the background", flush=True)
            else:
                path = saver.save(prefix, global_step=step + 1)
                print(f"           saved {path}", flush=True)
    saver.wait()  # the last background save is committed (raises if it failed)
    if args.print_time:
        print(f"training loop: {time.perf_counter() - t0:.3f} s")
    print(f"done at step {args.steps}; checkpoints kept: {[os.path.basename(p) for p in saver.last_checkpoints]}")
    if args.print_digest:
        print(f"weights digest {digest(xp, params)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
