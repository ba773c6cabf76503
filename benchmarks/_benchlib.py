"""Shared pieces of the benchmarks: workloads, memory and page-cache probes, machine facts, tables.

Used by ``bench.py`` (CPU peers) and ``gpu_bench.py`` (GPU peers). Nothing here
imports a checkpoint library; each benchmark imports its peers lazily.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import hashlib
import importlib.metadata
import os
import platform
import resource
import sys
import subprocess
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
MiB = 1 << 20

# ------------------------------------------------------------------ workloads
#: mixed: this many large tensors and small ones; the small ones hold about 1/16 of the bytes.
MIXED_LARGE = 16
MIXED_SMALL = 4000
#: many: tensors of (10, 16) float32 = 640 bytes.
MANY_SHAPE = (10, 16)
MANY_COUNT = 100_000


@dataclass(frozen=True)
class Workload:
    """A named list of float32 tensor shapes."""

    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) * 4 for _, s in self.shapes)

    @property
    def count(self) -> int:
        return len(self.shapes)

    def describe(self) -> str:
        return f"{self.count:,} float32 tensors, {self.nbytes / GiB:.3f} GiB ({self.nbytes:,} bytes)"


def mixed_workload(size_gib: float = 1.0, small: int = MIXED_SMALL, large: int = MIXED_LARGE) -> Workload:
    """``large`` big tensors and ``small`` small ones (256 B .. 33 KB at 1 GiB), ``size_gib`` in total.

    The small tensors are ``(rows, 64)`` with rows cycling through 4..128 (scaled
    with the size, at least 1), so they hold about 1/16 of the bytes at every
    size and the tensor count stays the same. The large tensors share the rest.
    """
    total = int(round(size_gib * GiB)) // 4  # elements
    shapes: list[tuple[str, tuple[int, ...]]] = []
    small_elems = 0
    for i in range(small):
        rows = max(1, int(round((4 + (i * 37) % 125) * size_gib)))
        shapes.append((f"small/{i:05d}/w", (rows, 64)))
        small_elems += rows * 64
    rest = total - small_elems
    if rest < large:
        raise ValueError(f"size {size_gib} GiB is too small for {large} large tensors next to {small} small ones")
    base = rest // large
    for i in range(large):
        n = base + (rest - base * large if i == large - 1 else 0)
        shape = (n // 1024, 1024) if n % 1024 == 0 else (n,)
        shapes.insert(i, (f"layer_{i:02d}/kernel", shape))
    return Workload("mixed", tuple(shapes))


def many_workload(count: int = MANY_COUNT) -> Workload:
    """``count`` tensors of 640 bytes."""
    return Workload("many", tuple((f"t/{i:06d}", MANY_SHAPE) for i in range(count)))


_POOL_ELEMS = 1 << 22  # 16 MiB of random float32, tiled into the tensors


def build_arrays(workload: Workload, fill: str = "data") -> dict[str, np.ndarray]:
    """The workload's arrays, every page touched.

    ``fill="data"``: deterministic random values, each tensor starting at its
    own offset in a random pool (so misplaced bytes are caught). ``fill="blank"``:
    -1.0 everywhere, the target of an in-place restore.
    """
    arrays: dict[str, np.ndarray] = {}
    pool = np.random.default_rng(0).standard_normal(2 * _POOL_ELEMS, dtype=np.float32) if fill == "data" else None
    for i, (name, shape) in enumerate(workload.shapes):
        arr = np.empty(shape, np.float32)
        if pool is None:
            arr.fill(-1.0)
        else:
            flat = arr.reshape(-1)
            start = (i * 7919) % _POOL_ELEMS
            for lo in range(0, flat.size, _POOL_ELEMS):
                hi = min(flat.size, lo + _POOL_ELEMS)
                flat[lo:hi] = pool[start : start + hi - lo]
        arrays[name] = arr
    return arrays


def digest(arrays: Iterable[Any]) -> str:
    """A content digest of the arrays in order (blake2b of their bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for arr in arrays:
        a = np.ascontiguousarray(arr)
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


# --------------------------------------------------------------------- memory
#: How peak memory is measured; see ``peak_start``.
PEAK_METHOD = (
    "VmHWM after resetting it (write 5 to /proc/self/clear_refs) just before the operation, "
    "minus VmRSS just before it"
)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def peak_start() -> tuple[int, str]:
    """Resets the peak-RSS mark; returns ``(rss now, method)``.

    The method is ``vmhwm`` when the kernel lets us reset VmHWM, else
    ``ru_maxrss`` (a lifetime peak: the delta is then an upper bound).
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss_bytes(), "vmhwm"
    except OSError:
        return rss_bytes(), "ru_maxrss"


def peak_end(rss_before: int, method: str) -> int:
    """Peak resident bytes above ``rss_before`` since :func:`peak_start`."""
    if method == "vmhwm":
        peak = (_status_kib("VmHWM") or 0) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0, peak - rss_before)


# ----------------------------------------------------------------- page cache
_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return _libc


def files_under(path: str) -> list[str]:
    out = []
    for root, _, names in os.walk(path):
        out.extend(os.path.join(root, n) for n in names)
    return sorted(out)


def resident_fraction(paths: Sequence[str]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), or None if unknown."""
    try:
        libc = _lib()
    except OSError:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    total = resident = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                resident += int((np.frombuffer(vec, np.uint8) & 1).sum())
                total += pages
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else 1.0


def evict(paths: Sequence[str], mode: str) -> str:
    """Takes the files out of the page cache; returns what was done.

    ``cold``: fsync then ``posix_fadvise(DONTNEED)`` on each file (no root
    needed, touches nothing else). ``drop``: ``sync`` and
    ``echo 3 > /proc/sys/vm/drop_caches`` (root; the whole machine's cache),
    falling back to ``cold`` when refused. ``warm``: nothing.
    """
    if mode == "warm":
        return "warm"
    if mode == "drop":
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop"
        except OSError as e:
            note = f"drop_caches refused ({e.strerror}); fadvise"
            _fadvise_out(paths)
            return note
    _fadvise_out(paths)
    return "cold"


def _fadvise_out(paths: Sequence[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fs_type(path: str) -> str:
    """The file system type of ``path`` (longest mount point in /proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1].replace("\\040", " ")
                    if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                        best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


# -------------------------------------------------------------- machine facts
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def gpusaver_source(root: str = REPO) -> dict[str, Any]:
    """Which gpusaver was measured: its directory, git commit, and a hash of its gpusaver/ sources."""
    info: dict[str, Any] = {"src": root}
    pkg = os.path.join(root, "gpusaver")
    h = hashlib.sha256()
    for path in files_under(pkg):
        if path.endswith((".py", ".c", ".cu", ".cuh")):
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    info["tree_sha256"] = h.hexdigest()[:16]
    try:  # which host path that tree runs: its C extension, or pure Python
        info["host_path"] = subprocess.run(
            [sys.executable, "-c", "from gpusaver import native; print(native.reason)"],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=root), cwd=root,
        ).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        info["host_path"] = "?"
    if not os.path.exists(os.path.join(root, ".git")):
        return info
    try:
        info["commit"] = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "gpusaver"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        info["uncommitted_changes_in_gpusaver"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine_info(packages: Sequence[str], gpusaver_root: str = REPO) -> dict[str, Any]:
    """Facts for a results header (no host name)."""
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": _cpu_model(),
        "memory_gib": round(mem / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in packages},
        "gpusaver": gpusaver_source(gpusaver_root),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def header_lines(info: dict[str, Any]) -> list[str]:
    pk = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v) or "-"
    missing = ", ".join(k for k, v in info["packages"].items() if not v)
    gs = info.get("gpusaver", {})
    lines = [
        f"date      {info['date']}",
        f"machine   {info['nproc']} CPUs ({info['affinity']} usable), {info['cpu']}, {info['memory_gib']} GiB RAM",
        f"kernel    {info['kernel']}    python {info['python']}",
        f"packages  {pk}" + (f"    (not installed: {missing})" if missing else ""),
        f"gpusaver  {gs.get('src', '?')}: commit {gs.get('commit', '-')}, gpusaver/ sources sha256 "
        f"{gs.get('tree_sha256', '?')}"
        + (", with uncommitted changes" if gs.get("uncommitted_changes_in_gpusaver") else "")
        + f"; C extension: {gs.get('host_path', '?')}",
    ]
    if info.get("loadavg_at_start"):
        la = info["loadavg_at_start"]
        lines.append(f"load      {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} at start" + (
            f";  {info['loadavg_at_end'][0]:.2f} at end" if info.get("loadavg_at_end") else ""))
    return lines


# --------------------------------------------------------------------- tables
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table; ``align`` is one of 'l'/'r' per column (numbers right)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}" if x < 1 else f"{x:.2f}"


def cpu_snapshot() -> tuple[float, float]:
    """``(seconds of CPU busy on the whole machine, CPU seconds of this process and its children)``."""
    busy = 0.0
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def other_cpu(start: tuple[float, float], wall: float) -> dict[str, float]:
    """CPU time other processes used since ``start`` (a :func:`cpu_snapshot`): the run's noise."""
    busy, mine = cpu_snapshot()
    other = max(0.0, (busy - start[0]) - (mine - start[1]))
    cpus = os.cpu_count() or 1
    return {"other_cpu_s": other, "other_cpu_share": other / (wall * cpus) if wall > 0 else 0.0}
