"""Regions of a partitioned variable that overlap across ranks, under a real ``torchrun --nproc-per-node 2``
(gloo): ``regions_worker.py`` saves a good checkpoint, then one whose regions overlap. Every rank raises
the planning's CoordinatorError (its cause an InvalidArgumentError naming the variable, both regions and
both ranks), the job's exit status is not zero, and nothing was committed: the first checkpoint stays
the newest, no file of the second and no temporary directory is left.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np
import pytest

import gpusaver as gs
from test_engines import _env, _free_port, _launch, needs_torch

pytestmark = [pytest.mark.slow, needs_torch]

WORKER = pathlib.Path(__file__).resolve().parent / "regions_worker.py"
sys.path.insert(0, str(WORKER.parent))
import regions_worker  # noqa: E402  (its values only; its main runs under torchrun)


def test_overlapping_regions_under_torchrun_raise_on_every_rank_and_commit_nothing(tmp_path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    ckpt.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(WORKER), str(ckpt)]
    rc, output = _launch(cmd, _env(out))
    assert rc != 0, output[-4000:]
    for k in range(2):
        path = out / f"rank-{k}.jsonl"
        got = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        assert [r["event"] for r in got] == ["saved", "raised"], (k, got, output[-4000:])
        assert got[0]["path"] == str(ckpt / "m-1")
        raised = got[1]
        assert raised["type"] == "CoordinatorError", raised
        assert raised["error_type"] == "gpusaver.errors.InvalidArgumentError", raised
        assert raised["cause"] == "InvalidArgumentError", raised
        message = raised["message"]
        assert message.startswith("planning the save failed"), message
        for text in ("partitioned variable 'emb'", "offset [0, 0] shape [5, 6] on rank 0",
                     "offset [3, 0] shape [7, 6] on rank 1"):
            assert text in message, (text, message)
    assert "CoordinatorError" in output  # the uncaught error, as each rank raised it
    assert sorted(os.listdir(ckpt)) == ["checkpoint", "m-1.data-00000-of-00002", "m-1.data-00001-of-00002",
                                        "m-1.index"]
    assert gs.latest_checkpoint(str(ckpt)) == str(ckpt / "m-1")
    assert np.array_equal(gs.load_checkpoint(str(ckpt / "m-1")).get_tensor("emb"), regions_worker.full())
