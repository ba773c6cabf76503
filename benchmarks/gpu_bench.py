"""gpusaver on GPUs: save and restore GB/s per device, next to what the hardware allows.

Run (a GPU machine with CuPy; PyTorch and safetensors are optional peers)::

    python benchmarks/gpu_bench.py --size-gib 4 --gpus 1,2,4,8 --dir /local/nvme/tmp \\
        --json gpu.json --text gpu.txt
    python benchmarks/gpu_bench.py --dry-run     # the same code on NumPy and virtual CPU devices, tiny sizes

For each GPU count k, every GPU holds the same workload (``--workload``,
``--size-gib`` per GPU) and, with k GPUs at once, the script times (median of
``--repeat``):

* ``pinned D2H`` / ``pinned H2D``: one contiguous copy of each GPU's bytes into
  (out of) a pinned host buffer from ``cupy.cuda.alloc_pinned_memory``, all k
  GPUs at once: the PCIe/NVLink-C2C bound.
* ``raw write`` / ``raw read``: each GPU's bytes written from those pinned
  buffers into a file of its own (k threads, fsync with ``--durable on``) and
  read back with ``os.preadv`` (page cache evicted first): the storage bound.
* ``gpusaver``: ``Saver([Variable(arr, name) ...], sharded=True).save()`` of
  CuPy arrays on k GPUs (one shard per GPU) and ``restore()`` in place into
  other arrays of the same shapes, checksums verified, values compared on
  the GPU.
* ``torch`` (when installed): ``torch.save``/``torch.load`` of CUDA tensors
  (``torch.from_dlpack`` of the same arrays), one file per GPU on k threads.
* ``safetensors`` (when installed): ``safetensors.torch.save_file`` /
  ``load_file(device="cuda:i")``, one file per GPU on k threads.

``--dry-run`` runs everything on the CPU with NumPy (virtual devices
``/cpu:0``, ``/cpu:1``, a plain host buffer instead of pinned memory), so the
logic can be checked without a GPU; its numbers mean nothing.
CuPy is imported only when the script runs for real, so ``--help`` and
``--dry-run`` work without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

import numpy as np  # noqa: E402

import _benchlib as bl  # noqa: E402

PACKAGES = ("gpusaver", "numpy", "cupy-cuda12x", "cupy-cuda13x", "cupy", "torch", "safetensors", "crc32c")


# ------------------------------------------------------------------- devices
class HostDevices:
    """The dry run: NumPy arrays on virtual CPU devices."""

    kind = "dry run (NumPy, virtual CPU devices)"

    def __init__(self, count: int) -> None:
        self._count = count

    def count(self) -> int:
        return self._count

    def names(self) -> list[str]:
        return [f"/cpu:{i}" for i in range(self._count)]

    def arrays(self, i: int, workload: bl.Workload, fill: str) -> dict[str, Any]:
        return bl.build_arrays(workload, fill)

    def flat(self, i: int, nbytes: int) -> Any:
        return np.ones(nbytes, np.uint8)

    def host_buffer(self, nbytes: int) -> np.ndarray:
        buf = np.empty(nbytes, np.uint8)
        buf.fill(0)
        return buf

    def d2h(self, i: int, src: Any, dst: np.ndarray) -> None:
        np.copyto(dst, src)

    def h2d(self, i: int, src: np.ndarray, dst: Any) -> None:
        np.copyto(dst, src)

    def sync(self, i: int) -> None:
        return None

    def equal(self, a: Any, b: Any) -> bool:
        return bool(np.array_equal(a, b))

    def variable(self, arr: Any, name: str, i: int) -> Any:
        import gpusaver

        return gpusaver.Variable(arr, name, device=f"/cpu:{i}")

    def torch_tensor(self, arr: Any) -> Any:
        import torch

        return torch.from_numpy(arr)

    def torch_device(self, i: int) -> str:
        return "cpu"

    def free(self) -> None:
        return None


class CudaDevices:
    """CuPy arrays, one GPU each."""

    kind = "CUDA (CuPy)"

    def __init__(self) -> None:
        import cupy

        self.cp = cupy

    def count(self) -> int:
        return int(self.cp.cuda.runtime.getDeviceCount())

    def names(self) -> list[str]:
        out = []
        for i in range(self.count()):
            props = self.cp.cuda.runtime.getDeviceProperties(i)
            name = props["name"]
            out.append(name.decode() if isinstance(name, bytes) else str(name))
        return out

    def arrays(self, i: int, workload: bl.Workload, fill: str) -> dict[str, Any]:
        cp = self.cp
        out = {}
        with cp.cuda.Device(i):
            rng = cp.random.default_rng(i)
            for name, shape in workload.shapes:
                if fill == "data":
                    out[name] = rng.standard_normal(shape, dtype=cp.float32)
                else:
                    out[name] = cp.full(shape, -1.0, cp.float32)
            cp.cuda.Device(i).synchronize()
        return out

    def flat(self, i: int, nbytes: int) -> Any:
        with self.cp.cuda.Device(i):
            return self.cp.ones(nbytes, self.cp.uint8)

    def host_buffer(self, nbytes: int) -> np.ndarray:
        mem = self.cp.cuda.alloc_pinned_memory(nbytes)
        buf = np.frombuffer(mem, np.uint8, nbytes)
        buf.fill(0)
        return buf

    def d2h(self, i: int, src: Any, dst: np.ndarray) -> None:
        with self.cp.cuda.Device(i):
            src.get(out=dst)

    def h2d(self, i: int, src: np.ndarray, dst: Any) -> None:
        with self.cp.cuda.Device(i):
            dst.set(src)

    def sync(self, i: int) -> None:
        self.cp.cuda.Device(i).synchronize()

    def equal(self, a: Any, b: Any) -> bool:
        with a.device:
            return bool(self.cp.array_equal(a, b))

    def variable(self, arr: Any, name: str, i: int) -> Any:
        import gpusaver

        return gpusaver.Variable(arr, name)

    def torch_tensor(self, arr: Any) -> Any:
        import torch

        return torch.from_dlpack(arr)

    def torch_device(self, i: int) -> str:
        return f"cuda:{i}"

    def free(self) -> None:
        if "torch" in sys.modules:
            sys.modules["torch"].cuda.empty_cache()
        self.cp.get_default_memory_pool().free_all_blocks()
        self.cp.get_default_pinned_memory_pool().free_all_blocks()


# -------------------------------------------------------------------- helpers
def on_threads(k: int, fn: Callable[[int], Any]) -> list[Any]:
    """Runs ``fn(0..k-1)`` on k threads; re-raises the first error."""
    results: list[Any] = [None] * k
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def best_of(repeat: int, op: Callable[[], Any], before: Callable[[], Any] | None = None) -> list[float]:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return times


def _io_threads() -> int:
    from gpusaver import config

    return config.get("writer_threads") or min(4, os.cpu_count() or 1)


def _regions(nbytes: int, parts: int) -> list[tuple[int, int]]:
    step = -(-nbytes // parts)
    return [(o, min(step, nbytes - o)) for o in range(0, nbytes, step)] or [(0, 0)]


def _write_file(path: str, buf: np.ndarray, durable: bool, threads: int = 1) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(buf).cast("B")

        def region(i: int) -> None:
            start, size = regions[i]
            done = 0
            while done < size:
                n = min(size - done, 1 << 30)
                done += os.pwrite(fd, view[start + done : start + done + n], start + done)

        regions = _regions(len(view), threads)
        on_threads(len(regions), region)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: str, buf: np.ndarray, threads: int = 1) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(buf).cast("B")

        def region(i: int) -> None:
            start, size = regions[i]
            done = 0
            while done < size:
                got = os.preadv(fd, [view[start + done : start + done + min(size - done, 1 << 30)]], start + done)
                if got <= 0:
                    raise OSError(f"{path}: short file")
                done += got

        regions = _regions(len(view), threads)
        on_threads(len(regions), region)
    finally:
        os.close(fd)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------- one count
def bench_count(dev: Any, k: int, wl: bl.Workload, args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    """Every measurement with ``k`` devices at once."""
    rows: list[dict[str, Any]] = []
    per_dev = wl.nbytes
    total = per_dev * k
    durable = args.durable == "on"

    def add(peer: str, op: str, times: list[float], **extra: Any) -> None:
        med, best = float(np.median(times)), min(times)
        rows.append(dict(gpus=k, peer=peer, op=op, times=times, median_s=med, min_s=best,
                         spread_s=max(times) - best, bytes=total, gbps=total / med / 1e9,
                         gbps_per_device=total / med / 1e9 / k, **extra))
        print(f"  {k} device(s): {peer} {op}: median {med:.3f} s (min {best:.3f}, range {max(times) - best:.3f}), "
              f"{total / med / 1e9:.2f} GB/s", file=sys.stderr, flush=True)

    def evict() -> None:
        bl.evict(bl.files_under(root), args.cache)

    # pinned copies and raw file I/O
    flats = [dev.flat(i, per_dev) for i in range(k)]
    hosts = [dev.host_buffer(per_dev) for i in range(k)]
    add("pinned", "D2H", best_of(args.repeat, lambda: on_threads(k, lambda i: (dev.d2h(i, flats[i], hosts[i]), dev.sync(i)))))
    add("pinned", "H2D", best_of(args.repeat, lambda: on_threads(k, lambda i: (dev.h2d(i, hosts[i], flats[i]), dev.sync(i)))))
    del flats
    raw_paths = [os.path.join(root, f"raw-{i}.bin") for i in range(k)]
    # The raw limit: the faster of one thread per file and N threads per file (N = gpusaver's writer threads),
    # each writing (reading) its own contiguous region with pwrite (preadv).
    n = _io_threads()
    remove = lambda: [os.remove(p) for p in raw_paths if os.path.exists(p)]  # noqa: E731
    w1 = best_of(args.repeat, lambda: on_threads(k, lambda i: _write_file(raw_paths[i], hosts[i], durable, 1)), before=remove)
    wn = best_of(args.repeat, lambda: on_threads(k, lambda i: _write_file(raw_paths[i], hosts[i], durable, n)), before=remove)
    add("raw file", "write", min(w1, wn, key=np.median), durable=durable, threads=1 if np.median(w1) <= np.median(wn) else n,
        times_1_thread=w1, times_n_threads=wn, n_threads=n)
    r1 = best_of(args.repeat, lambda: on_threads(k, lambda i: _read_file(raw_paths[i], hosts[i], 1)), before=evict)
    rn = best_of(args.repeat, lambda: on_threads(k, lambda i: _read_file(raw_paths[i], hosts[i], n)), before=evict)
    add("raw file", "read", min(r1, rn, key=np.median), cache=args.cache, threads=1 if np.median(r1) <= np.median(rn) else n,
        times_1_thread=r1, times_n_threads=rn, n_threads=n)
    for p in raw_paths:
        os.remove(p)
    del hosts
    dev.free()

    # gpusaver
    import gpusaver

    src = [dev.arrays(i, wl, "data") for i in range(k)]
    dst = [dev.arrays(i, wl, "blank") for i in range(k)]
    prefix = os.path.join(root, "model")
    save_vars = [dev.variable(a, f"dev{i}/{n}", i) for i in range(k) for n, a in src[i].items()]
    phases: list[tuple[str, float]] = []
    saver = gpusaver.Saver(save_vars, sharded=True, durable=durable, on_phase=lambda p, s: phases.append((p, s)))
    times = best_of(args.repeat, lambda: saver.save(prefix), before=lambda: (phases.clear(), _clear(root)))
    add("gpusaver", "save", times, durable=durable, last_phases=dict(phases))
    restorer = gpusaver.Saver([dev.variable(a, f"dev{i}/{n}", i) for i in range(k) for n, a in dst[i].items()],
                              sharded=True)
    times = best_of(args.repeat, lambda: restorer.restore(prefix), before=evict)
    ok = all(dev.equal(src[i][n], dst[i][n]) for i in range(k) for n in src[i])
    add("gpusaver", "restore", times, verified=ok, cache=args.cache)
    del dst, saver, restorer
    _clear(root)
    dev.free()

    # torch and safetensors, one file per device on k threads
    if _installed("torch"):
        import torch

        tensors = [{n: dev.torch_tensor(a) for n, a in src[i].items()} for i in range(k)]
        paths = [os.path.join(root, f"model-{i}.pt") for i in range(k)]
        add("torch", "save", best_of(args.repeat, lambda: on_threads(k, lambda i: torch.save(tensors[i], paths[i])),
                                     before=lambda: _clear(root)))
        loaded: list[Any] = []

        def torch_load(i: int) -> Any:
            out = torch.load(paths[i], map_location=dev.torch_device(i), weights_only=True)
            if dev.torch_device(i) != "cpu":
                torch.cuda.synchronize(i)
            return out

        times = best_of(args.repeat, lambda: loaded.append(on_threads(k, torch_load)),
                        before=lambda: (loaded.clear(), evict()))
        add("torch", "load", times, cache=args.cache)
        loaded.clear()
        _clear(root)
        if _installed("safetensors"):
            from safetensors.torch import load_file, save_file

            paths = [os.path.join(root, f"model-{i}.safetensors") for i in range(k)]
            add("safetensors", "save", best_of(args.repeat, lambda: on_threads(k, lambda i: save_file(tensors[i], paths[i])),
                                               before=lambda: _clear(root)))

            def st_load(i: int) -> Any:
                out = load_file(paths[i], device=dev.torch_device(i))
                if dev.torch_device(i) != "cpu":
                    torch.cuda.synchronize(i)
                return out

            times = best_of(args.repeat, lambda: loaded.append(on_threads(k, st_load)),
                            before=lambda: (loaded.clear(), evict()))
            add("safetensors", "load", times, cache=args.cache)
            loaded.clear()
            _clear(root)
        del tensors
    del src
    dev.free()
    outward = {"D2H", "write", "save"}
    for r in rows:
        out = r["op"] in outward
        pinned = _row(rows, "pinned", "D2H" if out else "H2D")
        raw = _row(rows, "raw file", "write" if out else "read")
        r["x_pinned"] = r["median_s"] / pinned["median_s"] if pinned and r["peer"] != "pinned" else None
        r["x_raw"] = r["median_s"] / raw["median_s"] if raw and r["peer"] not in ("pinned", "raw file") else None
    return rows


def _row(rows: list[dict[str, Any]], peer: str, op: str) -> dict[str, Any] | None:
    return next((x for x in rows if x["peer"] == peer and x["op"] == op), None)


def _clear(root: str) -> None:
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


# ------------------------------------------------------------------------ main
def _counts(spec: str, available: int) -> list[int]:
    if spec == "all":
        out, k = [], 1
        while k < available:
            out.append(k)
            k *= 2
        return out + [available]
    counts = sorted({int(x) for x in spec.split(",") if x})
    bad = [c for c in counts if c < 1 or c > available]
    if bad:
        raise SystemExit(f"--gpus {spec}: only {available} device(s) here")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="NumPy on virtual CPU devices, tiny sizes, no GPU needed")
    p.add_argument("--gpus", default="all", help="GPU counts to measure, e.g. 1,2,4,8 (default: 1, 2, 4, ... all)")
    p.add_argument("--workload", choices=("mixed", "many"), default="mixed", help="the workload on every device")
    p.add_argument("--size-gib", type=float, default=None, help="mixed: GiB per device (default 4; dry run 1/64)")
    p.add_argument("--many-count", type=int, default=None, help="many: tensors per device (default 100000; dry run 2000)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per measurement; the median counts")
    p.add_argument("--dir", default=os.path.join(_HERE, ".scratch"), help="where files are written")
    p.add_argument("--durable", choices=("on", "off"), default="on", help="fsync gpusaver's and the raw writes")
    p.add_argument("--cache", choices=("cold", "drop", "warm"), default="cold",
                   help="page cache before each read: cold (fadvise, default), drop (drop_caches), warm")
    p.add_argument("--devices", type=int, default=2, help="dry run: how many virtual devices")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--text", metavar="OUT")
    args = p.parse_args(argv)
    if args.size_gib is None:
        args.size_gib = 1 / 64 if args.dry_run else 4.0
    if args.many_count is None:
        args.many_count = 2000 if args.dry_run else bl.MANY_COUNT
    return args


def report(rows: list[dict[str, Any]]) -> str:
    table_rows = []
    for r in rows:
        notes = []
        if r.get("durable"):
            notes.append("fsync")
        if r.get("verified") is False:
            notes.append("WRONG VALUES")
        elif r.get("verified"):
            notes.append("verified")
        if r.get("cache"):
            notes.append(f"cache {r['cache']}")
        if r.get("threads"):
            notes.append(f"{r['threads']} thread(s)")
        table_rows.append([str(r["gpus"]), r["peer"], r["op"], bl.fmt(r["median_s"]), bl.fmt(r["min_s"]),
                           bl.fmt(r["spread_s"]), f"{r['gbps']:.2f}", f"{r['gbps_per_device']:.2f}",
                           bl.fmt(r["x_pinned"]), bl.fmt(r["x_raw"]), ", ".join(notes)])
    return bl.table(["gpus", "peer", "op", "median s", "min s", "range s", "GB/s", "GB/s/dev", "x pinned", "x raw",
                     "notes"], table_rows, "rllrrrrrrrl")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dev: Any = HostDevices(args.devices) if args.dry_run else CudaDevices()
    counts = _counts(args.gpus, dev.count())
    wl = bl.mixed_workload(args.size_gib) if args.workload == "mixed" else bl.many_workload(args.many_count)
    info = bl.machine_info(PACKAGES)
    info["devices"] = dev.names()
    info["device_kind"] = dev.kind
    root = os.path.join(args.dir, f"gpu-bench-{os.getpid()}")
    os.makedirs(root, exist_ok=True)
    head = ["gpusaver GPU benchmark" + (" -- DRY RUN: NumPy on the CPU, the numbers mean nothing" if args.dry_run else "")]
    head += bl.header_lines(info)
    head += [f"devices   {dev.kind}: {', '.join(info['devices'])}",
             f"workload  {args.workload} per device: {wl.describe()}; files in {args.dir} ({bl.fs_type(args.dir)})",
             f"method    median of {args.repeat} (min and range beside it); GB/s = 10^9 bytes of all k devices per second; x pinned = time / the "
             "pinned copy's (D2H for saves, H2D for restores); x raw = time / the raw file write's (read's)"]
    print("\n".join(head), flush=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        for k in counts:
            rows.extend(bench_count(dev, k, wl, args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info["elapsed_s"] = time.perf_counter() - t0
    text = "\n".join(head) + "\n\n" + report(rows) + f"\n\nelapsed {info['elapsed_s']:.0f} s\n"
    print("\n" + report(rows) + f"\n\nelapsed {info['elapsed_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": rows}, f, indent=1)
    if args.text:
        with open(args.text, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
