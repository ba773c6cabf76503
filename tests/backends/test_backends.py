"""Backend selection: the ``backend`` setting (GPUSAVER_BACKEND=auto|cupy|numpy), and CuPy imported lazily."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import gpusaver as gs
from gpusaver import backends, config
from gpusaver.backends.cupy_backend import probe


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """Each test probes CuPy anew."""
    monkeypatch.setattr(backends, "_cupy_backend", None)
    monkeypatch.setattr(backends, "_cupy_error", None)


@pytest.fixture
def use_backend():
    """``use_backend(value)``: the backend setting for this test (config.set, undone afterwards)."""
    applied = []
    yield lambda value: applied.append(config.set(backend=value))
    for overrides in reversed(applied):
        overrides.__exit__(None, None, None)


def _no_gpu() -> bool:
    return probe() is not None


def test_setting_default_and_invalid(monkeypatch):
    try:
        monkeypatch.delenv("GPUSAVER_BACKEND", raising=False)
        config.reset()
        assert backends.backend_setting() == "auto"
        monkeypatch.setenv("GPUSAVER_BACKEND", "CuPy ")
        config.reset()
        assert backends.backend_setting() == "cupy"
        monkeypatch.setenv("GPUSAVER_BACKEND", "torch")
        config.reset()
        with pytest.raises(gs.InvalidArgumentError, match="GPUSAVER_BACKEND='torch'"):
            backends.backend_setting()
        with pytest.raises(gs.InvalidArgumentError, match="backend"):
            config.set(backend="torch")
    finally:
        monkeypatch.undo()
        config.reset()


def test_numpy_setting_never_touches_cupy(monkeypatch, use_backend):
    use_backend("numpy")
    assert backends.gpu_backend() is None
    assert backends.array_module() is np


@pytest.mark.skipif(not _no_gpu(), reason="this machine has a usable GPU")
def test_auto_without_gpu_falls_back_quietly(monkeypatch, use_backend):
    use_backend("auto")
    assert backends.gpu_backend() is None
    assert backends.array_module() is np
    reason = backends.unavailable_reason()
    assert reason, "auto must remember why CuPy is not used"


@pytest.mark.skipif(not _no_gpu(), reason="this machine has a usable GPU")
def test_cupy_without_gpu_raises_clearly(monkeypatch, use_backend):
    use_backend("cupy")
    with pytest.raises(gs.BackendUnavailableError, match="GPUSAVER_BACKEND=cupy") as info:
        backends.gpu_backend()
    assert isinstance(info.value, RuntimeError)


def test_cupy_installed_probe_reports_reason():
    """CI installs a CuPy extra: CuPy imports, and without a driver the probe says why."""
    pytest.importorskip("cupy", reason="the CuPy extra is not installed")
    reason = probe()
    if reason is not None:
        assert "GPU" in reason or "driver" in reason or "CUDA" in reason


def test_importing_gpusaver_does_not_import_cupy():
    code = (
        "import sys, numpy as np, gpusaver as gs, gpusaver.format, gpusaver.cuda.kernels\n"
        "s = gs.Saver({'a': np.ones(3)})\n"
        "assert 'cupy' not in sys.modules, sorted(m for m in sys.modules if 'cupy' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_save_and_restore_work_with_numpy_setting(tmp_path, monkeypatch, use_backend):
    use_backend("numpy")
    a = np.arange(12, dtype=np.float32)
    saver = gs.Saver({"a": a})
    path = saver.save(str(tmp_path / "m"))
    a[:] = 0
    saver.restore(path)
    assert np.array_equal(a, np.arange(12, dtype=np.float32))


def test_unsupported_array_type_is_refused(tmp_path):
    with pytest.raises(gs.UnsupportedDTypeError, match="saves NumPy, CuPy, torch and JAX arrays"):
        gs.Saver({"a": [1, 2, 3]})


@pytest.mark.skipif(not _no_gpu(), reason="this machine has a usable GPU")
def test_get_tensor_on_device_without_gpu_raises(tmp_path, monkeypatch, use_backend):
    use_backend("auto")
    path = gs.Saver({"a": np.ones(3)}).save(str(tmp_path / "m"))
    with pytest.raises(gs.BackendUnavailableError):
        gs.load_checkpoint(path).get_tensor("a", device=0)
