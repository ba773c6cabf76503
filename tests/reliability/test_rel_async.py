"""Saver.save_async against a hostile, unlucky user.

* A hypothesis state machine drives one Saver (two virtual devices; tensors on both sides of
  pack_limit and of the snapshot slab; a state larger than the two-slab pool) through save,
  save_async (arrays changed the instant it returns, and a second call chained on at once),
  result()/exception() on any old or pending handle, restore of any existing checkpoint, wait,
  close, a KeyboardInterrupt in the middle of the capture, disk-full faults toggled on and off
  (data write, index rename, state file rename) and repeated or increasing global steps under
  max_to_keep=2. An oracle model says which values each checkpoint holds, which checkpoint
  latest_checkpoint() names, which call raises which error (an uncollected one raised by the next
  call, exactly once, and that call then does nothing else), which files exist; every restore is
  bit-exact. After each step, once the pending save is done: every checkpoint the state file lists
  exists and restores to the oracle's values, and the directory holds nothing else (no temp dir,
  no temp file, no orphan data file).
* Attacks: the same prefix twice in a row; ``del saver`` and gc while pending; two Savers into
  one directory at once (distinct prefixes, and the same prefix); a directory reached through a
  symlink and directly; a directory made read-only between the return and the background write;
  a progress callback that raises in the background; a KeyboardInterrupt inside the capture;
  20,000 tiny tensors through a two-slab pool; zero-size, 0-d and string tensors;
  result(timeout=0) on a held save; sys.exit(0) and an unhandled exception right after
  save_async (the save completes), os._exit(0) (not required to survive: documented below);
  a failure on one shard of a sharded multi-device save while the capture waits for the pool.

Nothing here depends on the machine's speed: every wait is on an event, with a generous hang
guard (relkit.HANG_GUARD) that a slow machine never reaches.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import gpusaver as gs
from gpusaver import config
from gpusaver.errors import CheckpointPermissionError, CheckpointWriteError, SaveTimeoutError
from gpusaver.storage.fileops import PosixFileOps

import relkit

HANG = relkit.HANG_GUARD
PACK = 512  # pack_limit here
SLAB = 4096  # snapshot slab (the smallest the pool allows)
POOL = 2 * SLAB  # snapshot_bytes: two slabs, far less than the state


@pytest.fixture(autouse=True)
def _small_thresholds():
    with config.set(pack_limit=PACK, snapshot_slab_bytes=SLAB, segment_bytes=2048):
        yield


# ------------------------------------------------------------------ values
#: name -> (device, dtype, shape, layout); layout "T": a transposed (non-contiguous) view.
SPEC: dict[str, tuple[str, str, tuple[int, ...], str]] = {
    "a/small": ("/cpu:0", "<f4", (50,), "C"),  # 200 B: packed
    "a/below_pack": ("/cpu:1", "<f2", (255,), "C"),  # 510 B: just below pack_limit
    "a/at_pack": ("/cpu:0", "|u1", (PACK,), "C"),  # exactly pack_limit: not packed
    "b/mid": ("/cpu:1", "|u1", (600,), "C"),  # between pack_limit and the slab
    "b/at_slab": ("/cpu:0", "|u1", (SLAB,), "C"),  # exactly a slab
    "c/big": ("/cpu:0", "<f8", (700,), "C"),  # 5600 B: more than a slab
    "c/huge": ("/cpu:1", "<i2", (9000,), "C"),  # 18 KB: more than the whole pool
    "d/strings": ("/cpu:0", "|O", (3,), "C"),
    "d/empty": ("/cpu:1", "<f4", (0,), "C"),
    "d/scalar": ("/cpu:0", "<i8", (), "C"),
    "e/transposed": ("/cpu:1", "<f8", (30, 20), "T"),
    "e/bigendian": ("/cpu:0", ">i4", (40,), "C"),
}


def _value(name: str, dtype: str, shape: tuple[int, ...], version: int) -> np.ndarray:
    """The value of ``name`` at ``version`` (random bit patterns, NaNs included: compared as bytes)."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if dt.kind == "O":
        return np.array([f"{name}:{version}:{i}".encode() * (i % 3) for i in range(count)], dtype=object).reshape(shape)
    seed = (sum((i + 1) * b for i, b in enumerate(name.encode())) * 1_000_003 + version) % (1 << 32)
    raw = np.random.default_rng(seed).integers(0, 256, count * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape).copy()


def _empty_arrays(spec: dict[str, tuple[str, str, tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    out = {}
    for name, (_, dtype, shape, layout) in spec.items():
        dt = np.dtype(dtype)
        if dt.kind == "O":
            out[name] = np.array([b""] * int(np.prod(shape, dtype=np.int64)), dtype=object).reshape(shape)
        elif layout == "T":
            out[name] = np.zeros(shape[::-1], dt).T
        else:
            out[name] = np.zeros(shape, dt)
    return out


def _variables(arrays: dict[str, np.ndarray], spec: dict[str, tuple[str, str, tuple[int, ...], str]]) -> list[Any]:
    return [gs.Variable(arrays[n], n, spec[n][0]) for n in spec]


def _same(want: np.ndarray, got: np.ndarray) -> bool:
    """Bit-exact: the same shape and, in the wanted dtype (any byte order), the same bytes."""
    want, got = np.asarray(want), np.asarray(got)
    if want.shape != got.shape:
        return False
    if want.dtype.kind == "O" or got.dtype.kind == "O":
        return want.dtype.kind == got.dtype.kind and want.reshape(-1).tolist() == got.reshape(-1).tolist()
    native = want.dtype.newbyteorder("=")
    if got.dtype.newbyteorder("=") != native:
        return False
    return np.ascontiguousarray(want, native).tobytes() == np.ascontiguousarray(got, native).tobytes()


def _files(prefix: str) -> dict[str, bytes]:
    directory, base = os.path.split(prefix)
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.startswith(base + ".") and not os.path.isdir(os.path.join(directory, f)):
            with open(os.path.join(directory, f), "rb") as fh:
                out[f[len(base):]] = fh.read()
    return out


def _stored(prefix: str) -> dict[str, np.ndarray]:
    reader = gs.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}


def _assert_holds(prefix: str, want: dict[str, np.ndarray]) -> None:
    stored = _stored(prefix)
    assert sorted(stored) == sorted(want), prefix
    bad = [n for n in want if not _same(want[n], stored[n])]
    assert not bad, f"{prefix} holds other values in {bad}"


def _sync_files(spec: dict[str, tuple[str, str, tuple[int, ...], str]], want: dict[str, np.ndarray],
                directory: str, **kwargs: Any) -> dict[str, bytes]:
    """The files a synchronous save() of ``want`` writes (same layout, same devices)."""
    arrays = _empty_arrays(spec)
    for n, arr in arrays.items():
        arr[...] = want[n]
    os.makedirs(directory, exist_ok=True)
    prefix = gs.Saver(_variables(arrays, spec), **kwargs).save(os.path.join(directory, "ref"), write_state=False)
    return _files(prefix)


def _leftovers(directory: str) -> dict[str, list[str]]:
    return {k: v for k, v in relkit.debris(directory).items() if v}


# ------------------------------------------------------------------ fault injection
class FaultOps(PosixFileOps):
    """Disk full, when armed: ``pwrite`` (a data write), ``commit`` (the rename onto ``*.index``) or
    ``state`` (the rename onto the state file). ``gate``: a phase at which the background waits."""

    def __init__(self) -> None:
        self.fault: str | None = None
        self.fired = 0
        self.gate: str | None = None
        self.reached = threading.Event()
        self.release = threading.Event()
        self.phases: list[str] = []

    def _full(self) -> None:
        self.fired += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    def pwrite(self, fd: int, buffers: Any, offset: int) -> None:
        if self.fault == "pwrite":
            self._full()
        super().pwrite(fd, buffers, offset)

    def rename(self, src: str, dst: str) -> None:
        if (self.fault == "commit" and dst.endswith(".index")) or (
            self.fault == "state" and os.path.basename(dst) == "checkpoint"
        ):
            self._full()
        super().rename(src, dst)

    def phase(self, name: str) -> None:
        self.phases.append(name)
        if self.gate is not None and name == self.gate:
            self.reached.set()
            assert self.release.wait(HANG), "the test never released the gate"


def _is_disk_full(e: BaseException) -> bool:
    return isinstance(e, CheckpointWriteError) and e.errno == errno.ENOSPC


# ================================================================== (a) the state machine
class _Rec:
    """The model of one save_async: its handle, prefix, the values it must hold, its fate."""

    def __init__(self, seq: int, handle: Any, prefix: str, values: dict[str, np.ndarray], fails: bool,
                 collected: bool = False, error_type: type | None = None) -> None:
        self.seq = seq
        self.handle = handle
        self.prefix = prefix
        self.values = values
        self.fails = fails
        self.collected = collected
        self.error_type = error_type  # what result() raises (None: the prefix is returned)


class AsyncSaverMachine(RuleBasedStateMachine):
    """One Saver, its directory and an oracle of what must be on disk and what each call must do."""

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="gpusaver-relasync-")
        self.dir = os.path.join(self.root, "ck")
        os.mkdir(self.dir)
        self.arrays = _empty_arrays(SPEC)
        self.ops = FaultOps()
        self.saver = gs.Saver(_variables(self.arrays, SPEC), max_to_keep=2, fileops=self.ops, snapshot_bytes=POOL)
        # the model
        self.current: dict[str, np.ndarray] = {}
        self.version = 0
        self.kept: list[str] = []  # the state file's list (= every checkpoint on disk), oldest first
        self.holds: dict[str, dict[str, np.ndarray]] = {}  # prefix -> values
        self.latest: str | None = None
        self.recs: list[_Rec] = []
        self.pending: _Rec | None = None  # the Saver's pending save (settled by its next call)
        self.committed_seq: dict[str, int] = {}  # prefix -> seq of the save that made latest
        self.seq = 0
        self._mutate(0)

    def teardown(self) -> None:
        try:
            for rec in self.recs:
                assert rec.handle.wait(HANG), "a save never finished"
        finally:
            self.ops.fault = None
            try:
                self.saver.close()
            except CheckpointWriteError:
                pass
            shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------- helpers
    def _mutate(self, version: int) -> None:
        self.version = version
        for name, (_, dtype, shape, _layout) in SPEC.items():
            self.arrays[name][...] = _value(name, dtype, shape, version)
        self.current = {n: np.array(a, copy=True) for n, a in self.arrays.items()}

    def _check_current(self) -> None:
        bad = [n for n in SPEC if not _same(self.current[n], self.arrays[n])]
        assert not bad, f"the arrays differ from the model in {bad}"

    def _settle_expectation(self) -> _Rec | None:
        """What the Saver's next call must raise first (the pending error nobody collected), or None."""
        pending, self.pending = self.pending, None
        if pending is not None and pending.fails and not pending.collected:
            pending.collected = True
            return pending
        return None

    def _call(self, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Runs a Saver call; (False, None) when it raised the pending uncollected error, as it must."""
        owed = self._settle_expectation()
        if owed is not None:
            with pytest.raises(BaseException) as info:
                fn()
            assert info.value is owed.handle._error, f"expected the pending error, got {info.value!r}"
            return False, None
        return True, fn()

    def _record_success(self, prefix: str, values: dict[str, np.ndarray], seq: int) -> None:
        self.holds[prefix] = values
        if prefix in self.kept:
            self.kept.remove(prefix)
        self.kept.append(prefix)
        if len(self.kept) > 2:
            del self.holds[self.kept.pop(0)]
        self.latest = prefix
        self.committed_seq[prefix] = seq

    def _prefix(self, step: int) -> str:
        return os.path.join(self.dir, "m-%d" % step)

    def _step_for(self, step: int) -> int:
        """A step to save: commit and state faults replace no existing checkpoint (a failed replacement
        loses the old one, as a synchronous save does; that is not what this machine checks)."""
        if self.ops.fault in ("commit", "state"):
            while self._prefix(step) in self.holds:
                step += 1
        return step

    def _start_async(self, step: int) -> _Rec | None:
        step = self._step_for(step)
        prefix = self._prefix(step)
        values = {n: np.array(a, copy=True) for n, a in self.arrays.items()}
        fails = self.ops.fault is not None
        ok, handle = self._call(lambda: self.saver.save_async(os.path.join(self.dir, "m"), global_step=step))
        if not ok:
            return None
        self.seq += 1
        rec = _Rec(self.seq, handle, prefix, values, fails, error_type=CheckpointWriteError if fails else None)
        assert handle.prefix == prefix
        self.recs.append(rec)
        self.pending = rec
        if not fails:
            self._record_success(prefix, values, rec.seq)
        return rec

    def _sync_save(self, step: int) -> None:
        step = self._step_for(step)
        prefix = self._prefix(step)
        values = {n: np.array(a, copy=True) for n, a in self.arrays.items()}
        owed = self._settle_expectation()
        if owed is not None:
            with pytest.raises(BaseException) as info:
                self.saver.save(os.path.join(self.dir, "m"), global_step=step)
            assert info.value is owed.handle._error
            return
        if self.ops.fault is not None:
            with pytest.raises(CheckpointWriteError) as info:
                self.saver.save(os.path.join(self.dir, "m"), global_step=step)
            assert _is_disk_full(info.value)
            return
        assert self.saver.save(os.path.join(self.dir, "m"), global_step=step) == prefix
        self.seq += 1
        self._record_success(prefix, values, self.seq)
        assert gs.latest_checkpoint(self.dir) == prefix  # a sync save is recorded when it returns

    def _restore(self, index: int) -> None:
        if not self.kept:
            return
        prefix = self.kept[index % len(self.kept)]
        ok, _ = self._call(lambda: self.saver.restore(prefix))
        if ok:
            self.current = {n: np.array(v, copy=True) for n, v in self.holds[prefix].items()}
        self._check_current()

    def _collect(self, rec: _Rec, how: str) -> None:
        if how == "exception":
            e = rec.handle.exception(timeout=HANG)
            if rec.error_type is None:
                assert e is None, e
            else:
                assert isinstance(e, rec.error_type), e
                rec.collected = True
            return
        if rec.error_type is None:
            assert rec.handle.result(timeout=HANG) == rec.prefix
            # never behind a result() that returned: this save, or one made after it
            latest = gs.latest_checkpoint(self.dir)
            assert latest in self.committed_seq and self.committed_seq[latest] >= rec.seq or latest == rec.prefix, (
                f"latest_checkpoint() is {latest} after result() returned {rec.prefix}"
            )
        else:
            with pytest.raises(rec.error_type) as info:
                rec.handle.result(timeout=HANG)
            if rec.error_type is CheckpointWriteError:
                assert _is_disk_full(info.value)
            rec.collected = True
        assert rec.handle.done()

    # ---------------------------------------------------------------- rules
    @rule(step=st.integers(0, 5), mutate=st.booleans(), version=st.integers(1, 1 << 20))
    def save_async(self, step: int, mutate: bool, version: int) -> None:
        rec = self._start_async(step)
        if mutate:  # the instant it returns
            self._mutate(version)
        if rec is not None:
            assert rec.values is not None

    @rule(
        step=st.integers(0, 5),
        version=st.integers(1, 1 << 20),
        then=st.sampled_from(["save_async", "save", "restore", "wait", "result", "timeout0", "done", "close"]),
        step2=st.integers(0, 5),
        index=st.integers(0, 3),
    )
    def save_async_then(self, step: int, version: int, then: str, step2: int, index: int) -> None:
        """save_async, change every array at once, then another call straight away (the save is
        most likely still pending: the next call must wait for it, whatever the timing)."""
        rec = self._start_async(step)
        self._mutate(version)
        if then == "save_async":
            self._start_async(step2)
        elif then == "save":
            self._sync_save(step2)
        elif then == "restore":
            self._restore(index)
        elif then == "wait":
            self._call(self.saver.wait)
        elif then == "close":
            self._call(self.saver.close)
        elif rec is not None and then == "result":
            self._collect(rec, "result")
        elif rec is not None and then == "timeout0":
            try:
                got = rec.handle.result(timeout=0)
            except SaveTimeoutError as e:
                assert isinstance(e, TimeoutError)  # not finished yet: nothing collected, the save goes on
            except CheckpointWriteError as e:
                assert rec.fails and _is_disk_full(e)
                rec.collected = True
            else:
                assert not rec.fails and got == rec.prefix
        elif rec is not None and then == "done":
            rec.handle.done()  # either answer; it must not block nor collect

    @rule(step=st.integers(0, 5))
    def save(self, step: int) -> None:
        self._sync_save(step)

    @precondition(lambda self: bool(self.recs))
    @rule(which=st.integers(0, 1 << 16), how=st.sampled_from(["result", "exception"]), newest=st.booleans())
    def collect(self, which: int, how: str, newest: bool) -> None:
        rec = self.recs[-1] if newest else self.recs[which % len(self.recs)]
        self._collect(rec, how)

    @rule(index=st.integers(0, 3))
    def restore(self, index: int) -> None:
        self._restore(index)

    @rule(version=st.integers(1, 1 << 20))
    def mutate(self, version: int) -> None:
        self._mutate(version)

    @rule()
    def wait(self) -> None:
        self._call(self.saver.wait)

    @rule()
    def close(self) -> None:
        self._call(self.saver.close)

    @rule(fault=st.sampled_from([None, "pwrite", "commit", "state"]))
    def toggle_fault(self, fault: str | None) -> None:
        if self.pending is not None:  # the pending save keeps the fate it was given (wait() does not collect)
            assert self.pending.handle.wait(HANG)
        self.ops.fault = fault

    @rule(step=st.integers(0, 5), version=st.integers(1, 1 << 20))
    def interrupted_capture(self, step: int, version: int) -> None:
        """A KeyboardInterrupt half way through the capture: save_async raises it, nothing is committed."""
        from gpusaver.backends.numpy_backend import NumpyBackend

        owed = self._settle_expectation()
        if owed is not None:
            with pytest.raises(BaseException) as info:
                self.saver.save_async(os.path.join(self.dir, "m"), global_step=step)
            assert info.value is owed.handle._error
            return
        real = NumpyBackend.save_group

        def interrupted(backend: Any, tensors: Any, writer: Any) -> None:
            listed = list(tensors)
            real(backend, listed[: len(listed) // 2], writer)
            raise KeyboardInterrupt("Ctrl-C while capturing")

        NumpyBackend.save_group = interrupted  # type: ignore[method-assign]
        try:
            with pytest.raises(KeyboardInterrupt):
                self.saver.save_async(os.path.join(self.dir, "m"), global_step=step)
        finally:
            NumpyBackend.save_group = real  # type: ignore[method-assign]
        self._mutate(version)
        # raised once, by save_async: the next call raises nothing (self.pending stays None)

    # ---------------------------------------------------------------- invariants
    @invariant()
    def disk_matches_the_oracle(self) -> None:
        if self.pending is not None:
            assert self.pending.handle.wait(HANG), "the pending save never finished"
        self._check_current()
        pool = self.saver._pool
        assert pool is None or pool.allocated_bytes <= max(POOL, 2 * SLAB)
        state = gs.get_checkpoint_state(self.dir)
        if not self.kept:
            assert state is None or not state.all_model_checkpoint_paths, state
            assert gs.latest_checkpoint(self.dir) is None
        else:
            assert state is not None
            assert list(state.all_model_checkpoint_paths) == self.kept
            assert state.model_checkpoint_path == self.latest
            assert gs.latest_checkpoint(self.dir) == self.latest
            for prefix in state.all_model_checkpoint_paths:
                _assert_holds(prefix, self.holds[prefix])
        want = {"checkpoint"} if os.path.exists(os.path.join(self.dir, "checkpoint")) else set()
        for prefix in self.kept:
            base = os.path.basename(prefix)
            want |= {base + ".index", base + ".data-00000-of-00001"}
        assert sorted(os.listdir(self.dir)) == sorted(want), _leftovers(self.dir)

    @rule(index=st.integers(0, 3))
    def files_equal_a_sync_save(self, index: int) -> None:
        """A committed async checkpoint's files are byte for byte those save() writes for its values."""
        if self.pending is not None:
            assert self.pending.handle.wait(HANG)
        if not self.kept:
            return
        prefix = self.kept[index % len(self.kept)]
        ref = _sync_files(SPEC, self.holds[prefix], os.path.join(self.root, "ref"))
        assert ref == _files(prefix)


@pytest.mark.usefixtures("host_path")
def test_state_machine() -> None:
    run_state_machine_as_test(
        AsyncSaverMachine,
        settings=settings(max_examples=20, stateful_step_count=40, deadline=None, database=None),
    )


# ================================================================== (b) attacks
def _state(n: int = 3, size: int = 3000, salt: int = 0) -> dict[str, np.ndarray]:
    return {f"v{i}": np.arange(size, dtype=np.float64) * (i + 1) + salt for i in range(n)}


def _copy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in state.items()}


def _only_checkpoints(directory: str, *prefixes: str, state: bool = True, shards: int = 1) -> None:
    """``directory`` holds exactly these checkpoints (``shards`` data files each) and the state file."""
    want = {"checkpoint"} if state else set()
    for p in prefixes:
        want |= {os.path.basename(p) + ".index"}
        want |= {os.path.basename(p) + ".data-%05d-of-%05d" % (k, shards) for k in range(shards)}
    assert sorted(os.listdir(directory)) == sorted(want), _leftovers(directory)


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_the_same_prefix_twice_in_a_row_the_second_waits_for_the_first(tmp_path_factory) -> None:
    tmp_path = tmp_path_factory.mktemp("twice")
    state = _state()
    ops = FaultOps()
    saver = gs.Saver(state, fileops=ops, snapshot_bytes=POOL)
    first = _copy(state)
    ops.gate = "merge:before_index_rename"
    h1 = saver.save_async(str(tmp_path / "m"))
    assert ops.reached.wait(HANG)
    for v in state.values():
        v += 100
    second = _copy(state)
    ops.gate = None
    t, box = _in_thread(lambda: saver.save_async(str(tmp_path / "m")))
    t.join(0.2)
    assert t.is_alive() and not h1.done()  # held behind the first, however fast the machine
    assert ops.phases.count("save:start") == 1
    ops.release.set()
    t.join(HANG)
    assert not t.is_alive() and "error" not in box, box
    h2 = box["value"]
    for v in state.values():
        v[...] = -1  # the instant the second returns
    assert h1.result(HANG) == h2.result(HANG) == str(tmp_path / "m")
    assert ops.phases.index("save:start", 1) > ops.phases.index("state:written")  # strictly after the first
    _assert_holds(str(tmp_path / "m"), second)
    assert _files(str(tmp_path / "m")) == _sync_files({k: ("/cpu:0", "<f8", v.shape, "C") for k, v in second.items()},
                                                      second, str(tmp_path_factory.mktemp("ref")))
    assert list(gs.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths) == [str(tmp_path / "m")]
    _only_checkpoints(str(tmp_path), str(tmp_path / "m"))
    del first


def test_del_saver_and_gc_while_pending_the_save_still_completes(tmp_path) -> None:
    state = _state(size=20_000)
    want = _copy(state)
    ops = FaultOps()
    ops.gate = "save:start"  # the background waits there: the pool must hold the whole state
    saver = gs.Saver(state, fileops=ops, snapshot_bytes=1 << 22)
    handle = saver.save_async(str(tmp_path / "m"), global_step=7)
    del saver
    gc.collect()
    for v in state.values():
        v[...] = 0
    ops.release.set()
    assert handle.result(HANG) == str(tmp_path / "m-7")
    gc.collect()
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-7")
    _assert_holds(str(tmp_path / "m-7"), want)
    _only_checkpoints(str(tmp_path), str(tmp_path / "m-7"))


def test_del_saver_without_keeping_the_handle_in_a_process_then_exit(tmp_path) -> None:
    """Nobody keeps the Saver nor the handle; gc runs; the interpreter exits: the save is there."""
    code = textwrap.dedent(
        """
        import gc, os, sys, numpy as np, gpusaver as gs
        d = sys.argv[1]
        w = np.arange(400_000, dtype=np.float64)
        gs.Saver({"w": w}, snapshot_bytes=1 << 16).save_async(os.path.join(d, "m"), global_step=1)
        gc.collect()
        w[...] = -1
        print("returned", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0 and "returned" in done.stdout, done.stderr
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-1")
    _assert_holds(str(tmp_path / "m-1"), {"w": np.arange(400_000, dtype=np.float64)})
    _only_checkpoints(str(tmp_path), str(tmp_path / "m-1"))


class _BarrierOps(PosixFileOps):
    """Both savers' background saves meet at ``phase`` (so they overlap, on any machine)."""

    def __init__(self, barrier: threading.Barrier, phase: str) -> None:
        self.barrier = barrier
        self.at = phase

    def phase(self, name: str) -> None:
        if name == self.at:
            self.barrier.wait(HANG)


@pytest.mark.parametrize("phase", ["save:start", "merge:start"])
def test_two_savers_into_one_directory_at_once(tmp_path, phase) -> None:
    barrier = threading.Barrier(2)
    a, b = _state(salt=1), _state(salt=2)
    want_a, want_b = _copy(a), _copy(b)
    # (pools that hold the state: each capture must return while its background waits for the other)
    sa = gs.Saver(a, fileops=_BarrierOps(barrier, phase), snapshot_bytes=1 << 22, max_to_keep=2)
    sb = gs.Saver(b, fileops=_BarrierOps(barrier, phase), snapshot_bytes=1 << 22, max_to_keep=2)
    ha = sa.save_async(str(tmp_path / "a"), global_step=1)
    hb = sb.save_async(str(tmp_path / "b"), global_step=1)
    for v in list(a.values()) + list(b.values()):
        v[...] = 0
    assert ha.result(HANG) == str(tmp_path / "a-1") and hb.result(HANG) == str(tmp_path / "b-1")
    _assert_holds(ha.prefix, want_a)
    _assert_holds(hb.prefix, want_b)
    # one state file, last writer wins; it never names a checkpoint that is not there
    assert gs.latest_checkpoint(str(tmp_path)) in (ha.prefix, hb.prefix)
    _only_checkpoints(str(tmp_path), ha.prefix, hb.prefix)
    # and both savers go on (each one's retention only ever touches its own checkpoints)
    for step in (2, 3, 4):
        ha = sa.save_async(str(tmp_path / "a"), global_step=step)
        hb = sb.save_async(str(tmp_path / "b"), global_step=step)
    sa.wait()
    sb.wait()
    _only_checkpoints(str(tmp_path), *[str(tmp_path / f"{p}-{s}") for p in "ab" for s in (3, 4)])


class _OrderOps(PosixFileOps):
    """Signals ``events[signal_at]`` at phase ``signal_at`` and waits for ``events[wait_at]`` at ``wait_at``."""

    def __init__(self, events: dict[str, threading.Event], wait_at: str, wait_for: str, signal_at: str) -> None:
        self.events, self.wait_at, self.wait_for, self.signal_at = events, wait_at, wait_for, signal_at

    def phase(self, name: str) -> None:
        if name == self.signal_at:
            self.events[self.signal_at].set()
        if name == self.wait_at:
            assert self.events[self.wait_for].wait(HANG), "the other saver never got there"


def test_two_savers_into_the_same_prefix_at_once_never_mix(tmp_path) -> None:
    """A has renamed its data file in when B starts its commit: B's commit waits for A's (the
    directory's commit lock), so the last to commit wins whole: never one's index over the other's data."""
    order: list[str] = []
    lock = threading.Lock()
    b_started = threading.Event()

    class Ops(PosixFileOps):
        def __init__(self, who: str) -> None:
            self.who = who

        def phase(self, name: str) -> None:
            with lock:
                order.append(f"{self.who}:{name}")
            if self.who == "B" and name == "merge:start":
                b_started.set()
            if self.who == "A" and name == "merge:data_renamed:0":
                assert b_started.wait(HANG), "B never started its commit"

    a, b = _state(salt=1), _state(salt=2)
    want_a, want_b = _copy(a), _copy(b)
    sa = gs.Saver(a, fileops=Ops("A"), snapshot_bytes=1 << 22)
    sb = gs.Saver(b, fileops=Ops("B"), snapshot_bytes=1 << 22)
    ha = sa.save_async(str(tmp_path / "m"))
    orig = Ops.phase

    def b_waits_for_a(self, name):  # B starts its commit only once A is inside its own
        if self.who == "B" and name == "merge:start":
            deadline = time.monotonic() + HANG  # a hang guard only
            while "A:merge:locked" not in order:
                assert time.monotonic() < deadline, "A never took the commit lock"
                threading.Event().wait(0.01)
        orig(self, name)

    Ops.phase = b_waits_for_a  # type: ignore[method-assign]
    hb = sb.save_async(str(tmp_path / "m"))
    assert ha.result(HANG) == hb.result(HANG) == str(tmp_path / "m")
    # B took the lock only after A's commit ended
    assert order.index("B:merge:locked") > order.index("A:merge:index_renamed"), order
    stored = _stored(str(tmp_path / "m"))
    assert all(_same(want_b[n], stored[n]) for n in want_b)
    assert not all(_same(want_a[n], stored[n]) for n in want_a)
    _only_checkpoints(str(tmp_path), str(tmp_path / "m"))


def test_a_symlinked_directory_spelled_two_ways_is_one_directory(tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    state = _state()
    saver = gs.Saver(state, max_to_keep=2, snapshot_bytes=POOL)
    values = {}
    spellings = [(real, 1), (link, 1), (link, 2), (real, 2), (real, 3), (link, 4)]
    for k, (d, step) in enumerate(spellings):
        for v in state.values():
            v[...] = k
        values[step] = _copy(state)
        handle = saver.save_async(str(d / "m"), global_step=step)
        for v in state.values():
            v[...] = -1  # the instant it returns
        assert handle.result(HANG) == str(d / f"m-{step}")
        # the checkpoint just saved is never deleted, whatever spelling retention compares
        _assert_holds(str(real / f"m-{step}"), values[step])
        _assert_holds(str(link / f"m-{step}"), values[step])
        assert gs.latest_checkpoint(str(real)) == str(d / f"m-{step}")
    kept = [os.path.basename(p) for p in gs.get_checkpoint_state(str(real)).all_model_checkpoint_paths]
    assert kept == ["m-3", "m-4"]
    _only_checkpoints(str(real), str(real / "m-3"), str(real / "m-4"))


_READONLY_CHILD = textwrap.dedent(
    """
    import errno, json, os, sys, threading
    import numpy as np, gpusaver as gs
    from gpusaver.storage.fileops import PosixFileOps
    d = sys.argv[1]
    if os.geteuid() == 0:  # root ignores permission bits: drop to nobody, once everything is imported
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    class Gate(PosixFileOps):
        gate = None
        reached = threading.Event()
        release = threading.Event()
        def phase(self, name):
            if name == self.gate:
                self.reached.set()
                assert self.release.wait(300)
    ops = Gate()
    w = np.arange(5000, dtype=np.float64)
    saver = gs.Saver({"w": w}, fileops=ops, snapshot_bytes=1 << 20)
    saver.save(os.path.join(d, "m"), global_step=0)
    before = sorted(os.listdir(d))
    ops.gate = "save:start"
    handle = saver.save_async(os.path.join(d, "m"), global_step=1)  # checked writable: it is, still
    w[...] = -1
    assert ops.reached.wait(300)
    os.chmod(d, 0o555)  # between the return and the background write
    ops.release.set()
    out = {}
    try:
        handle.result(300)
        out["result"] = None
    except Exception as e:
        out["result"] = [type(e).__name__, isinstance(e, gs.CheckpointWriteError), getattr(e, "errno", None)]
    try:
        saver.wait()
        out["next_call"] = None
    except Exception as e:
        out["next_call"] = repr(e)
    out["latest"] = gs.latest_checkpoint(d)
    out["same_files"] = sorted(os.listdir(d)) == before
    os.chmod(d, 0o755)
    out["after"] = saver.save_async(os.path.join(d, "m"), global_step=2).result(300)
    print(json.dumps(out))
    """
)


def test_a_directory_made_read_only_between_the_return_and_the_write(tmp_path) -> None:
    base = tempfile.mkdtemp(prefix="gpusaver-relasync-perm-")  # pytest's tmp_path is not for others to enter
    try:
        os.chmod(base, 0o755)
        directory = os.path.join(base, "ck")
        os.mkdir(directory)
        if os.geteuid() == 0:
            os.chown(directory, 65534, 65534)
        done = subprocess.run([sys.executable, "-c", _READONLY_CHILD, directory], capture_output=True, text=True,
                              timeout=HANG)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["result"] is not None, "the save into a read-only directory succeeded"
        kind, is_write_error, err = out["result"]
        assert kind in ("CheckpointPermissionError", "CheckpointWriteError") and is_write_error, out
        if kind == "CheckpointPermissionError":
            assert err in (errno.EACCES, errno.EPERM, errno.EROFS)
        assert out["next_call"] is None  # collected by result(): not raised again
        assert out["latest"] == os.path.join(directory, "m-0") and out["same_files"], out
        assert out["after"] == os.path.join(directory, "m-2")
        assert gs.latest_checkpoint(directory) == os.path.join(directory, "m-2")
        _assert_holds(os.path.join(directory, "m-2"), {"w": np.full(5000, -1.0)})
        _only_checkpoints(directory, os.path.join(directory, "m-0"), os.path.join(directory, "m-2"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("when", ["first", "last"])
def test_a_progress_callback_that_raises_in_the_background(tmp_path, when) -> None:
    state = _state(size=20_000)
    saver = gs.Saver(state, snapshot_bytes=POOL)
    saver.save(str(tmp_path / "m"), global_step=0)
    calls: list[tuple[int, int, str]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total, threading.current_thread().name))
        if when == "first" or done == total:
            raise ValueError(f"progress callback failed at {done}/{total}")

    handle = saver.save_async(str(tmp_path / "m"), global_step=1, progress=progress)
    for v in state.values():
        v[...] = 0
    with pytest.raises(ValueError, match="progress callback failed"):
        handle.result(HANG)
    assert calls and all(name != threading.main_thread().name for *_, name in calls)
    saver.wait()  # collected: not raised again
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-0")
    _only_checkpoints(str(tmp_path), str(tmp_path / "m-0"))
    assert saver.save_async(str(tmp_path / "m"), global_step=2).result(HANG) == str(tmp_path / "m-2")


@pytest.mark.parametrize("sharded", [False, True])
def test_keyboard_interrupt_inside_the_capture(tmp_path, monkeypatch, sharded) -> None:
    from gpusaver.backends.numpy_backend import NumpyBackend

    arrays = {f"v{i}": np.arange(3000, dtype=np.float64) + i for i in range(6)}  # 144 KB: 18 pools
    variables = [gs.Variable(a, n, f"/cpu:{i % 2}") for i, (n, a) in enumerate(arrays.items())]
    saver = gs.Saver(variables, sharded=sharded, snapshot_bytes=POOL)
    saver.save(str(tmp_path / "m"), global_step=0)
    real = NumpyBackend.save_group
    calls = []

    def interrupted(self, tensors, writer):  # some bytes captured (and written), then Ctrl-C
        calls.append(1)
        listed = list(tensors)
        real(self, listed[: len(listed) - 1], writer)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(NumpyBackend, "save_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saver.save_async(str(tmp_path / "m"), global_step=1)
    monkeypatch.setattr(NumpyBackend, "save_group", real)
    saver.wait()  # raised once, by save_async
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-0")
    shards = 2 if sharded else 1
    _only_checkpoints(str(tmp_path), str(tmp_path / "m-0"), shards=shards)
    # the Saver still works, and writes what save() writes
    want = _copy(arrays)
    handle = saver.save_async(str(tmp_path / "m"), global_step=2)
    for a in arrays.values():
        a[...] = -3
    assert handle.result(HANG) == str(tmp_path / "m-2")
    _assert_holds(handle.prefix, want)
    spec = {n: (f"/cpu:{i % 2}", "<f8", (3000,), "C") for i, n in enumerate(arrays)}
    assert _files(handle.prefix) == _sync_files(spec, want, str(tmp_path / "ref"), sharded=sharded)
    shutil.rmtree(tmp_path / "ref")
    _only_checkpoints(str(tmp_path), str(tmp_path / "m-0"), str(tmp_path / "m-2"), shards=shards)


def test_twenty_thousand_tiny_tensors_through_two_small_slabs(tmp_path_factory) -> None:
    d = str(tmp_path_factory.mktemp("tiny"))
    rng = np.random.default_rng(5)
    arrays = {f"layer{i // 100}/t{i:05d}": rng.standard_normal(1 + i % 9).astype(np.float32) for i in range(20_000)}
    want = _copy(arrays)
    saver = gs.Saver(arrays, snapshot_bytes=2 * SLAB)
    handle = saver.save_async(os.path.join(d, "m"))
    for a in arrays.values():
        a[...] = 0
    assert handle.result(HANG) == os.path.join(d, "m")
    assert saver._pool.allocated_bytes <= 2 * SLAB
    stored = _stored(handle.prefix)
    assert len(stored) == 20_000 and all(_same(want[n], stored[n]) for n in want)
    ref = str(tmp_path_factory.mktemp("tiny_ref"))
    for n, a in arrays.items():
        a[...] = want[n]
    assert _files(gs.Saver(arrays).save(os.path.join(ref, "m"), write_state=False)) == _files(handle.prefix)


def test_zero_size_zero_d_and_string_tensors(tmp_path_factory) -> None:
    d = str(tmp_path_factory.mktemp("odd"))
    arrays = {
        "empty": np.zeros(0, np.float32),
        "empty2d": np.zeros((0, 5), np.int64),
        "empty_strings": np.array([], dtype=object),
        "scalar": np.array(3.5),
        "scalar_string": np.array(b"one", dtype=object),
        "bytes": np.array([b"", b"a", b"\x00\xff" * 3000, b"z" * 9000], dtype=object),  # one bigger than the pool
        "text": np.array([["h\u00e9llo", ""], ["\u2603", "x" * 700]], dtype=object),
        "bool0d": np.array(True),
        "many_empty": np.zeros((3, 0, 4), np.float16),
    }
    want = _copy(arrays)
    saver = gs.Saver(arrays, snapshot_bytes=POOL)
    handle = saver.save_async(os.path.join(d, "m"))
    for n, a in arrays.items():  # the instant it returns
        if a.dtype == object:
            a[...] = b"changed"
        elif a.size:
            a[...] = 0
    assert handle.result(HANG) == os.path.join(d, "m")
    ref = str(tmp_path_factory.mktemp("odd_ref"))
    for n, a in arrays.items():
        a[...] = want[n]
    assert _files(gs.Saver(arrays).save(os.path.join(ref, "m"), write_state=False)) == _files(handle.prefix)
    for a in arrays.values():
        if a.dtype == object:
            a[...] = b"?"
    saver.restore(handle.prefix)
    stored = {n: np.asarray(a) for n, a in arrays.items()}
    # strings come back as bytes (TensorFlow's tf.string): text as its UTF-8
    encode = np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])
    for n in want:
        w = encode(want[n]) if want[n].dtype == object and want[n].size else want[n]
        assert _same(w, stored[n]), n


def test_result_timeout_zero_on_a_held_save_then_it_completes(tmp_path) -> None:
    state = _state()
    ops = FaultOps()
    ops.gate = "merge:index_written"
    saver = gs.Saver(state, fileops=ops, snapshot_bytes=1 << 22)
    handle = saver.save_async(str(tmp_path / "m"), global_step=3)
    want = _copy(state)
    assert ops.reached.wait(HANG)
    for timeout in (0, 0.0, 1e-9, 0.01):
        with pytest.raises(gs.SaveTimeoutError) as info:
            handle.result(timeout=timeout)
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, gs.GpuSaverError)
        with pytest.raises(TimeoutError):
            handle.exception(timeout=timeout)
    assert not handle.wait(0) and not handle.done() and "pending" in repr(handle)
    assert gs.latest_checkpoint(str(tmp_path)) is None  # not committed yet
    ops.release.set()
    assert handle.result(HANG) == str(tmp_path / "m-3")
    assert handle.exception(0) is None and handle.done()
    saver.wait()  # the timeouts collected nothing and left nothing to raise
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-3")
    _assert_holds(handle.prefix, want)
    _only_checkpoints(str(tmp_path), handle.prefix)


# ------------------------------------------------------------------ the interpreter's end
_EXIT_CHILD = textwrap.dedent(
    """
    import os, sys, threading, numpy as np, gpusaver as gs
    from gpusaver.storage.fileops import PosixFileOps
    d, how = sys.argv[1], sys.argv[2]
    w = np.arange(300_000, dtype=np.float64)  # 2.4 MB through a 64 KiB pool: captured in pieces
    class Held(PosixFileOps):
        armed = False
        def phase(self, name):
            if self.armed and how == "os._exit held" and name == "merge:before_index_rename":
                open(os.path.join(d, "held"), "w").close()
                threading.Event().wait()  # until the process ends
    ops = Held()
    saver = gs.Saver({"w": w}, fileops=ops, snapshot_bytes=1 << 16)
    saver.save(os.path.join(d, "m"), global_step=1)
    w += 1
    ops.armed = True

    def save():
        saver.save_async(os.path.join(d, "m"), global_step=2)
        w[...] = -1  # after the return: must not reach the checkpoint

    if how == "thread":  # from a thread that ends at once; the main thread returns
        t = threading.Thread(target=save)
        t.start()
        t.join()
    else:
        save()
    print("returned", flush=True)
    if how == "sys.exit":
        sys.exit(0)
    if how == "raise":
        raise RuntimeError("the training loop crashed right after save_async")
    if how.startswith("os._exit"):
        if how == "os._exit held":
            while not os.path.exists(os.path.join(d, "held")):
                threading.Event().wait(0.001)
        os._exit(0)
    """
)


def _run_child(directory: str, how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _EXIT_CHILD, directory, how], capture_output=True, text=True,
                          timeout=HANG)


@pytest.mark.parametrize("how", ["sys.exit", "raise", "thread"])
def test_the_interpreter_end_waits_for_the_save(tmp_path, how) -> None:
    done = _run_child(str(tmp_path), how)
    assert "returned" in done.stdout, done.stderr
    assert done.returncode == (1 if how == "raise" else 0), done.stderr
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-2")
    _assert_holds(str(tmp_path / "m-2"), {"w": np.arange(300_000, dtype=np.float64) + 1})
    _only_checkpoints(str(tmp_path), str(tmp_path / "m-1"), str(tmp_path / "m-2"))


@pytest.mark.parametrize("how", ["os._exit held", "os._exit"])
def test_os_exit_after_save_async_loses_that_save_at_most(tmp_path, how) -> None:
    """os._exit skips the interpreter's end: the pending save is NOT required to survive (as a
    kill -9). What must hold: the previous checkpoint is whole, latest_checkpoint() names a whole
    checkpoint (the new one only if it was recorded), and the next save cleans the debris up.
    ``held``: the background is held before its commit, so the save is lost for certain."""
    done = _run_child(str(tmp_path), how)
    assert done.returncode == 0 and "returned" in done.stdout, done.stderr
    if how == "os._exit held":
        os.remove(tmp_path / "held")
    latest = gs.latest_checkpoint(str(tmp_path))
    assert latest in (str(tmp_path / "m-1"), str(tmp_path / "m-2"))
    if how == "os._exit held":
        assert latest == str(tmp_path / "m-1")
    _assert_holds(str(tmp_path / "m-1"), {"w": np.arange(300_000, dtype=np.float64)})
    if latest.endswith("m-2"):
        _assert_holds(latest, {"w": np.arange(300_000, dtype=np.float64) + 1})
    w = np.zeros(300_000)
    saver = gs.Saver({"w": w})
    saver.restore(latest)
    saver.save_async(str(tmp_path / "m"), global_step=3).result(HANG)
    kept = [str(p) for p in gs.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths]
    assert kept[-1] == str(tmp_path / "m-3") and set(kept) <= {str(tmp_path / f"m-{s}") for s in (1, 2, 3)}
    _only_checkpoints(str(tmp_path), *{latest, str(tmp_path / "m-3")} | ({str(tmp_path / "m-1")}))


# ------------------------------------------------------------------ a sharded save that fails on one shard
def _frames_of(thread: threading.Thread) -> list[tuple[str, str]]:
    frame = sys._current_frames().get(thread.ident or -1)
    out = []
    while frame is not None:
        out.append((frame.f_code.co_name, os.path.basename(frame.f_code.co_filename)))
        frame = frame.f_back
    return out


def _capture_deadlocked(capture: threading.Thread, pool: Any, failed: bool) -> bool:
    """The capture waits for a free slab that can never come: a shard has failed and its thread is
    gone, so nobody will ever write (and hand back) the slabs its feed still holds, while the
    background waits for the feed of a group the capture has not reached (it is not stopped,
    because the background save has not ended)."""
    if not failed or ("acquire", "snapshot.py") not in _frames_of(capture):
        return False
    with pool._cond:
        exhausted = not pool._free and len(pool._slabs) >= pool.max_slabs and not pool._stopped
    names = {t.name for t in threading.enumerate()}
    background = [t for t in threading.enumerate() if t.name == "gpusaver-save-async"]
    waiting = bool(background) and ("save_group", "snapshot.py") in _frames_of(background[0])
    return exhausted and "gpusaver-shard-0" not in names and waiting


class _Shard0Full(PosixFileOps):
    """Disk full when shard 0 creates its data file, once the last shard (the background thread)
    waits for its own group's records: shard 0 fails before it reads any of its feed, and too late
    for the last shard to see the abort before it starts reading."""

    def __init__(self) -> None:
        self.failed = threading.Event()

    def create(self, path: str) -> int:
        if "part-00000-of-00002" in os.path.basename(path):
            deadline = time.monotonic() + HANG  # a hang guard only
            while not any(("save_group", "snapshot.py") in _frames_of(t)
                          for t in threading.enumerate() if t.name == "gpusaver-save-async"):
                assert time.monotonic() < deadline, "the last shard never started reading its feed"
                threading.Event().wait(0.001)
            self.failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().create(path)


def test_a_sharded_save_failing_on_one_shard_while_the_capture_waits(tmp_path) -> None:
    """Shard 0 fails at once (its data file cannot be created); group 0 is 50 slabs through a 2-slab
    pool. save_async must return (or raise), and the save must fail with nothing committed.
    (A pwrite failure or a raising progress callback in shard 0 hits the same deadlock, or not,
    depending on when shard 0 notices its writer's error: this failure is the deterministic one.)"""
    ops = _Shard0Full()
    variables = [gs.Variable(np.arange(50_000, dtype=np.float64), "a", "/cpu:0"),
                 gs.Variable(np.arange(50_000, dtype=np.float64), "b", "/cpu:1")]
    saver = gs.Saver(variables, sharded=True, fileops=ops, snapshot_bytes=POOL)
    capture, box = _in_thread(lambda: saver.save_async(str(tmp_path / "m"), global_step=1))
    deadline = time.monotonic() + HANG  # a hang guard only
    deadlocked = False
    while capture.is_alive():
        capture.join(0.05)
        if _capture_deadlocked(capture, saver._pool, ops.failed.is_set()) or time.monotonic() > deadline:
            deadlocked = True
            break
    if deadlocked:  # break it, so that the process can end: the capture stops, the background ends
        saver._pool.stop()
        capture.join(HANG)
        if "value" in box:
            box["value"].exception(HANG)  # collected: nothing to report at exit
    assert not deadlocked, "save_async never returned: the capture waits for a slab nobody will free"
    error = box.get("error")
    if error is None:
        error = box["value"].exception(HANG)
    assert isinstance(error, CheckpointWriteError) and error.errno == errno.ENOSPC, error
    assert gs.latest_checkpoint(str(tmp_path)) is None
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ on_phase at the snapshot
def test_on_phase_raising_at_the_snapshot_phase(tmp_path) -> None:
    """on_phase("snapshot") runs after the capture, once the background save has started, which is
    not called off: by the rule of tests/test_on_phase_errors.py the save stands, save_async returns
    its handle, and the callback's error is a PhaseCallbackWarning (it used to raise from save_async
    while the save went on and committed: the caller was told it failed)."""

    def on_phase(name: str, seconds: float) -> None:
        if name == "snapshot":
            raise RuntimeError("on_phase failed")

    state = _state()
    want = _copy(state)
    saver = gs.Saver(state, on_phase=on_phase, snapshot_bytes=POOL)
    with pytest.warns(gs.PhaseCallbackWarning, match="on_phase failed"):
        handle = saver.save_async(str(tmp_path / "m"), global_step=1)
    for v in state.values():
        v[...] = 0
    assert handle.result() == str(tmp_path / "m-1") == gs.latest_checkpoint(str(tmp_path))
    _assert_holds(handle.result(), want)
    _only_checkpoints(str(tmp_path), handle.result())


# ------------------------------------------------------------------ fork while a save is pending
_FORK_CHILD = textwrap.dedent(
    """
    import atexit, json, os, sys, threading, numpy as np, gpusaver as gs
    from gpusaver.pipeline import background
    from gpusaver.storage.fileops import PosixFileOps
    d = sys.argv[1]
    class Gate(PosixFileOps):
        release = threading.Event()
        def phase(self, name):
            if name == "save:start":
                assert self.release.wait(300)
    ops = Gate()
    saver = gs.Saver({"w": np.arange(1000.0)}, fileops=ops, snapshot_bytes=1 << 20)
    handle = saver.save_async(os.path.join(d, "m"), global_step=1)  # held in the background
    pid = os.fork()
    if pid == 0:  # the child never uses the Saver; it only ends, normally
        main = threading.main_thread()

        def watchdog():
            # The child's exit waits for a handle whose thread does not exist here (it did not
            # survive the fork): nobody will ever finish it. That is a hang, for certain.
            for _ in range(300_000):
                frame = sys._current_frames().get(main.ident)
                names = []
                while frame is not None:
                    names.append(frame.f_code.co_name)
                    frame = frame.f_back
                stuck = [h for h in list(background._handles)
                         if not h.done() and h._thread is not None and not h._thread.is_alive()]
                if "_report_uncollected" in names and stuck:
                    os._exit(3)
                threading.Event().wait(0.001)
            os._exit(4)  # the hang guard

        atexit.register(lambda: threading.Thread(target=watchdog, daemon=True).start())  # runs before gpusaver's
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    ops.release.set()
    print(json.dumps({"child": os.waitstatus_to_exitcode(status), "result": handle.result(300)}))
    """
)


def test_a_child_forked_while_a_save_is_pending_can_exit(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", _FORK_CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=HANG)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["result"] == str(tmp_path / "m-1")  # the parent's save is not disturbed
    assert out["child"] == 0, "the forked child hung at exit, waiting for its parent's save"


_CTRL_C_CHILD = textwrap.dedent(
    """
    import atexit, os, sys, tempfile, threading, numpy as np, gpusaver as gs
    from gpusaver.backends.numpy_backend import NumpyBackend
    from gpusaver.pipeline import background

    def interrupted(self, tensors, writer):  # Ctrl-C while capturing a state the pool holds whole
        raise KeyboardInterrupt

    NumpyBackend.save_group = interrupted
    main = threading.main_thread()

    def watchdog():
        # The exit waits for a handle whose thread never started (save_async raised before the
        # writing began) and never will: nobody can finish it. A hang, for certain.
        for _ in range(300_000):
            frame = sys._current_frames().get(main.ident)
            names = []
            while frame is not None:
                names.append(frame.f_code.co_name)
                frame = frame.f_back
            never = [h for h in list(background._handles) if not h.done() and h._thread is None]
            if "_report_uncollected" in names and never:
                os._exit(3)
            threading.Event().wait(0.001)
        os._exit(4)  # the hang guard

    atexit.register(lambda: threading.Thread(target=watchdog, daemon=True).start())  # runs before gpusaver's
    saver = gs.Saver({"w": np.arange(1000.0)}, snapshot_bytes=1 << 20)
    saver.save_async(os.path.join(sys.argv[1], "m"), global_step=1)  # the KeyboardInterrupt ends the program
    """
)


def test_a_capture_error_before_the_writing_starts_lets_the_interpreter_exit(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", _CTRL_C_CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=HANG)
    assert "KeyboardInterrupt" in done.stderr, done.stderr
    assert done.returncode != 3, "the interpreter's exit hung, waiting for a save that never started"
    assert done.returncode in (1, 130, -2), done.stderr  # an uncaught KeyboardInterrupt
    assert os.listdir(tmp_path) == []
