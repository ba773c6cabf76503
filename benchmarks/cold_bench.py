"""Restore from a cold page cache: gpusaver against raw reads of the same file, measured the same way.

    sudo .venv/bin/python benchmarks/cold_bench.py --dir benchmarks/.scratch --repeat 3

The GPT-2-medium-like state (bf16 parameters, fp32 Adam moments, 3.5 GB) is saved once on the
disk under ``--dir``. Then, per repetition and per reader, interleaved: the page cache is dropped
(``/proc/sys/vm/drop_caches``: root only), a fresh process allocates fresh, untouched destination
arrays, and reads every tensor of the data file into them, timed from the first read to the last:

* ``gpusaver``: ``Saver.restore`` (every tensor's crc32c verified);
* ``raw T x C MiB``: ``os.preadv`` of each tensor's bytes into its array on T threads (each a
  contiguous part of the file; gpusaver's threads instead take 16 MiB jobs in file order, each the
  next one when done), C MiB per call, no checks.

The raw rows with several read sizes show what a cold restore depends on here: the size of each
read call (the kernel reads a cold file in requests as large as the call allows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

import numpy as np  # noqa: E402

import _benchlib as bl  # noqa: E402


def _child(args: argparse.Namespace) -> None:
    wl = bl.gpt2m_workload(args.scale)
    prefix = os.path.join(args.dir, "cold", "m")
    arrays = {name: np.empty(shape, wl.dtype(i)) for i, (name, shape) in enumerate(wl.shapes)}  # untouched
    if args.child == "gpusaver":
        import gpusaver as gs

        saver = gs.Saver(arrays)
        t0 = time.perf_counter()
        saver.restore(prefix)
        seconds = time.perf_counter() - t0
    else:
        from concurrent.futures import ThreadPoolExecutor

        from gpusaver.format import BundleReader

        threads, chunk = (int(x) for x in args.child.split(":")[1:])
        with BundleReader(prefix) as reader:
            jobs = sorted((reader.entry(n).offset, memoryview(a.reshape(-1).view(np.uint8))) for n, a in arrays.items())
        fd = os.open(prefix + ".data-00000-of-00001", os.O_RDONLY)
        step = chunk << 20

        def run(part: list) -> None:
            for off, mv in part:
                done = 0
                while done < len(mv):
                    done += os.preadv(fd, [mv[done : done + step]], off + done)

        parts = [jobs[k * len(jobs) // threads : (k + 1) * len(jobs) // threads] for k in range(threads)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, parts))
        seconds = time.perf_counter() - t0
        os.close(fd)
    print(json.dumps({"s": seconds}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=os.path.join(_HERE, ".scratch"), help="a directory on the disk")
    p.add_argument("--scale", type=float, default=1.0, help="GPT-2-medium widths times this")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--raw", default="2:1,2:16,2:64,4:64", help="raw readers, THREADS:MiB each")
    p.add_argument("--text", metavar="OUT")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("cold_bench needs to drop the page cache (/proc/sys/vm/drop_caches): run it as root", file=sys.stderr)
        return 2
    import gpusaver as gs

    wl = bl.gpt2m_workload(args.scale)
    prefix = os.path.join(args.dir, "cold", "m")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    if not os.path.exists(prefix + ".index"):
        gs.Saver(bl.build_arrays(wl)).save(prefix)
    readers = ["gpusaver"] + [f"raw:{r}" for r in args.raw.split(",")]
    times: dict[str, list[float]] = {r: [] for r in readers}
    for _ in range(args.repeat):
        for r in readers:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--scale", str(args.scale),
                                  "--child", r], capture_output=True, text=True, check=True).stdout
            times[r].append(json.loads(out.strip().splitlines()[-1])["s"])
    info = bl.machine_info(("gpusaver", "numpy"))
    ref = min(bl.summary(v)["median_s"] for k, v in times.items() if k != "gpusaver")
    lines = bl.header_lines(info) + [
        "", f"cold restore, {wl.describe()}, {bl.fs_type(args.dir)} ({args.dir}), page cache dropped before each, "
        f"fresh process and untouched destination arrays for every reader, {args.repeat} interleaved rounds", "",
    ]
    rows = []
    for r, v in times.items():
        st = bl.summary(v)
        name = r if r == "gpusaver" else "raw {} threads x {} MiB reads".format(*r.split(":")[1:])
        rows.append([name, bl.fmt(st["median_s"]), bl.fmt(st["best_s"]), bl.fmt(st["spread_s"]),
                     f"{st['median_s'] / ref:.2f}x"])
    lines.append(bl.table(["reader", "median s", "min s", "range s", "x fastest raw"], rows))
    bl.emit(lines, args.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
