"""One rank of the multi-process Saver tests (test_saver_ranks.py launches 4 of them).

    python save_worker.py ENGINE CKPT_DIR SCENARIO [SCENARIO ...]

ENGINE: ``torch`` (gloo, from the environment torchrun sets) or ``mpi`` (mpi4py under mpiexec).
SCENARIOs, in order:

* ``save``: three saves of one checkpoint by all ranks (own variables on two virtual devices each, so
  two shards per rank, and replicated variables every rank holds), ``max_to_keep=2``; each rank's
  own variables are then overwritten and restored from the newest;
* ``mismatch``: rank 3 asks for another global_step: every rank raises, nothing is written;
* ``unshared``: rank 1's data file vanishes before the commit (as on a file system the coordinator
  rank cannot see): every rank raises, naming the host and the path; nothing is committed;
* ``async``: ``save_async`` by all ranks; every array is changed the instant it returns; the
  checkpoint holds the values of the call, and the newest restores them;
* ``kill``: after one good save, rank 2 SIGKILLs itself while writing the next one;
* ``reshard4`` (4 ranks): each rank saves its block of rows of ``emb`` (a partitioned variable)
  as ``resharded-4``; ``reshard3`` (3 ranks): each rank restores another split of the rows from
  ``resharded-4``, checks it, and saves its region again as ``resharded-3``.

Each rank appends JSON lines ``{"rank", "event", ...}`` to ``$GPUSAVER_TEST_OUT/rank-<rank>.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpusaver as gs  # noqa: E402
from gpusaver.storage.fileops import PosixFileOps  # noqa: E402

ENGINE = CKPT = ""  # set by main() from the command line (this module is also imported by the test)
RANKS = 4
REPLICATED = 12


def own_values(rank: int, step: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s own variables at ``step`` (two devices: names ending in /d0 and /d1)."""
    out = {}
    for i in range(3):
        for d in (0, 1):
            out[f"rank{rank}/v{i}/d{d}"] = np.full((5 + i, 7 + rank), rank * 100 + i * 10 + d + step, np.float32)
    return out


def replicated_values(step: int) -> dict[str, np.ndarray]:
    return {f"shared/w{j:02d}": np.arange(j + 3, dtype=np.float64) * (step + 1) for j in range(REPLICATED)}


EMB_SHAPE = (41, 6)


def emb_full() -> np.ndarray:
    return np.arange(EMB_SHAPE[0] * EMB_SHAPE[1], dtype=np.float32).reshape(EMB_SHAPE) / 7


def rows(rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s rows of ``emb`` when ``size`` ranks split it (uneven splits included)."""
    edges = np.linspace(0, EMB_SHAPE[0], size + 1).astype(int)
    return int(edges[rank]), int(edges[rank + 1])


def reshard(coordinator: object, rank: int, size: int) -> None:
    lo, hi = rows(rank, size)
    if size == 3:
        mine = np.zeros((hi - lo, EMB_SHAPE[1]), np.float32)
        restorer = gs.Saver([gs.Variable(mine, "emb", full_shape=EMB_SHAPE, offset=[lo, 0])], coordinator=coordinator)
        restorer.restore(os.path.join(CKPT, "resharded-4"), strict=False)
        report(rank, "resharded", good=bool(np.array_equal(mine, emb_full()[lo:hi])), rows=[lo, hi])
    else:
        mine = emb_full()[lo:hi].copy()
    saver = gs.Saver([gs.Variable(mine, "emb", full_shape=EMB_SHAPE, offset=[lo, 0])], coordinator=coordinator)
    report(rank, "saved", paths=[saver.save(os.path.join(CKPT, f"resharded-{size}"))])


def report(rank: int, event: str, **fields: object) -> None:
    with open(os.path.join(os.environ["GPUSAVER_TEST_OUT"], f"rank-{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"rank": rank, "event": event, **fields}) + "\n")


class Ops(PosixFileOps):
    """Hooks at the commit phases: remove this rank's data file, or die."""

    def __init__(self) -> None:
        self.at: dict[str, str] = {}

    def phase(self, name: str) -> None:
        what = self.at.pop(name, None)
        if what == "vanish":
            for entry in os.listdir(CKPT):
                if "_temp_" in entry and os.path.isfile(os.path.join(CKPT, entry, "OWNER")):
                    with open(os.path.join(CKPT, entry, "OWNER")) as f:
                        if f" {os.getpid()} " not in f.read():
                            continue
                    for part in os.listdir(os.path.join(CKPT, entry)):
                        # shard 3's finished data file only (shard 2 may still be writing its own)
                        if part.startswith("part-00003-of-") and ".data-" in part and "tempstate" not in part:
                            os.remove(os.path.join(CKPT, entry, part))
        elif what == "die":
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    global ENGINE, CKPT
    ENGINE, CKPT = sys.argv[1], sys.argv[2]
    if ENGINE == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        coordinator = "torch"
    else:
        coordinator = "mpi"
    ops = Ops()
    values = {}
    saver = None
    for scenario in sys.argv[3:]:
        if scenario.startswith("reshard"):
            from gpusaver.distributed import resolve_coordinator

            c = resolve_coordinator(coordinator)
            reshard(c, c.rank, c.size)
            continue
        step = {"save": 1, "mismatch": 4, "unshared": 5, "async": 10, "kill": 7}[scenario]
        if saver is None:
            from gpusaver.distributed import resolve_coordinator

            rank_probe = resolve_coordinator(coordinator)
            rank = rank_probe.rank
            values = {**own_values(rank, 0), **replicated_values(0)}
            variables = [gs.Variable(a, n, "/cpu:0" if n.endswith("d0") or n.startswith("shared") else "/cpu:1")
                         for n, a in values.items()]
            saver = gs.Saver(variables, coordinator=rank_probe, sharded=True, max_to_keep=2, fileops=ops,
                             check_replicas=True)
        prefix = os.path.join(CKPT, "model")

        def set_step(s: int) -> None:
            for n, a in {**own_values(rank, s), **replicated_values(s)}.items():
                values[n][...] = a

        try:
            if scenario == "save":
                paths = []
                for s in (1, 2, 3):
                    set_step(s)
                    paths.append(saver.save(prefix, global_step=s))
                set_step(-50)
                result = saver.restore(paths[-1])
                good = all(np.array_equal(values[n], a) for n, a in {**own_values(rank, 3), **replicated_values(3)}.items())
                report(rank, "saved", paths=paths, restored=good, missing=list(result.missing_keys),
                       kept=saver.last_checkpoints)
            elif scenario == "mismatch":
                saver.save(prefix, global_step=99 if rank == 3 else step)
                report(rank, "no error")
            elif scenario == "unshared":
                if rank == 1:
                    ops.at["shard:written:3"] = "vanish"  # rank 1 writes shards 2 and 3
                saver.save(prefix, global_step=step)
                report(rank, "no error")
            elif scenario == "async":
                set_step(10)
                handle = saver.save_async(prefix, global_step=10)
                set_step(11)  # the instant it returns
                path = handle.result()
                set_step(-50)
                saver.restore(path)
                good = all(np.array_equal(values[n], a) for n, a in {**own_values(rank, 10), **replicated_values(10)}.items())
                report(rank, "saved", paths=[path], restored=good, kept=saver.last_checkpoints)
            elif scenario == "kill":
                set_step(6)
                saver.save(prefix, global_step=6)
                report(rank, "saved", paths=[prefix + "-6"])
                if rank == 2:
                    ops.at["shard:written:4"] = "die"
                set_step(7)
                saver.save(prefix, global_step=7)
                report(rank, "no error")
        except Exception as e:  # noqa: BLE001 - reported for the test
            report(rank, "raised", type=type(e).__name__, message=str(e), cause=type(e.__cause__).__name__)
            if scenario == "kill":
                raise  # a survivor's error: uncaught, so that the launcher ends the job
    if saver is not None:
        report(rank, "done")
    if ENGINE == "torch":
        import torch.distributed as dist

        dist.destroy_process_group()  # every group, gpusaver's own gloo group included, before exit


if __name__ == "__main__":
    main()
