"""A small save and restore on every GPU, every value checked: the program compute-sanitizer runs.

    python benchmarks/gpu_smoke.py                 # save + restore + read_tensor on each GPU, values compared
    python benchmarks/gpu_smoke.py --kernels-only  # compile every kernel source for each GPU; print its architecture

Covers each path of the CuPy backend once: packed small tensors, a large tensor in several pinned chunks,
a strided view, an empty tensor, and a restore into fresh arrays. Prints one line per GPU and exits non-zero
on any difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE),) if p not in sys.path]


def kernels_only(cp) -> None:
    from gpusaver.cuda import kernels as _kernels

    for dev in range(cp.cuda.runtime.getDeviceCount()):
        props = cp.cuda.runtime.getDeviceProperties(dev)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        major, minor = props["major"], props["minor"]
        for source in _kernels.KERNELS:
            _kernels.get_module(source, dev)
        cp.cuda.Device(dev).synchronize()
        print(f"GPU {dev}: {name}, compute capability {major}.{minor}; kernels {sorted(_kernels.KERNELS)} "
              f"compiled by NVRTC (CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()})")
        with cp.cuda.Device(dev):
            _time_kernels(cp, _kernels)


def _time_kernels(cp, _kernels) -> None:
    """The kernels' speed, timed with CUDA events (median of 5 after a warm-up), for the notes."""
    import numpy as np

    def noise(n: int):  # varied bytes (never time on zeros), without depending on CuPy's RNG API
        return ((cp.arange(n, dtype=cp.uint64) * 2654435761) >> 13).astype(cp.uint8)

    big = noise(1 << 30)  # 1 GiB
    small = noise(100_000 * 640)
    ptrs = np.uint64(small.data.ptr) + np.arange(100_000, dtype=np.uint64) * np.uint64(640)
    sizes = np.full(100_000, 640, np.int64)
    slab = cp.empty(small.nbytes, cp.uint8)
    offsets = np.arange(100_000, dtype=np.int64) * 640
    cases = {
        "crc32c of 1 GiB in one range": (big.nbytes, lambda: _kernels.crc32c_ranges([big])),
        "crc32c of 100,000 ranges of 640 B": (small.nbytes, lambda: _kernels.crc32c_ranges(ptrs, sizes)),
        "pack of 100,000 ranges of 640 B": (small.nbytes, lambda: _kernels.pack(_kernels.Ranges(ptrs, sizes), slab, offsets)),
    }
    for label, (nbytes, fn) in cases.items():
        fn()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(5):
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
        t = float(np.median(times))
        print(f"  {label}: {t * 1e3:.3f} ms, {nbytes / t / 1e9:.1f} GB/s (median of 5, events; includes the launch's "
              "argument upload)")
    del big, small, slab


def smoke(cp) -> int:
    import numpy as np

    import gpusaver
    from gpusaver import config

    failures = 0
    with tempfile.TemporaryDirectory() as root, config.set(slot_bytes=1 << 20, device_small_bytes=64 << 10):
        for dev in range(cp.cuda.runtime.getDeviceCount()):
            with cp.cuda.Device(dev):
                rng = cp.random.default_rng(dev)
                src = {
                    "small_a": rng.standard_normal((3, 5), dtype=cp.float32),
                    "small_b": cp.arange(7, dtype=cp.int64),
                    "empty": cp.zeros((0, 4), cp.float32),
                    "large": rng.standard_normal((1000, 700), dtype=cp.float32),  # 2.7 slots of 1 MiB
                    "strided": rng.standard_normal((64, 40), dtype=cp.float64)[:, ::3],
                }
                os.makedirs(os.path.join(root, f"gpu{dev}"), exist_ok=True)
                prefix = os.path.join(root, f"gpu{dev}", "ckpt")
                gpusaver.Saver([gpusaver.Variable(a, name=n) for n, a in src.items()]).save(prefix)
                dst = {n: cp.full(a.shape, -7, a.dtype) for n, a in src.items()}
                dst["strided"] = cp.full((64, 40), -7, cp.float64)[:, ::3]
                gpusaver.Saver([gpusaver.Variable(a, name=n) for n, a in dst.items()]).restore(prefix)
                reader = gpusaver.CheckpointReader(prefix)
                for n, a in src.items():
                    ok = bool(cp.array_equal(a, dst[n]))
                    host = reader.get_tensor(n)
                    ok = ok and np.array_equal(cp.asnumpy(a), host)
                    ok = ok and bool(cp.array_equal(a, reader.get_tensor(n, device=dev)))
                    failures += not ok
                    if not ok:
                        print(f"GPU {dev}: {n} differs after the round trip")
                cp.cuda.Device(dev).synchronize()
                print(f"smoke GPU {dev}: save, restore and read of {len(src)} tensors "
                      f"{'ok' if not failures else 'FAILED'}")
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels-only", action="store_true")
    args = p.parse_args()
    import cupy as cp

    if args.kernels_only:
        kernels_only(cp)
        return 0
    return smoke(cp)


if __name__ == "__main__":
    sys.exit(main())
