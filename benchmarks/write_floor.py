"""How much a second thread helps writing one file: ``pwrite`` from 1 thread, from 2 threads into
the same file, and from 2 threads into two files.

    .venv/bin/python benchmarks/write_floor.py --size-mib 64 --repeat 15 --text benchmarks/results/out.txt

``--size-mib`` of random bytes in memory are written under ``--dir`` (tmpfs by default) in 4 MiB
``pwrite`` calls (gpusaver's packed jobs are about that size): by one thread into one new file; by
``--threads`` threads into one new file, each taking the next chunk when done; and by that many
threads into as many new files, each writing its share. Rows are interleaved per round; every file
is deleted before the next row. Where the two-threads-one-file row is no faster than one thread,
the kernel writes that file one call at a time (tmpfs takes the file's lock for each write): a save
into one file cannot write faster than one thread does, whatever else runs beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

import numpy as np  # noqa: E402

import _benchlib as bl  # noqa: E402

CHUNK = 4 << 20


def write_all(directory: str, data: memoryview, threads: int, files: int) -> float:
    """Seconds to write ``data`` in CHUNK-byte calls on ``threads`` threads into ``files`` new files
    (one file: threads take chunks in turn; one file each: each thread writes its share)."""
    n = len(data)
    paths = [os.path.join(directory, f"gpusaver-write-floor-{k}") for k in range(files)]
    lock = threading.Lock()
    state = {"next": 0}

    def shared(fd: int) -> None:
        while True:
            with lock:
                at = state["next"]
                state["next"] = at + CHUNK
            if at >= n:
                return
            os.pwrite(fd, data[at : min(n, at + CHUNK)], at)

    def own(fd: int, lo: int, hi: int) -> None:
        for at in range(lo, hi, CHUNK):
            os.pwrite(fd, data[at : min(hi, at + CHUNK)], at - lo)

    t0 = time.perf_counter()
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for p in paths]
    try:
        if files == 1:
            workers = [threading.Thread(target=shared, args=(fds[0],)) for _ in range(threads)]
        else:
            bounds = [n * k // files for k in range(files + 1)]
            workers = [threading.Thread(target=own, args=(fds[k], bounds[k], bounds[k + 1])) for k in range(files)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        for fd in fds:
            os.close(fd)
    seconds = time.perf_counter() - t0
    for p in paths:
        os.unlink(p)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=float, default=64.0)
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--text", metavar="OUT", help="also write the report here")
    args = p.parse_args(argv)
    nbytes = int(args.size_mib * (1 << 20))
    info = bl.machine_info(("numpy",))
    data = memoryview(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8))
    t = args.threads
    rows = [("1 thread, 1 file (reference)", 1, 1), (f"{t} threads, 1 file", t, 1), (f"{t} threads, {t} files", t, t)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="gpusaver-write-floor-") as d:
        write_all(d, data, 1, 1)  # untimed: the first write of the run
        for _ in range(args.repeat):
            for name, threads, files in rows:
                times[name].append(write_all(d, data, threads, files))
    lines = bl.header_lines(info) + [
        "",
        f"{nbytes:,} bytes from memory to new files in {args.dir}, {CHUNK >> 20} MiB pwrite calls, "
        f"{args.repeat} interleaved rounds",
        "",
        bl.ratio_table(times, nbytes, "vs 1 thread"),
    ]
    bl.emit(lines, args.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
