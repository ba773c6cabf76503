"""gpusaver against its peers on the CPU: the same arrays, the same file system, one run.

    .venv/bin/python benchmarks/bench.py --workload all --fs both --repeat 3 \\
        --json benchmarks/results/out.json --text benchmarks/results/out.txt

Peers: a raw ``os.pwritev``/``os.preadv`` of the arrays' memory from 1 thread
and from N threads (N = gpusaver's writer-thread count; the faster is the
reference), gpusaver (durable on and off), TensorFlow's ``SaveV2``/``RestoreV2``,
safetensors, ``torch.save``/``torch.load``, ``numpy.savez``/``numpy.load``,
PyTorch DCP (1 and 2 writer threads) and orbax; peers that are not installed
are reported as unavailable. The arrays live once in shared memory; every
peer's save and its restore run in a process of its own, kept for the whole
run, and the repetitions are interleaved (raw, gpusaver, tensorflow, ..., raw,
gpusaver, ...). Each peer's files are deleted right after its restore. The
tables show the median, minimum and range (max - min) of the timed calls and
the ratios of medians (see README.md).

``--scaling`` times gpusaver's save at 4 sizes and 4 tensor counts with the
phases it reports through ``on_phase``; ``--profile`` prints cProfile tables
(every thread) of gpusaver's save and restore.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

import _benchlib as bl  # noqa: E402
from _peers import PEER_ORDER, PEERS, available, label  # noqa: E402

PACKAGES = ("gpusaver", "numpy", "crc32c", "tensorflow-cpu", "tensorflow", "safetensors", "torch", "jax",
            "orbax-checkpoint", "tensorstore", "ml_dtypes")
#: (workload, operation, the peer gpusaver's time is divided by, the most that ratio may be); ratios of medians.
#: Against raw: the storage issue's targets on a 2-core machine, tmpfs; against TensorFlow: the project's first goals.
TARGETS = (
    ("mixed", "save", "raw", 1.10),
    ("mixed", "save", "tensorflow", 0.60),
    ("mixed", "restore", "raw", 1.15),
    ("mixed", "restore", "tensorflow", 0.60),
    ("many", "save", "raw", 1.5),
    ("many", "restore", "raw", 1.5),
)
PEAK_LIMIT = 64 * bl.MiB
#: ``--workload all``: the workloads the targets are stated for (gpt2m is named on its own: 3.3 GiB).
ALL_WORKLOADS = ("mixed", "many")


# ---------------------------------------------------------------------- child
def _workload_of(spec: dict[str, Any]) -> bl.Workload:
    return bl.workload(spec["workload"], spec["size_gib"], spec["many_count"], spec["gpt2m_scale"])


def _clear(directory: str) -> None:
    """Removes everything under ``directory`` and keeps the directory."""
    if not os.path.isdir(directory):
        return
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


_MARK = "@@bench-result@@ "


class _Child:
    """The peer-side state of one process: a peer set up for saves or for restores."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        wl = _workload_of(spec)
        self.wl = wl
        self.src = bl.SharedArrays(wl, fd=spec["src_fd"])
        cls = PEERS[spec["peer"]]
        # in-place restores read into the very memory the saves write from (see call())
        self.in_place = spec["role"] == "restore" and cls.in_place
        self.peer = cls(spec["dir"])
        t0 = time.perf_counter()
        if spec["role"] == "save":
            self.peer.setup_save(self.src.arrays)
        else:
            self.peer.setup_restore(self.src.arrays, self.src.arrays if self.in_place else None)
        self.setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._warm_up(wl)
        self.warmup_s = time.perf_counter() - t0

    def _warm_up(self, wl: bl.Workload) -> None:
        """One untimed save and restore of a tiny checkpoint (one 16-element tensor per dtype of the
        workload) with a second instance of the peer, in a directory of its own: the library's one-time
        start-up work (kernels registered, thread pools, planners) stays out of the first timed call."""
        import numpy as np

        cls = PEERS[self.spec["peer"]]
        dtypes = sorted({str(wl.dtype(i)) for i in range(wl.count)})
        tiny = {f"warmup/{d}": np.arange(16, dtype=np.float32).astype(bl._np_dtype(d)) for d in dtypes}
        where = f"{self.spec['dir']}-warmup-{self.spec['role']}"
        os.makedirs(where, exist_ok=True)
        warm = cls(where)
        try:
            warm.setup_save(tiny)
            warm.save(cls.variants("save")[-1])
            dest = {k: np.zeros_like(v) for k, v in tiny.items()} if cls.in_place else None
            warm.setup_restore(tiny, dest)
            warm.restore(cls.variants("restore")[0])
        finally:
            warm.close()
            shutil.rmtree(where, ignore_errors=True)

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """One call of ``cmd["op"]`` (save or restore) for ``cmd["variant"]``, timed.

        An in-place restore reads into the shared arrays themselves: before a checked call they
        are blanked (0xFF), after it compared with the values they were generated from, and
        regenerated whenever such a restore failed, so the next save writes the right bytes.
        """
        try:
            return self._call(cmd)
        except BaseException:
            if self.in_place and cmd["op"] == "restore":
                self.src.fill("data")
            raise

    def _call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op, disk, variant = cmd["op"], self.spec["fs"] == "disk", cmd["variant"]
        out: dict[str, Any] = {}
        directory = self.spec["dir"]
        if op == "restore":
            if cmd.get("verify") and self.in_place:
                self.src.fill("blank")  # so that a restore that reads nothing is caught
            if disk:
                out["cache"] = bl.evict(bl.files_under(directory), self.spec["cache"])
                out["resident_before"] = bl.resident_fraction(bl.files_under(directory))
        if disk:
            os.sync()
        rss0, method = bl.peak_start()
        cpu0 = bl.cpu_snapshot()
        t0 = time.perf_counter()
        result = self.peer.save(variant) if op == "save" else self.peer.restore(variant)
        dt = time.perf_counter() - t0
        out.update(bl.other_cpu(cpu0, dt))
        out.update(time=dt, peak_bytes=bl.peak_end(rss0, method), peak_method=method)
        if op == "save":
            out["file_bytes"] = sum(os.path.getsize(p) for p in bl.files_under(directory))
        elif cmd.get("verify"):
            got = self.peer.restored_arrays(result)
            bad = bl.data_mismatches(self.wl, got)
            out["verified"] = not bad
            if bad:
                out["mismatch"] = f"{len(bad)} tensors differ from the saved ones, first {bad[0]}"
                if self.in_place:
                    self.src.fill("data")
            del got
        del result
        bl.peak_start()  # collects what the call left, so the next peer starts from the same memory
        return out


def _child_main(arg: str) -> int:
    """A peer's process: set up, say ready, then one JSON command a line on stdin until ``quit``."""
    spec = json.loads(arg)
    sys.path.insert(0, spec["gpusaver_src"])

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write("\n" + _MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    import traceback

    try:
        child = _Child(spec)
        reply({"ready": True, "setup_s": child.setup_s, "warmup_s": child.warmup_s, "rss_bytes": bl.rss_bytes()})
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        reply({"error": f"{type(e).__name__}: {e}", "import_error": isinstance(e, ImportError)})
        return 0
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            reply(child.call(cmd))
        except BaseException as e:  # noqa: BLE001
            traceback.print_exc()
            reply({"error": f"{type(e).__name__}: {e}"})
    try:
        child.peer.close()
    except Exception:  # noqa: BLE001
        pass
    return 0


class ChildProc:
    """A peer's process, seen from the parent: ``ask`` sends a command and waits for its answer."""

    def __init__(self, spec: dict[str, Any], fds: tuple[int, ...], timeout: float) -> None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                   PYTHONPATH=os.pathsep.join([bl.REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(
                       os.pathsep) if p]))
        self.timeout = timeout
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, pass_fds=fds, env=env, text=True,
            bufsize=1,
        )
        self.answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.dead: str | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at = line.find(_MARK)
            if at >= 0:
                self.answers.put(json.loads(line[at + len(_MARK):]))
        self.answers.put(None)

    def stderr_tail(self, n: int = 2000) -> str:
        self.err.seek(0, os.SEEK_END)
        size = self.err.tell()
        self.err.seek(max(0, size - n))
        return self.err.read().decode(errors="replace")

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        if self.dead:
            return {"error": self.dead}
        try:
            got = self.answers.get(timeout=timeout or self.timeout)
        except queue.Empty:
            self.proc.kill()
            self.dead = f"timed out after {timeout or self.timeout:.0f} s"
            return {"error": self.dead, "stderr_tail": self.stderr_tail()}
        if got is None:
            rc = self.proc.wait()
            self.dead = f"its process exited ({rc}{', killed: out of memory?' if rc == -9 else ''})"
            return {"error": self.dead, "stderr_tail": self.stderr_tail()}
        if "error" in got:
            got["stderr_tail"] = self.stderr_tail()
        return got

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.dead:
            return {"error": self.dead}
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # wait() reports how it ended
        return self.wait()

    def close(self) -> None:
        if self.proc.poll() is None and not self.dead:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


# ---------------------------------------------------------------------- matrix
def _dirs(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    if args.fs in ("shm", "both"):
        out["shm"] = os.path.join(args.shm_dir, f"gpusaver-bench-{os.getpid()}")
    if args.fs in ("disk", "both"):
        out["disk"] = os.path.join(args.dir, f"bench-{os.getpid()}")
    return out


def _workloads(args: argparse.Namespace) -> list[str]:
    names: list[str] = []
    for w in args.workload.split(","):
        for x in (ALL_WORKLOADS if w == "all" else (w,)):
            if x not in names:
                names.append(x)
    return names


def _repeat(args: argparse.Namespace, wname: str) -> int:
    return args.repeat_for.get(wname, args.repeat)


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _room(wl: bl.Workload, fs: str, root: str) -> str | None:
    """Why the block can't run in this machine's memory (or file system), or None.

    The run holds the arrays (shared memory, also the in-place restores'
    destination), one peer's files at a time (memory too on tmpfs) and what a
    call allocates (orbax's save about 1.8 copies, a restore that returns new
    arrays one); 2 GiB more for the peers' 16 processes.
    """
    need = (4 if fs == "shm" else 3) * wl.nbytes + 2 * bl.GiB
    have = _meminfo("MemAvailable")
    if have is not None and need > have:
        return (f"needs about {need / bl.GiB:.1f} GiB of memory (arrays, files, a call's copies, processes), "
                f"{have / bl.GiB:.1f} GiB available")
    try:
        st = os.statvfs(os.path.dirname(root) or root)
        free = st.f_bavail * st.f_frsize
        if free < wl.nbytes * 1.1:
            return f"needs {wl.nbytes * 1.1 / bl.GiB:.1f} GiB free in {os.path.dirname(root)}, has {free / bl.GiB:.1f}"
    except OSError:
        pass
    return None


def _new_row(base: dict[str, Any], peer: str, op: str, variant: dict[str, Any]) -> dict[str, Any]:
    return dict(base, peer=peer, op=op, variant=variant, label=label(peer, variant),
                durable=bool(variant.get("durable")), threads=variant.get("threads"),
                times=[], peaks=[], other_cpu=[], notes=[])


def _active(row: dict[str, Any], repeat: int) -> bool:
    return not row.get("error") and not row.get("skipped") and not row.get("slow") and len(row["times"]) < repeat


def _record(row: dict[str, Any], res: dict[str, Any], args: argparse.Namespace, repeat: int) -> None:
    if "error" in res:
        row["error"] = res["error"]
        if res.get("stderr_tail"):
            row["stderr_tail"] = res["stderr_tail"]
        return
    row["times"].append(res["time"])
    row["peaks"].append(res["peak_bytes"])
    row["other_cpu"].append([res["other_cpu_s"], res["time"]])
    row["peak_method"] = res["peak_method"]
    for key in ("file_bytes", "cache"):
        if key in res:
            row[key] = res[key]
    if res.get("resident_before") is not None:
        row["resident_before"] = max(row.get("resident_before") or 0.0, res["resident_before"])
    if "verified" in res:
        row["verified"] = res["verified"]
        if res.get("mismatch"):
            row["notes"].append("WRONG VALUES: " + res["mismatch"])
    if len(row["times"]) == 1 and res["time"] > args.slow_limit and repeat > 1:
        row["slow"] = True
        row["notes"].append(f"1 run: it took {res['time']:.1f} s > --slow-limit {args.slow_limit:g} s")


def run_block(args: argparse.Namespace, wname: str, wl: bl.Workload, fs: str, root: str,
              peers: list[str]) -> list[dict[str, Any]]:
    """One workload on one file system: every peer's processes, ``repeat`` interleaved rounds."""
    repeat = _repeat(args, wname)
    base = dict(workload=wname, fs=fs, fstype=bl.fs_type(os.path.dirname(root)), bytes=wl.nbytes,
                tensors=wl.count, repeat=repeat)
    dtypes = set(wl.dtypes or ("float32",))
    rows: dict[str, list[dict[str, Any]]] = {}
    for peer in peers:
        cls = PEERS[peer]
        rows[peer] = [_new_row(base, peer, "save", v) for v in cls.variants("save")] + \
                     [_new_row(base, peer, "restore", v) for v in cls.variants("restore")]
        why = available(peer) or cls.unsupported(dtypes)
        for r in rows[peer]:
            if why:
                r["skipped"] = f"unavailable: {why}" if available(peer) else why
            elif r["op"] == "restore" and args.skip_tf_many_restore and peer == "tensorflow" and wname == "many":
                r["skipped"] = "--skip-tf-many-restore"
        note = cls.note(dtypes)
        if note and not why:
            rows[peer][0]["notes"].append(note)
    flat = [r for peer in peers for r in rows[peer]]
    why_not = _room(wl, fs, root)
    if why_not:
        for r in flat:
            r.setdefault("skipped", f"not run: {why_not}")
        return flat

    os.makedirs(root, exist_ok=True)
    src = None
    children: dict[tuple[str, str], ChildProc] = {}
    try:
        t0 = time.perf_counter()
        src = bl.SharedArrays(wl, name="arrays")
        src.fill("data")
        print(f"  {wname}/{fs}: arrays in shared memory ({time.perf_counter() - t0:.1f} s); starting the peers' "
              f"processes ...", end="", file=sys.stderr, flush=True)
        for peer in peers:
            if all(r.get("skipped") for r in rows[peer]):
                continue
            pdir = os.path.join(root, peer)
            os.makedirs(pdir, exist_ok=True)
            spec = dict(peer=peer, workload=wname, size_gib=args.size_gib, many_count=args.many_count,
                        gpt2m_scale=args.gpt2m_scale, fs=fs, dir=pdir, cache=args.cache, src_fd=src.fd,
                        gpusaver_src=args.gpusaver_src)
            for role in ("save", "restore"):
                if any(r["op"] == role and not r.get("skipped") for r in rows[peer]):
                    children[(peer, role)] = ChildProc(dict(spec, role=role), (src.fd,), args.child_timeout)
        for (peer, role), ch in children.items():
            res = ch.wait()
            for r in rows[peer]:
                if r["op"] != role:
                    continue
                if "error" in res:
                    if res.get("import_error"):
                        r["skipped"] = f"unavailable: {res['error']}"
                    else:
                        r["error"] = f"set-up failed: {res['error']}"
                        r["stderr_tail"] = res.get("stderr_tail", "")
                else:
                    r["setup_s"], r["warmup_s"] = res["setup_s"], res.get("warmup_s")
        print(f" {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

        for rnd in range(repeat):
            print(f"  {wname}/{fs}: round {rnd + 1}/{repeat}:", end="", file=sys.stderr, flush=True)
            for peer in peers:
                _slot(args, rows[peer], children, os.path.join(root, peer), repeat, src)
            print("", file=sys.stderr, flush=True)
    finally:
        for ch in children.values():
            ch.close()
        if src is not None:
            src.close()
            os.close(src.fd)
        shutil.rmtree(root, ignore_errors=True)
    _stats(flat)
    return flat


def _slot(args: argparse.Namespace, rows: list[dict[str, Any]], children: dict[tuple[str, str], ChildProc],
          pdir: str, repeat: int, arrays: bl.SharedArrays) -> None:
    """One peer's turn in a round: its save variants (files deleted after each, but for the last one's,
    which its restores read), its restores, then its files deleted."""
    saves = [r for r in rows if r["op"] == "save"]
    restores = [r for r in rows if r["op"] == "restore" and _active(r, repeat)]
    if not saves:
        return
    peer = saves[0]["peer"]
    files_ok = False
    for i, row in enumerate(saves):
        last = i == len(saves) - 1
        timed = _active(row, repeat)
        # the last variant's files are what the restores read: written untimed when that save is done
        prepare = last and bool(restores) and not timed and not row.get("error") and not row.get("skipped")
        if not (timed or prepare):
            continue
        child = children.get((peer, "save"))
        res = child.ask({"op": "save", "variant": row["variant"]}) if child else {"error": "no save process"}
        if timed:
            _record(row, res, args, repeat)
            print(f" {row['label']} {res['time']:.3f}" if "time" in res else f" {row['label']} ERROR",
                  end="", file=sys.stderr, flush=True)
        if last:
            files_ok = "error" not in res
            if not files_ok:
                for r in restores:
                    r["error"] = f"its save failed: {res['error']}"
        if not (last and restores):
            _clear(pdir)
    if restores and not files_ok:
        for r in restores:
            r.setdefault("error", "no files to read: its save did not run")
    if restores and files_ok:
        for row in restores:
            child = children.get((peer, "restore"))
            res = child.ask({"op": "restore", "variant": row["variant"], "verify": not row["times"]}) if child \
                else {"error": "no restore process"}
            _record(row, res, args, repeat)
            if "error" in res and PEERS[peer].in_place:
                arrays.fill("data")  # its process may have died half-way through the shared arrays
            print(f" {row['label']} restore {res['time']:.3f}" if "time" in res else
                  f" {row['label']} restore ERROR", end="", file=sys.stderr, flush=True)
    _clear(pdir)


def _stats(block: list[dict[str, Any]]) -> None:
    """Median, min and range per row; the raw reference; ratios of medians."""
    cpus = os.cpu_count() or 1
    for r in block:
        if r["times"]:
            r.update(bl.summary(r["times"]))
            r["gbps"] = r["bytes"] / r["median_s"] / 1e9
            r["peak_bytes"] = max(r["peaks"])
            other, wall = sum(o for o, _ in r["other_cpu"]), sum(w for _, w in r["other_cpu"])
            r["other_cpu_share"] = min(1.0, other / (wall * cpus)) if wall > 0 else 0.0
    refs: dict[tuple[str, bool], dict[str, Any]] = {}
    for r in block:
        if r["peer"] == "raw" and "median_s" in r and not r.get("error"):
            key = (r["op"], r["durable"])
            if key not in refs or r["median_s"] < refs[key]["median_s"]:
                refs[key] = r
    for ref in refs.values():
        ref["reference"] = True
    for r in block:
        if "median_s" not in r:
            continue
        ref = refs.get((r["op"], r["durable"]))
        r["raw_reference"] = ref["label"] if ref else None
        r["x_raw"] = r["median_s"] / ref["median_s"] if ref else None
        gs = _find(block, "gpusaver", r["op"], r["durable"])
        r["gpusaver_over_this"] = gs["median_s"] / r["median_s"] if gs else None


def _find(block: list[dict[str, Any]], peer: str, op: str, durable: bool = False) -> dict[str, Any] | None:
    """The row of ``peer``'s ``op`` (for raw: the reference, the faster of 1 and N threads)."""
    for r in block:
        if r["peer"] == peer and r["op"] == op and r["durable"] == durable and "median_s" in r \
                and not r.get("error") and (peer != "raw" or r.get("reference")):
            return r
    return None


def run_matrix(args: argparse.Namespace, peers: list[str], emit: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for wname in _workloads(args):
        wl = bl.workload(wname, args.size_gib, args.many_count, args.gpt2m_scale)
        for fs, root in _dirs(args).items():
            block = run_block(args, wname, wl, fs, root, peers)
            rows.extend(block)
            emit(_block_text(wname, wl, fs, block, args))
    return rows


def _block_text(wname: str, wl: bl.Workload, fs: str, block: list[dict[str, Any]], args: argparse.Namespace) -> str:
    where = block[0]["fstype"] if block else "?"
    repeat = _repeat(args, wname)
    lines = [f"== {wname}: {wl.describe()}   on {fs} ({where}), {repeat} interleaved rounds"]
    if block and all(r.get("skipped", "").startswith("not run:") for r in block):
        return "\n".join(lines + ["   " + block[0]["skipped"]]) + "\n"
    for op in ("save", "restore"):
        rows, notes = [], []
        for r in block:
            if r["op"] != op:
                continue
            if "median_s" not in r or r.get("error"):
                state = "unavailable" if str(r.get("skipped", "")).startswith("unavailable") else \
                    "skipped" if r.get("skipped") else "ERROR"
                rows.append([r["label"]] + ["-"] * 10 + [state])
                notes.append(f"{r['label']}: {r.get('skipped') or r.get('error')}")
                continue
            extra = []
            if r["durable"]:
                extra.append("fsync")
            if op == "restore":
                extra.append(PEERS[r["peer"]].verifies)
                if r.get("verified") is False:
                    extra.append("WRONG VALUES")
                if r.get("resident_before") is not None and fs == "disk":
                    extra.append(f"{r['resident_before'] * 100:.0f}% cached")
            if r.get("reference"):
                extra.append("reference")
            rows.append([
                r["label"], bl.fmt(r["median_s"]), bl.fmt(r["best_s"]),
                bl.fmt(r["spread_s"]) if r["runs"] > 1 else "-", f"{r['gbps']:.2f}", bl.fmt(r["x_raw"]),
                bl.fmt(r["gpusaver_over_this"]), f"{r['peak_bytes'] / bl.MiB:.0f}", str(r["runs"]),
                f"{r['other_cpu_share'] * 100:.0f}", f"{r.get('file_bytes', 0) / bl.MiB:.0f}" if op == "save" else "",
                ", ".join(e for e in extra if e),
            ])
            notes.extend(f"{r['label']}: {n}" for n in r.get("notes", []))
        head = [op, "median s", "min s", "range s", "GB/s", "x raw", "gs/this", "peak MiB", "runs", "other%",
                "file MiB" if op == "save" else "", "notes" if op == "save" else "checks"]
        lines.append(bl.table(head, rows, "l" + "r" * 10 + "l"))
        lines.extend(f"   {n}" for n in notes)
    won = []
    for key, name in ((("save", True), "save (durable)"), (("save", False), "save"), (("restore", False), "restore")):
        raws = [r for r in block if r["peer"] == "raw" and (r["op"], r["durable"]) == key and "median_s" in r]
        ref = [r for r in raws if r.get("reference")]
        if ref and len(raws) > 1:
            others = ", ".join(f"{r['label']} {bl.fmt(r['median_s'])} s" for r in raws if not r.get("reference"))
            won.append(f"{name}: {ref[0]['label']} ({bl.fmt(ref[0]['median_s'])} s; {others})")
        elif ref:
            won.append(f"{name}: {ref[0]['label']}")
    if won:
        lines.append("   raw reference, the faster median of 1 thread and N threads: " + "; ".join(won))
    if fs == "disk":
        lines.append(f"   restore cache: {args.cache} ({_CACHE_TEXT[args.cache]})")
    return "\n".join(lines) + "\n"


_CACHE_TEXT = {
    "cold": "each file fsynced and posix_fadvise(DONTNEED) before every timed restore",
    "drop": "sync; echo 3 > /proc/sys/vm/drop_caches before every timed restore",
    "warm": "page cache left warm from the save",
}


def targets(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    for fs in ("shm", "disk"):
        here = [r for r in rows if r["fs"] == fs]
        if not here:
            continue
        for wname, op, against, limit in TARGETS:
            blk = [r for r in here if r["workload"] == wname]
            if not blk:
                continue
            for durable in ([True, False] if op == "save" and against == "raw" else [False]):
                g = _find(blk, "gpusaver", op, durable)
                ref = _find(blk, against, op, durable if against == "raw" else False)
                value = g["median_s"] / ref["median_s"] if g and ref else None
                # Time targets are set for tmpfs; on disk the ratio is shown, not judged.
                verdict = None if value is None else (value <= limit if fs == "shm" else "info")
                what = f"{label('gpusaver', {'durable': durable})} / {label(against, {'durable': durable})}"
                out.append(dict(fs=fs, workload=wname, op=op, what=what, limit=limit, value=value, ok=verdict,
                                reference=ref["label"] if ref else None))
        for r in here:
            if r["peer"] == "gpusaver" and "peak_bytes" in r:
                out.append(dict(fs=fs, workload=r["workload"], op=r["op"], what=f"{r['label']} peak MiB above arrays",
                                limit=PEAK_LIMIT / bl.MiB, value=r["peak_bytes"] / bl.MiB,
                                ok=r["peak_bytes"] <= PEAK_LIMIT))
    rows_txt = [[t["fs"], t["workload"], t["op"], t["what"], f"<= {t['limit']:g}",
                 "-" if t["value"] is None else f"{t['value']:.2f}",
                 "n/a" if t["ok"] is None else t["ok"] if isinstance(t["ok"], str) else ("met" if t["ok"] else "MISSED")]
                for t in out]
    text = "== targets (ratios of medians; raw = the reference)\n" + bl.table(
        ["fs", "workload", "op", "ratio", "target", "measured", ""], rows_txt, "lllllrl") + "\n"
    if any(t["ok"] == "info" for t in out):
        text += ("   time targets are set for tmpfs; on disk the ratios are for information (page-cache writeback "
                 "left by the peers before makes them vary from run to run); peak-memory limits hold on both\n")
    return text, out


# --------------------------------------------------------------------- scaling
def _fs_root(args: argparse.Namespace) -> tuple[str, str]:
    fs = "disk" if args.fs == "disk" else "shm"
    return fs, _dirs(argparse.Namespace(**dict(vars(args), fs=fs)))[fs]


def scaling(args: argparse.Namespace, emit: Any) -> list[dict[str, Any]]:
    import gpusaver
    from _peers import Raw

    fs, root = _fs_root(args)
    os.makedirs(root, exist_ok=True)
    points = [("bytes", bl.mixed_workload(args.size_gib * f)) for f in (0.125, 0.25, 0.5, 1.0)]
    points += [("tensors", bl.many_workload(int(args.many_count * f))) for f in (0.125, 0.25, 0.5, 1.0)]
    out = []
    try:
        for axis, wl in points:
            arrays = bl.build_arrays(wl)
            raw = Raw(root)
            raw.setup_save(arrays)
            raw_best = min(_best(lambda v=v, r=raw: r.save(v), args.repeat) for v in Raw.variants("save")
                           if v["durable"] == args.durable)
            raw.close()
            phases: list[tuple[str, float]] = []
            saver = gpusaver.Saver(arrays, durable=args.durable, on_phase=lambda p, s: phases.append((p, s)))
            best, best_phases = None, {}
            for _ in range(args.repeat):
                _clear(root)
                phases.clear()
                t0 = time.perf_counter()
                saver.save(os.path.join(root, "model"))
                dt = time.perf_counter() - t0
                if best is None or dt < best:
                    best, best_phases = dt, dict(phases)
            assert best is not None
            _clear(root)
            print(f"  scaling {axis}: {wl.count:,} tensors {wl.nbytes / bl.MiB:.0f} MiB: {best:.3f} s", file=sys.stderr)
            out.append(dict(axis=axis, tensors=wl.count, bytes=wl.nbytes, best_s=best, raw_s=raw_best,
                            phases=best_phases, outside_s=best - best_phases.get("total", 0.0)))
            del arrays, saver, raw
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for p in out:
        ph = p["phases"]

        def summed(name: str) -> float:
            return sum(v for k, v in ph.items() if k.startswith(name + ":"))

        rows.append([p["axis"], f"{p['tensors']:,}", f"{p['bytes'] / bl.MiB:.1f}", bl.fmt(p["best_s"]),
                     f"{p['bytes'] / p['best_s'] / 1e9:.2f}", f"{p['best_s'] / p['bytes'] * 1e9:.3f}",
                     f"{p['best_s'] / p['tensors'] * 1e6:.2f}", bl.fmt(p["best_s"] / p["raw_s"]),
                     *(bl.fmt(summed(name)) for name in ("stage", "checksum", "write", "fsync", "shard")),
                     bl.fmt(ph.get("merge")), bl.fmt(ph.get("total")), bl.fmt(p["outside_s"])])
    emit(f"== scaling: gpusaver save on {fs} ({bl.fs_type(root)}), durable={args.durable}, "
         f"best of {args.repeat}\n" + bl.table(
             ["axis", "tensors", "MiB", "save s", "GB/s", "ns/byte", "us/tensor", "x raw",
              "stage s", "checksum s", "write s", "fsync s", "shard s", "merge s", "total s", "outside s"], rows) +
         "\n   phases reported through on_phase, summed over shards: stage = the shard workers handing tensors to "
         "the writer (layout, waits for free writer threads); checksum and write = thread-seconds of the writer "
         "threads (checksum includes packing small tensors), which overlap staging and each other; fsync = the "
         "data files; shard = the shards' wall time; merge = the merged index built and committed (renames, "
         "fsyncs); total = the whole of the pipeline's save; outside = Saver.save() around it (stale temp-dir "
         "scan, checkpoint state file, retention)\n")
    return out


def _best(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------- profile
def _profiled(fn: Any) -> tuple[pstats.Stats, float, dict[str, float]]:
    """Runs ``fn`` under cProfile in this thread and in every thread it starts."""
    profiles: list[tuple[str, cProfile.Profile]] = []
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        p = cProfile.Profile()
        profiles.append((self.name, p))
        p.enable()
        try:
            original(self)
        finally:
            p.disable()

    main = cProfile.Profile()
    threading.Thread.run = run  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        main.enable()
        fn()
        main.disable()
        wall = time.perf_counter() - t0
    finally:
        threading.Thread.run = original  # type: ignore[method-assign]
    stats = pstats.Stats(main)
    per_thread = {"main": pstats.Stats(main).total_tt}
    for name, p in profiles:
        stats.add(p)
        per_thread[name] = per_thread.get(name, 0.0) + pstats.Stats(p).total_tt
    return stats, wall, per_thread


def profile(args: argparse.Namespace, emit: Any) -> None:
    import gpusaver

    fs, root = _fs_root(args)
    os.makedirs(root, exist_ok=True)
    try:
        for wname in _workloads(args):
            wl = bl.workload(wname, args.size_gib, args.many_count, args.gpt2m_scale)
            arrays = bl.build_arrays(wl)
            prefix = os.path.join(root, "model")
            saver = gpusaver.Saver(arrays, durable=args.durable)
            saver.save(prefix)  # warm up
            plain = _best(lambda: saver.save(prefix), 1)
            stats, wall, threads = _profiled(lambda: saver.save(prefix))
            emit(_profile_text(f"{wname} save (durable={args.durable}) on {fs}", wl, plain, wall, threads, stats, args.top))
            blank = bl.build_arrays(wl, "blank")
            restorer = gpusaver.Saver(blank)
            restorer.restore(prefix)
            plain = _best(lambda: restorer.restore(prefix), 1)
            stats, wall, threads = _profiled(lambda: restorer.restore(prefix))
            emit(_profile_text(f"{wname} restore on {fs}", wl, plain, wall, threads, stats, args.top))
            del arrays, blank, saver, restorer
            _clear(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _profile_text(title: str, wl: bl.Workload, plain: float, wall: float, threads: dict[str, float],
                  stats: pstats.Stats, top: int) -> str:
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    body = "\n".join(line for line in buf.getvalue().splitlines() if line.strip())
    per = ", ".join(f"{k} {v:.3f} s" for k, v in threads.items())
    return (f"== profile: {title}: {wl.describe()}\n"
            f"   wall {plain:.3f} s unprofiled, {wall:.3f} s profiled; profiled time by thread: {per}\n"
            f"   top {top} by tottime, all threads merged:\n{body}\n")


# ------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="all", metavar="W[,W...]",
                   help="mixed, many, gpt2m, or all (= mixed,many); comma-separated for several (default all)")
    p.add_argument("--fs", choices=("shm", "disk", "both"), default="both",
                   help="tmpfs (--shm-dir), the working disk (--dir), or both (default)")
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved rounds: timed calls per peer and operation (median, min and range shown)")
    p.add_argument("--repeat-for", action="append", default=[], metavar="WORKLOAD=N",
                   help="another round count for one workload, e.g. gpt2m=3 (repeatable)")
    p.add_argument("--size-gib", type=float, default=1.0, help="size of the mixed workload (default 1)")
    p.add_argument("--many-count", type=int, default=bl.MANY_COUNT, help="tensors of the many workload")
    p.add_argument("--gpt2m-scale", type=float, default=1.0,
                   help="gpt2m: every width (d_model, d_ff, vocabulary, context) times this; 24 layers and 876 "
                        "tensors stay, bytes go about as its square (default 1: 3.55 GB)")
    p.add_argument("--peers", default=",".join(PEER_ORDER),
                   help=f"comma-separated subset of {','.join(PEER_ORDER)} (raw always runs: it is the reference)")
    p.add_argument("--dir", default=os.path.join(_HERE, ".scratch"), help="directory on the disk to test")
    p.add_argument("--shm-dir", default="/dev/shm", help="a tmpfs directory")
    p.add_argument("--cache", choices=("cold", "drop", "warm"), default="cold",
                   help="page cache before a restore on disk: cold (fadvise, default), drop (drop_caches), warm")
    p.add_argument("--slow-limit", type=float, default=10.0,
                   help="a variant whose first timed call takes longer than this many seconds is not repeated "
                        "(default 10)")
    p.add_argument("--skip-tf-many-restore", action="store_true",
                   help="skip TensorFlow's RestoreV2 of the many workload")
    p.add_argument("--gpusaver-src", default=bl.REPO, metavar="DIR",
                   help="import gpusaver from DIR (a checkout or an exported tree; default: this repository)")
    p.add_argument("--child-timeout", type=float, default=900.0)
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--text", metavar="OUT", help="also write the printed report to this file")
    p.add_argument("--scaling", action="store_true", help="gpusaver save time at 4 sizes and 4 tensor counts")
    p.add_argument("--durable", action="store_true", help="with --scaling or --profile: durable saves (default: off)")
    p.add_argument("--profile", action="store_true", help="cProfile gpusaver's save and restore")
    p.add_argument("--top", type=int, default=25, help="with --profile: rows per table")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.gpusaver_src = os.path.abspath(args.gpusaver_src)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    per: dict[str, int] = {}
    for item in args.repeat_for:
        name, _, n = item.partition("=")
        if name not in bl.WORKLOADS or not n.isdigit() or int(n) < 1:
            p.error(f"--repeat-for {item!r}: want WORKLOAD=N with WORKLOAD one of {', '.join(bl.WORKLOADS)}")
        per[name] = int(n)
    args.repeat_for = per
    bad = [w for w in args.workload.split(",") if w not in bl.WORKLOADS + ("all",)]
    if bad:
        p.error(f"--workload {args.workload!r}: choose from {', '.join(bl.WORKLOADS)}, all")
    if not 0 < args.gpt2m_scale <= 1:
        p.error("--gpt2m-scale must be in (0, 1]")
    return args


def _method_text(args: argparse.Namespace) -> str:
    rounds = ", ".join([f"{args.repeat}"] + [f"{w} {n}" for w, n in args.repeat_for.items()])
    return (
        f"method    rounds: {rounds}, interleaved (raw, gpusaver, then each peer in the order of the tables, one "
        f"after the other, then the next round); median s, min s and range s (= max - min) over the rounds; "
        f"GB/s = 10^9 tensor bytes per second at the median; x raw = median / the raw reference's median (the "
        f"faster of raw 1 thread and raw N threads, N = gpusaver's writer threads = {_writer_threads()}; durable "
        f"rows / the durable reference); gs/this = gpusaver's median / this row's (durable rows: gpusaver "
        f"(durable)'s; below 1: gpusaver is faster); peak = {bl.PEAK_METHOD}, the largest over the rounds; the "
        f"arrays live once in shared memory that every peer's process maps; each peer's save and its restore in a "
        f"process of its own, kept for the run; each peer's files are deleted right after its turn\n")


def _writer_threads() -> str:
    from _peers import WRITER_COUNT_PROBLEM, writer_count

    n = writer_count()
    return f"{n}" + (f" because {WRITER_COUNT_PROBLEM[0]}" if WRITER_COUNT_PROBLEM else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return _child_main(args.child)
    unknown = [x for x in args.peers.split(",") if x and x not in PEERS]
    if unknown:
        print(f"unknown peers: {', '.join(unknown)} (choose from {', '.join(PEER_ORDER)})", file=sys.stderr)
        return 2
    peers = ["raw"] + [x for x in PEER_ORDER if x != "raw" and x in args.peers.split(",")]
    chunks: list[str] = []

    def emit(text: str) -> None:
        chunks.append(text)
        print(text, flush=True)

    sys.path.insert(0, args.gpusaver_src)
    info = bl.machine_info(PACKAGES, args.gpusaver_src)
    mode = "scaling" if args.scaling else "profile" if args.profile else "peers"
    emit("gpusaver benchmark (" + mode + ")\n" + "\n".join(bl.header_lines(info)) + "\n" + (
        _method_text(args) if mode == "peers" else ""))
    t0 = time.perf_counter()
    cpu0 = bl.cpu_snapshot()
    result: dict[str, Any] = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "child"},
                              "raw_threads": [v["threads"] for v in PEERS["raw"].variants("restore")]}
    if args.scaling:
        result["scaling"] = scaling(args, emit)
    elif args.profile:
        profile(args, emit)
    else:
        missing = [f"{p} ({available(p)})" for p in peers if available(p)]
        if missing:
            emit("unavailable peers: " + ", ".join(missing) + "\n")
        rows = run_matrix(args, peers, emit)
        text, tg = targets(rows)
        emit(text)
        result["results"] = rows
        result["targets"] = tg
    info["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["elapsed_s"] = time.perf_counter() - t0
    info.update(bl.other_cpu(cpu0, info["elapsed_s"]))
    emit(f"elapsed {info['elapsed_s']:.0f} s; other processes used {info['other_cpu_s']:.0f} CPU-seconds meanwhile "
         f"({info['other_cpu_share'] * 100:.0f}% of the machine's {os.cpu_count()} CPUs): the numbers' noise"
         + (f"; load average {info['loadavg_at_end'][0]:.2f} at the end" if info.get("loadavg_at_end") else "")
         + "\n")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.text:
        os.makedirs(os.path.dirname(os.path.abspath(args.text)), exist_ok=True)
        with open(args.text, "w") as f:
            f.write("\n".join(chunks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
