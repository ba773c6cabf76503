"""Saver(coordinator=...) over real engines: 4 ranks under torchrun (gloo) and under mpiexec (mpi4py).

One launch per engine runs ``save_worker.py``'s ``save``, ``mismatch`` and ``unshared`` scenarios;
another its ``kill`` scenario. Afterwards this process checks the files: one checkpoint of 8 shards
(two per rank), every variable once, the replicated ones written by every rank in turn, retention
applied by the coordinator rank, TensorFlow's reader seeing every tensor, a single process
restoring what 4 ranks saved; after a rank was killed mid-save, the newest checkpoint is the one
before and restores.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np
import pytest

import gpusaver as gs
from test_engines import RANKS, _env, _launch, _mpiexec, _free_port, _ulfm_missing, needs_mpi, needs_torch

pytestmark = pytest.mark.slow

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "save_worker.py"
sys.path.insert(0, str(HERE))
import save_worker  # noqa: E402  (its value functions only; its main runs under the launchers)


def _run(
    engine: str, out: pathlib.Path, ckpt: pathlib.Path, *scenarios: str, ranks: int = RANKS, options: tuple = ()
) -> tuple[int, str]:
    if engine == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(WORKER), "torch", str(ckpt),
               *scenarios]
    else:
        cmd = [str(_mpiexec()), "-n", str(ranks), "--allow-run-as-root", "--oversubscribe", *options,
               sys.executable, "-m", "mpi4py", str(WORKER), "mpi", str(ckpt), *scenarios]
    return _launch(cmd, _env(out))


def _reports(out: pathlib.Path) -> dict[int, list[dict]]:
    got = {}
    for k in range(RANKS):
        path = out / f"rank-{k}.jsonl"
        got[k] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return got


def _all_values(step: int) -> dict[str, np.ndarray]:
    out = dict(save_worker.replicated_values(step))
    for k in range(RANKS):
        out.update(save_worker.own_values(k, step))
    return out


ENGINES = [pytest.param("torchrun", marks=needs_torch), pytest.param("mpiexec", marks=needs_mpi)]


@pytest.mark.parametrize("engine", ENGINES)
def test_four_ranks_save_one_checkpoint_and_errors_raise_everywhere(engine, tmp_path, tf) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    ckpt.mkdir()
    rc, output = _run(engine, out, ckpt, "save", "mismatch", "unshared", "async")
    got = _reports(out)
    assert rc == 0, output[-4000:]
    for k in range(RANKS):
        events = [r["event"] for r in got[k]]
        assert events == ["saved", "raised", "raised", "saved", "done"], (k, got[k], output[-3000:])
        saved = got[k][0]
        assert saved["paths"] == [str(ckpt / f"model-{s}") for s in (1, 2, 3)]  # the same prefix on every rank
        assert saved["restored"] and saved["missing"] == []
        mismatch, unshared = got[k][1], got[k][2]
        assert "must be the same on every rank" in mismatch["message"] and "rank 3" in mismatch["message"], mismatch
        assert unshared["type"] == "CoordinatorError" and "rank 3 of 4" in unshared["message"], unshared
        assert "cannot see the data file" in unshared["message"] and "that rank 1 wrote on host" in unshared["message"]
        assert "share a file system" in unshared["message"]
        assert got[k][3]["paths"] == [str(ckpt / "model-10")] and got[k][3]["restored"], got[k][3]
    # retention by the coordinator rank: two kept; nothing of steps 4, 5 or 99; no temp dirs
    assert got[RANKS - 1][0]["kept"] == [str(ckpt / "model-2"), str(ckpt / "model-3")]
    assert got[RANKS - 1][3]["kept"] == [str(ckpt / "model-3"), str(ckpt / "model-10")]
    names = sorted(os.listdir(ckpt))
    assert names == sorted(
        ["checkpoint", "model-3.index", "model-10.index"]
        + [f"model-{s}.data-{k:05d}-of-00008" for s in (3, 10) for k in range(8)]
    ), names
    assert gs.latest_checkpoint(str(ckpt)) == str(ckpt / "model-10")
    assert all(np.array_equal(gs.load_checkpoint(str(ckpt / "model-10")).get_tensor(n), v)
               for n, v in _all_values(10).items())  # the values during save_async, not after
    want = _all_values(3)
    # TensorFlow's reader sees every tensor once, with its value
    reader = tf.train.load_checkpoint(str(ckpt / "model-3"))
    assert set(reader.get_variable_to_shape_map()) == set(want)
    for name, value in want.items():
        assert np.array_equal(reader.get_tensor(name), value), name
    # replicated variables were written by every rank in turn (shards 2k and 2k+1 are rank k's)
    from gpusaver.format import BundleReader

    with BundleReader(str(ckpt / "model-3")) as bundle:
        writers = {bundle.entry(f"shared/w{j:02d}").shard_id // 2 for j in range(save_worker.REPLICATED)}
    assert writers == set(range(RANKS))
    # one process restores what four saved
    blank = {n: np.zeros_like(v) for n, v in want.items()}
    gs.Saver(blank).restore(str(ckpt / "model-3"))
    assert all(np.array_equal(blank[n], v) for n, v in want.items())


@pytest.mark.parametrize("engine", ENGINES)
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(engine, tmp_path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    ckpt.mkdir()
    rc, output = _run(engine, out, ckpt, "kill")  # bounded by the hang guard: the job ends
    got = _reports(out)
    assert rc != 0, output[-3000:]
    assert all(got[k] and got[k][0]["event"] == "saved" for k in range(RANKS)), (got, output[-3000:])
    assert not any(r["event"] in ("no error", "done") for k in range(RANKS) for r in got[k]), got
    assert gs.latest_checkpoint(str(ckpt)) == str(ckpt / "model-6")
    want = _all_values(6)
    blank = {n: np.zeros_like(v) for n, v in want.items()}
    gs.Saver(blank).restore(str(ckpt / "model-6"))
    assert all(np.array_equal(blank[n], v) for n, v in want.items())
    assert not (ckpt / "model-7.index").exists()
    # the next save (one process) cleans what the dead job left
    gs.Saver(blank).save(str(ckpt / "model"), global_step=8)
    leftovers = [n for n in os.listdir(ckpt) if "_temp_" in n or n.startswith("model-7")]
    # ... except a temp directory whose rank torchrun stopped in the instant between creating it and
    # locking its owner record (seen once, in a plain run of the suite): nothing tells it from a live
    # save's first microseconds, so the cleaner takes it once it is ORPHAN_AGE old (README), never sooner
    unowned = [n for n in leftovers if "_temp_" in n and not (ckpt / n / "OWNER").exists()]
    assert [n for n in leftovers if n not in unowned] == [], leftovers
    if unowned:
        from gpusaver.pipeline import tempdirs

        assert tempdirs.clean_stale_temp_dirs(str(ckpt)) == []  # not yet: it could be a live save's
        aged = os.stat(ckpt / unowned[0]).st_mtime - tempdirs.ORPHAN_AGE - 1
        for n in unowned:
            os.utime(ckpt / n, (aged, aged))
        tempdirs.clean_stale_temp_dirs(str(ckpt))
        assert not [n for n in os.listdir(ckpt) if "_temp_" in n], os.listdir(ckpt)


@pytest.mark.parametrize("engine", ENGINES)
def test_partitioned_variable_resharded_4_to_3_to_1(engine, tmp_path, tf) -> None:
    out4, out3, ckpt = tmp_path / "out4", tmp_path / "out3", tmp_path / "ckpt"
    for d in (out4, out3, ckpt):
        d.mkdir()
    rc, output = _run(engine, out4, ckpt, "reshard4")
    assert rc == 0, output[-4000:]
    rc, output = _run(engine, out3, ckpt, "reshard3", ranks=3)
    assert rc == 0, output[-4000:]
    got3 = _reports(out3)
    for k in range(3):
        assert got3[k][0]["event"] == "resharded" and got3[k][0]["good"], (k, got3[k])
        assert got3[k][0]["rows"] == list(save_worker.rows(k, 3))
    full = save_worker.emb_full()
    for n in (4, 3):
        prefix = str(ckpt / f"resharded-{n}")
        # one process, the whole tensor; and TensorFlow's reader sees the full tensor
        whole = np.zeros_like(full)
        gs.Saver({"emb": whole}).restore(prefix)
        assert np.array_equal(whole, full)
        assert np.array_equal(tf.train.load_checkpoint(prefix).get_tensor("emb"), full)
        assert tf.train.load_checkpoint(prefix).get_variable_to_shape_map() == {"emb": list(full.shape)}


@needs_mpi
def test_a_rank_killed_mid_save_under_ulfm_the_survivors_raise(tmp_path) -> None:
    """With Open MPI's fault tolerance on (``--with-ft ulfm``) the job goes on after a rank dies: every
    survivor's save raises a CoordinatorError (plain mpiexec ends the job instead)."""
    missing = _ulfm_missing()
    if missing:
        pytest.skip(missing)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    ckpt.mkdir()
    rc, output = _run("mpiexec", out, ckpt, "kill", options=("--with-ft", "ulfm"))
    got = _reports(out)
    for k in (0, 1, 3):
        events = [r["event"] for r in got[k]]
        assert events == ["saved", "raised"], (k, got[k], output[-3000:])
        assert got[k][1]["type"] == "CoordinatorError", got[k][1]
    assert [r["event"] for r in got[2]] == ["saved"], got[2]
    assert gs.latest_checkpoint(str(ckpt)) == str(ckpt / "model-6")
    assert not (ckpt / "model-7.index").exists()
