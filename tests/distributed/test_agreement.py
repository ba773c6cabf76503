"""gpusaver.distributed.agreement: every rank agrees on the outcome, over ranks that are threads.

With several ranks every rank returns the same thing or raises the same CoordinatorError,
naming the lowest rank that failed; with one process a local error is raised as it is.
"""

from __future__ import annotations

import pytest

from gpusaver.distributed import SingleProcessCoordinator, agree, broadcast_result, check_same, shared_token
from gpusaver.errors import CoordinatorError, InvalidArgumentError
from threadranks import ThreadEngine, run_ranks


def _raised(results: list[object]) -> list[CoordinatorError]:
    assert all(isinstance(r, CoordinatorError) for r in results), results
    return results  # type: ignore[return-value]


def test_agree_returns_every_payload_on_every_rank() -> None:
    results = run_ranks(4, lambda c: agree(c, b"entries %d" % c.rank * (c.rank * 1000), what="the save"))
    expected = [b"entries %d" % k * (k * 1000) for k in range(4)]
    assert results == [expected] * 4


def test_agree_raises_the_lowest_failed_rank_s_error_on_every_rank() -> None:
    own = {1: KeyError("tensor 'w' missing on rank 1"), 3: OSError(28, "No space left on device")}

    def body(c: ThreadEngine) -> list[bytes]:
        return agree(c, b"ok", error=own.get(c.rank), what="the save of ckpt-7")

    for rank, e in enumerate(_raised(run_ranks(4, body))):
        assert str(e) == ("the save of ckpt-7 failed on rank 1 of 4 (ranks 1, 3 failed): KeyError: "
                          "\"tensor 'w' missing on rank 1\"")
        assert (e.rank, e.error_type) == (1, "KeyError")
        assert e.__cause__ is own.get(rank)  # a rank's own error stays attached there


def test_agree_names_the_module_of_non_builtin_errors() -> None:
    from gpusaver.errors import CheckpointWriteError

    def body(c: ThreadEngine) -> list[bytes]:
        error = CheckpointWriteError(5, "input/output error writing part-2", "part-2") if c.rank == 2 else None
        return agree(c, error=error)

    for e in _raised(run_ranks(3, body)):
        assert e.rank == 2 and e.error_type == "gpusaver.errors.CheckpointWriteError"
        assert "the operation failed on rank 2 of 3: CheckpointWriteError: [EIO] input/output error" in str(e)


def test_a_failure_message_without_text_shows_the_error() -> None:
    results = run_ranks(2, lambda c: agree(c, error=RuntimeError() if c.rank == 0 else None))
    assert all("failed on rank 0 of 2: RuntimeError: RuntimeError()" in str(e) for e in _raised(results))


def test_one_process_raises_its_own_error_unchanged() -> None:
    alone = SingleProcessCoordinator()
    assert agree(alone, b"mine") == [b"mine"]
    error = ValueError("duplicate name 'w'")
    with pytest.raises(ValueError) as info:
        agree(alone, error=error)
    assert info.value is error
    with pytest.raises(ZeroDivisionError):
        broadcast_result(alone, 0, lambda: 1 // 0)  # type: ignore[arg-type, return-value]
    assert broadcast_result(alone, 0, lambda: b"prefix") == b"prefix"


def test_broadcast_result_shares_the_root_s_result_or_error() -> None:
    calls: list[int] = []

    def ok(c: ThreadEngine) -> bytes:
        def commit() -> bytes:
            calls.append(c.rank)
            return b"ckpt/model-7"

        return broadcast_result(c, 2, commit, what="the commit")

    assert run_ranks(3, ok) == [b"ckpt/model-7"] * 3
    assert calls == [2]  # only the root computes

    def failing(c: ThreadEngine) -> bytes:
        def commit() -> bytes:
            raise PermissionError(13, "Permission denied", "ckpt/model-7.index")

        return broadcast_result(c, 2, commit, what="the commit")

    for rank, e in enumerate(_raised(run_ranks(3, failing))):
        assert (e.rank, e.error_type) == (2, "PermissionError")
        assert str(e).startswith("the commit failed on rank 2 of 3: PermissionError: [Errno 13] Permission denied")
        assert isinstance(e.__cause__, PermissionError) == (rank == 2)


def test_shared_token_is_the_same_on_every_rank_and_new_each_time() -> None:
    results = run_ranks(4, lambda c: (shared_token(c), shared_token(c, root=3)))
    firsts = {r[0] for r in results}
    seconds = {r[1] for r in results}
    assert len(firsts) == 1 and len(seconds) == 1 and firsts != seconds
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in firsts | seconds)


def test_check_same_passes_equal_values_and_names_the_rank_that_differs() -> None:
    assert run_ranks(3, lambda c: check_same(c, "ckpt/model|7")) == [None] * 3

    def differs(c: ThreadEngine) -> None:
        check_same(c, "ckpt/model-8" if c.rank == 2 else "ckpt/model-7", what="save()'s arguments")

    for e in run_ranks(3, differs):
        assert isinstance(e, InvalidArgumentError)
        assert str(e) == "save()'s arguments must be the same on every rank: rank 2 has 'ckpt/model-8', " \
                         "rank 0 has 'ckpt/model-7'"

    def long_values(c: ThreadEngine) -> None:
        check_same(c, b"x" * 1000 + bytes([c.rank > 0]))

    for e in run_ranks(3, long_values):
        assert isinstance(e, InvalidArgumentError)
        assert "rank 1 has a value with sha256 " in str(e) and "(2 ranks differ from rank 0)" in str(e)


def test_a_rank_out_of_the_protocol_is_reported_not_trusted() -> None:
    def body(c: ThreadEngine) -> list[bytes]:
        if c.rank == 1:  # sends raw bytes where agree() expects an outcome
            c.all_gather_bytes(b"\x07garbage")
            return []
        return agree(c, b"ok")

    results = run_ranks(2, body)
    assert results[1] == []
    assert isinstance(results[0], CoordinatorError) and "rank 1 sent no outcome" in str(results[0])
