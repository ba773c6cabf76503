"""benchmarks/device_run.sh's install step, rehearsed as on the GPU machine.

The GPU machine has Python 3.12, CuPy, PyTorch and nvcc, and no network. The rehearsal
(``DEVICE_REHEARSAL=1``) builds a fresh Python 3.12 environment holding only numpy and setuptools, installs
everything else from the wheels ``benchmarks/device_prepare.sh`` downloaded (``pip --no-index``), builds the
C extension and imports gpusaver with every dependency: a wheel missing from the carried set fails here.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _python312() -> str | None:
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    return found[-1] if found else shutil.which("python3.12")


pytestmark = pytest.mark.skipif(_python312() is None, reason="no Python 3.12 here (pyenv's or python3.12)")


def _run(cmd: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def carry(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    carry = tmp_path_factory.mktemp("carry")
    result = _run(["bash", "benchmarks/device_prepare.sh"], {"CARRY_DIR": str(carry), "PYTHON312": _python312()})
    assert result.returncode == 0, result.stdout + result.stderr
    return carry


def _requirements() -> list[list[str]]:
    lines = (REPO / "benchmarks" / "device_requirements.txt").read_text().splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


def test_prepare_carries_one_cp312_wheel_of_each_requirement(carry: pathlib.Path) -> None:
    wheels = sorted(p.name for p in (carry / "wheels").glob("*.whl"))
    for dist, _module, _minimum, version in _requirements():
        norm = dist.replace("-", "_").lower()
        mine = [w for w in wheels if w.split("-")[0].lower() == norm]
        assert len(mine) == 1 and mine[0].split("-")[1] == version, (dist, wheels)
        tags = mine[0].split("-")[2:]
        assert tags[0] in ("py3", "py2.py3", "cp312", "cp310"), mine[0]  # loads under CPython 3.12
    assert len(wheels) == len(_requirements())
    assert sum(p.stat().st_size for p in carry.rglob("*") if p.is_file()) < 32 << 20  # a call carries 64 MiB
    assert list((carry / "native").glob("_native.cpython-312-*.so"))


def test_rehearsal_installs_only_from_the_carried_wheels(carry: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    result = _run(["bash", "benchmarks/device_run.sh"],
                  {"DEVICE_REHEARSAL": "1", "DEVICE_STEPS": "setup", "CARRY_DIR": str(carry), "OUT": str(out),
                   "PYTHON312": _python312()})
    log = (out / "setup.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr + log
    assert "python: " in log and " 3.12." in log
    for dist, _module, _minimum, version in _requirements():
        assert f"-> carried {version}" in log or "-> kept" in log, dist
    assert "host path: built here; C extension - built" in log
    assert "imports: gpusaver " in log and "protobuf 7." in log
    summary = (out / "summary.txt").read_text()
    assert "setup      ok" in summary


def test_rehearsal_names_a_missing_wheel(carry: pathlib.Path, tmp_path: pathlib.Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(carry, partial)
    for wheel in (partial / "wheels").glob("crc32c-*.whl"):
        wheel.unlink()
    out = tmp_path / "out"
    result = _run(["bash", "benchmarks/device_run.sh"],
                  {"DEVICE_REHEARSAL": "1", "DEVICE_STEPS": "setup", "CARRY_DIR": str(partial), "OUT": str(out),
                   "PYTHON312": _python312()})
    assert result.returncode != 0
    log = (out / "setup.log").read_text()
    assert "no carried wheel of crc32c 2.9.post0" in log, log
    assert "setup      FAILED" in (out / "summary.txt").read_text()
