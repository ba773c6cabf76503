"""One rank of test_restore_agreement_torchrun.py (torchrun launches 2 of them, gloo).

    python restore_worker.py CKPT_DIR SCENARIOS_JSON

Every rank saves ``ck7`` (every value 7) and ``ck9`` (every value 9) together. Then, for each
scenario (a list with one fault per rank: ``none``, ``prefix`` (restore ck9), ``missing`` (a name
the checkpoint lacks), ``dtype``, ``shape``, ``strict`` (strict=False)), each rank makes fresh
zero arrays with its fault and restores ck7 into them, and reports what the restore returned or
raised and the values its arrays hold afterwards. Each rank appends JSON lines
``{"rank", "event", ...}`` to ``$GPUSAVER_TEST_OUT/rank-<rank>.jsonl``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import gpusaver as gs


def report(rank: int, event: str, **fields: object) -> None:
    with open(os.path.join(os.environ["GPUSAVER_TEST_OUT"], f"rank-{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"rank": rank, "event": event, **fields}) + "\n")


def state(rank: int, value: float, fault: str = "none") -> dict[str, np.ndarray]:
    s = {"w": np.full(4, value, np.float32), f"own{rank}": np.full(2, value, np.float32)}
    if fault == "missing":
        s["nowhere"] = np.zeros(1)
    elif fault == "dtype":
        s[f"own{rank}"] = np.zeros(2, np.int32)
    elif fault == "shape":
        s["w"] = np.zeros(5, np.float32)
    return s


def main() -> None:
    import torch.distributed as dist

    ckpt, scenarios = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        for value in (7, 9):
            gs.Saver(state(rank, value), coordinator="torch").save(os.path.join(ckpt, f"ck{value}"))
        for faults in scenarios:
            fault = faults[rank]
            arrays = state(rank, 0, fault)
            prefix = os.path.join(ckpt, "ck9" if fault == "prefix" else "ck7")
            kwargs = {"strict": False} if fault == "strict" else {}
            try:
                gs.Saver(arrays, coordinator="torch").restore(prefix, **kwargs)
                outcome = {"ok": True}
            except Exception as e:  # noqa: BLE001 - reported to the test
                outcome = {"ok": False, "type": type(e).__name__, "message": str(e)}
            values = sorted({float(x) for a in arrays.values() for x in np.asarray(a).reshape(-1)})
            report(rank, "restored", faults=faults, values=values, **outcome)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
