"""The per-tensor overheads of many small tensors: a restore's up-front checks and building a Saver.

    python benchmarks/checks_bench.py restore --count 100000 --repeat 9
    python benchmarks/checks_bench.py build --count 1000000
    python benchmarks/checks_bench.py save --count 100000 --shapes many --repeat 9
    python benchmarks/checks_bench.py ab --old /tmp/gs-old --new . --rounds 4 restore --count 100000

``restore``: a checkpoint of ``--count`` float32 tensors of mixed small shapes (``--shapes mixed``,
16 to 160 elements, 256 bytes on average) or all ``(10, 16)`` (``--shapes many``, the benchmark's
many workload) is saved under ``--dir`` (tmpfs by default), then restored in place ``--repeat``
times by one Saver (after one untimed restore), whose names come in sorted order or, with
``--order shuffled``, in an order unrelated to the index's. Each restore is timed whole (``Saver.restore``) and
split where it starts reading tensor bytes (``restore_checkpoint``, wrapped here): everything before
is the up-front checks (opening the index, looking up every entry, checking names, dtypes and shapes).
Prints the medians and the checks' share of the restore.

``save``: the same arrays (``--order`` the Saver's) saved ``--repeat`` times under ``--dir`` by one
Saver (``durable=False``, after one untimed save, the files removed before each), a full garbage
collection before each: the median of the whole ``Saver.save``.

``build``: ``Saver(dict)`` over ``--count`` arrays of 4 float32 each, as separate arrays
(``--layout separate``) and as views of one buffer (``--layout views``), µs per tensor (median).

``ab``: runs the command after it with the gpusaver found in ``--old`` and in ``--new``, alternating
(old, new, old, new, ...) ``--rounds`` times, each run in a fresh process, and prints every run's
figures and the medians side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHAPES = {"mixed": [(10, 16), (4, 8), (32,), (2, 3, 5), (64,), (8, 8)], "many": [(10, 16)]}


def _import(src: str | None) -> Any:
    sys.path.insert(0, os.path.abspath(src) if src else os.path.dirname(_HERE))
    import gpusaver

    return gpusaver


def restore(args: argparse.Namespace) -> dict[str, Any]:
    gs = _import(args.src)
    import numpy as np

    from gpusaver import saver as saver_module

    shapes = _SHAPES[args.shapes]
    rng = np.random.default_rng(0)
    arrays = {f"layer{i:07d}/w": rng.random(shapes[i % len(shapes)], dtype=np.float32) for i in range(args.count)}
    if args.order == "shuffled":  # the Saver's order unrelated to the index's (a model's own order)
        names = list(arrays)
        rng.shuffle(names)
        arrays = {k: arrays[k] for k in names}
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        prefix = gs.Saver(arrays, durable=False).save(os.path.join(root, "ckpt"), write_state=False)
        dest = {k: np.empty_like(v) for k, v in arrays.items()}
        saver = gs.Saver(dest)
        saver.restore(prefix)  # untimed: the first restore
        started: list[float] = []
        inner = saver_module.restore_checkpoint

        def timed(*a: Any, **k: Any) -> Any:
            started.append(time.perf_counter())
            return inner(*a, **k)

        saver_module.restore_checkpoint = timed
        totals, checks = [], []
        for _ in range(args.repeat):
            gc.collect()
            t0 = time.perf_counter()
            saver.restore(prefix)
            t1 = time.perf_counter()
            totals.append(t1 - t0)
            checks.append(started.pop() - t0)
        saver_module.restore_checkpoint = inner
        assert all(np.array_equal(dest[k], arrays[k]) for k in list(arrays)[:: max(1, len(arrays) // 1000)])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total, check = statistics.median(totals), statistics.median(checks)
    shares = [c / t for c, t in zip(checks, totals)]
    return {
        "restore_ms": total * 1e3,
        "checks_ms": check * 1e3,
        "reads_ms": statistics.median(t - c for t, c in zip(totals, checks)) * 1e3,
        "share": statistics.median(shares),
    }


def save(args: argparse.Namespace) -> dict[str, Any]:
    gs = _import(args.src)
    import numpy as np

    shapes = _SHAPES[args.shapes]
    rng = np.random.default_rng(0)
    arrays = {f"layer{i:07d}/w": rng.random(shapes[i % len(shapes)], dtype=np.float32) for i in range(args.count)}
    if args.order == "shuffled":
        names = list(arrays)
        rng.shuffle(names)
        arrays = {k: arrays[k] for k in names}
    saver = gs.Saver(arrays, durable=False)
    root = tempfile.mkdtemp(dir=args.dir)
    times = []
    try:
        for k in range(args.repeat + 1):
            where = os.path.join(root, str(k))
            os.mkdir(where)
            gc.collect()
            t0 = time.perf_counter()
            saver.save(os.path.join(where, "ckpt"), write_state=False)
            if k:  # the first one untimed
                times.append(time.perf_counter() - t0)
            shutil.rmtree(where)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"save_ms": statistics.median(times) * 1e3, "save_min_ms": min(times) * 1e3}


def build(args: argparse.Namespace) -> dict[str, Any]:
    gs = _import(args.src)
    import numpy as np

    out: dict[str, Any] = {}
    for layout in args.layout.split(","):
        if layout == "separate":
            arrays = {f"layer{i:07d}/w": np.zeros(4, np.float32) for i in range(args.count)}
        else:
            buf = np.zeros(4 * args.count, np.float32)
            arrays = {f"layer{i:07d}/w": buf[4 * i : 4 * i + 4] for i in range(args.count)}
        times = []
        for _ in range(args.repeat):
            gc.collect()
            t0 = time.perf_counter()
            s = gs.Saver(arrays)
            times.append(time.perf_counter() - t0)
            del s
        out[f"{layout}_us_per_tensor"] = statistics.median(times) / args.count * 1e6
        del arrays
    return out


def ab(args: argparse.Namespace, rest: list[str]) -> None:
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for label, src in (("old", args.old), ("new", args.new)):
            cmd = [sys.executable, os.path.abspath(__file__), *rest, "--src", src, "--json-out"]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            runs[label].append(res)
            print(f"round {r + 1} {label}: " + "  ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    print("medians:")
    for key in runs["old"][0]:
        old = statistics.median(x[key] for x in runs["old"])
        new = statistics.median(x[key] for x in runs["new"])
        print(f"  {key:24s} old {old:9.3f}  new {new:9.3f}  new/old {new / old:.2f}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ab":
        p = argparse.ArgumentParser(prog="checks_bench.py ab")
        p.add_argument("--old", required=True)
        p.add_argument("--new", default=os.path.dirname(_HERE))
        p.add_argument("--rounds", type=int, default=4)
        args, rest = p.parse_known_args(argv[1:])
        ab(args, rest)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["restore", "save", "build"])
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--shapes", choices=sorted(_SHAPES), default="mixed")
    p.add_argument("--layout", default="separate,views")
    p.add_argument("--order", choices=["sorted", "shuffled"], default="sorted", help="the restoring Saver's name order")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--src", default=None, help="the directory holding the gpusaver package to measure")
    p.add_argument("--json-out", action="store_true", help="print one JSON line (used by ab)")
    args = p.parse_args(argv)
    if args.mode in ("restore", "save"):
        args.count, args.repeat = args.count or 100_000, args.repeat or 9
        res = restore(args) if args.mode == "restore" else save(args)
    else:
        args.count, args.repeat = args.count or 1_000_000, args.repeat or 3
        res = build(args)
    if args.json_out:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:24s} {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
