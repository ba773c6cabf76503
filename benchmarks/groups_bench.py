"""Restore of the same arrays as 1 device group and as k (virtual CPU devices ``/cpu:i``), interleaved.

    python benchmarks/groups_bench.py --groups 8 --size-gib 1 --repeat 7 --dir /dev/shm

Each variable of the mixed workload goes to device ``i % k``, so the k-group Saver writes k shards and
restores them on k threads. Prints the medians (min and range beside them) and their ratio: what the
per-group machinery costs on top of the same bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

import numpy as np  # noqa: E402

import _benchlib as bl  # noqa: E402
import gpusaver as gs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--text", metavar="OUT", help="also write the report here")
    args = p.parse_args(argv)
    info = bl.machine_info(("gpusaver", "numpy"))
    arrays = bl.build_arrays(bl.mixed_workload(args.size_gib), "data")
    root = tempfile.mkdtemp(dir=args.dir)

    def saver(k: int) -> gs.Saver:
        return gs.Saver([gs.Variable(a, n, device=f"/cpu:{i % k}") for i, (n, a) in enumerate(arrays.items())],
                        durable=False)

    savers = {1: saver(1), args.groups: saver(args.groups)}
    prefixes = {k: s.save(os.path.join(root, f"g{k}")) for k, s in savers.items()}
    times: dict[int, list[float]] = {k: [] for k in savers}
    for _ in range(args.repeat):
        for k, s in savers.items():  # interleaved
            t0 = time.perf_counter()
            s.restore(prefixes[k])
            times[k].append(time.perf_counter() - t0)
    total = sum(a.nbytes for a in arrays.values())
    lines = bl.header_lines(info) + ["", f"restore in place from {args.dir}, {args.repeat} interleaved rounds", ""]
    for k, ts in times.items():
        lines.append(f"{k} group(s): restore median {np.median(ts):.3f} s (min {min(ts):.3f}, "
                     f"range {max(ts) - min(ts):.3f})")
    ratio = np.median(times[args.groups]) / np.median(times[1])
    lines.append(f"{len(arrays)} tensors, {total / 2**30:.2f} GiB: {args.groups} groups / 1 group = {ratio:.2f}")
    bl.emit(lines, args.text)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
