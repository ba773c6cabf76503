"""Tests of gpusaver.checkpoint_management, with TensorFlow as the oracle.

What gpusaver writes as the ``checkpoint`` state file must be byte-identical to
what TensorFlow writes for the same inputs, each must read the other's, and the
file must be replaced atomically.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gpusaver import checkpoint_management as cm
from gpusaver._proto.checkpoint_state_pb2 import CheckpointState
from gpusaver._proto.saver_pb2 import SaverDef
from gpusaver.errors import CheckpointWriteError, CorruptCheckpointError, GpuSaverError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TIMES = [1795319570.25, 1795319571.6423752, 1795319571.6466067]


def _tf() -> Any:
    import tensorflow as tf

    return tf


def _tf_cm() -> ModuleType:
    from tensorflow.python.checkpoint import checkpoint_management

    return checkpoint_management


def _touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _fields(state: Any) -> tuple[Any, ...]:
    """The fields of a CheckpointState (ours or TensorFlow's), comparable."""
    return (
        state.model_checkpoint_path,
        list(state.all_model_checkpoint_paths),
        list(state.all_model_checkpoint_timestamps),
        state.last_preserved_timestamp,
    )


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


# --------------------------------------------------------------------------- byte identity

# Each case: (save_dir, model path, all paths, latest_filename, timestamps,
# last_preserved, save_relative_paths). "{d}" stands for the absolute test
# directory; cases with a relative save_dir run from the test directory.
WRITE_CASES: dict[str, tuple[Any, ...]] = {
    "tf1-absolute": (
        "{d}", "{d}/model.ckpt-3", ["{d}/model.ckpt-1", "{d}/model.ckpt-3"], None, None, None, False
    ),
    "model-appended": ("{d}", "{d}/model.ckpt-3", ["{d}/model.ckpt-1"], None, None, None, False),
    "no-list": ("{d}", "{d}/model.ckpt-3", None, None, None, None, False),
    "timestamps": (
        "{d}", "{d}/c-2", ["{d}/c-0", "{d}/c-1", "{d}/c-2"], None, TIMES, 1795319570.6149986, False
    ),
    "relative-flag": (
        "{d}", "{d}/ckpt-3", ["{d}/ckpt-2", "{d}/ckpt-3"], None, TIMES[1:], 1795319570.6149986, True
    ),
    "relative-flag-outside": (
        "{d}/run", "{d}/other/ckpt-1", ["{d}/other/ckpt-1"], None, None, None, True
    ),
    "relative-flag-mixed": ("{d}", "ckpt-2", ["{d}/ckpt-1", "ckpt-2"], None, None, None, True),
    "relative-save-dir": (
        "run", "run/ckpt-2", ["run/ckpt-1", "run/ckpt-2"], None, None, None, False
    ),
    "relative-save-dir-abs-path": (
        "run", "{d}/run/ckpt-2", ["run/ckpt-1"], None, None, None, False
    ),
    "relative-save-dir-flag": ("run", "run/sub/ckpt-2", None, None, [5.0], 0.0, True),
    "escaping": ("{d}", '{d}/q"uo\\te\ttab é-1', None, None, None, None, False),
    "latest-filename": ("{d}", "{d}/ckpt-9", None, "state", None, None, True),
}


def _expand(value: Any, d: str) -> Any:
    if isinstance(value, str):
        return value.replace("{d}", d)
    if isinstance(value, list):
        return [_expand(v, d) for v in value]
    return value


@pytest.mark.tf
@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_state_file_is_byte_identical_to_tensorflow(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tf_cm = _tf_cm()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    save_dir, model, paths, filename, stamps, preserved, relative = (
        _expand(v, str(tmp_path)) for v in WRITE_CASES[case]
    )
    state_file = Path(save_dir, filename or "checkpoint")

    tf_cm.update_checkpoint_state_internal(
        save_dir,
        model,
        all_model_checkpoint_paths=list(paths) if paths is not None else ([] if relative else None),
        latest_filename=filename,
        save_relative_paths=relative,
        all_model_checkpoint_timestamps=stamps,
        last_preserved_timestamp=preserved,
    )
    expected = state_file.read_bytes()
    state_file.unlink()

    paths_before = list(paths) if paths is not None else None
    cm.update_checkpoint_state(
        save_dir,
        model,
        all_model_checkpoint_paths=paths,
        latest_filename=filename,
        all_model_checkpoint_timestamps=stamps,
        last_preserved_timestamp=preserved,
        save_relative_paths=relative,
    )
    assert state_file.read_bytes() == expected
    assert paths == paths_before  # not mutated (TensorFlow appends to the caller's list)
    assert _leftovers(state_file.parent) == []


@pytest.mark.tf
def test_public_update_matches_tf_compat_v1(tmp_path: Path) -> None:
    tf = _tf()
    args = (str(tmp_path), str(tmp_path / "model.ckpt-2"), [str(tmp_path / "model.ckpt-1")])
    tf.compat.v1.train.update_checkpoint_state(*args, all_model_checkpoint_timestamps=TIMES[:2])
    expected = (tmp_path / "checkpoint").read_bytes()
    cm.update_checkpoint_state(*args, all_model_checkpoint_timestamps=TIMES[:2])
    assert (tmp_path / "checkpoint").read_bytes() == expected
    assert expected.startswith(b'model_checkpoint_path: "/')


@pytest.mark.tf
@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_generate_checkpoint_state_proto_matches_tensorflow(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    save_dir, model, paths, _, stamps, preserved, _ = (
        _expand(v, str(tmp_path)) for v in WRITE_CASES[case]
    )
    theirs = _tf_cm().generate_checkpoint_state_proto(
        save_dir, model, list(paths) if paths else None, stamps, preserved
    )
    ours = cm.generate_checkpoint_state_proto(save_dir, model, paths, stamps, preserved)
    assert ours.SerializeToString() == theirs.SerializeToString()


@pytest.mark.tf
def test_checkpoint_manager_state_is_reproduced_and_read(tmp_path: Path) -> None:
    tf = _tf()
    directory = tmp_path / "run"
    ckpt = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0]))
    manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=2)
    saved = [manager.save() for _ in range(3)]
    written = (directory / "checkpoint").read_bytes()
    assert written.startswith(b'model_checkpoint_path: "ckpt-3"\n')

    ours = cm.get_checkpoint_state(directory)
    assert ours is not None
    theirs = tf.train.get_checkpoint_state(str(directory))
    assert _fields(ours) == _fields(theirs)
    assert ours.model_checkpoint_path == saved[-1]
    assert list(ours.all_model_checkpoint_paths) == saved[1:]
    assert len(ours.all_model_checkpoint_timestamps) == 2
    assert cm.latest_checkpoint(directory) == saved[-1]
    assert tf.train.latest_checkpoint(str(directory)) == saved[-1]
    assert cm.checkpoint_exists(saved[-1]) and not cm.checkpoint_exists(saved[0])

    (directory / "checkpoint").unlink()
    cm.update_checkpoint_state(
        str(directory),
        saved[-1],
        all_model_checkpoint_paths=saved[1:],
        all_model_checkpoint_timestamps=list(ours.all_model_checkpoint_timestamps),
        last_preserved_timestamp=ours.last_preserved_timestamp,
        save_relative_paths=True,
    )
    assert (directory / "checkpoint").read_bytes() == written


@pytest.mark.tf
def test_checkpoint_save_state_is_reproduced(tmp_path: Path) -> None:
    tf = _tf()
    path = tf.train.Checkpoint(v=tf.Variable(3.0)).save(str(tmp_path / "ckpt"))
    written = (tmp_path / "checkpoint").read_bytes()
    assert written == b'model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n'
    (tmp_path / "checkpoint").unlink()
    cm.update_checkpoint_state(tmp_path, path, save_relative_paths=True)
    assert (tmp_path / "checkpoint").read_bytes() == written
    assert cm.latest_checkpoint(tmp_path) == path


@pytest.mark.tf
@pytest.mark.parametrize("relative", [False, True])
def test_tensorflow_reads_our_state_file(tmp_path: Path, relative: bool) -> None:
    tf = _tf()
    prefixes = [str(tmp_path / f"ckpt-{i}") for i in (1, 2)]
    _touch(Path(prefixes[-1] + ".index"))
    cm.update_checkpoint_state(
        tmp_path,
        prefixes[-1],
        all_model_checkpoint_paths=prefixes,
        all_model_checkpoint_timestamps=TIMES[:2],
        last_preserved_timestamp=TIMES[0],
        save_relative_paths=relative,
    )
    theirs = tf.train.get_checkpoint_state(str(tmp_path))
    ours = cm.get_checkpoint_state(tmp_path)
    assert _fields(theirs) == _fields(ours)
    assert _fields(ours) == (prefixes[-1], prefixes, TIMES[:2], TIMES[0])
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefixes[-1]
    assert cm.latest_checkpoint(tmp_path) == prefixes[-1]


@pytest.mark.tf
def test_read_relative_dir_like_tensorflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tf = _tf()
    monkeypatch.chdir(tmp_path)
    _touch(
        tmp_path / "checkpoint",
        b'model_checkpoint_path: "c-2"\n'
        b'all_model_checkpoint_paths: "/x/c-1"\n'
        b'all_model_checkpoint_paths: "c-2"\n',
    )
    for directory in (".", "", str(tmp_path)):
        theirs = tf.train.get_checkpoint_state(directory)
        ours = cm.get_checkpoint_state(directory)
        assert ours is not None and _fields(ours) == _fields(theirs)
    assert cm.get_checkpoint_state(".").model_checkpoint_path == "./c-2"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- reading errors


def test_missing_state_file_or_directory(tmp_path: Path) -> None:
    assert cm.get_checkpoint_state(tmp_path) is None
    assert cm.get_checkpoint_state(tmp_path / "nope") is None
    assert cm.latest_checkpoint(tmp_path / "nope") is None


@pytest.mark.tf
def test_unparsable_state_file_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tf = _tf()
    _touch(tmp_path / "checkpoint", b"model_checkpoint_path: ckpt-1 oops {\n")
    with caplog.at_level(logging.WARNING, logger="gpusaver.checkpoint_management"):
        assert cm.get_checkpoint_state(tmp_path) is None
        assert cm.latest_checkpoint(tmp_path) is None
    assert "checkpoint state ignored" in caplog.text
    assert tf.train.get_checkpoint_state(str(tmp_path)) is None


def test_undecodable_or_unreadable_state_file_is_ignored(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "checkpoint", b'model_checkpoint_path: "\xff\xfe"\n')
    assert cm.get_checkpoint_state(tmp_path / "a") is None
    (tmp_path / "b" / "checkpoint").mkdir(parents=True)  # reading a directory fails
    assert cm.get_checkpoint_state(tmp_path / "b") is None


@pytest.mark.tf
def test_empty_model_checkpoint_path_raises_like_tensorflow(tmp_path: Path) -> None:
    tf = _tf()
    _touch(tmp_path / "checkpoint", b'all_model_checkpoint_paths: "ckpt-1"\n')
    with pytest.raises(ValueError):
        tf.train.get_checkpoint_state(str(tmp_path))
    with pytest.raises(CorruptCheckpointError, match="no model_checkpoint_path") as info:
        cm.get_checkpoint_state(tmp_path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, GpuSaverError)
    assert info.value.path == str(tmp_path / "checkpoint")
    with pytest.raises(ValueError):
        cm.latest_checkpoint(tmp_path)


def test_unknown_fields_from_a_newer_writer_are_skipped(tmp_path: Path) -> None:
    _touch(tmp_path / "checkpoint", b'model_checkpoint_path: "c-1"\nfuture_field: 3\n')
    state = cm.get_checkpoint_state(tmp_path)
    assert state is not None and state.model_checkpoint_path == str(tmp_path / "c-1")


def test_latest_checkpoint_missing_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cm.update_checkpoint_state(tmp_path, str(tmp_path / "ckpt-1"))
    with caplog.at_level(logging.WARNING, logger="gpusaver.checkpoint_management"):
        assert cm.latest_checkpoint(tmp_path) is None
    assert "couldn't match files" in caplog.text
    _touch(tmp_path / "ckpt-1")  # a V1 checkpoint is the prefix itself
    assert cm.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-1")
    assert cm.latest_checkpoint(str(tmp_path), latest_filename="other") is None


# --------------------------------------------------------------------------- writing errors


@pytest.mark.tf
def test_state_file_path_conflict_raises_like_tensorflow(tmp_path: Path) -> None:
    tf = _tf()
    conflict = str(tmp_path / "checkpoint")
    with pytest.raises(RuntimeError):
        tf.compat.v1.train.update_checkpoint_state(str(tmp_path), conflict)
    with pytest.raises(RuntimeError, match="conflicts"):
        cm.update_checkpoint_state(tmp_path, conflict)
    with pytest.raises(RuntimeError):
        cm.update_checkpoint_state(tmp_path, str(tmp_path / "state"), latest_filename="state")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.tf
def test_timestamp_count_mismatch_raises_like_tensorflow(tmp_path: Path) -> None:
    tf = _tf()
    args = (str(tmp_path), str(tmp_path / "c-2"), [str(tmp_path / "c-1")])
    with pytest.raises(ValueError):
        tf.compat.v1.train.update_checkpoint_state(*args, all_model_checkpoint_timestamps=[1.0])
    with pytest.raises(ValueError, match="timestamps"):
        cm.update_checkpoint_state(*args, all_model_checkpoint_timestamps=[1.0])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a/b", "../checkpoint", "..", "."])
def test_latest_filename_is_joined_with_the_directory_as_tensorflow_does(tmp_path: Path, name: str) -> None:
    # TensorFlow joins latest_filename to the directory: a missing file is no state (None), never an error.
    assert cm.get_checkpoint_state(tmp_path, latest_filename=name) is None
    assert cm.latest_checkpoint(tmp_path, latest_filename=name) is None


def test_latest_filename_with_a_path_reads_that_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    prefix = tmp_path / "c-1"
    _touch(Path(f"{prefix}.index"))
    cm.update_checkpoint_state(tmp_path, str(prefix), latest_filename="sub/state")
    assert cm.latest_checkpoint(tmp_path, latest_filename="sub/state") == str(prefix)
    assert cm.latest_checkpoint(tmp_path / "sub", latest_filename="state") == str(prefix)


def test_path_like_arguments(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt-1"
    _touch(Path(f"{prefix}.index"))
    cm.update_checkpoint_state(tmp_path, prefix, all_model_checkpoint_paths=[prefix])
    assert cm.latest_checkpoint(tmp_path) == str(prefix)
    assert cm.checkpoint_exists(prefix)


# --------------------------------------------------------------------------- atomicity


def test_write_goes_through_a_uuid_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(src: str, dst: str) -> None:
        renames.append((src, dst))
        assert Path(src).read_bytes().startswith(b"model_checkpoint_path")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    cm.update_checkpoint_state(tmp_path, str(tmp_path / "c-1"))
    [(src, dst)] = renames
    assert dst == str(tmp_path / "checkpoint")
    assert re.fullmatch(re.escape(dst) + r"\.tmp[0-9a-f]{32}", src)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_keeps_old_state_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    cm.update_checkpoint_state(tmp_path, str(tmp_path / "c-1"))
    before = (tmp_path / "checkpoint").read_bytes()

    def fail(*args: Any) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(CheckpointWriteError) as info:
        cm.update_checkpoint_state(tmp_path, str(tmp_path / "c-2"))
    monkeypatch.undo()
    assert isinstance(info.value, OSError) and info.value.errno == errno.EIO
    assert info.value.filename == str(tmp_path / "checkpoint")
    assert "unchanged" in str(info.value)
    assert (tmp_path / "checkpoint").read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_interrupted_write_removes_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        cm.update_checkpoint_state(tmp_path, str(tmp_path / "c-1"))
    assert list(tmp_path.iterdir()) == []


def test_durable_false_skips_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    cm.update_checkpoint_state(tmp_path, str(tmp_path / "c-1"), durable=False)
    assert synced == []
    cm.update_checkpoint_state(tmp_path, str(tmp_path / "c-2"))
    assert len(synced) == (2 if os.name != "nt" else 1)  # the file, then its directory
    assert cm.latest_checkpoint(tmp_path) is None  # no files, but the state was written
    state = cm.get_checkpoint_state(tmp_path)
    assert state is not None and state.model_checkpoint_path == str(tmp_path / "c-2")


@pytest.mark.skipif(os.name == "nt", reason="directories are not fsynced on Windows")
@pytest.mark.parametrize(("err", "fatal"), [(errno.EINVAL, False), (errno.EIO, True)])
def test_directory_fsync_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, fatal: bool
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(err, os.strerror(err))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if fatal:
        with pytest.raises(CheckpointWriteError, match="durable") as info:
            cm.update_checkpoint_state(tmp_path, str(tmp_path / "c-1"))
        assert info.value.errno == err
    else:  # a file system without directory fsync
        cm.update_checkpoint_state(tmp_path, str(tmp_path / "c-1"))
    state = cm.get_checkpoint_state(tmp_path)  # the rename happened either way
    assert state is not None and state.model_checkpoint_path == str(tmp_path / "c-1")
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- files


def _v2(prefix: Path, shards: int = 2) -> list[Path]:
    files = [_touch(Path(f"{prefix}.index"), b"i")]
    files += [_touch(Path(f"{prefix}.data-{i:05d}-of-{shards:05d}"), b"d") for i in range(shards)]
    return files


def test_remove_checkpoint_deletes_index_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "ckpt-1"
    _v2(prefix)
    _touch(tmp_path / "ckpt-1.meta")
    keep = _v2(tmp_path / "ckpt-10") + [_touch(tmp_path / "ckpt-1.other")]
    removed: list[str] = []
    real_remove = os.remove

    def recording_remove(path: str) -> None:
        removed.append(os.path.basename(path))
        real_remove(path)

    monkeypatch.setattr(os, "remove", recording_remove)
    cm.remove_checkpoint(prefix)
    assert removed == [
        "ckpt-1.index",
        "ckpt-1.data-00000-of-00002",
        "ckpt-1.data-00001-of-00002",
        "ckpt-1.meta",
    ]
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert not cm.checkpoint_exists(prefix)


def test_remove_checkpoint_tolerates_missing_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cm.remove_checkpoint(tmp_path / "never")
    _touch(tmp_path / "half.data-00000-of-00001")  # a crashed save: data, no index
    cm.remove_checkpoint(tmp_path / "half")
    assert list(tmp_path.iterdir()) == []

    # A file that vanishes between listing and deleting (a concurrent deleter).
    _v2(tmp_path / "race", shards=1)
    real_remove = os.remove

    def racing_remove(path: str) -> None:
        real_remove(path)
        if path.endswith(".data-00000-of-00001"):
            raise FileNotFoundError(errno.ENOENT, "gone", path)

    monkeypatch.setattr(os, "remove", racing_remove)
    with caplog.at_level(logging.WARNING, logger="gpusaver.checkpoint_management"):
        cm.remove_checkpoint(tmp_path / "race")
    assert "already gone" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_remove_checkpoint_takes_the_prefix_literally(tmp_path: Path) -> None:
    _v2(tmp_path / "a[1]")
    other = _v2(tmp_path / "a1")
    cm.remove_checkpoint(tmp_path / "a[1]")
    assert sorted(tmp_path.iterdir()) == sorted(other)


def test_remove_v1_checkpoint(tmp_path: Path) -> None:
    shards = [_touch(tmp_path / f"model-{i:05d}-of-00002") for i in range(2)]
    _touch(tmp_path / "model.meta")
    keep = _touch(tmp_path / "model-keep")
    cm.remove_checkpoint(str(tmp_path / "model-?????-of-00002"), SaverDef.V1)
    assert list(tmp_path.iterdir()) == [keep]
    assert not any(p.exists() for p in shards)
    _touch(tmp_path / "single")
    cm.remove_checkpoint(tmp_path / "single", checkpoint_format_version=SaverDef.LEGACY)
    assert list(tmp_path.iterdir()) == [keep]


@pytest.mark.tf
def test_remove_checkpoint_leaves_what_tensorflow_leaves(tmp_path: Path) -> None:
    tf_cm = _tf_cm()
    for directory, remove in (
        (tmp_path / "tf", tf_cm.remove_checkpoint),
        (tmp_path / "ours", cm.remove_checkpoint),
    ):
        _v2(directory / "ckpt-1", shards=3)
        _v2(directory / "ckpt-2")
        _touch(directory / "ckpt-1.meta")
        _touch(directory / "v1-00000-of-00001")
        remove(str(directory / "ckpt-1"))
        remove(str(directory / "v1-?????-of-00001"), SaverDef.V1)
    assert sorted(p.name for p in (tmp_path / "tf").iterdir()) == sorted(
        p.name for p in (tmp_path / "ours").iterdir()
    )


@pytest.mark.tf
def test_checkpoint_exists_like_tensorflow(tmp_path: Path) -> None:
    tf = _tf()
    _v2(tmp_path / "v2")
    _touch(tmp_path / "v1")
    _touch(tmp_path / "dataonly.data-00000-of-00001")
    cases = {"v2": True, "v1": True, "v*": True, "dataonly": False, "missing": False}
    for name, exists in cases.items():
        prefix = str(tmp_path / name)
        assert cm.checkpoint_exists(prefix) is exists, name
        assert tf.compat.v1.train.checkpoint_exists(prefix) is exists, name


@pytest.mark.tf
def test_get_checkpoint_mtimes_like_tensorflow(tmp_path: Path) -> None:
    tf = _tf()
    _v2(tmp_path / "v2")
    os.utime(tmp_path / "v2.index", ns=(0, 1_700_000_000_123_456_789))
    os.utime(tmp_path / "v2.data-00000-of-00002", ns=(0, 1_600_000_000_000_000_000))
    _touch(tmp_path / "v1")
    os.utime(tmp_path / "v1", ns=(0, 1_500_000_000_500_000_000))
    prefixes = [str(tmp_path / n) for n in ("v2", "missing", "v1")]
    ours = cm.get_checkpoint_mtimes(prefixes)
    assert ours == pytest.approx([1_700_000_000.123456789, 1_500_000_000.5], abs=1e-6)
    # TensorFlow's POSIX file system reports whole seconds; we keep the nanoseconds.
    assert [float(int(t)) for t in ours] == tf.compat.v1.train.get_checkpoint_mtimes(prefixes)
    assert cm.get_checkpoint_mtimes(iter([Path(prefixes[0])])) == ours[:1]
    assert cm.get_checkpoint_mtimes([]) == []


def test_checkpoint_state_class_is_reexported() -> None:
    assert cm.CheckpointState is CheckpointState
