"""TensorFlow's own Saver and checkpoint-management tests, ported to gpusaver.

TensorFlow tests ``tf.compat.v1.train.Saver`` in
``tensorflow/python/training/saver_test.py`` and its helpers in
``tensorflow/python/checkpoint/checkpoint_management_test.py`` (before TF 2.4:
``tensorflow/python/training/checkpoint_management_test.py``). This module
restates, in its own code, the cases that apply to an eager Saver over NumPy
arrays. Where a directory listing or the bytes of the ``checkpoint`` state file
say more than an assertion, the same scenario also runs through TensorFlow's
graph-mode Saver (a Graph and a Session of its own, in this process) in a twin
directory, and the two runs must agree: returned prefixes, ``last_checkpoints``,
the files on disk, and the state file byte for byte (the directory replaced by
``<dir>``). Time is a fake clock (``time.time`` patched), never the wall clock.

Ported cases, by TensorFlow test class and test:

saver_test.py
    SaverTest:
        testBasic, testResourceBasic, testEagerBasic -> test_basic_save_restore;
        testBasicsWithListOfVariables -> test_basics_with_list_of_variables;
        testInvalidPath -> test_restore_from_an_invalid_path_raises;
        testInt64 -> test_int64;
        testSomeErrors, testSameName -> test_duplicate_names_and_arrays_are_refused;
        testCacheRereadsFile -> test_restore_rereads_a_rewritten_checkpoint;
        testAllowEmpty -> test_allow_empty;
        testReshape -> test_reshape;
        testSaveWithGlobalStep, testSaveWithGlobalStepWithPadding ->
        test_save_with_global_step;
        testSaveToNonexistingPath -> test_save_to_a_nonexisting_path;
        testSaveToURI -> test_save_to_a_file_uri, test_module_helpers_accept_file_uris;
        testSaveRestoreAndValidateVariableDtype -> test_restore_validates_the_dtype;
        testSaveCopyRestoreWithSaveRelativePaths ->
        test_save_copy_restore_with_save_relative_paths.
    SaveRestoreShardedTestV2:
        testBasics, testIterators, testIteratorsUnshardedRestore -> test_sharded_basics;
        testSaverDef -> test_sharded_saver_def.
    MaxToKeepTest:
        testNonSharded, testMaxToKeepEager -> test_max_to_keep_non_sharded;
        testSharded -> test_max_to_keep_sharded,
        test_max_to_keep_sharded_deletes_meta_files_like_tf;
        testNoMaxToKeep -> test_no_max_to_keep;
        testNoMetaGraph -> test_no_meta_graph;
        (set_last_checkpoints, whose checkpoints TF stamps with +inf) ->
        test_set_last_checkpoints_are_never_deleted,
        test_set_last_checkpoints_retention_matches_tf,
        test_set_last_checkpoints_with_time_retention_matches_tf.
    RecoverLastCheckpointsTest:
        test_recover_last_checkpoints -> test_recover_last_checkpoints,
        test_recovered_checkpoints_retention_matches_tf.
    KeepCheckpointEveryNHoursTest:
        testNonSharded -> test_keep_checkpoint_every_n_hours.
    SaveRestoreWithVariableNameMap:
        testNonReshapeVariable -> test_variable_name_map.

checkpoint_management_test.py (and the same classes in older saver_test.py)
    LatestCheckpointWithRelativePaths:
        testNameCollision -> test_name_collision,
        test_name_collision_with_an_absolute_sharded_path,
        test_name_collision_is_checked_on_the_base_name;
        testRelativePath -> test_relative_path.
    CheckpointStateTest:
        testAbsPath -> test_generate_state_with_an_absolute_path;
        testRelPath -> test_generate_state_with_a_relative_path;
        testAllModelCheckpointPaths -> test_generate_state_all_model_checkpoint_paths,
        test_generate_state_matches_tf, test_generate_state_refuses_mismatched_timestamps;
        testUpdateCheckpointState -> test_update_checkpoint_state,
        test_update_checkpoint_state_refuses_the_state_files_path;
        testFSPath -> test_get_checkpoint_state_accepts_a_path_object;
        testUpdateCheckpointStateSaveRelativePaths ->
        test_update_checkpoint_state_save_relative_paths;
        testCheckPointStateFailsWhenIncomplete -> test_incomplete_or_garbled_state_file;
        testCheckPointCompletesRelativePaths -> test_state_completes_relative_paths;
        (latest_filename naming a file below the directory) ->
        test_latest_checkpoint_with_a_nested_latest_filename.
    SaverUtilsTest:
        testCheckpointExists -> test_checkpoint_exists;
        testGetCheckpointMtimes -> test_get_checkpoint_mtimes;
        testRemoveCheckpoint -> test_remove_checkpoint,
        test_remove_checkpoint_with_a_pattern_matches_tf,
        test_remove_checkpoint_takes_an_existing_prefix_literally,
        test_retention_never_widens_to_a_bracketed_prefixes_neighbour.

Differences from TensorFlow that gpusaver keeps on purpose (README) are tested
as gpusaver's behaviour: ``generate_checkpoint_state_proto`` leaves the
caller's list alone (test_generate_state_leaves_the_callers_list_alone), re-saving
a prefix with fewer shards removes the stale data files
(test_resave_with_fewer_shards_removes_stale_data_files), modification times
keep their sub-second part (test_get_checkpoint_mtimes), a state-file collision
is refused before anything is written, no meta graph is ever written, and a
prefix that exists literally is removed literally, never as a pattern.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest
from google.protobuf import text_format

import gpusaver as gs
from gpusaver._proto.saver_pb2 import SaverDef

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytestmark = pytest.mark.tf

HOUR = 3600.0
START = 1.7e9  # the fake clock's reading when a scenario begins (whole seconds)

# Two variables on two (virtual) CPUs: the sharded twins write two data files each.
ARRAYS = {"v0": np.array([1.5, -2.0], np.float32), "v1": np.arange(3, dtype=np.int64)}
DEVICES = {"v0": 0, "v1": 1}


# ------------------------------------------------------------------ helpers


class Clock:
    """``time.time`` for the Savers: it moves only when a test says so."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, hours: float) -> None:
        self.now += hours * HOUR


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "time", fake)
    return fake


def listing(directory: str | Path) -> list[str]:
    """Every file and folder below ``directory``, relative, folders ending in '/'."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel = os.path.relpath(root, directory)
        for name in dirs:
            out.append(os.path.normpath(os.path.join(rel, name)) + "/")
        for name in files:
            out.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(out)


def anon(directory: str | Path, value: Any) -> Any:
    """``value`` with the directory's path replaced by ``<dir>`` (strings, lists of them)."""
    if isinstance(value, str):
        return value.replace(str(directory), "<dir>")
    if isinstance(value, (list, tuple)):
        return [anon(directory, v) for v in value]
    return value


def state_text(directory: str | Path, name: str = "checkpoint") -> str | None:
    path = Path(directory) / name
    return path.read_text() if path.exists() else None


def observe(directory: Path, saver: Any = None, returned: Any = None) -> dict[str, Any]:
    """What a twin comparison looks at after one step."""
    return {
        "returned": anon(directory, returned),
        "last_checkpoints": anon(directory, list(saver.last_checkpoints)) if saver is not None else None,
        "files": listing(directory),
        "state": anon(directory, state_text(directory)),
    }


def assert_state(save_dir: str | Path, model: str, all_paths: list[str]) -> None:
    state = gs.get_checkpoint_state(str(save_dir))
    assert state is not None
    assert state.model_checkpoint_path == model
    assert list(state.all_model_checkpoint_paths) == all_paths


def scalar(value: float, dtype: Any = np.float32) -> np.ndarray:
    return np.array(value, dtype)


class OursSaver:
    """A gs.Saver over copies of ``arrays`` (variable k on /cpu:DEVICES[k]), with twin helpers."""

    def __init__(self, arrays: dict[str, np.ndarray], devices: dict[str, int] | None, **kwargs: Any) -> None:
        self.arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
        devices = devices or {}
        self.saver = gs.Saver(
            [gs.Variable(a, k, device=f"/cpu:{devices.get(k, 0)}") for k, a in self.arrays.items()], **kwargs
        )

    def __getattr__(self, name: str) -> Any:
        if name == "saver":  # not built (its constructor raised)
            raise AttributeError(name)
        return getattr(self.saver, name)

    def assign(self, name: str, value: Any) -> None:
        self.arrays[name][...] = value

    def value(self, name: str) -> np.ndarray:
        return self.arrays[name].copy()


class TFSaver:
    """tf.compat.v1.train.Saver in a Graph and Session of its own, driven like gs.Saver."""

    def __init__(self, tf: ModuleType, arrays: dict[str, np.ndarray], devices: dict[str, int] | None, **kwargs: Any):
        devices = devices or {}
        self._graph = tf.Graph()
        with self._graph.as_default():
            self._vars = {}
            for i, (name, value) in enumerate(arrays.items()):
                with self._graph.device(f"/cpu:{devices.get(name, 0)}"):
                    self._vars[name] = tf.compat.v1.Variable(value, name=f"var{i}")
            self.saver = tf.compat.v1.train.Saver(self._vars, **kwargs)
            init = tf.compat.v1.global_variables_initializer()
        config = tf.compat.v1.ConfigProto(device_count={"CPU": 2}, allow_soft_placement=False)
        self.sess = tf.compat.v1.Session(graph=self._graph, config=config)
        self.sess.run(init)

    def save(self, save_path: str, global_step: Any = None, **kwargs: Any) -> str:
        kwargs.setdefault("write_meta_graph", False)
        with self._graph.as_default():
            return self.saver.save(self.sess, save_path, global_step=global_step, **kwargs)

    def restore(self, save_path: str) -> None:
        with self._graph.as_default():
            self.saver.restore(self.sess, save_path)

    @property
    def last_checkpoints(self) -> list[str]:
        return self.saver.last_checkpoints

    def set_last_checkpoints(self, paths: list[str]) -> None:
        self.saver.set_last_checkpoints(paths)

    def set_last_checkpoints_with_time(self, pairs: list[tuple[str, float]]) -> None:
        self.saver.set_last_checkpoints_with_time(pairs)

    def recover_last_checkpoints(self, paths: list[str]) -> None:
        self.saver.recover_last_checkpoints(paths)

    def assign(self, name: str, value: Any) -> None:
        with self._graph.as_default():
            self._vars[name].load(value, self.sess)

    def value(self, name: str) -> np.ndarray:
        with self._graph.as_default():
            return np.asarray(self.sess.run(self._vars[name]))

    def close(self) -> None:
        self.sess.close()


@dataclasses.dataclass
class Side:
    """One implementation: its Saver and its checkpoint-management helpers."""

    name: str
    make: Callable[..., Any]  # make(arrays, devices=None, **saver_kwargs)
    latest_checkpoint: Callable[..., Any]
    get_checkpoint_state: Callable[..., Any]
    update_checkpoint_state: Callable[..., Any]  # with save_relative_paths=
    generate_checkpoint_state_proto: Callable[..., Any]
    checkpoint_exists: Callable[..., Any]
    get_checkpoint_mtimes: Callable[..., Any]
    remove_checkpoint: Callable[..., Any]


@pytest.fixture(scope="module")
def tf_cm(tf: ModuleType) -> ModuleType:
    """TensorFlow's checkpoint_management module (the functions behind tf.train.*)."""
    from tensorflow.python.checkpoint import checkpoint_management

    return checkpoint_management


@pytest.fixture
def twins(tf: ModuleType, tf_cm: ModuleType) -> Any:
    """(TensorFlow's side, ours): the same scenario runs on each, in its own directory."""
    made: list[TFSaver] = []

    def make_tf(arrays: dict[str, np.ndarray], devices: dict[str, int] | None = None, **kwargs: Any) -> TFSaver:
        saver = TFSaver(tf, arrays, devices, **kwargs)
        made.append(saver)
        return saver

    def make_ours(arrays: dict[str, np.ndarray], devices: dict[str, int] | None = None, **kwargs: Any) -> OursSaver:
        return OursSaver(arrays, devices, **kwargs)

    theirs = Side(
        "tf",
        make_tf,
        tf_cm.latest_checkpoint,
        tf_cm.get_checkpoint_state,
        tf_cm.update_checkpoint_state_internal,
        tf_cm.generate_checkpoint_state_proto,
        tf_cm.checkpoint_exists_internal,
        tf_cm.get_checkpoint_mtimes,
        tf_cm.remove_checkpoint,
    )
    ours = Side(
        "ours",
        make_ours,
        gs.latest_checkpoint,
        gs.get_checkpoint_state,
        gs.update_checkpoint_state,
        gs.generate_checkpoint_state_proto,
        gs.checkpoint_exists,
        gs.get_checkpoint_mtimes,
        gs.remove_checkpoint,
    )
    yield theirs, ours
    for saver in made:
        saver.close()


def run_twins(
    twins: tuple[Side, Side],
    tmp_path: Path,
    scenario: Callable[[Side, Path], Any],
    clock: Clock | None = None,
) -> Any:
    """Runs ``scenario(side, directory)`` for TensorFlow, then for us; the results must be equal.

    Each run starts in a fresh directory and, with a clock, at the same fake time.
    Returns our result, for assertions of its own.
    """
    results = []
    for side in twins:
        directory = tmp_path / side.name
        directory.mkdir()
        if clock is not None:
            clock.now = START
        results.append(scenario(side, directory))
    theirs, ours = results
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        for step, (mine, tfs) in enumerate(zip(ours, theirs)):
            assert mine == tfs, f"step {step}: gpusaver (left) differs from TensorFlow (right)"
    assert ours == theirs, "gpusaver (left) differs from TensorFlow (right)"
    return ours


# ------------------------------------------------------------------ SaverTest


def test_basic_save_restore(tf: ModuleType, tmp_path: Path) -> None:
    save_path = str(tmp_path / "basic_save_restore")
    v0, v1 = scalar(10.0), scalar(20.0)
    saver = gs.Saver({"v0": v0, "v1": v1}, restore_sequentially=True)
    val = saver.save(save_path)
    assert isinstance(val, str)
    assert val == save_path

    # Arrays that hold something else take the saved values, in place.
    w0, w1 = scalar(-1.0), scalar(-1.0)
    gs.Saver({"v0": w0, "v1": w1}).restore(save_path)
    assert (float(w0), float(w1)) == (10.0, 20.0)

    # And another pair, initialised differently, restoring sequentially.
    x0, x1 = scalar(1000.0), scalar(2000.0)
    gs.Saver({"v0": x0, "v1": x1}, restore_sequentially=True).restore(save_path)
    assert (float(x0), float(x1)) == (10.0, 20.0)

    # The saving Saver restores its own arrays after they changed.
    v0[...], v1[...] = 0.0, 0.0
    saver.restore(save_path)
    assert (float(v0), float(v1)) == (10.0, 20.0)

    reader = tf.train.load_checkpoint(save_path)
    assert (reader.get_tensor("v0"), reader.get_tensor("v1")) == (10.0, 20.0)


def test_basics_with_list_of_variables(tmp_path: Path) -> None:
    save_path = str(tmp_path / "basics_with_list")
    v0, v1 = scalar(10.0), scalar(20.0)
    saver = gs.Saver([gs.Variable(v0, "v0"), gs.Variable(v1, "v1")])
    assert saver.save(save_path) == save_path

    w0, w1 = scalar(-1.0), scalar(-1.0)
    gs.Saver([gs.Variable(w0, "v0"), gs.Variable(w1, "v1")]).restore(save_path)
    assert (float(w0), float(w1)) == (10.0, 20.0)

    x0, x1 = scalar(1000.0), scalar(2000.0)
    gs.Saver([gs.Variable(x0, "v0"), gs.Variable(x1, "v1")]).restore(save_path)
    assert (float(x0), float(x1)) == (10.0, 20.0)


def test_restore_from_an_invalid_path_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    v0 = np.array(0, np.int32)
    saver = gs.Saver({"v0": v0})
    for path in ["invalid path", str(tmp_path / "nothing_here")]:
        with pytest.raises(ValueError, match=re.escape(f"The passed save_path is not a valid checkpoint: {path}")):
            saver.restore(path)
    with pytest.raises(ValueError, match="Can't load save_path when it is None"):
        saver.restore(None)
    assert int(v0) == 0
    assert listing(tmp_path) == []


def test_int64(tmp_path: Path) -> None:
    save_path = str(tmp_path / "int64")
    v = np.array(15, np.int64)
    assert gs.Saver({"v": v}, restore_sequentially=True).save(save_path) == save_path
    w = np.array(-1, np.int64)
    gs.Saver({"v": w}).restore(save_path)
    assert w.dtype == np.int64 and int(w) == 15


def test_duplicate_names_and_arrays_are_refused() -> None:
    v0, v1, v2 = np.array([10.0]), np.array([20.0]), np.array([20.0])
    with pytest.raises(ValueError, match="same name: v1"):
        gs.Saver([gs.Variable(v0, "v0"), gs.Variable(v1, "v1"), gs.Variable(v2, "v1")])
    gs.Saver({"vee1": v1, "other": v2})  # different names: fine

    # One array under two names.
    with pytest.raises(ValueError):
        gs.Saver({"v0": v0, "v0too": v0})
    gs.Saver({"v0": v0, "v2": v2})


def test_restore_rereads_a_rewritten_checkpoint(tmp_path: Path) -> None:
    save_path = str(tmp_path / "cache_rereads")

    def save_and_load(name: str, value: float, other: float) -> None:
        assert gs.Saver({name: scalar(value)}).save(save_path) == save_path
        out = scalar(other)
        gs.Saver({name: out}).restore(save_path)
        assert out == np.float32(value)

    save_and_load("var0", 0.0, 1.0)
    save_and_load("var1", 1.1, 2.2)  # the same prefix, another variable
    stale = scalar(5.0)
    with pytest.raises(gs.TensorNotFoundError, match="not found in checkpoint"):
        gs.Saver({"var0": stale}).restore(save_path)
    assert float(stale) == 5.0


def test_allow_empty(tmp_path: Path) -> None:
    save_path = str(tmp_path / "allow_empty")
    for var_list in (None, {}):
        saver = gs.Saver(var_list, allow_empty=True)
        assert saver.save(save_path) is None
        assert listing(tmp_path) == []  # no checkpoint and no state file
        saver.restore(save_path)  # nothing to restore, from nowhere


def test_reshape(tmp_path: Path) -> None:
    save_path = str(tmp_path / "variables_reshape")
    gs.Saver({"var": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)}).save(save_path)
    target = np.zeros((3, 2), np.float32)
    with pytest.raises(gs.ShapeMismatchError):
        gs.Saver({"var": target}).restore(save_path)
    assert not target.any()
    gs.Saver({"var": target}, reshape=True).restore(save_path)
    np.testing.assert_array_equal(target, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])


@pytest.mark.parametrize("pad_step_number", [False, True], ids=["plain", "padded"])
def test_save_with_global_step(pad_step_number: bool, tmp_path: Path) -> None:
    save_path = str(tmp_path / "ckpt_with_global_step")
    expected = f"{save_path}-{5:08d}" if pad_step_number else f"{save_path}-5"
    # TF takes an int or a step tensor; here an int, a NumPy integer or a 0-d integer array.
    for step in (5, np.int64(5), np.array(5, np.int32)):
        saver = gs.Saver({"var0": scalar(1.0)}, pad_step_number=pad_step_number)
        assert saver.save(save_path, global_step=step) == expected
        assert gs.checkpoint_exists(expected)
    assert gs.latest_checkpoint(str(tmp_path)) == expected


def test_save_to_a_nonexisting_path(tmp_path: Path) -> None:
    (tmp_path / "actually_a_file").write_text("")
    for rel in ["nonexisting_dir/path", "other_nonexisting_dir/path1/path2", "actually_a_file/path"]:
        save_path = str(tmp_path / rel)
        v0, v1 = scalar(10.0), scalar(20.0)
        saver = gs.Saver({"v0": v0, "v1": v1}, restore_sequentially=True)
        # As in TF's test, saving may create the missing directory or refuse with
        # this exact message (TF 2.21 creates one missing level, not two).
        try:
            saver.save(save_path)
        except ValueError as exc:
            assert str(exc) == f"Parent directory of {save_path} doesn't exist, can't save."
            continue
        v0[...], v1[...] = 0.0, 0.0
        saver.restore(save_path)
        assert (float(v0), float(v1)) == (10.0, 20.0)
    # Refusals leave nothing behind: only what succeeded is on disk.
    for entry in listing(tmp_path):
        assert entry == "actually_a_file" or entry.startswith("nonexisting_dir/"), entry


def _uri_scenario(side: Side, directory: Path) -> list[Any]:
    uri_dir = "file://" + str(directory)
    saver = side.make(ARRAYS, max_to_keep=2)
    obs: list[Any] = []
    for step in (1, 2, 3):
        saver.assign("v0", [step, -step])
        obs.append(observe(directory, saver, saver.save(uri_dir + "/m", global_step=step)))
    fresh = side.make({k: np.zeros_like(v) for k, v in ARRAYS.items()})
    fresh.restore(uri_dir + "/m-3")
    obs.append(fresh.value("v0").tolist())
    return obs


def test_save_to_a_file_uri(twins: tuple[Side, Side], tmp_path: Path) -> None:
    ours = run_twins(twins, tmp_path, _uri_scenario)
    assert ours[0]["returned"] == "file://<dir>/m-1"
    assert ours[0]["files"] == ["checkpoint", "m-1.data-00000-of-00001", "m-1.index"]
    # The directory "file://..." is not absolute to os.path, so TF stores relative names.
    assert ours[2]["state"] == (
        'model_checkpoint_path: "m-3"\nall_model_checkpoint_paths: "m-2"\nall_model_checkpoint_paths: "m-3"\n'
    )
    assert ours[2]["last_checkpoints"] == ["file://<dir>/m-2", "file://<dir>/m-3"]
    assert ours[3] == [3.0, -3.0]
    assert gs.latest_checkpoint(str(tmp_path / "ours")) == str(tmp_path / "ours" / "m-3")


def test_module_helpers_accept_file_uris(twins: tuple[Side, Side], tmp_path: Path) -> None:
    def scenario(side: Side, directory: Path) -> list[Any]:
        saver = side.make(ARRAYS, max_to_keep=None)
        for step in (1, 2):
            saver.save(str(directory / "m"), global_step=step)
        uri_dir = "file://" + str(directory)
        return [
            anon(directory, side.latest_checkpoint(uri_dir)),
            anon(directory, side.get_checkpoint_state(uri_dir).model_checkpoint_path),
            [side.checkpoint_exists(f"{uri_dir}/m-{s}") for s in (1, 2, 3)],
            len(side.get_checkpoint_mtimes([f"{uri_dir}/m-1", f"{uri_dir}/m-3", f"{uri_dir}/m-2"])),
            side.remove_checkpoint(f"{uri_dir}/m-1"),
            listing(directory),
        ]

    ours = run_twins(twins, tmp_path, scenario)
    # The state file holds absolute paths (the saves used plain ones): returned as stored.
    assert ours[0] == ours[1] == "<dir>/m-2"
    assert ours[2] == [True, True, False]
    assert ours[3] == 2


def test_restore_validates_the_dtype(tmp_path: Path) -> None:
    save_path = str(tmp_path / "basic_save_restore")
    gs.Saver({"v0": scalar(10.0)}).save(save_path)
    wrong = np.array(1, np.int32)
    with pytest.raises(gs.DTypeMismatchError):
        gs.Saver({"v0": wrong}).restore(save_path)
    assert int(wrong) == 1


def test_save_copy_restore_with_save_relative_paths(tf: ModuleType, tmp_path: Path) -> None:
    dir1 = tmp_path / "save_dir1"
    dir1.mkdir()
    path1 = str(dir1 / "save_copy_restore")
    saver = gs.Saver({"v0": scalar(10.0), "v1": scalar(20.0)}, restore_sequentially=True, save_relative_paths=True)
    assert saver.save(path1) == path1
    assert gs.latest_checkpoint(str(dir1)) == path1
    assert state_text(dir1) == (
        'model_checkpoint_path: "save_copy_restore"\nall_model_checkpoint_paths: "save_copy_restore"\n'
    )

    dir2 = tmp_path / "save_dir2"
    os.renames(dir1, dir2)
    path2 = str(dir2 / "save_copy_restore")
    assert gs.latest_checkpoint(str(dir2)) == path2 == tf.train.latest_checkpoint(str(dir2))

    w0, w1 = scalar(-1.0), scalar(-1.0)
    gs.Saver({"v0": w0, "v1": w1}).restore(path2)
    assert (float(w0), float(w1)) == (10.0, 20.0)


def test_no_meta_graph(tmp_path: Path) -> None:
    saver = gs.Saver({"v": scalar(10.0)})
    s1 = saver.save(str(tmp_path / "s1"), write_meta_graph=False)
    s2 = saver.save(str(tmp_path / "s2"), write_meta_graph=True)  # accepted; nothing to export
    assert gs.checkpoint_exists(s1) and gs.checkpoint_exists(s2)
    assert not [p for p in listing(tmp_path) if p.endswith(".meta")]


# ------------------------------------------------------- SaveRestoreShardedTest


def _two_devices(v0: np.ndarray, v1: np.ndarray) -> list[gs.Variable]:
    return [gs.Variable(v0, "v0", "/cpu:0"), gs.Variable(v1, "v1", "/cpu:1")]


def test_sharded_basics(tf: ModuleType, tmp_path: Path) -> None:
    save_path = str(tmp_path / "sharded_basics")
    v0, v1 = np.array(10, np.int32), np.array(20, np.int32)
    saver = gs.Saver(_two_devices(v0, v1), sharded=True)
    assert saver.save(save_path) == save_path  # V2: the prefix, no "-?????-of-00002"
    assert sorted(glob.glob(save_path + ".data*")) == [
        save_path + ".data-00000-of-00002",
        save_path + ".data-00001-of-00002",
    ]

    # A sharded Saver over other values, on the same devices.
    w0, w1 = np.array(111, np.int32), np.array(222, np.int32)
    gs.Saver(_two_devices(w0, w1), sharded=True).restore(save_path)
    assert (int(w0), int(w1)) == (10, 20)
    assert gs.latest_checkpoint(str(tmp_path)) == save_path

    # An unsharded Saver on one device restores the sharded checkpoint too.
    x0, x1 = np.array(0, np.int32), np.array(0, np.int32)
    gs.Saver({"v0": x0, "v1": x1}).restore(save_path)
    assert (int(x0), int(x1)) == (10, 20)

    reader = tf.train.load_checkpoint(save_path)
    assert (reader.get_tensor("v0"), reader.get_tensor("v1")) == (10, 20)


def test_sharded_saver_def() -> None:
    saver_def = gs.Saver({"v0": np.array(123)}, sharded=True).as_saver_def()
    assert saver_def.sharded
    assert saver_def.version == SaverDef.V2


# --------------------------------------------------------------- MaxToKeepTest


def test_max_to_keep_non_sharded(tmp_path: Path) -> None:
    save_dir = str(tmp_path)
    v = scalar(10.0)
    save = gs.Saver({"v": v}, max_to_keep=2)
    assert save.last_checkpoints == []

    s1 = save.save(os.path.join(save_dir, "s1"))
    assert save.last_checkpoints == [s1]
    assert gs.checkpoint_exists(s1)
    assert_state(save_dir, s1, [s1])

    s2 = save.save(os.path.join(save_dir, "s2"))
    assert save.last_checkpoints == [s1, s2]
    assert gs.checkpoint_exists(s1) and gs.checkpoint_exists(s2)
    assert_state(save_dir, s2, [s1, s2])

    s3 = save.save(os.path.join(save_dir, "s3"))
    assert save.last_checkpoints == [s2, s3]
    assert not gs.checkpoint_exists(s1)
    assert gs.checkpoint_exists(s2) and gs.checkpoint_exists(s3)
    assert_state(save_dir, s3, [s2, s3])

    # A second helper, configured from the first's SaverDef and told its checkpoints;
    # a third with the same configuration that knows of none.
    save2 = gs.Saver({"v": v}, saver_def=save.as_saver_def())
    save2.set_last_checkpoints(save.last_checkpoints)
    save3 = gs.Saver({"v": v}, saver_def=save.as_saver_def())

    # The first helper: s2 again (the old s2 leaves the list, the new one is appended).
    s2 = save.save(os.path.join(save_dir, "s2"))
    assert save.last_checkpoints == [s3, s2]
    assert not gs.checkpoint_exists(s1)
    assert gs.checkpoint_exists(s3) and gs.checkpoint_exists(s2)
    assert_state(save_dir, s2, [s3, s2])

    # s1 again: s3 is now the oldest and goes.
    s1 = save.save(os.path.join(save_dir, "s1"))
    assert save.last_checkpoints == [s2, s1]
    assert not gs.checkpoint_exists(s3)
    assert gs.checkpoint_exists(s2) and gs.checkpoint_exists(s1)
    assert_state(save_dir, s1, [s2, s1])

    # The second helper still believes in [s2, s3].
    s2 = save2.save(os.path.join(save_dir, "s2"))
    assert save2.last_checkpoints == [s3, s2]
    assert gs.checkpoint_exists(s1)  # made by the first helper
    assert not gs.checkpoint_exists(s3)  # deleted by the first helper
    assert gs.checkpoint_exists(s2)
    assert_state(save_dir, s2, [s3, s2])

    s1 = save2.save(os.path.join(save_dir, "s1"))
    assert save2.last_checkpoints == [s2, s1]
    assert not gs.checkpoint_exists(s3)
    assert gs.checkpoint_exists(s2) and gs.checkpoint_exists(s1)
    assert_state(save_dir, s1, [s2, s1])

    # The third helper knows nothing of s1: it stays on disk but not in the state.
    s2 = save3.save(os.path.join(save_dir, "s2"))
    assert save3.last_checkpoints == [s2]
    assert gs.checkpoint_exists(s1)
    assert not gs.checkpoint_exists(s3)
    assert gs.checkpoint_exists(s2)
    assert_state(save_dir, s2, [s2])

    s1 = save3.save(os.path.join(save_dir, "s1"))
    assert save3.last_checkpoints == [s2, s1]
    assert not gs.checkpoint_exists(s3)
    assert gs.checkpoint_exists(s2) and gs.checkpoint_exists(s1)
    assert_state(save_dir, s1, [s2, s1])


def test_max_to_keep_sharded(tmp_path: Path) -> None:
    v0, v1 = np.array(111, np.int32), np.array(222, np.int32)
    save = gs.Saver(_two_devices(v0, v1), sharded=True, max_to_keep=2)
    assert save.last_checkpoints == []

    def files_of(prefix: str) -> list[str]:
        return sorted(glob.glob(glob.escape(prefix) + "*"))

    s1 = save.save(str(tmp_path / "s1"))
    assert save.last_checkpoints == [s1]
    assert len(files_of(s1)) == 3  # index and two data files (TF adds a .meta)

    s2 = save.save(str(tmp_path / "s2"))
    assert save.last_checkpoints == [s1, s2]
    assert len(files_of(s1)) == 3 and len(files_of(s2)) == 3

    s3 = save.save(str(tmp_path / "s3"))
    assert save.last_checkpoints == [s2, s3]
    assert files_of(s1) == []
    assert len(files_of(s2)) == 3 and len(files_of(s3)) == 3
    assert listing(tmp_path) == sorted(
        ["checkpoint", *(f"{s}.index" for s in ("s2", "s3"))]
        + [f"{s}.data-{k:05d}-of-00002" for s in ("s2", "s3") for k in range(2)]
    )


def test_max_to_keep_sharded_deletes_meta_files_like_tf(twins: tuple[Side, Side], tmp_path: Path) -> None:
    # A TF job exports <prefix>.<meta_graph_suffix> next to each checkpoint; retention
    # deletes the dropped checkpoint's meta file under the suffix given to that save.
    def scenario(side: Side, directory: Path) -> list[Any]:
        saver = side.make(ARRAYS, DEVICES, sharded=True, max_to_keep=2)
        obs = []
        for name, suffix in [("s1", "meta"), ("s2", "meta"), ("s3", "meta"), ("s4", "mg"), ("s5", "mg"),
                             ("s6", "mg")]:
            prefix = saver.save(str(directory / name), meta_graph_suffix=suffix)
            Path(f"{prefix}.{suffix}").write_text("a meta graph")
            obs.append(observe(directory, saver, prefix))
        return obs

    ours = run_twins(twins, tmp_path, scenario)
    assert [f for f in ours[-1]["files"] if not f.startswith("s5") and not f.startswith("s6")] == [
        "checkpoint",
        "s2.meta",
        "s3.meta",
    ]


@pytest.mark.parametrize("max_to_keep", [None, 0])
def test_no_max_to_keep(max_to_keep: int | None, tmp_path: Path) -> None:
    save = gs.Saver({"v": scalar(10.0)}, max_to_keep=max_to_keep)
    assert save.last_checkpoints == []
    s1 = save.save(str(tmp_path / "s1"))
    assert save.last_checkpoints == []
    assert gs.checkpoint_exists(s1)
    s2 = save.save(str(tmp_path / "s2"))
    assert save.last_checkpoints == []
    assert gs.checkpoint_exists(s1) and gs.checkpoint_exists(s2)
    assert_state(tmp_path, s2, [s2])  # the state file names only the latest


def test_set_last_checkpoints_are_never_deleted(tmp_path: Path) -> None:
    # TF stamps checkpoints given to set_last_checkpoints with +inf: retention keeps them.
    writer = gs.Saver({"v": scalar(1.0)}, max_to_keep=None)
    a = writer.save(str(tmp_path / "a"), write_state=False)
    b = writer.save(str(tmp_path / "b"), write_state=False)
    saver = gs.Saver({"v": scalar(2.0)}, max_to_keep=1)
    saver.set_last_checkpoints([a, b])
    assert saver.last_checkpoints == [a, b]
    c = saver.save(str(tmp_path / "c"))  # a drops out of the list, is kept
    assert saver.last_checkpoints == [b, c]
    d = saver.save(str(tmp_path / "d"))  # b drops out, is kept
    assert saver.last_checkpoints == [c, d]
    e = saver.save(str(tmp_path / "e"))  # c drops out, was stamped at its save: deleted
    assert saver.last_checkpoints == [d, e]
    assert [p for p in (a, b, c, d, e) if gs.checkpoint_exists(p)] == [a, b, d, e]


def test_set_last_checkpoints_retention_matches_tf(
    twins: tuple[Side, Side], tmp_path: Path, clock: Clock
) -> None:
    def scenario(side: Side, directory: Path) -> list[Any]:
        writer = side.make(ARRAYS, max_to_keep=None)
        a = writer.save(str(directory / "a"), write_state=False)
        b = writer.save(str(directory / "b"), write_state=False)
        saver = side.make(ARRAYS, max_to_keep=1, keep_checkpoint_every_n_hours=1.0)
        saver.set_last_checkpoints([a, b])
        obs: list[Any] = [observe(directory, saver)]
        # Each adopted checkpoint kept "for good" also moves the next keep mark an hour on.
        for name, hours in [("c", 0.5), ("d", 0.7), ("e", 2.0), ("f", 0.0), ("g", 1.5), ("h", 0.0)]:
            clock.advance(hours)
            obs.append(observe(directory, saver, saver.save(str(directory / name))))
        return obs

    ours = run_twins(twins, tmp_path, scenario, clock)
    assert [f for f in ours[-1]["files"] if f.endswith(".index")] == [
        "a.index",
        "b.index",
        "e.index",
        "g.index",
        "h.index",
    ]


def test_set_last_checkpoints_with_time_retention_matches_tf(
    twins: tuple[Side, Side], tmp_path: Path, clock: Clock
) -> None:
    def scenario(side: Side, directory: Path) -> list[Any]:
        writer = side.make(ARRAYS, max_to_keep=None)
        old = [writer.save(str(directory / name), write_state=False) for name in ("a", "b", "c")]
        saver = side.make(ARRAYS, max_to_keep=2, keep_checkpoint_every_n_hours=1.0)
        stamps = [START + 0.5 * HOUR, START + 1.5 * HOUR, START + 1.6 * HOUR]
        saver.set_last_checkpoints_with_time(list(zip(old, stamps)))
        obs: list[Any] = [observe(directory, saver)]
        # One checkpoint leaves the list per save, so the list stays one over max_to_keep.
        for name, hours in [("n1", 2.0), ("n2", 0.0), ("n3", 1.0), ("n4", 0.0), ("n5", 0.0)]:
            clock.advance(hours)
            obs.append(observe(directory, saver, saver.save(str(directory / name))))
        return obs

    ours = run_twins(twins, tmp_path, scenario, clock)
    assert ours[0]["last_checkpoints"] == ["<dir>/a", "<dir>/b", "<dir>/c"]
    assert [f for f in ours[-1]["files"] if f.endswith(".index")] == [
        "b.index",  # 1.5 h after the saver started: past the first hour mark, kept for good
        "n3.index",
        "n4.index",
        "n5.index",
    ]


# ---------------------------------------------------- RecoverLastCheckpointsTest


def test_recover_last_checkpoints(tmp_path: Path) -> None:
    save_dir = str(tmp_path)
    v = scalar(10.0)
    save = gs.Saver({"v": v}, max_to_keep=10)
    assert save.last_checkpoints == []
    s1 = save.save(os.path.join(save_dir, "ckpt-1"))
    s2 = save.save(os.path.join(save_dir, "ckpt-2"))
    s3 = save.save(os.path.join(save_dir, "ckpt-3"))
    assert save.last_checkpoints == [s1, s2, s3]
    assert all(gs.checkpoint_exists(s) for s in (s1, s2, s3))
    assert_state(save_dir, s3, [s1, s2, s3])

    # A new Saver adopts them.
    save2 = gs.Saver({"v": v}, max_to_keep=10)
    assert save2.last_checkpoints == []
    save2.recover_last_checkpoints([s1, s2, s3])
    assert save2.last_checkpoints == [s1, s2, s3]

    # Missing ones are skipped.
    for name in glob.glob(s1 + "*"):
        os.remove(name)
    assert not gs.checkpoint_exists(s1)
    save3 = gs.Saver({"v": v}, max_to_keep=10)
    assert save3.last_checkpoints == []
    save3.recover_last_checkpoints([s1, s2, s3])
    assert save3.last_checkpoints == [s2, s3]
    s4 = save3.save(os.path.join(save_dir, "ckpt-4"))
    assert_state(save_dir, s4, [s2, s3, s4])


def test_recovered_checkpoints_retention_matches_tf(
    twins: tuple[Side, Side], tmp_path: Path, clock: Clock
) -> None:
    # Recovered checkpoints are dated by their files' mtimes (whole seconds here, so
    # that TF's whole-second mtimes and ours agree).
    def scenario(side: Side, directory: Path) -> list[Any]:
        writer = side.make(ARRAYS, max_to_keep=None)
        old = [writer.save(str(directory / name), write_state=False) for name in ("a", "b", "c")]
        for prefix, hours in zip(old, (0.25, 1.25, 1.5)):
            stamp = int(START + hours * HOUR) * 10**9
            os.utime(prefix + ".index", ns=(stamp, stamp))
        saver = side.make(ARRAYS, max_to_keep=2, keep_checkpoint_every_n_hours=1.0)
        saver.recover_last_checkpoints([old[0], str(directory / "missing"), old[1], old[2]])
        obs: list[Any] = [observe(directory, saver)]
        for name, hours in [("n1", 2.0), ("n2", 0.0), ("n3", 0.0)]:
            clock.advance(hours)
            obs.append(observe(directory, saver, saver.save(str(directory / name))))
        return obs

    ours = run_twins(twins, tmp_path, scenario, clock)
    assert ours[0]["last_checkpoints"] == ["<dir>/a", "<dir>/b", "<dir>/c"]
    assert [f for f in ours[-1]["files"] if f.endswith(".index")] == ["b.index", "n1.index", "n2.index", "n3.index"]


# -------------------------------------------------- KeepCheckpointEveryNHoursTest


def test_keep_checkpoint_every_n_hours(tmp_path: Path, clock: Clock) -> None:
    # Keep the last 2 checkpoints, plus one every 0.7 seconds.
    save = gs.Saver({"v": np.array([10.0], np.float32)}, max_to_keep=2, keep_checkpoint_every_n_hours=0.7 / 3600)
    assert save.last_checkpoints == []
    clock.now += 1.0  # one second on: s1 will be old enough to keep
    s1 = save.save(str(tmp_path / "s1"))
    assert save.last_checkpoints == [s1]
    s2 = save.save(str(tmp_path / "s2"))
    assert save.last_checkpoints == [s1, s2]
    # s1 would go (max_to_keep=2), but it is past the 0.7 s mark: kept.
    s3 = save.save(str(tmp_path / "s3"))
    assert save.last_checkpoints == [s2, s3]
    # s2 is within the same 0.7 s as s1: deleted.
    s4 = save.save(str(tmp_path / "s4"))
    assert save.last_checkpoints == [s3, s4]
    assert gs.checkpoint_exists(s1)
    assert not gs.checkpoint_exists(s2)
    assert gs.checkpoint_exists(s3) and gs.checkpoint_exists(s4)


# ------------------------------------------------ SaveRestoreWithVariableNameMap


def test_variable_name_map(tmp_path: Path) -> None:
    save_path = str(tmp_path / "non_reshape")
    v0, v1 = scalar(10.0), scalar(20.0)
    save = gs.Saver({"save_prefix/v0": v0, "save_prefix/v1": v1})
    assert save.save(save_path) == save_path

    # The arrays' own names are not in the file.
    w0, w1 = scalar(-1.0), scalar(-1.0)
    with pytest.raises(gs.TensorNotFoundError, match="not found in checkpoint"):
        gs.Saver({"v0": w0, "v1": w1}).restore(save_path)
    assert (float(w0), float(w1)) == (-1.0, -1.0)

    # The mapped names are.
    gs.Saver({"save_prefix/v0": w0, "save_prefix/v1": w1}).restore(save_path)
    assert (float(w0), float(w1)) == (10.0, 20.0)


# --------------------------------------------- LatestCheckpointWithRelativePaths


def test_name_collision(twins: tuple[Side, Side], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def scenario(side: Side, directory: Path) -> list[Any]:
        monkeypatch.chdir(directory)
        os.mkdir("train")
        filepath = os.path.join("train", "checkpoint")  # the state file's default name
        obs: list[Any] = []

        unsharded = side.make({"a": scalar(0.0)}, sharded=False)
        with pytest.raises(ValueError):  # TF: "'latest_filename' collides with 'save_path'"
            unsharded.save(filepath)
        obs.append(listing("train"))

        # "train/checkpoint-1" is fine.
        obs.append(unsharded.save(filepath, global_step=1))
        obs.append((listing("train"), state_text("train"), side.latest_checkpoint("train")))

        # Sharded: the prefix "train/checkpoint" writes checkpoint.index and
        # checkpoint.data-*, never a file named "checkpoint"; the state file stores the
        # name relative to "train", which differs from the state file's own path.
        sharded = side.make({"a": scalar(1.0)}, sharded=True)
        obs.append(sharded.save(filepath))
        obs.append((listing("train"), state_text("train"), side.latest_checkpoint("train")))

        sharded = side.make({"a": scalar(2.0)}, sharded=True)
        obs.append(sharded.save(filepath, global_step=1))
        obs.append((listing("train"), state_text("train"), side.latest_checkpoint("train")))

        fresh = side.make({"a": scalar(-1.0)})
        fresh.restore(filepath)
        obs.append(float(fresh.value("a")))
        return obs

    ours = run_twins(twins, tmp_path, scenario)
    assert ours[0] == []
    assert ours[3] == "train/checkpoint"
    assert ours[4] == (
        ["checkpoint", "checkpoint-1.data-00000-of-00001", "checkpoint-1.index",
         "checkpoint.data-00000-of-00001", "checkpoint.index"],
        'model_checkpoint_path: "checkpoint"\nall_model_checkpoint_paths: "checkpoint"\n',
        "train/checkpoint",
    )
    assert ours[-1] == 1.0


def test_name_collision_with_an_absolute_sharded_path(tmp_path: Path) -> None:
    # With an absolute directory the stored name is the state file's own path. TF raises
    # RuntimeError after writing the checkpoint (which no state file then names). gpusaver
    # (a documented difference) treats it as the relative case: only a real collision with a
    # file of the checkpoint is an error, and checkpoint.index is not the state file.
    saver = gs.Saver({"a": scalar(1.0)}, sharded=True)
    prefix = saver.save(str(tmp_path / "checkpoint"))
    assert prefix == str(tmp_path / "checkpoint")
    assert gs.latest_checkpoint(str(tmp_path)) == prefix
    assert saver.last_checkpoints == [prefix]
    saver.restore(prefix)


def test_name_collision_is_checked_on_the_base_name(tmp_path: Path) -> None:
    # TF refuses an unsharded save whose base name is the state file's name, whatever
    # latest_filename or write_state say; other names are fine.
    saver = gs.Saver({"a": scalar(1.0)})
    with pytest.raises(ValueError):
        saver.save(str(tmp_path / "mystate"), latest_filename="mystate")
    with pytest.raises(ValueError):
        saver.save(str(tmp_path / "checkpoint"), write_state=False)
    assert listing(tmp_path) == []
    prefix = saver.save(str(tmp_path / "checkpoint"), latest_filename="other_state")
    assert gs.latest_checkpoint(str(tmp_path), latest_filename="other_state") == prefix


def test_relative_path(twins: tuple[Side, Side], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def scenario(side: Side, directory: Path) -> list[Any]:
        monkeypatch.chdir(directory)
        os.mkdir("train")
        filepath = os.path.join("train", "snapshot")
        saver = side.make({"v0": scalar(0.0)})
        returned = []
        for step in range(3):  # a short training history
            saver.assign("v0", float(step))
            returned.append(saver.save(filepath, global_step=step))
        name = side.latest_checkpoint("train")
        fresh = side.make({"v0": scalar(-1.0)})
        fresh.restore(name)
        return [returned, listing("train"), state_text("train"), name, float(fresh.value("v0"))]

    ours = run_twins(twins, tmp_path, scenario)
    assert ours[0] == ["train/snapshot-0", "train/snapshot-1", "train/snapshot-2"]
    assert ours[2].startswith('model_checkpoint_path: "snapshot-2"\n')
    assert ours[3:] == ["train/snapshot-2", 2.0]


# ---------------------------------------------------------- CheckpointStateTest


def test_generate_state_with_an_absolute_path(tmp_path: Path) -> None:
    save_dir = str(tmp_path / "abs_paths")
    abs_path = os.path.join(save_dir, "model-0")
    ckpt = gs.generate_checkpoint_state_proto(save_dir, abs_path)
    assert ckpt.model_checkpoint_path == abs_path
    assert os.path.isabs(ckpt.model_checkpoint_path)
    assert list(ckpt.all_model_checkpoint_paths) == [abs_path]


def test_generate_state_with_a_relative_path() -> None:
    train_dir = "train"
    ckpt = gs.generate_checkpoint_state_proto(train_dir, os.path.join(train_dir, "model-0"))
    # No "train" part: readers join the name with the directory.
    assert ckpt.model_checkpoint_path == "model-0"
    assert list(ckpt.all_model_checkpoint_paths) == ["model-0"]


def test_generate_state_all_model_checkpoint_paths(tmp_path: Path) -> None:
    save_dir = str(tmp_path / "all_models_test")
    abs_path = os.path.join(save_dir, "model-0")
    for paths in [None, [], ["model-2"], [os.path.join(save_dir, "model-1"), abs_path]]:
        given = list(paths) if paths is not None else None
        ckpt = gs.generate_checkpoint_state_proto(save_dir, abs_path, all_model_checkpoint_paths=given)
        assert ckpt.model_checkpoint_path == abs_path
        assert os.path.isabs(ckpt.model_checkpoint_path)
        expected = list(paths or [])
        if not expected or expected[-1] != abs_path:
            expected.append(abs_path)
        assert list(ckpt.all_model_checkpoint_paths) == expected
        assert ckpt.all_model_checkpoint_paths[-1] == abs_path


GENERATE_CASES = [
    ("/d", "/d/c", None, None, None),
    ("/d", "/d/c", ["/d/a", "/d/c"], None, None),
    ("/d", "/d/c", ["/d/a"], [1.0, 2.5], 0.5),
    ("d", "d/c", ["d/a", "/abs/b"], None, None),
    ("d", "/abs/c", ["d/a"], None, None),
    ("d/", "d/sub/c", ["d/../e", "./d/f"], None, None),
    ("file:///d", "file:///d/c", ["file:///d/a"], None, None),
]


@pytest.mark.parametrize("case", GENERATE_CASES, ids=[str(i) for i in range(len(GENERATE_CASES))])
def test_generate_state_matches_tf(case: tuple[Any, ...], tf_cm: ModuleType) -> None:
    save_dir, model, paths, stamps, preserved = case

    def generate(fn: Callable[..., Any]) -> str:
        state = fn(
            save_dir,
            model,
            all_model_checkpoint_paths=list(paths) if paths is not None else None,
            all_model_checkpoint_timestamps=stamps,
            last_preserved_timestamp=preserved,
        )
        return text_format.MessageToString(state)

    assert generate(gs.generate_checkpoint_state_proto) == generate(tf_cm.generate_checkpoint_state_proto)


def test_generate_state_refuses_mismatched_timestamps(tf_cm: ModuleType) -> None:
    for fn in (tf_cm.generate_checkpoint_state_proto, gs.generate_checkpoint_state_proto):
        with pytest.raises(ValueError, match="(?i)checkpoint timestamps, if (given|provided), must match"):
            fn("/d", "/d/c", all_model_checkpoint_paths=["/d/a"], all_model_checkpoint_timestamps=[1.0])


def test_generate_state_leaves_the_callers_list_alone(tf_cm: ModuleType) -> None:
    # Documented difference: TensorFlow appends to, and rewrites, the caller's list.
    theirs = ["train/model-0"]
    tf_cm.generate_checkpoint_state_proto("train", "train/model-1", all_model_checkpoint_paths=theirs)
    assert theirs == ["model-0", "model-1"]

    ours = ["train/model-0"]
    state = gs.generate_checkpoint_state_proto("train", "train/model-1", all_model_checkpoint_paths=ours)
    assert ours == ["train/model-0"]
    assert list(state.all_model_checkpoint_paths) == ["model-0", "model-1"]


def test_update_checkpoint_state(twins: tuple[Side, Side], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def scenario(side: Side, directory: Path) -> list[Any]:
        monkeypatch.chdir(directory)
        os.mkdir("train")
        abs_path = str(directory / "model-0")
        rel_path = os.path.join("train", "model-2")
        side.update_checkpoint_state("train", rel_path, all_model_checkpoint_paths=[abs_path, rel_path])
        ckpt = side.get_checkpoint_state("train")
        return anon(
            directory,
            [state_text("train"), ckpt.model_checkpoint_path, list(ckpt.all_model_checkpoint_paths)],
        )

    ours = run_twins(twins, tmp_path, scenario)
    assert ours[1:] == ["train/model-2", ["<dir>/model-0", "train/model-2"]]


def test_update_checkpoint_state_save_relative_paths(twins: tuple[Side, Side], tmp_path: Path) -> None:
    def scenario(side: Side, directory: Path) -> list[Any]:
        save_dir = str(directory)
        abs_path2 = os.path.join(save_dir, "model-2")
        side.update_checkpoint_state(
            save_dir, abs_path2, all_model_checkpoint_paths=["model-0", abs_path2], save_relative_paths=True
        )
        ckpt = side.get_checkpoint_state(save_dir)  # absolute again
        return anon(
            directory, [state_text(directory), ckpt.model_checkpoint_path, list(ckpt.all_model_checkpoint_paths)]
        )

    ours = run_twins(twins, tmp_path, scenario)
    assert ours == [
        'model_checkpoint_path: "model-2"\n'
        'all_model_checkpoint_paths: "model-0"\nall_model_checkpoint_paths: "model-2"\n',
        "<dir>/model-2",
        ["<dir>/model-0", "<dir>/model-2"],
    ]


def test_update_checkpoint_state_refuses_the_state_files_path(tf_cm: ModuleType, tmp_path: Path) -> None:
    for fn in (tf_cm.update_checkpoint_state_internal, gs.update_checkpoint_state):
        with pytest.raises(RuntimeError):
            fn(str(tmp_path), str(tmp_path / "checkpoint"))
        assert listing(tmp_path) == []


def test_get_checkpoint_state_accepts_a_path_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("train")
    abs_path = str(tmp_path / "model-0")
    rel_path = os.path.join("train", "model-2")
    gs.update_checkpoint_state("train", rel_path, all_model_checkpoint_paths=[abs_path, rel_path])
    ckpt = gs.get_checkpoint_state(Path("train"))
    assert ckpt is not None and ckpt.model_checkpoint_path == rel_path

    prefix = gs.Saver({"v": scalar(1.0)}).save(str(tmp_path / "m"))
    latest = gs.latest_checkpoint(tmp_path)
    assert isinstance(latest, str) and latest == prefix


def test_incomplete_or_garbled_state_file(twins: tuple[Side, Side], tmp_path: Path) -> None:
    def scenario(side: Side, directory: Path) -> list[Any]:
        out = []
        contents = ["", 'all_model_checkpoint_paths: "m-1"\n', "this is { not a state", "model_checkpoint_path: 7"]
        for content in contents:
            (directory / "checkpoint").write_text(content)
            try:
                out.append(side.get_checkpoint_state(str(directory)))
            except ValueError:
                out.append("ValueError")
        return out

    ours = run_twins(twins, tmp_path, scenario)
    assert ours[:2] == ["ValueError", "ValueError"]  # no model_checkpoint_path
    assert ours[2] is None  # does not parse: ignored


def test_state_completes_relative_paths(tmp_path: Path) -> None:
    save_dir = str(tmp_path)
    (tmp_path / "checkpoint").write_text(
        '\nmodel_checkpoint_path: "./model.ckpt-687529"\n'
        'all_model_checkpoint_paths: "./model.ckpt-687500"\n'
        'all_model_checkpoint_paths: "./model.ckpt-687529"\n'
    )
    ckpt = gs.get_checkpoint_state(save_dir)
    assert ckpt.model_checkpoint_path == os.path.join(save_dir, "./model.ckpt-687529")
    assert list(ckpt.all_model_checkpoint_paths) == [
        os.path.join(save_dir, "./model.ckpt-687500"),
        os.path.join(save_dir, "./model.ckpt-687529"),
    ]


def test_latest_checkpoint_with_a_nested_latest_filename(tf_cm: ModuleType, tmp_path: Path) -> None:
    d = str(tmp_path)
    prefix = gs.Saver({"v": scalar(1.0)}).save(str(tmp_path / "m"), global_step=3)
    # TF joins latest_filename with the directory: no such file, no checkpoint.
    for fn in (tf_cm.get_checkpoint_state, gs.get_checkpoint_state):
        assert fn(d, latest_filename="sub/state") is None
    for fn in (tf_cm.latest_checkpoint, gs.latest_checkpoint):
        assert fn(d, latest_filename="sub/state") is None
    # And a state file there is read like any other.
    (tmp_path / "sub").mkdir()
    shutil.copy(tmp_path / "checkpoint", tmp_path / "sub" / "state")
    for fn in (tf_cm.latest_checkpoint, gs.latest_checkpoint):
        assert fn(d, latest_filename="sub/state") == prefix


# ---------------------------------------------------------------- SaverUtilsTest


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_checkpoint_exists(sharded: bool, tf_cm: ModuleType, tmp_path: Path) -> None:
    saver = gs.Saver(_two_devices(scalar(1.0), scalar(2.0)), sharded=sharded)
    path = str(tmp_path / f"{sharded}-2")
    assert not gs.checkpoint_exists(path)  # not saved yet
    prefix = saver.save(path)
    assert gs.checkpoint_exists(prefix)
    latest = gs.latest_checkpoint(str(tmp_path))
    assert latest == prefix and gs.checkpoint_exists(latest)

    # A V1 checkpoint is a single file named by the prefix; prefixes are patterns.
    (tmp_path / "v1ckpt").write_bytes(b"")
    probes = [prefix, str(tmp_path / "v1ckpt"), str(tmp_path / "*-2"), str(tmp_path / "?????-2"),
              str(tmp_path / "nothing"), str(tmp_path / "v1*"), str(tmp_path)]
    assert [gs.checkpoint_exists(p) for p in probes] == [tf_cm.checkpoint_exists_internal(p) for p in probes]


def test_get_checkpoint_mtimes(tf_cm: ModuleType, tmp_path: Path) -> None:
    saver = gs.Saver({"v": scalar(1.0)})
    prefixes = [saver.save(str(tmp_path / "a")), saver.save(str(tmp_path / "b"))]
    (tmp_path / "v1ckpt").write_bytes(b"")  # a V1 checkpoint is dated by its one file
    prefixes.append(str(tmp_path / "v1ckpt"))
    stamps = [1_700_000_000_250_000_000, 1_700_000_001_500_000_000, 1_700_000_002_000_000_000]
    for prefix, ns in zip(prefixes, stamps):
        target = prefix + ".index" if os.path.exists(prefix + ".index") else prefix
        os.utime(target, ns=(ns, ns))

    mtimes = gs.get_checkpoint_mtimes(prefixes[:2] + [str(tmp_path / "missing")] + prefixes[2:])
    assert len(mtimes) == 3  # the missing one is skipped
    assert mtimes[1] >= mtimes[0]
    # Documented difference: sub-second precision; TF's file system reports whole seconds.
    assert mtimes == [ns / 1e9 for ns in stamps]
    assert tf_cm.get_checkpoint_mtimes(prefixes) == [float(math.floor(m)) for m in mtimes]


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_remove_checkpoint(sharded: bool, tmp_path: Path) -> None:
    saver = gs.Saver(_two_devices(scalar(1.0), scalar(2.0)), sharded=sharded)
    prefix = saver.save(str(tmp_path / f"{sharded}-2"))
    Path(prefix + ".meta").write_text("a meta graph")
    assert gs.checkpoint_exists(prefix)
    gs.remove_checkpoint(prefix, SaverDef.V2)
    assert not gs.checkpoint_exists(prefix)
    assert listing(tmp_path) == ["checkpoint"]

    # V1: the one file named by the prefix, and its meta graph.
    (tmp_path / "v1ckpt").write_bytes(b"")
    (tmp_path / "v1ckpt.meta").write_bytes(b"")
    assert gs.checkpoint_exists(str(tmp_path / "v1ckpt"))
    gs.remove_checkpoint(str(tmp_path / "v1ckpt"), SaverDef.V1)
    assert not gs.checkpoint_exists(str(tmp_path / "v1ckpt"))
    assert listing(tmp_path) == ["checkpoint"]


def _many_checkpoints(directory: Path) -> None:
    """m-1 (two shards), m-2, m-10, mm-1, other-1, meta files, a note and the state file."""
    sharded = gs.Saver(_two_devices(scalar(1.0), scalar(2.0)), sharded=True, max_to_keep=None)
    single = gs.Saver({"v": scalar(3.0)}, max_to_keep=None)
    sharded.save(str(directory / "m"), global_step=1)
    for name, step in [("m", 2), ("m", 10), ("mm", 1), ("other", 1)]:
        single.save(str(directory / name), global_step=step)
    for name in ("m-1", "m-2", "other-1"):
        (directory / f"{name}.meta").write_text("a meta graph")
    (directory / "m-notes.txt").write_text("not a checkpoint")


@pytest.mark.parametrize("pattern", ["m-*", "m-?", "*", "m-1", "zz*", "[mo]*-1"])
def test_remove_checkpoint_with_a_pattern_matches_tf(pattern: str, tf_cm: ModuleType, tmp_path: Path) -> None:
    # TF treats the prefix as a glob pattern: every matching checkpoint goes (index,
    # data files and meta graph); a pattern that matches nothing removes nothing.
    source = tmp_path / "source"
    source.mkdir()
    _many_checkpoints(source)
    results = {}
    for name, fn in [("tf", tf_cm.remove_checkpoint), ("ours", gs.remove_checkpoint)]:
        directory = tmp_path / name
        shutil.copytree(source, directory)
        fn(str(directory / pattern))
        results[name] = listing(directory)
    assert results["ours"] == results["tf"]
    if pattern == "m-*":
        assert results["ours"] == sorted(
            ["checkpoint", "m-notes.txt", "mm-1.data-00000-of-00001", "mm-1.index", "other-1.data-00000-of-00001",
             "other-1.index", "other-1.meta"]
        )
    if pattern == "zz*":
        assert results["ours"] == listing(source)


def test_remove_checkpoint_takes_an_existing_prefix_literally(tmp_path: Path) -> None:
    # A prefix that exists as written is removed as written: "a[1]" never reaches "a1",
    # "b*" never reaches "b1".
    saver = gs.Saver(_two_devices(scalar(1.0), scalar(2.0)), sharded=True, max_to_keep=None)
    for name in ("a[1]", "a1", "b*", "b1"):
        saver.save(str(tmp_path / name))
    gs.remove_checkpoint(str(tmp_path / "a[1]"))
    gs.remove_checkpoint(str(tmp_path / "b*"))
    assert [p for p in listing(tmp_path) if p.endswith(".index")] == ["a1.index", "b1.index"]
    assert not [p for p in listing(tmp_path) if p.startswith(("a[", "b*"))]


def test_retention_never_widens_to_a_bracketed_prefixes_neighbour(tmp_path: Path) -> None:
    neighbour = gs.Saver({"v": scalar(0.0)}).save(str(tmp_path / "m0"), global_step=1, write_state=False)
    saver = gs.Saver({"v": scalar(1.0)}, max_to_keep=1)
    first = saver.save(str(tmp_path / "m[0]"), global_step=1)
    second = saver.save(str(tmp_path / "m[0]"), global_step=2)
    assert saver.last_checkpoints == [second]
    assert sorted(p for p in listing(tmp_path) if p.endswith(".index")) == ["m0-1.index", "m[0]-2.index"]
    assert not [p for p in listing(tmp_path) if p.startswith(os.path.basename(first) + ".")]
    assert gs.checkpoint_exists(neighbour)


# ----------------------------------------------- documented gpusaver behaviour


def test_resave_with_fewer_shards_removes_stale_data_files(tmp_path: Path) -> None:
    # Documented difference: TF leaves m.data-00001-of-00002 behind when "m" is re-saved
    # with one shard; gpusaver removes it.
    prefix = str(tmp_path / "m")
    gs.Saver(_two_devices(scalar(1.0), scalar(2.0)), sharded=True).save(prefix)
    assert len(glob.glob(prefix + ".data-*")) == 2
    v0, v1 = scalar(3.0), scalar(4.0)
    gs.Saver({"v0": v0, "v1": v1}, sharded=True).save(prefix)
    assert listing(tmp_path) == ["checkpoint", "m.data-00000-of-00001", "m.index"]
    v0[...], v1[...] = 0.0, 0.0
    gs.Saver({"v0": v0, "v1": v1}).restore(prefix)
    assert (float(v0), float(v1)) == (3.0, 4.0)
