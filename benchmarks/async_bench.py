"""How long ``save_async`` blocks, against a synchronous ``save`` of the same state, in one run.

    .venv/bin/python benchmarks/async_bench.py --repeat 5 --text benchmarks/results/out.txt

Per repetition, interleaved: ``save`` (wall time), ``save_async`` (the time it
blocks, then the time until ``result()`` returns), a plain ``memcpy`` of the
same bytes into memory already touched (NumPy, one thread), and the same copy
in non-temporal stores split over the snapshot's copy threads (the routine the
capture uses; without the C extension, NumPy's copy): the floor of a host
snapshot. Files of
each save are deleted before the next one, so the memory in use stays steady.
Then ``examples/train.py`` with a checkpoint every step: its loop time with
``save``, with ``save_async`` and with no checkpoints, interleaved.

The Saver keeps its snapshot pool from one save to the next: the first
``save_async`` also allocates and first-touches the pool, and is reported on
its own (``first``); the medians are over the later ones.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

import numpy as np  # noqa: E402

import _benchlib as bl  # noqa: E402
import gpusaver as gs  # noqa: E402


def _clear(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def bench_saves(args: argparse.Namespace) -> dict[str, Any]:
    wl = bl.mixed_workload(args.size_gib)
    arrays = bl.build_arrays(wl)
    total = sum(a.nbytes for a in arrays.values())
    work = tempfile.mkdtemp(prefix="gpusaver-async-", dir=args.dir)
    floor_buf = np.empty(total, np.uint8)
    floor_buf[:] = 1  # touched: the floor copies into memory already mapped, as the reused pool is
    saver = gs.Saver(arrays, max_to_keep=1)
    from gpusaver.pipeline.snapshot import _copy as snapshot_copy

    times: dict[str, list[float]] = {"save": [], "save_async blocked": [], "save_async until result": [], "memcpy": [],
                                     "stream copy, threads": []}
    first: dict[str, float] = {}
    try:
        for rep in range(args.repeat + 1):
            t0 = time.perf_counter()
            saver.save(os.path.join(work, "sync"))
            sync = time.perf_counter() - t0
            _clear(work)

            t0 = time.perf_counter()
            handle = saver.save_async(os.path.join(work, "async"))
            blocked = time.perf_counter() - t0
            handle.result()
            until = time.perf_counter() - t0
            _clear(work)

            t0 = time.perf_counter()
            at = 0
            for a in arrays.values():
                n = a.nbytes
                floor_buf[at : at + n] = a.reshape(-1).view(np.uint8)
                at += n
            copy = time.perf_counter() - t0

            t0 = time.perf_counter()
            at = 0
            for a in arrays.values():
                n = a.nbytes
                snapshot_copy(floor_buf[at : at + n], a.reshape(-1).view(np.uint8))
                at += n
            stream = time.perf_counter() - t0
            now = {"save": sync, "save_async blocked": blocked, "save_async until result": until, "memcpy": copy,
                   "stream copy, threads": stream}
            if rep == 0:
                first = now
                continue
            for key, value in now.items():
                times[key].append(value)
    finally:
        saver.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"workload": wl.describe(), "bytes": total, "first": first,
            "stats": {k: bl.summary(v) for k, v in times.items()}, "times": times}


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    script = os.path.join(os.path.dirname(_HERE), "examples", "train.py")
    modes = {"no checkpoints": ["--save-every", str(10**9)], "save every step": [],
             "save_async every step": ["--async-save"]}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.train_repeat):
        for mode, extra in modes.items():
            work = tempfile.mkdtemp(prefix="gpusaver-train-", dir=args.dir)
            try:
                out = subprocess.run(
                    [sys.executable, script, "--ckpt-dir", work, "--steps", str(args.train_steps), "--save-every", "1",
                     "--hidden", str(args.hidden), "--print-time", *extra],
                    capture_output=True, text=True, check=True,
                ).stdout
            finally:
                shutil.rmtree(work, ignore_errors=True)
            times[mode].append(float(re.search(r"training loop: ([\d.]+) s", out).group(1)))
    return {"steps": args.train_steps, "hidden": args.hidden, "stats": {k: bl.summary(v) for k, v in times.items()},
            "times": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="the mixed workload's size (default 1)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions after a first, untimed one")
    p.add_argument("--dir", default="/dev/shm", help="where to save (default tmpfs)")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--train-repeat", type=int, default=3, help="runs of each train.py mode (0: none)")
    p.add_argument("--hidden", type=int, default=4096, help="train.py's hidden width (about 256 KiB per 1k)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--text", metavar="OUT")
    args = p.parse_args(argv)

    info = bl.machine_info(("gpusaver", "numpy"))
    saves = bench_saves(args)
    train = bench_train(args) if args.train_repeat > 0 else None
    lines = bl.header_lines(info)
    lines += ["", f"mixed workload on {args.dir}: {saves['workload']}",
              f"{args.repeat} timed repetitions, interleaved (save, save_async, memcpy, stream copy), after one untimed",
              ""]
    st = saves["stats"]
    ref = st["save"]["median_s"]
    rows = [[k, bl.fmt(v["median_s"]), bl.fmt(v["best_s"]), bl.fmt(v["spread_s"]), f"{v['median_s'] / ref:.2f}x",
             bl.fmt(saves["first"][k])] for k, v in st.items()]
    lines.append(bl.table(["", "median s", "min s", "range s", "vs save", "first s"], rows))
    if train is not None:
        lines += ["", f"examples/train.py, a checkpoint every step ({train['steps']} steps, --hidden {train['hidden']}), "
                  f"{args.train_repeat} runs each, interleaved", ""]
        tt = train["stats"]
        base = tt["no checkpoints"]["median_s"]
        rows = [[k, bl.fmt(v["median_s"]), bl.fmt(v["best_s"]), bl.fmt(v["spread_s"]), f"{v['median_s'] / base:.2f}x"]
                for k, v in tt.items()]
        lines.append(bl.table(["loop", "median s", "min s", "range s", "vs none"], rows))
    bl.emit(lines, args.text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "saves": saves, "train": train}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
