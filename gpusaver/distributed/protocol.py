"""The :class:`Coordinator` protocol, its checker, and the single-process coordinator.

A coordinator is how the processes (ranks) of one job that save one checkpoint talk to
each other. It moves bytes only; it knows nothing of files or arrays. gpusaver ships
implementations over ``torch.distributed`` and mpi4py; any other engine plugs in by
implementing the five members below.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gpusaver.errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["Coordinator", "SingleProcessCoordinator", "check_coordinator", "as_payload", "check_root"]


@runtime_checkable
class Coordinator(Protocol):
    """What gpusaver needs of a multi-process engine.

    Every rank of the job holds one coordinator, and every rank calls the same
    collectives (:meth:`all_gather_bytes`, :meth:`broadcast_bytes`, :meth:`barrier`) in
    the same order, as with MPI or ``torch.distributed``. A collective returns on a rank
    only once every rank has entered it.

    A save uses them to agree on a temporary directory's id (a broadcast), to gather each
    rank's encoded index entries and outcome on every rank (an all-gather of up to tens of
    MB per rank for 100k tensors), and to share the committing rank's outcome (a
    broadcast).

    Failures: an implementation must not hang for ever. When another rank dies, leaves,
    or does not enter the collective within the engine's timeout, the collective raises
    (gpusaver's own implementations raise :class:`gpusaver.errors.CoordinatorError`
    within ``config.get("coordinator_timeout")`` seconds) or the engine ends the process.

    Attributes:
        rank: this process's rank, ``0 <= rank < size``.
        size: the number of ranks.
    """

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (any length, possibly empty), in rank order, on every rank."""
        ...

    def broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        """Rank ``root``'s ``data`` on every rank; the other ranks pass ``None`` (their data is ignored)."""
        ...

    def barrier(self) -> None:
        """Returns once every rank has called it."""
        ...


_METHODS = ("all_gather_bytes", "broadcast_bytes", "barrier")


def check_coordinator(obj: object) -> Coordinator:
    """``obj`` itself, once it is seen to implement :class:`Coordinator`.

    Raises:
        InvalidArgumentTypeError: a member is missing or not callable, or ``rank``/``size``
            is not an int; the message names every such member.
        InvalidArgumentError: ``rank`` is outside ``0 <= rank < size``.
    """
    problems = []
    values: dict[str, int] = {}
    for name in ("rank", "size"):
        try:
            value = getattr(obj, name)
        except AttributeError:
            problems.append(f"no attribute {name!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name!r} is {value!r}, not an int")
        else:
            values[name] = value
    for name in _METHODS:
        method = getattr(obj, name, None)
        if method is None:
            problems.append(f"no method {name!r}")
        elif not callable(method):
            problems.append(f"{name!r} is not callable")
    if problems:
        raise InvalidArgumentTypeError(
            f"coordinator {type(obj).__module__}.{type(obj).__qualname__} does not implement "
            f"gpusaver.distributed.Coordinator (rank, size, all_gather_bytes, broadcast_bytes, barrier): "
            + "; ".join(problems)
        )
    if values["size"] < 1 or not 0 <= values["rank"] < values["size"]:
        raise InvalidArgumentError(
            f"coordinator {type(obj).__qualname__} has rank {values['rank']} and size {values['size']}; "
            "a coordinator needs size >= 1 and 0 <= rank < size"
        )
    return obj  # type: ignore[return-value]


def as_payload(data: object) -> memoryview:
    """``data`` (bytes, bytearray, memoryview or another buffer) as a flat byte view.

    Raises:
        InvalidArgumentTypeError: ``data`` is a str or not a buffer.
    """
    if isinstance(data, str) or data is None:
        raise InvalidArgumentTypeError(f"a coordinator moves bytes, not {type(data).__name__}")
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentTypeError(f"a coordinator moves bytes, not {type(data).__name__}") from None
    if not view.contiguous:
        raise InvalidArgumentError("a coordinator moves contiguous buffers only")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def check_root(root: object, size: int) -> int:
    """``root`` as a rank of ``size`` ranks.

    Raises:
        InvalidArgumentTypeError, InvalidArgumentError: not an int, or not a rank.
    """
    if isinstance(root, bool) or not isinstance(root, int):
        raise InvalidArgumentTypeError(f"root is a rank (an int), not {root!r}")
    if not 0 <= root < size:
        raise InvalidArgumentError(f"root {root} is not a rank of {size} (0 to {size - 1})")
    return root


class SingleProcessCoordinator:
    """The coordinator of one process alone: rank 0 of 1, every collective is local.

    This is what ``coordinator=None`` means.
    """

    rank = 0
    size = 1

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return [bytes(as_payload(data))]

    def broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        check_root(root, 1)
        if data is None:
            raise InvalidArgumentError("broadcast_bytes: the root (rank 0) must pass its data, not None")
        return bytes(as_payload(data))

    def barrier(self) -> None:
        return None

    def __repr__(self) -> str:
        return "SingleProcessCoordinator(rank=0, size=1)"
