"""Any framework's arrays, the one-line API, partial restore and progress.

* torch tensors (every dtype torch has on the CPU, bfloat16 and float8
  included; non-contiguous, requiring grad) save and restore bit-exactly, in
  place, into the very same tensors; TensorFlow reads what they saved;
* JAX arrays and scalars are saved, refused by an in-place restore with a clear
  error, and come back through ``gpusaver.load(path, like=tree)``;
* objects that only offer ``__array_interface__`` or ``__dlpack__`` are seen
  without copies;
* ``gpusaver.save``/``gpusaver.load``: nested dicts, the parent directory
  created, ``like=`` in place, ``strict``;
* ``Saver.restore(strict=False)`` returns the missing and unexpected names,
  ``cast=True`` converts and nothing converts silently;
* ``progress`` callbacks: monotone, ending at done == total == the data bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import gpusaver as gs

TORCH_DTYPES = [
    torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool, torch.complex64, torch.complex128,
]


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bits of ``dtype`` (every bit pattern a dtype's storage can hold, NaNs included)."""
    g = torch.Generator().manual_seed(seed)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_torch_tensors_restore_in_place_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {
        "plain": _random(dtype, (5, 7), 1),
        "scalar": _random(dtype, (), 2),
        "empty": _random(dtype, (0, 3), 3),
        "strided": _random(dtype, (6, 8), 4)[::2, 1::3],
        "transposed": _random(dtype, (4, 6), 5).t(),
    }
    if dtype.is_floating_point:
        tensors["param"] = torch.nn.Parameter(_random(dtype, (3, 3), 6), requires_grad=True)
    want = {k: _bits(v) for k, v in tensors.items()}
    saver = gs.Saver(tensors, sharded=True)
    prefix = saver.save(str(tmp_path / "m"), global_step=1)
    with torch.no_grad():
        for t in tensors.values():
            t.zero_() if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) else t.view(torch.uint8).zero_()
    assert saver.restore(prefix) == ([], [])
    for name, t in tensors.items():
        assert _bits(t) == want[name], name
    with gs.load_checkpoint(prefix) as reader:
        for name, t in tensors.items():
            got = reader.get_tensor(name)
            assert got.shape == tuple(t.shape)
            assert np.ascontiguousarray(got).tobytes() == want[name], name


def test_torch_devices_and_names(tmp_path: Path) -> None:
    v = gs.Variable(torch.zeros(3), "x")
    assert v.device.canonical == "/job:localhost/replica:0/task:0/device:CPU:0"
    t = torch.arange(8.0)
    saver = gs.Saver({"c": t[:5], "d": t[3:]})  # overlapping views of one torch tensor: saved as they are
    prefix = saver.save(str(tmp_path / "overlap"))
    assert (gs.load(prefix)["d"] == np.arange(3.0, 8.0)).all()
    with pytest.raises(gs.InvalidArgumentError, match="'c' and 'd' share memory"):
        saver.restore(prefix)  # but not restored into: each element cannot get its own value
    assert (t == torch.arange(8.0)).all()
    gs.Saver({"c": t[:4], "d": t[4:]}).restore(gs.Saver({"c": t[:4], "d": t[4:]}).save(str(tmp_path / "apart")))


@pytest.mark.tf
def test_tensorflow_reads_a_checkpoint_saved_from_torch(tmp_path: Path, tf: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    state = dict(model.state_dict())
    state["bf16"] = _random(torch.bfloat16, (3, 2), 9)
    prefix = gs.save(state, tmp_path / "torch_ckpt")
    reader = tf.train.load_checkpoint(str(prefix))
    for name, t in state.items():
        got = reader.get_tensor(name)
        assert got.shape == tuple(t.shape)
        assert np.ascontiguousarray(got).tobytes() == _bits(t), name


def test_jax_arrays_and_scalars_are_saved_and_come_back_through_load_like(tmp_path: Path) -> None:
    tree = {
        "params": {"w": jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4), "b": jnp.ones(4, jnp.float32)},
        "step": 41,
        "lr": np.float32(3e-4),
        "scale": 0.5,
        "flag": True,
        "name": "adamw",
    }
    prefix = gs.save(tree, tmp_path / "deep" / "dir" / "jax")  # parent directories created
    with pytest.raises(gs.InvalidArgumentError, match="immutable"):
        gs.Saver(gs.api.flatten(tree)).restore(prefix)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros_like(x) if isinstance(x, jax.Array) else x, tree)
    zeros.update(step=0, lr=np.float32(0), scale=0.0, flag=False, name="")
    back = gs.load(prefix, like=zeros)
    assert isinstance(back["params"]["w"], jax.Array) and back["params"]["w"].dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(back["params"]["w"]), np.asarray(tree["params"]["w"]))
    assert np.array_equal(np.asarray(back["params"]["b"]), np.asarray(tree["params"]["b"]))
    assert back["step"] == 41 and type(back["step"]) is int
    assert back["lr"] == np.float32(3e-4) and isinstance(back["lr"], np.float32)
    assert back["scale"] == 0.5 and back["flag"] is True and back["name"] == "adamw"
    loaded = gs.load(prefix)  # the tree as saved: Python scalars as themselves, arrays as NumPy
    assert loaded["params"]["w"].dtype == ml_dtypes.bfloat16 and loaded["step"] == 41 and type(loaded["step"]) is int
    assert loaded["lr"] == np.float32(3e-4) and loaded["name"] == "adamw" and loaded["flag"] is True
    stored = gs.load_checkpoint(prefix).get_variable_to_shape_map()  # TensorFlow's view: the arrays by path
    assert {"params/b", "params/w", "lr"} <= set(stored)


class _ArrayInterfaceOnly:
    def __init__(self, a: np.ndarray) -> None:
        self._a = a
        self.__array_interface__ = a.__array_interface__


class _DLPackOnly:
    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self._a.__dlpack_device__()


@pytest.mark.parametrize("wrap", [_ArrayInterfaceOnly, _DLPackOnly])
def test_protocol_objects_are_seen_without_copies(tmp_path: Path, wrap: type) -> None:
    backing = np.arange(10, dtype=np.int32)
    obj = wrap(backing)
    saver = gs.Saver({"x": obj})
    prefix = saver.save(str(tmp_path / "p"))
    backing[:] = -1
    saver.restore(prefix)
    assert backing.tolist() == list(range(10)), "the restore did not write into the object's memory"


def test_unknown_objects_are_a_typed_error() -> None:
    with pytest.raises(gs.UnsupportedDTypeError, match="__dlpack__"):
        gs.Saver({"x": object()})


def test_load_like_restores_numpy_and_torch_in_place_and_honours_strict(tmp_path: Path) -> None:
    tree = {"a": np.arange(6.0).reshape(2, 3), "t": {"u": torch.arange(4, dtype=torch.int16)}}
    prefix = gs.save(tree, tmp_path / "ck")
    like = {"a": np.zeros((2, 3)), "t": {"u": torch.zeros(4, dtype=torch.int16)}}
    back = gs.load(prefix, like=like)
    assert back["a"] is like["a"] and back["t"]["u"] is like["t"]["u"]
    assert np.array_equal(like["a"], tree["a"]) and torch.equal(like["t"]["u"], tree["t"]["u"])
    more = {"a": np.zeros((2, 3)), "new": np.ones(2)}
    with pytest.raises(gs.TensorNotFoundError):
        gs.load(prefix, like=more)
    assert more["a"].sum() == 0, "a refused strict load changed an array"
    gs.load(prefix, like=more, strict=False)
    assert np.array_equal(more["a"], tree["a"]) and more["new"].tolist() == [1.0, 1.0]


def test_bad_trees_are_refused(tmp_path: Path) -> None:
    """(Lists, int keys and a str key with a '/' are trees gpusaver saves: tests/test_state_trees.py.)"""
    with pytest.raises(gs.InvalidArgumentTypeError, match="1.5"):
        gs.save({1.5: np.zeros(1)}, tmp_path / "x")  # type: ignore[dict-item]
    with pytest.raises(gs.InvalidArgumentTypeError):
        gs.save({(1, 2): np.zeros(1)}, tmp_path / "x")  # type: ignore[dict-item]
    with pytest.raises(gs.InvalidArgumentError):
        gs.save({}, tmp_path / "x")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ partial restore
def _ckpt(tmp_path: Path) -> str:
    return gs.save({"w": np.arange(4, dtype=np.float32), "b": np.ones(2, np.float64), "s": np.array(b"x", object)},
                   tmp_path / "part")


def test_strict_restore_names_what_is_missing_and_changes_nothing(tmp_path: Path) -> None:
    prefix = _ckpt(tmp_path)
    w, extra = np.zeros(4, np.float32), np.full(3, 7.0)
    saver = gs.Saver({"w": w, "extra": extra})
    with pytest.raises(gs.TensorNotFoundError, match="'extra'.*strict=False"):
        saver.restore(prefix)
    assert not w.any()
    result = saver.restore(prefix, strict=False)
    assert result.missing_keys == ["extra"] and result.unexpected_keys == ["b", "s"]
    assert w.tolist() == [0, 1, 2, 3] and extra.tolist() == [7.0] * 3


def test_a_dtype_differs_only_with_cast(tmp_path: Path) -> None:
    prefix = _ckpt(tmp_path)
    w, b = np.zeros(4, np.float16), np.zeros(2, np.int32)
    saver = gs.Saver({"w": w, "b": b})
    with pytest.raises(gs.DTypeMismatchError):
        saver.restore(prefix)
    with pytest.raises(gs.DTypeMismatchError):
        saver.restore(prefix, strict=False)
    assert not w.any() and not b.any()
    saver.restore(prefix, cast=True)
    assert w.tolist() == [0, 1, 2, 3] and w.dtype == np.float16 and b.tolist() == [1, 1]
    t = torch.zeros(4, dtype=torch.bfloat16)
    gs.Saver({"w": t}).restore(prefix, cast=True)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(gs.DTypeMismatchError, match="strings"):
        gs.Saver({"s": np.zeros(())}).restore(prefix, cast=True, strict=False)
    with pytest.raises(gs.ShapeMismatchError):
        gs.Saver({"w": np.zeros(5, np.float64)}).restore(prefix, cast=True)


# ------------------------------------------------------------------------ progress
@pytest.mark.parametrize("sharded", [False, True])
def test_progress_reports_every_byte_once_in_order(tmp_path: Path, sharded: bool) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"v{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate([10, 300_000, 5, 1 << 20])}
    total = sum(a.nbytes for a in arrays.values())
    variables = [gs.Variable(a, n, device=f"/cpu:{i % 2}") for i, (n, a) in enumerate(arrays.items())]
    calls: list[tuple[int, int]] = []
    saver = gs.Saver(variables, sharded=sharded)
    prefix = saver.save(str(tmp_path / "m"), progress=lambda d, t: calls.append((d, t)))
    for what in ("save", "restore", "load"):
        assert calls, what
        assert all(t == total for _, t in calls), (what, calls)
        assert [d for d, _ in calls] == sorted(d for d, _ in calls), (what, calls)
        assert calls[-1] == (total, total), (what, calls)
        assert len(calls) <= 102, f"{what}: {len(calls)} callbacks"
        calls.clear()
        if what == "save":
            saver.restore(prefix, progress=lambda d, t: calls.append((d, t)))
        elif what == "restore":
            gs.load(prefix, progress=lambda d, t: calls.append((d, t)))


def test_progress_of_one_line_save(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    gs.save({"a": np.zeros(1000, np.uint8)}, os.fspath(tmp_path / "o"), progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (1000, 1000)


def test_a_restore_bumps_torch_version_counters_so_autograd_notices(tmp_path: Path) -> None:
    w = torch.nn.Parameter(torch.ones(3))
    saver = gs.Saver({"w": w})
    prefix = saver.save(str(tmp_path / "v"))
    loss = (w * w).sum()  # the backward pass needs w's values
    saver.restore(prefix)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("step", [torch.tensor(7), np.int64(7), np.array(7, np.uint8), jnp.array(7)])
def test_global_step_of_any_framework(tmp_path: Path, step: Any) -> None:
    assert gs.Saver({"w": np.zeros(1)}).save(str(tmp_path / "m"), global_step=step) == str(tmp_path / "m-7")


@pytest.mark.parametrize("step", [torch.tensor(7.0), torch.tensor([7]), torch.tensor(True), 7.0, "7"])
def test_bad_global_steps_are_typed_errors(tmp_path: Path, step: Any) -> None:
    with pytest.raises(gs.InvalidArgumentTypeError):
        gs.Saver({"w": np.zeros(1)}).save(str(tmp_path / "m"), global_step=step)
