"""gpusaver against its peers on the CPU: the same arrays, the same file system, one run.

    .venv/bin/python benchmarks/bench.py --workload all --fs both --repeat 3 \\
        --json benchmarks/results/out.json --text benchmarks/results/out.txt

Peers: a raw ``os.writev``/``os.preadv`` of the arrays' memory (the limit),
gpusaver (durable on and off), TensorFlow's ``SaveV2``/``RestoreV2``,
safetensors, ``torch.save``/``torch.load`` and ``numpy.savez``/``numpy.load``;
peers that are not installed are reported as skipped. Each peer's save and
its restore run in a fresh child process, which times the best of ``--repeat``
calls and measures the peak memory above the arrays (see README.md).

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
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

import _benchlib as bl  # noqa: E402
from _peers import PEERS, available  # noqa: E402

PACKAGES = ("gpusaver", "numpy", "crc32c", "tensorflow-cpu", "tensorflow", "safetensors", "torch")
PEER_ORDER = ("raw", "gpusaver", "tensorflow", "safetensors", "torch", "numpy")
#: (workload, operation, the peer gpusaver's time is divided by, the most that ratio may be).
TARGETS = (
    ("mixed", "save", "raw", 1.10),
    ("mixed", "save", "tensorflow", 0.60),
    ("mixed", "restore", "raw", 1.25),
    ("mixed", "restore", "tensorflow", 0.60),
    ("many", "save", "raw", 3.0),
    ("many", "restore", "raw", 4.0),
)
PEAK_LIMIT = 256 * bl.MiB


# ---------------------------------------------------------------------- child
def _workload(spec: dict[str, Any]) -> bl.Workload:
    if spec["workload"] == "mixed":
        return bl.mixed_workload(spec["size_gib"])
    return bl.many_workload(spec["many_count"])


def _clear(directory: str) -> None:
    for path in bl.files_under(directory):
        os.remove(path)
    for entry in os.listdir(directory):
        shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one peer's save or restore ``spec["repeat"]`` times in this process."""
    op, disk = spec["op"], spec["fs"] == "disk"
    peer = PEERS[spec["peer"]](spec["dir"])
    arrays = bl.build_arrays(_workload(spec), "data" if op == "save" else "blank")
    out: dict[str, Any] = {"notes": []}
    if op == "save":
        out["digest"] = bl.digest(arrays.values())
    t0 = time.perf_counter()
    if op == "save":
        peer.setup_save(arrays, spec["durable"])
    else:
        peer.setup_restore(arrays)
    out["setup_s"] = time.perf_counter() - t0
    times: list[float] = []
    peaks: list[int] = []
    resident: list[float | None] = []
    others: list[float] = []
    for r in range(spec["repeat"]):
        if op == "save":
            _clear(spec["dir"])
        elif disk:
            out["cache"] = bl.evict(bl.files_under(spec["dir"]), spec["cache"])
            resident.append(bl.resident_fraction(bl.files_under(spec["dir"])))
        if disk:
            os.sync()
        rss0, method = bl.peak_start()
        cpu0 = bl.cpu_snapshot()
        t0 = time.perf_counter()
        result = peer.save() if op == "save" else peer.restore()
        dt = time.perf_counter() - t0
        others.append(bl.other_cpu(cpu0, dt)["other_cpu_share"])
        peaks.append(bl.peak_end(rss0, method))
        out["peak_method"] = method
        times.append(dt)
        if op == "restore" and r == 0:
            got = bl.digest(peer.restored_arrays(result))
            out["verified"] = got == spec["expect"]
            if not out["verified"]:
                out["notes"].append(f"restored values differ from the saved ones ({got} != {spec['expect']})")
        del result
        if dt > spec["slow_limit"] and r + 1 < spec["repeat"]:
            out["notes"].append(f"1 run: it took {dt:.1f} s > --slow-limit {spec['slow_limit']:g} s")
            break
    files = bl.files_under(spec["dir"])
    out.update(
        times=times,
        best_s=min(times),
        other_cpu_share=others[times.index(min(times))],
        peak_bytes=max(peaks),
        file_bytes=sum(os.path.getsize(p) for p in files),
        resident_before=max(resident) if resident and resident[0] is not None else None,
    )
    return out


_MARK = "@@bench-result@@ "


def _child_main(arg: str) -> int:
    spec = json.loads(arg)
    sys.path.insert(0, spec["gpusaver_src"])
    try:
        res = child(spec)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
    print(_MARK + json.dumps(res), flush=True)
    return 0


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
        [bl.REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            res = json.loads(line[len(_MARK):])
            if "error" in res:
                res["stderr_tail"] = proc.stderr[-2000:]
            res["child_wall_s"] = time.perf_counter() - t0
            return res
    return {"error": f"child exited {proc.returncode} without a result", "stderr_tail": proc.stderr[-2000:]}


# ---------------------------------------------------------------------- matrix
def _dirs(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    if args.fs in ("shm", "both"):
        out["shm"] = os.path.join(args.shm_dir, f"gpusaver-bench-{os.getpid()}")
    if args.fs in ("disk", "both"):
        out["disk"] = os.path.join(args.dir, f"bench-{os.getpid()}")
    return out


def _variants(peer: str) -> list[bool]:
    return [True, False] if PEERS[peer].fsyncs else [False]


def _label(peer: str, durable: bool) -> str:
    return f"{peer} (durable)" if durable else peer


def run_matrix(args: argparse.Namespace, peers: list[str], emit: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    workloads = ["mixed", "many"] if args.workload == "all" else [args.workload]
    for wname in workloads:
        wl = bl.mixed_workload(args.size_gib) if wname == "mixed" else bl.many_workload(args.many_count)
        for fs, root in _dirs(args).items():
            os.makedirs(root, exist_ok=True)
            expect = None
            block: list[dict[str, Any]] = []
            try:
                for peer in peers:
                    why = available(peer)
                    pdir = os.path.join(root, peer)
                    base = dict(workload=wname, fs=fs, dir=pdir, fstype=bl.fs_type(root), peer=peer,
                                size_gib=args.size_gib, many_count=args.many_count, repeat=args.repeat,
                                slow_limit=args.slow_limit, cache=args.cache, bytes=wl.nbytes, tensors=wl.count,
                                gpusaver_src=args.gpusaver_src)
                    for op, durable in [("save", d) for d in _variants(peer)] + [("restore", False)]:
                        spec = dict(base, op=op, durable=durable, expect=expect)
                        if why:
                            res: dict[str, Any] = {"skipped": why}
                        elif op == "restore" and args.skip_tf_many_restore and peer == "tensorflow" and wname == "many":
                            res = {"skipped": "--skip-tf-many-restore"}
                        elif op == "restore" and any(r.get("error") for r in block if r["peer"] == peer):
                            res = {"skipped": "its save failed"}
                        else:
                            os.makedirs(pdir, exist_ok=True)
                            print(f"  {wname}/{fs}: {_label(peer, durable)} {op} ...", end="", file=sys.stderr, flush=True)
                            res = run_child(spec, args.child_timeout)
                            print(f" {res.get('best_s', float('nan')):.3f} s" if "best_s" in res else
                                  f" {res.get('error')}", file=sys.stderr, flush=True)
                        if op == "save" and expect is None and "digest" in res:
                            expect = res["digest"]
                        spec.pop("expect")
                        block.append(dict(spec, **res))
                    shutil.rmtree(pdir, ignore_errors=True)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            _ratios(block)
            rows.extend(block)
            emit(_block_text(wname, wl, fs, block, args))
    return rows


def _find(block: list[dict[str, Any]], peer: str, op: str, durable: bool = False) -> dict[str, Any] | None:
    for r in block:
        if r["peer"] == peer and r["op"] == op and r["durable"] == durable and "best_s" in r:
            return r
    return None


def _ratios(block: list[dict[str, Any]]) -> None:
    for r in block:
        if "best_s" not in r:
            continue
        r["gbps"] = r["bytes"] / r["best_s"] / 1e9
        raw = _find(block, "raw", r["op"], r["durable"] if r["op"] == "save" else False)
        tf = _find(block, "tensorflow", r["op"])
        r["x_raw"] = r["best_s"] / raw["best_s"] if raw else None
        r["x_tf"] = r["best_s"] / tf["best_s"] if tf else None


def _block_text(wname: str, wl: bl.Workload, fs: str, block: list[dict[str, Any]], args: argparse.Namespace) -> str:
    where = block[0]["fstype"] if block else "?"
    lines = [f"== {wname}: {wl.describe()}   on {fs} ({where})"]
    for op in ("save", "restore"):
        rows = []
        notes = []
        for r in block:
            if r["op"] != op:
                continue
            label = _label(r["peer"], r["durable"])
            if "best_s" not in r:
                rows.append([label] + ["-"] * 8 + [r.get("skipped") and "skipped" or "ERROR"])
                notes.append(f"{label}: {r.get('skipped') or r.get('error')}")
                continue
            extra = "fsync" if r["durable"] else ""
            if op == "restore":
                extra = PEERS[r["peer"]].verifies
                if r.get("verified") is False:
                    extra += ", WRONG VALUES"
                if r.get("resident_before") is not None and fs == "disk":
                    extra += f", {r['resident_before'] * 100:.0f}% cached"
            rows.append([
                label, bl.fmt(r["best_s"]), f"{r['gbps']:.2f}", bl.fmt(r["x_raw"]), bl.fmt(r["x_tf"]),
                f"{r['peak_bytes'] / bl.MiB:.0f}", f"{len(r['times'])}", f"{r['other_cpu_share'] * 100:.0f}",
                f"{r['file_bytes'] / bl.MiB:.0f}", extra,
            ])
            notes.extend(f"{label}: {n}" for n in r.get("notes", []))
        head = [op, "best s", "GB/s", "x raw", "x tf", "peak MiB", "runs", "other%", "file MiB",
                "notes" if op == "save" else "checks"]
        lines.append(bl.table(head, rows, "l" + "r" * 8 + "l"))
        lines.extend(f"   {n}" for n in notes)
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
                value = g["best_s"] / ref["best_s"] if g and ref else None
                # Time targets are set for tmpfs; on disk the ratio is shown, not judged.
                verdict = None if value is None else (value <= limit if fs == "shm" else "info")
                out.append(dict(fs=fs, workload=wname, op=op, what=f"{_label('gpusaver', durable)} / "
                                f"{_label(against, durable and against == 'raw')}", limit=limit, value=value,
                                ok=verdict))
        for r in here:
            if r["peer"] == "gpusaver" and "peak_bytes" in r:
                out.append(dict(fs=fs, workload=r["workload"], op=r["op"], what=f"{_label('gpusaver', r['durable'])}"
                                " peak MiB above arrays", limit=PEAK_LIMIT / bl.MiB,
                                value=r["peak_bytes"] / bl.MiB, ok=r["peak_bytes"] <= PEAK_LIMIT))
    rows_txt = [[t["fs"], t["workload"], t["op"], t["what"], f"<= {t['limit']:g}",
                 "-" if t["value"] is None else f"{t['value']:.2f}",
                 "n/a" if t["ok"] is None else t["ok"] if isinstance(t["ok"], str) else ("met" if t["ok"] else "MISSED")]
                for t in out]
    text = "== targets\n" + bl.table(["fs", "workload", "op", "ratio", "target", "measured", ""], rows_txt,
                                     "lllllrl") + "\n"
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
            raw.setup_save(arrays, False)
            raw_best = _best(raw.save, args.repeat)
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
    workloads = ["mixed", "many"] if args.workload == "all" else [args.workload]
    try:
        for wname in workloads:
            wl = bl.mixed_workload(args.size_gib) if wname == "mixed" else bl.many_workload(args.many_count)
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
    p.add_argument("--workload", choices=("mixed", "many", "all"), default="all")
    p.add_argument("--fs", choices=("shm", "disk", "both"), default="both",
                   help="tmpfs (--shm-dir), the working disk (--dir), or both (default)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per peer and operation; the best counts")
    p.add_argument("--size-gib", type=float, default=1.0, help="size of the mixed workload (default 1)")
    p.add_argument("--many-count", type=int, default=bl.MANY_COUNT, help="tensors of the many workload")
    p.add_argument("--peers", default=",".join(PEER_ORDER),
                   help=f"comma-separated subset of {','.join(PEER_ORDER)} (raw always runs: it is the reference)")
    p.add_argument("--dir", default=os.path.join(_HERE, ".scratch"), help="directory on the disk to test")
    p.add_argument("--shm-dir", default="/dev/shm", help="a tmpfs directory")
    p.add_argument("--cache", choices=("cold", "drop", "warm"), default="cold",
                   help="page cache before a restore on disk: cold (fadvise, default), drop (drop_caches), warm")
    p.add_argument("--slow-limit", type=float, default=4.0,
                   help="an operation whose first call takes longer than this many seconds is not repeated")
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
    return args


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
        f"method    best of {args.repeat}; GB/s = 10^9 tensor bytes per second; x raw = time / raw's time "
        f"(durable rows / raw durable); x tf = time / TensorFlow's; peak = {bl.PEAK_METHOD}; "
        f"each peer's save and restore in a fresh process\n" if mode == "peers" else ""))
    t0 = time.perf_counter()
    cpu0 = bl.cpu_snapshot()
    result: dict[str, Any] = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "child"}}
    if args.scaling:
        result["scaling"] = scaling(args, emit)
    elif args.profile:
        profile(args, emit)
    else:
        skipped = [f"{p} ({available(p)})" for p in peers if available(p)]
        if skipped:
            emit("skipped peers: " + ", ".join(skipped) + "\n")
        rows = run_matrix(args, peers, emit)
        text, tg = targets(rows)
        emit(text)
        result["results"] = rows
        result["targets"] = tg
    info["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["elapsed_s"] = time.perf_counter() - t0
    info.update(bl.other_cpu(cpu0, info["elapsed_s"]))
    emit(f"elapsed {info['elapsed_s']:.0f} s; other processes used {info['other_cpu_s']:.0f} CPU-seconds meanwhile "
         f"({info['other_cpu_share'] * 100:.0f}% of the machine's {os.cpu_count()} CPUs): the numbers' noise\n")
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
