"""A training-state tree as named tensors plus one structure tensor, and back.

``gpusaver.save`` takes any tree of dicts (str or int keys), lists, tuples and
NamedTuples whose leaves are arrays, scalars, strings, bytes and None.
:func:`encode` walks it once and gives

* the tensors to write, by name: each array and NumPy scalar leaf (TensorFlow
  sees them as ordinary variables, named by their path);
* the structure: containers, keys (with their types, in order), each leaf's
  kind and, where it is not the leaf's own path, its variable's name. It is
  written as JSON in the UTF-8 bytes of one 1-D uint8 tensor,
  :data:`TREE_TENSOR` (``_gpusaver/tree``), which any TensorFlow reader accepts.

Variable names: a leaf's name is its path, keys joined with ``/`` (an int key
or a list index in decimal), exactly as :func:`gpusaver.api.flatten` joins a
tree of str-keyed dicts. Where that name is not usable (empty, under the
reserved prefix ``_gpusaver/``) or two leaves would share one (``{"a": {"b":
x}, "a/b": y}``, ``{0: x, "0": y}``), those leaves take their escaped name
instead: each str key with ``%`` as ``%25``, ``/`` as ``%2F``, the empty key as
``%00`` and a leading ``_`` of ``_gpusaver`` as ``%5F``; each int key as
``%i`` and its decimal. Escaped names never collide with one another; the
structure records them, so a load never has to parse a name.

The structure tensor's JSON (``version`` 1)::

    {"format": "gpusaver.tree", "version": 1,
     "nodes": [["d", ["model", "optim", "step"], "cci"], ["d", ["w"], "a"],
               ["d", ["state", "param_groups"], "cc"], ["d", [0], "c"], ["d", ["m"], "a"],
               ["l", "c"], ["d", ["lr", "betas"], "fc"], ["t", "ff"]],
     "names": {}, "values": {"2": "0.001", "3": "0.9", "4": "0.999", "5": 7}}

for ``{"model": {"w": w}, "optim": {"state": {0: {"m": m}}, "param_groups":
[{"lr": 1e-3, "betas": (0.9, 0.999)}]}, "step": 7}``: tensors ``model/w`` and
``optim/state/0/m``, and the structure.

Tied leaves: two array leaves that are one tensor -- the same object, or views of the same memory
with the same shape, strides and dtype, as a GPT-2 ``state_dict()``'s ``transformer.wte.weight`` and
``lm_head.weight`` are -- are written once. The second leaf's entry in ``names`` is the first
leaf's variable name: a name that more than one leaf has is one tensor (tied), read once and given
to each of them. TensorFlow's reader sees one variable for the pair. Other views that overlap
one buffer are written as they are, each its own variable. This stays version 1: a reader that
predates ties reads each such leaf from the one variable (equal arrays, no longer one).

Stateful objects (as torch DCP's ``Stateful``): a leaf with ``state_dict()`` and
``load_state_dict()`` methods (an ``nn.Module``, an optimizer, an LR scheduler, a ``GradScaler``)
is written as its state dict, which the structure records as the container it is;
:func:`gpusaver.api.load_into` gives it back through ``load_state_dict``.

``nodes`` lists the containers in preorder: ``["d", keys, kinds]`` a dict,
``["l", kinds]`` a list, ``["t", kinds]`` a tuple, ``["T", kinds, class,
fields]`` a NamedTuple. ``kinds`` has one letter per child: ``c`` a container
(the next node); a tensor, named by the leaf's path (or by ``names``): ``a`` an
array, ``g`` a NumPy scalar, ``S`` a str and ``Y`` bytes longer than
:data:`INLINE_MAX`, ``p`` a pickled object (only with ``allow_pickle``); or a
leaf the structure carries itself, its value in ``values``: ``n`` None, ``b``
bool, ``i`` int (a JSON int within 64 bits, else hex digits: any size), ``f``
float (its repr; NaN as ``nan:`` and its 64 bits), ``x`` complex (two such
floats), ``s`` str, ``y`` bytes (base64). Leaves are numbered in preorder from
0; ``names`` and ``values`` are keyed by that number (as a JSON string).

Python numbers, None and short strings travel in the structure, not as 0-d
tensors: 100,000 of them beside 100,000 arrays cost 2.2x to 2.4x the arrays'
save time as tensors (measured), under 2x in the structure. TensorFlow does
not see them; NumPy scalars (``np.int64(step)``) and 0-d arrays stay tensors.
"""

from __future__ import annotations

import base64
import json
import pickle
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from gpusaver.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    UnsupportedVersionError,
)

__all__ = [
    "TREE_TENSOR",
    "RESERVED_PREFIX",
    "Encoded",
    "Stored",
    "encode",
    "decode",
    "variables",
    "spec_tensor",
    "parse_spec",
    "show_path",
    "leaf_names",
    "is_stateful",
    "tie_key",
]

RESERVED_PREFIX = "_gpusaver/"
#: The name of the structure tensor.
TREE_TENSOR = "_gpusaver/tree"
FORMAT = "gpusaver.tree"
VERSION = 1

_NONE = type(None)
#: exact types -> kind letter; anything else goes through :func:`_classify`
_FAST = {
    np.ndarray: "a",
    bool: "b",
    int: "i",
    float: "f",
    complex: "x",
    str: "s",
    bytes: "y",
    _NONE: "n",
    dict: "c",
    list: "c",
    tuple: "c",
}
_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64
_TENSOR_KINDS = frozenset("agSYp")
_INLINE_KINDS = frozenset("nbifxsy")
#: str and bytes leaves up to this length travel in the structure; longer ones are string tensors
INLINE_MAX = 4096


class Malformed(CorruptCheckpointError):
    """A structure tensor that does not hold together; :func:`decode` names the checkpoint."""


@dataclass
class Encoded:
    """What :func:`encode` makes of a tree.

    Attributes:
        flat: ``{variable name: value}`` of every tensor to write (the structure tensor included
            when ``spec`` is set), in tree order.
        spec: the structure (see the module's docstring).
        pickled: the paths of the pickled leaves, shown.
    """

    flat: dict[str, Any]
    spec: dict[str, Any]
    pickled: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Stored:
    """A leaf as the structure records it: its kind letter, its tensor's name (or None), its
    inline value (big ints)."""

    kind: str
    name: str | None
    value: Any = None


def show_path(path: tuple[Any, ...]) -> str:
    """A path as Python subscripts: ``['optim']['state'][0]`` (``the root`` when empty)."""
    return "".join(f"[{k!r}]" for k in path) or "the root"


def _is_array_like(value: Any) -> bool:
    """Whether :func:`gpusaver.frameworks.adapt` would see ``value`` as an array."""
    if isinstance(value, np.ndarray):
        return True
    module = type(value).__module__.split(".")[0]
    if module == "cupy":
        return True
    if module == "torch" and "torch" in sys.modules:
        import torch

        return isinstance(value, torch.Tensor)
    if module in ("jax", "jaxlib") and "jax" in sys.modules:
        import jax

        if isinstance(value, jax.Array):
            return True
    return any(hasattr(value, a) for a in ("__dlpack__", "__cuda_array_interface__", "__array_interface__"))


def _classify(value: Any) -> str:
    """The kind letter of a value whose exact type is not in ``_FAST``; ``o`` for an object that is
    not data."""
    if isinstance(value, (Mapping, list, tuple)):
        return "c"
    if isinstance(value, str):  # np.str_ included
        return "s"
    if isinstance(value, bytes):  # np.bytes_ included
        return "y"
    if isinstance(value, np.generic):
        return "g"
    if isinstance(value, int):  # IntEnum and other int subclasses (bool is exact, never subclassed)
        return "i"
    if isinstance(value, float):
        return "f"
    if isinstance(value, complex):
        return "x"
    if _is_array_like(value):
        return "a"
    return "o"


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple)


def _children(node: Any, path: tuple[Any, ...]) -> tuple[list[Any], list[Any], list[Any]]:
    """``(spec node, keys, values)`` of a container; dict keys checked."""
    if isinstance(node, Mapping):
        keys = list(node.keys())
        for k in keys:
            if type(k) is not str and (type(k) is bool or not isinstance(k, (str, int))):
                raise InvalidArgumentTypeError(
                    f"tree keys are str or int, got {k!r} ({type(k).__name__}) under {show_path(path)}"
                )
        keys = [k if type(k) is str or type(k) is int else (str(k) if isinstance(k, str) else int(k)) for k in keys]
        return ["d", keys], keys, list(node.values())
    values = list(node)
    keys = list(range(len(values)))
    if isinstance(node, list):
        return ["l"], keys, values
    if _is_namedtuple(node):
        cls = type(node)
        return ["T", None, f"{cls.__module__}.{cls.__qualname__}", list(cls._fields)], keys, values
    return ["t"], keys, values


def _segment(key: Any) -> str:
    return key if type(key) is str else str(key)


def _escaped(key: Any, first: bool, in_dict: bool) -> str:
    """One key of a path in its escaped form (see the module's docstring)."""
    if type(key) is str:
        if not key:
            return "%00"
        s = key.replace("%", "%25").replace("/", "%2F")
        if first and s.startswith("_gpusaver"):
            s = "%5F" + s[1:]
        return s
    return f"%i{key}" if in_dict else str(key)


def is_stateful(value: Any) -> bool:
    """Whether ``value`` is a Stateful (as torch DCP's): it has callable ``state_dict`` and
    ``load_state_dict`` (a class itself is not)."""
    return (not isinstance(value, type) and callable(getattr(value, "state_dict", None))
            and callable(getattr(value, "load_state_dict", None)))


def state_of(value: Any, path: tuple[Any, ...]) -> Any:
    """A Stateful's ``state_dict()``, what :func:`encode` writes in its place.

    Raises:
        InvalidArgumentError: ``state_dict()`` raised, naming the path.
    """
    try:
        return value.state_dict()
    except Exception as e:  # noqa: BLE001 - the object's own error, named by its path
        raise InvalidArgumentError(
            f"{show_path(path)} ({type(value).__qualname__}): its state_dict() raised {type(e).__name__}: {e}"
        ) from e


def tie_key(value: Any) -> Any:
    """What makes two array leaves one tensor: the same memory seen the same way (address, shape,
    byte strides, dtype, device; torch's conjugate and negative bits), or for an array whose memory
    is not seen, the same object. None for an empty array (nothing to write, nothing to tie)."""
    t = type(value)
    if t is np.ndarray:
        if value.size == 0:
            return None
        return ("host", value.__array_interface__["data"][0], value.shape, value.strides, value.dtype.name,
                False, False)
    module = t.__module__.split(".")[0]
    try:
        if module == "torch":
            if value.layout is not _torch_strided() or value.numel() == 0:
                return None if value.numel() == 0 else ("id", id(value))
            dev = value.device
            size = value.element_size()
            return ("host" if dev.type == "cpu" else (dev.type, dev.index), value.data_ptr(), tuple(value.shape),
                    tuple(st * size for st in value.stride()), str(value.dtype).rpartition(".")[2],
                    bool(value.is_conj()), bool(value.is_neg()))
        if module == "cupy":
            if value.size == 0:
                return None
            return (("cuda", value.device.id), value.data.ptr, tuple(value.shape), tuple(value.strides),
                    value.dtype.name, False, False)
    except Exception:  # noqa: BLE001 - a tensor without storage (meta, fake): only itself
        pass
    return ("id", id(value))


def _find_ties(arrays: list[tuple[int, str, Any]]) -> dict[int, tuple[int, str]]:
    """``{leaf number: (leaf number, name) of the first leaf it is one tensor with}`` among the
    ``(leaf number, name, value)`` of the array leaves. Only leaves that start at one address (found
    at once: one call to the C extension for NumPy arrays) are compared by :func:`tie_key`."""
    from gpusaver import native

    starts: list[Any] = [None] * len(arrays)
    host = [i for i, a in enumerate(arrays) if type(a[2]) is np.ndarray]
    bounds = getattr(native.lib, "byte_bounds", None)
    if len(host) > 1 and bounds is not None:
        lo, _ = bounds([arrays[i][2] for i in host])
        for i, start in zip(host, lo.tolist()):
            starts[i] = start
    for i, (_, _, value) in enumerate(arrays):
        if starts[i] is None:
            starts[i] = _start(value)
    count: dict[Any, int] = {}
    for start in starts:
        count[start] = count.get(start, 0) + 1
    seen: dict[Any, tuple[int, str]] = {}
    tied: dict[int, tuple[int, str]] = {}
    for i, (seq, name, value) in enumerate(arrays):
        if count[starts[i]] < 2:
            continue
        key = tie_key(value)
        if key is None:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = (seq, name)
        else:
            tied[seq] = first
    return tied


def _start(value: Any) -> Any:
    """Where an array's memory starts (cheaply: ties are sought among arrays that start at one place)."""
    t = type(value)
    try:
        if t is np.ndarray:
            return value.__array_interface__["data"][0]
        module = t.__module__.split(".")[0]
        if module == "torch":
            return value.data_ptr()
        if module == "cupy":
            return value.data.ptr
    except Exception:  # noqa: BLE001 - no memory to see: only the object itself
        pass
    return ("id", id(value))


def _torch_strided() -> Any:
    import torch

    return torch.strided


def encode(tree: Any, *, allow_pickle: bool = False, skip_objects: bool = False, ties: bool = True) -> Encoded:
    """The tensors and the structure of ``tree``; everything checked, nothing written.

    A Stateful leaf (:func:`is_stateful`) is its ``state_dict()``. With ``ties``, an array leaf that
    is one tensor with an earlier one (:func:`tie_key`) is not written again: the structure names
    the earlier leaf's variable for it.

    Raises:
        InvalidArgumentTypeError: the root is not a container; a key that is neither str nor int;
            an object that is not data (without ``allow_pickle``) -- each naming its path.
        InvalidArgumentError: a cycle; a tree with no leaves.
    """
    states: dict[int, Any] = {}  # id of a Stateful -> its state dict (the second walk sees the same)
    if not isinstance(tree, (Mapping, list, tuple)) and is_stateful(tree):
        tree = state_of(tree, ())
    if not isinstance(tree, (Mapping, list, tuple)):
        raise InvalidArgumentTypeError(
            f"a tree is a dict, list or tuple (of arrays, scalars and more of them), not {type(tree).__name__}"
        )
    arrays: list[tuple[int, str, Any]] = []  # (leaf number, name, value) of the array leaves, for ties
    nodes: list[list[Any]] = []
    flat: dict[str, Any] = {}
    values: dict[str, str] = {}
    pickled: list[str] = []
    tensors = 0
    seq = 0
    fix = False  # some name is unusable or shared: names are settled again below
    fast = _FAST
    on_path: set[int] = set()
    # each frame: (spec node, kinds list, keys, values, next index, name prefix, path, is a dict)
    spec_node, keys, vals = _children(tree, ())
    stack: list[list[Any]] = []

    def push(container: Any, spec_node: list[Any], keys: list[Any], vals: list[Any], prefix: str,
             path: tuple[Any, ...]) -> None:
        on_path.add(id(container))
        nodes.append(spec_node)
        stack.append([spec_node, [], keys, vals, 0, prefix, path, spec_node[0] == "d", container])

    push(tree, spec_node, keys, vals, "", ())
    while stack:
        frame = stack[-1]
        spec_node, kinds, keys, vals, i, prefix, path, in_dict, container = frame
        n = len(vals)
        descended = False
        while i < n:
            key = keys[i]
            value = vals[i]
            i += 1
            kind = fast.get(type(value)) or _classify(value)
            if kind == "o" and is_stateful(value):
                holder = value
                value = states[id(holder)] = state_of(holder, path + (key,))
                kind = fast.get(type(value)) or _classify(value)
            name = prefix + (key if type(key) is str else str(key))
            if kind == "a":
                flat[name] = value
                tensors += 1
                arrays.append((seq, name, value))
            elif kind == "c":
                if id(value) in on_path:
                    raise InvalidArgumentError(
                        f"the tree holds itself: {show_path(path + (key,))} is a container it is inside of"
                    )
                child, ckeys, cvals = _children(value, path + (key,))
                kinds.append("c")
                frame[4] = i
                push(value, child, ckeys, cvals, name + "/", path + (key,))
                descended = True
                break
            elif kind == "n":
                pass
            elif kind == "i":
                values[str(seq)] = _int_json(value if type(value) is int else int(value))
            elif kind == "f":
                values[str(seq)] = _float_json(value)
            elif kind == "b":
                values[str(seq)] = value
            elif kind == "s":
                if len(value) <= INLINE_MAX:
                    values[str(seq)] = str(value)
                else:
                    kind = "S"
                    flat[name] = _as_tensor("S", value)
                    tensors += 1
            elif kind == "y":
                if len(value) <= INLINE_MAX:
                    values[str(seq)] = base64.b64encode(value).decode("ascii")
                else:
                    kind = "Y"
                    flat[name] = _as_tensor("Y", value)
                    tensors += 1
            elif kind == "x":
                values[str(seq)] = [_float_json(value.real), _float_json(value.imag)]
            elif kind == "g":
                flat[name] = np.asarray(value)
                tensors += 1
            elif skip_objects:  # "o", for leaf_names: no tensor, no pickle
                kind = "n"
            else:  # "o": an object that is not data
                where = show_path(path + (key,))
                if not allow_pickle:
                    half = callable(getattr(value, "state_dict", None)) and not isinstance(value, type)
                    hint = ("; it has state_dict() but no load_state_dict(), so it could not be restored: "
                            "save its .state_dict() (a dict) instead" if half else "")
                    raise InvalidArgumentTypeError(
                        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which is not data "
                        "gpusaver stores (arrays, numbers, str, bytes, None, dicts, lists, tuples, objects with "
                        f"state_dict() and load_state_dict()){hint}; gs.save(..., allow_pickle=True) stores it "
                        "pickled, and gs.load then needs allow_pickle=True too"
                    )
                try:
                    blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as e:
                    raise InvalidArgumentTypeError(f"{where} ({type(value).__qualname__}) cannot be pickled: {e}") from None
                kind = "p"
                pickled.append(where)
                flat[name] = np.array(blob, dtype=object)
                tensors += 1
            kinds.append(kind)
            seq += 1
        if descended:
            continue
        stack.pop()
        on_path.discard(id(container))
        kind_str = "".join(kinds)
        if spec_node[0] == "d":
            spec_node.append(kind_str)
        elif spec_node[0] == "T":
            spec_node[1] = kind_str
        else:
            spec_node.append(kind_str)
        if not prefix and _root_needs_care(keys):
            fix = True  # an empty name, or one under the reserved prefix, may be among the root's
    if seq == 0:
        raise InvalidArgumentError("the tree has no leaves to save")
    tied = _find_ties(arrays) if ties and len(arrays) > 1 else {}
    for seq_, name_, value_ in arrays:
        if seq_ in tied:  # written once, under its first leaf's name
            tensors -= 1
            if flat.get(name_) is value_:
                del flat[name_]  # (were it another leaf's too, names are settled anew below)
    if len(flat) != tensors:
        fix = True  # two leaves share a name
    names: dict[str, str] = {}
    if fix:
        flat, names = _settle_names(tree, nodes, flat, set(tied), states)
    for seq_, (first_seq, first_name) in tied.items():  # the tied leaf names its first leaf's variable
        names[str(seq_)] = names.get(str(first_seq), first_name)
    spec = {"format": FORMAT, "version": VERSION, "nodes": nodes, "names": names, "values": values}
    return Encoded(flat, spec, pickled)


def _root_needs_care(keys: list[Any]) -> bool:
    """Whether a root key is empty or starts with ``_gpusaver`` (one scan in C, not one per key)."""
    try:
        joined = "\0".join(keys)
    except TypeError:  # int keys among them
        joined = "\0".join([k for k in keys if type(k) is str])
    joined = "\0" + joined + "\0"
    return "\0\0" in joined or "\0_gpusaver" in joined


def _settle_names(tree: Any, nodes: list[list[Any]], flat: dict[str, Any], tied: set[int] = frozenset(),
                  states: dict[int, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Gives escaped names to the leaves whose own name is unusable or shared (see the module's
    docstring); returns the tensors by their settled names and ``{leaf number: name}`` of the escaped.
    The ``tied`` leaves (numbers) have no variable of their own and are left out; ``states`` are the
    state dicts :func:`encode` wrote for the tree's Statefuls."""
    leaves: list[tuple[int, tuple[Any, ...], tuple[bool, ...], Any, str]] = []  # seq, path, in-dict flags, value, name

    def leaf(kind: str, name: str | None, value: Any, seq: int, path: tuple[Any, ...], dicts: tuple[bool, ...]) -> Any:
        if name is not None and seq not in tied:
            leaves.append((seq, path, dicts, value, name))
        return None

    values_of = _tensor_values(tree, states or {})
    _walk_spec(nodes, {}, lambda kind, name, inline, seq, path, dicts: leaf(kind, name, values_of[seq], seq, path, dicts))
    primary = [e[4] for e in leaves]
    escape: set[int] = {j for j, n in enumerate(primary) if not n or n.startswith(RESERVED_PREFIX)}
    while True:
        final = [_escaped_name(leaves[j][1], leaves[j][2]) if j in escape else primary[j] for j in range(len(leaves))]
        count: dict[str, int] = {}
        for n in final:
            count[n] = count.get(n, 0) + 1
        shared = {j for j, n in enumerate(final) if count[n] > 1 and j not in escape}
        if not shared:
            break
        escape |= shared
    out = {final[j]: leaves[j][3] for j in range(len(leaves))}
    names = {str(leaves[j][0]): final[j] for j in sorted(escape)}
    return out, names


def _escaped_name(path: tuple[Any, ...], dicts: tuple[bool, ...]) -> str:
    return "/".join(_escaped(k, j == 0, d) for j, (k, d) in enumerate(zip(path, dicts)))


def _tensor_values(tree: Any, states: dict[int, Any]) -> dict[int, Any]:
    """``{leaf number: the value written for it}`` for the tensor leaves, by a second walk (only when
    names must be settled: rare); a Stateful is the state dict in ``states``."""
    out: dict[int, Any] = {}
    seq = 0
    stack = [iter(_children(tree, ())[2])]
    while stack:
        for value in stack[-1]:
            kind = _FAST.get(type(value)) or _classify(value)
            if kind == "o" and id(value) in states:
                value = states[id(value)]
                kind = _FAST.get(type(value)) or _classify(value)
            if kind == "c":
                stack.append(iter(_children(value, ())[2]))
                break
            out[seq] = _as_tensor(kind, value)
            seq += 1
        else:
            stack.pop()
    return out


def _as_tensor(kind: str, value: Any) -> Any:
    """The value written as a tensor for a leaf of ``kind`` (as :func:`encode` makes it), or None
    for a leaf that travels in the structure."""
    if kind == "a":
        return value
    if kind == "s":
        return value if len(value) <= INLINE_MAX else _as_tensor("S", value)
    if kind == "y":
        return value if len(value) <= INLINE_MAX else _as_tensor("Y", value)
    if kind == "S":
        return np.array(str(value).encode("utf-8", "surrogatepass"), dtype=object)
    if kind == "Y":
        return np.array(bytes(value), dtype=object)
    if kind == "g":
        return np.asarray(value)
    if kind == "o":
        return np.array(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), dtype=object)
    return None


def _float_json(value: float) -> str:
    """A float as the structure holds it, exactly: its shortest repr (``-0.0``, ``inf``), a NaN as
    ``nan:`` and its 64 bits in hex (sign and payload kept)."""
    if value != value:
        return "nan:" + struct.pack(">d", value).hex()
    return float.__repr__(float(value))


def _float_value(raw: Any) -> float:
    if type(raw) is not str:
        raise Malformed(f"a float leaf holds {raw!r}")
    if raw.startswith("nan:"):
        return struct.unpack(">d", bytes.fromhex(raw[4:]))[0]
    return float(raw)


def _int_json(value: int) -> Any:
    """An int as the structure holds it: itself within 64 bits, else its hex digits (no limit on
    their number, as there is on decimal ones)."""
    return value if _INT64_MIN <= value < 1 << 63 else hex(value)


def inline_value(kind: str, raw: Any) -> Any:
    """A leaf that travels in the structure, back as its Python value.

    Raises:
        ValueError: not what :func:`encode` writes for ``kind``.
    """
    if kind == "n":
        return None
    if kind == "b":
        if type(raw) is not bool:
            raise Malformed(f"a bool leaf holds {raw!r}")
        return raw
    if kind == "i":
        if type(raw) is int:
            return raw
        if type(raw) is str:
            return int(raw, 16) if not raw.startswith("-") else -int(raw[1:], 16)
        raise Malformed(f"an int leaf holds {raw!r}")
    if kind == "f":
        return _float_value(raw)
    if kind == "x":
        return complex(_float_value(raw[0]), _float_value(raw[1]))
    if kind == "s":
        if type(raw) is not str:
            raise Malformed(f"a str leaf holds {raw!r}")
        return raw
    if kind == "y":
        return base64.b64decode(raw.encode("ascii"), validate=True)
    raise Malformed(f"unknown leaf kind {kind!r}")


def variables(tree: Any, *, allow_pickle: bool = False) -> dict[str, Any]:
    """``{name: value}`` of every tensor :func:`gpusaver.save` writes for ``tree``, the structure
    tensor included (for a Saver that writes the same files, e.g. ``Saver.save_async``). Tied
    leaves (one tensor under two paths) are one entry: TensorFlow's reader sees one variable.

    Raises:
        as :func:`encode`.
    """
    encoded = encode(tree, allow_pickle=allow_pickle)
    flat = encoded.flat
    flat[TREE_TENSOR] = spec_tensor(encoded.spec)
    return flat


def spec_tensor(spec: dict[str, Any]) -> np.ndarray:
    """The structure as the uint8 tensor written under :data:`TREE_TENSOR`."""
    text = json.dumps(spec, ensure_ascii=True, separators=(",", ":"))
    return np.frombuffer(text.encode("ascii"), np.uint8)


def parse_spec(data: Any, where: str) -> dict[str, Any]:
    """The structure read back from its tensor.

    Raises:
        CorruptCheckpointError: not the JSON this module writes.
        UnsupportedVersionError: written by a newer gpusaver.
    """
    try:
        arr = np.asarray(data)
        if arr.dtype != np.uint8 or arr.ndim != 1:
            raise Malformed(f"a {arr.dtype} tensor of shape {list(arr.shape)}, not 1-D uint8")
        spec = json.loads(arr.tobytes().decode("ascii"))
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            raise Malformed("not a gpusaver tree")
        version = spec.get("version")
        if not isinstance(version, int):
            raise Malformed("no version")
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"the structure tensor {TREE_TENSOR!r} of {where!r} is damaged: {e}", where) from None
    if version > VERSION:
        raise UnsupportedVersionError(
            f"{where!r} records its tree in version {version} of the structure format; this gpusaver reads "
            f"up to version {VERSION}: upgrade gpusaver",
            where,
        )
    return spec


#: ``leaf_fn(kind, name, inline, seq, path, dicts)``: a leaf's kind letter, its tensor's name (None for
#: a leaf the structure carries), its carried value, its number, its path and, per key of the path,
#: whether it is a dict's
LeafFn = Callable[[str, "str | None", Any, int, tuple, tuple], Any]


def _walk_spec(nodes: list[Any], spec: dict[str, Any], leaf_fn: LeafFn, build: bool = False) -> Any:
    """Walks the recorded structure in preorder (no recursion: any depth), calling ``leaf_fn`` for
    each leaf; with ``build``, returns the tree of its results in plain dicts, lists and tuples."""
    names = spec.get("names") or {}
    inline_values = spec.get("values") or {}
    if not nodes:
        raise Malformed("no nodes")
    ni = 0
    seq = 0

    def open_node(path: tuple[Any, ...], dicts: tuple[bool, ...], prefix: str) -> list[Any]:
        nonlocal ni
        node = nodes[ni]
        ni += 1
        tag = node[0]
        if tag == "d":
            keys, kinds = node[1], node[2]
        elif tag in ("l", "t"):
            kinds = node[1]
            keys = range(len(kinds))
        elif tag == "T":
            kinds = node[1]
            keys = range(len(kinds))
        else:
            raise Malformed(f"unknown node {tag!r}")
        if len(keys) != len(kinds):
            raise Malformed("keys and kinds differ in number")
        return [tag, keys, kinds, 0, [], path, dicts, prefix]

    stack = [open_node((), (), "")]
    result: Any = None
    while stack:
        frame = stack[-1]
        tag, keys, kinds, i, out, path, dicts, prefix = frame
        in_dict = tag == "d"
        descended = False
        while i < len(kinds):
            kind = kinds[i]
            key = keys[i]
            i += 1
            if kind == "c":
                frame[3] = i
                if build:
                    out.append(key)
                segment = key if type(key) is str else str(key)
                stack.append(open_node(path + (key,), dicts + (in_dict,), prefix + segment + "/"))
                descended = True
                break
            s = str(seq)
            name = None
            if kind in _TENSOR_KINDS:
                name = names.get(s) if names else None
                if name is None:
                    name = prefix + (key if type(key) is str else str(key))
            elif kind not in _INLINE_KINDS:
                raise Malformed(f"unknown leaf kind {kind!r}")
            got = leaf_fn(kind, name, inline_values.get(s) if kind != "n" and kind not in _TENSOR_KINDS else None,
                          seq, path + (key,), dicts + (in_dict,))
            seq += 1
            if build:
                out.append(key)
                out.append(got)
        if descended:
            continue
        stack.pop()
        value: Any = None
        if build:
            if tag == "d":
                value = {out[j]: out[j + 1] for j in range(0, len(out), 2)}
            else:
                value = tuple(out[j + 1] for j in range(0, len(out), 2))
                if tag == "l":
                    value = list(value)
        if stack:
            if build:
                parent_out = stack[-1][4]
                parent_out.append(value)  # after its key, appended when it was opened
        else:
            result = value
    return result


def decode(spec: dict[str, Any], leaf_fn: LeafFn, where: str) -> Any:
    """The tree recorded by ``spec``, each leaf ``leaf_fn(kind, name, inline, seq, path, dicts)``.

    Raises:
        CorruptCheckpointError: a structure that does not hold together.
    """
    from gpusaver.errors import GpuSaverError

    try:
        return _walk_spec(spec["nodes"], spec, leaf_fn, build=True)
    except Malformed as e:
        raise CorruptCheckpointError(f"the structure tensor {TREE_TENSOR!r} of {where!r} is damaged: {e}", where) from None
    except GpuSaverError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise CorruptCheckpointError(f"the structure tensor {TREE_TENSOR!r} of {where!r} is damaged: {e!r}", where) from None


def stored_tree(spec: dict[str, Any], where: str) -> Any:
    """The recorded tree with a :class:`Stored` at each leaf."""
    return decode(spec, lambda kind, name, inline, seq, path, dicts: Stored(kind, name, inline), where)


def leaf_names(tree: Any) -> dict[tuple[Any, ...], str]:
    """``{path: variable name}`` of the leaves of ``tree`` that :func:`encode` writes as tensors
    (escaped where needed), for restoring from a checkpoint that has no structure tensor (each leaf
    by its own name: such a checkpoint names every one of them)."""
    enc = encode(tree, skip_objects=True, ties=False)
    out: dict[tuple[Any, ...], str] = {}

    def leaf(kind: str, name: str | None, inline: Any, seq: int, path: tuple, dicts: tuple) -> None:
        if name is not None:
            out[path] = name

    _walk_spec(enc.spec["nodes"], enc.spec, leaf)
    return out
