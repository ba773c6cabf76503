"""A save by several ranks against one process with the same bytes, and the coordinator's merge time.

    .venv/bin/python benchmarks/ranks_bench.py --ranks 4 --mib 512 --tensors 100000 --repeat 3

Launches ``torchrun --nproc-per-node R`` (gloo on the CPU) running this file in ``--rank-job``
mode: the ranks hold ``--mib`` MiB in all (large tensors, split evenly), then ``--tensors`` small
tensors in all, and save each ``--repeat`` times. One process (no coordinator) saves the same
bytes between them, interleaved. Reported: wall time of the save on the slowest rank, and the
last rank's ``merge`` phase (gathering is before it; merge + commit is on_phase's ``merge``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

import numpy as np  # noqa: E402

import _benchlib as bl  # noqa: E402
import gpusaver as gs  # noqa: E402


def arrays(kind: str, rank: int, ranks: int, mib: int, tensors: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s share (``ranks`` = 1: everything)."""
    rng = np.random.default_rng(rank)
    if kind == "large":
        each = (mib << 20) // 16 // 4  # 16 tensors in all, float32
        names = range(rank, 16, ranks)
        return {f"large/{i:02d}": rng.standard_normal(each, dtype=np.float32) for i in names}
    return {f"small/{i:06d}": np.full(16 + i % 48, i, np.float32) for i in range(rank, tensors, ranks)}


def rank_job(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    out = {}
    for kind in ("large", "small"):
        phases: dict[str, float] = {}
        saver = gs.Saver(arrays(kind, rank, size, args.mib, args.tensors), coordinator="torch", durable=False,
                         on_phase=lambda name, s: phases.__setitem__(name, s))
        walls, merges = [], []
        for r in range(args.repeat):
            dist.barrier()
            t0 = time.perf_counter()
            saver.save(os.path.join(args.dir, f"{kind}-ranks"), global_step=r)
            walls.append(time.perf_counter() - t0)
            merges.append(phases.get("merge", 0.0))
            dist.barrier()
            if rank == 0:
                for name in os.listdir(args.dir):
                    if name.startswith(f"{kind}-ranks"):
                        os.remove(os.path.join(args.dir, name))
        out[kind] = {"wall": walls, "merge": merges}
    with open(os.path.join(args.out, f"rank-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--tensors", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default="/dev/shm")
    p.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--text", metavar="OUT")
    args = p.parse_args(argv)
    if args.rank_job:
        return rank_job(args)
    work = tempfile.mkdtemp(prefix="gpusaver-ranks-", dir=args.dir)
    out = tempfile.mkdtemp(prefix="gpusaver-ranks-out-")
    single: dict[str, list[float]] = {"large": [], "small": []}
    try:
        for kind in ("large", "small"):
            saver = gs.Saver(arrays(kind, 0, 1, args.mib, args.tensors), durable=False)
            for r in range(args.repeat):
                t0 = time.perf_counter()
                saver.save(os.path.join(work, f"{kind}-one"), global_step=r)
                single[kind].append(time.perf_counter() - t0)
                for name in os.listdir(work):
                    os.remove(os.path.join(work, name))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks), "--master-addr",
             "127.0.0.1", "--master-port", str(port), os.path.abspath(__file__), "--rank-job", "--dir", work,
             "--out", out, "--mib", str(args.mib), "--tensors", str(args.tensors), "--repeat", str(args.repeat)],
            check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
        )
        per_rank = [json.load(open(os.path.join(out, f"rank-{k}.json"))) for k in range(args.ranks)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    info = bl.machine_info(("gpusaver", "numpy", "torch"))
    lines = bl.header_lines(info) + [
        "", f"{args.ranks} ranks (torchrun, gloo, one machine) against 1 process, the same bytes, durable=False, "
        f"{args.dir}, {args.repeat} repetitions", "",
    ]
    rows = []
    for kind, what in (("large", f"{args.mib} MiB in 16 tensors"), ("small", f"{args.tensors} small tensors")):
        slowest = [max(per_rank[k][kind]["wall"][r] for k in range(args.ranks)) for r in range(args.repeat)]
        merge = per_rank[-1][kind]["merge"]
        one = bl.summary(single[kind])["median_s"]
        many = bl.summary(slowest)["median_s"]
        rows.append([what, bl.fmt(one), bl.fmt(many), f"{many / one:.2f}x", bl.fmt(bl.summary(merge)["median_s"])])
    lines.append(bl.table(["state", "1 process s", f"{args.ranks} ranks s", "ratio", "merge+commit s"], rows))
    bl.emit(lines, args.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
