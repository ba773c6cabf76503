"""The C extension compiles cleanly, is the build of the current source, and is what runs.

* ``gpusaver/_native.c`` compiles with the system C compiler, warnings as
  errors, optimised and not.
* Built with AddressSanitizer and UBSan, it runs ``native_sanitized.py`` (every
  function, on good and malformed input, and a Saver round trip) in a child
  process without a single report.
* The loaded extension is not older than its source: running the tests after
  editing the C file without reinstalling fails here instead of testing an old
  binary.
* Turning the extension off in a fresh process (``GPUSAVER_NATIVE=0``) gives
  the pure-Python path; on, the extension.

Behaviour of each function against its Python twin is in ``test_native.py``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from gpusaver import native

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCE = REPO / "gpusaver" / "_native.c"
WARNINGS = ["-Wall", "-Wextra", "-Wshadow", "-Wno-unused-parameter", "-Werror"]


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc or gcc): the C extension cannot be built")
    return cc


SANITIZE = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def _compile(flags: list[str], out: pathlib.Path) -> None:
    includes = ["-isystem", sysconfig.get_paths()["include"], "-isystem", np.get_include()]
    cmd = [_compiler(), "-std=c11", "-fPIC", "-shared", *WARNINGS, *flags, *includes, str(SOURCE), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"


@pytest.mark.parametrize("flags", [["-O3"], ["-O0", "-g"], SANITIZE], ids=["O3", "O0", "sanitizers"])
def test_compiles_without_warnings(flags: list[str], tmp_path: pathlib.Path) -> None:
    """Every warning is an error: a sloppy change to the C code fails the build here."""
    _compile(flags, tmp_path / "native.so")


def test_runs_clean_under_sanitizers(tmp_path: pathlib.Path) -> None:
    """AddressSanitizer and UBSan see no error while hostile input goes through every function."""
    runtimes = []
    for lib in ("libasan.so", "libubsan.so"):
        found = subprocess.run([_compiler(), f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(found) or not os.path.exists(found):
            pytest.fail(f"{_compiler()} has no {lib}: the sanitizer run cannot be made")
        runtimes.append(found)
    package = tmp_path / "gpusaver"
    shutil.copytree(REPO / "gpusaver", package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    _compile(SANITIZE, package / f"_native{sysconfig.get_config_var('EXT_SUFFIX')}")
    env = dict(
        os.environ,
        PYTHONPATH=str(tmp_path),
        LD_PRELOAD=":".join(runtimes),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",  # CPython's own allocations are not leaks to report
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        GPUSAVER_NATIVE="1",
    )
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "native" / "native_sanitized.py")], env=env, capture_output=True, text=True,
        cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0 and "sanitized run ok" in done.stderr, done.stderr[-6000:]
    assert "runtime error" not in done.stderr and "AddressSanitizer" not in done.stderr, done.stderr[-6000:]


def test_loaded_build_is_current() -> None:
    """The extension in use was built after its source last changed (reinstall after editing it)."""
    if not native.available():
        pytest.skip(f"not built: {native.reason} (test_native.py::test_extension_is_built decides)")
    built = pathlib.Path(native._built.__file__)
    if built.parent != SOURCE.parent:
        pytest.skip(f"installed elsewhere ({built}); this checkout's source is not what it was built from")
    assert built.stat().st_mtime >= SOURCE.stat().st_mtime, (
        f"{built.name} is older than {SOURCE.name}: run `pip install -e .` (or bash tests/run.sh) to rebuild"
    )


@pytest.mark.parametrize("setting, expect", [("0", "disabled by GPUSAVER_NATIVE"), ("1", "built")])
def test_environment_switch(setting: str, expect: str) -> None:
    """``GPUSAVER_NATIVE=0`` runs the pure-Python path in a new process; ``1`` the extension."""
    if setting == "1" and not native.available():
        pytest.skip(f"not built: {native.reason}")
    code = "from gpusaver import native; print(native.reason); print(native.lib is not None)"
    env = dict(os.environ, GPUSAVER_NATIVE=setting)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    reason, in_use = out.splitlines()
    assert reason == expect
    assert in_use == str(setting == "1")
