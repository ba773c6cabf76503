"""A safetensors file that shrinks while ``convert`` reads it: a typed error naming the file, from the API
and on the command line, never a SIGBUS; the destination is left exactly as it was.

Each conversion runs in a child process (a SIGBUS would kill the test runner), whose ``Progress.add`` cuts
the source short the first time bytes are handed to the checkpoint writer: after the header was read and
checked, while the data is being copied.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

_HOOK = textwrap.dedent(
    """
    import os, sys
    import gpusaver.progress as _progress

    SRC, KEEP, DST = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    _add = _progress.Progress.add
    _cut = []

    def add(self, n):
        _add(self, n)
        if n and not _cut:  # the first bytes handed to the writer: the source shrinks under it
            _cut.append(n)
            os.truncate(SRC, KEEP)

    _progress.Progress.add = add
    """
)

_API = _HOOK + textwrap.dedent(
    """
    import json
    from gpusaver.convert import from_safetensors
    from gpusaver.errors import CorruptCheckpointError

    try:
        from_safetensors(SRC, DST, progress=lambda done, total: None)
    except CorruptCheckpointError as e:
        print(json.dumps({"error": type(e).__name__, "path": e.path, "message": str(e), "cut": bool(_cut)}))
    else:
        print(json.dumps({"error": None, "cut": bool(_cut)}))
    """
)

_CLI = _HOOK + textwrap.dedent(
    """
    from gpusaver.cli import main

    sys.exit(main(["convert", SRC, DST]))
    """
)


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> int:
    """Writes a safetensors file by hand; returns where its data starts."""
    codes = {"float32": "F32", "int32": "I32"}
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": codes[a.dtype.name], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in tensors.values():
            f.write(a.tobytes())
    return 8 + len(raw)


def _large() -> dict[str, np.ndarray]:  # read a slab at a time
    return {f"big.{i}": np.arange(5 << 20, dtype=np.float32) + i for i in range(3)}  # 3 x 20 MiB


def _small() -> dict[str, np.ndarray]:  # read a group at a time
    return {f"small.{i:03d}": np.full(16 << 10, i, np.int32) for i in range(640)}  # 640 x 64 KiB


LAYOUTS = {"large tensors": _large, "small tensors": _small}


def _run(script: str, src: Path, keep: int, dst: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, str(src), str(keep), str(dst)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The destination's parent: it holds one unrelated file, which must be all it holds afterwards."""
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "unrelated.txt").write_text("kept\n")
    return directory


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("cut", ["mid-data", "to the header", "to nothing"])
def test_a_source_truncated_during_from_safetensors_raises_corrupt_and_leaves_nothing(
    tmp_path: Path, out: Path, layout: str, cut: str
) -> None:
    src = tmp_path / "model.safetensors"
    data_start = _write_safetensors(src, LAYOUTS[layout]())
    keep = {"mid-data": data_start + (1 << 20) + 3, "to the header": data_start, "to nothing": 0}[cut]
    before = _listing(out)
    for dst in (out / "model", out / "new" / "dir" / "model"):  # into an existing directory, and into new ones
        _write_safetensors(src, LAYOUTS[layout]())
        done = _run(_API, src, keep, dst)
        assert done.returncode == 0, f"the conversion died (rc {done.returncode}):\n{done.stderr[-3000:]}"
        result = json.loads(done.stdout)
        assert result["cut"], "the source was never cut short: the test did not test anything"
        assert result["error"] == "CorruptCheckpointError", result
        assert result["path"] == str(src)
        assert str(src) in result["message"] and "truncated" in result["message"]
        assert _listing(out) == before, f"the conversion into {dst} left {_listing(out)}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_cli_reports_a_source_truncated_during_convert_in_one_line(tmp_path: Path, out: Path, layout: str) -> None:
    src = tmp_path / "model.safetensors"
    data_start = _write_safetensors(src, LAYOUTS[layout]())
    before = _listing(out)
    done = _run(_CLI, src, data_start + (1 << 20), out / "ckpt" / "model")
    assert done.returncode == 1, f"rc {done.returncode} (a negative one is a signal):\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("convert: ")]  # progress lines aside
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("gpusaver convert: error: ") and str(src) in errors[0] and "truncated" in errors[0]
    assert done.stdout == ""
    assert _listing(out) == before
