"""What gpusaver's engine coordinators (torch.distributed, MPI) share.

Each collective travels in two steps: a small fixed-size header (operation, sequence
number, length, root), then the payload. The header lets every rank check that all
ranks are in the same collective (ranks that fall out of step raise instead of mixing
up each other's bytes), and lets the payload step size its buffers. An engine
implements four primitives (:meth:`EngineCoordinator._gather_ints`,
:meth:`~EngineCoordinator._gather_payload`, :meth:`~EngineCoordinator._broadcast_ints`,
:meth:`~EngineCoordinator._broadcast_payload`); each raises
:meth:`EngineCoordinator._timed_out`'s error when the others do not answer within
:attr:`EngineCoordinator.timeout` seconds, or the engine's own error when a peer is lost.

After any failure the coordinator is spent: every later call raises at once, since the
engine's state (a collective still pending, peers gone) no longer lets ranks agree.
"""

from __future__ import annotations

import abc
import threading
from typing import Callable, Iterator, TypeVar

import numpy as np

from gpusaver import config
from gpusaver.distributed.protocol import as_payload, check_root
from gpusaver.errors import CoordinatorError, InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["EngineCoordinator", "resolve_timeout"]

T = TypeVar("T")

#: Header operation codes (a constant high part makes garbage unlikely to pass as a header).
_MAGIC = 0x67_70_73_00
_OPS = {_MAGIC + 1: "all_gather_bytes", _MAGIC + 2: "broadcast_bytes", _MAGIC + 3: "barrier"}
_CODE = {name: code for code, name in _OPS.items()}


def resolve_timeout(timeout: float | None) -> float:
    """``timeout`` seconds, or the ``coordinator_timeout`` setting now when None.

    Raises:
        InvalidArgumentTypeError, InvalidArgumentError: not a positive number.
    """
    if timeout is None:
        return float(config.get("coordinator_timeout"))
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentTypeError(f"timeout is a number of seconds, not {timeout!r}")
    if not timeout > 0:
        raise InvalidArgumentError(f"timeout must be above 0 seconds, not {timeout!r}")
    return float(timeout)


def _op_name(code: int) -> str:
    return _OPS.get(int(code), f"an unknown message ({int(code):#x})")


class EngineCoordinator(abc.ABC):
    """A :class:`~gpusaver.distributed.Coordinator` over an engine's four primitives.

    Thread-safe: collectives from several threads of one rank run one at a time.

    Attributes:
        timeout: seconds each step of a collective waits for the other ranks.
        engine: the engine, in words, for messages.
    """

    def __init__(self, rank: int, size: int, engine: str, timeout: float) -> None:
        self._rank = rank
        self._size = size
        self.engine = engine
        self.timeout = timeout
        self._seq = 0
        self._failed: CoordinatorError | None = None
        self._current: tuple[str, int] = ("", 0)
        self._lock = threading.Lock()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        state = f", failed: {self._failed}" if self._failed is not None else ""
        return f"{type(self).__name__}(rank={self._rank}, size={self._size}, engine={self.engine!r}{state})"

    # -- the engine's primitives -------------------------------------------------------------

    @abc.abstractmethod
    def _gather_ints(self, values: np.ndarray) -> np.ndarray:
        """Every rank's int64 vector (all of one length), as rows in rank order."""

    @abc.abstractmethod
    def _gather_payload(self, data: memoryview, lengths: list[int]) -> list[bytes]:
        """Every rank's bytes; ``lengths[k]`` is rank k's length (known to every rank)."""

    @abc.abstractmethod
    def _broadcast_ints(self, values: np.ndarray, root: int) -> np.ndarray:
        """Rank ``root``'s int64 vector (every rank passes one of the same length)."""

    @abc.abstractmethod
    def _broadcast_payload(self, data: memoryview | None, length: int, root: int) -> bytes:
        """Rank ``root``'s ``length`` bytes (``data`` on the root, None elsewhere)."""

    def _engine_error(self, error: Exception) -> bool:
        """Whether ``error`` is the engine's own (a lost peer, a broken connection), not a bug here."""
        return False

    def _spent(self) -> None:
        """Called once, at the first failure: an engine may release or keep what it holds."""

    # -- the protocol ---------------------------------------------------------------------------

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        view = as_payload(data)
        with self._step("all_gather_bytes") as seq:
            headers = self._call("all_gather_bytes", seq, self._gather_ints,
                                 np.array([_CODE["all_gather_bytes"], seq, len(view)], dtype=np.int64))
            self._check_gathered(headers, "all_gather_bytes", seq)
            lengths = [int(n) for n in headers[:, 2]]
            if not any(lengths):
                return [b""] * self._size
            return self._call("all_gather_bytes", seq, self._gather_payload, view, lengths)

    def broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        root = check_root(root, self._size)
        view: memoryview | None = None
        if self._rank == root:
            if data is None:
                raise InvalidArgumentError(f"broadcast_bytes: the root (rank {root}) must pass its data, not None")
            view = as_payload(data)
        with self._step("broadcast_bytes") as seq:
            mine = np.array([_CODE["broadcast_bytes"], seq, len(view) if view is not None else 0, root],
                            dtype=np.int64)
            header = self._call("broadcast_bytes", seq, self._broadcast_ints, mine, root)
            if (int(header[0]), int(header[1]), int(header[3])) != (int(mine[0]), seq, root):
                raise self._failure(CoordinatorError(
                    f"rank {self._rank} of {self._size}: ranks out of step: this rank is in broadcast_bytes "
                    f"from rank {root} (collective #{seq}), rank {root} sent {_op_name(header[0])} "
                    f"(collective #{int(header[1])}, from rank {int(header[3])}); every rank must call the "
                    "coordinator's collectives in the same order"))
            length = int(header[2])
            if length == 0:
                return b""
            return self._call("broadcast_bytes", seq, self._broadcast_payload, view, length, root)

    def barrier(self) -> None:
        with self._step("barrier") as seq:
            headers = self._call("barrier", seq, self._gather_ints,
                                 np.array([_CODE["barrier"], seq, 0], dtype=np.int64))
            self._check_gathered(headers, "barrier", seq)

    # -- framing, failures --------------------------------------------------------------------

    def _step(self, what: str) -> "_Step":
        return _Step(self, what)

    def _check_gathered(self, headers: np.ndarray, what: str, seq: int) -> None:
        steps = [(int(headers[k, 0]), int(headers[k, 1])) for k in range(self._size)]
        if all(step == (_CODE[what], seq) for step in steps):
            return
        groups: dict[tuple[int, int], list[int]] = {}
        for k, step in enumerate(steps):
            groups.setdefault(step, []).append(k)
        where = "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks[:8]))}{' ...' if len(ranks) > 8 else ''} "
            f"in {_op_name(code)} (collective #{number})"
            for (code, number), ranks in groups.items())
        raise self._failure(CoordinatorError(
            f"rank {self._rank} of {self._size}: ranks out of step in {what} (collective #{seq}): {where}; "
            "every rank must call the coordinator's collectives in the same order"))

    def _timed_out(self, detail: str) -> CoordinatorError:
        """The error a primitive raises when the other ranks did not answer within the timeout."""
        what, seq = self._current
        return CoordinatorError(
            f"rank {self._rank} of {self._size}: {what} (collective #{seq}) over {self.engine}: the other ranks "
            f"did not all answer within {self.timeout:g} s (coordinator_timeout); a rank has died, hangs, or is "
            f"not calling the same collectives ({detail})")

    def _call(self, what: str, seq: int, primitive: Callable[..., T], *args: object) -> T:
        self._current = (what, seq)
        try:
            return primitive(*args)
        except CoordinatorError as e:
            self._failure(e)
            raise
        except Exception as e:
            hint = "; another rank has probably died or left the job" if self._engine_error(e) else ""
            raise self._failure(CoordinatorError(
                f"rank {self._rank} of {self._size}: {what} (collective #{seq}) failed in {self.engine}: "
                f"{type(e).__name__}: {e}{hint}")) from e
        except BaseException:  # KeyboardInterrupt, SystemExit: the engine's state is unknown now
            self._failure(CoordinatorError(
                f"rank {self._rank} of {self._size}: {what} (collective #{seq}) was interrupted"))
            raise

    def _failure(self, error: CoordinatorError) -> CoordinatorError:
        """``error``, recorded as what spent this coordinator if it is the first failure."""
        if self._failed is None:
            self._failed = error
            try:
                self._spent()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        return error


class _Step:
    """One collective: serialised with the others, numbered, refused once the coordinator is spent."""

    def __init__(self, owner: EngineCoordinator, what: str) -> None:
        self._owner = owner
        self._what = what

    def __enter__(self) -> int:
        owner = self._owner
        owner._lock.acquire()
        if owner._failed is not None:
            owner._lock.release()
            raise CoordinatorError(
                f"rank {owner._rank} of {owner._size}: {self._what}: this coordinator failed earlier and cannot "
                f"be used again ({owner._failed})") from owner._failed
        owner._seq += 1
        return owner._seq

    def __exit__(self, *exc: object) -> None:
        self._owner._lock.release()


def chunk_plan(lengths: list[int], limit: int) -> Iterator[tuple[int, list[int]]]:
    """Rounds of a gather of ``lengths`` bytes in messages of at most ``limit`` bytes in all.

    Yields ``(offset, counts)``: in each round rank k sends ``counts[k]`` bytes from ``offset``
    of its data. One round when everything fits.
    """
    top = max(lengths)
    chunk = top if sum(lengths) <= limit else max(1, limit // len(lengths))
    for offset in range(0, top, chunk):
        yield offset, [max(0, min(chunk, n - offset)) for n in lengths]
