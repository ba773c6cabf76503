"""The map between TensorFlow's ``DataType`` enum and NumPy dtypes.

Numeric types are stored as their raw little-endian element bytes. The narrow
float and integer types come from ``ml_dtypes`` (one byte per element even for
the 4- and 2-bit types, as TensorFlow stores them), imported the first time one
of them is needed: the command line and the readers of other dtypes start
without it. ``DT_STRING`` tensors are NumPy object arrays of ``bytes``.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import numpy as np

from gpusaver.errors import UnsupportedDTypeError

__all__ = [
    "DT_STRING",
    "OBJECT",
    "to_numpy",
    "from_numpy",
    "dtype_name",
]

DT_STRING = 7
OBJECT = np.dtype(object)

# enum value -> (TF name, NumPy dtype). Quantized types read as their storage type.
_NUMPY_TYPES: dict[int, tuple[str, np.dtype]] = {
    1: ("DT_FLOAT", np.dtype(np.float32)),
    2: ("DT_DOUBLE", np.dtype(np.float64)),
    3: ("DT_INT32", np.dtype(np.int32)),
    4: ("DT_UINT8", np.dtype(np.uint8)),
    5: ("DT_INT16", np.dtype(np.int16)),
    6: ("DT_INT8", np.dtype(np.int8)),
    7: ("DT_STRING", OBJECT),
    8: ("DT_COMPLEX64", np.dtype(np.complex64)),
    9: ("DT_INT64", np.dtype(np.int64)),
    10: ("DT_BOOL", np.dtype(np.bool_)),
    11: ("DT_QINT8", np.dtype(np.int8)),
    12: ("DT_QUINT8", np.dtype(np.uint8)),
    13: ("DT_QINT32", np.dtype(np.int32)),
    15: ("DT_QINT16", np.dtype(np.int16)),
    16: ("DT_QUINT16", np.dtype(np.uint16)),
    17: ("DT_UINT16", np.dtype(np.uint16)),
    18: ("DT_COMPLEX128", np.dtype(np.complex128)),
    19: ("DT_HALF", np.dtype(np.float16)),
    22: ("DT_UINT32", np.dtype(np.uint32)),
    23: ("DT_UINT64", np.dtype(np.uint64)),
}

# enum value -> (TF name, the ml_dtypes type's name). ml_dtypes takes most of a second to import, so
# these join the tables the first time one of them is needed (see _load_ml_dtypes), not at import.
_ML_TYPES: dict[int, tuple[str, str]] = {
    14: ("DT_BFLOAT16", "bfloat16"),
    24: ("DT_FLOAT8_E5M2", "float8_e5m2"),
    25: ("DT_FLOAT8_E4M3FN", "float8_e4m3fn"),
    26: ("DT_FLOAT8_E4M3FNUZ", "float8_e4m3fnuz"),
    27: ("DT_FLOAT8_E4M3B11FNUZ", "float8_e4m3b11fnuz"),
    28: ("DT_FLOAT8_E5M2FNUZ", "float8_e5m2fnuz"),
    29: ("DT_INT4", "int4"),
    30: ("DT_UINT4", "uint4"),
    31: ("DT_INT2", "int2"),
    32: ("DT_UINT2", "uint2"),
    33: ("DT_FLOAT4_E2M1FN", "float4_e2m1fn"),
}

_UNSAVABLE = {0: "DT_INVALID", 20: "DT_RESOURCE", 21: "DT_VARIANT"}

_QUANTIZED = {11, 12, 13, 15, 16}

_NAMES: dict[int, str] = {num: name for num, (name, _) in {**_NUMPY_TYPES, **_ML_TYPES}.items()}


def _tables(types: dict[int, tuple[str, np.dtype]]) -> tuple[dict[int, tuple[str, np.dtype]], dict[np.dtype, int]]:
    """The enum -> dtype table in enum order, and the dtype -> enum table for writing (quantized types
    are never chosen; a few NumPy spellings that are the same storage added)."""
    ordered = dict(sorted(types.items()))
    from_numpy = {dt: num for num, (_, dt) in ordered.items() if num not in _QUANTIZED}
    for alias, num in ((np.dtype(np.int64), 9), (np.dtype(np.uint64), 23)):
        from_numpy.setdefault(alias, num)
    return ordered, from_numpy


_TYPES, _FROM_NUMPY = _tables(_NUMPY_TYPES)
_ml_loaded = False
_ml_lock = threading.Lock()


def _load_ml_dtypes() -> None:
    """Imports ml_dtypes (once) and puts its types into the tables."""
    global _TYPES, _FROM_NUMPY, _ml_loaded
    with _ml_lock:
        if _ml_loaded:
            return
        import ml_dtypes

        types = dict(_NUMPY_TYPES)
        for num, (name, attr) in _ML_TYPES.items():
            types[num] = (name, np.dtype(getattr(ml_dtypes, attr)))
        _TYPES, _FROM_NUMPY = _tables(types)
        _ml_loaded = True


# A process that forks loads ml_dtypes first, once: its children (a fork server's savers, a fork pool's
# workers) inherit it, as they did when gpusaver imported it eagerly, instead of each importing it on its
# first save. A process that never forks (the command line) never pays for it unless it needs it.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_load_ml_dtypes)


def to_numpy(dtype_enum: int, *, path: str | None = None, tensor: str | None = None) -> np.dtype:
    """Returns the NumPy dtype that holds values of a stored ``DataType``.

    Raises:
        UnsupportedDTypeError: an enum value this package cannot read.
    """
    found = _TYPES.get(dtype_enum)
    if found is None and dtype_enum in _ML_TYPES:
        _load_ml_dtypes()
        found = _TYPES.get(dtype_enum)
    if found is not None:
        return found[1]
    name = _UNSAVABLE.get(dtype_enum, f"unknown DataType {dtype_enum}")
    where = f" for tensor {tensor!r}" if tensor is not None else ""
    infile = f" in {path!r}" if path is not None else ""
    raise UnsupportedDTypeError(
        f"cannot read {name}{where}{infile}: gpusaver reads numeric, bool and "
        "string tensors only"
    )


def from_numpy(dtype: Any, *, tensor: str | None = None) -> int:
    """Returns the ``DataType`` enum value for a NumPy (or CuPy) dtype.

    Byte order is ignored: data are always written little-endian.

    Raises:
        UnsupportedDTypeError: a dtype the format cannot store.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:  # a name such as "bfloat16" NumPy knows once ml_dtypes is imported
        if _ml_loaded:
            raise
        _load_ml_dtypes()
        dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return DT_STRING
    if dt.byteorder not in "=|":
        dt = dt.newbyteorder("=")
    found = _FROM_NUMPY.get(dt)
    if found is None and not _ml_loaded and "ml_dtypes" in sys.modules:  # an ml_dtypes type: it is imported
        _load_ml_dtypes()
        found = _FROM_NUMPY.get(dt)
    if found is not None:
        return found
    where = f" of tensor {tensor!r}" if tensor is not None else ""
    raise UnsupportedDTypeError(
        f"dtype {dt}{where} cannot be stored in a TensorFlow checkpoint; supported: "
        + ", ".join(sorted({str(d) for d in _FROM_NUMPY}))
    )


def narrow_dtypes_loaded() -> bool:
    """Whether ml_dtypes' types (bfloat16, float8, ...) are in the tables yet."""
    return _ml_loaded


def supported_numpy_dtypes() -> list[np.dtype]:
    """Every NumPy dtype a tensor may be written as now (numeric, bool, and object for strings).

    ml_dtypes' types are listed once ml_dtypes is imported: no array can have one before, and a
    process that can no longer read its install (it dropped privileges) must not need to import it
    for a save of float32 arrays.
    """
    if "ml_dtypes" in sys.modules:
        _load_ml_dtypes()
    return list(_FROM_NUMPY)


def dtype_name(dtype_enum: int) -> str:
    """TensorFlow's name for an enum value (``DT_FLOAT`` ...)."""
    if dtype_enum in _NAMES:
        return _NAMES[dtype_enum]
    return _UNSAVABLE.get(dtype_enum, f"DataType({dtype_enum})")
