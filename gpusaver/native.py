"""The C extension's handle, and the switch that turns it off.

``gpusaver._native`` (built from ``gpusaver/_native.c`` when the package is
installed) runs the per-tensor loops of the host path in C: it lays out and
checksums batches of small tensors, encodes and decodes index entries, builds
and parses the index table, and checks arrays against their entries. Each
function has a pure-Python twin in :mod:`gpusaver.format`, which the tests
compare it with and which runs when the extension is missing or disabled.

Set ``GPUSAVER_NATIVE=0`` to run the pure-Python code (the environment is read
at import; tests switch :data:`lib` directly with :func:`use`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["lib", "available", "use", "type_codes", "reason"]

#: The extension API this Python code speaks (``NATIVE_API`` in _native.c).
_API = 4


def _load() -> tuple[ModuleType | None, str]:
    from gpusaver import config

    if not config.get("native"):
        return None, "disabled by GPUSAVER_NATIVE"
    try:
        from gpusaver import _native  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"not built ({e})"
    if getattr(_native, "API", None) != _API:
        return None, f"stale build (API {getattr(_native, 'API', None)}, need {_API}): reinstall gpusaver"
    return _native, "built"


_built, reason = _load()

#: The extension module, or None when the pure-Python code runs.
lib: Any = _built


def available() -> bool:
    """True when the C extension is built and loadable (whether or not it is in use)."""
    return _built is not None


def use(enabled: bool) -> None:
    """Turns the C extension on (if built) or off for this process."""
    global lib
    lib = _built if enabled else None


_CODES: dict[int, int] | None = None
_CODES_NARROW = False


def type_codes() -> dict[int, int]:
    """NumPy type number -> DataType enum, for the dtypes the fast path takes.

    Only native-order numeric types are listed; a byte-swapped array, an
    object array or an unknown type number takes the general path.
    """
    global _CODES, _CODES_NARROW
    from gpusaver.format import dtypes

    if _CODES is None or _CODES_NARROW != dtypes.narrow_dtypes_loaded():  # again once ml_dtypes' types join
        codes: dict[int, int] = {}
        candidates = [np.dtype(c) for c in np.typecodes["All"]]
        candidates += [dt for dt in dtypes.supported_numpy_dtypes()]
        for dt in candidates:
            if dt.kind in "OSUMm" or dt.names is not None or dt.byteorder not in "=|":
                continue
            try:
                enum = dtypes.from_numpy(dt)
            except Exception:  # noqa: BLE001 - unsupported types stay off the fast path
                continue
            codes[dt.num] = enum
        _CODES, _CODES_NARROW = codes, dtypes.narrow_dtypes_loaded()
    return _CODES
