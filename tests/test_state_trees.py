"""Any training-state tree through ``gs.save`` / ``gs.load``, with its structure (issue #23, item 1).

* torch modules, AdamW (before and after a step) and StepLR state dicts save in one
  call and load back as the very tree: containers, key types and order, Python scalars
  as their types, arrays as NumPy;
* a property test over random trees (dict / list / tuple / NamedTuple, str and int keys
  including ``"/"``, ``"0"``, ``""``, ``"%"``, unicode) compares exactly, types included;
* a tree of str-keyed dicts of arrays keeps today's variable names, TensorFlow reads the
  arrays by their paths, and checkpoints without the structure tensor load as before;
* ``like=`` keeps like's container types and refuses a structure that differs, naming the path;
* bad trees are refused with a typed error naming the path before anything is written.
"""

from __future__ import annotations

import collections
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import gpusaver as gs
from gpusaver import tree as trees

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------- helpers
def assert_same(got: Any, want: Any, at: str = "tree") -> None:
    """Exact equality, types included (a NamedTuple may come back as a plain tuple); NaN equals NaN."""
    if isinstance(want, tuple) and hasattr(type(want), "_fields") and type(got) is tuple:
        want = tuple(want)
    if isinstance(want, collections.OrderedDict) and type(got) is dict:
        want = dict(want)
    if isinstance(want, torch.Tensor):
        assert isinstance(got, np.ndarray), (at, type(got))
        special = {torch.bfloat16: torch.int16}.get(want.dtype)
        ref = want.detach().view(special).numpy() if special else want.detach().numpy()
        assert got.shape == ref.shape and got.tobytes() == ref.tobytes(), at
        return
    assert type(got) is type(want), (at, type(got), type(want))
    if isinstance(want, dict):
        assert list(got) == list(want), (at, list(got), list(want))
        for k in want:
            assert type(next(g for g in got if g == k and type(g) is type(k))) is type(k)
            assert_same(got[k], want[k], f"{at}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), at
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{at}[{i}]")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, at
        if want.dtype == object:
            assert got.tolist() == want.tolist(), at
        else:
            assert got.tobytes() == want.tobytes(), at
    elif isinstance(want, np.generic):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), at
    elif isinstance(want, float):
        assert got == want or (math.isnan(got) and math.isnan(want)), at
        assert math.copysign(1, got) == math.copysign(1, want), at
    elif isinstance(want, complex):
        assert_same(got.real, want.real, at)
        assert_same(got.imag, want.imag, at)
    else:
        assert got == want, (at, got, want)


def _model_and_optimizer(step: bool) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if step:
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


# ------------------------------------------------------------------ real training state
@pytest.mark.parametrize("step", [False, True], ids=["before_any_step", "after_a_step"])
def test_a_torch_training_state_saves_in_one_call_and_comes_back_as_the_same_tree(tmp_path: Path, step: bool) -> None:
    model, opt, sched = _model_and_optimizer(step)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(), "step": 7}
    prefix = gs.save(state, tmp_path / "ckpt" / "s7")
    back = gs.load(prefix)
    assert_same(back, state)
    assert type(back["step"]) is int and back["step"] == 7
    if step:
        assert list(back["optim"]["state"]) == [0, 1, 2, 3]  # int keys, in order
        assert back["optim"]["state"][0]["step"].dtype == np.float32  # torch keeps step as a tensor
    else:
        assert back["optim"]["state"] == {}
    group = back["optim"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and type(group["betas"]) is tuple
    assert group["params"] == [0, 1, 2, 3] and group["foreach"] is None
    # TensorFlow's names: the model's arrays under their path, as a flat dict of them had
    names = {n for n, _ in gs.list_variables(prefix)}
    assert {f"model/{k}" for k in model.state_dict()} <= names
    # and back into a fresh model and optimizer, in place
    model2, opt2, sched2 = _model_and_optimizer(False)
    if step:  # AdamW has state only after a step: a like of the same structure
        model2(torch.randn(3, 4)).sum().backward()
        opt2.step()
    like = {"model": model2.state_dict(), "optim": opt2.state_dict(), "sched": sched2.state_dict(), "step": 0}
    out = gs.load(prefix, like=like)
    for k, t in model2.state_dict().items():
        assert torch.equal(t, model.state_dict()[k]), k
    assert out["step"] == 7 and type(out["model"]) is collections.OrderedDict
    opt2.load_state_dict(out["optim"])
    sched2.load_state_dict(out["sched"])
    assert sched2.state_dict() == sched.state_dict()
    if step:
        for p, q in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
            assert all(torch.equal(p[k], q[k]) for k in p)


def test_a_transformers_model_if_installed(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    state = {"model": model.state_dict(), "config": config.to_dict()}
    prefix = gs.save(state, tmp_path / "gpt2")  # GPT2 ties lm_head to wte: two tensors, one storage
    assert_same(gs.load(prefix)["model"], state["model"])


class Adam(NamedTuple):
    count: Any
    mu: Any
    nu: Any


def test_namedtuple_states_come_back_as_tuples_or_as_likes_class(tmp_path: Path) -> None:
    state = (Adam(np.int32(3), {"w": np.ones(2)}, {"w": np.zeros(2)}), ())
    prefix = gs.save({"opt": state}, tmp_path / "o")
    back = gs.load(prefix)
    assert type(back["opt"][0]) is tuple and type(back["opt"][1]) is tuple
    assert_same(back, {"opt": state})
    like = {"opt": (Adam(np.int32(0), {"w": np.zeros(2)}, {"w": np.ones(2)}), ())}
    out = gs.load(prefix, like=like)
    assert type(out["opt"][0]) is Adam and out["opt"][0].count == 3 and type(out["opt"][0].count) is np.int32
    assert out["opt"][0].mu["w"] is like["opt"][0].mu["w"] and like["opt"][0].mu["w"].tolist() == [1, 1]


def test_optax_states_if_installed(tmp_path: Path) -> None:
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    opt_state = optax.adamw(1e-3).init(params)
    prefix = gs.save({"params": params, "opt": opt_state}, tmp_path / "ox")
    out = gs.load(prefix, like={"params": params, "opt": opt_state})
    assert type(out["opt"]) is type(opt_state)


# --------------------------------------------------------------------- property test
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


class Point(NamedTuple):
    x: Any
    y: Any


_TRICKY = st.sampled_from(["/", "0", "", "%", "a/b", "%2F", "%i0", "_gpusaver", "_gpusaver/tree", "ü/ß", "日本"])
_STR_KEYS = st.one_of(_TRICKY, st.text(st.characters(blacklist_categories=("Cs",)), max_size=6))
_KEYS = st.one_of(_STR_KEYS, st.integers(-3, 2**70))
_DTYPES = [np.float32, np.float64, np.int8, np.uint64, np.bool_, np.complex64, np.float16]


def _small_array() -> Any:
    return st.builds(
        lambda dt, n, seed: np.random.default_rng(seed).integers(0, 100, size=n).astype(dt),
        st.sampled_from(_DTYPES), st.integers(0, 4), st.integers(0, 2**32 - 1),
    )


_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**100), 2**100), st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(allow_nan=True), st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
    st.binary(max_size=8), st.builds(np.float32, st.floats(width=32)), st.builds(np.int64, st.integers(-5, 5)),
    st.builds(np.bool_, st.booleans()), _small_array(),
)
_TREES = st.recursive(
    _LEAVES,
    lambda kids: st.one_of(
        st.dictionaries(_KEYS, kids, max_size=4),
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=3).map(tuple),
        st.builds(Point, kids, kids),
    ),
    max_leaves=12,
)


def _has_leaf(t: Any) -> bool:
    if isinstance(t, dict):
        return any(_has_leaf(v) for v in t.values())
    if isinstance(t, (list, tuple)):
        return any(_has_leaf(v) for v in t)
    return True


@settings(max_examples=int(os.environ.get("GPUSAVER_TREE_EXAMPLES", "60")), deadline=None)
@given(tree=st.one_of(st.dictionaries(_KEYS, _TREES, max_size=5), st.lists(_TREES, max_size=4)))
def test_random_trees_come_back_exactly(tmp_path_factory: Any, tree: Any) -> None:
    if not _has_leaf(tree):
        with pytest.raises(gs.InvalidArgumentError, match="no leaves"):
            gs.save(tree, str(tmp_path_factory.mktemp("e") / "c"))
        return
    prefix = gs.save(tree, str(tmp_path_factory.mktemp("t") / "c"))
    back = gs.load(prefix)
    assert_same(back, tree)
    names = [n for n, _ in gs.list_variables(prefix)]
    assert len(names) == len(set(names)) and trees.TREE_TENSOR in names
    assert not any(n.startswith("_gpusaver/") and n != trees.TREE_TENSOR for n in names)
    # and into a like of the same structure (its arrays in place)
    like = _zeros_like(tree)
    out = gs.load(prefix, like=like)
    assert_same(_plain(out), tree)


def _zeros_like(t: Any) -> Any:
    if isinstance(t, dict):
        return {k: _zeros_like(v) for k, v in t.items()}
    if isinstance(t, Point):
        return Point(*(_zeros_like(v) for v in t))
    if isinstance(t, (list, tuple)):
        return type(t)(_zeros_like(v) for v in t)
    if isinstance(t, np.ndarray):
        return np.zeros_like(t)
    if isinstance(t, np.generic):
        return type(t)(0)
    if isinstance(t, (bool, int, float, complex, str, bytes)):
        return type(t)()
    return t


def _plain(t: Any) -> Any:
    if isinstance(t, dict):
        return {k: _plain(v) for k, v in t.items()}
    if isinstance(t, tuple):
        return tuple(_plain(v) for v in t)
    if isinstance(t, list):
        return [_plain(v) for v in t]
    return t


# ------------------------------------------------------------------ names and escaping
def test_str_keyed_dicts_of_arrays_keep_todays_names(tmp_path: Path) -> None:
    tree = {"dense": {"w": np.ones((2, 2), np.float32), "b": np.zeros(2)}, "emb/table": np.arange(3)}
    prefix = gs.save(tree, tmp_path / "m")
    assert [n for n, _ in gs.list_variables(prefix)] == ["_gpusaver/tree", "dense/b", "dense/w", "emb/table"]
    assert sorted(gs.api.flatten(tree)) == ["dense/b", "dense/w", "emb/table"]
    assert_same(gs.load(prefix), tree)
    with gs.CheckpointReader(prefix) as r:
        assert r.get_tensor("dense/w").tolist() == [[1, 1], [1, 1]]


def test_keys_that_would_share_a_name_are_escaped(tmp_path: Path) -> None:
    tree = {"a": {"b": np.zeros(1)}, "a/b": np.ones(1), 0: np.full(1, 2.0), "0": np.full(1, 3.0),
            "": np.full(1, 4.0), "_gpusaver": {"tree": np.full(1, 5.0)}, "x": [np.full(1, 6.0)]}
    prefix = gs.save(tree, tmp_path / "k")
    names = sorted(n for n, _ in gs.list_variables(prefix))
    assert names == sorted(["a/b", "a%2Fb", "%i0", "0", "%00", "%5Fgpusaver/tree", "_gpusaver/tree", "x/0"])
    assert_same(gs.load(prefix), tree)
    assert trees._escaped("50%/x", True, True) == "50%25%2Fx" and trees._escaped(-3, False, True) == "%i-3"


def test_python_scalars_travel_in_the_structure_and_numpy_scalars_as_tensors(tmp_path: Path) -> None:
    tree = {"step": 7, "lr": 1e-3, "flag": True, "name": "adamw", "blob": b"\x00\xff", "big": -(2**200),
            "n": None, "z": 1 - 2j, "count": np.int64(5), "scale": np.float32(0.5), "long": "x" * 5000}
    prefix = gs.save(tree, tmp_path / "s")
    assert [n for n, _ in gs.list_variables(prefix)] == ["_gpusaver/tree", "count", "long", "scale"]
    assert_same(gs.load(prefix), tree)
    # a like of other scalar types converts as a tensor would: exactly, or refused
    out = gs.load(prefix, like={**tree, "step": 0.0, "lr": np.float64(0), "count": 0}, cast=True)
    assert out["step"] == 7.0 and type(out["step"]) is float and type(out["lr"]) is np.float64
    with pytest.raises(gs.DTypeMismatchError):
        gs.load(prefix, like={**tree, "lr": 0})  # a float into an int needs cast=True
    with pytest.raises(gs.DTypeMismatchError):
        gs.load(prefix, like={**tree, "name": 0})
    step = np.zeros((), np.int64)
    gs.load(prefix, like={**tree, "step": step})  # into a 0-d array, in place
    assert step == 7


def test_tensorflow_reads_a_tree_checkpoint_and_sees_the_arrays_by_their_paths(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    model, opt, _ = _model_and_optimizer(True)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 7}
    prefix = gs.save(state, tmp_path / "tf")
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    for name, t in model.state_dict().items():
        assert np.array_equal(reader.get_tensor(f"model/{name}"), t.numpy()), name
    assert np.array_equal(reader.get_tensor("optim/state/0/exp_avg"), opt.state_dict()["state"][0]["exp_avg"].numpy())
    assert shapes[trees.TREE_TENSOR] == [len(reader.get_tensor(trees.TREE_TENSOR))]
    spec = trees.parse_spec(reader.get_tensor(trees.TREE_TENSOR), prefix)
    assert spec["format"] == "gpusaver.tree" and spec["version"] == 1


def test_a_checkpoint_without_the_structure_loads_as_before(tmp_path: Path) -> None:
    prefix = gs.Saver({"a/b": np.ones(2), "c": np.zeros(1)}).save(str(tmp_path / "old"))
    back = gs.load(prefix)
    assert list(back) == ["a/b", "c"] and back["a/b"].tolist() == [1, 1]
    like = {"a": {"b": np.zeros(2)}, "c": np.ones(1)}
    gs.load(prefix, like=like)
    assert like["a"]["b"].tolist() == [1, 1] and like["c"].tolist() == [0]


def test_readers_see_the_structure_tensor_as_one_more_variable(tmp_path: Path) -> None:
    prefix = gs.save({"w": np.ones(3, np.float32), "opt": {0: {"m": np.zeros(3, np.float32)}}, "step": 1}, tmp_path / "r")
    with gs.CheckpointReader(prefix) as r:
        assert sorted(r.get_variable_to_shape_map()) == ["_gpusaver/tree", "opt/0/m", "w"]
        assert r.get_variable_to_dtype_map()[trees.TREE_TENSOR] == np.uint8
    w = np.zeros(3, np.float32)
    gs.Saver({"w": w}).restore(prefix)
    assert w.tolist() == [1, 1, 1]


def test_a_damaged_or_newer_structure_is_a_typed_error(tmp_path: Path) -> None:
    newer = {"format": "gpusaver.tree", "version": 2, "nodes": []}
    prefix = gs.Saver({trees.TREE_TENSOR: trees.spec_tensor(newer), "w": np.ones(1)}).save(str(tmp_path / "n"))
    with pytest.raises(gs.UnsupportedVersionError, match="version 2"):
        gs.load(prefix)
    bad = gs.Saver({trees.TREE_TENSOR: np.frombuffer(b"{not json", np.uint8)}).save(str(tmp_path / "b"))
    with pytest.raises(gs.CorruptCheckpointError, match="_gpusaver/tree"):
        gs.load(bad)
    wrong = {"format": "gpusaver.tree", "version": 1, "nodes": [["d", ["a"], "q"]], "names": {}, "values": {}}
    worse = gs.Saver({trees.TREE_TENSOR: trees.spec_tensor(wrong)}).save(str(tmp_path / "w"))
    with pytest.raises(gs.CorruptCheckpointError):
        gs.load(worse)


# ---------------------------------------------------------------------------- like=
def test_like_keeps_its_own_container_types(tmp_path: Path) -> None:
    tree = {"a": {"x": np.ones(2)}, "b": [np.zeros(1), 3], "c": {"k": 1}}
    prefix = gs.save(tree, tmp_path / "l")

    class MyDict(dict):
        pass

    class Frozen(collections.abc.Mapping):  # a Mapping that is no dict: rebuilt through type(like)(pairs)
        def __init__(self, pairs: Any = ()) -> None:
            self._d = dict(pairs)

        def __getitem__(self, k: Any) -> Any:
            return self._d[k]

        def __iter__(self) -> Any:
            return iter(self._d)

        def __len__(self) -> int:
            return len(self._d)

    like = collections.OrderedDict(a=MyDict(x=np.zeros(2)), b=(np.ones(1), 0),
                                   c=collections.defaultdict(list, k=0))
    out = gs.load(prefix, like=like)
    assert type(out) is collections.OrderedDict and type(out["a"]) is MyDict and type(out["b"]) is tuple
    assert type(out["c"]) is collections.defaultdict and out["c"].default_factory is list and out["c"]["k"] == 1
    out2 = gs.load(prefix, like={"a": Frozen({"x": np.zeros(2)}), "b": [np.ones(1), 0], "c": {"k": 0}})
    assert type(out2["a"]) is Frozen and out2["a"]["x"].tolist() == [1, 1]


def test_flax_containers_if_installed(tmp_path: Path) -> None:
    flax = pytest.importorskip("flax")
    from flax.core import FrozenDict

    prefix = gs.save({"params": {"w": np.ones(2)}}, tmp_path / "f")
    out = gs.load(prefix, like=FrozenDict({"params": {"w": np.zeros(2)}}))
    assert isinstance(out, FrozenDict)


@pytest.mark.parametrize(
    "like, error, match",
    [
        ({"a": [np.zeros(1)], "b": {"c": 0}}, gs.InvalidArgumentError, r"list of 1 at \['a'\].* 2 entries"),
        ({"a": {"0": np.zeros(1), "1": np.zeros(1)}, "b": {"c": 0}}, gs.InvalidArgumentError, r"dict at \['a'\]"),
        ({"a": [np.zeros(1), np.zeros(1)], "b": 0}, gs.InvalidArgumentError, r"leaf at \['b'\].*container"),
        ({"a": [np.zeros(1), np.zeros(1)], "b": {"c": 0, "d": 0}}, gs.TensorNotFoundError, r"\['b'\]\['d'\]"),
        ({"a": [np.zeros(1), np.zeros(1)], "b": {}}, gs.InvalidArgumentError, r"also holds \['b'\]\['c'\]"),
    ],
    ids=["shorter_list", "dict_for_list", "leaf_for_dict", "missing_key", "extra_key"],
)
def test_a_like_of_another_structure_is_refused_naming_the_path(tmp_path: Path, like: Any, error: type,
                                                                   match: str) -> None:
    prefix = gs.save({"a": [np.ones(1), np.ones(1)], "b": {"c": 5}}, tmp_path / "s")
    first = like["a"][0] if isinstance(like["a"], list) else like["a"]["0"]
    with pytest.raises(error, match=match):
        gs.load(prefix, like=like)
    assert first.tolist() == [0.0], "a refused load changed an array"


def test_not_strict_restores_a_part(tmp_path: Path) -> None:
    prefix = gs.save({"model": {"w": np.ones(2)}, "optim": {"m": np.ones(2)}, "step": 3}, tmp_path / "p")
    like = {"model": {"w": np.zeros(2)}, "new": np.full(1, 9.0)}
    out = gs.load(prefix, like=like, strict=False)
    assert like["model"]["w"].tolist() == [1, 1] and out["new"].tolist() == [9.0]


# ----------------------------------------------------------------------- bad input
def _cycle() -> Any:
    d: dict[str, Any] = {"a": np.ones(1)}
    d["self"] = [d]
    return d


@pytest.mark.parametrize(
    "tree, error, match",
    [
        (_cycle(), gs.InvalidArgumentError, r"holds itself: \['self'\]\[0\]"),
        ({"a": {1.5: np.ones(1)}}, gs.InvalidArgumentTypeError, r"1.5 \(float\) under \['a'\]"),
        ({"a": [{("t", 1): 1}]}, gs.InvalidArgumentTypeError, r"under \['a'\]\[0\]"),
        ({"a": {True: 1}}, gs.InvalidArgumentTypeError, r"\(bool\)"),
        ({"ok": np.ones(1), "a": {"b": np.zeros(2, dtype=[("x", "i4")])}}, gs.UnsupportedDTypeError, "a/b"),
        ({"ok": np.ones(1), "a": [object()]}, gs.InvalidArgumentTypeError, r"\['a'\]\[0\] is a builtins.object"),
        ({"a": {}}, gs.InvalidArgumentError, "no leaves"),
        (np.ones(3), gs.InvalidArgumentTypeError, "a tree is a dict, list or tuple"),
    ],
    ids=["cycle", "float_key", "tuple_key", "bool_key", "structured_dtype", "object", "no_leaves", "bare_array"],
)
def test_a_bad_tree_is_refused_before_anything_is_written(tmp_path: Path, tree: Any, error: type, match: str) -> None:
    target = tmp_path / "new_dir" / "ckpt"
    with pytest.raises(error, match=match):
        gs.save(tree, target)
    assert not (tmp_path / "new_dir").exists(), "a refused save created its directory"
    old = gs.save({"keep": np.ones(1)}, tmp_path / "old")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error):
        gs.save(tree, old)
    assert sorted(os.listdir(tmp_path)) == before and gs.load(old)["keep"].tolist() == [1.0]


def test_deep_nesting_has_no_recursion_limit(tmp_path: Path) -> None:
    deep: Any = np.ones(1)
    for i in range(3000):
        deep = {"d": deep} if i % 2 else [deep]
    prefix = gs.save({"root": deep}, tmp_path / "deep")
    back = gs.load(prefix)
    node = back["root"]
    for i in reversed(range(3000)):
        node = node["d"] if i % 2 else node[0]
    assert node.tolist() == [1.0]


# ------------------------------------------------------------------- other readers
def _tree_checkpoint(tmp_path: Path) -> str:
    return gs.save({"w": np.ones(3, np.float32), "optim": {"state": {0: {"m": np.zeros(3, np.float32)}}}, "step": 7},
                   tmp_path / "ck")


@pytest.mark.parametrize("command", ["inspect", "verify", "diff"])
def test_the_cli_reads_a_tree_checkpoint(tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from gpusaver.cli import main

    prefix = _tree_checkpoint(tmp_path)
    argv = [command, prefix] + ([prefix] if command == "diff" else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    if command == "inspect":
        assert "optim/state/0/m" in out and "w" in out


def test_convert_to_safetensors_does_not_crash_on_the_structure_tensor(tmp_path: Path) -> None:
    from gpusaver.convert import to_safetensors

    prefix = _tree_checkpoint(tmp_path)
    to_safetensors(prefix, tmp_path / "out.safetensors")
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "out.safetensors"))
    assert tensors["w"].tolist() == [1, 1, 1] and "optim/state/0/m" in tensors


def test_convert_to_safetensors_leaves_the_structure_tensor_out(tmp_path: Path) -> None:
    from gpusaver.convert import to_safetensors
    from safetensors.numpy import load_file

    prefix = _tree_checkpoint(tmp_path)
    to_safetensors(prefix, tmp_path / "out.safetensors")
    assert trees.TREE_TENSOR not in load_file(str(tmp_path / "out.safetensors"))
