"""A restore under a real ``torchrun --nproc-per-node 2`` (gloo) agrees before any rank writes.

``restore_worker.py`` runs a list of scenarios, each a fault per rank (another prefix, a name the
checkpoint lacks, a dtype or shape that does not fit, strict=False on one rank only), drawn at
random with a fixed seed plus the cases the issue names. Where any rank is at fault (or the ranks'
arguments differ) every rank raises and every rank's arrays are all zeros still; otherwise every
rank restores, all its values from the one checkpoint.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import pathlib

import pytest

from test_engines import _env, _free_port, _launch, needs_torch

pytestmark = [pytest.mark.slow, needs_torch]

WORKER = pathlib.Path(__file__).resolve().parent / "restore_worker.py"
FAULTS = ["none", "prefix", "missing", "dtype", "shape", "strict"]


def _scenarios() -> list[list[str]]:
    fixed = [["none", "none"], ["none", "prefix"], ["prefix", "none"], ["none", "missing"], ["dtype", "none"],
             ["none", "strict"], ["prefix", "prefix"], ["strict", "strict"]]
    rng = random.Random(28)
    drawn = rng.sample([list(p) for p in itertools.product(FAULTS, repeat=2)], 8)
    return fixed + drawn


def _expected(faults: list[str]) -> float | None:
    """The value every array holds after the restore, or None where every rank must raise."""
    args = [(f == "prefix", f == "strict") for f in faults]
    if any(a != args[0] for a in args) or any(f in ("missing", "dtype", "shape") for f in faults):
        return None
    return 9.0 if faults[0] == "prefix" else 7.0


def test_restore_agrees_before_it_writes_under_torchrun(tmp_path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    ckpt.mkdir()
    scenarios = _scenarios()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(WORKER), str(ckpt), json.dumps(scenarios)]
    rc, output = _launch(cmd, _env(out))
    assert rc == 0, output[-4000:]
    for k in range(2):
        got = [json.loads(line) for line in (out / f"rank-{k}.jsonl").read_text().splitlines()]
        assert [g["faults"] for g in got] == scenarios, (k, output[-4000:])
        for g in got:
            want = _expected(g["faults"])
            if want is None:
                assert not g["ok"], (k, g)
                assert g["type"] in ("CoordinatorError", "InvalidArgumentError"), (k, g)
                assert g["values"] == [0.0], (k, g)  # nothing written on any rank
            else:
                assert g["ok"], (k, g)
                assert g["values"] == [want], (k, g)
