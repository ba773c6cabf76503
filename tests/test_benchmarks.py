"""The benchmark scripts still run: tiny sizes, checked output. No timing is judged.

``benchmarks/bench.py`` is what the README's performance figures come from and
``benchmarks/gpu_bench.py --dry-run`` is the GPU benchmark's own check on a CPU;
a change that breaks either fails here rather than on the next measuring day.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench.py"

pytestmark = pytest.mark.slow

#: Seconds before a benchmark run counts as hung. Only a hang guard, far above the run's
#: time on a busy machine (the slowest run below, gpt2m with every peer, took about 50 s on
#: 2 loaded cores; the whole file 100-120 s): how fast the machine is must not decide the test.
HANG_GUARD = 1200


def _bench(tmp_path: pathlib.Path, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    out_json, out_txt = tmp_path / "b.json", tmp_path / "b.txt"
    cmd = [sys.executable, str(BENCH), *args, "--dir", str(tmp_path / "disk"), "--json", str(out_json),
           "--text", str(out_txt)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out_json.read_text()), out_txt.read_text()


def _writer_count() -> int:
    sys.path.insert(0, str(REPO))
    from gpusaver.storage import writer_count as _writer_count

    return _writer_count()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _rows(results: list[dict], **where: object) -> list[dict]:
    return [r for r in results if all(r.get(k) == v for k, v in where.items())]


def test_bench_runs_every_workload_and_prints_targets(tmp_path: pathlib.Path) -> None:
    report, text = _bench(
        tmp_path, "--workload", "all", "--fs", "both", "--size-gib", "0.02", "--many-count", "300",
        "--repeat", "2", "--peers", "raw,gpusaver,numpy",
    )
    results = report["results"]
    threads = sorted({1, _writer_count()})
    for workload in ("mixed", "many"):
        for fs in ("shm", "disk"):
            for op in ("save", "restore"):
                mine = _rows(results, workload=workload, fs=fs, op=op, peer="gpusaver")
                assert mine and all("error" not in r and r["best_s"] > 0 and r["median_s"] >= r["best_s"]
                                    and r["spread_s"] >= 0 and r["runs"] == 2 for r in mine), (workload, fs, op, mine)
                raw = _rows(results, workload=workload, fs=fs, op=op, peer="raw")
                # the raw reference: 1 thread and gpusaver's writer-thread count, the faster one marked
                assert sorted({r["threads"] for r in raw}) == threads
                for durable in {r["durable"] for r in raw}:
                    refs = [r for r in raw if r["durable"] == durable and r.get("reference")]
                    assert len(refs) == 1
                    assert refs[0]["median_s"] == min(r["median_s"] for r in raw if r["durable"] == durable)
                for r in _rows(results, workload=workload, fs=fs, op=op):
                    assert r["x_raw"] > 0 and r["gpusaver_over_this"] > 0, r["label"]
                    if op == "restore":
                        assert r["verified"] is True, r["label"]
    verdicts = {(t["fs"], t["what"]): t["ok"] for t in report["targets"]}
    assert verdicts[("shm", "gpusaver / raw")] in (True, False)  # judged on tmpfs ...
    assert verdicts[("disk", "gpusaver / raw")] == "info"  # ... shown on disk
    assert "== targets" in text and "C extension:" in text and "raw reference" in text
    assert "median s" in text and "range s" in text and "interleaved" in text


def test_bench_gpt2m_scaled_with_every_peer(tmp_path: pathlib.Path) -> None:
    """The bf16 + fp32 training-state workload at about 1/1000 of its bytes, every peer that is installed."""
    peers = "raw,gpusaver,tensorflow,safetensors,torch,numpy,dcp,orbax"
    report, text = _bench(tmp_path, "--workload", "gpt2m", "--gpt2m-scale", "0.03", "--fs", "shm", "--repeat", "2",
                          "--peers", peers)
    results = report["results"]
    assert "bfloat16" in text and "float32" in text
    modules = {"tensorflow": "tensorflow", "safetensors": "safetensors", "torch": "torch", "numpy": "numpy",
               "dcp": "torch.distributed.checkpoint", "orbax": "orbax.checkpoint"}
    for peer in peers.split(","):
        rows = _rows(results, peer=peer)
        assert rows, peer
        if peer in modules and not _installed(modules[peer]):
            assert all(r["skipped"].startswith("unavailable") for r in rows), rows
            continue
        for r in rows:
            assert "error" not in r and "skipped" not in r, (r["label"], r.get("error"), r.get("stderr_tail"))
            assert r["runs"] == 2 and r["median_s"] > 0, r["label"]
            if r["op"] == "restore":
                assert r["verified"] is True, r["label"]
    if _installed("torch.distributed.checkpoint"):
        assert {(r["threads"], r["durable"]) for r in _rows(results, peer="dcp", op="save")} == {
            (1, True), (2, True), (1, False), (2, False)}


def test_bench_orbax_peer_saves_and_restores(tmp_path: pathlib.Path) -> None:
    """The orbax peer next to the reference and gpusaver: a timed, fsynced save and a checked restore."""
    pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is not importable (the bench extra brings it)",
                        exc_type=ImportError)
    report, text = _bench(tmp_path, "--workload", "mixed", "--size-gib", "0.02", "--fs", "shm", "--repeat", "2",
                          "--peers", "raw,gpusaver,orbax")
    results = report["results"]
    rows = _rows(results, peer="orbax")
    assert {(r["op"], r["durable"]) for r in rows} == {("save", True), ("restore", False)}, rows
    for r in rows:
        assert "error" not in r and "skipped" not in r, (r["label"], r.get("error"), r.get("stderr_tail"))
        assert r["runs"] == 2 and r["median_s"] >= r["best_s"] > 0 and r["x_raw"] > 0, r["label"]
        assert r["gpusaver_over_this"] > 0, r["label"]
    save, = _rows(results, peer="orbax", op="save")
    assert save["file_bytes"] > 0
    restore, = _rows(results, peer="orbax", op="restore")
    assert restore["verified"] is True
    assert any(line.startswith("orbax (durable) ") for line in text.splitlines())
    assert any(line.startswith("orbax ") and "durable" not in line for line in text.splitlines())


def test_bench_reports_an_unimportable_peer_as_unavailable(tmp_path: pathlib.Path) -> None:
    shim = tmp_path / "shim" / "orbax"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('orbax is broken on purpose')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")]))
    report, text = _bench(tmp_path, "--workload", "many", "--many-count", "50", "--fs", "shm", "--repeat", "1",
                          "--peers", "raw,orbax", env=env)
    rows = _rows(report["results"], peer="orbax")
    assert rows and all(r["skipped"].startswith("unavailable") and "broken on purpose" in r["skipped"] for r in rows)
    assert "unavailable" in text
    assert all("error" not in r for r in _rows(report["results"], peer="raw"))


def test_raw_reference_splits_the_bytes_exactly() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _peers import split_ranges

    bufs = [np.arange(n, dtype=np.uint8) for n in (10_000, 1, 0, 5000, 70_000, 3)]
    whole = b"".join(b.tobytes() for b in bufs)
    for parts in (1, 2, 3, 4, 7):
        runs = split_ranges(bufs, parts)
        pos = 0
        for offset, run in runs:
            assert offset == pos and offset % 4096 == 0
            pos += sum(memoryview(b).nbytes for b in run)
        assert pos == len(whole)
        assert b"".join(bytes(memoryview(b).cast("B")) for _, run in runs for b in run) == whole


def test_restore_check_catches_a_flipped_byte_in_any_dtype() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _benchlib as bl

    wl = bl.gpt2m_workload(0.02)
    shared = bl.SharedArrays(wl)
    shared.fill("data")
    arrays = list(shared.arrays.values())
    assert bl.data_mismatches(wl, arrays) == []
    assert bl.data_mismatches(wl, [a.view(np.uint8) for a in arrays]) == []  # bytes count, not dtypes
    arrays[1].reshape(-1).view(np.uint8)[3] ^= 1  # a bfloat16 tensor
    arrays[-1].reshape(-1).view(np.uint8)[0] ^= 1  # a float32 one
    assert bl.data_mismatches(wl, arrays) == [wl.shapes[1][0], wl.shapes[-1][0]]
    assert bl.data_mismatches(wl, arrays[:-1])[0] == f"{wl.count - 1} arrays read, {wl.count} saved"
    shared.fill("blank")
    assert len(bl.data_mismatches(wl, list(shared.arrays.values()))) == wl.count
    shared.close()
    os.close(shared.fd)


def test_gpu_bench_dry_run() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--dry-run"],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "gpusaver" in done.stdout


def test_groups_bench_runs() -> None:
    """benchmarks/groups_bench.py (1 vs k device groups) runs end to end at a tiny size; its numbers are not checked."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "groups_bench.py"), "--groups", "3", "--size-gib", "0.01",
         "--repeat", "1"],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "3 groups / 1 group = " in done.stdout


def test_async_bench_runs(tmp_path: pathlib.Path) -> None:
    """benchmarks/async_bench.py runs end to end at a tiny size (save, save_async, memcpy; train.py loops)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "async_bench.py"), "--size-gib", "0.02", "--repeat", "1",
         "--train-steps", "3", "--train-repeat", "1", "--hidden", "64", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "save_async blocked" in done.stdout and "save_async every step" in done.stdout


def test_ranks_bench_runs(tmp_path: pathlib.Path) -> None:
    """benchmarks/ranks_bench.py runs end to end with 2 ranks under torchrun at a tiny size."""
    pytest.importorskip("torch.distributed")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ranks_bench.py"), "--ranks", "2", "--mib", "4", "--tensors", "200",
         "--repeat", "1", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "merge+commit s" in done.stdout


def test_cold_bench_runs_its_readers_at_a_tiny_scale(tmp_path: pathlib.Path) -> None:
    """benchmarks/cold_bench.py's readers (gpusaver, raw) read a tiny state; dropping the page cache needs
    root, so the children run directly on a saved state."""
    import gpusaver as gs

    sys.path.insert(0, str(REPO / "benchmarks"))
    import _benchlib as bl

    wl = bl.gpt2m_workload(0.02)
    os.makedirs(tmp_path / "cold")
    gs.Saver(bl.build_arrays(wl)).save(str(tmp_path / "cold" / "m"))
    for reader in ("gpusaver", "raw:2:1"):
        done = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "cold_bench.py"), "--dir", str(tmp_path), "--scale", "0.02",
             "--child", reader],
            capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        assert '"s":' in done.stdout


def test_read_floor_runs(tmp_path: pathlib.Path) -> None:
    """benchmarks/read_floor.py (read alone vs read + crc32c per chunk) runs end to end at a tiny size and writes its
    report; its numbers are not checked."""
    out = tmp_path / "floor.txt"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "read_floor.py"), "--size-gib", "0.01", "--repeat", "1",
         "--chunks", "64K,2M", "--dir", str(tmp_path), "--text", str(out)],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    text = out.read_text()
    assert "read + crc32c, 64 KiB chunks" in text and "read + crc32c, 2 MiB chunks" in text
    assert "checksummed read / read:" in text
    assert not list(tmp_path.glob("gpusaver-floor-*"))  # its file is gone


def test_write_floor_runs(tmp_path: pathlib.Path) -> None:
    """benchmarks/write_floor.py (1 thread vs 2 threads into one file vs into two files) runs end to end
    at a tiny size, writes its report and leaves no file behind; its numbers are not checked."""
    out = tmp_path / "wfloor.txt"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "write_floor.py"), "--size-mib", "9", "--repeat", "1",
         "--dir", str(tmp_path), "--text", str(out)],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    text = out.read_text()
    for row in ("1 thread, 1 file (reference)", "2 threads, 1 file", "2 threads, 2 files"):
        assert row in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wfloor.txt"]


@pytest.mark.parametrize("mode", ["save", "restore"])
def test_checks_bench_runs(tmp_path: pathlib.Path, mode: str) -> None:
    """benchmarks/checks_bench.py save / restore run end to end at a tiny size and print their medians as
    one JSON line; the numbers are not checked."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "checks_bench.py"), mode, "--count", "50", "--repeat", "2",
         "--shapes", "many", "--order", "shuffled", "--dir", str(tmp_path), "--json-out"],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(res) >= ({"save_ms"} if mode == "save" else {"restore_ms", "checks_ms", "share"})
    assert list(tmp_path.iterdir()) == []
