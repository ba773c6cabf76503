"""An ``on_phase`` callback that raises: disk, state file and retention agree with what the caller is told.

The rule (``gpusaver.saver.observe_phases``): a callback that raises in a phase that ends before the
commit point fails the save: the caller gets the callback's error, and nothing is committed,
nothing left behind (no index, no data files, no temp directory), the state file and the kept
checkpoints as they were. In a phase after the commit point (``merge``, ``total``, ``snapshot``) the
save stands: it returns its prefix, the checkpoint restores, the state file names it, retention
ran, no temp directory is left; the error arrives as a PhaseCallbackWarning.

Every phase a save reports is tried, for save and save_async, one file or a shard per device,
and with ranks.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest

import gpusaver as gs
from gpusaver.saver import AFTER_COMMIT_PHASES, PhaseCallbackWarning

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
from threadranks import run_ranks  # noqa: E402


class Boom(Exception):
    pass


def _state() -> dict:
    return {"a": np.arange(1000, dtype=np.float32), "b": gs.Variable(np.ones(300), device="/cpu:1")}


def _phases(tmp_path, sharded: bool, asynchronous: bool) -> list[str]:
    seen: list[str] = []
    saver = gs.Saver(_state(), sharded=sharded, on_phase=lambda p, s: seen.append(p))
    if asynchronous:
        saver.save_async(str(tmp_path / "probe")).result()
    else:
        saver.save(str(tmp_path / "probe"))
    saver.close()
    for f in os.listdir(tmp_path):
        os.remove(tmp_path / f)
    return sorted(set(seen))


def _cases():
    out = []
    for sharded in (False, True):
        for asynchronous in (False, True):
            out.append((sharded, asynchronous))
    return out


def _listing(directory) -> set[str]:
    return set(os.listdir(directory))


@pytest.mark.parametrize("sharded,asynchronous", _cases())
def test_every_phase(tmp_path, sharded, asynchronous) -> None:
    phases = _phases(tmp_path, sharded, asynchronous)
    assert {"merge", "total"} <= set(phases) and any(p.startswith("shard:") for p in phases)
    for phase in phases:
        d = tmp_path / phase.replace(":", "_")
        d.mkdir()
        armed = {"on": False}

        def on_phase(p: str, seconds: float) -> None:
            if armed["on"] and p == phase:
                raise Boom(p)

        saver = gs.Saver(_state(), sharded=sharded, max_to_keep=2, on_phase=on_phase)
        for step in (1, 2):
            saver.save(str(d / "model"), global_step=step)
        before = _listing(d)
        state_before = (d / "checkpoint").read_bytes()
        armed["on"] = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if asynchronous:
                    result = saver.save_async(str(d / "model"), global_step=3).result()
                else:
                    result = saver.save(str(d / "model"), global_step=3)
                error = None
            except Boom as e:
                error = e
        armed["on"] = False
        saver.close()
        leftovers = [f for f in _listing(d) if "_temp" in f]
        assert not leftovers, (phase, leftovers)
        if phase in AFTER_COMMIT_PHASES:
            assert error is None, (phase, error)
            assert result == str(d / "model-3")
            assert [w for w in caught if issubclass(w.category, PhaseCallbackWarning) and phase in str(w.message)]
            assert gs.latest_checkpoint(str(d)) == result
            assert (gs.load(result)["a"] == np.arange(1000)).all()
            assert not any(f.startswith("model-1.") for f in _listing(d)), "retention did not run"
            assert gs.get_checkpoint_state(str(d)).all_model_checkpoint_paths == [
                str(d / "model-2"), str(d / "model-3")]
        else:
            assert isinstance(error, Boom), (phase, error)
            assert _listing(d) == before, (phase, _listing(d) ^ before)
            assert (d / "checkpoint").read_bytes() == state_before
            assert gs.latest_checkpoint(str(d)) == str(d / "model-2")


def test_warnings_as_errors_still_never_undo_a_committed_save(tmp_path, caplog) -> None:
    def on_phase(p: str, seconds: float) -> None:
        if p == "total":
            raise Boom(p)

    saver = gs.Saver(_state(), on_phase=on_phase)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefix = saver.save(str(tmp_path / "m"))
    assert gs.latest_checkpoint(str(tmp_path)) == prefix
    assert "the save stands" in caplog.text


@pytest.mark.filterwarnings("ignore::gpusaver.saver.PhaseCallbackWarning")
@pytest.mark.parametrize("phase", ["shard", "merge", "total"])
def test_ranks(tmp_path, phase) -> None:
    """With ranks a callback raising before the commit on one rank fails the save on every rank;
    after it the save stands everywhere."""
    def rank(c):
        def on_phase(p: str, seconds: float) -> None:
            if p.split(":")[0] == phase and (phase != "shard" or c.rank == 1):
                raise Boom(f"{p} on rank {c.rank}")

        saver = gs.Saver({"w": np.ones(8), f"own{c.rank}": np.zeros(3)}, coordinator=c, on_phase=on_phase)
        return saver.save(str(tmp_path / "m"))

    results = run_ranks(2, rank)
    assert not [f for f in os.listdir(tmp_path) if "_temp" in f]
    if phase == "shard":
        assert all(isinstance(r, Exception) for r in results), results
        assert not (tmp_path / "m.index").exists()
        assert gs.latest_checkpoint(str(tmp_path)) is None
    else:
        assert results == [str(tmp_path / "m")] * 2, results
        assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m")
        assert (gs.load(str(tmp_path / "m"))["w"] == 1).all()


@pytest.mark.parametrize("phase", ["merge", "total"])
def test_a_keyboard_interrupt_after_the_commit_point_is_raised_once_the_save_is_recorded(tmp_path, phase) -> None:
    """Ctrl-C in a callback after the commit: the interrupt reaches the caller (never swallowed), but
    only once the checkpoint is recorded and retention ran; it used to leave the checkpoint committed,
    unrecorded and never cleaned."""
    armed = {"on": False}

    def on_phase(p: str, seconds: float) -> None:
        if armed["on"] and p == phase:
            raise KeyboardInterrupt

    saver = gs.Saver(_state(), max_to_keep=1, on_phase=on_phase)
    saver.save(str(tmp_path / "m"), global_step=1)
    armed["on"] = True
    with pytest.raises(KeyboardInterrupt):
        saver.save(str(tmp_path / "m"), global_step=2)
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-2")
    assert saver.last_checkpoints == [str(tmp_path / "m-2")]
    assert not [f for f in os.listdir(tmp_path) if f.startswith("m-1") or "_temp" in f]
