"""Fixtures shared by the test suite.

* ``xp``: the array module a test runs with, ``numpy`` and ``cupy``. The
  ``cupy`` parameter carries the ``gpu`` marker; every test with that marker is
  skipped, with the reason, where CuPy cannot use a GPU.
* ``place``: ``place(xp, arrays, n)`` turns host arrays into
  :class:`gpusaver.Variable` objects spread over ``n`` devices (virtual CPUs
  ``/cpu:k`` for NumPy, ``/gpu:k % device_count`` for CuPy), so sharding runs
  without a GPU.
* ``tf``: TensorFlow, imported once per module (``TF_CPP_MIN_LOG_LEVEL=2``).
* ``host_path``: runs a test twice, with gpusaver's C extension (``"native"``)
  and with its pure-Python twin (``"python"``); modules that must hold on both
  paths use it for every test (``pytestmark = pytest.mark.usefixtures("host_path")``).

Test modules take these as fixtures; they do not import this file (another
``conftest.py`` below ``tests/`` may own the module name).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any, Callable, Mapping

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gpusaver  # noqa: E402

try:  # property tests check behaviour, never speed: no per-example deadline, no "too slow" health check
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "gpusaver", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
    )
    settings.load_profile("gpusaver")
except ImportError:  # hypothesis is a test extra
    pass


@functools.lru_cache(maxsize=None)
def _gpu_unavailable() -> str | None:
    """None when CuPy can use a GPU here (and gpusaver may use it), else why not."""
    if os.environ.get("GPUSAVER_BACKEND", "").strip().lower() == "numpy":
        return "GPUSAVER_BACKEND=numpy"
    from gpusaver.backends.cupy_backend import probe

    return probe()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        reason = _gpu_unavailable()
        if reason is not None:
            pytest.skip(f"needs a usable CUDA GPU: {reason}")


@pytest.fixture(params=["native", "python"])
def host_path(request: pytest.FixtureRequest) -> Any:
    """``"native"`` (the C extension; test_native.py fails if it is not built), then ``"python"``."""
    from gpusaver import native

    if request.param == "native" and not native.available():
        pytest.skip(f"the C extension is not in use: {native.reason}")
    before = native.lib
    native.use(request.param == "native")
    try:
        yield request.param
    finally:
        native.lib = before


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request: pytest.FixtureRequest) -> ModuleType:
    """``numpy``, then ``cupy`` (skipped without a usable GPU)."""
    if request.param == "numpy":
        return np
    import cupy

    return cupy


def _place(xp: ModuleType, arrays: Mapping[str, Any], n_devices: int) -> list[gpusaver.Variable]:
    out = []
    for i, (name, host) in enumerate(arrays.items()):
        k = i % n_devices
        if xp is np:
            out.append(gpusaver.Variable(host, name=name, device=f"/cpu:{k}"))
        else:
            gpu = k % int(xp.cuda.runtime.getDeviceCount())
            with xp.cuda.Device(gpu):
                arr = xp.asarray(host)
            out.append(gpusaver.Variable(arr, name=name, device=f"/gpu:{gpu}"))
    return out


@pytest.fixture
def place() -> Callable[[ModuleType, Mapping[str, Any], int], list[gpusaver.Variable]]:
    """``place(xp, arrays, n)``: named variables, the i-th on device ``i % n``.

    NumPy arrays are placed as given (not copied) on virtual CPU devices
    ``/cpu:k``; for CuPy each host array is copied onto ``/gpu:(k % device_count)``.
    """
    return _place


@pytest.fixture(scope="module")
def tf() -> ModuleType:
    """TensorFlow, imported once (quietly)."""
    import tensorflow

    return tensorflow
