"""Named, placed variables and the resolution of a Saver's ``var_list``."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, is_
from typing import Any, Iterable, Mapping

import numpy as np

from gpusaver import backends, native
from gpusaver.devices import CPU0, DeviceSpec, parse_device
from gpusaver.errors import InvalidArgumentError, InvalidArgumentTypeError, UnsupportedDTypeError
from gpusaver.format import dtypes
from gpusaver.frameworks import adapt, check_not_deleted, framework_of

__all__ = [
    "Variable",
    "ResolvedVariable",
    "SourceWatch",
    "check_no_overlap",
    "checked_cast",
    "find_ties",
    "resolve_var_list",
    "re_resolve",
    "restore_targets",
    "slice_spec",
]


class Variable:
    """An array with a name and a device.

    Args:
        value: a NumPy, CuPy, torch or JAX array, a Python or NumPy scalar, or
            any object with ``__dlpack__``, ``__cuda_array_interface__`` or
            ``__array_interface__``. The Saver saves it and restores into it in
            place (JAX arrays and scalars are immutable: saved, never restored
            into; ``gpusaver.load`` brings them back).
        name: the name it is saved under (required when given to a Saver in a list).
        device: where it lives; by default the array's own device (host memory:
            ``/cpu:0``; GPU k: ``/gpu:k``, torch's ``cuda:k`` included). A host
            array may be put on a virtual CPU device ``/cpu:N``, which makes it
            a shard of its own.
        full_shape, offset: the array is the region ``offset[i] : offset[i] +
            shape[i]`` of a larger tensor of shape ``full_shape`` (TensorFlow's
            ``save_slice_info``; one partition of a sharded embedding, a
            tensor-parallel block). It is saved as a TensorFlow slice of that
            tensor, and restored from whatever partitioning the checkpoint holds:
            only the stored slices that overlap the region are read.

    Raises:
        InvalidArgumentError: a device the array cannot live on, a malformed device string,
            or a region outside ``full_shape`` (or only one of ``full_shape`` and ``offset``).
        UnsupportedDTypeError: not an array gpusaver can see.
    """

    def __init__(
        self,
        value: Any,
        name: str | None = None,
        device: "str | DeviceSpec | None" = None,
        *,
        full_shape: Iterable[int] | None = None,
        offset: Iterable[int] | None = None,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise InvalidArgumentTypeError(f"a variable name is a str, not {type(name).__name__}")
        adapted = adapt(value, name)
        array = adapted.array
        backend = backends.backend_for(array, name)
        own = parse_device(adapted.device) if adapted.device else backend.default_device(array)
        spec = own if device is None else parse_device(device)
        backend.check_device(array, spec)
        if device is not None and spec.is_gpu and own.index != spec.index:
            raise InvalidArgumentError(
                f"variable {name!r} lives on {own.short} but was given device {spec.short}; "
                "move the array first (with cupy.cuda.Device(i): cupy.asarray(...))"
            )
        self.value = value
        self.name = name
        self.device = spec
        #: the device the caller asked for, or None (the array's own)
        self.requested = spec if device is not None else None
        self.array = array
        self.kind = adapted.kind
        self.immutable = adapted.immutable
        #: the value's dtype where ``array`` holds a same-size integer stand-in (CUDA bfloat16, float8)
        self.logical_dtype = adapted.dtype
        #: ``(full_shape, offset)`` of a partitioned variable, else None
        self.partition = _partition(name, tuple(array.shape), full_shape, offset)

    @property
    def dtype(self) -> np.dtype:
        return self.logical_dtype if self.logical_dtype is not None else np.dtype(self.array.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __repr__(self) -> str:
        return f"Variable(name={self.name!r}, shape={self.shape}, dtype={self.dtype}, device={self.device.short!r})"


@dataclass(slots=True)
class ResolvedVariable:
    """A variable ready for the pipeline.

    Attributes:
        array: the NumPy or CuPy array saved from and restored into.
        source: the caller's object (a torch tensor, a JAX array, ...; ``array`` itself for NumPy and CuPy).
        immutable: why a restore cannot write into it, or None.
    """

    name: str
    array: Any
    device: DeviceSpec
    backend: Any
    source: Any = None
    immutable: str | None = None
    logical_dtype: np.dtype | None = None
    #: ``(full_shape, offset)`` of a partitioned variable, else None
    partition: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    #: the device the caller asked for, or None (the array's own)
    requested: DeviceSpec | None = None

    @property
    def key(self) -> str:
        """What tells it apart from the Saver's other variables: its name, and a region's slice spec."""
        if self.partition is None:
            return self.name
        return f"{self.name}/{slice_spec(self.partition, tuple(self.array.shape))}"

    @property
    def dtype(self) -> np.dtype:
        """The dtype saved and expected on restore (``array``'s own unless it is a stand-in)."""
        if self.logical_dtype is not None:
            return self.logical_dtype
        return np.dtype(self.backend.dtype(self.array))


def _partition(
    name: str | None, shape: tuple[int, ...], full_shape: Iterable[int] | None, offset: Iterable[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(full_shape, offset)`` checked against the array's shape, or None for a whole variable."""
    if full_shape is None and offset is None:
        return None
    if full_shape is None or offset is None:
        raise InvalidArgumentError(f"variable {name!r}: give both full_shape and offset, or neither")
    try:
        full = tuple(int(d) for d in full_shape)
        start = tuple(int(o) for o in offset)
    except (TypeError, ValueError):
        raise InvalidArgumentTypeError(f"variable {name!r}: full_shape and offset are sequences of integers") from None
    if not (len(full) == len(start) == len(shape)):
        raise InvalidArgumentError(
            f"variable {name!r}: full_shape {list(full)} and offset {list(start)} need one entry per dimension "
            f"of its shape {list(shape)}"
        )
    for d, (n, o, f) in enumerate(zip(shape, start, full)):
        if o < 0 or f < 0 or o + n > f:
            raise InvalidArgumentError(
                f"variable {name!r}: dimension {d} covers {o}:{o + n}, outside the full shape's {f}"
            )
    return full, start


def slice_spec(partition: tuple[tuple[int, ...], tuple[int, ...]], shape: tuple[int, ...]) -> str:
    """TensorFlow's slice spec of a region (``"0,5:-"``): a dimension covered whole is ``-``."""
    full, start = partition
    return ":".join("-" if (o == 0 and n == f) else f"{o},{n}" for n, o, f in zip(shape, start, full))


def _as_variable(name: str | None, value: Any) -> Variable:
    if isinstance(value, Variable):
        if (name is not None and value.name is not None and value.name != name) or value.name is None:
            # The dict key wins, as in TensorFlow; the Variable keeps its placement and region.
            part = value.partition
            return Variable(value.value, name, value.requested, full_shape=part and part[0], offset=part and part[1])
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
        from gpusaver.pipeline import gc_pause  # not at the top: the pipeline imports this module

        with gc_pause.paused():  # a million new objects, none of them cyclic: the collector would walk them again and again
            fast = _resolve_host_arrays(var_list)
        if fast is not None:
            return fast
        items = [(k, v) for k, v in var_list.items()]
        for key, _ in items:
            if not isinstance(key, str) or not key:
                raise InvalidArgumentError(f"variable names must be non-empty strings, got {key!r}")
        variables = [_as_variable(k, v) for k, v in items]
    elif isinstance(var_list, (list, tuple)):
        variables = []
        for v in var_list:
            if not isinstance(v, Variable):
                raise InvalidArgumentTypeError(
                    f"a var_list given as a list holds gpusaver.Variable objects, got {type(v).__name__}; "
                    "use a dict {name: array} for plain arrays"
                )
            if not v.name:
                raise InvalidArgumentError(f"{v!r} has no name; give it one with Variable(value, name=...)")
            variables.append(v)
    else:
        raise InvalidArgumentTypeError(f"var_list must be a dict or a list of Variables, not {type(var_list).__name__}")

    seen_names: dict[str, Variable] = {}
    seen_arrays: dict[int, str] = {}
    partitions: dict[str, list[Variable]] = {}
    out = []
    for v in variables:
        assert v.name is not None
        try:
            v.name.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgumentError(
                f"variable name {v.name!r} cannot be encoded as UTF-8 ({e.reason} at position {e.start})"
            ) from None
        if v.name in seen_names:
            other = seen_names[v.name]
            if v.partition is None or other.partition is None:
                raise InvalidArgumentError(f"At least two variables have the same name: {v.name}")
            _check_partitions(v, other)
            parts = partitions.setdefault(v.name, [other])
            for p in parts:
                _check_disjoint(v, p)
            parts.append(v)
        if id(v.value) in seen_arrays:
            raise InvalidArgumentError(
                f"the same array is saved under two names, {seen_arrays[id(v.value)]!r} and {v.name!r}"
            )
        seen_names[v.name] = v
        seen_arrays[id(v.value)] = v.name
        backend = backends.backend_for(v.array, v.name)
        mine = v.logical_dtype if v.logical_dtype is not None else np.dtype(backend.dtype(v.array))
        kind = mine.kind
        if kind in "SU":
            raise UnsupportedDTypeError(
                f"variable {v.name!r} is a fixed-width NumPy string array ({v.array.dtype}), which cannot "
                "hold every string a restore may bring back; use an object array of bytes "
                "(np.array([...], dtype=object))"
            )
        dtypes.from_numpy(mine, tensor=v.name)  # a clear error for unsupported dtypes
        if kind == "O":
            for item in v.array.reshape(-1).tolist():
                if not isinstance(item, (bytes, str)):
                    raise InvalidArgumentTypeError(
                        f"string variable {v.name!r} holds a {type(item).__name__}; object arrays must hold bytes or str"
                    )
        out.append(
            ResolvedVariable(
                v.name, v.array, v.device, backend, v.value, v.immutable, v.logical_dtype, v.partition, v.requested
            )
        )
    return out


def re_resolve(variables: "list[ResolvedVariable]") -> list[ResolvedVariable]:
    """:func:`resolve_var_list` of the caller's objects again: views of their current memory, on the
    device each now lives on (the one the caller asked for, where it was given), checked as a new
    Saver's variables are."""
    again = []
    for v in variables:
        part = v.partition
        try:
            again.append(Variable(v.source, v.name, v.requested, full_shape=part and part[0], offset=part and part[1]))
        except InvalidArgumentError as e:
            raise type(e)(f"variable {v.name!r} changed since the Saver was made: {e}") from None
    return resolve_var_list(again)


class SourceWatch:
    """Notices when the caller's objects are no longer what a Saver's views of them show.

    A Saver sees a torch tensor through a view of its memory, made once. The tensor object can
    be given other memory while the Saver holds it (``param.data = new``, ``model.double()``,
    ``t.set_(...)``, a ``resize_``): a save through the old view would write the old bytes, a
    restore would write where the model no longer reads. ``stale()`` compares each tensor's
    data pointer, shape, strides, dtype and lazy conjugate/negation bits with those of the view
    (well under a microsecond a tensor); the old view keeps the old memory alive, so new memory
    always has another address.
    A JAX array cannot change, but it can be deleted (donated to a jitted function).

    NumPy and CuPy arrays are the variables themselves: their current memory is read at every
    save. Objects seen through ``__dlpack__`` or the array interfaces cannot be watched.
    """

    def __init__(self, variables: "list[ResolvedVariable]") -> None:
        self._tensors: list[Any] = []
        self._jax: list[tuple[str, Any]] = []
        self._prints: list[tuple[Any, ...]] | None = None
        kinds = set(map(type, map(_source_of, variables)))
        kinds.discard(np.ndarray)  # the common case, a dict of NumPy arrays, has nothing to watch
        if not kinds:
            return
        tensor = getattr(sys.modules.get("torch"), "Tensor", None)
        if tensor is not None and any(issubclass(k, tensor) for k in kinds):
            self._tensors = [v.source for v in variables if isinstance(v.source, tensor)]
            self._prints = self._fingerprint()
        if any(k.__module__.split(".")[0] in ("jax", "jaxlib") for k in kinds):
            self._jax = [(v.name, v.source) for v in variables if framework_of(v.source) in ("jax", "jaxlib")]

    @property
    def watching(self) -> bool:
        return bool(self._tensors or self._jax)

    def _fingerprint(self) -> list[tuple[Any, ...]]:
        import torch

        t, ts = torch.Tensor, self._tensors
        # the lazy conjugate and negation bits too: t.data = t.data.conj() keeps memory, shape and dtype
        return list(zip(map(t.data_ptr, ts), map(t.size, ts), map(t.stride, ts), map(_dtype_of, ts),
                        map(t.is_conj, ts), map(t.is_neg, ts)))

    def stale(self) -> bool:
        """Whether a torch tensor now has other memory, shape, strides or dtype than its view.

        Raises:
            InvalidArgumentError: a JAX array was deleted.
        """
        for name, a in self._jax:
            check_not_deleted(a, name)
        return self._prints is not None and self._fingerprint() != self._prints


def _check_partitions(a: Variable, b: Variable) -> None:
    """Two regions of one name must be of the same tensor: its full shape and dtype."""
    assert a.partition is not None and b.partition is not None
    if a.partition[0] != b.partition[0] or a.dtype != b.dtype:
        raise InvalidArgumentError(
            f"the regions of {a.name!r} disagree about the tensor: full shape {list(b.partition[0])} {b.dtype} "
            f"and {list(a.partition[0])} {a.dtype}"
        )


def _check_disjoint(a: Variable, b: Variable) -> None:
    assert a.partition is not None and b.partition is not None
    if all(oa < ob + nb and ob < oa + na
           for oa, na, ob, nb in zip(a.partition[1], a.shape, b.partition[1], b.shape)) and 0 not in a.shape + b.shape:
        raise InvalidArgumentError(
            f"two regions of {a.name!r} overlap: offset {list(b.partition[1])} shape {list(b.shape)} and "
            f"offset {list(a.partition[1])} shape {list(a.shape)}"
        )


_dtype_of = attrgetter("dtype")
_source_of = attrgetter("source")


def _resolve_host_arrays(var_list: Mapping[str, Any]) -> list[ResolvedVariable] | None:
    """:func:`resolve_var_list` of a dict of plain NumPy arrays (the common case, up to millions of
    them), checked in bulk: each check below is the general path's, made once over all variables
    (a dtype once per distinct dtype). Returns None where any check would fail or anything else is
    in the dict (other arrays, Variables, object arrays): the general path then resolves it one
    variable at a time and raises its error, naming the first variable at fault."""
    if type(var_list) is dict:
        names, values = list(var_list), list(var_list.values())
    else:
        pairs = list(var_list.items())
        names, values = [k for k, _ in pairs], [v for _, v in pairs]
        if len(set(names)) != len(names):
            return None
    n = len(names)
    if not n or set(map(type, values)) != {np.ndarray} or set(map(type, names)) != {str}:
        return None
    if "" in (var_list if type(var_list) is dict else set(names)):
        return None
    try:
        "".join(names).encode("utf-8")
    except UnicodeEncodeError:
        return None
    ids = np.fromiter(map(id, values), np.uintp, n)
    ids.sort(kind="stable")  # ascending runs, as arrays made one after another have, sort in one pass
    if n > 1 and not (ids[1:] != ids[:-1]).all():  # the same array under two names
        return None
    kinds = list(map(_dtype_of, values))
    if all(map(is_, kinds, repeat(kinds[0]))):
        distinct = [kinds[0]]  # one dtype object for them all, as NumPy's own dtypes are
    else:
        distinct = list(dict(zip(map(id, kinds), kinds)).values())
    for dt in distinct:
        if dt.kind in "SUO":
            return None
        try:
            dtypes.from_numpy(dt)
        except UnsupportedDTypeError:
            return None
    numpy_backend = backends.NUMPY
    return list(map(ResolvedVariable, names, values, repeat(CPU0), repeat(numpy_backend), values))


def _byte_bounds(array: Any) -> tuple[bool, int, int] | None:
    """``(on a GPU, first byte, one past the last byte)`` of an array's memory; None when empty."""
    shape = tuple(array.shape)
    itemsize = int(array.dtype.itemsize)
    if itemsize == 0 or 0 in shape:
        return None
    if isinstance(array, np.ndarray):
        gpu, ptr = False, int(array.__array_interface__["data"][0])
    else:
        gpu, ptr = True, int(array.data.ptr)
    lo = hi = ptr
    for n, stride in zip(shape, tuple(array.strides)):
        step = (n - 1) * int(stride)
        if step < 0:
            lo += step
        else:
            hi += step
    return gpu, lo, hi + itemsize


def check_restorable(variables: "list[ResolvedVariable]") -> None:
    """Refuses a restore into a variable whose elements share memory (a broadcast or expanded view).

    Such a variable can be saved, but not restored: its elements cannot each
    receive their own value.

    Raises:
        InvalidArgumentError: naming the variable.
    """
    for v in variables:
        flags = getattr(v.array, "flags", None)
        if flags is not None and flags.c_contiguous:
            continue  # a C-contiguous array never overlaps itself
        if _overlaps_itself(v.array):
            raise InvalidArgumentError(
                f"variable {v.name!r} overlaps itself (strides {tuple(v.array.strides)} for shape "
                f"{tuple(v.array.shape)}: a broadcast or expanded view), so a restore cannot give each element "
                "its own value; restore into a contiguous array (ascontiguousarray / .contiguous())"
            )


def _overlaps_itself(array: Any) -> bool:
    """Whether two elements of ``array`` may share memory (stride 0, or strides too small for the
    extents below them, as ``expand``/``broadcast_to``/``as_strided`` make).

    The test is exact for every layout NumPy, CuPy and torch make by slicing, transposing
    and reshaping; a stranger one it cannot prove disjoint counts as overlapping.
    """
    shape = tuple(array.shape)
    if 0 in shape:
        return False
    itemsize = int(array.dtype.itemsize)
    dims = sorted((abs(int(st)), int(n)) for n, st in zip(shape, tuple(array.strides)) if int(n) > 1)
    reach = itemsize  # bytes spanned by one element and the smaller dimensions
    for stride, n in dims:
        if stride < reach:
            return True
        reach = stride * (n - 1) + reach
    return False


def _overlap(a: Any, b: Any) -> bool:
    """Whether two arrays whose byte bounds intersect share a byte of memory."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        try:
            return bool(np.shares_memory(a, b, max_work=1 << 20))
        except np.exceptions.TooHardError:
            return True  # cannot tell: refuse rather than restore nondeterministically
    return True  # device arrays: intersecting bounds are refused


def _memory_groups(variables: "list[ResolvedVariable]") -> list[list[int]]:
    """Positions of the variables that may share memory, in groups of two or more: host arrays with
    host arrays, device arrays with device arrays. (Not by allocation: a NumPy array and
    ``torch.from_numpy`` of it have different .base chains and the same memory.)"""
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(variables):
        groups.setdefault("host" if isinstance(v.array, np.ndarray) else "device", []).append(i)
    return [members for members in groups.values() if len(members) > 1]


def restore_targets(variables: "list[ResolvedVariable]", regions: "list[ResolvedVariable]" = ()) -> list[list[int]]:
    """Checks that a restore can write into ``variables`` and the ``regions`` of partitioned ones (no
    two share memory unless they are one array under several names) and returns the ties among
    ``variables`` (:func:`find_ties`), which the restore writes once. Host arrays whose byte ranges
    are all apart are told so at once by the C extension."""
    everything = list(variables) + list(regions)
    arrays = [v.array for v in everything]
    if arrays and all(type(a) is np.ndarray for a in arrays) and _disjoint(arrays):
        return []
    ties = find_ties(list(variables))
    seconds = {i for group in ties for i in group[1:]}
    check_no_overlap([v for i, v in enumerate(everything) if i not in seconds])
    return ties


def _disjoint(arrays: list[np.ndarray]) -> bool:
    """True when no two of the NumPy arrays' byte ranges intersect (so no two share memory); False
    when some do, or the C extension that measures them is missing."""
    bounds = getattr(native.lib, "byte_bounds", None)
    if bounds is None:
        return False
    lo, hi = bounds(arrays)
    if len(lo) > 1 and not (lo[1:] >= lo[:-1]).all():
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], hi[order]
    return bool((np.maximum.accumulate(hi)[:-1] <= lo[1:]).all())


def find_ties(variables: "list[ResolvedVariable]") -> list[list[int]]:
    """The groups of variables that are one array under several names: the same memory seen
    the same way (address, shape, strides, dtype), as a tied embedding and output head are in
    a ``state_dict()``. Each group lists positions in order; variables tied to none are left out."""
    ties = []
    for members in _memory_groups(variables):
        by_view: dict[tuple[Any, ...], list[int]] = {}
        for i in members:
            v = variables[i]
            bounds = _byte_bounds(v.array)
            if bounds is None:
                continue  # empty: nothing to write
            key = (bounds, tuple(v.array.shape), tuple(v.array.strides), str(v.array.dtype), v.device.canonical)
            by_view.setdefault(key, []).append(i)
        ties += [group for group in by_view.values() if len(group) > 1]
    return sorted(ties)


def check_no_overlap(variables: "list[ResolvedVariable]") -> None:
    """Refuses a restore into variables whose arrays share memory (overlapping views of one buffer).

    Restoring into two views of the same bytes would leave whichever wrote
    last; the result would depend on scheduling. Views that interleave without
    sharing a byte (``a[::2]`` and ``a[1::2]``) are fine on the host. A save of
    such views is fine (it only reads them), and so is a restore into one array
    under several names (:func:`find_ties`: the caller writes it once).

    Raises:
        InvalidArgumentError: naming both variables.
    """
    for members in _memory_groups(variables):
        _check_group(variables, members)


def _check_group(variables: "list[ResolvedVariable]", members: list[int]) -> None:
    spans = []
    for i in members:
        bounds = _byte_bounds(variables[i].array)
        if bounds is not None:
            spans.append((bounds[0], bounds[1], bounds[2], i))
    spans.sort()  # host spans first, then device spans, each by start address
    active: list[tuple[int, int]] = []  # (end, index) of spans that may still overlap the next
    space = None
    for gpu, lo, hi, i in spans:
        if gpu != space:
            space, active = gpu, []
        active = [(end, j) for end, j in active if end > lo]
        for _, j in active:
            if _overlap(variables[j].array, variables[i].array):
                first, second = sorted((i, j))
                raise InvalidArgumentError(
                    f"variables {variables[first].name!r} and {variables[second].name!r} share memory (overlapping "
                    "views of one buffer); restoring into both would be nondeterministic: save a copy of one"
                )
        active.append((hi, i))


def checked_cast(value: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """``value`` converted to ``dtype`` for a restore with ``cast=True``: exact, or refused.

    A cast may round a floating-point value to a narrower float (float64 -> float32, -> bfloat16),
    as any conversion of precision does; it never wraps, saturates or invents a value: an integer
    or bool target must hold every value (integral, finite, within its range; bool: 0 or 1), a
    float target every finite value without overflowing (and an integer exactly), a real target
    no imaginary part.

    Raises:
        DTypeMismatchError: naming the variable, the first value that does not fit and the
            target's range; strings and numbers never convert.
    """
    from gpusaver.errors import DTypeMismatchError

    src, dst = value.dtype, np.dtype(dtype)
    if (src.kind == "O") != (dst.kind == "O"):
        raise DTypeMismatchError(f"variable {name!r} is {dst} but the checkpoint stores {src}: strings and numbers do not convert")
    if src == dst or src.kind == "O":
        return value.astype(dst)

    def refuse(bad: Any, why: str) -> DTypeMismatchError:
        return DTypeMismatchError(f"variable {name!r}: the stored {src} value {bad!r} does not convert to {dst} exactly ({why})")

    flat = value.reshape(-1)
    if src.kind == "c" and dst.kind != "c":
        imag = np.flatnonzero(flat.imag != 0)
        if imag.size:
            raise refuse(flat[imag[0]].item(), "it has an imaginary part")
        flat = flat.real
    with np.errstate(all="ignore"):  # a value that does not fit is found below and refused
        out = flat.astype(dst)
    if dst.kind in "biu":
        lo, hi = (0, 1) if dst.kind == "b" else (int(np.iinfo(dst).min), int(np.iinfo(dst).max))
        if flat.dtype.kind == "f" or _is_ml_float(flat.dtype):
            as64 = flat.astype(np.float64)
            # hi + 1 is a power of two, exact as a float (hi itself is not: float(2**63 - 1) is 2**63)
            bad = np.flatnonzero(
                ~np.isfinite(as64) | (as64 != np.floor(as64)) | (as64 < float(lo)) | (as64 >= float(hi + 1))
            )
        elif flat.dtype.kind in "iu" and flat.size and (int(flat.min()) < lo or int(flat.max()) > hi):
            bad = np.array([next(i for i, x in enumerate(flat.tolist()) if not lo <= x <= hi)])
        else:
            bad = np.empty(0, np.intp)
        if bad.size:
            raise refuse(flat[bad[0]].item(), f"{dst} holds {'0 and 1' if dst.kind == 'b' else f'integers from {lo} to {hi}'}")
    elif dst.kind in "fc" or _is_ml_float(dst):
        wide = out.astype(np.complex128 if dst.kind == "c" else np.float64)
        if flat.dtype.kind in "biu":
            # An integer that overflows a float becomes inf, and inf casts back to INT_MIN: refuse
            # the non-finite first, then check the rest by the round trip.
            bad = np.flatnonzero(~np.isfinite(wide))
            if not bad.size:
                with np.errstate(all="ignore"):
                    back = (out.real if dst.kind == "c" else out).astype(flat.dtype)
                bad = np.flatnonzero(back != flat)
            if bad.size:
                raise refuse(flat[bad[0]].item(), f"{dst} cannot hold that integer exactly")
        else:
            before = flat.astype(np.complex128 if flat.dtype.kind == "c" else np.float64)
            # finite -> inf is an overflow; inf -> nan a type without infinities (float8_e4m3fn)
            bad = np.flatnonzero((np.isfinite(before) & ~np.isfinite(wide)) | (np.isinf(before) & ~np.isinf(wide)))
            if bad.size:
                raise refuse(flat[bad[0]].item(), f"beyond the largest finite {dst}, or an infinity it cannot hold")
    return out.reshape(value.shape)


def _is_ml_float(dtype: np.dtype) -> bool:
    """bfloat16 and the float8 types (ml_dtypes'), which NumPy reports as kind 'V'."""
    return dtype.kind == "V" and dtype.type.__module__.startswith("ml_dtypes")
