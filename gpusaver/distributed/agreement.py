"""Agreement between ranks, on top of any :class:`~gpusaver.distributed.Coordinator`.

What a multi-process save needs beyond moving bytes:

* :func:`agree`: every rank contributes its payload (e.g. its encoded index entries) or
  the error it met; every rank gets all payloads, or every rank raises the same
  :class:`~gpusaver.errors.CoordinatorError` naming the lowest rank that failed (one
  all-gather);
* :func:`broadcast_result`: one rank (the committing one) computes, every rank gets its
  result or raises its error (one broadcast);
* :func:`shared_token`: one random id for the whole job (a temporary directory's);
* :func:`check_same`: the ranks were called with the same arguments.

With one process (``size == 1``) no bytes move and a local error is raised as it is, so
a single-process caller sees exactly the errors it would see without a coordinator.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Callable, Sequence

from gpusaver.distributed.protocol import Coordinator, as_payload, check_root
from gpusaver.errors import CoordinatorError, InvalidArgumentError

__all__ = ["agree", "broadcast_result", "shared_token", "check_same"]

_OK = b"\x00"
_ERROR = b"\x01"
#: A failed rank's message travels up to this many characters.
_MESSAGE_LIMIT = 4000


def _type_name(error: BaseException) -> str:
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _encode_error(error: BaseException) -> bytes:
    message = str(error) or repr(error)
    if len(message) > _MESSAGE_LIMIT:
        message = message[:_MESSAGE_LIMIT] + " [...]"
    return _ERROR + json.dumps({"type": _type_name(error), "message": message}).encode()


def _decode(frame: bytes, rank: int) -> tuple[bytes | None, dict | None]:
    """``(payload, None)`` for a success, ``(None, {"type", "message"})`` for a failure."""
    tag, body = frame[:1], frame[1:]
    if tag == _OK:
        return body, None
    if tag == _ERROR:
        try:
            return None, dict(json.loads(body.decode()))
        except (ValueError, UnicodeDecodeError, TypeError):
            return None, {"type": "unknown", "message": "(an unreadable error report)"}
    return None, {"type": "unknown", "message": f"(rank {rank} sent no outcome: out of step?)"}


def _raise_failure(
    coordinator: Coordinator, failed: Sequence[tuple[int, dict]], what: str, own: BaseException | None
) -> None:
    rank, report = failed[0]
    short = report.get("type", "unknown").rsplit(".", 1)[-1]
    others = ""
    if len(failed) > 1:
        others = f" (ranks {', '.join(str(k) for k, _ in failed)} failed)"
    raise CoordinatorError(
        f"{what} failed on rank {rank} of {coordinator.size}{others}: {short}: {report.get('message', '')}",
        rank=rank,
        error_type=report.get("type"),
    ) from own


def agree(
    coordinator: Coordinator, payload: bytes = b"", *, error: BaseException | None = None, what: str = "the operation"
) -> list[bytes]:
    """Every rank's ``payload``, in rank order, once every rank has succeeded.

    Each rank passes ``error``, the exception it met (None if it succeeded); a failed rank's
    payload is ignored.

    Returns:
        The payloads of all ranks (on every rank).

    Raises:
        CoordinatorError: on every rank, when any rank failed: ``rank`` is the lowest rank
            that failed, ``error_type`` its exception's type, the message names ``what``,
            the rank and its error; ``__cause__`` is this rank's own ``error``, if any.
            Also when the coordinator itself fails (a rank died, a timeout).
        BaseException: with one process, ``error`` itself.
    """
    if coordinator.size == 1:
        if error is not None:
            raise error
        return [bytes(as_payload(payload))]
    frame = _encode_error(error) if error is not None else _OK + bytes(as_payload(payload))
    frames = coordinator.all_gather_bytes(frame)
    payloads: list[bytes] = []
    failed: list[tuple[int, dict]] = []
    for rank, got in enumerate(frames):
        body, report = _decode(got, rank)
        if report is not None:
            failed.append((rank, report))
        else:
            payloads.append(body)  # type: ignore[arg-type]
    if failed:
        _raise_failure(coordinator, failed, what, error)
    return payloads


def broadcast_result(
    coordinator: Coordinator, root: int, compute: Callable[[], bytes], *, what: str = "the operation"
) -> bytes:
    """Rank ``root`` calls ``compute()``; every rank returns its result or raises its error.

    The other ranks do not call ``compute``.

    Raises:
        CoordinatorError: on every rank, when ``compute`` raised an ``Exception`` on the
            root (``rank`` is the root; there ``__cause__`` is the exception itself), or the
            coordinator failed.
        Exception: with one process, what ``compute`` raised.
    """
    root = check_root(root, coordinator.size)
    if coordinator.size == 1:
        return bytes(as_payload(compute()))
    own: Exception | None = None
    frame: bytes | None = None
    if coordinator.rank == root:
        try:
            frame = _OK + bytes(as_payload(compute()))
        except Exception as e:  # noqa: BLE001 - reported to every rank
            own = e
            frame = _encode_error(e)
    got = coordinator.broadcast_bytes(frame, root)
    body, report = _decode(got, root)
    if report is not None:
        _raise_failure(coordinator, [(root, report)], what, own)
    return body  # type: ignore[return-value]


def shared_token(coordinator: Coordinator, root: int = 0) -> str:
    """A random hex id (uuid4), the same on every rank (rank ``root`` draws it)."""
    token = uuid.uuid4().hex.encode() if coordinator.rank == root else None
    return coordinator.broadcast_bytes(token, root).decode("ascii")


#: Values up to this size travel whole (for a readable message); longer ones as a digest.
_SAME_LIMIT = 256


def check_same(coordinator: Coordinator, value: bytes | str, *, what: str = "the arguments") -> None:
    """Checks that every rank passed the same ``value`` (e.g. the arguments of a save).

    Raises:
        InvalidArgumentError: on every rank, when the values differ; the message names
            the first rank whose value differs from rank 0's, and both values when short.
        CoordinatorError: the coordinator failed.
    """
    raw = value.encode() if isinstance(value, str) else bytes(as_payload(value))
    sent = b"v" + raw if len(raw) <= _SAME_LIMIT else b"h" + hashlib.sha256(raw).digest()
    values = coordinator.all_gather_bytes(sent)
    odd = [k for k, v in enumerate(values) if v != values[0]]
    if not odd:
        return

    def shown(v: bytes) -> str:
        return repr(v[1:].decode(errors="replace")) if v[:1] == b"v" else f"a value with sha256 {v[1:9].hex()}..."

    k = odd[0]
    raise InvalidArgumentError(
        f"{what} must be the same on every rank: rank {k} has {shown(values[k])}, rank 0 has {shown(values[0])}"
        + (f" ({len(odd)} ranks differ from rank 0)" if len(odd) > 1 else "")
    )
