"""What ``python -m gpusaver`` prints, read as a user reads it: verify lists a few damaged tensors of a data
file and counts the rest; diff counts variables, never bytes, in its summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpusaver.format import BundleWriter, merge_bundles
from gpusaver.format.naming import data_filename

ROOT = Path(__file__).resolve().parents[2]


def _gpusaver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpusaver", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _tensors(count: int, offset: int = 0) -> dict[str, np.ndarray]:
    return {f"layer{i:03d}/w": np.full(256, i + offset, np.float32) for i in range(count)}  # 1 KiB each


def _write(prefix: Path, tensors: dict[str, np.ndarray]) -> Path:
    with BundleWriter(str(prefix)) as w:
        for name, value in tensors.items():
            w.add(name, value)
    return prefix


def _damaged(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("DAMAGED ")]


@pytest.mark.parametrize("damaged", [5, 6, 30])
def test_verify_of_a_truncated_data_file_lists_five_damaged_tensors_and_counts_the_rest(
    tmp_path: Path, damaged: int
) -> None:
    prefix = _write(tmp_path / "model", _tensors(40))
    data = data_filename(str(prefix), 0, 1)
    os.truncate(data, (40 - damaged) * 1024)  # the last `damaged` tensors lose their bytes
    done = _gpusaver("verify", str(prefix), "--no-progress")
    assert done.returncode == 1 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    listed = _damaged(done.stdout)
    assert len(listed) == 5
    assert all(f"tensor 'layer{i:03d}/w'" in line and "truncated" in line
               for i, line in zip(range(40 - damaged, 40), listed))
    more = [line for line in lines if line.startswith("... and ")]
    if damaged == 5:
        assert more == []
    else:
        rest = damaged - 5
        assert more == [f"... and {rest} more damaged tensor{'s' if rest != 1 else ''} in {data}"]
    assert len(lines) == 5 + len(more) + 1
    assert lines[-1].startswith(f"FAILED {prefix}: {damaged} damaged; 40 tensors of 40 variables")


def test_verify_summarises_each_damaged_data_file_on_its_own(tmp_path: Path) -> None:
    parts = [_write(tmp_path / "tmp" / f"part{k}", {f"shard{k}/{n}": v for n, v in _tensors(20, 100 * k).items()})
             for k in range(2)]
    prefix = str(tmp_path / "model")
    merge_bundles([str(p) for p in parts], prefix)
    for shard, keep in ((0, 12 * 1024), (1, 0)):  # 8 damaged in the first file, all 20 in the second
        os.truncate(data_filename(prefix, shard, 2), keep)
    done = _gpusaver("verify", prefix, "--no-progress")
    assert done.returncode == 1
    listed = _damaged(done.stdout)
    assert len(listed) == 10
    assert sum("shard0/" in line for line in listed) == 5 and sum("shard1/" in line for line in listed) == 5
    assert [line for line in done.stdout.splitlines() if line.startswith("... and ")] == [
        f"... and 3 more damaged tensors in {data_filename(prefix, 0, 2)}",
        f"... and 15 more damaged tensors in {data_filename(prefix, 1, 2)}",
    ]
    assert done.stdout.splitlines()[-1].startswith(f"FAILED {prefix}: 28 damaged; 40 tensors of 40 variables")


def test_diff_counts_variables_in_its_summary(tmp_path: Path) -> None:
    a_tensors = _tensors(70)
    b_tensors = {name: (value + 1 if i < 63 else value) for i, (name, value) in enumerate(a_tensors.items())}
    b_tensors["layer063/w"] = a_tensors["layer063/w"].astype(np.float64)  # another dtype
    b_tensors["layer064/w"] = a_tensors["layer064/w"].reshape(16, 16)  # another shape
    del b_tensors["layer065/w"]  # only in a
    a, b = _write(tmp_path / "a", a_tensors), _write(tmp_path / "b", b_tensors)
    done = _gpusaver("diff", str(a), str(b))
    assert done.returncode == 1 and done.stderr == "", done.stderr
    last = done.stdout.splitlines()[-1]
    assert last == "DIFFERENT: 66 variables differ: 1 only in a, 1 in dtype, 1 in shape, 63 in bytes; 4 identical"
    assert "63 bytes" not in done.stdout
    one = _write(tmp_path / "one", {**a_tensors, "layer000/w": a_tensors["layer000/w"] + 1})
    assert _gpusaver("diff", str(a), str(one)).stdout.splitlines()[-1] == (
        "DIFFERENT: 1 variable differs: 1 in bytes; 69 identical"
    )
