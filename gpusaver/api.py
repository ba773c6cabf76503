"""The one-line API: ``gpusaver.save(tree, path)`` and ``gpusaver.load(path)``.

As safetensors' ``save_file`` and ``load_file``, for any training state: dicts
(str or int keys), lists, tuples and NamedTuples of arrays of any framework
gpusaver sees (NumPy, CuPy, torch CPU and CUDA, JAX), scalars, str, bytes and
None, nested to any depth::

    gpusaver.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 7}, "ckpt/s7")
    state = gpusaver.load("ckpt/s7")                       # the same tree, arrays as NumPy
    state = gpusaver.load("ckpt/s7", framework="torch")    # ... as torch tensors
    gpusaver.load("ckpt/model", like=model.state_dict())  # in place

Statefuls (objects with ``state_dict()`` and ``load_state_dict()``, as torch DCP's: modules,
optimizers, LR schedulers, ``GradScaler``) are saved as their state dicts and restored in place::

    gpusaver.save({"model": model, "optim": opt, "sched": sched, "step": 7}, "ckpt/s7")
    gpusaver.load_into({"model": model, "optim": opt, "sched": sched, "step": 0}, "ckpt/s7")

One tensor under several paths (tied weights: GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``) is stored once and comes back tied.

The files are one TensorFlow V2 checkpoint (``path.index`` and its data
files), written atomically; no ``checkpoint`` state file is written. Each
array is a variable named by its path (``model/fc.weight``); the tree's
structure is one more, ``_gpusaver/tree`` (see :mod:`gpusaver.tree`).
"""

from __future__ import annotations

import operator
import os
from typing import Any, Mapping, NamedTuple

import numpy as np

from gpusaver.errors import InvalidArgumentError, InvalidArgumentTypeError
from gpusaver.progress import ProgressCallback

__all__ = ["save", "load", "load_into", "LoadResult", "flatten", "unflatten"]

SEP = "/"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``; leaves are anything but a Mapping.

    Raises:
        InvalidArgumentTypeError: a key that is not a str.
        InvalidArgumentError: an empty key, or two paths that join to one name.
    """
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], at: str) -> None:
        for key, value in node.items():
            if not isinstance(key, str):
                raise InvalidArgumentTypeError(f"tree keys are str, got {key!r} under {at or 'the root'!r}")
            if not key:
                raise InvalidArgumentError(f"an empty key under {at or 'the root'!r}")
            name = f"{at}{SEP}{key}" if at else key
            if isinstance(value, Mapping):
                walk(value, name)
            elif name in out:
                raise InvalidArgumentError(f"two entries of the tree are both named {name!r}")
            else:
                out[name] = value

    if not isinstance(tree, Mapping):
        raise InvalidArgumentTypeError(f"a tree is a dict (of arrays or dicts), not {type(tree).__name__}")
    walk(tree, prefix)
    return out


def unflatten(flat: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuilds ``like``'s nesting with the values of ``flat`` (keys as :func:`flatten` joins them)."""

    def build(node: Mapping[str, Any], at: str) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            name = f"{at}{SEP}{key}" if at else key
            out[key] = build(value, name) if isinstance(value, Mapping) else flat[name]
        return out

    return build(like, "")


def save(
    tree: Any,
    path: "str | os.PathLike[str]",
    *,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> str:
    """Writes ``tree`` as one checkpoint at prefix ``path``; creates the parent directory.

    The tree is any training state: dicts (str or int keys), lists, tuples and
    NamedTuples, nested to any depth, of arrays (NumPy, CuPy, torch, JAX),
    NumPy and Python scalars (ints of any size), str, bytes and None. Each
    array is a TensorFlow variable named by its path (keys joined with ``/``:
    ``{"a": {"b": x}}`` is ``"a/b"``, as before); each number, str and bytes a
    0-d one. The structure (containers, key types and order, leaf kinds) is
    one more tensor, ``_gpusaver/tree``, so that :func:`load` gives the very
    tree back. See :mod:`gpusaver.tree` for the names and the format.

    A Stateful leaf (an object with ``state_dict()`` and ``load_state_dict()``: an ``nn.Module``,
    an optimizer, an LR scheduler, a ``GradScaler``) is written as its ``state_dict()``;
    :func:`load_into` restores it. An object with ``state_dict()`` alone is refused (it could not
    be restored): save its ``state_dict()``. Two array leaves that are one tensor (the same object,
    or views of the same memory with the same shape, strides and dtype: a tied embedding and
    output head in a ``state_dict()``) are written once, as one variable named by the first leaf's
    path; TensorFlow's reader sees that one variable for the pair, and :func:`load` gives them
    back as one array. Other views that overlap are written as they are, each its own variable.

    Args:
        tree: the state to write.
        path: the checkpoint prefix (``file://`` accepted).
        allow_pickle: store leaves that are not data (an ``argparse.Namespace``,
            an instance of your own class) pickled. Off by default because
            loading a pickle runs code of the checkpoint's choosing: such a
            checkpoint then loads only with ``load(..., allow_pickle=True)``.
        progress: ``callback(done_bytes, total_bytes)``.

    Returns:
        ``path``, as given.

    Raises:
        InvalidArgumentTypeError: a key that is neither str nor int, an object
            that is not data (without ``allow_pickle``), naming its path.
        InvalidArgumentError: a cycle, a tree with no leaves.
        UnsupportedDTypeError: an array of a dtype gpusaver cannot store.
        CheckpointWriteError: the write failed; nothing is committed.

    Every check runs before anything is written: a refused tree leaves the disk as it was.
    """
    from gpusaver import tree as trees
    from gpusaver.storage.paths import local_path
    from gpusaver.saver import Saver

    flat = trees.variables(tree, allow_pickle=allow_pickle)
    path = os.fspath(path)
    saver = Saver(flat, sharded=True, max_to_keep=None)  # every variable checked: nothing written yet
    parent = os.path.dirname(local_path(path))
    if parent:
        try:
            os.makedirs(parent, exist_ok=True)
        except FileExistsError:
            raise InvalidArgumentError(f"cannot save {path!r}: a part of {parent!r} is a file, not a directory") from None
        except OSError as e:
            from gpusaver.errors import write_error

            raise write_error(e.errno, f"cannot create the directory {parent!r} for {path!r}: {e.strerror}", parent) from e
    if progress is not None:
        progress = _without_structure(progress, int(flat[trees.TREE_TENSOR].nbytes))
    saved = saver.save(path, write_state=False, progress=progress)
    assert saved is not None
    return saved


def _without_structure(progress: ProgressCallback, extra: int) -> ProgressCallback:
    """``progress`` counting the tree's own bytes: the structure tensor's ``extra`` bytes are spread
    over the save (it may be written at any point), so the calls stay in order and end at the tree's total."""

    def report(done: int, total: int) -> None:
        mine = max(total - extra, 0)
        progress(done * mine // total if total else 0, mine)

    return report


def load(
    path: "str | os.PathLike[str]",
    device: "int | str | Any" = None,
    like: Any = None,
    *,
    strict: bool = True,
    cast: bool = False,
    framework: str | None = None,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> Any:
    """Reads a checkpoint: as a new tree, or into the arrays of an existing one.

    Args:
        path: a checkpoint prefix, or a directory whose ``checkpoint`` file names one.
        device: with ``like=None``, where the arrays go: an int ``k`` gives CuPy
            arrays on GPU ``k`` (as before); ``"cpu"``, ``"cuda:k"`` (or a
            ``torch.device``, a JAX device) for ``framework``.
        like: restore into this tree's arrays in place (NumPy, CuPy, torch CPU
            and CUDA); its immutable leaves (JAX arrays, scalars) are replaced by
            new values of their kind in the returned tree, whose containers are
            of ``like``'s types (NamedTuple classes, ``OrderedDict``, any Mapping
            that ``type(like)(pairs)`` rebuilds).
        strict: with ``like``, every leaf must be in the checkpoint (else missing
            leaves keep their values); for a checkpoint written by :func:`save`,
            also every leaf of the checkpoint must be in ``like``.
        cast: with ``like``, convert stored tensors of another dtype.
        framework: with ``like=None``, the arrays' kind: ``"numpy"`` (the
            default), ``"torch"``, ``"jax"`` or ``"cupy"`` (bfloat16 and float8
            included). String tensors stay NumPy object arrays.
        allow_pickle: unpickle the leaves that ``save(..., allow_pickle=True)``
            stored pickled. Unpickling runs code the file chooses: pass it only
            for checkpoints you trust. Without it such a checkpoint is refused
            before anything is unpickled.
        progress: ``callback(done_bytes, total_bytes)``.

    Returns:
        With ``like=None``: the tree :func:`save` wrote (dicts, lists, tuples,
        key types and order, Python scalars as their types, arrays as
        ``framework``'s); for a checkpoint without the structure (written by a
        Saver, TensorFlow, or an older gpusaver), ``{name: array}`` of every
        variable (partitioned ones whole). Leaves saved as one tensor (tied) are
        one array again. With ``like``: a tree of ``like``'s
        shape holding the restored values (the very same objects for mutable
        leaves).

    Raises:
        InvalidCheckpointPathError: nothing to read.
        TensorNotFoundError, DTypeMismatchError, ShapeMismatchError: ``like`` does not fit.
        InvalidArgumentError: ``like``'s structure differs (a list of another
            length, a dict where a list was); pickled leaves without ``allow_pickle``.
        ChecksumError: damaged data.
    """
    from gpusaver import tree as trees
    from gpusaver.checkpoint_reader import CheckpointReader, resolve_checkpoint_path

    prefix = resolve_checkpoint_path(path)
    if like is not None and framework is not None:
        raise InvalidArgumentError("framework= applies without like=; with like= the arrays are like's own")
    target = _Target.of(framework, device) if like is None else None
    with CheckpointReader(prefix) as reader:
        spec = None
        if reader.has_tensor(trees.TREE_TENSOR):  # written by gpusaver.save: the tree's structure
            spec = trees.parse_spec(reader.get_tensor(trees.TREE_TENSOR), prefix)
        if like is None:
            if spec is None:
                return _load_dict(reader, target, progress)
            return _load_tree(reader, spec, target, allow_pickle, progress)
    return _load_like(prefix, like, spec, strict, cast, allow_pickle, progress)


class _Target:
    """Where :func:`load` puts the arrays it makes: a framework and a device."""

    def __init__(self, framework: str, device: Any, read_device: int | None) -> None:
        self.framework = framework
        self.device = device
        #: the GPU that CuPy arrays are read onto, or None (the host)
        self.read_device = read_device

    @classmethod
    def of(cls, framework: str | None, device: Any) -> "_Target":
        if not isinstance(device, (str, int, type(None))) and hasattr(device, "__index__"):
            device = operator.index(device)  # a NumPy integer
        if framework is None:
            if device is None or (isinstance(device, str) and device == "cpu"):
                framework = "numpy"
            elif isinstance(device, int) and not isinstance(device, bool) or isinstance(device, str):
                framework = "cupy"  # device=k: CuPy arrays on GPU k, as before
            else:
                raise InvalidArgumentTypeError(f"device is an int, 'cpu' or 'cuda:k' without framework=, not {device!r}")
        if framework not in ("numpy", "torch", "jax", "cupy"):
            raise InvalidArgumentError(f"framework is 'numpy', 'torch', 'jax' or 'cupy', not {framework!r}")
        if framework == "numpy":
            if device not in (None, "cpu"):
                raise InvalidArgumentError(f"NumPy arrays live on the host: device={device!r} needs another framework")
            return cls("numpy", None, None)
        if framework == "cupy":
            return cls("cupy", None, _gpu_index(device, "cupy"))
        if framework == "torch":
            import torch

            if device is None:
                dev = torch.device("cpu")
            elif isinstance(device, int) and not isinstance(device, bool):
                dev = torch.device("cuda", device)
            else:
                try:
                    dev = torch.device(device)
                except (RuntimeError, TypeError) as e:
                    raise InvalidArgumentError(f"device={device!r} is not a torch device: {e}") from None
            return cls("torch", dev, None)
        import jax

        if device is None or not isinstance(device, (str, int)):
            return cls("jax", device, None)  # None: JAX's default device; else a jax Device
        if device == "cpu":
            return cls("jax", jax.devices("cpu")[0], None)
        index = _gpu_index(device, "jax")
        try:
            return cls("jax", jax.devices("gpu")[index], None)
        except (RuntimeError, IndexError) as e:
            from gpusaver.errors import BackendUnavailableError

            raise BackendUnavailableError(f"device={device!r}: JAX has no such GPU ({e})") from None

    def array(self, value: Any, name: str) -> Any:
        """``value`` (a NumPy array, or a CuPy one read onto ``read_device``) as this target's array."""
        if self.framework in ("numpy", "cupy") or getattr(value, "dtype", None) == object:
            return value
        if self.framework == "torch":
            return _to_torch(value, self.device, name)
        import jax

        if value.dtype.itemsize == 8 * (2 if value.dtype.kind == "c" else 1) and not jax.config.jax_enable_x64:
            from gpusaver.errors import UnsupportedDTypeError

            raise UnsupportedDTypeError(
                f"variable {name!r} is {value.dtype}, which JAX would narrow to 32 bits: enable 64-bit values "
                "(jax.config.update('jax_enable_x64', True), or the jax.enable_x64 context), or load it as NumPy"
            )
        return jax.device_put(value, self.device) if self.device is not None else jax.numpy.asarray(value)


def _gpu_index(device: Any, framework: str) -> int:
    if device is None:
        return 0
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        if kind in ("cuda", "gpu") and (not index or index.isdigit()):
            return int(index or 0)
    raise InvalidArgumentError(f"device={device!r}: {framework} arrays go to a GPU, 'cuda:k' or an int k")


def _to_torch(value: np.ndarray, device: Any, name: str) -> Any:
    """A NumPy array as a torch tensor on ``device`` (bfloat16 and float8 through a same-size integer view)."""
    import torch
    from gpusaver.errors import UnsupportedDTypeError
    from gpusaver.frameworks import _torch_special

    if not value.flags.writeable:
        value = value.copy()
    special = {np.dtype(t): (i, d) for d, (i, t) in _torch_special().items()}.get(value.dtype)
    try:
        if special is not None:
            stand_in = {1: np.uint8, 2: np.int16}[value.dtype.itemsize]
            t = torch.from_numpy(value.view(stand_in)).view(special[1])
        else:
            t = torch.from_numpy(value)
    except TypeError as e:
        raise UnsupportedDTypeError(f"variable {name!r}: torch has no dtype for {value.dtype}: {e}") from None
    if device.type == "cpu":
        return t
    try:
        return t.to(device)
    except (RuntimeError, AssertionError) as e:  # torch built without CUDA asserts
        from gpusaver.errors import BackendUnavailableError

        raise BackendUnavailableError(f"variable {name!r}: torch cannot place a tensor on {device}: {e}") from None


def _host_leaf(kind: str, value: np.ndarray) -> Any:
    """A tensor leaf other than an array back as the leaf :func:`save` made it from."""
    if kind == "g":
        return value[()]
    item = value.item()
    if kind == "S":
        return item.decode("utf-8", "surrogatepass") if isinstance(item, bytes) else str(item)
    if kind == "Y":
        return item if isinstance(item, bytes) else str(item).encode("utf-8", "surrogatepass")
    from gpusaver.errors import CorruptCheckpointError

    raise CorruptCheckpointError(f"the structure records a tensor leaf of unknown kind {kind!r}")


def _pickled_paths(spec: dict[str, Any], where: str) -> list[str]:
    from gpusaver import tree as trees

    found: list[str] = []

    def leaf(kind: str, name: Any, inline: Any, seq: int, path: tuple, dicts: tuple) -> None:
        if kind == "p":
            found.append(trees.show_path(path))

    if any("p" in str(node[1] if node[0] != "d" else node[2]) for node in spec.get("nodes", [])):
        trees.decode(spec, leaf, where)
    return found


def _refuse_pickles(spec: dict[str, Any], where: str, allow_pickle: bool) -> None:
    if allow_pickle:
        return
    paths = _pickled_paths(spec, where)
    if paths:
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        raise InvalidArgumentError(
            f"checkpoint {where!r} holds pickled objects at {shown}; unpickling runs code the file chooses, "
            "so gpusaver.load unpickles only with allow_pickle=True (pass it only for checkpoints you trust)"
        )


def _unpickle(value: np.ndarray) -> Any:
    import pickle

    return pickle.loads(value.item())


def _load_tree(
    reader: Any, spec: dict[str, Any], target: Any, allow_pickle: bool, progress: ProgressCallback | None
) -> Any:
    """The tree a checkpoint's structure tensor records, its leaves read."""
    from gpusaver import tree as trees

    prefix = reader.prefix
    _refuse_pickles(spec, prefix, allow_pickle)
    counter = None
    if progress is not None:
        from gpusaver.progress import Progress
        from gpusaver.saver import _stored_bytes

        names: list[str] = []
        trees.decode(spec, lambda kind, name, *_: names.append(name) if name is not None else None, prefix)
        bundle = reader.bundle
        counter = Progress(progress, sum(_stored_bytes(bundle, n, bundle.entry(n)) for n in dict.fromkeys(names)))
        bundle.set_progress(counter)

    on_host = _string_tensors(reader, target)
    arrays: dict[str, Any] = {}  # tied leaves (one variable under several paths) come back as one array

    def leaf(kind: str, name: str | None, inline: Any, seq: int, path: tuple, dicts: tuple) -> Any:
        if kind == "a":
            got = arrays.get(name)
            if got is None:
                value = reader.get_tensor(name, device=None if name in on_host else target.read_device)
                got = arrays[name] = target.array(value, name)
            return got
        if name is None:
            return trees.inline_value(kind, inline)
        value = reader.get_tensor(name)
        if kind == "p":
            return _unpickle(value)
        return _host_leaf(kind, value)

    out = trees.decode(spec, leaf, prefix)
    if counter is not None:
        counter.finish()
    return out


def _string_tensors(reader: Any, target: Any) -> set[str]:
    """The string tensors, read on the host even for CuPy (which has no strings); empty for a host target."""
    if target.read_device is None:
        return set()
    return {n for n, dt in reader.get_variable_to_dtype_map().items() if dt == object}


def _load_dict(reader: Any, target: Any, progress: ProgressCallback | None) -> dict[str, Any]:
    """``{name: array}`` of a checkpoint without a structure tensor (as gpusaver always read them)."""
    from gpusaver.progress import Progress

    names = sorted(reader.get_variable_to_shape_map())
    if progress is not None:
        from gpusaver.saver import _stored_bytes

        bundle = reader.bundle
        counter = Progress(progress, sum(_stored_bytes(bundle, n, bundle.entry(n)) for n in names))
        bundle.set_progress(counter)
    on_host = _string_tensors(reader, target)
    out = {
        name: target.array(reader.get_tensor(name, device=None if name in on_host else target.read_device), name)
        for name in names
    }
    if progress is not None:
        counter.finish()
    return out


# ----------------------------------------------------------------------------- load(like=...)
def _walk_like(like: Any) -> tuple[list[tuple[tuple, Any, list, list]], dict[tuple, Any]]:
    """``like``'s containers in preorder ``(path, container, its own keys, keys as paths hold them)``
    and its leaves ``{path: value}``; keys and cycles checked as :func:`save` checks them."""
    from gpusaver import tree as trees

    if not isinstance(like, (Mapping, list, tuple)):
        raise InvalidArgumentTypeError(f"like is a dict, list or tuple, not {type(like).__name__}")
    containers: list[tuple[tuple, Any, list, list]] = []
    leaves: dict[tuple, Any] = {}
    on_path: set[int] = set()
    stack: list[tuple[tuple, Any, Any]] = []

    def open_(path: tuple, node: Any) -> None:
        _, keys, values = trees._children(node, path)
        own = list(node.keys()) if isinstance(node, Mapping) else keys
        containers.append((path, node, own, keys))
        on_path.add(id(node))
        stack.append((path, node, iter(zip(keys, values))))

    open_((), like)
    while stack:
        path, node, it = stack[-1]
        for key, value in it:
            sub = path + (key,)
            if isinstance(value, (Mapping, list, tuple)):
                if id(value) in on_path:
                    raise InvalidArgumentError(f"like holds itself: {trees.show_path(sub)} is a container it is inside of")
                open_(sub, value)
                break
            leaves[sub] = value
        else:
            stack.pop()
            on_path.discard(id(node))
    return containers, leaves


def _stored_layout(spec: dict[str, Any], where: str) -> tuple[dict[tuple, str], dict[tuple, Any]]:
    """``({container path: 'd' or 's' (a sequence)}, {leaf path: Stored})`` of a checkpoint's tree."""
    from gpusaver import tree as trees

    containers: dict[tuple, str] = {}
    leaves: dict[tuple, Any] = {}
    lengths: dict[tuple, int] = {}
    tree = trees.stored_tree(spec, where)
    stack = [((), tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            containers[path] = "d"
            items = node.items()
        elif isinstance(node, (list, tuple)):
            containers[path] = "s"
            lengths[path] = len(node)
            items = enumerate(node)
        else:
            leaves[path] = node
            continue
        stack.extend(reversed([(path + (k,), v) for k, v in items]))  # popped in preorder
    containers["lengths"] = lengths  # type: ignore[assignment]
    return containers, leaves


def _check_layout(like_containers: list, like_leaves: dict, stored_containers: dict, stored_leaves: dict,
                  strict: bool, where: str) -> None:
    """Refuses a ``like`` whose structure does not fit the checkpoint's, naming the paths."""
    from gpusaver import tree as trees
    from gpusaver.errors import TensorNotFoundError

    for path, node, _, keys in like_containers:
        kind = stored_containers.get(path)
        if path in stored_leaves:
            raise InvalidArgumentError(
                f"like has a {type(node).__name__} at {trees.show_path(path)}, where checkpoint {where!r} has a leaf"
            )
        if kind is None:
            continue  # absent altogether: its leaves are missing, below
        mine = "d" if isinstance(node, Mapping) else "s"
        if mine != kind:
            stored = "a dict" if kind == "d" else "a list or tuple"
            raise InvalidArgumentError(
                f"like has a {type(node).__name__} at {trees.show_path(path)}, where checkpoint {where!r} has {stored}"
            )
        if kind == "s":
            n = stored_containers["lengths"][path]
            if n != len(keys):
                raise InvalidArgumentError(
                    f"like has a {type(node).__name__} of {len(keys)} at {trees.show_path(path)}, where checkpoint "
                    f"{where!r} has {n} entries"
                )
    for path in like_leaves:
        if path in stored_containers:
            raise InvalidArgumentError(
                f"like has a leaf at {trees.show_path(path)}, where checkpoint {where!r} has a container"
            )
    if not strict:
        return
    missing = [p for p in like_leaves if p not in stored_leaves]
    if missing:
        shown = _some_paths(missing)
        raise TensorNotFoundError(
            f"like has {shown}, not in checkpoint {where!r} (strict=False keeps what it lacks)", None
        )

def _some_paths(paths: list[tuple]) -> str:
    from gpusaver import tree as trees

    shown = ", ".join(trees.show_path(p) for p in paths[:5])
    return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _check_no_extra(like_leaves: dict, stored_leaves: dict, where: str) -> None:
    """Refuses (strict) a checkpoint leaf that ``like`` lacks, naming the paths."""
    from gpusaver import tree as trees

    extra = [p for p in stored_leaves if p not in like_leaves]
    if extra:
        shown = _some_paths(extra)
        raise InvalidArgumentError(
            f"checkpoint {where!r} also holds {shown}, which like lacks (strict=False restores a part of it)"
        )


def _rebuild(containers: list, results: dict[tuple, Any], leaves: dict[tuple, Any]) -> Any:
    """``like`` again, of its own container types, its leaves from ``results`` (else as they were)."""
    built: dict[tuple, Any] = {}
    for path, node, own, keys in reversed(containers):
        children = []
        for key in keys:
            sub = path + (key,)
            if sub in built:
                children.append(built.pop(sub))
            else:
                children.append(results[sub] if sub in results else leaves[sub])
        built[path] = _remake(node, own, children)
    return built[()]


def _remake(node: Any, keys: list, children: list) -> Any:
    """A container of ``node``'s type holding ``children`` (dicts under ``keys``)."""
    import collections

    cls = type(node)
    if isinstance(node, Mapping):
        pairs = list(zip(keys, children))
        if cls is dict:
            return dict(pairs)
        if isinstance(node, collections.defaultdict):
            return cls(node.default_factory, pairs)
        for attempt in (lambda: cls(pairs), lambda: cls(dict(pairs))):
            try:
                return attempt()
            except Exception:
                continue
        return dict(pairs)
    if cls is list:
        return children
    if cls is tuple:
        return tuple(children)
    if isinstance(node, tuple) and hasattr(cls, "_fields"):
        return cls(*children)
    try:
        return cls(children)
    except Exception:
        return list(children) if isinstance(node, list) else tuple(children)


class _InlineReader:
    """The little of a CheckpointReader that :func:`_check_leaf` asks of one leaf the structure carries."""

    def __init__(self, prefix: str, name: str, value: np.ndarray) -> None:
        self.prefix = prefix
        self._name = name
        self._value = value

    def has_tensor(self, name: str) -> bool:
        return name == self._name

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
        return {self._name: self._value.dtype}

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        return {self._name: list(self._value.shape)}


def _inline_array(value: Any) -> np.ndarray:
    """A leaf the structure carries as the 0-d array a tensor of it would read back as."""
    if isinstance(value, str):
        return np.array(value.encode("utf-8", "surrogatepass"), dtype=object)
    if isinstance(value, bytes):
        return np.array(value, dtype=object)
    return np.asarray(value)


def _load_like(prefix: str, like: Any, spec: dict[str, Any] | None, strict: bool, cast: bool, allow_pickle: bool,
               progress: ProgressCallback | None, rebuild: bool = True) -> Any:
    """:func:`load` with ``like``: the rebuilt tree, or (``rebuild=False``) ``(results, leaves)``:
    ``{path: new value}`` of the leaves replaced (immutable ones) and ``{path: like's leaf}``.

    A variable that the structure gives several leaves (tied) is written once where like's leaves
    are one tensor too (:func:`gpusaver.tree.tie_key`), else into each of them."""
    from gpusaver import tree as trees
    from gpusaver.checkpoint_reader import load_checkpoint
    from gpusaver.errors import CorruptCheckpointError, DTypeMismatchError
    from gpusaver.frameworks import ordered_with_framework
    from gpusaver.saver import Saver
    from gpusaver.variables import Variable, checked_cast

    containers, leaves = _walk_like(like)
    results: dict[tuple, Any] = {}
    by_name: dict[str, tuple] = {}  # tensor name -> like path, restored through a Saver or the reader
    inline: dict[tuple, Any] = {}  # like path -> the value the structure carries
    later: dict[tuple, Any] = {}  # like path -> Stored, read as without like (like's leaf is None; pickles)
    again: list[tuple[tuple, str]] = []  # (like path, tensor name) of a tied leaf after its variable's first
    if spec is None:
        names = trees.leaf_names(like) if leaves else {}
        for path, name in names.items():
            value = leaves[path]
            if value is None or (trees._FAST.get(type(value)) or trees._classify(value)) == "o":
                continue
            by_name[name] = path
        for path, value in leaves.items():  # scalars: 0-d tensors named by their path
            if path not in names and value is not None and (trees._FAST.get(type(value)) or trees._classify(value)) != "o":
                by_name[_plain_name(path)] = path
        saver_strict = strict
        extra_check = False
    else:
        stored_containers, stored_leaves = _stored_layout(spec, prefix)
        _check_layout(containers, leaves, stored_containers, stored_leaves, strict, prefix)
        pickles = [p for p in leaves if p in stored_leaves and stored_leaves[p].kind == "p"]
        if pickles and not allow_pickle:
            raise InvalidArgumentError(
                f"checkpoint {prefix!r} holds pickled objects at {', '.join(trees.show_path(p) for p in pickles[:5])}; "
                "unpickling runs code the file chooses, so gpusaver.load unpickles only with allow_pickle=True "
                "(pass it only for checkpoints you trust)"
            )
        for path, value in leaves.items():
            stored = stored_leaves.get(path)
            if stored is None:
                continue  # not strict: it keeps its value
            if value is None or stored.kind == "p":
                later[path] = stored
                continue
            if (trees._FAST.get(type(value)) or trees._classify(value)) == "o":
                hint = (" (it has state_dict() and load_state_dict(): gpusaver.load_into restores it)"
                        if trees.is_stateful(value) else "")
                raise DTypeMismatchError(
                    f"{trees.show_path(path)} is a {type(value).__qualname__}, which is not data, where checkpoint "
                    f"{prefix!r} holds data{hint}"
                )
            if stored.name is None:
                try:
                    inline[path] = trees.inline_value(stored.kind, stored.value)
                except (ValueError, TypeError, AttributeError, IndexError) as e:
                    raise CorruptCheckpointError(
                        f"the structure of {prefix!r} is damaged at {trees.show_path(path)}: {e}", prefix
                    ) from None
            elif stored.name in by_name:
                again.append((path, stored.name))  # tied: one variable for several leaves
            else:
                by_name[stored.name] = path
        saver_strict = True
        extra_check = strict
    # The leaves the structure carries, checked as tensors are (before anything changes).
    inline_writes: list[tuple[tuple, Any, np.ndarray]] = []
    for path, got in inline.items():
        old = leaves[path]
        shown = trees.show_path(path)
        if got is None:
            raise DTypeMismatchError(f"{shown} is a {type(old).__name__} but checkpoint {prefix!r} holds None there")
        if type(old) is type(got) and isinstance(got, (int, float, complex, str, bytes)):
            results[path] = got  # bool included: exact Python types need no conversion
            continue
        if isinstance(got, int) and not isinstance(got, bool) and not -(1 << 63) <= got < 1 << 64:
            raise DTypeMismatchError(
                f"{shown} is a {type(old).__name__} but checkpoint {prefix!r} holds the int {got}, beyond 64 bits, there"
            )
        arr = _inline_array(got)
        variable = Variable(old, shown)
        _check_leaf(_InlineReader(prefix, shown, arr), variable, True, cast)
        if variable.immutable is not None:
            results[path] = _like(old, variable, arr, cast)
        else:  # an array of like's, written once the tensors are restored; converted now, so refused now
            value = arr if arr.dtype == variable.dtype else checked_cast(arr, variable.dtype, variable.name)
            inline_writes.append((path, variable, value))
    flat = {name: leaves[path] for name, path in by_name.items()}
    variables = {name: Variable(value, name) for name, value in flat.items()}
    mutable = {n: v for n, v in variables.items() if v.immutable is None}
    immutable = [n for n, v in variables.items() if v.immutable is not None]
    with load_checkpoint(prefix) as reader:
        # Every immutable leaf is checked before any mutable one changes.
        present = [n for n in immutable if _check_leaf(reader, variables[n], saver_strict, cast)]
        if extra_check:  # the arrays' own errors first (dtype, shape), then what like lacks
            for n in mutable:
                _check_leaf(reader, variables[n], saver_strict, cast)
            _check_no_extra(leaves, stored_leaves, prefix)
        copies, same = _tied_targets(reader, again, by_name, leaves, cast)
        if mutable:
            Saver(mutable, max_to_keep=None).restore(prefix, strict=saver_strict, cast=cast, progress=progress)
        for name in present:
            results[by_name[name]] = _like(flat[name], variables[name], reader.get_tensor(name), cast)
        for path, stored in later.items():
            if stored.name is None:
                results[path] = trees.inline_value(stored.kind, stored.value)
            elif stored.kind == "p":
                results[path] = _unpickle(reader.get_tensor(stored.name))
            elif stored.kind == "a":
                results[path] = reader.get_tensor(stored.name)
            else:
                results[path] = _host_leaf(stored.kind, reader.get_tensor(stored.name))
    for path, first in same:
        if first in results:
            results[path] = results[first]
    for path, variable, value in inline_writes + copies:
        if variable.immutable is not None:
            results[path] = _like(leaves[path], variable, value, cast)
            continue
        with ordered_with_framework([leaves[path]], writes=True):
            if type(variable.array).__module__.split(".")[0] == "cupy":
                import cupy

                variable.array[...] = cupy.asarray(value)
            else:
                variable.array[...] = value
    if not rebuild:
        return results, leaves
    return _rebuild(containers, results, leaves)


def _tied_targets(reader: Any, again: list[tuple[tuple, str]], by_name: dict[str, tuple], leaves: dict[tuple, Any],
                  cast: bool) -> tuple[list[tuple[tuple, Any, np.ndarray]], list[tuple[tuple, tuple]]]:
    """For the leaves of like that the checkpoint ties to an earlier leaf's variable: ``(copies, same)``,
    the ``(path, Variable, value)`` to write into a leaf that is another tensor than the first's (read
    and checked now, before anything changes) and the ``(path, first path)`` of a leaf that is the
    first's very tensor (written with it)."""
    from gpusaver import tree as trees
    from gpusaver.variables import Variable, checked_cast

    copies: list[tuple[tuple, Any, np.ndarray]] = []
    same: list[tuple[tuple, tuple]] = []
    for path, name in again:
        first = by_name[name]
        key = trees.tie_key(leaves[path])
        if key is not None and key == trees.tie_key(leaves[first]):
            same.append((path, first))
            continue
        variable = Variable(leaves[path], name)
        _check_leaf(reader, variable, True, cast)
        value = reader.get_tensor(name)
        if variable.immutable is None and value.dtype != variable.dtype:
            value = checked_cast(value, variable.dtype, trees.show_path(path))
        copies.append((path, variable, value))
    return copies, same


def _plain_name(path: tuple) -> str:
    return "/".join(k if type(k) is str else str(k) for k in path)


def _check_leaf(reader: Any, variable: Any, strict: bool, cast: bool) -> bool:
    """Whether the checkpoint has an immutable leaf's value, checked to fit; False when absent and not strict."""
    from gpusaver.errors import DTypeMismatchError, ShapeMismatchError, TensorNotFoundError

    name = variable.name
    if not reader.has_tensor(name):
        if strict:
            raise TensorNotFoundError(f"variable {name!r} not found in checkpoint {reader.prefix!r}", name)
        return False
    stored_dtype = reader.get_variable_to_dtype_map()[name]
    stored_shape = tuple(reader.get_variable_to_shape_map()[name])
    want = variable.dtype
    if stored_dtype != want and not _python_number_takes(variable.value, stored_dtype) and not cast:
        numbers = (stored_dtype.kind == "O") == (want.kind == "O")
        why = "cast=True converts it where every value fits exactly" if numbers else "strings and numbers do not convert"
        raise DTypeMismatchError(f"{name!r} is {want} but checkpoint {reader.prefix!r} stores {stored_dtype} ({why})")
    if cast and (stored_dtype.kind == "O") != (want.kind == "O"):
        raise DTypeMismatchError(
            f"{name!r} is {want} but checkpoint {reader.prefix!r} stores {stored_dtype} (strings and numbers do not convert)"
        )
    if stored_shape != variable.shape:
        raise ShapeMismatchError(f"{name!r} has shape {list(variable.shape)}, the checkpoint {list(stored_shape)}")
    return True


def _python_number_takes(old: Any, stored: np.dtype) -> bool:
    """Whether a Python int, float or bool leaf holds every value of ``stored`` exactly, so that no
    cast is needed (a Python int has no width: any stored integer fits; a float any stored float)."""
    if isinstance(old, (bool, np.generic)) or not isinstance(old, (int, float)):
        return isinstance(old, bool) and stored.kind == "b"
    from gpusaver.variables import _is_ml_float

    if isinstance(old, int):
        return stored.kind in "biu"
    return stored.kind == "f" or _is_ml_float(stored)


def _python_number(old: Any, value: np.ndarray, name: str) -> Any:
    """The 0-d ``value`` as a Python number of ``old``'s type, exactly (or a DTypeMismatchError)."""
    from gpusaver.variables import checked_cast

    if isinstance(old, bool):
        return bool(checked_cast(value, np.dtype(bool), name)[()])
    if isinstance(old, int):
        if value.dtype.kind in "biu":
            return int(value.item())  # a Python int holds any stored integer
        as_int = checked_cast(value.astype(np.float64) if value.dtype.kind != "c" else value,
                              np.dtype(np.float64), name)
        x = float(as_int.real if as_int.dtype.kind == "c" else as_int)
        if not np.isfinite(x) or x != int(x):
            from gpusaver.errors import DTypeMismatchError

            raise DTypeMismatchError(
                f"variable {name!r}: the stored {value.dtype} value {value.item()!r} does not convert to a Python int "
                "exactly (it is not a finite integral value)"
            )
        return int(x)
    return float(checked_cast(value, np.dtype(np.float64), name)[()])


def _like(old: Any, variable: Any, value: np.ndarray, cast: bool) -> Any:
    """A new immutable leaf of ``old``'s kind holding ``value`` (converted exactly, or refused)."""
    if variable.kind == "scalar" and isinstance(old, (int, float)) and not isinstance(old, np.generic):
        return _python_number(old, value, variable.name)
    if value.dtype != variable.dtype:  # checked by _check_leaf: cast=True, both numbers
        from gpusaver.variables import checked_cast

        value = checked_cast(value, variable.dtype, variable.name)
    if variable.kind == "jax":
        import jax

        sharding = getattr(old, "sharding", None)
        return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)
    if variable.kind == "scalar":
        if isinstance(old, np.generic):
            return value[()]
        item = value.item()
        return item.decode("utf-8") if isinstance(old, str) and isinstance(item, bytes) else item
    return value


# ----------------------------------------------------------------------------- load_into
class LoadResult(NamedTuple):
    """What :func:`load_into` did not restore, as torch's ``load_state_dict`` reports it: paths as
    ``"a/b/c"`` strings (int keys and list indices in decimal)."""

    #: the target's leaves (and Statefuls) the checkpoint lacks, in the target's order
    missing_keys: list[str]
    #: the checkpoint's leaves the target lacks, in the checkpoint's order
    unexpected_keys: list[str]


def load_into(
    target: Any,
    path: "str | os.PathLike[str]",
    *,
    strict: bool = True,
    cast: bool = False,
    progress: ProgressCallback | None = None,
) -> LoadResult:
    """Restores a checkpoint written by :func:`save` into ``target``, in place.

    ``target`` is a tree (dicts, lists, tuples) of arrays and Statefuls (objects with
    ``state_dict()`` and ``load_state_dict()``, as torch DCP's: an ``nn.Module``, an optimizer, an
    LR scheduler, a ``GradScaler``), or one Stateful; the checkpoint is what ``save`` made of the
    same kind of tree (``gs.save({"model": model, "optim": opt, "step": 7}, path)``)::

        result = gs.load_into({"model": model, "optim": opt, "step": 0}, path)

    * Arrays (NumPy, CuPy, torch CPU and CUDA) are written into; the other leaves of a dict or list
      of the target (Python numbers, JAX arrays, None) are replaced in it (``"step"`` above becomes 7).
    * An ``nn.Module``'s tensors are written into its own storage (as ``load(path,
      like=module.state_dict())``: shapes and dtypes must fit; tied parameters are written once and
      stay tied); ``load_state_dict`` is called only for leaves of its state dict that are not tensors.
    * Any other Stateful gets its state read from the checkpoint as a new tree (torch tensors on
      the host for a torch object, else NumPy arrays) and ``load_state_dict(state)``. An optimizer
      that has not stepped has no moments to write into: torch's ``Optimizer.load_state_dict``
      moves (and casts) the loaded ones to the device and dtype of their parameters. Its state
      dict need not list what it will accept, so the checkpoint's leaves under such an object are
      never unexpected; the object is missing only when the checkpoint has nothing at its path.

    Args:
        target: the tree to restore into.
        path: a checkpoint prefix, or a directory whose ``checkpoint`` file names one.
        strict: refuse a mismatch (missing or unexpected keys) before anything changes; with
            ``strict=False`` the rest is restored and the mismatch returned.
        cast: convert stored tensors of another dtype (exactly, or refused).
        progress: ``callback(done_bytes, total_bytes)`` of the arrays written in place.

    Returns:
        ``LoadResult(missing_keys, unexpected_keys)`` (both empty when ``strict``).

    Raises:
        TensorNotFoundError: strict, and the checkpoint lacks leaves of ``target`` (named).
        InvalidArgumentError: strict, and the checkpoint holds leaves ``target`` lacks (named); a
            structure that differs (a container where a leaf is); a checkpoint without the
            structure :func:`save` writes; an immutable leaf inside a tuple; an optimizer whose
            parameter groups differ from the stored ones; pickled leaves.
        DTypeMismatchError, ShapeMismatchError: an array or module tensor that does not fit.

    Every check runs before anything in ``target`` changes. An error that a Stateful's own
    ``load_state_dict`` raises is its own (they are called last, after the arrays are written).
    """
    from gpusaver import tree as trees
    from gpusaver.checkpoint_reader import CheckpointReader, resolve_checkpoint_path
    from gpusaver.errors import TensorNotFoundError

    prefix = resolve_checkpoint_path(path)
    with CheckpointReader(prefix) as reader:
        if not reader.has_tensor(trees.TREE_TENSOR):
            raise InvalidArgumentError(
                f"checkpoint {prefix!r} has no tree structure (it was not written by gpusaver.save): "
                "gpusaver.load(path, like=...) or a Saver restores it"
            )
        spec = trees.parse_spec(reader.get_tensor(trees.TREE_TENSOR), prefix)
    stored_containers, stored_leaves = _stored_layout(spec, prefix)
    view, order, holders, modules, statefuls = _expand(target)
    own = {p for p, is_leaf in order if is_leaf}
    objects = [p for p, _ in statefuls]
    for p in objects:
        if p in stored_leaves:
            raise InvalidArgumentError(
                f"target has a {type(dict(statefuls)[p]).__qualname__} (a Stateful) at {trees.show_path(p)}, "
                f"where checkpoint {prefix!r} has a leaf"
            )

    def under_object(p: tuple) -> bool:
        return any(p[: len(o)] == o for o in objects)

    missing = [p for p, is_leaf in order if (p not in stored_leaves if is_leaf else p not in stored_containers)]
    unexpected = [p for p in stored_leaves if p not in own and not under_object(p)]
    if strict and missing:
        raise TensorNotFoundError(
            f"checkpoint {prefix!r} lacks {_key_list(missing)} of the target (strict=False restores the rest)",
            _plain_name(missing[0]),
        )
    if strict and unexpected:
        raise InvalidArgumentError(
            f"checkpoint {prefix!r} also holds {_key_list(unexpected)}, which the target lacks "
            "(strict=False restores the rest)"
        )
    for p, _ in order:  # leaves replaced, not written into: a tuple cannot take them
        holder = holders.get(p)
        if holder is not None and isinstance(holder[0], tuple) and p in stored_leaves and not _in_place(_leaf_at(view, p)):
            raise InvalidArgumentError(
                f"target's {trees.show_path(p)} is a {type(_leaf_at(view, p)).__name__} inside a tuple: it cannot "
                "be restored in place (gpusaver.load(path, like=...) returns a new tree)"
            )
    states = _read_states(prefix, spec, [(p, o) for p, o in statefuls if p in stored_containers])
    results, leaves = _load_like(prefix, view, spec, False, cast, False, progress, rebuild=False)
    touched: dict[tuple, list[tuple[tuple, Any]]] = {}
    for p, value in results.items():
        if value is leaves[p]:
            continue
        if p in holders:
            container, key = holders[p]
            container[key] = value
            continue
        m = max((mp for mp in modules if p[: len(mp)] == mp), key=len)
        touched.setdefault(m, []).append((p[len(m):], value))
    for mp, changes in touched.items():  # leaves of a module's state dict that are not tensors
        module, sd = modules[mp]
        for rel, value in changes:
            node = sd
            for k in rel[:-1]:
                node = node[k]
            node[rel[-1]] = value
        module.load_state_dict(sd, strict=False)
    for obj, state in states:
        obj.load_state_dict(state)
    return LoadResult([_plain_name(p) for p in missing], [_plain_name(p) for p in unexpected])


def _key_list(paths: list[tuple]) -> str:
    shown = ", ".join(repr(_plain_name(p)) for p in paths[:10])
    return shown + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")


def _leaf_at(view: Any, path: tuple) -> Any:
    """The node of a tree at ``path``."""
    node = view
    for k in path:
        node = node[k]
    return node


def _in_place(value: Any) -> bool:
    """Whether a leaf is an array a restore writes into (not a value it replaces)."""
    from gpusaver import tree as trees

    if (trees._FAST.get(type(value)) or trees._classify(value)) != "a":
        return False
    return type(value).__module__.split(".")[0] not in ("jax", "jaxlib")


def _is_module(value: Any) -> bool:
    import sys

    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(value, torch.nn.Module)


def _expand(target: Any) -> tuple[Any, list, dict, dict, list]:
    """``target`` seen as the tree :func:`save` wrote for it: ``(view, order, holders, modules, statefuls)``.

    ``view``: plain dicts, lists and tuples of target's leaves, a module's ``state_dict()`` in its
    place (whose tensors are the module's own storage), an empty dict in place of any other Stateful;
    ``order``: ``(path, is a leaf)`` of each leaf and other Stateful in preorder; ``holders``: ``{leaf
    path: (target's container, its key)}`` for the leaves of target's own containers; ``modules``:
    ``{path: (module, its state dict)}``; ``statefuls``: ``[(path, object)]`` of the other Statefuls.
    """
    from gpusaver import tree as trees

    order: list[tuple[tuple, bool]] = []
    holders: dict[tuple, tuple[Any, Any]] = {}
    modules: dict[tuple, tuple[Any, Any]] = {}
    statefuls: list[tuple[tuple, Any]] = []

    def convert(value: Any, path: tuple) -> tuple[Any, bool]:
        """(the view's value, whether it is a container to walk into)"""
        if isinstance(value, (Mapping, list, tuple)):
            return value, True
        if _is_module(value):
            sd = trees.state_of(value, path)
            modules[path] = (value, sd)
            return sd, True
        if trees.is_stateful(value):
            statefuls.append((path, value))
            order.append((path, False))
            return {}, False
        return value, False

    root, walk = convert(target, ())
    if not walk:
        if not statefuls:
            raise InvalidArgumentTypeError(
                f"a target is a dict, list or tuple (of arrays and Statefuls), or a Stateful, not {type(target).__name__}"
            )
        return root, order, holders, modules, statefuls
    view: Any = None
    on_path: set[int] = set()
    stack: list[list[Any]] = []

    def open_(node: Any, path: tuple, in_module: bool) -> None:
        _, keys, values = trees._children(node, path)
        own = list(node.keys()) if isinstance(node, Mapping) else keys
        on_path.add(id(node))
        stack.append([node, path, keys, values, own, 0, [], in_module])

    open_(root, (), bool(modules))
    while stack:
        frame = stack[-1]
        node, path, keys, values, own, i, out, in_module = frame
        if i < len(keys):
            frame[5] = i + 1
            sub = path + (keys[i],)
            value, walk = convert(values[i], sub) if not in_module else (values[i], isinstance(values[i], (Mapping, list, tuple)))
            if walk:
                if id(value) in on_path:
                    raise InvalidArgumentError(f"the target holds itself: {trees.show_path(sub)} is a container it is inside of")
                open_(value, sub, in_module or sub in modules)
                continue
            if not (statefuls and statefuls[-1][0] == sub):
                order.append((sub, True))
                if not in_module:
                    holders[sub] = (node, own[i])
            out.append(value)
            continue
        stack.pop()
        on_path.discard(id(node))
        made = dict(zip(keys, out)) if isinstance(node, Mapping) else (list(out) if isinstance(node, list) else tuple(out))
        if stack:
            stack[-1][6].append(made)
        else:
            view = made
    return view, order, holders, modules, statefuls


def _uses_torch(obj: Any) -> bool:
    """Whether a Stateful's state is torch's: a torch object, or one whose state dict holds torch tensors."""
    import sys

    if type(obj).__module__.split(".")[0] == "torch":
        return True
    if "torch" not in sys.modules:
        return False
    import torch

    stack = [obj.state_dict()]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            return True
        if isinstance(node, Mapping):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


def _read_states(prefix: str, spec: dict[str, Any], statefuls: list[tuple[tuple, Any]]) -> list[tuple[Any, Any]]:
    """``[(object, its state as read)]`` for the Statefuls the checkpoint holds: each subtree read as a
    new tree (torch tensors on the host for a torch object, else NumPy), tied leaves one tensor; an
    optimizer's parameter groups checked against its own."""
    from gpusaver import tree as trees
    from gpusaver.checkpoint_reader import CheckpointReader

    if not statefuls:
        return []
    targets = [(p, _Target.of("torch" if _uses_torch(o) else "numpy", None)) for p, o in statefuls]
    with CheckpointReader(prefix) as reader:
        arrays: dict[tuple[str, str], Any] = {}

        def leaf(kind: str, name: str | None, inline: Any, seq: int, path: tuple, dicts: tuple) -> Any:
            target = next((t for p, t in targets if path[: len(p)] == p), None)
            if target is None:
                return None
            if name is None:
                return trees.inline_value(kind, inline)
            if kind == "p":
                raise InvalidArgumentError(
                    f"checkpoint {prefix!r} holds a pickled object at {trees.show_path(path)}; load_into does not "
                    "unpickle (gpusaver.load(path, allow_pickle=True) does, for checkpoints you trust)"
                )
            if kind != "a":
                return _host_leaf(kind, reader.get_tensor(name))
            got = arrays.get((target.framework, name))
            if got is None:
                got = arrays[(target.framework, name)] = target.array(reader.get_tensor(name), name)
            return got

        tree = trees.decode(spec, leaf, prefix)
    out = []
    for p, obj in statefuls:
        state = _leaf_at(tree, p)
        _check_optimizer(obj, state, p, prefix)
        out.append((obj, state))
    return out


def _check_optimizer(obj: Any, state: Any, path: tuple, where: str) -> None:
    """Refuses (before anything changes) stored parameter groups that a torch optimizer's
    ``load_state_dict`` would refuse."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch

    if not isinstance(obj, torch.optim.Optimizer):
        return
    shown = _plain_name(path) or "the root"
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, (list, tuple)) or not isinstance(state.get("state"), Mapping):
        raise InvalidArgumentError(f"checkpoint {where!r} holds no optimizer state at {shown!r} (no state and param_groups)")
    mine = [len(g["params"]) for g in obj.param_groups]
    theirs = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in groups]
    if mine != theirs:
        raise InvalidArgumentError(
            f"the optimizer at {shown!r} has parameter groups of {mine} parameters, checkpoint {where!r} "
            f"{theirs}: it is another model's"
        )
