"""Saver(coordinator=...) with ranks as threads of one process (tests/distributed/threadranks.py): the
save's own logic without an engine.

* replicated variables: written once, spread over their holders; holders that disagree on dtype or
  shape, or (check_replicas=True) on bytes, make every rank raise, naming both ranks; nothing written;
* a rank whose arguments are bad makes every rank raise, naming it;
* a rank with no variables takes part; a rank that fails while writing makes every rank raise and
  nothing is committed; the next save commits.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import gpusaver as gs
from gpusaver.errors import CoordinatorError
from gpusaver.format import BundleReader
from gpusaver.storage.fileops import PosixFileOps
from threadranks import run_ranks
from gpu_fake import fake  # noqa: F401 - the fixture


def _raised_everywhere(results: list, text: str) -> None:
    for k, r in enumerate(results):
        assert isinstance(r, CoordinatorError), (k, r)
        assert text in str(r), (k, str(r))


def test_replicated_variables_are_written_once_spread_over_their_holders(tmp_path) -> None:
    names = [f"w{j:02d}" for j in range(12)]

    def rank(c):
        state = {n: np.full(4, j, np.float32) for j, n in enumerate(names)}
        state[f"own{c.rank}"] = np.full(3, c.rank, np.int32)
        return gs.Saver(state, coordinator=c, check_replicas=True).save(str(tmp_path / "m"))

    assert run_ranks(3, rank) == [str(tmp_path / "m")] * 3
    with BundleReader(str(tmp_path / "m")) as reader:
        writers = [reader.entry(n).shard_id for n in names]  # one shard per rank here
        assert sorted(reader.variable_names()) == sorted(names + ["own0", "own1", "own2"])
    assert sorted(writers.count(k) for k in range(3)) == [4, 4, 4]


@pytest.mark.parametrize(
    "odd,text",
    [
        (np.full(4, 1, np.float64), "holds float32, rank 2 holds float64"),
        (np.full(5, 1, np.float32), "holds shape [4], rank 2 holds [5]"),
        (np.full(4, 9, np.float32), "differs between rank 0 and rank 2"),
    ],
)
def test_replicas_that_disagree_raise_on_every_rank_and_write_nothing(tmp_path, odd, text) -> None:
    def rank(c):
        w = odd if c.rank == 2 else np.full(4, 1, np.float32)
        return gs.Saver({"w": w, f"own{c.rank}": np.ones(2)}, coordinator=c, check_replicas=True).save(
            str(tmp_path / "m")
        )

    _raised_everywhere(run_ranks(3, rank), text)
    assert os.listdir(tmp_path) == []


def test_bad_arguments_on_one_rank_raise_on_every_rank(tmp_path) -> None:
    def rank(c):
        where = tmp_path / ("missing" if c.rank == 1 else "") / "m"
        return gs.Saver({f"v{c.rank}": np.ones(2)}, coordinator=c).save(str(where))

    _raised_everywhere(run_ranks(3, rank), "failed on rank 1 of 3")
    assert os.listdir(tmp_path) == []


class _Failing(PosixFileOps):
    def pwrite(self, fd, buffers, offset):
        raise OSError(28, "No space left on device")


def test_a_rank_failing_to_write_fails_every_rank_and_the_next_save_commits(tmp_path) -> None:
    def rank(c):
        ops = _Failing() if c.rank == 0 else PosixFileOps()
        saver = gs.Saver({f"v{c.rank}": np.arange(1000.0)}, coordinator=c, fileops=ops, allow_empty=True)
        try:
            saver.save(str(tmp_path / "m"), global_step=1)
        except CoordinatorError as e:
            first = e
        else:
            first = None
        saver2 = gs.Saver({f"v{c.rank}": np.arange(1000.0)} if c.rank else None, coordinator=c, allow_empty=True)
        return first, saver2.save(str(tmp_path / "m"), global_step=2)

    results = run_ranks(3, rank)
    for k, (first, second) in enumerate(results):
        assert isinstance(first, CoordinatorError) and "writing the shards failed on rank 0 of 3" in str(first), (k, first)
        assert second == str(tmp_path / "m-2")
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-2")
    assert sorted(gs.list_variables(str(tmp_path / "m-2"))) == [("v1", [1000]), ("v2", [1000])]
    assert not any("_temp_" in n or n.startswith("m-1") for n in os.listdir(tmp_path))


def test_gpu_arrays_of_two_ranks_fake_cupy(tmp_path, fake) -> None:
    """Each rank's arrays on its own (fake) GPU, one replicated on both, one partitioned across them:
    one checkpoint, the same bytes as one process saving the same values."""
    from gpu_fake import put, same, values

    hosts = {f"own{r}": values((33, 5), np.float32) for r in range(2)}
    hosts["shared"] = values((17,), np.float64)
    full = values((10, 4), np.int32)

    def rank(c):
        r = c.rank
        mine = [
            gs.Variable(put(fake, hosts[f"own{r}"], r), f"own{r}"),
            gs.Variable(put(fake, hosts["shared"], r), "shared"),
            gs.Variable(put(fake, full[5 * r : 5 * r + 5], r), "emb", full_shape=[10, 4], offset=[5 * r, 0]),
        ]
        return gs.Saver(mine, coordinator=c).save(str(tmp_path / "m"))

    assert run_ranks(2, rank) == [str(tmp_path / "m")] * 2
    reader = gs.load_checkpoint(str(tmp_path / "m"))
    for name, host in hosts.items():
        assert same(reader.get_tensor(name), host), name  # bit patterns (NaNs included)
    assert same(reader.get_tensor("emb"), full)


def test_a_capture_failing_on_one_rank_fails_every_rank_at_once(tmp_path, monkeypatch) -> None:
    """save_async by 3 ranks; rank 1's capture raises before its writing started: it raises that
    error, and the other ranks' results raise a CoordinatorError naming rank 1, without waiting for
    the coordinator's timeout; nothing is committed."""
    import threading

    from gpusaver import config
    from gpusaver.backends.numpy_backend import NumpyBackend

    local = threading.local()
    real = NumpyBackend.save_group

    def faulty(self, tensors, writer):
        if getattr(local, "fail", False):
            raise RuntimeError("a device fault while capturing")
        return real(self, tensors, writer)

    monkeypatch.setattr(NumpyBackend, "save_group", faulty)

    def rank(c):
        local.fail = c.rank == 1
        saver = gs.Saver({f"v{c.rank}": np.arange(100.0)}, coordinator=c)
        try:
            handle = saver.save_async(str(tmp_path / "m"))
        except RuntimeError as e:
            return e
        try:
            return handle.result(60)
        except CoordinatorError as e:
            return e

    with config.set(coordinator_timeout=120):  # far above the test's own wait: a timeout would show
        results = run_ranks(3, rank, timeout=120)
    assert isinstance(results[1], RuntimeError), results
    for k in (0, 2):
        assert isinstance(results[k], CoordinatorError) and "failed on rank 1 of 3" in str(results[k]), results
    assert gs.latest_checkpoint(str(tmp_path)) is None
    assert os.listdir(tmp_path) == []
