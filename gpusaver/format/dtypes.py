"""The map between TensorFlow's ``DataType`` enum and NumPy dtypes.

Numeric types are stored as their raw little-endian element bytes. The narrow
float and integer types come from ``ml_dtypes`` (one byte per element even for
the 4- and 2-bit types, as TensorFlow stores them). ``DT_STRING`` tensors are
NumPy object arrays of ``bytes``.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
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
_TYPES: dict[int, tuple[str, np.dtype]] = {
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
    14: ("DT_BFLOAT16", np.dtype(ml_dtypes.bfloat16)),
    15: ("DT_QINT16", np.dtype(np.int16)),
    16: ("DT_QUINT16", np.dtype(np.uint16)),
    17: ("DT_UINT16", np.dtype(np.uint16)),
    18: ("DT_COMPLEX128", np.dtype(np.complex128)),
    19: ("DT_HALF", np.dtype(np.float16)),
    22: ("DT_UINT32", np.dtype(np.uint32)),
    23: ("DT_UINT64", np.dtype(np.uint64)),
    24: ("DT_FLOAT8_E5M2", np.dtype(ml_dtypes.float8_e5m2)),
    25: ("DT_FLOAT8_E4M3FN", np.dtype(ml_dtypes.float8_e4m3fn)),
    26: ("DT_FLOAT8_E4M3FNUZ", np.dtype(ml_dtypes.float8_e4m3fnuz)),
    27: ("DT_FLOAT8_E4M3B11FNUZ", np.dtype(ml_dtypes.float8_e4m3b11fnuz)),
    28: ("DT_FLOAT8_E5M2FNUZ", np.dtype(ml_dtypes.float8_e5m2fnuz)),
    29: ("DT_INT4", np.dtype(ml_dtypes.int4)),
    30: ("DT_UINT4", np.dtype(ml_dtypes.uint4)),
    31: ("DT_INT2", np.dtype(ml_dtypes.int2)),
    32: ("DT_UINT2", np.dtype(ml_dtypes.uint2)),
    33: ("DT_FLOAT4_E2M1FN", np.dtype(ml_dtypes.float4_e2m1fn)),
}

_UNSAVABLE = {0: "DT_INVALID", 20: "DT_RESOURCE", 21: "DT_VARIANT"}

_QUANTIZED = {11, 12, 13, 15, 16}

# NumPy dtype -> enum value, for writing. Quantized types are never chosen.
_FROM_NUMPY: dict[np.dtype, int] = {
    dt: num for num, (_, dt) in _TYPES.items() if num not in _QUANTIZED
}
# A few NumPy spellings that are the same storage.
for _alias, _num in ((np.dtype(np.int64), 9), (np.dtype(np.uint64), 23)):
    _FROM_NUMPY.setdefault(_alias, _num)


def to_numpy(dtype_enum: int, *, path: str | None = None, tensor: str | None = None) -> np.dtype:
    """Returns the NumPy dtype that holds values of a stored ``DataType``.

    Raises:
        UnsupportedDTypeError: an enum value this package cannot read.
    """
    try:
        return _TYPES[dtype_enum][1]
    except KeyError:
        name = _UNSAVABLE.get(dtype_enum, f"unknown DataType {dtype_enum}")
        where = f" for tensor {tensor!r}" if tensor is not None else ""
        infile = f" in {path!r}" if path is not None else ""
        raise UnsupportedDTypeError(
            f"cannot read {name}{where}{infile}: gpusaver reads numeric, bool and "
            "string tensors only"
        ) from None


def from_numpy(dtype: Any, *, tensor: str | None = None) -> int:
    """Returns the ``DataType`` enum value for a NumPy (or CuPy) dtype.

    Byte order is ignored: data are always written little-endian.

    Raises:
        UnsupportedDTypeError: a dtype the format cannot store.
    """
    dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return DT_STRING
    if dt.byteorder not in "=|":
        dt = dt.newbyteorder("=")
    try:
        return _FROM_NUMPY[dt]
    except KeyError:
        where = f" of tensor {tensor!r}" if tensor is not None else ""
        raise UnsupportedDTypeError(
            f"dtype {dt}{where} cannot be stored in a TensorFlow checkpoint; supported: "
            + ", ".join(sorted({str(d) for d in _FROM_NUMPY}))
        ) from None


def supported_numpy_dtypes() -> list[np.dtype]:
    """Every NumPy dtype a tensor may be written as (numeric, bool, and object for strings)."""
    return list(_FROM_NUMPY)


def dtype_name(dtype_enum: int) -> str:
    """TensorFlow's name for an enum value (``DT_FLOAT`` ...)."""
    if dtype_enum in _TYPES:
        return _TYPES[dtype_enum][0]
    return _UNSAVABLE.get(dtype_enum, f"DataType({dtype_enum})")
