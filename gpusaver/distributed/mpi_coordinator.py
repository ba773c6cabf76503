"""A :class:`~gpusaver.distributed.Coordinator` over MPI through mpi4py (imported lazily).

The coordinator works on its own duplicate of the given communicator (so its messages
never meet the application's), and every collective is non-blocking: the rank tests it
until it completes or ``timeout`` seconds pass, then raises
:class:`~gpusaver.errors.CoordinatorError` (MPI has no timeout of its own).

What a dead rank does: under Open MPI's ``mpiexec`` (and most launchers) a process that
dies makes the launcher end the whole job, survivors included, within about a second:
they are terminated, they do not raise. Under ``mpiexec --with-ft ulfm`` (Open MPI 5's
fault tolerance) the job goes on and the survivors' collectives raise instead. A rank
that hangs, or stops calling the coordinator, makes the others raise after ``timeout``.

After a timeout the collective is still pending inside MPI: its buffers are kept for the
life of the process, and the job should end (exit non-zero, or ``comm.Abort()``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from gpusaver.distributed._engine import EngineCoordinator, chunk_plan, resolve_timeout
from gpusaver.errors import BackendUnavailableError, InvalidArgumentTypeError

__all__ = ["MPICoordinator"]

#: Buffers of collectives that never completed: MPI may still write into them.
_ABANDONED: list[object] = []


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise BackendUnavailableError(
            f"coordinator='mpi' needs mpi4py and an MPI library (pip install 'gpusaver[mpi]'): {e}") from None
    return MPI


class MPICoordinator(EngineCoordinator):
    """MPI as gpusaver's coordinator.

    Making one is collective over ``comm`` (it duplicates the communicator). Its
    collectives may run on any thread, one at a time (they are serialised); MPI must then
    allow threads (``MPI_THREAD_SERIALIZED`` or more: mpi4py asks for ``MULTIPLE``).

    Args:
        comm: an mpi4py intra-communicator (default: ``MPI.COMM_WORLD``).
        timeout: seconds each step of a collective waits for the other ranks (default:
            ``config.get("coordinator_timeout")`` now).

    Raises:
        BackendUnavailableError: mpi4py or its MPI library is missing.
        InvalidArgumentTypeError: ``comm`` is not an intra-communicator.
        CoordinatorError: the duplication did not complete within ``timeout``.
    """

    #: Bytes of one MPI message at the most (MPI counts are C ints); larger gathers and
    #: broadcasts travel in several rounds.
    max_message = 2**31 - 1

    def __init__(self, comm: Any = None, *, timeout: float | None = None) -> None:
        MPI = _import_mpi()
        base = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(base, MPI.Intracomm):
            raise InvalidArgumentTypeError(f"comm= is an mpi4py intra-communicator, not {type(base).__name__}")
        self._MPI = MPI
        version = MPI.Get_library_version().split(",")[0].strip()
        super().__init__(base.Get_rank(), base.Get_size(), f"MPI ({version})", resolve_timeout(timeout))
        self._comm, request = base.Idup()
        self._call("coordinator creation", 0, self._wait, request, ())
        # errors come back as mpi4py exceptions (under ULFM: a failed peer), not as an abort
        self._comm.Set_errhandler(MPI.ERRORS_RETURN)

    # -- primitives ------------------------------------------------------------------------------

    def _wait(self, request: Any, buffers: tuple[object, ...]) -> None:
        """Tests ``request`` until it completes; past the timeout, keeps ``buffers`` and raises."""
        deadline = time.monotonic() + self.timeout
        polls = 0
        while not request.Test():
            polls += 1
            if polls > 64:  # after a short spin, poll at most every 2 ms: waiting costs no core
                if time.monotonic() >= deadline:
                    _ABANDONED.append((request, buffers))
                    raise self._timed_out(f"still incomplete after {self.timeout:g} s")
                time.sleep(min(2e-3, 1e-5 * (polls - 64)))

    def _gather_ints(self, values: np.ndarray) -> np.ndarray:
        out = np.empty((self._size, values.size), dtype=np.int64)
        self._wait(self._comm.Iallgather(values, out), (values, out))
        return out

    def _gather_payload(self, data: memoryview, lengths: list[int]) -> list[bytes]:
        src = np.frombuffer(data, dtype=np.uint8)
        rounds = list(chunk_plan(lengths, self.max_message))
        whole = [np.empty(n, dtype=np.uint8) for n in lengths] if len(rounds) > 1 else None
        BYTE = self._MPI.BYTE
        for offset, counts in rounds:
            displs = np.concatenate(([0], np.cumsum(counts[:-1]))).astype(int).tolist()
            recv = np.empty(sum(counts), dtype=np.uint8)
            send = src[offset: offset + counts[self._rank]]
            request = self._comm.Iallgatherv([send, BYTE], [recv, (counts, displs), BYTE])
            self._wait(request, (send, recv))
            parts = [recv[d: d + c] for d, c in zip(displs, counts)]
            if whole is None:
                return [p.tobytes() for p in parts]
            for k, part in enumerate(parts):
                whole[k][offset: offset + len(part)] = part
        return [b.tobytes() for b in whole]  # type: ignore[union-attr]

    def _broadcast_ints(self, values: np.ndarray, root: int) -> np.ndarray:
        buf = values.copy()
        self._wait(self._comm.Ibcast(buf, root=root), (buf,))
        return buf

    def _broadcast_payload(self, data: memoryview | None, length: int, root: int) -> bytes:
        buf = np.frombuffer(data, dtype=np.uint8).copy() if data is not None else np.empty(length, dtype=np.uint8)
        step = self.max_message
        for offset in range(0, length, step):
            part = buf[offset: offset + step]
            self._wait(self._comm.Ibcast([part, self._MPI.BYTE], root=root), (buf,))
        return buf.tobytes()

    def _engine_error(self, error: Exception) -> bool:
        return isinstance(error, self._MPI.Exception)

    def _spent(self) -> None:
        _ABANDONED.append(self._comm)  # never freed: a collective on it may still be pending
