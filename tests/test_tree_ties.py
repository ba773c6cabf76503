"""``gs.save`` stores one tensor under several paths of the tree once (tied weights).

Two leaves that are the same object, or views of the same memory with the same shape, strides and
dtype (GPT-2's ``transformer.wte.weight`` and ``lm_head.weight`` in a ``state_dict()``), are one
variable: TensorFlow's reader sees one; the structure names that variable for the second leaf.
``gs.load`` gives them back as one array; ``load(like=...)`` and ``load_into`` write it once where
the target's leaves are one tensor too, and into each where they are not. Views that overlap without
being the same view are saved as they are, each its own variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gpusaver as gs
from gpusaver import tree as trees
from gpusaver.api import load_into
from gpusaver.checkpoint_reader import CheckpointReader

import tiny_models  # noqa: E402

torch = pytest.importorskip("torch")

WTE, HEAD = "model/transformer.wte.weight", "model/lm_head.weight"


_gpt2 = tiny_models.gpt2


def _spec(prefix: str) -> dict[str, Any]:
    with CheckpointReader(prefix) as reader:
        return trees.parse_spec(reader.get_tensor(trees.TREE_TENSOR), prefix)


@pytest.mark.parametrize("as_module", [True, False], ids=["module", "state_dict"])
def test_gpt2s_tied_embedding_and_head_are_one_variable(tmp_path: Path, tf: Any, as_module: bool) -> None:
    model = _gpt2(0)
    sd = model.state_dict()
    assert sd[HEAD[6:]] is not sd[WTE[6:]] and sd[HEAD[6:]].data_ptr() == sd[WTE[6:]].data_ptr()
    prefix = gs.save({"model": model if as_module else sd}, tmp_path / "gpt2")
    names = [n for n, _ in gs.list_variables(prefix)]
    assert WTE in names and HEAD not in names
    assert len(names) == len(sd)  # every other tensor, plus the structure, minus the tie
    reader = tf.train.load_checkpoint(prefix)
    seen = reader.get_variable_to_shape_map()
    assert WTE in seen and HEAD not in seen
    np.testing.assert_array_equal(reader.get_tensor(WTE), sd[WTE[6:]].numpy())
    spec = _spec(prefix)
    assert spec["version"] == 1 and list(spec["names"].values()) == [WTE]  # the head names wte's variable


def test_load_gives_the_tie_back_as_one_array(tmp_path: Path) -> None:
    model = _gpt2(0)
    prefix = gs.save({"model": model.state_dict()}, tmp_path / "gpt2")
    for framework in ("numpy", "torch"):
        back = gs.load(prefix, framework=framework)["model"]
        assert back[HEAD[6:]] is back[WTE[6:]], framework
        assert torch.equal(torch.as_tensor(back[HEAD[6:]]), model.lm_head.weight.detach())


def test_load_into_a_fresh_gpt2_restores_it_tied(tmp_path: Path) -> None:
    model = _gpt2(0)
    prefix = gs.save({"model": model, "step": 3}, tmp_path / "gpt2")
    other = _gpt2(1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    target = {"model": other, "step": 0}
    assert load_into(target, prefix) == ([], [])
    assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()  # still tied
    assert other.lm_head.weight is other.transformer.wte.weight
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)


def test_a_like_whose_leaves_are_not_tied_gets_the_value_in_each(tmp_path: Path) -> None:
    model = _gpt2(0)
    prefix = gs.save({"model": model.state_dict()}, tmp_path / "gpt2")
    like = {"model": {k: v.clone() for k, v in _gpt2(2).state_dict().items()}}
    assert like["model"][HEAD[6:]].data_ptr() != like["model"][WTE[6:]].data_ptr()
    gs.load(prefix, like=like)
    want = model.lm_head.weight.detach()
    assert torch.equal(like["model"][HEAD[6:]], want) and torch.equal(like["model"][WTE[6:]], want)


def test_a_numpy_array_and_torch_from_numpy_of_it_are_one_tensor(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    prefix = gs.save({"np": a, "torch": torch.from_numpy(a), "copy": a.copy(), "t": a.T}, tmp_path / "c")
    assert sorted(n for n, _ in gs.list_variables(prefix)) == ["_gpusaver/tree", "copy", "np", "t"]
    back = gs.load(prefix)
    assert back["torch"] is back["np"] and back["copy"] is not back["np"]
    assert back["t"].shape == (3, 2)


def test_ties_and_escaped_names_together(tmp_path: Path) -> None:
    x, y = np.arange(3.0), np.ones(2)
    tree = {"a": {"b": x}, "a/b": y, "c": x, "": [x, y]}
    prefix = gs.save(tree, tmp_path / "c")
    back = gs.load(prefix)
    assert back["c"] is back["a"]["b"] and back[""][0] is back["c"] and back[""][1] is back["a/b"]
    np.testing.assert_array_equal(back["a"]["b"], x)
    np.testing.assert_array_equal(back["a/b"], y)
    assert len(gs.list_variables(prefix)) == 3  # x, y and the structure


# ------------------------------------------------------------------------------- property
# A leaf: (buffer index, view) where the view is one of these; 'copy' is a fresh array.
VIEWS = {
    "same": lambda b: b,  # the very object
    "whole": lambda b: b[...],  # another object, the same view
    "reshaped_back": lambda b: b.reshape(-1).reshape(b.shape),  # another object, the same view
    "tail": lambda b: b[1:],  # overlaps, another view
    "stride": lambda b: b[::2],
    "T": lambda b: b.T,
    "copy": lambda b: b.copy(),
}


@st.composite
def tied_trees(draw: Any) -> tuple[list[np.ndarray], Any]:
    n = draw(st.integers(1, 3))
    buffers = [np.arange(draw(st.integers(2, 6)) * 2, dtype=np.float64).reshape(-1, 2) * (i + 1) for i in range(n)]
    leaves = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(sorted(VIEWS))), min_size=1, max_size=8))
    values = [VIEWS[v](buffers[i]) for i, v in leaves]
    shape = draw(st.sampled_from(["dict", "nested", "list"]))
    if shape == "dict":
        tree: Any = {f"k{j}": v for j, v in enumerate(values)}
    elif shape == "list":
        tree = list(values)
    else:
        tree = {"a": values[: len(values) // 2], "b": {str(j): v for j, v in enumerate(values[len(values) // 2:])}}
    return buffers, tree


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=tied_trees())
def test_identical_views_are_one_variable_and_overlapping_ones_their_own(tmp_path_factory: Any, case: Any) -> None:
    _, tree = case
    prefix = gs.save(tree, tmp_path_factory.mktemp("t") / "c")
    leaves = _leaves(tree)
    keys = [trees.tie_key(v) for v in leaves]
    assert len(gs.list_variables(prefix)) == len(set(keys)) + 1  # one per distinct view, and the structure
    back = _leaves(gs.load(prefix))
    for i, (got, want) in enumerate(zip(back, leaves)):
        np.testing.assert_array_equal(got, want)
        for j in range(i):
            assert (got is back[j]) == (keys[i] == keys[j]), (i, j)  # tied again exactly where they were
    # into a tree of the same views of fresh buffers (ties where the saved tree had them) ...
    # (written once per tie; a restore into views that overlap otherwise is refused, changing nothing)
    fresh_buffers = [np.zeros_like(b) for b in case[0]]
    like = _rebuild_like(tree, case[0], fresh_buffers)
    firsts = {k: v for k, v in reversed(list(zip(keys, leaves)))}
    overlapping = any(np.shares_memory(a, b) for i, a in enumerate(firsts.values())
                      for b in list(firsts.values())[:i])
    if overlapping:
        with pytest.raises(gs.InvalidArgumentError, match="share memory"):
            gs.load(prefix, like=like)
        assert all((f == 0).all() for f in fresh_buffers)
    else:
        gs.load(prefix, like=like)
        for got, want in zip(_leaves(like), leaves):
            np.testing.assert_array_equal(got, want)
    # ... and into a tree of independent arrays, which each get their value
    independent = _map(tree, lambda v: np.zeros_like(v))
    gs.load(prefix, like=independent)
    for got, want in zip(_leaves(independent), leaves):
        np.testing.assert_array_equal(got, want)


def _map(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    return fn(tree)


def _rebuild_like(tree: Any, buffers: list[np.ndarray], fresh: list[np.ndarray]) -> Any:
    """``tree`` with each view of a saved buffer made again over a fresh one (copies stay copies)."""

    def remake(v: np.ndarray) -> np.ndarray:
        for b, f in zip(buffers, fresh):
            if v.base is not None and np.shares_memory(v, b) or v is b:
                if v is b:
                    return f
                offset = v.__array_interface__["data"][0] - b.__array_interface__["data"][0]
                return np.lib.stride_tricks.as_strided(f.reshape(-1)[offset // b.itemsize:], v.shape, v.strides,
                                                       writeable=True)
        return np.zeros_like(v)

    return _map(tree, remake)
