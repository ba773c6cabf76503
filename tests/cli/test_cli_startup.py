"""What ``python -m gpusaver`` imports: ml_dtypes (most of a second of every command's start) only once a
narrow dtype (bfloat16, float8, int4 ...) is needed, never for ``--help``, usage errors, ``import gpusaver``,
or ``inspect`` and ``verify`` of a checkpoint without such tensors. Each run is a fresh interpreter; the narrow
dtypes still work wherever they are needed, imported then."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpusaver.format import BundleWriter

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ml_dtypes",)

# Runs ``python -m gpusaver ARGS...`` in this interpreter (as __main__, the way -m does), then prints,
# as JSON on stderr's last line, its exit status and which of HEAVY it imported.
_RUN = textwrap.dedent(
    """
    import json, runpy, sys
    heavy = %r
    sys.argv = ["gpusaver", *sys.argv[1:]]
    try:
        runpy.run_module("gpusaver", run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as e:
        status = e.code
    sys.stdout.flush()
    print(json.dumps({"status": status, "imported": [m for m in heavy if m in sys.modules]}), file=sys.stderr)
    """
) % (HEAVY,)


def _gpusaver(*args: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _RUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stderr.splitlines()[-1]), done.stdout


def _fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "--help"], ["convert"], []],
                         ids=["--help", "--version", "inspect --help", "usage error", "no command"])
def test_help_version_and_usage_errors_do_not_import_ml_dtypes(args: list[str]) -> None:
    result, out = _gpusaver(*args)
    assert result["imported"] == [], result
    assert result["status"] == (0 if "--help" in args or "--version" in args else 2)
    if args == ["--help"]:
        assert "inspect" in out and "convert" in out


def test_import_gpusaver_does_not_import_ml_dtypes() -> None:
    out = _fresh("import sys, gpusaver, gpusaver.cli, gpusaver.format\nprint('ml_dtypes' in sys.modules)\n")
    assert out.strip() == "False"


def test_inspect_and_verify_of_a_float32_checkpoint_do_not_import_ml_dtypes(tmp_path: Path) -> None:
    prefix = tmp_path / "model"
    with BundleWriter(str(prefix)) as w:
        w.add("dense/w", np.arange(12, dtype=np.float32).reshape(3, 4))
        w.add("step", np.array(7, np.int64))
    for args in (["inspect", str(prefix)], ["inspect", str(prefix), "--json"], ["verify", str(prefix)]):
        result, out = _gpusaver(*args)
        assert result["status"] == 0 and "ml_dtypes" not in result["imported"], (args, result)
    assert "DT_FLOAT" in _gpusaver("inspect", str(prefix))[1]


def test_the_narrow_dtypes_still_work_when_first_needed(tmp_path: Path) -> None:
    """A bfloat16 checkpoint written by another process: listed, loaded and converted with its dtype,
    by interpreters that had not imported ml_dtypes before."""
    prefix = tmp_path / "narrow"
    import ml_dtypes

    with BundleWriter(str(prefix)) as w:
        w.add("b", np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16))
        w.add("f8", np.arange(4, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn))
    result, out = _gpusaver("inspect", str(prefix), "--json")
    listed = {v["name"]: v for v in json.loads(out)["variables"]}
    assert listed["b"]["numpy_dtype"] == "bfloat16" and listed["f8"]["numpy_dtype"] == "float8_e4m3fn"
    out = _fresh(
        "import sys, gpusaver as gs\n"
        "from gpusaver.format import dtypes\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        f"state = gs.load({str(prefix)!r})\n"
        "print(state['b'].dtype, state['b'].astype('float32').tolist(), state['f8'].dtype)\n"
        "print(dtypes.from_numpy('bfloat16'), dtypes.dtype_name(14))\n"
    )
    assert out.split("\n")[:2] == ["bfloat16 [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] float8_e4m3fn", "14 DT_BFLOAT16"]
    result, out = _gpusaver("convert", str(prefix), str(tmp_path / "narrow.safetensors"), "--no-progress")
    assert result["status"] == 0, out
    result, out = _gpusaver("convert", str(tmp_path / "narrow.safetensors"), str(tmp_path / "back" / "m"),
                            "--no-progress")
    assert result["status"] == 0, out
    out = _fresh(f"import gpusaver as gs\nprint(gs.load({str(tmp_path / 'back' / 'm')!r})['b'].dtype)\n")
    assert out.strip() == "bfloat16"


def test_a_forked_child_inherits_ml_dtypes_instead_of_importing_it_on_its_first_save() -> None:
    """Fork servers and fork pools: the parent loads ml_dtypes once, before its first fork."""
    out = _fresh(
        "import os, sys, gpusaver\n"
        "before = 'ml_dtypes' in sys.modules\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if 'ml_dtypes' in sys.modules else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(before, os.waitstatus_to_exitcode(status))\n"
    )
    assert out.split() == ["False", "0"]
