"""One rank of test_rank_regions_torchrun.py (torchrun launches 2 of them, gloo).

    python regions_worker.py CKPT_DIR

Each rank saves its block of rows of ``emb`` (a partitioned variable) as ``m-1``: rank 0 rows 0:5,
rank 1 rows 5:10. Then rank 1 holds rows 3:10 instead, which overlap rank 0's, and every rank saves
``m-2``: each rank reports the error it got, waits for the other to have reported, and raises it
uncaught (so the job's exit status is not zero).

Each rank appends JSON lines ``{"rank", "event", ...}`` to ``$GPUSAVER_TEST_OUT/rank-<rank>.jsonl``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import gpusaver as gs

SHAPE = (10, 6)
ROWS = {1: [(0, 5), (5, 10)], 2: [(0, 5), (3, 10)]}  # by step: each rank's rows


def full() -> np.ndarray:
    return np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE) / 3


def report(rank: int, event: str, **fields: object) -> None:
    with open(os.path.join(os.environ["GPUSAVER_TEST_OUT"], f"rank-{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"rank": rank, "event": event, **fields}) + "\n")


def main() -> None:
    import torch.distributed as dist

    ckpt = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    error: BaseException | None = None
    for step in (1, 2):
        lo, hi = ROWS[step][rank]
        mine = full()[lo:hi].copy()
        saver = gs.Saver([gs.Variable(mine, "emb", full_shape=SHAPE, offset=[lo, 0])], coordinator="torch")
        try:
            report(rank, "saved", path=saver.save(os.path.join(ckpt, "m"), global_step=step))
        except Exception as e:  # noqa: BLE001 - reported, then raised below
            report(rank, "raised", type=type(e).__name__, error_type=getattr(e, "error_type", None),
                   cause=type(e.__cause__).__name__, message=str(e))
            error = e
            break
    dist.barrier()  # both ranks have reported
    if error is not None:
        raise error
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
