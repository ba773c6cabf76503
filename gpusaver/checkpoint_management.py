"""The ``checkpoint`` state file, and finding, dating and deleting checkpoints.

A directory of checkpoints holds a small text file, ``checkpoint`` by default,
that names the newest checkpoint and the ones still kept. It is a
``tensorflow.CheckpointState`` message in protobuf text format, and this module
reads and writes it exactly as TensorFlow does, so TensorFlow's
``tf.train.latest_checkpoint`` finds checkpoints gpusaver wrote and the other
way round. The state file is always replaced atomically (temporary file, then
rename), so a reader sees either the old or the new state, never a mix.

A checkpoint is named by its *prefix*, e.g. ``/run/ckpt-7``. A V2 checkpoint is
the file ``<prefix>.index`` plus the data files ``<prefix>.data-?????-of-?????``;
it exists once ``<prefix>.index`` exists. A V1 checkpoint is the single file
named by the prefix. Like TensorFlow, the lookups here treat the prefix as a
glob pattern (``*``, ``?`` and ``[`` are wildcards), but a path that exists
literally is taken literally first, so a real directory such as
``runs/layers=[1,2]`` always finds its own checkpoints and never others.
Paths may be ``file://`` URIs wherever a local path is accepted; they are kept
as spelled in what is returned and recorded, as TensorFlow keeps them.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import TypeAlias

from google.protobuf import text_format

from gpusaver._proto.checkpoint_state_pb2 import CheckpointState
from gpusaver._proto.saver_pb2 import SaverDef
from gpusaver.errors import (
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StatePathConflictError,
    write_error,
)
from gpusaver.storage.fileops import POSIX, FileOps
from gpusaver.format.naming import data_files
from gpusaver.storage.paths import literal_or_glob, local_path, read_regular

__all__ = [
    "CheckpointState",
    "checkpoint_exists",
    "generate_checkpoint_state_proto",
    "get_checkpoint_mtimes",
    "get_checkpoint_state",
    "latest_checkpoint",
    "remove_checkpoint",
    "update_checkpoint_state",
]

logger = logging.getLogger(__name__)

#: The default name of the state file inside a checkpoint directory.
DEFAULT_STATE_FILENAME = "checkpoint"

StrPath: TypeAlias = "str | os.PathLike[str]"

# The shard suffix of a sharded V1 prefix, e.g. "-?????-of-00004".
_SHARD_SUFFIX = re.compile(r"-[\d?]+-of-\d+$")


def _state_file_path(directory: StrPath, latest_filename: str | None) -> str:
    """The state file's path: ``directory/(latest_filename or "checkpoint")``, joined as TensorFlow joins it."""
    return os.path.join(os.fspath(directory), latest_filename or DEFAULT_STATE_FILENAME)


#: A state file is a few lines per checkpoint; anything much larger is not one.
_STATE_FILE_LIMIT = 64 << 20


def generate_checkpoint_state_proto(
    save_dir: StrPath,
    model_checkpoint_path: StrPath,
    all_model_checkpoint_paths: Sequence[StrPath] | None = None,
    all_model_checkpoint_timestamps: Sequence[float] | None = None,
    last_preserved_timestamp: float | None = None,
) -> CheckpointState:
    """Build the CheckpointState that TensorFlow would build for these inputs.

    ``model_checkpoint_path`` is appended to ``all_model_checkpoint_paths``
    unless it is already the last element. When ``save_dir`` is relative,
    every relative path is rewritten relative to ``save_dir`` (readers join
    relative paths with the directory). The inputs are not modified.

    Args:
        save_dir: the directory the state file lives in.
        model_checkpoint_path: prefix of the newest checkpoint.
        all_model_checkpoint_paths: prefixes of the checkpoints kept, oldest
            first.
        all_model_checkpoint_timestamps: their creation times in Unix seconds,
            one per path (after the append above), or None.
        last_preserved_timestamp: Unix time of the last checkpoint kept for
            good, or None.

    Returns:
        The state message.

    Raises:
        ValueError: if timestamps are given and their count differs from the
            number of paths.
    """
    save_dir = os.fspath(save_dir)
    model_path = os.fspath(model_checkpoint_path)
    all_paths = [os.fspath(p) for p in all_model_checkpoint_paths or ()]
    if not all_paths or all_paths[-1] != model_path:
        logger.info("%s is not in all_model_checkpoint_paths; adding it", model_path)
        all_paths.append(model_path)

    if all_model_checkpoint_timestamps and len(all_model_checkpoint_timestamps) != len(
        all_paths
    ):
        raise InvalidArgumentError(
            "checkpoint timestamps, if given, must match the checkpoint paths one for one: "
            f"got {len(all_paths)} paths {all_paths} and "
            f"{len(all_model_checkpoint_timestamps)} timestamps "
            f"{list(all_model_checkpoint_timestamps)}"
        )

    if not os.path.isabs(save_dir):
        if not os.path.isabs(model_path):
            model_path = os.path.relpath(model_path, save_dir)
        all_paths = [p if os.path.isabs(p) else os.path.relpath(p, save_dir) for p in all_paths]

    return CheckpointState(
        model_checkpoint_path=model_path,
        all_model_checkpoint_paths=all_paths,
        all_model_checkpoint_timestamps=all_model_checkpoint_timestamps,
        last_preserved_timestamp=last_preserved_timestamp,
    )


def _atomic_write(path: str, data: bytes, durable: bool, ops: FileOps) -> None:
    """Replace ``path`` by a file holding ``data``, atomically.

    Writes ``<path>.tmp<uuid4 hex>`` in the same directory, then renames it
    over ``path``. On any error the temporary file is removed and ``path`` is
    left as it was. Every operation goes through ``ops``.

    Raises:
        CheckpointWriteError: on an operating-system error (errno kept).
    """
    path = local_path(path)
    tmp = f"{path}.tmp{uuid.uuid4().hex}"
    try:
        fd = ops.create(tmp)
        try:
            ops.write(fd, [memoryview(data)])
            if durable:
                ops.fsync(fd)
        finally:
            ops.close(fd)
        ops.rename(tmp, path)
    except BaseException as e:
        try:
            ops.remove(tmp)
        except FileNotFoundError:
            pass
        except OSError as cleanup_error:
            logger.warning("could not remove temporary file %s: %s", tmp, cleanup_error)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            raise write_error(
                e.errno,
                f"could not write checkpoint state file {path!r}: {e.strerror or e}; "
                "the previous state file, if any, is unchanged",
                path,
            ) from e
        raise
    if durable:
        try:
            ops.fsync_dir(os.path.dirname(path) or os.curdir)
        except OSError as e:
            raise write_error(
                e.errno,
                f"wrote checkpoint state file {path!r} but could not make it durable: "
                f"{e.strerror or e}",
                path,
            ) from e


def update_checkpoint_state(
    save_dir: StrPath,
    model_checkpoint_path: StrPath,
    all_model_checkpoint_paths: Sequence[StrPath] | None = None,
    latest_filename: str | None = None,
    all_model_checkpoint_timestamps: Sequence[float] | None = None,
    last_preserved_timestamp: float | None = None,
    save_relative_paths: bool = False,
    durable: bool = True,
    fileops: FileOps | None = None,
    _check_collision: bool = True,
) -> None:
    """Write the state file, byte for byte as TensorFlow writes it.

    With ``save_relative_paths=True`` (what ``tf.train.Checkpoint.save`` and
    ``tf.train.CheckpointManager`` use) absolute paths are stored relative to
    ``save_dir``; otherwise they are stored as given. Relative paths follow
    :func:`generate_checkpoint_state_proto`. The file is replaced atomically.

    Args:
        save_dir: the directory to write the state file into.
        model_checkpoint_path: prefix of the newest checkpoint.
        all_model_checkpoint_paths: prefixes of the checkpoints kept, oldest
            first; ``model_checkpoint_path`` is appended if it is not last.
        latest_filename: the state file's name; ``"checkpoint"`` by default.
        all_model_checkpoint_timestamps: creation times, one per path.
        last_preserved_timestamp: Unix time of the last checkpoint kept for
            good.
        save_relative_paths: store absolute paths relative to ``save_dir``.
        durable: fsync the file and its directory, so that the new state
            survives a power failure.
        fileops: the file operations to use (tests inject faults here).

    Raises:
        ValueError: if the timestamps do not match the paths one for one.
        StatePathConflictError: (a RuntimeError, as in TensorFlow) if the state
            file's path equals the stored ``model_checkpoint_path``.
        CheckpointWriteError: if the file cannot be written; the previous
            state file is then unchanged.
    """
    save_dir = os.fspath(save_dir)
    state_file = _state_file_path(save_dir, latest_filename)
    model_path = os.fspath(model_checkpoint_path)
    all_paths = [os.fspath(p) for p in all_model_checkpoint_paths or ()]
    if save_relative_paths:

        def relative(p: str) -> str:
            return os.path.relpath(p, save_dir) if os.path.isabs(p) else p

        model_path = relative(model_path)
        all_paths = [relative(p) for p in all_paths]

    state = generate_checkpoint_state_proto(
        save_dir,
        model_path,
        all_model_checkpoint_paths=all_paths,
        all_model_checkpoint_timestamps=all_model_checkpoint_timestamps,
        last_preserved_timestamp=last_preserved_timestamp,
    )
    if _check_collision and state_file == state.model_checkpoint_path:
        raise StatePathConflictError(
            f"save path {model_path!r} conflicts with the path of the checkpoint state file "
            f"{state_file!r}; use a different save path"
        )
    text = text_format.MessageToString(state)
    _atomic_write(state_file, text.encode("utf-8"), durable, fileops or POSIX)


def get_checkpoint_state(
    checkpoint_dir: StrPath, latest_filename: str | None = None
) -> CheckpointState | None:
    """Read a directory's state file.

    Relative paths in the file are joined with ``checkpoint_dir``; absolute
    ones are kept. Fields unknown to this version (written by a newer
    TensorFlow) are skipped with a warning.

    Args:
        checkpoint_dir: the directory holding the state file.
        latest_filename: the state file's name; ``"checkpoint"`` by default.

    Returns:
        The state, or None if the file does not exist, cannot be read, is not a
        regular file (a FIFO is never waited on) or does not parse (logged as
        warnings).

    Raises:
        CorruptCheckpointError: (a ValueError) if the file parses but names no
            checkpoint, as TensorFlow does.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    state_file = _state_file_path(checkpoint_dir, latest_filename)
    try:
        content = read_regular(local_path(state_file), "checkpoint state file", _STATE_FILE_LIMIT)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, CorruptCheckpointError) as e:
        logger.warning("%s: %s: checkpoint state ignored", state_file, e)
        return None

    state = CheckpointState()
    try:
        text_format.Merge(content.decode("utf-8"), state, allow_unknown_field=True)
    except (text_format.ParseError, UnicodeDecodeError) as e:
        logger.warning("%s: %s: %s: checkpoint state ignored", state_file, type(e).__name__, e)
        return None
    if not state.model_checkpoint_path:
        raise CorruptCheckpointError(
            f"invalid checkpoint state loaded from {checkpoint_dir!r}: {state_file!r} has "
            "no model_checkpoint_path; fix or delete the file",
            state_file,
        )
    if not os.path.isabs(state.model_checkpoint_path):
        state.model_checkpoint_path = os.path.join(checkpoint_dir, state.model_checkpoint_path)
    for i, path in enumerate(state.all_model_checkpoint_paths):
        if not os.path.isabs(path):
            state.all_model_checkpoint_paths[i] = os.path.join(checkpoint_dir, path)
    return state


def _index_path(checkpoint_prefix: str) -> str:
    """The V2 metadata file of a checkpoint prefix."""
    return checkpoint_prefix + ".index"


def latest_checkpoint(
    checkpoint_dir: StrPath, latest_filename: str | None = None
) -> str | None:
    """The prefix of the newest checkpoint in ``checkpoint_dir``, if it exists.

    Args:
        checkpoint_dir: the directory holding the state file.
        latest_filename: the state file's name; ``"checkpoint"`` by default.

    Returns:
        The state file's ``model_checkpoint_path`` (joined with the directory
        when relative) if a V2 (``<prefix>.index``) or V1 (``<prefix>``)
        checkpoint matches it; None otherwise, with a warning when the state
        file names a checkpoint that is missing.

    Raises:
        CorruptCheckpointError: as :func:`get_checkpoint_state`.
    """
    state = get_checkpoint_state(checkpoint_dir, latest_filename)
    if state is None or not state.model_checkpoint_path:
        return None
    prefix = state.model_checkpoint_path
    if checkpoint_exists(prefix):
        return prefix
    logger.warning("couldn't match files for checkpoint %s", prefix)
    return None


def checkpoint_exists(checkpoint_prefix: StrPath) -> bool:
    """Whether a V2 (``<prefix>.index``) or V1 (``<prefix>``) checkpoint exists.

    Both are taken literally first, then as glob patterns, as in TensorFlow.
    """
    prefix = local_path(checkpoint_prefix)
    return bool(literal_or_glob(_index_path(prefix)) or literal_or_glob(prefix))


def get_checkpoint_mtimes(checkpoint_prefixes: Iterable[StrPath]) -> list[float]:
    """The modification times of checkpoints, in Unix seconds.

    A V2 checkpoint is dated by its ``.index`` file, a V1 checkpoint by its
    file (each taken literally first, then as a glob pattern). Checkpoints that
    do not exist are skipped, so the result may be shorter than the input.
    Unlike TensorFlow, whose POSIX file system reports whole seconds, the times
    keep the file system's sub-second part.
    """
    mtimes: list[float] = []
    for checkpoint_prefix in checkpoint_prefixes:
        prefix = local_path(checkpoint_prefix)
        for pattern in (_index_path(prefix), prefix):
            matches = literal_or_glob(pattern)
            if matches:
                try:
                    mtimes.append(os.stat(matches[0]).st_mtime_ns / 1e9)
                except OSError:  # gone meanwhile, a dangling link or a symlink loop: no checkpoint there
                    continue
                break
    return mtimes


def _remove(path: str, ops: FileOps) -> bool:
    """Delete one file; a file that is already gone is logged, not an error."""
    try:
        ops.remove(path)
    except FileNotFoundError:
        logger.warning(
            "%s was already gone when deleting it; another process may be deleting the "
            "same checkpoint",
            path,
        )
        return False
    return True


def remove_checkpoint(
    checkpoint_prefix: StrPath,
    checkpoint_format_version: int = SaverDef.V2,
    meta_graph_suffix: str = "meta",
    *,
    fileops: FileOps | None = None,
) -> None:
    """Delete a checkpoint's files, or those of every checkpoint a glob pattern matches.

    As in TensorFlow, ``checkpoint_prefix`` may be a glob pattern. A checkpoint
    that exists literally under that name is taken literally, so a real path
    holding ``[``, ``*`` or ``?`` deletes only its own files. For V2, each
    ``<prefix>.index`` is deleted first, so the checkpoint stops existing at
    once, then its ``<prefix>.data-?????-of-?????`` files. For V1 (or legacy)
    checkpoints, the files matching the prefix are deleted. The TF1 meta graph
    file ``<prefix>.<meta_graph_suffix>`` goes last (for a sharded V1 prefix
    ``model-?????-of-00004``, that is ``model.meta``). Nothing but index, data
    and meta files is deleted; files that are missing are skipped.

    Args:
        checkpoint_prefix: the checkpoint's prefix, or a glob pattern of prefixes.
        checkpoint_format_version: ``SaverDef.V2`` (the default), ``SaverDef.V1``
            or ``SaverDef.LEGACY``.
        meta_graph_suffix: suffix of the TF1 meta graph file.
        fileops: the file operations to use (tests inject faults here).

    Raises:
        OSError: if a file exists but cannot be deleted.
    """
    prefix = local_path(checkpoint_prefix)
    literal = glob.escape(prefix)
    if checkpoint_format_version == SaverDef.V2:
        exists = os.path.lexists(_index_path(prefix)) or bool(data_files(prefix))
    else:
        exists = os.path.lexists(prefix)
    _remove_matching(
        literal if exists else _pattern(prefix), checkpoint_format_version, meta_graph_suffix, fileops or POSIX
    )


def _pattern(prefix: str) -> str:
    """``prefix`` as a glob pattern, its directory part literal when that directory exists."""
    directory, base = os.path.split(prefix)
    if directory and os.path.isdir(directory):
        return os.path.join(glob.escape(directory), base)
    return prefix


def _remove_matching(pattern: str, version: int, meta_graph_suffix: str, ops: FileOps) -> None:
    """Deletes the index, data and meta files of the checkpoints a glob pattern matches."""
    if version == SaverDef.V2:
        indexes = sorted(glob.glob(_index_path(pattern)))
        if not indexes:
            logger.info("no checkpoint index matches %s.index", pattern)
        for path in indexes:
            _remove(path, ops)
        for path in sorted(glob.glob(pattern + ".data-?????-of-?????")):
            _remove(path, ops)
    else:
        for path in sorted(glob.glob(pattern)):
            _remove(path, ops)
    for path in sorted(glob.glob(f"{_SHARD_SUFFIX.sub('', pattern)}.{meta_graph_suffix}")):
        _remove(path, ops)


def remove_checkpoint_literally(
    checkpoint_prefix: StrPath, *, meta_graph_suffix: str | None = "meta", fileops: FileOps | None = None
) -> None:
    """Deletes one V2 checkpoint's files, the prefix taken literally (retention's deletion).

    ``<prefix>.index`` goes first, then its data files, then ``<prefix>.<meta_graph_suffix>``.

    Raises:
        OSError: if a file exists but cannot be deleted.
    """
    prefix = local_path(checkpoint_prefix)
    ops = fileops or POSIX
    # No glob: a pattern made of each checkpoint's own name would fill fnmatch's cache, save after save.
    index = _index_path(prefix)
    if os.path.lexists(index):
        _remove(index, ops)
    else:
        logger.info("no checkpoint index matches %s", index)
    for path in data_files(prefix):
        _remove(path, ops)
    meta = None if meta_graph_suffix is None else f"{_SHARD_SUFFIX.sub('', prefix)}.{meta_graph_suffix}"
    if meta is not None and os.path.lexists(meta):
        _remove(meta, ops)
