"""One rank of the real-engine tests (test_engines.py launches 4 of them).

    python worker.py ENGINE SCENARIO [SCENARIO ...]

ENGINE: ``torch`` (``torch.distributed`` with gloo, initialised from the environment that
torchrun, or the test itself, sets) or ``mpi`` (mpi4py under mpiexec). SCENARIOs run in order:

* ``basic``: every collective and helper with checked results (empty, few-MB and multi-round
  payloads, both roots, errors agreed on every rank, ranks out of step, a spent coordinator);
* ``timeout``: rank 1 stops calling the coordinator (for ``GPUSAVER_TEST_HANG`` seconds); the
  others raise after the timeout (``GPUSAVER_TEST_TIMEOUT`` seconds) and leave the error
  uncaught, which makes the launcher end the job, rank 1 included;
* ``kill``: rank 2 SIGKILLs itself during an all-gather of several MB; the others raise.

Each rank appends JSON lines ``{"rank", "event", "time", ...}`` to ``$GPUSAVER_TEST_OUT/rank-<rank>.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np

from gpusaver import config
from gpusaver.distributed import (
    Coordinator,
    agree,
    broadcast_result,
    check_same,
    resolve_coordinator,
    shared_token,
)
from gpusaver.errors import CoordinatorError, InvalidArgumentError

ENGINE = sys.argv[1]


def report(rank: int, event: str, **fields: object) -> None:
    """One line of ``rank-<rank>.jsonl`` in $GPUSAVER_TEST_OUT (the launchers mix the ranks' stdout)."""
    line = json.dumps({"rank": rank, "event": event, "time": time.time(), **fields})
    with open(os.path.join(os.environ["GPUSAVER_TEST_OUT"], f"rank-{rank}.jsonl"), "a") as f:
        f.write(line + "\n")


def payload(rank: int, n: int) -> bytes:
    return np.random.default_rng(1000 + rank).integers(0, 256, n, dtype=np.uint8).tobytes()


def make(**kwargs: object) -> Coordinator:
    if ENGINE == "torch":
        return resolve_coordinator("torch", **kwargs)
    return resolve_coordinator("mpi", **kwargs)


def expect_error(kind: type, fn, *args, **kwargs) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kwargs)
    except kind as e:
        return e
    raise AssertionError(f"{fn.__name__} did not raise {kind.__name__}")


def engine_rank_size() -> tuple[int, int]:
    if ENGINE == "torch":
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def basic() -> None:
    c = make()
    r, n = c.rank, c.size
    assert (r, n) == engine_rank_size(), ((r, n), engine_rank_size())
    assert c.all_gather_bytes(b"") == [b""] * n
    # rank 0 sends nothing, rank k about k MB (not a multiple of anything)
    sizes = [0 if k == 0 else (k << 20) + 7 * k for k in range(n)]
    got = c.all_gather_bytes(payload(r, sizes[r]))
    assert [len(g) for g in got] == sizes, [len(g) for g in got]
    assert all(g == payload(k, sizes[k]) for k, g in enumerate(got))
    assert c.all_gather_bytes(bytearray(b"r%d" % r)) == [b"r%d" % k for k in range(n)]
    big = payload(99, (2 << 20) + 3)
    assert c.broadcast_bytes(big if r == n - 1 else None, n - 1) == big
    assert c.broadcast_bytes(b"" if r == 0 else None, 0) == b""
    assert c.broadcast_bytes(b"x" if r == 1 else b"ignored", 1) == b"x"
    c.barrier()

    # agree: success, then failures on ranks 1 and 3: every rank raises rank 1's error
    assert agree(c, b"entries of %d" % r, what="the save") == [b"entries of %d" % k for k in range(n)]
    own = {1: ValueError("disk on fire on rank 1"), 3: OSError(28, "no space on rank 3")}.get(r)
    e = expect_error(CoordinatorError, agree, c, b"unused", error=own, what="the save")
    assert e.rank == 1 and e.error_type == "ValueError", (e.rank, e.error_type)
    assert "the save failed on rank 1 of %d" % n in str(e) and "disk on fire on rank 1" in str(e), str(e)
    assert "ranks 1, 3 failed" in str(e), str(e)
    assert e.__cause__ is own
    # the committing rank fails: every rank raises its error; then it succeeds
    def commit() -> bytes:
        raise InvalidArgumentError("merge refused")

    e = expect_error(CoordinatorError, broadcast_result, c, n - 1, commit, what="the commit")
    assert e.rank == n - 1 and e.error_type == "gpusaver.errors.InvalidArgumentError", (e.rank, e.error_type)
    assert "merge refused" in str(e) and (e.__cause__ is not None) == (r == n - 1)
    assert broadcast_result(c, n - 1, lambda: b"prefix-7", what="the commit") == b"prefix-7"
    token = shared_token(c)
    assert len(token) == 32 and c.all_gather_bytes(token.encode()) == [token.encode()] * n
    check_same(c, "ckpt/model-7", what="save()'s arguments")
    e = expect_error(InvalidArgumentError, check_same, c, "other" if r == 2 else "same", what="save()'s arguments")
    assert "rank 2 has 'other', rank 0 has 'same'" in str(e), str(e)
    report(r, "ok", step="helpers")

    if ENGINE == "mpi":  # gathers and broadcasts bigger than one message travel in rounds
        small = make()
        small.max_message = 1000  # type: ignore[attr-defined]
        sizes = [0, 999, 4321, 250][:n] + [3000] * max(0, n - 4)
        got = small.all_gather_bytes(payload(r, sizes[r]))
        assert all(g == payload(k, sizes[k]) for k, g in enumerate(got))
        assert small.broadcast_bytes(payload(7, 2500) if r == 2 else None, 2) == payload(7, 2500)
    if ENGINE == "torch":  # the given group itself instead of gpusaver's own
        import torch.distributed as dist

        from gpusaver.distributed import TorchCoordinator

        direct = TorchCoordinator(dist.group.WORLD, own_group=False)
        assert direct.all_gather_bytes(payload(r, 1000 * r)) == [payload(k, 1000 * k) for k in range(n)]
        assert direct.broadcast_bytes(b"abc" if r == 0 else None, 0) == b"abc"

    # ranks out of step: rank 0 enters a barrier while the others gather; every rank raises
    odd = make()
    if r == 0:
        e = expect_error(CoordinatorError, odd.barrier)
    else:
        e = expect_error(CoordinatorError, odd.all_gather_bytes, b"x")
    assert "out of step" in str(e) and "rank 0 in barrier (collective #1); ranks 1, 2, 3 in all_gather_bytes" in str(e), str(e)
    e = expect_error(CoordinatorError, odd.barrier)
    assert "failed earlier" in str(e), str(e)
    c.barrier()
    report(r, "ok", step="basic")


def timeout() -> None:
    seconds = int(os.environ["GPUSAVER_TEST_TIMEOUT"])
    make().barrier()  # in step (with the default timeout) before the short one starts counting
    with config.set(coordinator_timeout=seconds):
        c = make()
    c.barrier()
    if c.rank == 1:  # hangs (from the others' point of view), then leaves without a word
        time.sleep(float(os.environ["GPUSAVER_TEST_HANG"]))
        report(c.rank, "left")
        return
    start = time.monotonic()
    try:
        c.all_gather_bytes(b"waiting for rank 1")
    except CoordinatorError as e:
        report(c.rank, "raised", seconds=time.monotonic() - start, message=str(e))
    else:
        report(c.rank, "returned")
        return
    e = expect_error(CoordinatorError, c.barrier)
    report(c.rank, "spent", message=str(e))
    raise e  # uncaught: torchrun ends the job, and so does MPI under `python -m mpi4py`


def kill() -> None:
    c = make()
    c.barrier()
    data = payload(c.rank, 4 << 20)
    for i in range(200):
        if c.rank == 2 and i == 3:
            report(c.rank, "dying")
            # SIGKILL a moment later, while this rank is inside the all-gather below
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGKILL)).start()
        start = time.monotonic()
        try:
            c.all_gather_bytes(data)
        except CoordinatorError as e:
            report(c.rank, "raised", seconds=time.monotonic() - start, round=i, message=str(e))
            sys.exit(3)
    report(c.rank, "returned")


SCENARIOS = {"basic": basic, "timeout": timeout, "kill": kill}

if __name__ == "__main__":
    if ENGINE == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo")
    for name in sys.argv[2:]:
        SCENARIOS[name]()
    rank, _ = engine_rank_size()
    report(rank, "done")
    if ENGINE == "torch":
        dist.destroy_process_group()
