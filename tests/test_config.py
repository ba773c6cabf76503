"""gpusaver.config: one place for every GPUSAVER_* variable and tunable size.

* every setting has a getter, a documented default and an environment variable;
* the environment sets it in a new process, and a bad value is a typed error naming the variable;
* ``config.set`` applies at once and, as a context manager, is undone on exit;
* no module but ``gpusaver/config.py`` reads ``os.environ`` (a static check).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpusaver as gs
from gpusaver import config
from gpusaver.storage.fileops import PosixFileOps

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented_with_its_variable_and_default() -> None:
    doc = config.__doc__ or ""
    for name, setting in config.settings().items():
        assert setting.env.startswith("GPUSAVER_")
        assert f"``{name}``" in doc and f"``{setting.env}``" in doc, name
        assert config.get(name) == setting.default or setting.env in os.environ


def test_set_applies_at_once_and_as_a_context_manager_is_undone() -> None:
    before = config.get("segment_bytes")
    with config.set(segment_bytes=4096, writer_threads=1):
        assert config.get("segment_bytes") == 4096 and config.get("writer_threads") == 1
        with config.set(segment_bytes=8192):
            assert config.get("segment_bytes") == 8192
        assert config.get("segment_bytes") == 4096
    assert config.get("segment_bytes") == before


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"segment_bytes": 0}, gs.InvalidArgumentError),
        ({"segment_bytes": "big"}, gs.InvalidArgumentTypeError),
        ({"native": 1}, gs.InvalidArgumentTypeError),
        ({"backend": "tpu"}, gs.InvalidArgumentError),
        ({"slots": 1}, gs.InvalidArgumentError),
        ({"no_such_setting": 1}, gs.InvalidArgumentError),
    ],
)
def test_bad_settings_are_typed_errors_and_change_nothing(values: dict, error: type) -> None:
    before = {name: config.get(name) for name in config.settings()}
    with pytest.raises(error):
        config.set(writer_threads=2, **values)  # the good one is not applied either
    assert {name: config.get(name) for name in config.settings()} == before


def _in_child(env: dict[str, str], code: str) -> subprocess.CompletedProcess:

    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPUSAVER_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300)


def test_the_environment_sets_a_new_process() -> None:
    env = {s.env: str(v) for s, v in [(config.settings()["segment_bytes"], 65536),
                                       (config.settings()["native"], 0),
                                       (config.settings()["backend"], "numpy"),
                                       (config.settings()["slots"], 3)]}
    code = ("import json; from gpusaver import config, native\n"
            "print(json.dumps([config.get(n) for n in ('segment_bytes', 'native', 'backend', 'slots')]"
            " + [native.lib is None]))")
    done = _in_child(env, code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [65536, False, "numpy", 3, True]


def test_a_bad_environment_value_names_the_variable() -> None:
    done = _in_child({"GPUSAVER_SEGMENT_BYTES": "lots"},
                     "from gpusaver import config\ntry:\n    config.get('segment_bytes')\n"
                     "except config.InvalidArgumentError as e:\n    print(e)")
    assert done.returncode == 0, done.stderr
    assert "GPUSAVER_SEGMENT_BYTES='lots'" in done.stdout


def test_no_module_but_config_reads_the_environment() -> None:
    readers = []
    for path in sorted((ROOT / "gpusaver").rglob("*.py")):
        if path.name == "config.py" or "_proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not readers, readers


class _CountingOps(PosixFileOps):
    def __init__(self) -> None:
        self.pwrites = 0

    def pwrite(self, fd: int, buffers, offset: int) -> None:  # type: ignore[no-untyped-def]
        self.pwrites += 1
        super().pwrite(fd, buffers, offset)


@pytest.mark.usefixtures("host_path")
def test_the_sizes_are_what_the_pipeline_uses(tmp_path: Path) -> None:
    """Smaller segments mean more writes, and every size still round-trips bit for bit."""
    rng = np.random.default_rng(1)
    arrays = {f"t{i}": rng.integers(0, 255, n, dtype=np.uint8) for i, n in enumerate([1, 100, 5000, 70_000, 1 << 20])}
    counts = []
    for settings in ({}, {"segment_bytes": 4096, "pack_limit": 128, "pack_bytes": 1024, "small_bytes": 256,
                          "batch_bytes": 512, "batch_count": 2, "gap_bytes": 0, "parallel_read_bytes": 1,
                          "parallel_chunked_bytes": 1, "writer_threads": 3, "reader_threads": 2}):
        ops = _CountingOps()
        with config.set(**settings):
            saver = gs.Saver({k: v.copy() for k, v in arrays.items()}, fileops=ops)
            prefix = saver.save(str(tmp_path / f"m{len(counts)}"))
            for v in saver.variables.values():
                v[...] = 0
            saver.restore(prefix)
        assert all(np.array_equal(saver.variables[k], arrays[k]) for k in arrays)
        counts.append(ops.pwrites)
    assert counts[1] >= counts[0] + (1 << 20) // 4096 - 1, counts
