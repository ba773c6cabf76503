"""Backend selection: one place decides whether device arrays go through CuPy.

``GPUSAVER_BACKEND`` (``auto`` by default):

* ``auto``: CuPy when it imports and a usable GPU is present; otherwise NumPy.
  Never raises for a missing GPU, driver or CuPy.
* ``cupy``: CuPy, or :class:`~gpusaver.errors.BackendUnavailableError` saying why not.
* ``numpy``: host arrays only.

CuPy is imported lazily, only here and in the CuPy backend.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from gpusaver.backends.base import Backend
from gpusaver.backends.numpy_backend import NumpyBackend
from gpusaver.errors import BackendUnavailableError, UnsupportedDTypeError

__all__ = ["Backend", "NumpyBackend", "NUMPY", "backend_setting", "gpu_backend", "backend_for", "array_module"]

NUMPY = NumpyBackend()
_CHOICES = ("auto", "cupy", "numpy")
_lock = threading.Lock()
_cupy_backend: Any = None
_cupy_error: str | None = None


def backend_setting() -> str:
    """The ``backend`` setting (``GPUSAVER_BACKEND``; default ``auto``): see :mod:`gpusaver.config`.

    Raises:
        InvalidArgumentError: a value other than auto, cupy or numpy.
    """
    from gpusaver import config

    return config.get("backend")


def _probe_cupy() -> Any:
    """Returns the CuPy backend, or None with the reason kept in ``_cupy_error``."""
    global _cupy_backend, _cupy_error
    with _lock:
        if _cupy_backend is not None or _cupy_error is not None:
            return _cupy_backend
        try:
            from gpusaver.backends.cupy_backend import CupyBackend, probe

            reason = probe()
            if reason is None:
                _cupy_backend = CupyBackend()
            else:
                _cupy_error = reason
        except Exception as e:  # noqa: BLE001 - any failure means "no usable GPU"
            _cupy_error = f"{type(e).__name__}: {e}"
        return _cupy_backend


def gpu_backend() -> Any:
    """The CuPy backend per ``GPUSAVER_BACKEND``, or None (``auto`` without a GPU, ``numpy``).

    Raises:
        BackendUnavailableError: ``GPUSAVER_BACKEND=cupy`` and no usable GPU.
    """
    setting = backend_setting()
    if setting == "numpy":
        return None
    backend = _probe_cupy()
    if backend is None and setting == "cupy":
        raise BackendUnavailableError(
            f"GPUSAVER_BACKEND=cupy but CuPy cannot use a GPU here: {_cupy_error}. "
            "Install a CuPy extra matching the driver (gpusaver[cuda12] or gpusaver[cuda13]) on a "
            "machine with an NVIDIA GPU, or set GPUSAVER_BACKEND=auto or numpy."
        )
    return backend


def _is_cupy_array(array: Any) -> bool:
    if "cupy" not in sys.modules:
        return False
    return type(array).__module__.split(".")[0] == "cupy"


def backend_for(array: Any, name: str | None = None) -> Any:
    """The backend that owns ``array``.

    Raises:
        UnsupportedDTypeError: not a NumPy or CuPy array.
        BackendUnavailableError: a CuPy array while ``GPUSAVER_BACKEND=numpy``.
    """
    if NUMPY.owns(array):
        return NUMPY
    if _is_cupy_array(array):
        if backend_setting() == "numpy":
            raise BackendUnavailableError(
                f"variable {name!r} is a CuPy array but GPUSAVER_BACKEND=numpy; unset it or use 'auto'"
            )
        backend = _probe_cupy()
        if backend is None:
            raise BackendUnavailableError(f"variable {name!r} is a CuPy array but CuPy is unusable: {_cupy_error}")
        return backend
    raise UnsupportedDTypeError(
        f"variable {name!r} is a {type(array).__module__}.{type(array).__qualname__}; "
        "gpusaver saves NumPy and CuPy arrays"
    )


def array_module() -> Any:
    """``cupy`` when the selected backend is CuPy, else ``numpy``."""
    if gpu_backend() is not None:
        import cupy

        return cupy
    import numpy

    return numpy


def unavailable_reason() -> str | None:
    """Why CuPy is not used (None when it is, or was not probed)."""
    _probe_cupy()
    return _cupy_error
