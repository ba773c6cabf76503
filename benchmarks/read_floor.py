"""What verifying costs on top of the raw read: ``preadv`` alone against ``preadv`` + crc32c of each chunk.

    .venv/bin/python benchmarks/read_floor.py --size-gib 1 --repeat 9 --text benchmarks/results/out.txt

A file of ``--size-gib`` random bytes is written under ``--dir`` (tmpfs by default) and read into
memory already touched, by ``--threads`` threads that take chunks in file order, each the next one
when done (as gpusaver's restore does). Rows, interleaved per round: the read alone in 16 MiB
chunks (the raw reference's way), and the read with the crc32c package's checksum of each chunk
right after it arrives, for each ``--chunks`` size. The best row with checksums, over the read
alone, is the least a verified restore can cost against an unverified one on this machine.
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

import crc32c  # noqa: E402
import numpy as np  # noqa: E402

import _benchlib as bl  # noqa: E402


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def read_all(fd: int, out: memoryview, chunk: int, threads: int, verify: bool) -> float:
    """Seconds to read the whole file into ``out`` in ``chunk``-byte jobs on ``threads`` threads."""
    n = len(out)
    lock = threading.Lock()
    state = {"next": 0}

    def worker() -> None:
        while True:
            with lock:
                at = state["next"]
                state["next"] = at + chunk
            if at >= n:
                return
            piece = out[at : min(n, at + chunk)]
            done = 0
            while done < len(piece):
                got = os.preadv(fd, [piece[done:]], at + done)
                if got <= 0:
                    raise OSError(f"short read at {at + done}")
                done += got
            if verify:
                crc32c.crc32c(piece)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--chunks", default="64K,256K,1M,16M", help="chunk sizes of the rows with checksums")
    p.add_argument("--text", metavar="OUT", help="also write the report here")
    args = p.parse_args(argv)
    chunks = [_size(c) for c in args.chunks.split(",")]
    nbytes = int(args.size_gib * (1 << 30))
    info = bl.machine_info(("numpy", "crc32c"))
    out = np.ones(nbytes, np.uint8)  # touched: the rows differ only in what they do after each read
    rows = [("read, 16 MiB chunks (reference)", 16 << 20, False)]
    rows += [(f"read + crc32c, {c >> 10} KiB chunks" if c < (1 << 20) else f"read + crc32c, {c >> 20} MiB chunks", c, True)
             for c in chunks]
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    with tempfile.NamedTemporaryFile(dir=args.dir, prefix="gpusaver-floor-") as f:
        rng = np.random.default_rng(0)
        for at in range(0, nbytes, 64 << 20):
            f.write(rng.integers(0, 256, min(64 << 20, nbytes - at), dtype=np.uint8).tobytes())
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        try:
            read_all(fd, memoryview(out), 16 << 20, args.threads, False)  # untimed: the file's pages are cached
            for _ in range(args.repeat):
                for name, chunk, verify in rows:
                    times[name].append(read_all(fd, memoryview(out), chunk, args.threads, verify))
        finally:
            os.close(fd)
    ref = float(np.median(times[rows[0][0]]))
    lines = bl.header_lines(info) + [
        "",
        f"{nbytes:,} bytes from {args.dir or tempfile.gettempdir()} into memory already touched, {args.threads} threads "
        f"taking chunks in turn, {args.repeat} interleaved rounds",
        "",
        bl.ratio_table(times, nbytes, "vs read"),
    ]
    best = min(float(np.median(times[name])) for name, _, verify in rows if verify)
    lines += ["", f"checksummed read / read: {best / ref:.2f} at best (the floor of a verified restore against raw)"]
    bl.emit(lines, args.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
