"""A torch training loop that checkpoints model AND Adam state with gpusaver, dies, and resumes.

A two-layer MLP learns a synthetic regression task with ``torch.optim.Adam``,
on the GPU when torch sees one (and gpusaver can use it through CuPy), else on
the CPU. Every ``--save-every`` steps one sharded checkpoint (``max_to_keep=3``)
takes everything the next step depends on: the parameters, Adam's
``exp_avg``, ``exp_avg_sq`` and ``step`` of every parameter, the global step,
and the state of the generator that draws the mini-batches. ``--die-at N``
kills the process with SIGKILL when it reaches step N (after step N's
checkpoint, if it has one), as if the job died; the next run restores the
newest checkpoint (``latest_checkpoint``) in place into the tensors that the
freshly built model and optimizer use, and continues.

``--final PATH`` writes the final state with ``gpusaver.save``; ``--compare
PATH`` checks the final state against such a file, tensor by tensor, bit for
bit, and prints the OK line (exit status 1 on any difference)::

    python examples/train_torch.py --ckpt-dir /tmp/ref --steps 40 --final /tmp/ref/final
    python examples/train_torch.py --ckpt-dir /tmp/run --steps 40 --die-at 23
    python examples/train_torch.py --ckpt-dir /tmp/run --steps 40 --compare /tmp/ref/final
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# cuBLAS is deterministic only with a fixed workspace; this must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

import gpusaver as gs  # noqa: E402

IN_FEATURES = 16
DATASET_SIZE = 1024
BATCH_SIZE = 64


def pick_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
        return torch.device("cuda", 0)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from gpusaver import backends

    if backends.gpu_backend() is None:  # torch sees a GPU but gpusaver has no CuPy to read CUDA memory with
        print(
            "torch sees a GPU but gpusaver cannot use it "
            f"({backends.unavailable_reason() or 'GPUSAVER_BACKEND=numpy'}); training on the CPU. "
            "Install gpusaver[cuda12] or gpusaver[cuda13] to train on the GPU.",
            flush=True,
        )
        return torch.device("cpu")
    return torch.device("cuda", 0)


def make_data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic regression data set (made on the CPU, so it is the same on every device)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(DATASET_SIZE, IN_FEATURES, generator=g)
    w = 0.5 * torch.randn(IN_FEATURES, 1, generator=g)
    y = x @ w + torch.sin(2.0 * x[:, :1]) + 0.05 * torch.randn(DATASET_SIZE, 1, generator=g)
    return x.to(device), y.to(device)


def make_model(hidden: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights in every run; a resumed run overwrites them
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 1),
    )
    return model.to(device)


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr)


def _scalar_dtype(fused: bool) -> torch.dtype:
    # As torch.optim.optimizer._get_scalar_dtype: float32, or float64 when that is torch's default.
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def init_adam_state(opt: torch.optim.Adam) -> None:
    """Creates Adam's per-parameter state now, exactly as Adam's first step would.

    Why: Adam creates ``state[p]`` lazily, in its first ``step()``, so a freshly
    built optimizer has no tensors to restore into. The alternatives are worse:
    a throwaway step with zero gradients changes the state (``step`` becomes 1
    and, with weight decay, ``exp_avg``); restoring into tensors of our own and
    then calling ``optimizer.load_state_dict`` lets torch copy or cast them
    (``step`` and every state tensor go through ``.to(...)``), so the tensors
    the optimizer then uses need not be the ones the Saver holds, and later
    saves could write stale copies. Instead, the state is created here, with
    the same keys, zeros, dtypes and devices as Adam's lazy initialisation
    (``Adam._init_group``; :func:`check_state_layout` compares the two on
    throwaway copies). Adam finds ``state[p]`` non-empty and uses these very
    tensors, updating them in place, so one Saver built over them saves what
    the optimizer uses and restores into it. Pre-made zero state and lazily
    made zero state give bit-identical training.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            if opt.state[p]:
                continue
            if group["capturable"] or group["fused"]:
                step = torch.zeros((), dtype=_scalar_dtype(group["fused"]), device=p.device)
            else:  # torch keeps `step` on the host unless capturable or fused
                step = torch.tensor(0.0, dtype=_scalar_dtype(False), device="cpu")
            state = {
                "step": step,
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            opt.state[p] = state


def check_state_layout(model: torch.nn.Module, opt: torch.optim.Adam, lr: float) -> None:
    """Adam's own lazy initialisation, on throwaway copies, must match :func:`init_adam_state`."""
    copies = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    probe = make_optimizer(copies, lr)
    for c in copies:
        c.grad = torch.zeros_like(c)
    probe.step()
    for p, c in zip(model.parameters(), copies):
        ours, theirs = opt.state[p], probe.state[c]
        layout = lambda s: {k: (v.dtype, tuple(v.shape), v.device) for k, v in s.items()}  # noqa: E731
        if layout(ours) != layout(theirs):
            raise RuntimeError(f"Adam's state layout changed: ours {layout(ours)}, Adam's {layout(theirs)}")


def checkpoint_tree(
    model: torch.nn.Module, opt: torch.optim.Adam, global_step: torch.Tensor, rng_state: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of everything a resumed run needs: the tensors themselves, not copies."""
    names = {p: name for name, p in model.named_parameters()}
    tree: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:  # the params the optimizer updates, and their state
        for p in group["params"]:
            tree[f"model/{names[p]}"] = p
            for key, value in opt.state[p].items():
                tree[f"optimizer/{names[p]}/{key}"] = value
    tree["train/global_step"] = global_step
    tree["train/data_rng_state"] = rng_state
    return tree


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and values (torch.equal), and for floats the same bits (-0.0 is not 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        return False
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(bits), b.view(bits))
    return True


def compare(tree: dict[str, torch.Tensor], path: str) -> list[str]:
    """The differences between ``tree`` and the state saved at ``path`` (empty: identical)."""
    stored = {name for name, _ in gs.list_variables(path) if not name.startswith("_gpusaver/")}
    problems = [f"{n}: not in {path}" for n in sorted(set(tree) - stored)]
    problems += [f"{n}: in {path} but not in this run" for n in sorted(stored - set(tree))]
    if problems:
        return problems
    reference = {name: torch.empty_like(t) for name, t in tree.items()}
    try:
        gs.load(path, like=reference)  # in place, into tensors on this run's devices
    except (gs.ShapeMismatchError, gs.DTypeMismatchError) as e:  # e.g. another --hidden
        return [str(e)]
    return [f"{n}: values differ" for n in sorted(tree) if not identical(tree[n].detach(), reference[n])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", required=True, help="directory for checkpoints")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--die-at", type=int, default=None, help="SIGKILL this process on reaching this step")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--final", default=None, help="write the final state here (gpusaver.save)")
    ap.add_argument("--compare", default=None, help="check the final state against one written by --final")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True)  # (the CPU ops used here are deterministic already)
    else:
        torch.set_num_threads(1)  # a tiny model; and results that do not depend on the core count
    print(f"training on {device} with torch {torch.__version__}", flush=True)

    x, y = make_data(device)
    model = make_model(args.hidden, device)
    opt = make_optimizer(model.parameters(), args.lr)
    init_adam_state(opt)
    check_state_layout(model, opt, args.lr)
    data_gen = torch.Generator().manual_seed(42)  # draws the mini-batches; its state is checkpointed
    rng_state = data_gen.get_state()  # a uint8 tensor: the buffer the generator's state is saved from
    global_step = torch.zeros((), dtype=torch.int64)

    tree = checkpoint_tree(model, opt, global_step, rng_state)
    saver = gs.Saver(tree, sharded=True, max_to_keep=3)
    print(f"checkpointing {len(tree)} tensors in {len(saver.devices)} shard(s)", flush=True)

    os.makedirs(args.ckpt_dir, exist_ok=True)
    latest = gs.latest_checkpoint(args.ckpt_dir)
    if latest is not None:
        storage = {name: t.data_ptr() for name, t in tree.items()}
        saver.restore(latest)  # in place, into the model's and the optimizer's own tensors
        # The restore wrote into the tensors the optimizer uses: the same objects, in the same memory.
        now = checkpoint_tree(model, opt, global_step, rng_state)
        moved = [n for n in tree if n not in now or now[n] is not tree[n] or now[n].data_ptr() != storage[n]]
        if moved or now.keys() != tree.keys():
            raise RuntimeError(f"the restore did not write into the optimizer's own tensors: {moved}")
        data_gen.set_state(rng_state)
        steps = {int(s["step"].item()) for s in opt.state.values()}
        if steps != {int(global_step)}:
            raise RuntimeError(f"Adam's step {steps} disagrees with the global step {int(global_step)}")
        saver.recover_last_checkpoints(gs.get_checkpoint_state(args.ckpt_dir).all_model_checkpoint_paths)
        print(f"resumed from step {int(global_step)} ({latest})", flush=True)
    start = int(global_step)
    resumed = latest is not None

    prefix = os.path.join(args.ckpt_dir, "model")
    for step in range(start, args.steps):
        if args.die_at is not None and step == args.die_at:
            print(f"step {step}: dying (SIGKILL)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        idx = torch.randint(0, DATASET_SIZE, (BATCH_SIZE,), generator=data_gen).to(device)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        global_step.fill_(step + 1)
        print(f"step {step + 1:4d}  loss {loss.item():.9g}", flush=True)
        if (step + 1) % args.save_every == 0:
            rng_state.copy_(data_gen.get_state())
            path = saver.save(prefix, global_step=step + 1)
            print(f"           saved {path}", flush=True)
    rng_state.copy_(data_gen.get_state())
    kept = [os.path.basename(p) for p in saver.last_checkpoints]
    print(f"done at step {int(global_step)}; checkpoints kept: {kept}", flush=True)

    if args.final:
        gs.save(tree, args.final)
        print(f"final state written to {args.final}", flush=True)
    if args.compare:
        problems = compare(tree, args.compare)
        if problems:
            for p in problems:
                print(f"MISMATCH {p}", flush=True)
            return 1
        print(
            f"compared {len(tree)} tensors (parameters, Adam state, step, data RNG) with {args.compare}: "
            "all bit-identical"
        )
        if resumed:
            print("OK: the resumed torch run matches the uninterrupted run exactly", flush=True)
        else:
            print("OK: this torch run matches the reference run exactly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
