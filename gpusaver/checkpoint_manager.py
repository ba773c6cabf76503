"""CheckpointManager: a numbered series of checkpoints in one directory, that survives restarts.

As TensorFlow 2's ``tf.train.CheckpointManager`` and Orbax's ``CheckpointManager``::

    manager = gpusaver.CheckpointManager("ckpts", max_to_keep=3)
    manager.restore(into=state) if manager.latest_step() is not None else None
    for step in range(start, steps):
        ...
        manager.save(step, state)          # ckpts/ckpt-<step>, then the state file, then retention

Each save writes ``<directory>/<prefix>-<step>`` with :func:`gpusaver.api.save` (atomic), then
records it in the directory's ``checkpoint`` state file (TensorFlow's format, with timestamps
and ``last_preserved_timestamp`` as TensorFlow 2 writes them), then deletes what retention drops.

**The directory is the truth.** On construction, and again under the directory's lock at every
save, the manager reads the state file *and* lists the ``<prefix>-<step>.index`` files on disk,
so a checkpoint committed by a process that died before it wrote the state file is found, and a
series left by an earlier run (or by a :class:`~gpusaver.Saver` that forgot its old checkpoints
on a restart) is trimmed to ``max_to_keep`` by the next save.

**It deletes only its own series.** Only ``<prefix>-<step>`` checkpoints in its directory
(``step`` a decimal integer without leading zeros) are candidates; files of other prefixes, a
user's files and other writers' state-file entries are never touched; a temp directory of a live
save is never touched (stale ones are cleaned by :func:`gpusaver.pipeline.tempdirs.clean_stale_temp_dirs`,
as every save does). A dropped checkpoint gets a tombstone before the state file stops listing
it, and is deleted with retention's own routine (:meth:`gpusaver.pipeline.retention.Retention.delete`).

**Kept for good** (``keep_checkpoint_every_n_hours``): as TensorFlow 2, a checkpoint leaving the
newest ``max_to_keep`` is kept for good when it is at least that many hours newer than the last
one kept for good (at first, than the manager's first construction on the directory). Those
stay listed in the state file, and a listed checkpoint whose timestamp is not after the file's
``last_preserved_timestamp`` is one kept for good: so they survive restarts too. Timestamps of
one series are made strictly increasing (by the smallest float step when the clock has not
moved), so that this reading is exact.

Concurrency (what is supported): several managers (threads, processes) on one directory with
*distinct prefixes*; each state-file update is a read-modify-write under an exclusive ``flock``
of the directory (the commit lock of :mod:`gpusaver.format.merge`), keeping the other series'
entries, so no manager's record is lost or torn. Two managers of *one* prefix take turns safely
(each save re-reads the directory), but two saves of the same step at once are not supported:
one would replace the other. A writer that rewrites the state file on its own (a ``Saver``,
TensorFlow) drops the manager's entries: the checkpoints are still found on disk, but which old
ones were kept for good is forgotten.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import stat
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from gpusaver import api
from gpusaver import tree as trees
from gpusaver import checkpoint_management as cm
from gpusaver.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StepAlreadyExistsError,
    InvalidArgumentTypeError,
    InvalidCheckpointPathError,
    SaverBusyError,
)
from gpusaver.format.merge import commit_lock as _directory_lock
from gpusaver.pipeline.retention import Retention
from gpusaver.pipeline.tempdirs import TempDir, make_temp_dir
from gpusaver.storage import paths
from gpusaver.storage.fileops import POSIX, FileOps

__all__ = ["CheckpointManager"]

logger = logging.getLogger(__name__)


def _positive_int(value: Any, what: str, *, none_ok: bool = False) -> int | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentTypeError(f"{what} must be a positive integer{' or None' if none_ok else ''}, not {value!r}")
    if value <= 0:
        raise InvalidArgumentError(f"{what} must be a positive integer{' or None' if none_ok else ''}, not {value!r}")
    return int(value)


def _step_value(step: Any) -> int:
    """A step: a non-negative int (NumPy integers too; bools refused)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise InvalidArgumentTypeError(f"a step is a non-negative integer, not {type(step).__name__} {step!r}")
    if step < 0:
        raise InvalidArgumentError(f"a step is a non-negative integer, not {step!r}")
    return int(step)


def _saver_variables(tree: Any) -> dict[str, Any]:
    """The variables :func:`gpusaver.save` writes for ``tree`` (its structure tensor included), for
    ``Saver.save_async``: an asynchronous save gives the same files."""
    return trees.variables(tree)


class _Series:
    """What the directory says of one prefix's checkpoints: steps, their timestamps, the ones kept for good."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self.for_good: set[int] = set()
        self.last_preserved: float | None = None  # None: no manager recorded one
        self.foreign: list[tuple[str, float | None]] = []  # other writers' state-file entries, as listed


class CheckpointManager:
    """Saves a numbered series of checkpoints in one directory and keeps the newest of them.

    Args:
        directory: where the checkpoints and the state file live (created by the first save).
        max_to_keep: how many of the newest checkpoints to keep; None keeps all.
        keep_checkpoint_every_n_hours: additionally keep for good one checkpoint per this many hours.
        save_interval_steps: :meth:`save` writes only steps that are a multiple of this (or ``force``).
        async_save: :meth:`save` returns once the tree's values are captured; the write, the state
            file and retention happen in the background (see :meth:`save`).
        prefix: checkpoints are ``<directory>/<prefix>-<step>``.
        state_file: the state file's name in ``directory``.
        durable: fsync the state file (the checkpoints themselves are always saved durably).
        fileops: file operations of the state file, the tombstones and deletions, and the phases
            ``save:committed`` and ``state:written`` (tests inject faults and kills here); with
            ``async_save`` also those of the checkpoint's own writes (:func:`gpusaver.save`
            takes none).
        clock: the time source of the timestamps (``time.time``); tests pass a controllable one.

    Raises:
        InvalidArgumentError: a directory that is a file, a bad prefix or state file name,
            ``max_to_keep``/``save_interval_steps`` not positive, ``keep_checkpoint_every_n_hours``
            not positive (InvalidArgumentTypeError, also a TypeError, for a wrong type). Nothing is
            written.
    """

    def __init__(
        self,
        directory: "str | os.PathLike[str]",
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        save_interval_steps: int = 1,
        async_save: bool = False,
        *,
        prefix: str = "ckpt",
        state_file: str = cm.DEFAULT_STATE_FILENAME,
        durable: bool = True,
        fileops: FileOps | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise InvalidArgumentTypeError(f"directory must be a path, not {type(directory).__name__}")
        self._directory = os.fspath(directory)
        if not self._directory:
            raise InvalidArgumentError("directory must not be empty (give '.' for the working directory)")
        self._local = paths.local_path(self._directory)
        if os.path.exists(self._local) and not os.path.isdir(self._local):
            raise InvalidArgumentError(f"cannot keep checkpoints in {self._directory!r}: it is not a directory")
        self._max_to_keep = _positive_int(max_to_keep, "max_to_keep", none_ok=True)
        hours = keep_checkpoint_every_n_hours
        if hours is not None:
            if isinstance(hours, bool) or not isinstance(hours, numbers.Real):
                raise InvalidArgumentTypeError(f"keep_checkpoint_every_n_hours must be a number or None, not {hours!r}")
            if not hours > 0 or not math.isfinite(hours):
                raise InvalidArgumentError(f"keep_checkpoint_every_n_hours must be positive, not {hours!r}")
        self._keep_seconds = None if hours is None else float(hours) * 3600.0
        self._interval = _positive_int(save_interval_steps, "save_interval_steps")
        self._async = bool(async_save)
        for name, value in (("prefix", prefix), ("state_file", state_file)):
            if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or os.sep in value:
                raise InvalidArgumentError(f"{name} must be a plain file name, not {value!r}")
        if re.fullmatch(re.escape(prefix) + r"-(0|[1-9][0-9]*)(\.index|\.data-\d{5}-of-\d{5})", state_file):
            raise InvalidArgumentError(f"state_file {state_file!r} would be a file of a checkpoint of prefix {prefix!r}")
        self._prefix = prefix
        self._pattern = re.compile(re.escape(prefix) + r"-(0|[1-9][0-9]*)")
        self._state_file = state_file
        self._durable = durable
        self._ops = fileops or POSIX
        self._clock = clock
        self._lock = threading.Lock()  # one public call at a time
        self._cache_lock = threading.Lock()  # the steps known, updated by the background recording too
        self._pending: tuple[threading.Thread, int, list[BaseException]] | None = None
        self._closed = False
        series = self._read()
        if series.last_preserved is None:
            series.last_preserved = float(clock())  # as TensorFlow 2: the first manager's construction
        self._first_preserved = series.last_preserved
        self._steps = sorted(series.times)

    # ----------------------------------------------------------- properties
    @property
    def directory(self) -> str:
        """The directory, as given."""
        return self._directory

    @property
    def checkpoints(self) -> list[str]:
        """The prefixes of the checkpoints kept, oldest first (joined with :attr:`directory`)."""
        return [self._path(s) for s in self.all_steps()]

    def all_steps(self) -> list[int]:
        """The steps of the checkpoints kept (committed and recorded), ascending.

        A pending asynchronous save's step is not among them until it has finished.
        """
        with self._cache_lock:
            return list(self._steps)

    def latest_step(self) -> int | None:
        """The newest step kept, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _path(self, step: int) -> str:
        return os.path.join(self._directory, f"{self._prefix}-{step}")

    # ----------------------------------------------------------- discovery
    def _mine(self, path: str) -> int | None:
        """The step of a state-file entry or an index file's prefix that is this series', else None."""
        head, base = os.path.split(path)
        m = self._pattern.fullmatch(base)
        if m is None:
            return None
        if paths.directory_identity(head or ".") != paths.directory_identity(self._local):
            return None
        return int(m.group(1))

    def _on_disk(self) -> dict[int, float]:
        """The series' committed checkpoints: regular ``<prefix>-<step>.index`` files, by step, with their mtimes."""
        try:
            names = os.listdir(self._local)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found: dict[int, float] = {}
        for name in names:
            if not name.endswith(".index"):
                continue
            m = self._pattern.fullmatch(name[: -len(".index")])
            if m is None:
                continue
            try:
                st = os.lstat(os.path.join(self._local, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):  # a link, FIFO or directory of that name is no checkpoint of ours
                found[int(m.group(1))] = st.st_mtime_ns / 1e9
        return found

    def _read(self) -> _Series:
        """The series as the state file and the disk tell it (the disk decides what exists)."""
        series = _Series()
        disk = self._on_disk()
        try:
            state = cm.get_checkpoint_state(self._local, self._state_file)
        except CorruptCheckpointError as e:
            logger.warning("%s: %s; the next save rewrites it", self._directory, e)
            state = None
        listed: dict[int, float | None] = {}
        if state is not None:
            stamps = list(state.all_model_checkpoint_timestamps)
            entries = list(state.all_model_checkpoint_paths)
            aligned = len(stamps) == len(entries)
            if state.last_preserved_timestamp > 0:
                series.last_preserved = state.last_preserved_timestamp
            for i, path in enumerate(entries):
                stamp = stamps[i] if aligned else None
                try:
                    step = self._mine(paths.local_path(path))
                except InvalidArgumentError:  # another writer's URL: not ours
                    step = None
                if step is None:
                    series.foreign.append((path, stamp))
                else:
                    listed[step] = stamp
        for step in sorted(disk):
            stamp = listed.get(step)
            series.times[step] = stamp if stamp is not None else disk[step]
            if step in listed and stamp is not None and series.last_preserved is not None and stamp <= series.last_preserved:
                series.for_good.add(step)
        return series

    def _normalise(self, series: _Series) -> None:
        """Makes the timestamps of the checkpoints not kept for good strictly increasing and after
        ``last_preserved`` (so that a restart tells them from those kept for good)."""
        floor = series.last_preserved
        assert floor is not None
        for step in sorted(series.times):
            if step in series.for_good:
                continue
            if series.times[step] <= floor:
                series.times[step] = math.nextafter(floor, math.inf)
            floor = series.times[step]

    # ---------------------------------------------------------------- save
    def save(self, step: Any, tree: Mapping[str, Any], *, force: bool = False) -> str | None:
        """Saves ``tree`` as checkpoint ``<directory>/<prefix>-<step>``, records it, applies retention.

        Args:
            step: a non-negative integer, greater than every step of the series.
            tree: what :func:`gpusaver.save` accepts.
            force: save even when ``step`` is not a multiple of ``save_interval_steps``.

        Returns:
            The checkpoint's prefix; None when the step is skipped (``save_interval_steps``).
            With ``async_save``, the prefix the background save writes (it exists once
            :meth:`wait_until_finished` returns).

        Raises:
            InvalidArgumentError: a negative step (InvalidArgumentTypeError for a non-integer or a bool).
            InvalidArgumentError: the step exists, or is not newer than the newest step (also
                a pending asynchronous one). The series only grows: to go back to an earlier step,
                use another prefix or directory.
            the error of a previous asynchronous save nobody collected (this save is then not made).
            what :func:`gpusaver.save` raises; a failure there commits nothing.
            CheckpointWriteError: the state file could not be written; the checkpoint stays on
                disk, complete, and is part of the series (as after a crash at that point).
        """
        step = _step_value(step)
        with self._lock:
            self._check_open()
            self._settle()
            if not force and step % self._interval:
                return None
            on_disk = self._on_disk()  # another manager of this prefix may have saved since
            newest = max([*self._steps[-1:], *on_disk], default=None)
            path = self._path(step)
            if step in self._steps or step in on_disk or os.path.lexists(paths.local_path(path) + ".index"):
                raise StepAlreadyExistsError(f"step {step} exists already in {self._directory!r} ({path})")
            if newest is not None and step <= newest:
                raise StepAlreadyExistsError(
                    f"step {step} is not newer than the newest step {newest} in {self._directory!r}; "
                    "the series only grows (use another prefix or directory to save earlier steps)"
                )
            if not self._async:
                api.save(tree, path)
                self._ops.phase("save:committed")
                self._record(step)
                return path
            self._start_async(step, path, tree)
            return path

    def _start_async(self, step: int, path: str, tree: Mapping[str, Any]) -> None:
        """``Saver.save_async`` over the flattened tree; a thread records the step once it is committed."""
        from gpusaver.saver import Saver

        flat = _saver_variables(tree)
        os.makedirs(self._local, exist_ok=True)
        saver = Saver(flat, sharded=True, max_to_keep=None, durable=True, fileops=self._ops)
        try:
            handle = saver.save_async(path, write_state=False)
        except BaseException:
            saver.close()
            raise
        errors: list[BaseException] = []

        def finish() -> None:
            try:
                handle.result()
                self._record(step)
            except BaseException as e:  # noqa: BLE001 - raised by the manager's next call
                errors.append(e)
            finally:
                try:
                    saver.close()
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

        thread = threading.Thread(target=finish, name=f"checkpoint-manager-{self._prefix}-{step}", daemon=False)
        thread.start()
        self._pending = (thread, step, errors)

    def _record(self, step: int) -> None:
        """Under the directory's lock: re-reads the series, adds ``step``, writes the state file, deletes
        what retention drops (tombstoned before the state file stops listing them)."""
        ops = self._ops
        with _directory_lock(self._local):
            series = self._read()
            if series.last_preserved is None:
                series.last_preserved = self._first_preserved
            series.times[step] = float(self._clock())  # just saved (the disk gave its mtime)
            series.for_good.discard(step)
            self._normalise(series)
            doomed_steps = self._select(series, step)
            doomed: list[tuple[str, TempDir]] = []
            try:
                for s in doomed_steps:
                    local = os.path.join(self._local, f"{self._prefix}-{s}")
                    doomed.append((local, make_temp_dir(local, ops, deleting=True, state_file=self._state_file)))
                    del series.times[s]
                self._write_state(series)
            except BaseException:
                for _, tombstone in doomed:  # nothing was dropped
                    tombstone.remove(ops)
                with self._cache_lock:
                    self._steps = sorted(set(self._steps) | {step})
                raise
            ops.phase("state:written")
            with self._cache_lock:
                self._steps = sorted(series.times)
            # The manager writes no meta graph: naming the index (removed first) as the "meta
            # file" makes retention's routine delete the index and data files and nothing else.
            while doomed:
                Retention.delete(*doomed.pop(0), None, ops)  # no meta graph: a user's .meta file stays

    def _select(self, series: _Series, saved: int) -> list[int]:
        """The steps retention drops, oldest first (never ``saved``); marks those kept for good."""
        if self._max_to_keep is None:
            return []
        recent = sorted(s for s in series.times if s not in series.for_good)
        doomed = []
        while len(recent) > self._max_to_keep:
            s = recent.pop(0)
            if s == saved:
                continue
            stamp = series.times[s]
            assert series.last_preserved is not None
            if self._keep_seconds is not None and stamp - self._keep_seconds >= series.last_preserved:
                series.for_good.add(s)
                series.last_preserved = stamp
                continue
            doomed.append(s)
        return doomed

    def _write_state(self, series: _Series) -> None:
        """The state file: other writers' entries as they were, then the series by step; the newest
        step is ``model_checkpoint_path``."""
        entries, stamps = [], []
        for path, stamp in series.foreign:
            if stamp is None:
                found = cm.get_checkpoint_mtimes([path])
                stamp = found[0] if found else 0.0
            entries.append(path)
            stamps.append(stamp)
        for s in sorted(series.times):
            entries.append(os.path.join(self._local, f"{self._prefix}-{s}"))
            stamps.append(series.times[s])
        cm.update_checkpoint_state(
            self._local,
            entries[-1],
            all_model_checkpoint_paths=entries,
            latest_filename=self._state_file,
            all_model_checkpoint_timestamps=stamps,
            last_preserved_timestamp=series.last_preserved,
            save_relative_paths=True,
            durable=self._durable,
            fileops=self._ops,
        )

    # ------------------------------------------------------------- waiting
    def _settle(self) -> None:
        """Waits for the pending asynchronous save; raises its error (once)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        thread, _, errors = pending
        if thread is threading.current_thread():
            self._pending = pending
            raise SaverBusyError("a call of the CheckpointManager from its own background save would wait for ever")
        thread.join()
        if errors:
            raise errors[0]

    def wait_until_finished(self) -> None:
        """Waits for the pending asynchronous save (committed, recorded, retention applied); raises its error."""
        with self._lock:
            self._settle()

    def close(self) -> None:
        """Waits for the pending asynchronous save and raises its error; later saves are refused."""
        with self._lock:
            self._closed = True
            self._settle()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError(f"the CheckpointManager of {self._directory!r} is closed")

    # ------------------------------------------------------------- restore
    def restore(self, step: Any = None, into: Mapping[str, Any] | None = None, **load_kwargs: Any) -> Any:
        """Reads checkpoint ``step`` (the newest when None), after any pending asynchronous save.

        Args:
            step: the step to read; None: :meth:`latest_step`.
            into: a tree to restore into in place (``gpusaver.load(path, like=into)``).
            load_kwargs: passed to :func:`gpusaver.load` (``strict``, ``cast``, ``device``, ...).

        Returns:
            :func:`gpusaver.load`'s result.

        Raises:
            CheckpointNotFoundError: the series is empty (the message names the directory).
            InvalidCheckpointPathError: no checkpoint of that step.
            what :func:`gpusaver.load` raises (a tree that does not fit, damaged data).
        """
        if step is not None:
            step = _step_value(step)
        with self._lock:
            self._settle()
            if step is None:
                step = self.latest_step()
                if step is None:
                    raise CheckpointNotFoundError(
                        f"no checkpoint {self._prefix}-<step> to restore in {self._directory!r}", self._directory
                    )
            path = self._path(step)
            if not os.path.isfile(paths.local_path(path) + ".index"):
                raise InvalidCheckpointPathError(
                    f"no checkpoint of step {step} in {self._directory!r} (steps: {self.all_steps()})", path
                )
        if into is not None:
            return api.load(path, like=into, **load_kwargs)
        return api.load(path, **load_kwargs)

    def __repr__(self) -> str:
        return f"CheckpointManager({self._directory!r}, prefix={self._prefix!r}, steps={self.all_steps()})"
