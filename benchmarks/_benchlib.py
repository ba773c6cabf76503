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
from typing import Any, Sequence

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
#: gpt2m: GPT-2 medium's layer shapes (Radford et al. 2019; Hugging Face's ``gpt2-medium``).
GPT2M_LAYERS = 24
GPT2M_D_MODEL = 1024
GPT2M_D_FF = 4096
GPT2M_VOCAB = 50257
GPT2M_CONTEXT = 1024
WORKLOADS = ("mixed", "many", "gpt2m")


@dataclass(frozen=True)
class Workload:
    """A named list of tensor shapes, float32 unless ``dtypes`` says otherwise.

    ``shapes`` stays a tuple of ``(name, shape)`` pairs (``gpu_bench.py`` reads
    it so); ``dtypes``, when given, holds one NumPy dtype name per tensor
    (``"bfloat16"`` is ml_dtypes' type).
    """

    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    dtypes: tuple[str, ...] | None = None

    def dtype(self, i: int) -> np.dtype:
        return _np_dtype(self.dtypes[i] if self.dtypes else "float32")

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) * self.dtype(i).itemsize for i, (_, s) in enumerate(self.shapes))

    @property
    def count(self) -> int:
        return len(self.shapes)

    def describe(self) -> str:
        if not self.dtypes or set(self.dtypes) == {"float32"}:
            kinds = "float32 tensors"
        else:
            per: dict[str, int] = {}
            for d in self.dtypes:
                per[d] = per.get(d, 0) + 1
            kinds = "tensors (" + ", ".join(f"{n:,} {d}" for d, n in per.items()) + ")"
        return f"{self.count:,} {kinds}, {self.nbytes / GiB:.3f} GiB ({self.nbytes:,} bytes)"


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


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


def gpt2m_shapes(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2 medium's parameters by Hugging Face's names (``lm_head`` is tied to ``wte``).

    ``scale`` multiplies every width (d_model, d_ff, vocabulary, context; each
    at least 8), keeping the 24 layers and so the tensor count: the parameter
    count goes about as ``scale**2``. At 1.0: 354,823,168 parameters in 292 tensors.
    """
    def dim(n: int) -> int:
        return n if scale == 1.0 else max(8, int(round(n * scale)))

    d, ff, vocab, ctx = dim(GPT2M_D_MODEL), dim(GPT2M_D_FF), dim(GPT2M_VOCAB), dim(GPT2M_CONTEXT)
    out: list[tuple[str, tuple[int, ...]]] = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (ctx, d))]
    for i in range(GPT2M_LAYERS):
        h = f"transformer.h.{i}."
        out += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, ff)), (h + "mlp.c_fc.bias", (ff,)),
            (h + "mlp.c_proj.weight", (ff, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return out


def gpt2m_workload(scale: float = 1.0) -> Workload:
    """A GPT-2-medium training state: bf16 parameters and Adam's two fp32 moments per parameter.

    Three tensors per parameter tensor: ``model/<name>`` (bfloat16),
    ``optimizer/exp_avg/<name>`` and ``optimizer/exp_avg_sq/<name>`` (float32),
    10 bytes per parameter: 3.55 GB (3.30 GiB) in 876 tensors at ``scale=1``.
    """
    params = gpt2m_shapes(scale)
    shapes = [(f"model/{n}", s) for n, s in params]
    shapes += [(f"optimizer/exp_avg/{n}", s) for n, s in params]
    shapes += [(f"optimizer/exp_avg_sq/{n}", s) for n, s in params]
    dtypes = ("bfloat16",) * len(params) + ("float32",) * (2 * len(params))
    return Workload("gpt2m", tuple(shapes), dtypes)


def workload(name: str, size_gib: float = 1.0, many_count: int = MANY_COUNT, gpt2m_scale: float = 1.0) -> Workload:
    if name == "mixed":
        return mixed_workload(size_gib)
    if name == "many":
        return many_workload(many_count)
    if name == "gpt2m":
        return gpt2m_workload(gpt2m_scale)
    raise ValueError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")


_POOL_ELEMS = 1 << 22  # 16 MiB of random float32, tiled into the tensors


def _pools() -> dict[str, np.ndarray]:
    pool = np.random.default_rng(0).standard_normal(2 * _POOL_ELEMS, dtype=np.float32)
    return {"float32": pool, "bfloat16": pool.astype(_np_dtype("bfloat16"))}


def fill_data(arrays: Sequence[np.ndarray], pools: dict[str, np.ndarray] | None = None) -> None:
    """Deterministic random values, tensor ``i`` starting at its own offset in a random pool
    (so a misplaced byte shows)."""
    pools = pools or _pools()
    for i, arr in enumerate(arrays):
        pool = pools["bfloat16" if arr.dtype == _np_dtype("bfloat16") else "float32"]
        flat = arr.reshape(-1)
        start = (i * 7919) % _POOL_ELEMS
        for lo in range(0, flat.size, _POOL_ELEMS):
            hi = min(flat.size, lo + _POOL_ELEMS)
            flat[lo:hi] = pool[start : start + hi - lo]


def data_mismatches(workload: Workload, arrays: Sequence[Any], pools: dict[str, np.ndarray] | None = None) -> list[str]:
    """Names of the tensors whose bytes are not what :func:`fill_data` writes (any dtype that comes
    back is compared byte for byte: bfloat16 as ``|V2`` or an int16 view too)."""
    pools = pools or _pools()
    bad = [f"{len(arrays)} arrays read, {workload.count} saved"] if len(arrays) != workload.count else []
    for i, ((name, shape), arr) in enumerate(zip(workload.shapes, arrays)):
        dt = workload.dtype(i)
        want = pools["bfloat16" if dt == _np_dtype("bfloat16") else "float32"]
        n, size = int(np.prod(shape, dtype=np.int64)), dt.itemsize
        got = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        start = (i * 7919) % _POOL_ELEMS
        if got.size != n * size or not all(
            np.array_equal(got[lo * size : min(n, lo + _POOL_ELEMS) * size],
                           want[start : start + min(n, lo + _POOL_ELEMS) - lo].view(np.uint8))
            for lo in range(0, n, _POOL_ELEMS)
        ):
            bad.append(name)
    return bad


def build_arrays(workload: Workload, fill: str = "data") -> dict[str, np.ndarray]:
    """The workload's arrays in this process's own memory, every page touched.

    ``fill="data"``: see :func:`fill_data`. ``fill="blank"``: -1 everywhere,
    the target of an in-place restore. (``bench.py``'s peer runs use
    :class:`SharedArrays` instead.)
    """
    arrays = {name: np.empty(shape, workload.dtype(i)) for i, (name, shape) in enumerate(workload.shapes)}
    if fill == "data":
        fill_data(list(arrays.values()))
    else:
        for arr in arrays.values():
            arr.fill(-1)
    return arrays


# --------------------------------------------------------------- shared memory
def layout(workload: Workload) -> tuple[list[int], int]:
    """Byte offsets of the workload's tensors in one buffer, and its size.

    Each tensor starts on a 64-byte boundary (what TensorFlow needs to use an
    array without copying it), one of 1 MiB or more on a 4 KiB one.
    """
    offsets, pos = [], 0
    for i, (_, shape) in enumerate(workload.shapes):
        n = int(np.prod(shape, dtype=np.int64)) * workload.dtype(i).itemsize
        align = 4096 if n >= MiB else 64
        pos = (pos + align - 1) // align * align
        offsets.append(pos)
        pos += n
    return offsets, max(4096, (pos + 4095) // 4096 * 4096)


class SharedArrays:
    """The workload's arrays in one memfd (shared memory), mapped into every process that uses them.

    ``bench.py`` builds the arrays once in the parent; each child maps the
    same pages (``MAP_POPULATE``, so no page fault lands in a timed call and
    the pages count in the child's resident memory before any timing), so
    every peer saves the same bytes from the same memory, in-place restores
    read into that memory, and memory does not grow with the number of peers.
    Pass ``fd`` to a child with ``subprocess.Popen(pass_fds=...)`` and open it
    there with ``SharedArrays(wl, fd=fd)``.
    """

    def __init__(self, workload: Workload, fd: int | None = None, name: str = "bench") -> None:
        import mmap

        self.workload = workload
        self.offsets, self.size = layout(workload)
        if fd is None:
            fd = os.memfd_create(f"gpusaver-{name}", 0)  # inheritable through pass_fds
            os.ftruncate(fd, self.size)
        self.fd = fd
        self.mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self.arrays: dict[str, np.ndarray] = {}
        for i, ((tname, shape), off) in enumerate(zip(workload.shapes, self.offsets)):
            dt = workload.dtype(i)
            count = int(np.prod(shape, dtype=np.int64))
            self.arrays[tname] = np.frombuffer(self.mm, dt, count=count, offset=off).reshape(shape)

    def fill(self, what: str) -> None:
        """``data``: :func:`fill_data`; ``blank``: every byte 0xFF (NaN in every float type)."""
        if what == "data":
            fill_data(list(self.arrays.values()))
        else:
            np.frombuffer(self.mm, np.uint8).fill(0xFF)

    def close(self) -> None:
        self.arrays.clear()
        try:
            self.mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass


# ------------------------------------------------------------------ statistics
def summary(times: Sequence[float]) -> dict[str, Any]:
    """Median, minimum, maximum and range (max - min) of the timed calls, in seconds."""
    if not times:
        return {}
    s = sorted(times)
    n = len(s)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return {"median_s": median, "best_s": s[0], "max_s": s[-1], "spread_s": s[-1] - s[0], "runs": n}


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


def ratio_table(times: dict[str, list[float]], nbytes: int, ratio_header: str) -> str:
    """The rows of a floor benchmark (``times``: row name -> seconds of each round, the first row the
    reference): median, minimum, range, GB/s at the median and the median over the reference's."""
    import numpy as np

    ref = float(np.median(next(iter(times.values()))))
    rows = []
    for name, ts in times.items():
        med = float(np.median(ts))
        rows.append([name, fmt(med), fmt(min(ts)), fmt(max(ts) - min(ts)), f"{nbytes / med / 1e9:.2f}", f"{med / ref:.2f}x"])
    return table(["", "median s", "min s", "range s", "GB/s", ratio_header], rows)


def emit(lines: Sequence[str], path: str | None) -> str:
    """Prints a report and, with ``path``, writes it there too; returns its text."""
    text = "\n".join(lines) + "\n"
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)
    return text


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if 0 < x < 0.001:
        return f"{x:.2g}"
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
    # /proc/stat counts in ticks (10 ms): for calls shorter than a few ticks the share is coarse; capped at 1
    return {"other_cpu_s": other, "other_cpu_share": min(1.0, other / (wall * cpus)) if wall > 0 else 0.0}
