"""gpusaver.storage: every data read and write goes through the FileOps seam, on both backends.

* a restore reads the data files only through the Saver's FileOps (``open_read``, ``preadv``), on
  both host paths and on the CuPy backend (fake CuPy); the writes of the save went through its ``pwrite``;
* an I/O error injected at any read of a restore is raised as that OSError (errno kept), the
  restore never hangs, and the next restore without the fault is bit-exact;
* nothing in the package outside ``gpusaver/storage/`` calls ``os.preadv``/``os.pwrite``/``os.pwritev``.
"""

from __future__ import annotations

import ast
import errno
import os
import pathlib
import threading

import numpy as np
import pytest

import gpusaver as gs
from gpusaver import native
from gpusaver.storage import PosixFileOps
from gpu_fake import fake, fill, put, same  # noqa: F401 - the fixture

PACKAGE = pathlib.Path(gs.__file__).resolve().parent


class Reads(PosixFileOps):
    """Counts data-file opens, reads and writes; fails the ``fail_at``-th read with EIO."""

    def __init__(self, fail_at: int = 0) -> None:
        self.opened: list[str] = []
        self.reads = 0
        self.writes = 0
        self.fail_at = fail_at
        self._lock = threading.Lock()

    def open_read(self, path: str, what: str) -> int:
        self.opened.append(os.path.basename(path))
        return super().open_read(path, what)

    def preadv(self, fd, buffers, offset):
        with self._lock:
            self.reads += 1
            if self.reads == self.fail_at:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().preadv(fd, buffers, offset)

    def pwrite(self, fd, buffers, offset):
        with self._lock:
            self.writes += 1
        super().pwrite(fd, buffers, offset)


def _values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    out = {f"small{i}": rng.standard_normal(50 + i).astype(np.float32) for i in range(30)}
    out["big"] = rng.integers(0, 255, 3 << 20, dtype=np.uint8)  # above every batching threshold
    out["strided"] = rng.standard_normal((40, 16))[:, ::2]
    return out


@pytest.mark.parametrize("host_path", ["native", "python"])
def test_numpy_restores_read_only_through_the_seam(tmp_path, host_path) -> None:
    if host_path == "native" and not native.available():
        pytest.skip("the C extension is not built")
    native.use(host_path == "native")
    try:
        values = _values()
        ops = Reads()
        saver = gs.Saver(values, durable=False, fileops=ops)
        prefix = saver.save(str(tmp_path / "m"))
        assert ops.writes > 0
        fresh = {k: np.zeros_like(v) for k, v in values.items()}
        fresh["strided"] = np.zeros((40, 16))[:, ::2]
        gs.Saver(fresh, durable=False, fileops=ops).restore(prefix)
        assert ops.opened == ["m.data-00000-of-00001"] and ops.reads > 0
        for k, v in values.items():
            assert np.array_equal(fresh[k], v), k
        # an EIO at each read in turn: raised as itself, then a clean restore
        total = ops.reads
        for k in range(1, total + 1):
            failing = Reads(fail_at=k)
            with pytest.raises(OSError) as info:
                gs.Saver(fresh, durable=False, fileops=failing).restore(prefix)
            assert info.value.errno == errno.EIO
        for arr in fresh.values():
            arr[...] = 0
        gs.Saver(fresh, durable=False, fileops=Reads()).restore(prefix)
        for k, v in values.items():
            assert np.array_equal(fresh[k], v), k
    finally:
        native.use(True)


def test_cupy_restores_read_only_through_the_seam(fake, tmp_path) -> None:
    values = {k: v for k, v in _values().items() if k != "strided"}
    arrays = {k: put(fake, v, 0) for k, v in values.items()}
    ops = Reads()
    saver = gs.Saver(arrays, durable=False, fileops=ops)
    prefix = saver.save(str(tmp_path / "m"))
    assert ops.writes > 0
    for arr in arrays.values():
        fill(fake, arr, 0)
    saver.restore(prefix)
    assert ops.opened and ops.reads > 0
    for k, v in values.items():
        assert same(arrays[k].get(), v), k
    for k in range(1, ops.reads + 1):
        with pytest.raises(OSError) as info:
            gs.Saver(arrays, durable=False, fileops=Reads(fail_at=k)).restore(prefix)
        assert info.value.errno == errno.EIO


def test_only_storage_calls_the_raw_file_io() -> None:
    raw = {"preadv", "pread", "pwrite", "pwritev", "writev"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("storage", "_proto"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr in raw and isinstance(node.value, ast.Name)
                    and node.value.id == "os"):
                offenders.append(f"{rel}:{node.lineno} os.{node.attr}")
    # convert.py reads safetensors headers (foreign files, not checkpoint data) with os.pread
    assert [o for o in offenders if not o.startswith("convert.py:")] == []
