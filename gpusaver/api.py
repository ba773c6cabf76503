"""The one-line API: ``gpusaver.save(tree, path)`` and ``gpusaver.load(path)``.

As safetensors' ``save_file`` and ``load_file``, for a dict of arrays (or
nested dicts, whose keys are joined with ``/``) of any framework gpusaver sees:
NumPy, CuPy, torch (CPU and CUDA), JAX, Python and NumPy scalars::

    gpusaver.save(model.state_dict(), "ckpt/model")
    state = gpusaver.load("ckpt/model")               # {name: numpy array}
    gpusaver.load("ckpt/model", like=model.state_dict())   # in place

The files are one TensorFlow V2 checkpoint (``path.index`` and its data
files), written atomically; no ``checkpoint`` state file is written.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from gpusaver.errors import InvalidArgumentError, InvalidArgumentTypeError
from gpusaver.progress import ProgressCallback

__all__ = ["save", "load", "flatten", "unflatten"]

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


def save(tree: Mapping[str, Any], path: "str | os.PathLike[str]", *, progress: ProgressCallback | None = None) -> str:
    """Writes ``tree`` as one checkpoint at prefix ``path``; creates the parent directory.

    Args:
        tree: ``{name: array}``, nested dicts allowed (keys joined with ``/``).
        path: the checkpoint prefix (``file://`` accepted).
        progress: ``callback(done_bytes, total_bytes)``.

    Returns:
        ``path``, as given.

    Raises:
        InvalidArgumentError, UnsupportedDTypeError: a tree gpusaver cannot save.
        CheckpointWriteError: the write failed; nothing is committed.
    """
    from gpusaver.storage.paths import local_path
    from gpusaver.saver import Saver

    flat = flatten(tree)
    if not flat:
        raise InvalidArgumentError("the tree has no arrays to save")
    path = os.fspath(path)
    parent = os.path.dirname(local_path(path))
    if parent:
        try:
            os.makedirs(parent, exist_ok=True)
        except FileExistsError:
            raise InvalidArgumentError(f"cannot save {path!r}: a part of {parent!r} is a file, not a directory") from None
        except OSError as e:
            from gpusaver.errors import write_error

            raise write_error(e.errno, f"cannot create the directory {parent!r} for {path!r}: {e.strerror}", parent) from e
    saver = Saver(flat, sharded=True, max_to_keep=None)
    saved = saver.save(path, write_state=False, progress=progress)
    assert saved is not None
    return saved


def load(
    path: "str | os.PathLike[str]",
    device: int | None = None,
    like: Mapping[str, Any] | None = None,
    *,
    strict: bool = True,
    cast: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Reads a checkpoint: as a new dict, or into the arrays of an existing tree.

    Args:
        path: a checkpoint prefix, or a directory whose ``checkpoint`` file names one.
        device: with ``like=None``, return CuPy arrays on GPU ``device`` instead of NumPy.
        like: restore into this tree's arrays in place (NumPy, CuPy, torch CPU
            and CUDA); its immutable leaves (JAX arrays, scalars) are replaced by
            new values of their kind in the returned tree.
        strict: with ``like``, every leaf must be in the checkpoint (else missing
            leaves keep their values).
        cast: with ``like``, convert stored tensors of another dtype.
        progress: ``callback(done_bytes, total_bytes)``.

    Returns:
        With ``like=None``: ``{name: array}`` of every variable (partitioned
        ones whole). With ``like``: a tree of ``like``'s shape holding the
        restored values (the very same objects for mutable leaves).

    Raises:
        InvalidCheckpointPathError: nothing to read.
        TensorNotFoundError, DTypeMismatchError, ShapeMismatchError: ``like`` does not fit.
        ChecksumError: damaged data.
    """
    from gpusaver.checkpoint_reader import load_checkpoint, resolve_checkpoint_path

    prefix = resolve_checkpoint_path(path)
    if like is None:
        return _load_dict(prefix, device, progress)
    from gpusaver.saver import Saver
    from gpusaver.variables import Variable

    flat = flatten(like)
    variables = {name: Variable(value, name) for name, value in flat.items()}
    mutable = {n: v for n, v in variables.items() if v.immutable is None}
    immutable = [n for n, v in variables.items() if v.immutable is not None]
    fresh: dict[str, Any] = {}
    with load_checkpoint(prefix) as reader:
        # Every immutable leaf is checked before any mutable one changes.
        present = [n for n in immutable if _check_leaf(reader, variables[n], strict, cast)]
        if mutable:
            Saver(mutable, max_to_keep=None).restore(prefix, strict=strict, cast=cast, progress=progress)
        for name in present:
            fresh[name] = _like(flat[name], variables[name], reader.get_tensor(name), cast)
    return unflatten({**flat, **fresh}, like)


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


def _load_dict(prefix: str, device: int | None, progress: ProgressCallback | None) -> dict[str, Any]:
    from gpusaver.checkpoint_reader import CheckpointReader
    from gpusaver.progress import Progress

    with CheckpointReader(prefix) as reader:
        names = sorted(reader.get_variable_to_shape_map())
        if progress is not None:
            from gpusaver.saver import _stored_bytes

            bundle = reader.bundle
            counter = Progress(progress, sum(_stored_bytes(bundle, n, bundle.entry(n)) for n in names))
            bundle.set_progress(counter)
        out = {name: reader.get_tensor(name, device=device) for name in names}
        if progress is not None:
            counter.finish()
    return out


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
