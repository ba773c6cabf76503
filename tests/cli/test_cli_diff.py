"""``gpusaver diff A B``: differences by the crc32c stored in the indexes; exit 0 / 1 / 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpusaver.cli import main
from gpusaver.format import BundleReader, BundleWriter, crc, merge_bundles

REPO = Path(__file__).resolve().parents[2]


def write(prefix: Path, tensors: dict[str, Any], slices: dict[str, list[tuple[str, np.ndarray]]] | None = None,
          full_shapes: dict[str, list[int]] | None = None) -> Path:
    w = BundleWriter(str(prefix), durable=False)
    for name, value in tensors.items():
        w.add(name, value)
    for name, parts in (slices or {}).items():
        for spec, value in parts:
            w.add_slice(name, (full_shapes or {})[name], spec, value)
    w.finish()
    return prefix


BASE = {
    "dense/w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "dense/b": np.array([1, 2, 3], np.int64),
    "vocab": np.array([b"alpha", b"beta"], dtype=object),
    "step": np.array(7, np.int64),
}


def base(prefix: Path, **changes: Any) -> Path:
    tensors = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    return write(prefix, tensors)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def rows(out: str) -> list[list[str]]:
    """The table's rows: kind (one or three words), name, detail."""
    found = []
    for line in out.splitlines():
        if line.startswith("only in "):
            parts = line.split(None, 4)
            found.append([" ".join(parts[:3]), *parts[3:]])
        elif line.startswith(("dtype ", "shape ", "bytes ")):
            found.append(line.split(None, 2))
    return found


def test_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = base(tmp_path / "a" / "model"), base(tmp_path / "b" / "model")
    rc, out, err = run(capsys, "diff", str(a), str(b))
    assert rc == 0 and err == ""
    assert out.splitlines() == [f"a  {a}", f"b  {b}", "", "IDENTICAL: 4 variables"]
    rc, out, _ = run(capsys, "diff", "--json", str(a), str(b))
    info = json.loads(out)
    assert rc == 0 and info["identical"] is True and info["same"] == 4
    assert info["a"] == str(a) and info["b"] == str(b)


def test_every_kind_of_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = base(tmp_path / "a" / "model", extra_a=np.zeros(2, np.float32))
    w2 = BASE["dense/w"].copy()
    w2[1, 2] = -1
    b = base(
        tmp_path / "b" / "model",
        **{"dense/w": w2, "dense/b": np.array([1, 2, 3], np.int32), "step": np.array([7], np.int64),
           "vocab": np.array([b"alpha", b"gamma"], dtype=object), "extra_b": np.ones((2, 2), np.uint8)},
    )
    rc, out, err = run(capsys, "diff", str(a), str(b))
    assert rc == 1 and err == ""
    with BundleReader(str(a)) as ra, BundleReader(str(b)) as rb:
        crcs = {n: (f"0x{crc.unmask(ra.entry(n).crc32c):08x}", f"0x{crc.unmask(rb.entry(n).crc32c):08x}")
                for n in ("dense/w", "vocab")}
    assert rows(out) == [
        ["only in a", "extra_a", "DT_FLOAT [2]"],
        ["only in b", "extra_b", "DT_UINT8 [2,2]"],
        ["dtype", "dense/b", "DT_INT64 -> DT_INT32"],
        ["shape", "step", "[] -> [1]"],
        ["bytes", "dense/w", f"crc32c {crcs['dense/w'][0]} -> {crcs['dense/w'][1]}"],
        ["bytes", "vocab", f"crc32c {crcs['vocab'][0]} -> {crcs['vocab'][1]}"],
    ]
    assert out.splitlines()[-1] == (
        "DIFFERENT: 6 variables differ: 1 only in a, 1 only in b, 1 in dtype, 1 in shape, 2 in bytes; 0 identical"
    )
    rc, out, _ = run(capsys, "diff", "--json", str(a), str(b))
    info = json.loads(out)
    assert rc == 1 and info["identical"] is False
    assert info["only_in_a"] == [{"name": "extra_a", "dtype": "DT_FLOAT", "shape": [2]}]
    assert info["only_in_b"] == [{"name": "extra_b", "dtype": "DT_UINT8", "shape": [2, 2]}]
    assert info["dtype"] == [{"name": "dense/b", "a": "DT_INT64", "b": "DT_INT32"}]
    assert info["shape"] == [{"name": "step", "a": [], "b": [1]}]
    assert [(v["name"], v["a"], v["b"], v["compared"]) for v in info["bytes"]] == [
        ("dense/w", *crcs["dense/w"], "crc32c"), ("vocab", *crcs["vocab"], "crc32c")]
    assert info["same"] == 0


def test_the_data_files_are_never_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = base(tmp_path / "a" / "model")
    b = base(tmp_path / "b" / "model", step=np.array(8, np.int64))
    for prefix in (a, b):
        os.remove(f"{prefix}.data-00000-of-00001")  # only the indexes are left
    rc, out, err = run(capsys, "diff", str(a), str(b))
    assert rc == 1 and err == ""
    assert [r[:2] for r in rows(out)] == [["bytes", "step"]]


def test_partitioned_variables_compare_slice_by_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shapes = {"emb": [10, 4]}
    top, bottom = np.full((5, 4), 1.5, np.float32), np.full((5, 4), 2.5, np.float32)
    a = write(tmp_path / "a", {}, {"emb": [("0,5:-", top), ("5,5:-", bottom)]}, shapes)
    b = write(tmp_path / "b", {}, {"emb": [("0,5:-", top), ("5,5:-", bottom + 1)]}, shapes)
    same = write(tmp_path / "same", {}, {"emb": [("5,5:-", bottom), ("0,5:-", top)]}, shapes)
    for prefix in (a, b, same):
        os.remove(f"{prefix}.data-00000-of-00001")  # the slices' entries suffice
    rc, out, _ = run(capsys, "diff", str(a), str(b))
    assert rc == 1 and rows(out) == [["bytes", "emb", "slice 5,5:-"]]
    rc, out, _ = run(capsys, "diff", "--json", str(a), str(b))
    assert json.loads(out)["bytes"] == [{"name": "emb", "a": None, "b": None, "slices": ["5,5:-"], "compared": "crc32c"}]
    rc, out, _ = run(capsys, "diff", str(a), str(same))
    assert rc == 0 and "IDENTICAL: 1 variable" in out


def test_differently_partitioned_variables_compare_their_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = np.concatenate([np.full((5, 4), 1.5, np.float32), np.full((5, 4), 2.5, np.float32)])
    sliced = write(tmp_path / "sliced", {}, {"emb": [("0,5:-", whole[:5]), ("5,5:-", whole[5:])]}, {"emb": [10, 4]})
    rc, out, _ = run(capsys, "diff", str(sliced), str(write(tmp_path / "whole", {"emb": whole})))
    assert rc == 0, out
    changed = whole.copy()
    changed[9, 3] = np.float32(-0.0) if changed[9, 3] == 0 else 0.0
    rc, out, _ = run(capsys, "diff", str(sliced), str(write(tmp_path / "changed", {"emb": changed})))
    assert rc == 1 and rows(out) == [["bytes", "emb", "values differ (stored in different slices or byte orders)"]]


def test_two_shards_against_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same tensors, laid out in two data files or one: identical."""
    parts = []
    for k, names in enumerate((["dense/w", "vocab"], ["dense/b", "step"])):
        parts.append(str(write(tmp_path / f"part{k}", {n: BASE[n] for n in names})))
    (tmp_path / "run").mkdir()
    merge_bundles(parts, str(tmp_path / "run" / "model-3"))
    (tmp_path / "run" / "checkpoint").write_text('model_checkpoint_path: "model-3"\n')
    rc, out, _ = run(capsys, "diff", str(tmp_path / "run"), str(base(tmp_path / "one")) + ".index")
    assert rc == 0 and "IDENTICAL: 4 variables" in out


def test_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = base(tmp_path / "a")
    rc, _, err = run(capsys, "diff", str(a), str(tmp_path / "missing"))
    assert rc == 2 and "gpusaver diff: error:" in err
    damaged = base(tmp_path / "damaged")
    index = Path(f"{damaged}.index")
    data = bytearray(index.read_bytes())
    data[5] ^= 1
    index.write_bytes(bytes(data))
    rc, _, err = run(capsys, "diff", str(a), str(damaged))
    assert rc == 2 and "gpusaver diff: error:" in err and ".index" in err and "Traceback" not in err
    rc, _, _ = run(capsys, "diff", str(a))  # usage
    assert rc == 2


def test_diff_as_a_subprocess(tmp_path: Path) -> None:
    a, b = base(tmp_path / "a"), base(tmp_path / "b", step=np.array(9, np.int64))
    proc = subprocess.run([sys.executable, "-m", "gpusaver", "diff", "--json", str(a), str(b)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1, proc.stderr
    info = json.loads(proc.stdout)
    assert [v["name"] for v in info["bytes"]] == ["step"] and info["same"] == 3
