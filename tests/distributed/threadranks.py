"""Ranks as threads of one process, for the coordinator's unit tests.

``ThreadEngine`` implements the four primitives of
:class:`gpusaver.distributed._engine.EngineCoordinator` over shared slots and a
:class:`threading.Barrier`, so the framing, step checks, failures and timeouts run without
an engine. ``run_ranks(size, fn)`` calls ``fn(coordinator)`` on ``size`` threads and
returns each rank's result or exception.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from gpusaver.distributed._engine import EngineCoordinator


class Exchange:
    """What the ranks of one group share."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size)


class ThreadEngine(EngineCoordinator):
    def __init__(self, exchange: Exchange, rank: int, timeout: float) -> None:
        super().__init__(rank, exchange.size, "threads", timeout)
        self._ex = exchange
        self.fail_next: Exception | None = None  # raised by the next primitive, as an engine would

    def _all(self, value: Any) -> list[Any]:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self._ex.slots[self._rank] = value
        try:
            self._ex.barrier.wait(self.timeout)
            out = list(self._ex.slots)
            self._ex.barrier.wait(self.timeout)  # nobody writes the next value before all have read
        except threading.BrokenBarrierError:
            raise self._timed_out("the barrier broke") from None
        return out

    def _gather_ints(self, values: np.ndarray) -> np.ndarray:
        return np.stack(self._all(values.copy()))

    def _gather_payload(self, data: memoryview, lengths: list[int]) -> list[bytes]:
        return self._all(bytes(data))

    def _broadcast_ints(self, values: np.ndarray, root: int) -> np.ndarray:
        return self._all(values.copy())[root].copy()

    def _broadcast_payload(self, data: memoryview | None, length: int, root: int) -> bytes:
        return self._all(None if data is None else bytes(data))[root]


def run_ranks(size: int, fn: Callable[[ThreadEngine], Any], timeout: float = 120.0) -> list[Any]:
    """``fn(coordinator)`` on ``size`` threads: each rank's return value, or the exception it raised."""
    exchange = Exchange(size)
    results: list[Any] = [None] * size

    def one(rank: int) -> None:
        try:
            results[rank] = fn(ThreadEngine(exchange, rank, timeout))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            results[rank] = e

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4 + 60)
        assert not t.is_alive(), "a rank thread hung"
    return results
