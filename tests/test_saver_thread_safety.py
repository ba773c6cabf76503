"""One Saver called from several threads: calls take turns, none deadlocks, each checkpoint is whole.

``save``, ``save_async``, ``restore``, ``wait`` and ``close`` of one Saver run one at a time: a call
from another thread waits for the one in progress (``save_async`` holds the Saver only while it
captures; the next call then waits for its background write). A call from inside a call of the
same Saver (a ``progress`` or ``on_phase`` callback, on the caller's thread, a worker of the save
or the background save's thread) raises SaverBusyError instead of waiting for ever.

Deadlock is detected by joining the threads with a generous timeout: the threads do a few small
saves each, and a join that times out means they are stuck, not slow.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gpusaver as gs
from gpusaver import config
from gpusaver.errors import SaverBusyError

STUCK = 300.0  # seconds: far beyond what these few small saves take on a busy machine


def _run_threads(targets: list) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(STUCK)
    stuck = [t for t in threads if t.is_alive()]
    assert not stuck, f"{len(stuck)} threads still inside the Saver after {STUCK} s: deadlock"
    return errors


def _state(n: int = 6, size: int = 50_000, value: float = 1.0) -> dict[str, np.ndarray]:
    return {f"v{i}": np.full(size, value + i, np.float32) for i in range(n)}


@pytest.mark.parametrize("snapshot_bytes", [None, 64 * 1024])  # whole in the pool, or streamed through it
def test_two_threads_save_async_on_one_saver(tmp_path, snapshot_bytes) -> None:
    state = _state()
    saver = gs.Saver(state, max_to_keep=None, snapshot_bytes=snapshot_bytes)
    start = threading.Barrier(2)
    handles: list = []

    def worker(k: int):
        def run():
            start.wait()
            for i in range(4):
                handles.append(saver.save_async(str(tmp_path / f"t{k}-{i}")))
        return run

    with config.set(snapshot_slab_bytes=16 * 1024):
        errors = _run_threads([worker(0), worker(1)])
        assert not errors, errors
        saver.wait()
    assert len(handles) == 8
    for h in handles:
        got = gs.load(h.result(timeout=STUCK))
        for k, v in state.items():
            np.testing.assert_array_equal(got[k], v)
    saver.close()


def test_save_restore_wait_close_from_several_threads(tmp_path) -> None:
    """Saves and restores of one Saver from three threads: each checkpoint holds one whole state
    (the values one thread set, or those a restore brought back), never a mix. The threads do not
    write the arrays while another restores into them (that race is the caller's: a restore checks
    each tensor's crc32c over the memory it filled), but a restore still meets the background
    writes of save_async, and wait()."""
    state = _state(n=4, size=20_000)
    saver = gs.Saver(state, max_to_keep=None)
    base = saver.save(str(tmp_path / "base"))
    versions: dict[str, float] = {}
    setting = threading.Lock()  # the savers set the arrays and start their save in one step

    def saving(k: int):
        def run():
            for i in range(3):
                value = float(10 * (k + 1) + i)
                path = str(tmp_path / f"s{k}-{i}")
                with setting:
                    for j, a in enumerate(state.values()):
                        a[...] = value + j
                    versions[path] = value
                    if i % 2:
                        saver.save_async(path)
                    else:
                        saver.save(path)
                saver.wait()
        return run

    def restoring():
        for _ in range(4):
            with setting:  # not while another thread writes the arrays: a restore checks them as it fills them
                saver.restore(base)

    errors = _run_threads([saving(0), saving(1), restoring])
    assert not errors, errors
    saver.close()
    for path, value in versions.items():
        got = gs.load(path)
        first = float(got["v0"][0])
        assert first in (value, 1.0), (path, first)
        for j, k in enumerate(state):
            np.testing.assert_array_equal(got[k], np.full(20_000, first + j, np.float32))


def test_callback_calling_its_own_saver_is_refused_not_a_deadlock(tmp_path) -> None:
    state = _state(n=2, size=1000)
    refused: list[BaseException] = []
    holder: dict = {}

    def on_phase(phase: str, seconds: float) -> None:
        if phase.startswith("shard:") and "saver" in holder:
            try:
                holder["saver"].save(str(tmp_path / "inner"))
            except SaverBusyError as e:
                refused.append(e)

    saver = gs.Saver({**state, "cpu1": gs.Variable(np.zeros(3), device="/cpu:1")}, sharded=True, on_phase=on_phase)
    holder["saver"] = saver
    errors = _run_threads([lambda: saver.save(str(tmp_path / "outer"))])
    assert not errors, errors
    assert refused, "the callback's call was not refused"
    assert all("own call or callback" in str(e) for e in refused)
    assert not list(tmp_path.glob("inner*"))
    assert gs.load(str(tmp_path / "outer"))["v1"][0] == 2.0


def test_progress_callback_calling_restore_on_the_same_thread_is_refused(tmp_path) -> None:
    saver = gs.Saver(_state(n=1, size=10))
    prefix = saver.save(str(tmp_path / "a"))
    refused: list[BaseException] = []

    def progress(done: int, total: int) -> None:
        try:
            saver.restore(prefix)
        except SaverBusyError as e:
            refused.append(e)

    errors = _run_threads([lambda: saver.save(str(tmp_path / "b"), progress=progress)])
    assert not errors, errors
    assert refused
    assert gs.load(str(tmp_path / "b"))["v0"][0] == 1.0


def test_background_save_callback_calling_its_saver_is_refused(tmp_path) -> None:
    refused: list[BaseException] = []
    holder: dict = {}

    def on_phase(phase: str, seconds: float) -> None:
        if phase == "total" and holder.get("armed"):
            try:
                holder["saver"].save(str(tmp_path / "inner"))
            except SaverBusyError as e:
                refused.append(e)

    saver = gs.Saver(_state(n=2, size=100), on_phase=on_phase)
    holder["saver"], holder["armed"] = saver, True
    handle = saver.save_async(str(tmp_path / "outer"))
    errors = _run_threads([lambda: handle.result(timeout=STUCK)])
    assert not errors, errors
    assert refused and "own call or callback" in str(refused[0])
    holder["armed"] = False
    saver.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=st.lists(st.lists(st.sampled_from(["save", "save_async", "restore", "wait"]), min_size=1, max_size=5),
                      min_size=2, max_size=3))
def test_random_calls_from_threads_finish_and_restore_whole_checkpoints(tmp_path_factory, plans) -> None:
    tmp = tmp_path_factory.mktemp("threads")
    state = _state(n=3, size=5000)
    saver = gs.Saver(state, max_to_keep=None, snapshot_bytes=32 * 1024)
    base = saver.save(str(tmp / "base"))
    counter = iter(range(10**6))
    made: list[str] = []

    def worker(plan: list[str]):
        def run():
            for call in plan:
                if call == "save":
                    made.append(saver.save(str(tmp / f"c{next(counter)}")))
                elif call == "save_async":
                    made.append(saver.save_async(str(tmp / f"c{next(counter)}")).result(timeout=STUCK))
                elif call == "restore":
                    saver.restore(base)
                else:
                    saver.wait()
        return run

    with config.set(snapshot_slab_bytes=8 * 1024):
        errors = _run_threads([worker(p) for p in plans])
    assert not errors, errors
    saver.close()
    for path in made:
        got = gs.load(path)
        for k, v in state.items():
            np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("call", ["wait", "save", "result", "exception"])
def test_a_shard_thread_callback_of_a_background_save_is_refused_not_a_deadlock(tmp_path, call) -> None:
    """The callback runs on a shard worker of a sharded save_async: neither the caller's thread nor
    the background save's own thread. Waiting for the Saver or the handle there would wait for ever."""
    refused: list[BaseException] = []
    holder: dict = {}

    def on_phase(phase: str, seconds: float) -> None:
        if phase.startswith("shard:") and holder.get("armed"):
            try:
                if call == "wait":
                    holder["saver"].wait()
                elif call == "save":
                    holder["saver"].save(str(tmp_path / "inner"))
                elif call == "result":
                    holder["handle"].result()
                else:
                    holder["handle"].exception()
            except SaverBusyError as e:
                refused.append(e)

    saver = gs.Saver({"a": np.ones(100), "b": gs.Variable(np.zeros(50), device="/cpu:1")}, sharded=True,
                     on_phase=on_phase)
    holder["saver"], holder["armed"] = saver, True
    holder["handle"] = handle = saver.save_async(str(tmp_path / "outer"))
    errors = _run_threads([lambda: handle.result(timeout=STUCK)])
    assert not errors, errors
    assert refused, "the callback's call was not refused"
    holder["armed"] = False
    saver.close()
    assert not list(tmp_path.glob("inner*"))


def test_another_savers_callback_and_a_thread_named_like_ours_wait_their_turn(tmp_path) -> None:
    """Only a Saver's own callbacks are refused: saver A's background save calling B.save while B is
    busy waits for B; so does a user thread that happens to be named gpusaver-*."""
    b_state = {"b": np.ones(200_000)}
    b = gs.Saver(b_state, max_to_keep=None)
    inside_b = threading.Event()
    results: list = []

    def progress(done: int, total: int) -> None:
        inside_b.set()

    def on_phase(phase: str, seconds: float) -> None:
        if phase == "total":
            inside_b.wait(STUCK)
            results.append(b.save(str(tmp_path / "from-a")))

    a = gs.Saver({"a": np.zeros(10)}, on_phase=on_phase)
    def user() -> None:
        threading.current_thread().name = "gpusaver-my-worker"
        inside_b.wait(STUCK)
        results.append(b.save(str(tmp_path / "from-user")))

    handle = a.save_async(str(tmp_path / "a"))
    errors = _run_threads([lambda: b.save(str(tmp_path / "main"), progress=progress), user])
    assert not errors, errors
    handle.result(timeout=STUCK)
    assert sorted(results) == [str(tmp_path / "from-a"), str(tmp_path / "from-user")]
    a.close()
