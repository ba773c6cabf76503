"""gpusaver.distributed without an engine: the protocol, its checker, resolve_coordinator,
the single-process coordinator, and the engine coordinators' framing over ranks that are
threads (threadranks.py): collectives, ranks out of step, timeouts, a spent coordinator.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from gpusaver import config
from gpusaver.distributed import (
    Coordinator,
    SingleProcessCoordinator,
    check_coordinator,
    resolve_coordinator,
)
from gpusaver.distributed._engine import chunk_plan, resolve_timeout
from gpusaver.errors import (
    BackendUnavailableError,
    CoordinatorError,
    GpuSaverError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
)
from threadranks import ThreadEngine, run_ranks


class Plugged:
    """Another engine's coordinator: just the protocol's members."""

    rank = 0
    size = 1

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return [data]

    def broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        return data or b""

    def barrier(self) -> None:
        pass


# -- the single process ------------------------------------------------------------------------


def test_single_process_coordinator_is_rank_0_of_1() -> None:
    c = resolve_coordinator(None)
    assert isinstance(c, SingleProcessCoordinator) and isinstance(c, Coordinator)
    assert (c.rank, c.size) == (0, 1)
    assert c.all_gather_bytes(b"abc") == [b"abc"]
    assert c.all_gather_bytes(bytearray(b"xy")) == [b"xy"] and c.all_gather_bytes(memoryview(b"")) == [b""]
    assert c.broadcast_bytes(b"data", 0) == b"data"
    assert c.barrier() is None
    assert check_coordinator(c) is c


def test_single_process_coordinator_refuses_bad_calls() -> None:
    c = SingleProcessCoordinator()
    with pytest.raises(InvalidArgumentTypeError, match="bytes, not str"):
        c.all_gather_bytes("text")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="root 1 is not a rank of 1"):
        c.broadcast_bytes(b"x", 1)
    with pytest.raises(InvalidArgumentTypeError, match="root is a rank"):
        c.broadcast_bytes(b"x", True)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="must pass its data"):
        c.broadcast_bytes(None, 0)


# -- the protocol and resolve_coordinator -----------------------------------------------------


def test_a_plugged_coordinator_is_returned_as_it_is() -> None:
    plugged = Plugged()
    assert resolve_coordinator(plugged) is plugged
    assert isinstance(plugged, Coordinator)


def test_an_incomplete_coordinator_is_refused_naming_every_missing_member() -> None:
    class Half:
        rank = "0"
        size = 2

        def all_gather_bytes(self, data: bytes) -> list[bytes]:
            return [data]

        broadcast_bytes = 3

    with pytest.raises(InvalidArgumentTypeError) as info:
        resolve_coordinator(Half())
    message = str(info.value)
    assert "Half does not implement gpusaver.distributed.Coordinator" in message
    assert "'rank' is '0', not an int" in message
    assert "'broadcast_bytes' is not callable" in message and "no method 'barrier'" in message
    assert "'all_gather_bytes'" not in message and "'size'" not in message  # those are fine
    with pytest.raises(InvalidArgumentTypeError, match="no attribute 'rank'; no attribute 'size'"):
        check_coordinator(object())


def test_a_coordinator_with_an_impossible_rank_is_refused() -> None:
    bad = Plugged()
    bad.rank = 3  # type: ignore[misc]
    bad.size = 2  # type: ignore[misc]
    with pytest.raises(InvalidArgumentError, match="rank 3 and size 2"):
        check_coordinator(bad)


@pytest.mark.parametrize(
    "args, match",
    [
        (("nccl",), "unknown coordinator 'nccl': None, 'torch', 'mpi'"),
        ((None,), "group= goes with coordinator='torch'"),
        (("mpi",), "group= goes with coordinator='torch'"),
    ],
)
def test_resolve_refuses_unknown_names_and_misplaced_engine_arguments(args: tuple, match: str) -> None:
    kwargs = {} if args[0] == "nccl" else {"group": object()}
    with pytest.raises(InvalidArgumentError, match=match):
        resolve_coordinator(*args, **kwargs)
    with pytest.raises(InvalidArgumentError, match="comm= goes with coordinator='mpi'"):
        resolve_coordinator("torch", comm=object())
    with pytest.raises(InvalidArgumentError, match="group= goes with"):
        resolve_coordinator(Plugged(), group=object())


def test_missing_engines_raise_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` now fails
    with pytest.raises(BackendUnavailableError, match=r"needs mpi4py .*gpusaver\[mpi\]"):
        resolve_coordinator("mpi")
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    with pytest.raises(BackendUnavailableError, match=r"needs PyTorch .*gpusaver\[torch\]"):
        resolve_coordinator("torch")


def test_importing_the_package_imports_no_engine() -> None:
    code = (
        "import sys; import gpusaver, gpusaver.distributed as d; c = d.resolve_coordinator(None);"
        "d.agree(c, b'x'); print(sorted(m for m in ('torch', 'mpi4py', 'jax', 'cupy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_torch_without_an_initialised_process_group_is_refused() -> None:
    pytest.importorskip("torch")
    code = (
        "from gpusaver.distributed import resolve_coordinator\n"
        "from gpusaver.errors import CoordinatorError\n"
        "try:\n    resolve_coordinator('torch')\n"
        "except CoordinatorError as e:\n    print('refused:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused: coordinator='torch' needs an initialised torch.distributed" in done.stdout


def test_coordinator_error_is_a_runtime_error_and_pickles_with_its_rank() -> None:
    e = CoordinatorError("the save failed on rank 2 of 4: ValueError: x", rank=2, error_type="ValueError")
    assert isinstance(e, GpuSaverError) and isinstance(e, RuntimeError)
    back = pickle.loads(pickle.dumps(e))
    assert (str(back), back.rank, back.error_type) == (str(e), 2, "ValueError")


def test_timeout_comes_from_the_setting_or_the_argument() -> None:
    assert resolve_timeout(None) == config.get("coordinator_timeout")
    with config.set(coordinator_timeout=7):
        assert resolve_timeout(None) == 7.0
    assert resolve_timeout(0.5) == 0.5
    with pytest.raises(InvalidArgumentError, match="above 0"):
        resolve_timeout(0)
    with pytest.raises(InvalidArgumentTypeError):
        resolve_timeout("5")  # type: ignore[arg-type]


# -- the engine coordinators' framing, over threads --------------------------------------------


def test_collectives_over_four_ranks() -> None:
    def body(c: ThreadEngine) -> tuple:
        mine = bytes([c.rank]) * (1000 * c.rank)  # rank 0 sends nothing
        return (
            c.all_gather_bytes(mine),
            c.all_gather_bytes(b""),
            c.broadcast_bytes(b"from 3" if c.rank == 3 else None, 3),
            c.broadcast_bytes(b"" if c.rank == 0 else None, 0),
            c.barrier(),
        )

    for gathered, empty, from3, nothing, barrier in run_ranks(4, body):
        assert gathered == [bytes([k]) * (1000 * k) for k in range(4)]
        assert empty == [b""] * 4 and from3 == b"from 3" and nothing == b"" and barrier is None


def test_ranks_out_of_step_raise_on_every_rank_then_the_coordinator_is_spent() -> None:
    def body(c: ThreadEngine) -> list[str]:
        seen = []
        for call in (c.barrier if c.rank == 1 else lambda: c.all_gather_bytes(b"x"), c.barrier):
            try:
                call()
            except CoordinatorError as e:
                seen.append(str(e))
        return seen

    for rank, (first, second) in enumerate(run_ranks(3, body)):
        assert first.startswith(f"rank {rank} of 3: ranks out of step in ")
        assert "ranks 0, 2 in all_gather_bytes (collective #1); rank 1 in barrier (collective #1)" in first
        assert "failed earlier and cannot be used again" in second and first in second


def test_a_silent_rank_makes_the_others_raise_after_the_timeout() -> None:
    def body(c: ThreadEngine) -> object:
        if c.rank == 2:
            return "silent"
        start = time.monotonic()
        with pytest.raises(CoordinatorError) as info:
            c.all_gather_bytes(b"anyone?")
        return time.monotonic() - start, str(info.value)

    results = run_ranks(3, body, timeout=0.5)
    assert results[2] == "silent"
    for rank in (0, 1):
        waited, message = results[rank]
        assert waited >= 0.5 * 0.99
        assert f"rank {rank} of 3: all_gather_bytes (collective #1) over threads: the other ranks did not all " \
               "answer within 0.5 s (coordinator_timeout)" in message


def test_engine_errors_and_bugs_are_told_apart() -> None:
    class Lost(RuntimeError):
        pass

    class Engine(ThreadEngine):
        def _engine_error(self, error: Exception) -> bool:
            return isinstance(error, Lost)

    from threadranks import Exchange

    lost = Engine(Exchange(1), 0, 5.0)
    lost.fail_next = Lost("connection reset")
    with pytest.raises(CoordinatorError, match="failed in threads: Lost: connection reset; another rank has "
                                               "probably died") as info:
        lost.barrier()
    assert isinstance(info.value.__cause__, Lost)
    bug = Engine(Exchange(1), 0, 5.0)
    bug.fail_next = TypeError("a bug here")
    with pytest.raises(CoordinatorError, match=r"failed in threads: TypeError: a bug here$"):
        bug.all_gather_bytes(b"x")


def test_broadcast_refuses_a_root_without_data_before_any_exchange() -> None:
    from threadranks import Exchange

    c = ThreadEngine(Exchange(2), 1, 5.0)
    with pytest.raises(InvalidArgumentError, match="root .rank 1. must pass its data"):
        c.broadcast_bytes(None, 1)
    with pytest.raises(InvalidArgumentError, match="root 2 is not a rank of 2"):
        c.broadcast_bytes(b"x", 2)
    assert "failed" not in repr(c)  # refused locally: the coordinator is still usable


@pytest.mark.parametrize(
    "lengths, limit",
    [([5, 0, 3], 100), ([10, 1, 7, 0], 12), ([100, 100], 7), ([0, 9], 2), ([2**31, 5], 2**31 - 1)],
)
def test_chunk_plan_splits_gathers_into_messages_under_the_limit(lengths: list[int], limit: int) -> None:
    rounds = list(chunk_plan(lengths, limit))
    if sum(lengths) <= limit:
        assert rounds == [(0, lengths)]
    for _, counts in rounds:
        assert sum(counts) <= limit
    for k, n in enumerate(lengths):  # each rank's bytes are sent once, in order
        assert sum(counts[k] for _, counts in rounds) == n
        covered = [(offset, counts[k]) for offset, counts in rounds if counts[k]]
        assert all(a + m == b for (a, m), (b, _) in zip(covered, covered[1:]))


def test_gathered_headers_are_int64_rows() -> None:
    # the primitives' contract the engines implement: one row of int64 per rank
    out = run_ranks(2, lambda c: c._gather_ints(np.array([c.rank, 2**40], dtype=np.int64)))
    for rows in out:
        assert rows.dtype == np.int64 and rows.tolist() == [[0, 2**40], [1, 2**40]]


def test_a_given_nccl_group_takes_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """own_group=False on an NCCL group: the bytes travel as tensors on the current CUDA device."""
    torch = pytest.importorskip("torch")
    from gpusaver.distributed.torch_coordinator import _device

    class Dist:
        def __init__(self, backend: str) -> None:
            self.backend = backend

        def get_backend(self, group: object) -> str:
            return self.backend

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _device(torch, Dist("nccl"), None) == torch.device("cuda", 3)
    assert _device(torch, Dist("cpu:gloo,cuda:nccl"), None) == torch.device("cpu")
    assert _device(torch, Dist("gloo"), None) == torch.device("cpu")
