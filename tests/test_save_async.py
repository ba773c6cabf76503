"""Saver.save_async: returns once the snapshot is taken, writes in the background, loses nothing.

* the files are byte for byte those of a synchronous save (random states, sizes on both sides of
  every threshold: pack limit, snapshot slab, snapshot pool), on both host paths;
* every array changed the instant save_async returns: the checkpoint holds the old values
  (NumPy, and the fake CuPy with host and device snapshots);
* the pool stays within snapshot_bytes and does not grow from save to save; a state larger
  than the pool is captured in pieces (slabs reused within one save);
* the next call waits for the pending save; an error nobody collected is raised by the next call,
  exactly once; a failure commits nothing; a capture error raises from save_async;
* interpreter exit waits for a pending save, and reports an error nobody collected;
* kill -9 at every phase of the background write: the newest checkpoint is whole and restores,
  and latest_checkpoint() is never behind a result() that returned.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gpusaver as gs
from gpusaver import config
from gpusaver.errors import CheckpointWriteError, InvalidArgumentError, UnsupportedDTypeError
from gpusaver.storage.fileops import PosixFileOps

pytestmark = pytest.mark.usefixtures("host_path")

PACK = 1024  # pack_limit in these tests
SLAB = 8192  # snapshot slab


@pytest.fixture(autouse=True)
def _small_thresholds():
    with config.set(pack_limit=PACK, snapshot_slab_bytes=SLAB, segment_bytes=4096):
        yield


def _files(prefix: str) -> dict[str, bytes]:
    directory, base = os.path.split(prefix)
    return {
        f[len(base) :]: open(os.path.join(directory, f), "rb").read()
        for f in sorted(os.listdir(directory))
        if f.startswith(base + ".")
    }


def _state(rng: np.random.Generator, sizes: list[int], kinds: list[int]) -> dict[str, np.ndarray]:
    """Tensors of the given byte sizes (about), in several layouts: contiguous, transposed, big-endian,
    bfloat16, strings, 0-d."""
    import ml_dtypes

    out: dict[str, np.ndarray] = {}
    for i, (n, kind) in enumerate(zip(sizes, kinds)):
        name = f"t{i:03d}"
        if kind == 0:
            out[name] = rng.integers(0, 255, n, dtype=np.uint8)
        elif kind == 1:
            out[name] = rng.standard_normal(max(n // 4, 0)).astype(np.float32)
        elif kind == 2:  # non-contiguous
            k = max(int(np.sqrt(max(n // 8, 1))), 1)
            out[name] = rng.standard_normal((k, k + 1)).T
        elif kind == 3:  # big-endian
            out[name] = np.arange(max(n // 4, 0), dtype=">i4")
        elif kind == 4:
            out[name] = rng.standard_normal(max(n // 2, 0)).astype(ml_dtypes.bfloat16)
        elif kind == 5:
            out[name] = np.array([b"x" * (j % 7) for j in range(max(n // 64, 1))], dtype=object)
        else:
            out[name] = np.array(rng.integers(-9, 9), dtype=np.int64)
    return out


def _scramble(state: dict[str, np.ndarray]) -> None:
    for arr in state.values():
        if arr.dtype == object:
            arr[...] = b"changed"
        elif arr.size and arr.flags.c_contiguous:
            arr.reshape(-1).view(np.uint8)[...] = 0xA5
        elif arr.size:
            arr[...] = 7


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == object:
        return a.shape == b.shape and list(a.ravel()) == list(b.ravel())
    return a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b, a.dtype).tobytes()


# ------------------------------------------------------------------ property: same files as save()
_sizes = st.lists(
    st.sampled_from([0, 1, 7, PACK - 1, PACK, PACK + 1, SLAB - 1, SLAB, SLAB + 1, 3 * SLAB + 5, 100, 5000]),
    min_size=1,
    max_size=14,
)


@settings(max_examples=25)
@given(
    sizes=_sizes,
    data=st.data(),
    sharded=st.booleans(),
    pool_slabs=st.sampled_from([2, 3, 8, 1000]),
)
def test_async_files_equal_sync_files_and_hold_the_values_before_the_return(
    tmp_path_factory, sizes, data, sharded, pool_slabs
) -> None:
    kinds = data.draw(st.lists(st.integers(0, 6), min_size=len(sizes), max_size=len(sizes)))
    devices = data.draw(st.lists(st.integers(0, 2), min_size=len(sizes), max_size=len(sizes)))
    rng = np.random.default_rng(len(sizes) * 31 + sum(kinds))
    state = _state(rng, sizes, kinds)
    variables = [gs.Variable(arr, name, f"/cpu:{d}") for (name, arr), d in zip(state.items(), devices)]
    kept = {k: np.array(v, copy=True) for k, v in state.items()}
    d = str(tmp_path_factory.mktemp("async"))
    saver = gs.Saver(variables, sharded=sharded, snapshot_bytes=pool_slabs * SLAB)
    sync = saver.save(os.path.join(d, "sync"))
    handle = saver.save_async(os.path.join(d, "async"))
    _scramble(state)  # the instant it returns
    assert handle.result() == os.path.join(d, "async")
    want, got = _files(sync), _files(handle.prefix)
    assert want.keys() == got.keys()
    for suffix in want:
        assert want[suffix] == got[suffix], suffix
    reader = gs.load_checkpoint(handle.prefix)
    for name, value in kept.items():
        assert _same(value, reader.get_tensor(name)), name
    assert saver._pool.allocated_bytes <= max(pool_slabs, 2) * SLAB


# ------------------------------------------------------------------ the basics
def test_changed_right_after_return_keeps_old_values_and_restores(tmp_path) -> None:
    w = np.arange(100_000, dtype=np.float32)
    b = np.ones(3, np.float64)
    saver = gs.Saver({"w": w, "b": b}, snapshot_bytes=4 * SLAB)  # far smaller than w: captured in pieces
    handle = saver.save_async(str(tmp_path / "m"), global_step=1)
    w += 1
    b[...] = -1
    assert handle.result() == str(tmp_path / "m-1")
    assert gs.latest_checkpoint(str(tmp_path)) == handle.prefix
    saver.restore(handle.prefix)
    assert np.array_equal(w, np.arange(100_000, dtype=np.float32)) and np.array_equal(b, np.ones(3))
    assert handle.done() and "done" in repr(handle)


def test_state_larger_than_the_pool_reuses_its_slabs(tmp_path) -> None:
    from gpusaver.pipeline import snapshot

    acquired = []
    real = snapshot.SnapshotPool.acquire

    def counting(self):
        slab = real(self)
        acquired.append(id(slab))
        return slab

    w = np.random.default_rng(1).standard_normal(50 * SLAB // 8)  # 50 slabs of bytes
    saver = gs.Saver({"w": w}, snapshot_bytes=3 * SLAB)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snapshot.SnapshotPool, "acquire", counting)
        saver.save_async(str(tmp_path / "m")).result()
    assert len(acquired) >= 50 and len(set(acquired)) <= 3
    assert saver._pool.allocated_bytes == 3 * SLAB
    assert np.array_equal(gs.load_checkpoint(str(tmp_path / "m")).get_tensor("w"), w)


def test_memory_does_not_grow_from_one_save_to_the_next(tmp_path) -> None:
    rng = np.random.default_rng(2)
    state = {f"v{i}": rng.standard_normal(rng.integers(1, 3000)) for i in range(40)}
    saver = gs.Saver(state, max_to_keep=2, snapshot_bytes=16 * SLAB)
    for step in range(10):  # warm up: the pool and the caches reach their size
        saver.save_async(str(tmp_path / "m"), global_step=step)
    saver.wait()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for step in range(10, 40):
            saver.save_async(str(tmp_path / "m"), global_step=step)
            for v in state.values():
                v += 1
        saver.wait()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert saver._pool.allocated_bytes <= 16 * SLAB
    # A slab or a snapshot kept per save would be 30 * 8 KiB and more; Python's and NumPy's own
    # caches settle within a few KiB.
    assert grown < 64 << 10, f"{grown} bytes more after 30 saves"
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["checkpoint"] + [f"m-{s}{x}" for s in (38, 39) for x in (".index", ".data-00000-of-00001")]
    )


def test_empty_saver_and_bad_arguments(tmp_path) -> None:
    assert gs.Saver(allow_empty=True).save_async(str(tmp_path / "m")).result() is None
    saver = gs.Saver({"w": np.ones(3)})
    with pytest.raises(InvalidArgumentError, match="snapshot"):
        saver.save_async(str(tmp_path / "m"), snapshot="disk")
    with pytest.raises(InvalidArgumentError, match="doesn't exist"):
        saver.save_async(str(tmp_path / "missing" / "m"))
    with pytest.raises(InvalidArgumentError, match="snapshot_bytes"):
        gs.Saver({"w": np.ones(3)}, snapshot_bytes=0)
    with pytest.raises(TypeError):
        saver.save_async(str(tmp_path / "m"), global_step=1.5)
    assert os.listdir(tmp_path) == []
    saver.save_async(str(tmp_path / "m")).result()  # nothing pending raised by those


def test_a_capture_error_raises_from_save_async_and_commits_nothing(tmp_path, monkeypatch) -> None:
    from gpusaver.backends.numpy_backend import NumpyBackend

    state = {f"v{i}": np.full(3000, i, np.float64) for i in range(6)}
    saver = gs.Saver(state, snapshot_bytes=4 * SLAB)
    saver.save(str(tmp_path / "m"), global_step=0)
    real = NumpyBackend.save_group

    def faulty(self, tensors, writer):  # half the tensors captured, then a fault (a CUDA error, a signal)
        real(self, list(tensors)[:3], writer)
        raise RuntimeError("device fault while capturing")

    monkeypatch.setattr(NumpyBackend, "save_group", faulty)
    with pytest.raises(RuntimeError, match="device fault"):
        saver.save_async(str(tmp_path / "m"), global_step=1)
    saver.wait()  # raised once, by save_async: not again
    monkeypatch.setattr(NumpyBackend, "save_group", real)
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-0")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "m-0.data-00000-of-00001", "m-0.index"]
    assert saver.save_async(str(tmp_path / "m"), global_step=2).result() == str(tmp_path / "m-2")


# ------------------------------------------------------------------ errors in the background
class _FailingOps(PosixFileOps):
    """pwrite fails with ENOSPC (disk full)."""

    def pwrite(self, fd, buffers, offset):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_background_failure_raises_in_result_and_commits_nothing(tmp_path) -> None:
    w = np.ones(10_000)
    gs.Saver({"w": w}).save(str(tmp_path / "m"), global_step=0)
    saver = gs.Saver({"w": w}, fileops=_FailingOps())
    handle = saver.save_async(str(tmp_path / "m"), global_step=1)
    with pytest.raises(CheckpointWriteError) as info:
        handle.result()
    assert info.value.errno == errno.ENOSPC
    assert handle.exception() is info.value
    saver.wait()  # collected by result(): not raised again
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-0")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "m-0.data-00000-of-00001", "m-0.index"]


@pytest.mark.parametrize("next_call", ["save", "save_async", "restore", "wait", "close"])
def test_an_uncollected_error_is_raised_by_the_next_call_once(tmp_path, next_call) -> None:
    w = np.ones(10_000)
    gs.Saver({"w": w}).save(str(tmp_path / "m"), global_step=0)
    ops = _FailingOps()
    saver = gs.Saver({"w": w}, fileops=ops)
    handle = saver.save_async(str(tmp_path / "m"), global_step=1)
    handle.wait()
    call = {
        "save": lambda: saver.save(str(tmp_path / "m"), global_step=2),
        "save_async": lambda: saver.save_async(str(tmp_path / "m"), global_step=2),
        "restore": lambda: saver.restore(str(tmp_path / "m-0")),
        "wait": saver.wait,
        "close": saver.close,
    }[next_call]
    with pytest.raises(CheckpointWriteError) as info:
        call()
    assert info.value is handle._error
    saver.wait()  # once only
    if next_call == "restore":
        saver.restore(str(tmp_path / "m-0"))
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-0")


class _GatedOps(PosixFileOps):
    """Blocks the background save at a phase until released; records every phase."""

    def __init__(self, gate_phase: str) -> None:
        self.gate_phase = gate_phase
        self.reached = threading.Event()
        self.release = threading.Event()
        self.phases: list[str] = []

    def phase(self, name: str) -> None:
        self.phases.append(name)
        if name == self.gate_phase:
            self.reached.set()
            assert self.release.wait(300), "the test never released the gate"


@pytest.mark.parametrize("next_call", ["save", "save_async", "restore"])
def test_the_next_call_waits_for_the_pending_save(tmp_path, next_call) -> None:
    w = np.arange(1000, dtype=np.float64)
    ops = _GatedOps("")
    saver = gs.Saver({"w": w}, fileops=ops)
    saver.save(str(tmp_path / "m"), global_step=0)
    ops.phases.clear()
    ops.gate_phase = "merge:before_index_rename"
    handle = saver.save_async(str(tmp_path / "m"), global_step=1)
    assert ops.reached.wait(300)
    assert not handle.done()
    with pytest.raises(TimeoutError):
        handle.result(timeout=0)
    w[...] = -5
    finished = threading.Event()

    def call() -> None:
        if next_call == "save":
            ops.gate_phase = ""
            saver.save(str(tmp_path / "m"), global_step=2)
        elif next_call == "save_async":
            ops.gate_phase = ""
            saver.save_async(str(tmp_path / "m"), global_step=2)
        else:
            saver.restore(str(tmp_path / "m-0"))
        finished.set()

    t = threading.Thread(target=call)
    t.start()
    t.join(0.2)
    assert not finished.is_set()  # held by the gate, however fast the machine
    assert "save:committed" not in ops.phases
    ops.release.set()
    t.join(300)
    assert finished.is_set() and handle.result() == str(tmp_path / "m-1")
    saver.wait()
    committed = ops.phases.index("save:committed")
    assert ops.phases.index("state:written") > committed
    if next_call == "restore":
        assert np.array_equal(w, np.arange(1000, dtype=np.float64))
    else:
        assert ops.phases.count("save:start") == 2 and ops.phases.index("save:start", 1) > committed
        assert np.array_equal(gs.load_checkpoint(str(tmp_path / "m-1")).get_tensor("w"), np.arange(1000.0))


# ------------------------------------------------------------------ processes
_CHILD = textwrap.dedent(
    """
    import os, sys, numpy as np, gpusaver as gs
    from gpusaver.storage.fileops import PosixFileOps
    d, mode = sys.argv[1], sys.argv[2]
    w = np.arange(300_000, dtype=np.float64)
    class Ops(PosixFileOps):
        armed = False
        def phase(self, name):
            if name == mode and self.armed:
                open(os.path.join(d, "reached"), "w").close()
                import time
                while True:
                    time.sleep(1)
        def pwrite(self, fd, buffers, offset):
            if mode == "fail":
                raise OSError(28, "No space left on device")
            super().pwrite(fd, buffers, offset)
    ops = Ops()
    saver = gs.Saver({"w": w}, fileops=ops, snapshot_bytes=1 << 20)
    if mode != "fail":
        saver.save(os.path.join(d, "m"), global_step=1)
    w += 1
    ops.armed = True
    saver.save_async(os.path.join(d, "m"), global_step=2)
    w[...] = -1  # after the return: must not reach the checkpoint
    print("returned", flush=True)
    """
)


def _child(tmp_path, mode: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ck"), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_interpreter_exit_waits_for_the_pending_save(tmp_path) -> None:
    (tmp_path / "ck").mkdir()
    proc = _child(tmp_path, "none")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "returned" in out
    prefix = gs.latest_checkpoint(str(tmp_path / "ck"))
    assert prefix == str(tmp_path / "ck" / "m-2")
    assert np.array_equal(gs.load_checkpoint(prefix).get_tensor("w"), np.arange(300_000, dtype=np.float64) + 1)


def test_interpreter_exit_reports_an_error_nobody_collected(tmp_path) -> None:
    (tmp_path / "ck").mkdir()
    proc = _child(tmp_path, "fail")
    _, err = proc.communicate(timeout=300)
    assert "nobody collected the error" in err and "No space left" in err
    assert gs.latest_checkpoint(str(tmp_path / "ck")) is None
    assert [f for f in os.listdir(tmp_path / "ck") if not f.startswith(".")] == []


@pytest.mark.parametrize(
    "phase",
    [
        "save:start",
        "shard:written:0",
        "merge:start",
        "merge:index_written",
        "merge:before_index_rename",
        "merge:index_renamed",
        "save:committed",
        "state:written",
    ],
)
def test_kill9_in_the_background_leaves_a_whole_newest_checkpoint(tmp_path, phase) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    proc = _child(tmp_path, phase)
    try:
        # Wait for the background to reach the phase, then kill -9 there. (save_async may not have
        # returned: the state is larger than the pool, so the capture waits for the writes.)
        deadline = time.monotonic() + 300  # a hang guard only: nothing here depends on speed
        while not (ck / "reached").exists():
            assert time.monotonic() < deadline, f"the child never reached {phase}"
            if proc.poll() is not None:
                raise AssertionError(f"the child ended before {phase}: {proc.stderr.read()}")
            threading.Event().wait(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(300)
    os.remove(ck / "reached")
    latest = gs.latest_checkpoint(str(ck))
    step = 2 if phase == "state:written" else 1
    assert latest == str(ck / f"m-{step}")
    w = np.zeros(300_000)
    gs.Saver({"w": w}).restore(latest)
    assert np.array_equal(w, np.arange(300_000, dtype=np.float64) + (step - 1))
    # the next save cleans the debris up
    gs.Saver({"w": w}).save(str(ck / "m"), global_step=3)
    assert sorted(os.listdir(ck)) == sorted(
        ["checkpoint"]
        + [f"m-{s}{x}" for s in sorted({1, step, 3}) for x in (".index", ".data-00000-of-00001")]
    )


def test_large_copies_split_over_threads_keep_every_byte(tmp_path) -> None:
    from gpusaver.pipeline import snapshot

    w = np.random.default_rng(5).integers(0, 2**63, (20 << 20) // 8 + 3, dtype=np.int64)  # not page-aligned
    with config.set(snapshot_slab_bytes=16 << 20):
        saver = gs.Saver({"w": w}, snapshot_bytes=64 << 20)
        handle = saver.save_async(str(tmp_path / "m"))
        w[...] = 0
        handle.result()
    assert snapshot._COPY_SPLIT * 2 <= 16 << 20  # the copies into 16 MiB slabs were split
    want = np.random.default_rng(5).integers(0, 2**63, (20 << 20) // 8 + 3, dtype=np.int64)
    assert np.array_equal(gs.load_checkpoint(handle.prefix).get_tensor("w"), want)


# ---------------------------------------------------------------- a forked child saves too

_FORKED_SAVER = textwrap.dedent(
    """
    import os, sys, numpy as np, gpusaver as gs
    d = sys.argv[1]
    # 24 MiB in one tensor and 12 MiB of small ones: both the large copy and the packing are split over the
    # snapshot's copy threads, which this save starts in the parent
    state = {"big": np.arange(6 << 20, dtype=np.float32)}
    state.update({f"s{i}": np.full(1024, i, np.float32) for i in range(3072)})
    gs.Saver(state).save_async(os.path.join(d, "parent")).result()
    pid = os.fork()
    if pid == 0:  # the copy threads did not survive the fork: the child's save must not wait for them
        try:
            state["big"] += 1
            prefix = gs.Saver(state).save_async(os.path.join(d, "child")).result()
            dest = {k: np.zeros_like(v) for k, v in state.items()}
            gs.Saver(dest).restore(prefix)
            os._exit(0 if all(np.array_equal(dest[k], v) for k, v in state.items()) else 5)
        except BaseException as e:
            print("child:", repr(e), file=sys.stderr)
            os._exit(6)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def test_a_forked_child_can_save_async_after_its_parent_did(tmp_path) -> None:
    """The snapshot's copy threads belong to the process that started them: a child forked after its parent's
    save_async starts its own instead of queueing work for threads that do not exist (it hung before)."""
    done = subprocess.run([sys.executable, "-c", _FORKED_SAVER, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not __import__("gpusaver.native", fromlist=["x"]).available(), reason="needs the C extension")
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 3, 4]), st.integers(0, 4))
def test_split_packing_equals_one_pack(seed: int, cpus: int, extra_kib: int) -> None:
    """The capture packs a large run of small tensors in parts on the copy threads, each at its final offset:
    the bytes and crcs are those of one pack, for runs on both sides of the split size and any CPU count."""
    from gpusaver import native
    from gpusaver.pipeline import snapshot

    if native.lib is None:
        pytest.skip("packing is the C extension's; this run has it off")
    rng = np.random.default_rng(seed)
    split = snapshot._COPY_SPLIT
    target = int(rng.choice([split - 1, split, 2 * split - 1, 2 * split, 2 * split + 1, 3 * split + 7]))
    target += extra_kib << 10
    arrays, total = [], 0
    while total < target:
        n = int(rng.integers(0, 16384))
        arrays.append(rng.integers(0, 2**31, n, dtype=np.int32))
        total += 4 * n
    starts = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([a.nbytes for a in arrays], out=starts[1:])
    a, b = int(rng.integers(0, 3)), len(arrays) - int(rng.integers(0, 3))
    one, split_out = np.zeros(total + 64, np.uint8), np.zeros(total + 64, np.uint8)
    crcs_one, crcs_split = np.zeros(len(arrays), np.uint32), np.zeros(len(arrays), np.uint32)
    n_one = native.lib.pack(arrays, a, b, memoryview(one), crcs_one)
    real = os.cpu_count
    os.cpu_count = lambda: cpus
    try:
        n_split = snapshot._pack(native.lib, arrays, a, b, split_out, crcs_split, starts)
    finally:
        os.cpu_count = real
    assert n_split == n_one == int(starts[b] - starts[a])
    assert np.array_equal(one, split_out)
    assert crcs_one.tolist() == crcs_split.tolist()
