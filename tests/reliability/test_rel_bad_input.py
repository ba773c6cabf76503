"""Bad input gets a clear, typed error before any byte is written, and changes nothing.

Each case snapshots the checkpoint directory (every entry, mode and content)
before and after, and runs the save through file operations that record every
call: a rejected save must not have reached the file operations at all (not
even ``phase("save:start")``), and a rejected restore must leave every
destination array as it was.

Unwritable directories are tried as an unprivileged user (``nobody``, in a
forked worker that drops root, which bypasses permission bits), together with the converse: a
read-only checkpoint still restores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import pytest

import gpusaver as gs
import relkit

SPECS = relkit.SPECS["small"]


@pytest.fixture
def ckpt(tmp_path) -> str:
    """A directory holding checkpoint ``model-1`` and its state file."""
    directory = str(tmp_path / "ckpt")
    os.mkdir(directory)
    arrays = relkit.zeros(SPECS)
    relkit.fill(arrays, SPECS, 1)
    relkit.make_saver(arrays, SPECS).save(os.path.join(directory, "model"), global_step=1)
    with open(os.path.join(directory, "afile"), "w") as f:
        f.write("not a directory")
    os.mkdir(os.path.join(directory, "subdir"))
    return directory


class _TorchLike:
    """Looks like a framework tensor (shape, dtype, __array__, __dlpack__) but is not NumPy or CuPy."""

    shape = (3,)
    dtype = np.dtype(np.float32)

    def __array__(self, dtype: Any = None) -> np.ndarray:
        return np.zeros(3, np.float32)

    def __dlpack__(self, stream: Any = None) -> Any:
        raise NotImplementedError


BAD_VAR_LISTS: dict[str, tuple[Callable[[], Any], tuple[type, ...]]] = {
    "python list as a value": (lambda: {"x": [1.0, 2.0]}, (gs.UnsupportedDTypeError, TypeError)),
    "torch-like object": (lambda: {"x": _TorchLike()}, (gs.UnsupportedDTypeError, TypeError)),
    # (Python scalars are accepted as 0-d tensors: tests/test_frameworks.py.)
    "datetime64 array": (lambda: {"x": np.zeros(2, "datetime64[s]")}, (gs.UnsupportedDTypeError,)),
    "structured dtype": (lambda: {"x": np.zeros(2, [("a", "<i4"), ("b", "<f4")])}, (gs.UnsupportedDTypeError,)),
    "object array of ints": (lambda: {"x": np.array([1, 2], dtype=object)}, (TypeError,)),
    "empty name": (lambda: {"": np.zeros(2)}, (ValueError,)),
    "non-string name": (lambda: [gs.Variable(np.zeros(2), 3)], (TypeError,)),
    "duplicate names": (lambda: [gs.Variable(np.zeros(2), "a"), gs.Variable(np.ones(2), "a")], (ValueError,)),
    "one array under two names": (lambda: (lambda a: {"a": a, "b": a})(np.zeros(2)), (ValueError,)),
    "unnamed Variable in a list": (lambda: [gs.Variable(np.zeros(2))], (ValueError,)),
    "plain array in a list": (lambda: [np.zeros(2)], (TypeError,)),
    "a set": (lambda: {np.zeros(2).tobytes()}, (TypeError,)),
    "unknown device": (lambda: [gs.Variable(np.zeros(2), "a", "/tpu:0")], (ValueError,)),
    "numpy array on a GPU": (lambda: [gs.Variable(np.zeros(2), "a", "/gpu:0")], (ValueError,)),
}


@pytest.mark.parametrize("case", sorted(BAD_VAR_LISTS))
def test_bad_variables_are_refused_before_any_write(ckpt: str, case: str) -> None:
    make, types = BAD_VAR_LISTS[case]
    before = relkit.snapshot(ckpt)
    ops = relkit.EventOps(ckpt)
    with pytest.raises(types) as info:
        saver = gs.Saver(make(), fileops=ops)
        saver.save(os.path.join(ckpt, "model"), global_step=2)
    assert str(info.value), "an error without a message"
    assert isinstance(info.value, gs.GpuSaverError), f"untyped {info.value!r}"
    assert ops.trace == [] and relkit.snapshot(ckpt) == before


def _saver(ops: Any) -> gs.Saver:
    arrays = relkit.zeros(SPECS)
    relkit.fill(arrays, SPECS, 2)
    return relkit.make_saver(arrays, SPECS, fileops=ops)


BAD_SAVES: dict[str, tuple[Callable[[str], dict[str, Any]], type]] = {
    "missing directory": (lambda d: {"save_path": os.path.join(d, "missing", "model")}, ValueError),
    "parent is a file": (lambda d: {"save_path": os.path.join(d, "afile", "model")}, ValueError),
    "prefix is a directory": (lambda d: {"save_path": os.path.join(d, "subdir"), "global_step": None}, ValueError),
    "no save_path": (lambda d: {"save_path": None}, ValueError),
    "global_step float": (lambda d: {"global_step": 1.5}, TypeError),
    "global_step str": (lambda d: {"global_step": "3"}, TypeError),
    "global_step bool": (lambda d: {"global_step": True}, TypeError),
    "global_step numpy float": (lambda d: {"global_step": np.float32(2)}, TypeError),
    "global_step 1-d array": (lambda d: {"global_step": np.array([2])}, TypeError),
    "global_step list": (lambda d: {"global_step": [2]}, TypeError),
    "latest_filename with a path": (lambda d: {"latest_filename": "sub/checkpoint"}, ValueError),
    "latest_filename is the checkpoint's index": (
        lambda d: {"save_path": os.path.join(d, "model-9"), "global_step": None, "latest_filename": "model-9.index"},
        gs.StatePathConflictError,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SAVES))
def test_bad_save_arguments_are_refused_before_any_write(ckpt: str, case: str) -> None:
    make, error = BAD_SAVES[case]
    kwargs = {"save_path": os.path.join(ckpt, "model"), "global_step": 2, **make(ckpt)}
    before = relkit.snapshot(ckpt)
    ops = relkit.EventOps(ckpt)
    saver = _saver(ops)
    with pytest.raises(error) as info:
        saver.save(**kwargs)
    assert str(info.value)
    assert isinstance(info.value, gs.GpuSaverError), f"untyped {info.value!r}"
    assert ops.trace == [], f"the save reached the file operations: {ops.trace[:3]}"
    assert relkit.snapshot(ckpt) == before


def _restore_case(name: str) -> tuple[dict[str, Any], type, dict[str, Any]]:
    """(var_list, expected error, Saver kwargs)."""
    good = {"d1/x": np.full(4, 7.0)}
    cases = {
        "unknown name": ({**good, "nope": np.zeros(3, np.float32)}, gs.TensorNotFoundError, {}),
        "wrong shape": ({**good, "d0/w": np.zeros(11, np.float32)}, gs.ShapeMismatchError, {}),
        "wrong dtype": ({**good, "d0/w": np.zeros(10, np.float64)}, gs.DTypeMismatchError, {}),
        "reshape, wrong count": ({**good, "d0/w": np.zeros((3, 3), np.float32)}, gs.ShapeMismatchError,
                                 {"reshape": True}),
        "string into numbers": ({**good, "d2/s": np.zeros(3, np.int64)}, gs.DTypeMismatchError, {}),
        "read-only destination": ({**good, "d0/w": np.zeros(10, np.float32)}, ValueError, {}),
    }
    var_list, error, kwargs = cases[name]
    if name == "read-only destination":
        var_list["d0/w"].flags.writeable = False
    return var_list, error, kwargs


@pytest.mark.parametrize("case", ["unknown name", "wrong shape", "wrong dtype", "reshape, wrong count",
                                  "string into numbers", "read-only destination"])
def test_bad_restore_changes_no_array(ckpt: str, case: str) -> None:
    var_list, error, kwargs = _restore_case(case)
    copies = {k: v.copy() for k, v in var_list.items()}
    before = relkit.snapshot(ckpt)
    with pytest.raises(error) as info:
        gs.Saver(var_list, **kwargs).restore(os.path.join(ckpt, "model-1"))
    assert str(info.value)
    for k, v in var_list.items():
        assert relkit.same(v, copies[k]), f"{k} changed although the restore was refused"
    assert relkit.snapshot(ckpt) == before


@pytest.mark.parametrize("where", ["state file", "directory", "missing", "data file", "None"])
def test_restore_from_a_path_that_is_no_checkpoint(ckpt: str, where: str) -> None:
    path = {
        "state file": os.path.join(ckpt, "checkpoint"),
        "directory": os.path.join(ckpt, "subdir"),
        "missing": os.path.join(ckpt, "model-42"),
        "data file": os.path.join(ckpt, "model-1.data-00000-of-00004"),
        "None": None,
    }[where]
    arrays = relkit.zeros(SPECS)
    copies = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(ValueError) as info:
        relkit.make_saver(arrays, SPECS).restore(path)
    assert str(info.value)
    if path is not None:
        assert isinstance(info.value, gs.InvalidCheckpointPathError)
    assert all(relkit.same(arrays[k], copies[k]) for k in arrays)


# --------------------------------------------------------------- permissions
def test_unwritable_directory_fails_fast_and_read_only_checkpoint_restores(forkserver: relkit.ForkServer) -> None:
    """As ``nobody`` (a forked worker drops root; root ignores permission bits)."""
    base = tempfile.mkdtemp(prefix="gpusaver-perm-")
    try:
        os.chmod(base, 0o755)
        unwritable = os.path.join(base, "unwritable")
        readonly = os.path.join(base, "readonly")
        result = os.path.join(base, "result.json")
        os.mkdir(unwritable)
        os.mkdir(readonly)
        open(result, "w").close()
        gs.Saver({"w": np.arange(4, dtype=np.float32) + 10}).save(os.path.join(readonly, "model"), global_step=1)
        uid = os.geteuid()
        if uid == 0:
            uid = 65534
            os.chown(unwritable, uid, uid)
            os.chown(result, uid, uid)
        for n in os.listdir(readonly):
            os.chmod(os.path.join(readonly, n), 0o444)
        os.chmod(readonly, 0o555)
        os.chmod(unwritable, 0o500)
        before = (relkit.snapshot(unwritable), relkit.snapshot(readonly))
        code = forkserver.run({"kind": "as_user", "uid": uid, "unwritable": unwritable, "readonly": readonly,
                               "result": result})
        assert code == 0, forkserver.log()
        with open(result) as f:
            out = json.load(f)
        assert out["uid"] != 0
        assert out["save"] is not None and out["save"][1] is True, out["save"]
        assert unwritable in out["save"][3] and out["save"][2] == 13, out["save"]
        assert out["calls"] == [], "the save began before refusing the unwritable directory"
        assert out["restore"] == [10.0, 11.0, 12.0, 13.0], out["restore"]
        assert out["save_ro"] is not None and out["save_ro"][1] is True, out["save_ro"]
        assert (relkit.snapshot(unwritable), relkit.snapshot(readonly)) == before
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for n in dirnames:
                os.chmod(os.path.join(dirpath, n), 0o755)
        shutil.rmtree(base)
