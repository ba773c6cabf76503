"""Named, placed variables and the resolution of a Saver's ``var_list``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from gpusaver import backends
from gpusaver.devices import DeviceSpec, parse_device
from gpusaver.errors import UnsupportedDTypeError
from gpusaver.format import dtypes

__all__ = ["Variable", "ResolvedVariable", "resolve_var_list"]


class Variable:
    """An array with a name and a device.

    Args:
        value: a NumPy or CuPy array. The Saver saves it and restores into it
            in place.
        name: the name it is saved under (required when given to a Saver in a list).
        device: where it lives; by default the array's own device (NumPy:
            ``/cpu:0``; CuPy: ``/gpu:<id>``). A NumPy array may be put on a
            virtual CPU device ``/cpu:N``, which makes it a shard of its own.

    Raises:
        ValueError: a device the array cannot live on, or a malformed device string.
    """

    def __init__(self, value: Any, name: str | None = None, device: "str | DeviceSpec | None" = None) -> None:
        backend = backends.backend_for(value, name)
        spec = backend.default_device(value) if device is None else parse_device(device)
        backend.check_device(value, spec)
        if device is not None and spec.is_gpu:
            own = backend.default_device(value)
            if own.index != spec.index:
                raise ValueError(
                    f"variable {name!r} lives on {own.short} but was given device {spec.short}; "
                    "move the array first (with cupy.cuda.Device(i): cupy.asarray(...))"
                )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"a variable name is a str, not {type(name).__name__}")
        self.value = value
        self.name = name
        self.device = spec

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.value.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def __repr__(self) -> str:
        return f"Variable(name={self.name!r}, shape={self.shape}, dtype={self.dtype}, device={self.device.short!r})"


@dataclass
class ResolvedVariable:
    """A variable ready for the pipeline."""

    name: str
    array: Any
    device: DeviceSpec
    backend: Any


def _as_variable(name: str | None, value: Any) -> Variable:
    if isinstance(value, Variable):
        if name is not None and value.name is not None and value.name != name:
            # The dict key wins, as in TensorFlow; the Variable keeps its placement.
            return Variable(value.value, name, value.device)
        if value.name is None:
            return Variable(value.value, name, value.device)
        return value
    return Variable(value, name)


def resolve_var_list(var_list: Mapping[str, Any] | Iterable[Any]) -> list[ResolvedVariable]:
    """Validates ``var_list`` and returns its variables.

    A dict maps names to arrays or Variables; a list holds named Variables.

    Raises:
        ValueError: duplicate names, one array under two names, unnamed variables.
        TypeError / UnsupportedDTypeError: not an array, or an unsupported dtype.
    """
    if isinstance(var_list, Mapping):
        items = [(k, v) for k, v in var_list.items()]
        for key, _ in items:
            if not isinstance(key, str) or not key:
                raise ValueError(f"variable names must be non-empty strings, got {key!r}")
        variables = [_as_variable(k, v) for k, v in items]
    elif isinstance(var_list, (list, tuple)):
        variables = []
        for v in var_list:
            if not isinstance(v, Variable):
                raise TypeError(
                    f"a var_list given as a list holds gpusaver.Variable objects, got {type(v).__name__}; "
                    "use a dict {name: array} for plain arrays"
                )
            if not v.name:
                raise ValueError(f"{v!r} has no name; give it one with Variable(value, name=...)")
            variables.append(v)
    else:
        raise TypeError(f"var_list must be a dict or a list of Variables, not {type(var_list).__name__}")

    seen_names: dict[str, Variable] = {}
    seen_arrays: dict[int, str] = {}
    out = []
    for v in variables:
        assert v.name is not None
        if v.name in seen_names:
            raise ValueError(f"At least two variables have the same name: {v.name}")
        if id(v.value) in seen_arrays:
            raise ValueError(
                f"the same array is saved under two names, {seen_arrays[id(v.value)]!r} and {v.name!r}"
            )
        seen_names[v.name] = v
        seen_arrays[id(v.value)] = v.name
        backend = backends.backend_for(v.value, v.name)
        kind = np.dtype(backend.dtype(v.value)).kind
        if kind in "SU":
            raise UnsupportedDTypeError(
                f"variable {v.name!r} is a fixed-width NumPy string array ({v.value.dtype}), which cannot "
                "hold every string a restore may bring back; use an object array of bytes "
                "(np.array([...], dtype=object))"
            )
        dtypes.from_numpy(backend.dtype(v.value), tensor=v.name)  # a clear error for unsupported dtypes
        if np.dtype(backend.dtype(v.value)).kind == "O":
            for item in v.value.reshape(-1).tolist():
                if not isinstance(item, (bytes, str)):
                    raise TypeError(
                        f"string variable {v.name!r} holds a {type(item).__name__}; object arrays must hold bytes or str"
                    )
        out.append(ResolvedVariable(v.name, v.value, v.device, backend))
    return out
