"""A restore across ranks agrees before it acts: no rank writes a byte until every rank has checked
its variables against the checkpoint, and the ranks first compare the restore's arguments.

* ranks given different prefixes (or strict, cast) all raise, naming the ranks, and every array
  keeps its value (not a mix of replicated weights from two checkpoints);
* a name missing on one rank, a dtype or shape that does not fit on one rank, an immutable leaf on
  one rank: every rank raises, naming that rank, and every rank's arrays are unchanged;
* a rank with nothing to restore (allow_empty) takes part;
* the same over random layouts (hypothesis): which rank is at fault and how, over 2-4 ranks.
Ranks are threads of one process (tests/distributed/threadranks.py); under real torchrun the same
is tested by test_restore_agreement_torchrun.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gpusaver as gs
from gpusaver.errors import CoordinatorError, InvalidArgumentError
from threadranks import run_ranks


def _checkpoints(tmp_path, size: int) -> tuple[str, str]:
    """Two checkpoints of the same variables, one with 7s and one with 9s (saved by ``size`` ranks)."""
    def rank(c, value):
        state = {"w": np.full(4, value, np.float32), f"own{c.rank}": np.full(2, value, np.float32)}
        return gs.Saver(state, coordinator=c).save(str(tmp_path / f"ck{value}"))

    for value in (7, 9):
        results = run_ranks(size, lambda c: rank(c, value))
        assert all(isinstance(r, str) for r in results), results
    return str(tmp_path / "ck7"), str(tmp_path / "ck9")


def _fresh(c) -> dict[str, np.ndarray]:
    return {"w": np.zeros(4, np.float32), f"own{c.rank}": np.zeros(2, np.float32)}


def test_different_prefixes_raise_everywhere_and_change_nothing(tmp_path) -> None:
    seven, nine = _checkpoints(tmp_path, 3)
    arrays: dict[int, dict] = {}

    def rank(c):
        arrays[c.rank] = state = _fresh(c)
        return gs.Saver(state, coordinator=c).restore(nine if c.rank == 0 else seven)

    results = run_ranks(3, rank)
    for k, r in enumerate(results):
        assert isinstance(r, InvalidArgumentError), (k, r)
        assert "the restore's prefix and arguments must be the same on every rank" in str(r)
        assert "rank 1" in str(r)
    for state in arrays.values():
        for a in state.values():
            assert (a == 0).all()


@pytest.mark.parametrize("odd", [{"strict": False}, {"cast": True}])
def test_different_strict_or_cast_raise_everywhere(tmp_path, odd) -> None:
    seven, _ = _checkpoints(tmp_path, 2)

    def rank(c):
        kwargs = odd if c.rank == 1 else {}
        return gs.Saver(_fresh(c), coordinator=c).restore(seven, **kwargs)

    for r in run_ranks(2, rank):
        assert isinstance(r, InvalidArgumentError) and "must be the same on every rank" in str(r), r


@pytest.mark.parametrize(
    "fault,text",
    [
        ("missing", "not found in checkpoint"),
        ("dtype", "DTypeMismatchError"),
        ("shape", "ShapeMismatchError"),
        ("immutable", "cannot be restored in place"),
    ],
)
def test_one_rank_that_does_not_fit_stops_every_rank_before_a_write(tmp_path, fault, text) -> None:
    seven, _ = _checkpoints(tmp_path, 3)
    arrays: dict[int, dict] = {}

    def rank(c):
        state = _fresh(c)
        if c.rank == 1:
            if fault == "missing":
                state["nowhere"] = np.zeros(1)
            elif fault == "dtype":
                state["own1"] = np.zeros(2, np.float64)
            elif fault == "shape":
                state["own1"] = np.zeros(3, np.float32)
            else:
                state["scalar"] = 3
        arrays[c.rank] = state
        return gs.Saver(state, coordinator=c).restore(seven)

    results = run_ranks(3, rank)
    for k, r in enumerate(results):
        assert isinstance(r, CoordinatorError), (k, r)
        assert r.rank == 1 and text in f"{r} {r.error_type}", (k, r, r.error_type)
    for state in arrays.values():
        for name, a in state.items():
            if isinstance(a, np.ndarray):
                assert (a == 0).all(), name  # rank 0 and 2 fit, and still wrote nothing


def test_agreed_restore_restores_everywhere_and_an_empty_rank_takes_part(tmp_path) -> None:
    seven, nine = _checkpoints(tmp_path, 3)
    arrays = {}

    def rank(c):
        if c.rank == 2:
            return gs.Saver(None, allow_empty=True, coordinator=c).restore(nine)
        arrays[c.rank] = state = _fresh(c)
        return gs.Saver(state, coordinator=c).restore(nine)

    results = run_ranks(3, rank)
    assert results[2] is None and all(r is not None and not isinstance(r, Exception) for r in results[:2]), results
    for state in arrays.values():
        for a in state.values():
            assert (a == 9).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(2, 4), data=st.data())
def test_random_faults_any_rank_nothing_written_anywhere(tmp_path_factory, size, data) -> None:
    tmp = tmp_path_factory.mktemp("agree")
    seven, nine = _checkpoints(tmp, size)
    faults = data.draw(st.lists(st.sampled_from(["none", "prefix", "missing", "dtype", "shape", "strict"]),
                                min_size=size, max_size=size))
    arrays = {}

    def rank(c):
        state = _fresh(c)
        fault = faults[c.rank]
        prefix, kwargs = seven, {}
        if fault == "prefix":
            prefix = nine
        elif fault == "missing":
            state["nowhere"] = np.zeros(1)
        elif fault == "dtype":
            state[f"own{c.rank}"] = np.zeros(2, np.int32)
        elif fault == "shape":
            state["w"] = np.zeros(5, np.float32)
        elif fault == "strict":
            kwargs = {"strict": False}
        arrays[c.rank] = state
        return gs.Saver(state, coordinator=c).restore(prefix, **kwargs)

    results = run_ranks(size, rank)
    # The arguments differ where some ranks (not all) changed them, or all of them from rank 0's.
    args = [("prefix" if f == "prefix" else "", "strict" if f == "strict" else "") for f in faults]
    bad = any(a != args[0] for a in args) or any(f in ("missing", "dtype", "shape") for f in faults)
    if bad:
        for k, r in enumerate(results):
            assert isinstance(r, (CoordinatorError, InvalidArgumentError)), (faults, k, r)
        for state in arrays.values():
            for a in state.values():
                assert (a == 0).all(), faults
    else:
        want = 9 if faults[0] == "prefix" else 7
        assert not any(isinstance(r, Exception) for r in results), (faults, results)
        for state in arrays.values():
            for a in state.values():
                assert (a == want).all(), faults


@pytest.mark.parametrize("call", ["save", "save_async", "restore"])
def test_an_error_before_the_first_agreement_is_raised_on_every_rank_at_once(tmp_path, call) -> None:
    """A rank whose call fails before the ranks first talk (here its tensor's views cannot be made
    anew: a resize_ that torch refused left sizes past the storage): every rank raises, naming it, at
    once; the others used to wait for it until the coordinator's timeout."""
    torch = pytest.importorskip("torch")
    seven, _ = _checkpoints(tmp_path, 2)

    def rank(c):
        state = {"w": np.zeros(4, np.float32), f"own{c.rank}": torch.zeros(2)}
        saver = gs.Saver(state, coordinator=c)
        if c.rank == 1:
            with pytest.raises(RuntimeError):
                state["own1"].resize_(100)  # refused (a NumPy view shares it), but the sizes stay changed
        if call == "save":
            return saver.save(str(tmp_path / "again"))
        if call == "save_async":
            return saver.save_async(str(tmp_path / "again")).result()
        return saver.restore(seven, strict=False)

    for k, r in enumerate(run_ranks(2, rank, timeout=600.0)):
        assert isinstance(r, CoordinatorError), (k, r)
        assert r.rank == 1 and r.error_type.endswith("InvalidArgumentError"), (k, r, r.error_type)
        assert "reach past its storage" in str(r), (k, r)
    assert not (tmp_path / "again.index").exists()
