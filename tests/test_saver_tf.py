"""The Saver against TensorFlow itself: TF reads what we save, we continue what TF saved.

* ``tf.train.load_checkpoint`` / ``list_variables`` read our sharded and
  unsharded checkpoints; ``tf.train.latest_checkpoint`` and
  ``get_checkpoint_state`` read our ``checkpoint`` files (absolute and relative).
* The same sequence of saves through TF's graph-mode ``tf.compat.v1.train.Saver``
  (sharded over two CPUs) and through ours gives the same file names, the same
  state file bytes and the same retention (``max_to_keep``,
  ``keep_checkpoint_every_n_hours``, ``pad_step_number``, relative paths).
* We restore, in place, what TF's sharded Saver wrote, adopt its checkpoints,
  keep saving into its directory, and TF follows (and restores ours).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np
import pytest
import tensorflow as tf

import gpusaver as gs
from gpusaver.format import BundleWriter

# Every test runs on both host paths: the C extension and its pure-Python twin.
pytestmark = [pytest.mark.tf, pytest.mark.usefixtures("host_path")]


def _saver_test_helpers() -> ModuleType:
    """tests/test_saver.py, loaded by path under a name of its own, for its helpers."""
    name = "gpusaver_test_saver_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("test_saver.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_helpers = _saver_test_helpers()
Clock = _helpers.Clock
assert_bit_equal = _helpers.assert_bit_equal
expected_data_files = _helpers.expected_data_files
listing = _helpers.listing
on_cpus = _helpers.on_cpus
sample_arrays = _helpers.sample_arrays
snapshot = _helpers.snapshot


def _two_logical_cpus() -> None:
    """Splits the host CPU into /cpu:0 and /cpu:1 while the TF runtime is not yet started.

    Graph-mode sessions below also ask for two CPUs in their ConfigProto, so the
    tests do not depend on this module being imported before other TF use.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
        )
    except RuntimeError:  # the runtime was already initialised by another test module
        pass


_two_logical_cpus()

SESSION_CONFIG = tf.compat.v1.ConfigProto(device_count={"CPU": 2}, allow_soft_placement=False)


def tf_value(value: Any) -> np.ndarray:
    """TensorFlow's reader returns bytes scalars as Python bytes; make everything an array."""
    if isinstance(value, bytes):
        return np.array(value, dtype=object)
    return np.asarray(value)


# ------------------------------------------------------------ TF reads our files


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("n_devices", [1, 2, 4])
def test_tf_reads_our_checkpoint(n_devices: int, sharded: bool, tmp_path: Path) -> None:
    host = sample_arrays(np)
    expected = {k: snapshot(v) for k, v in host.items()}
    saver = gs.Saver(on_cpus(host, n_devices), sharded=sharded)
    prefix = saver.save(str(tmp_path / "model"), global_step=3)
    n = n_devices if sharded else 1
    assert sorted(p for p in listing(tmp_path) if ".data-" in p) == expected_data_files("model-3", n)

    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    assert sorted(shapes) == sorted(expected)
    for name, want in expected.items():
        assert list(shapes[name]) == list(want.shape), name
        assert_bit_equal(tf_value(reader.get_tensor(name)), want, name)
    assert [(k, list(s)) for k, s in tf.train.list_variables(prefix)] == gs.list_variables(prefix)
    # Through the directory and our state file, too.
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefix
    assert sorted(tf.train.load_checkpoint(str(tmp_path)).get_variable_to_shape_map()) == sorted(expected)


def test_tf_reads_our_state_file_with_absolute_paths(tmp_path: Path) -> None:
    saver = gs.Saver(on_cpus({"a": np.zeros(2), "b": np.ones(3)}, 2), sharded=True, max_to_keep=2)
    saved = [saver.save(str(tmp_path / "m"), global_step=s) for s in (1, 2, 3)]
    assert tf.train.latest_checkpoint(str(tmp_path)) == saved[-1]
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == saved[-1]
    assert list(state.all_model_checkpoint_paths) == saved[-2:] == saver.last_checkpoints


def test_tf_reads_our_state_file_with_relative_paths(tmp_path: Path) -> None:
    saver = gs.Saver(on_cpus({"a": np.zeros(2), "b": np.ones(3)}, 2), sharded=True, save_relative_paths=True)
    saved = [saver.save(str(tmp_path / "m"), global_step=s) for s in (1, 2)]
    assert (tmp_path / "checkpoint").read_text().startswith('model_checkpoint_path: "m-2"\n')
    assert tf.train.latest_checkpoint(str(tmp_path)) == saved[-1]
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_paths) == saved


def test_tf_reads_our_state_file_for_a_relative_save_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("ckpt")
    saver = gs.Saver({"a": np.arange(4.0)})
    saver.save("ckpt/m", global_step=1)
    assert tf.train.latest_checkpoint("ckpt") == os.path.join("ckpt", "m-1")
    assert tf.train.get_checkpoint_state("ckpt").model_checkpoint_path == os.path.join("ckpt", "m-1")


def test_tf_reads_our_state_file_with_a_custom_name(tmp_path: Path) -> None:
    saver = gs.Saver({"a": np.arange(4.0)})
    prefix = saver.save(str(tmp_path / "m"), latest_filename="my_state")
    assert tf.train.latest_checkpoint(str(tmp_path), latest_filename="my_state") == prefix
    assert tf.train.latest_checkpoint(str(tmp_path)) is None


# ------------------------------------------------ the same saves through TF and us

DEVICES = {"dense/w": 0, "dense/b": 1, "emb": 0, "step": 1}


def values_at(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "dense/w": rng.standard_normal((4, 3)).astype(np.float32),
        "dense/b": rng.standard_normal(3).astype(np.float32),
        "emb": rng.standard_normal((5, 2)).astype(np.float64),
        "step": np.array(step, np.int64),
    }


@contextlib.contextmanager
def tf_sharded_saver(**saver_kwargs: Any) -> Iterator[tuple[Any, Any, dict[str, Any]]]:
    """A graph-mode TF1 Saver(sharded=True) over variables on /cpu:0 and /cpu:1, and its session."""
    graph = tf.Graph()
    initial = values_at(0)
    with graph.as_default():
        variables = {}
        for name, value in initial.items():
            with graph.device(f"/cpu:{DEVICES[name]}"):
                variables[name] = tf.compat.v1.Variable(value, name=name.replace("/", "_"))
        saver = tf.compat.v1.train.Saver(variables, sharded=True, **saver_kwargs)
        init = tf.compat.v1.global_variables_initializer()
    with tf.compat.v1.Session(graph=graph, config=SESSION_CONFIG) as sess:
        sess.run(init)
        yield sess, saver, variables


def our_sharded_saver(**saver_kwargs: Any) -> tuple[gs.Saver, dict[str, np.ndarray]]:
    arrays = {k: np.array(v, copy=True) for k, v in values_at(0).items()}
    variables = [gs.Variable(arrays[k], k, device=f"/cpu:{DEVICES[k]}") for k in arrays]
    return gs.Saver(variables, sharded=True, **saver_kwargs), arrays


# (save name, global step or None, hours to advance the clock before it)
SEQUENCE = [
    ("m", 1, 0.0),
    ("m", 2, 0.0),
    ("m", 3, 2.5),
    ("m", 4, 0.0),
    ("m", 4, 0.0),  # the same step again
    ("n", None, 0.0),  # no step
    ("m", 5, 0.0),
    ("m", 6, 3.0),
    ("m", 7, 0.0),
    ("m", 8, 0.0),
]

CONFIGS = [
    {"max_to_keep": 2},
    {"max_to_keep": 1},
    {"max_to_keep": None},
    {"max_to_keep": 0},
    {"max_to_keep": 3, "pad_step_number": True},
    {"max_to_keep": 2, "save_relative_paths": True},
    {"max_to_keep": 2, "keep_checkpoint_every_n_hours": 2.0},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_same_files_state_and_retention_as_tf_saver(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    theirs_dir, ours_dir = tmp_path / "tf", tmp_path / "ours"
    theirs_dir.mkdir()
    ours_dir.mkdir()
    ours, arrays = our_sharded_saver(**config)
    with tf_sharded_saver(**config) as (sess, theirs, tf_vars):
        for name, step, hours in SEQUENCE:
            clock.advance(hours)
            values = values_at(step or 99)
            for key, value in values.items():
                tf_vars[key].load(value, sess)
                arrays[key][...] = value
            tf_path = theirs.save(sess, str(theirs_dir / name), global_step=step, write_meta_graph=False)
            our_path = ours.save(str(ours_dir / name), global_step=step)
            where = f"after saving {name} step {step}"
            assert os.path.relpath(our_path, ours_dir) == os.path.relpath(tf_path, theirs_dir), where
            assert [os.path.relpath(p, ours_dir) for p in ours.last_checkpoints] == [
                os.path.relpath(p, theirs_dir) for p in theirs.last_checkpoints
            ], where
            assert listing(ours_dir) == listing(theirs_dir), where
            tf_state = (theirs_dir / "checkpoint").read_text().replace(str(theirs_dir), "<dir>")
            our_state = (ours_dir / "checkpoint").read_text().replace(str(ours_dir), "<dir>")
            assert our_state == tf_state, where
    # The files hold the same tensors, as TF reads them.
    latest = tf.train.latest_checkpoint(str(ours_dir))
    tf_latest = tf.train.latest_checkpoint(str(theirs_dir))
    assert latest is not None and os.path.basename(latest) == os.path.basename(tf_latest)
    ours_reader = tf.train.load_checkpoint(latest)
    theirs_reader = tf.train.load_checkpoint(str(theirs_dir))
    for key in values_at(0):
        assert_bit_equal(tf_value(ours_reader.get_tensor(key)), tf_value(theirs_reader.get_tensor(key)), key)


# ------------------------------------------------------- continuing TF's checkpoints


def test_we_restore_and_continue_what_tf_sharded_saver_wrote(tmp_path: Path) -> None:
    with tf_sharded_saver(max_to_keep=2) as (sess, theirs, tf_vars):
        for step in (1, 2, 3, 4):
            for key, value in values_at(step).items():
                tf_vars[key].load(value, sess)
            theirs.save(sess, str(tmp_path / "model"), global_step=step, write_meta_graph=False)
        assert listing(tmp_path) == sorted(
            [
                "checkpoint",
                "model-3.index",
                "model-4.index",
                *expected_data_files("model-3", 2),
                *expected_data_files("model-4", 2),
            ]
        )

        # Our Saver over arrays that hold something else, on the same two devices.
        ours, arrays = our_sharded_saver(max_to_keep=2)
        for arr in arrays.values():
            arr[...] = 0
        identities = {k: id(v) for k, v in ours.variables.items()}
        state = gs.get_checkpoint_state(str(tmp_path))
        assert state is not None
        ours.recover_last_checkpoints(list(state.all_model_checkpoint_paths))
        assert ours.last_checkpoints == [str(tmp_path / "model-3"), str(tmp_path / "model-4")]
        latest = gs.latest_checkpoint(str(tmp_path))
        assert latest == tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-4")
        ours.restore(latest)
        for key, want in values_at(4).items():
            assert id(ours.variables[key]) == identities[key]
            assert_bit_equal(arrays[key], want, key)

        # Keep training and saving into TF's directory: TF follows, and retention
        # drops TF's model-3 (adopted above) as TF's own Saver would have.
        for key, value in values_at(5).items():
            arrays[key][...] = value
        p5 = ours.save(str(tmp_path / "model"), global_step=5)
        assert tf.train.latest_checkpoint(str(tmp_path)) == p5
        tf_state = tf.train.get_checkpoint_state(str(tmp_path))
        assert list(tf_state.all_model_checkpoint_paths) == [str(tmp_path / "model-4"), p5]
        assert not tf.compat.v1.train.checkpoint_exists(str(tmp_path / "model-3"))
        reader = tf.train.load_checkpoint(str(tmp_path))
        for key, want in values_at(5).items():
            assert_bit_equal(tf_value(reader.get_tensor(key)), want, key)

        # TF's Saver restores our checkpoint into its own graph.
        theirs.restore(sess, p5)
        for key, want in values_at(5).items():
            assert_bit_equal(tf_value(sess.run(tf_vars[key])), want, key)


def test_we_restore_a_partitioned_variable_from_tf_sharded_saver(tmp_path: Path) -> None:
    full = np.arange(40, dtype=np.float32).reshape(10, 4) / 7
    other = np.arange(6, dtype=np.int64)
    graph = tf.Graph()
    with graph.as_default():

        def place_part(op: Any) -> str:
            return "/cpu:1" if "part_1" in op.name else "/cpu:0"

        def init(shape: Any, dtype: Any = None, partition_info: Any = None) -> Any:
            offset = partition_info.var_offset if partition_info else [0] * len(shape)
            return tf.constant(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])

        with graph.device(place_part):
            tf.compat.v1.get_variable(
                "pv",
                shape=full.shape,
                dtype=tf.float32,
                initializer=init,
                partitioner=tf.compat.v1.fixed_size_partitioner(2),
            )
        with graph.device("/cpu:1"):
            tf.compat.v1.Variable(other, name="other")
        saver = tf.compat.v1.train.Saver(sharded=True)
        with tf.compat.v1.Session(graph=graph, config=SESSION_CONFIG) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(sess, str(tmp_path / "model"), write_meta_graph=False)
    assert sorted(p for p in listing(tmp_path) if ".data-" in p) == expected_data_files("model", 2)

    pv = np.zeros((10, 4), np.float32)
    reshaped = np.zeros((2, 3), np.int64)
    ours = gs.Saver([gs.Variable(pv, "pv", "/cpu:0"), gs.Variable(reshaped, "other", "/cpu:1")], reshape=True)
    ours.restore(prefix)
    assert ours.variables["pv"] is pv
    assert_bit_equal(pv, full, "pv")
    assert_bit_equal(reshaped, other.reshape(2, 3), "other")


def test_tf_reads_a_shard_that_holds_only_empty_tensors(tmp_path: Path) -> None:
    values = np.arange(5, dtype=np.float32)
    empty = np.zeros((0, 3), np.float32)
    saver = gs.Saver([gs.Variable(values, "values", "/cpu:0"), gs.Variable(empty, "empty", "/cpu:1")], sharded=True)
    prefix = saver.save(str(tmp_path / "m"))
    assert sorted(p for p in listing(tmp_path) if ".data-" in p) == expected_data_files("m", 2)
    reader = tf.train.load_checkpoint(prefix)
    assert reader.get_tensor("empty").shape == (0, 3)
    assert_bit_equal(tf_value(reader.get_tensor("values")), values, "values")
    saver.restore(prefix)


def test_tf_reads_fixed_width_string_arrays_as_strings(tmp_path: Path) -> None:
    # The Saver refuses fixed-width arrays (it could not restore every string into them);
    # the format layer writes them as DT_STRING, which TensorFlow must read as strings.
    values = {"unicode": np.array(["ab", "ünï", ""]), "bytes": np.array([[b"x", b"\x00y"], [b"zz", b""]])}
    with pytest.raises(gs.UnsupportedDTypeError, match="'unicode'"):
        gs.Saver(dict(values))
    prefix = str(tmp_path / "m")
    with BundleWriter(prefix) as writer:
        writer.add_many(list(values), list(values.values()))
    reader = tf.train.load_checkpoint(prefix)
    assert list(reader.get_tensor("unicode")) == ["ab".encode(), "ünï".encode(), b""]
    assert reader.get_tensor("bytes").tolist() == values["bytes"].tolist()
