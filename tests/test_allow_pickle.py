"""Objects that are not data (issue #23, item 2): refused, unless the caller opts in on save AND on load.

``gs.save`` refuses an ``argparse.Namespace`` or an instance of the caller's own class with a
typed error naming its path and type; ``allow_pickle=True`` stores it pickled. ``gs.load``
never unpickles without ``allow_pickle=True``: a checkpoint holding pickles is refused, naming
the paths, before anything is unpickled (an object whose ``__reduce__`` would write a marker
file proves it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpusaver as gs

MARKER_ENV = "GPUSAVER_TEST_PICKLE_MARKER"


def _write_marker(path: str) -> str:
    with open(path, "w") as f:
        f.write("unpickled")
    return "ran"


class Booby:
    """Unpickling it writes a marker file (as a hostile pickle could run anything)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (_write_marker, (self.marker,))


class Config:
    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and other.depth == self.depth


@pytest.mark.parametrize("obj", [argparse.Namespace(lr=0.1), Config(3)], ids=["namespace", "own_class"])
def test_an_object_that_is_not_data_is_refused_naming_its_path_and_type(tmp_path: Path, obj: Any) -> None:
    with pytest.raises(gs.InvalidArgumentTypeError, match=rf"\['run'\]\['args'\] is a .*{type(obj).__qualname__}.*allow_pickle"):
        gs.save({"w": np.ones(2), "run": {"args": obj}}, tmp_path / "d" / "c")
    assert not (tmp_path / "d").exists()


def test_with_allow_pickle_on_both_sides_it_comes_back(tmp_path: Path) -> None:
    tree = {"w": np.ones(2), "args": argparse.Namespace(lr=0.1, name="x"), "cfg": [Config(3)]}
    prefix = gs.save(tree, tmp_path / "p", allow_pickle=True)
    back = gs.load(prefix, allow_pickle=True)
    assert back["args"] == tree["args"] and back["cfg"] == [Config(3)] and back["w"].tolist() == [1, 1]
    like = {"w": np.zeros(2), "args": None, "cfg": [Config(0)]}
    out = gs.load(prefix, like=like, allow_pickle=True)
    assert out["args"] == tree["args"] and out["cfg"][0] == Config(3) and like["w"].tolist() == [1, 1]


def test_loading_never_unpickles_without_allow_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    prefix = gs.save({"w": np.ones(2), "a": {"b": Booby(str(marker))}, "c": [Booby(str(marker))]},
                     tmp_path / "p", allow_pickle=True)
    assert not marker.exists(), "saving ran the object's reduce target"
    w = np.zeros(2)
    for call in (lambda: gs.load(prefix), lambda: gs.load(prefix, like={"w": w, "a": {"b": None}, "c": [None]}),
                 lambda: gs.load(prefix, framework="torch")):
        with pytest.raises(gs.InvalidArgumentError, match=r"pickled objects at \['a'\]\['b'\], \['c'\]\[0\].*allow_pickle=True"):
            call()
        assert not marker.exists(), "a load without allow_pickle unpickled something"
    assert w.tolist() == [0, 0], "a refused load changed an array"
    # the arrays stay readable without unpickling anything
    with gs.CheckpointReader(prefix) as r:
        assert r.get_tensor("w").tolist() == [1, 1]
    # with the word, it runs: the caller asked for it
    assert gs.load(prefix, allow_pickle=True)["a"]["b"] == "ran" and marker.read_text() == "unpickled"


def test_allow_pickle_on_save_alone_changes_nothing_for_data(tmp_path: Path) -> None:
    prefix = gs.save({"w": np.ones(2), "step": 3}, tmp_path / "d", allow_pickle=True)
    assert gs.load(prefix)["step"] == 3  # no pickles in it: no allow_pickle needed


def test_the_docstrings_say_why() -> None:
    for fn in (gs.save, gs.load):
        assert "allow_pickle" in fn.__doc__ and "runs code" in fn.__doc__
