"""Saver: ``tf.compat.v1.train.Saver``, made eager, over NumPy and CuPy arrays.

No sessions and no graphs: ``save`` writes the arrays' current values,
``restore`` writes into the same array objects in place. Arguments that only
mean something for a graph (``name``, ``saver_def``'s tensor names,
``builder``, ``defer_build``, ``write_version`` other than V2, meta graphs)
are accepted where TensorFlow has them and documented as such in the README.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
import warnings

import errno
import logging
import math
import numbers
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np

from gpusaver import checkpoint_management as cm
from gpusaver.pipeline import gc_pause as _gc
from gpusaver.storage import paths
from gpusaver._proto.saver_pb2 import SaverDef
from gpusaver.backends.base import TensorList
from gpusaver.errors import (
    ChecksumError,
    CheckpointPermissionError,
    CheckpointWriteError,
    DTypeMismatchError,
    ShapeMismatchError,
    TensorNotFoundError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    InvalidCheckpointPathError,
    SaverBusyError,
    StatePathConflictError,
)
from gpusaver.storage.fileops import POSIX, FileOps
from gpusaver.frameworks import ordered_with_framework
from gpusaver.progress import Progress, ProgressCallback
from gpusaver.tree import RESERVED_PREFIX
from gpusaver.format import BundleReader
from gpusaver.pipeline import (
    write_group,
    check_restore,
    clean_stale_temp_dirs,
    group_by_device,
    restore_checkpoint,
    save_checkpoint,
)
# Imported here, not when first used: a process that later cannot read its install (it dropped
# privileges, its directory was unmounted) still saves.
from gpusaver.pipeline import snapshot as _snapshot
from gpusaver.pipeline.background import SaveHandle, served, serving
from gpusaver.pipeline.retention import Retention
from gpusaver.pipeline.tempdirs import TempDir
from gpusaver.variables import (
    ResolvedVariable,
    SourceWatch,
    check_restorable,
    checked_cast,
    re_resolve,
    resolve_var_list,
    restore_targets,
)

__all__ = ["Saver", "PhaseCallbackWarning"]




def _stored_identity(reader: BundleReader, name: str, entry: Any) -> tuple[Any, ...]:
    """What tells two stored tensors' values apart: dtype, shape and the crc32c and size of its bytes
    (of each slice's, for a tensor stored in slices)."""
    from gpusaver.format.slices import encode_slice_key

    if not entry.slices:
        return entry.dtype, tuple(entry.shape), entry.crc32c, entry.size
    parts = []
    for extents in entry.slices:
        piece = reader.entry(encode_slice_key(name, extents))
        parts.append((tuple(map(tuple, extents)), piece.crc32c, piece.size))
    return entry.dtype, tuple(entry.shape), tuple(parts)


def _stored_bytes(reader: BundleReader, name: str, entry: Any) -> int:
    """The data-file bytes of a stored variable (all its slices, when partitioned)."""
    from gpusaver.format.slices import encode_slice_key

    if not entry.slices:
        return int(entry.size)
    return sum(int(reader.entry(encode_slice_key(name, extents)).size) for extents in entry.slices)


class _Unexpected(list):  # type: ignore[type-arg]
    """The stored variables nobody asked for, listed from the index when first looked at
    (a strict restore of many tensors does not pay for a list nobody reads)."""

    def __init__(self, reader: BundleReader, mine: set[str]) -> None:
        super().__init__()
        self._source: tuple[BundleReader, set[str]] | None = (reader, mine)

    def _fill(self) -> None:
        if self._source is not None:
            reader, mine = self._source
            self._source = None
            self.extend(sorted(k for k in reader.variable_names() if k not in mine and not k.startswith(RESERVED_PREFIX)))

    def __iter__(self) -> Any:
        self._fill()
        return super().__iter__()

    def __len__(self) -> int:
        self._fill()
        return super().__len__()

    def __getitem__(self, i: Any) -> Any:
        self._fill()
        return super().__getitem__(i)

    def __eq__(self, other: object) -> bool:
        self._fill()
        return list.__eq__(self, other)

    def __repr__(self) -> str:
        self._fill()
        return super().__repr__()


class RestoreResult(NamedTuple):
    """What :meth:`Saver.restore` restored: the variables the checkpoint lacks, and
    the checkpoint's variables no variable asked for (as torch's ``load_state_dict``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]

#: The phases ``on_phase`` hears of once the save can no longer be taken back: ``merge`` and
#: ``total`` end after the commit, ``snapshot`` once save_async's background write is under way.
AFTER_COMMIT_PHASES = frozenset({"merge", "total", "snapshot"})


class PhaseCallbackWarning(RuntimeWarning):
    """An ``on_phase`` callback raised after the save's commit point; the save stands."""


def observe_phases(on_phase: Callable[[str, float], None] | None, prefix: str) -> Callable[[str, float], None] | None:
    """``on_phase`` as a save calls it, with the rule for a callback that raises.

    Before the commit point (``stage:k``, ``checksum:k``, ``write:k``, ``fsync:k``, ``shard:k``) its
    error fails the save as any other error does: nothing is committed and nothing is left. After
    it (:data:`AFTER_COMMIT_PHASES`) the checkpoint is committed, recorded in the state file and
    retention applied, and the save reports success: the callback's error is reported as a
    :class:`PhaseCallbackWarning` (logged where warnings are errors), never undoing the save.
    """
    if on_phase is None:
        return None
    deferred: list[BaseException] = []

    def observed(phase: str, seconds: float) -> None:
        if phase not in AFTER_COMMIT_PHASES:
            on_phase(phase, seconds)
            return
        try:
            on_phase(phase, seconds)
        except (KeyboardInterrupt, SystemExit, GeneratorExit) as e:
            deferred.append(e)  # raised once the save has recorded itself: see raise_deferred
        except Exception as e:  # noqa: BLE001 - reported, the save stands
            when = "the save was under way" if phase == "snapshot" else "the checkpoint was committed"
            message = (
                f"the on_phase callback raised {type(e).__name__}: {e} in phase {phase!r} of {prefix!r}, after "
                f"{when}; the save stands"
            )
            try:
                warnings.warn(message, PhaseCallbackWarning, stacklevel=2)
            except Warning:  # warnings made errors (-W error): still never undo the save
                logging.getLogger("gpusaver").warning(message)

    def raise_deferred() -> None:
        """Raises a KeyboardInterrupt or SystemExit the callback raised after the commit point, now that
        the save is recorded (it is not an error of the save, and it must not be swallowed)."""
        if deferred:
            raise deferred.pop(0)

    observed.raise_deferred = raise_deferred  # type: ignore[attr-defined]
    return observed


#: The suffix of a V2 data file after its prefix.
_DATA_FILE = re.compile(r"\.data-\d{5}-of-\d{5}")


def _step_value(global_step: Any) -> int:
    """An integer step from an int, a NumPy integer, or a 0-d integer array or tensor (torch, JAX, ...)."""
    if isinstance(global_step, (bool, np.bool_)):
        raise InvalidArgumentTypeError(f"global_step must be an integer, not {global_step!r}")
    if isinstance(global_step, numbers.Integral):
        return int(global_step)
    if getattr(global_step, "shape", None) == () and callable(getattr(global_step, "item", None)):
        try:
            item = global_step.item()
        except Exception:  # noqa: BLE001 - not a value we can read: refused below
            item = None
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            return int(item)
    raise InvalidArgumentTypeError(
        f"global_step must be an integer (or a 0-d integer array), not {type(global_step).__name__} {global_step!r}"
    )


class _SavePlan(NamedTuple):
    """A save's checked arguments: the prefix as spelled and as the file system is asked, its directory."""

    prefix: str
    local: str
    parent: str
    parent_local: str
    latest_filename: str
    write_state: bool


class _DeviceCopy:
    """A GPU group copied into spare device memory (``save_async(snapshot="device")``), saved from there."""

    def __init__(self, group: Any, backend: Any) -> None:
        self.device = group.device
        self.backend = backend
        self._group = group
        self._copies: list[Any] = []
        self.parts: list[Any] = []

    def capture(self) -> None:
        """Copies every array on its device (after the work queued on the current stream), and waits."""
        cp = self.backend._cp
        with cp.cuda.Device(self.device.index):
            self._copies = [v.array.copy() for v in self._group.variables]
            self.parts = [dataclasses.replace(v, array=v.array.copy()) for v in self._group.parts]
            cp.cuda.get_current_stream().synchronize()

    def tensors(self) -> TensorList:
        listed = TensorList((v.name, c) for v, c in zip(self._group.variables, self._copies))
        listed.logical = {i: v.logical_dtype for i, v in enumerate(self._group.variables) if v.logical_dtype is not None}
        return listed


class Saver:
    """Saves and restores variables, with TensorFlow's checkpoint management.

    Args:
        var_list: a dict ``{name: array or Variable}`` or a list of named
            :class:`~gpusaver.Variable`. Required (there is no graph to collect
            variables from) unless ``allow_empty``.
        reshape: restore a stored tensor into a variable of another shape
            with the same number of elements.
        sharded: one shard per device, written concurrently, then merged.
        max_to_keep: how many recent checkpoints to keep; None or 0 keeps all.
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per
            this many hours.
        name: the name used in :meth:`as_saver_def` (``"save"``).
        restore_sequentially: restore one device group, one tensor at a time,
            bounding the memory in flight.
        saver_def: a SaverDef whose settings (max_to_keep, sharded,
            keep_checkpoint_every_n_hours) override the arguments.
        builder, defer_build: accepted for compatibility; no meaning without a graph.
        allow_empty: allow an empty var_list; save and restore do nothing.
        write_version: only ``SaverDef.V2``.
        pad_step_number: name checkpoints ``prefix-%08d``.
        save_relative_paths: write relative paths into the ``checkpoint`` file.
        filename: the default ``save_path`` for :meth:`save` and :meth:`restore`.
        durable: fsync data, index, state file and directories (default). Off,
            a process crash is still safe; a power loss is not.
        fileops: file operations (tests inject faults here).
        on_phase: called with ``(phase, seconds)`` as each stage of a save ends
            (``snapshot``: the time :meth:`save_async` blocked). A callback that raises
            before the commit point fails the save with nothing committed; after it
            (``merge``, ``total``, ``snapshot``) the save stands and the error is reported
            as a :class:`PhaseCallbackWarning` (see :func:`observe_phases`).
        snapshot_bytes: the most host memory :meth:`save_async` holds for its
            snapshots (``snapshot_bytes`` setting; default a quarter of the
            available memory). Kept and reused from one save to the next;
            :meth:`close` gives it back.
        coordinator: several processes save one checkpoint together: ``"torch"``
            (the initialised ``torch.distributed`` process group, ``group=`` for
            another), ``"mpi"`` (mpi4py, ``comm=``, ``COMM_WORLD`` by default) or an
            object implementing :class:`gpusaver.distributed.Coordinator`. Every rank
            calls ``save`` and ``restore`` with the same arguments; a variable name held
            by several ranks is replicated (written once, by one of them).
        group, comm: the torch process group or the MPI communicator (see ``coordinator``).
        check_replicas: with a coordinator, compare the crc32c of each replicated
            variable's bytes across its holders before saving.

    Raises:
        ValueError: duplicate names, the same array twice, an empty var_list
            without ``allow_empty``, or a write_version other than V2.
    """

    def __init__(
        self,
        var_list: Mapping[str, Any] | Iterable[Any] | None = None,
        reshape: bool = False,
        sharded: bool = False,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        name: str | None = None,
        restore_sequentially: bool = False,
        saver_def: SaverDef | None = None,
        builder: Any = None,
        defer_build: bool = False,
        allow_empty: bool = False,
        write_version: int = SaverDef.V2,
        pad_step_number: bool = False,
        save_relative_paths: bool = False,
        filename: str | None = None,
        *,
        durable: bool = True,
        fileops: FileOps | None = None,
        on_phase: Callable[[str, float], None] | None = None,
        snapshot_bytes: int | None = None,
        coordinator: Any = None,
        group: Any = None,
        comm: Any = None,
        check_replicas: bool = False,
    ) -> None:
        if write_version != SaverDef.V2:
            raise InvalidArgumentError("gpusaver writes only the V2 checkpoint format (write_version=SaverDef.V2)")
        if saver_def is not None:
            max_to_keep = saver_def.max_to_keep
            sharded = saver_def.sharded
            keep_checkpoint_every_n_hours = saver_def.keep_checkpoint_every_n_hours
            if saver_def.version not in (SaverDef.V2,):
                raise InvalidArgumentError("gpusaver reads only SaverDefs of version V2")
        if var_list is None and not allow_empty:
            raise InvalidArgumentError(
                "No variables to save: gpusaver has no graph to collect them from; pass var_list "
                "(a dict {name: array} or a list of named Variables), or allow_empty=True"
            )
        resolved = resolve_var_list(var_list) if var_list is not None else []
        if not resolved and not allow_empty:
            raise InvalidArgumentError("No variables to save (pass allow_empty=True to allow an empty Saver)")
        self._adopt(resolved)
        self._lock = threading.Lock()
        self._owner: threading.Thread | None = None  # the thread inside a call of this Saver
        self._reshape = reshape
        self._sharded = sharded
        self._max_to_keep = max_to_keep or 0
        self._keep_hours = keep_checkpoint_every_n_hours
        self._name = name or "save"
        self._restore_sequentially = restore_sequentially
        self._pad_step_number = pad_step_number
        self._save_relative_paths = save_relative_paths
        self._filename = filename
        self._durable = durable
        self._fileops = fileops or POSIX
        self._on_phase = on_phase
        self._retention = Retention(self._max_to_keep, self._keep_hours)
        if snapshot_bytes is not None and (not isinstance(snapshot_bytes, numbers.Integral) or snapshot_bytes <= 0):
            raise InvalidArgumentError(f"snapshot_bytes must be a positive integer, not {snapshot_bytes!r}")
        self._snapshot_bytes = int(snapshot_bytes) if snapshot_bytes is not None else None
        self._pool: Any = None  # save_async's snapshot pool, made on first use
        self._pending: SaveHandle | None = None
        self._coordinator: Any = None
        if coordinator is not None or group is not None or comm is not None:
            from gpusaver.distributed import resolve_coordinator

            self._coordinator = resolve_coordinator(coordinator, group=group, comm=comm)
        self._check_replicas = bool(check_replicas)

    def _adopt(self, resolved: list[ResolvedVariable]) -> None:
        """Takes ``resolved`` as this Saver's variables: their device groups and what is derived from them."""
        self._resolved = resolved
        self._variables: list[ResolvedVariable] = resolved
        # Regions of partitioned variables travel beside the plain ones: saved as TensorFlow slices,
        # restored from whatever partitioning the checkpoint holds.
        self._parts = [v for v in self._variables if v.partition is not None]
        #: each variable name's first position in the caller's order, plain and partitioned together
        self._position: dict[str, int] | None = None
        if self._parts:
            everything = self._variables
            self._position = {}
            for i, v in enumerate(everything):
                self._position.setdefault(v.name, i)
            self._variables = [v for v in everything if v.partition is None]
            self._groups = group_by_device(everything)
            for g in self._groups:
                g.parts = [v for v in g.variables if v.partition is not None]
                if g.parts:
                    g.variables = [v for v in g.variables if v.partition is None]
        else:
            self._groups = group_by_device(self._variables)
        self._is_empty = not self._variables and not self._parts
        self._restore_groups = [g for g in self._groups if g.variables]
        # The callers' objects where they are another framework's (torch: ordered with its streams).
        self._sources = [
            v.source for v in self._variables + self._parts if v.source is not None and v.source is not v.array
        ]
        self._tensors: TensorList | None = None
        self._restorable = False
        self._ties: list[list[int]] = []  # set with _restorable: one array under several names
        self.__dict__.pop("_name_set", None)
        self._watch = SourceWatch(resolved)

    def _refresh(self) -> None:
        """Views of the caller's tensors made anew where one was given other memory since the last
        save or restore (see :class:`~gpusaver.variables.SourceWatch`); a cheap check otherwise."""
        if self._watch.watching:
            with _gc.paused():  # tuples for every tensor: the collector would walk the heap for them
                if self._watch.stale():
                    self._adopt(re_resolve(self._resolved))

    @contextlib.contextmanager
    def _exclusive(self, call: str) -> Iterator[None]:
        """One call of ``save``, ``save_async``, ``restore``, ``wait`` or ``close`` at a time: a call from
        another thread waits for the one in progress (a ``save_async`` holds the Saver only while it
        captures); one from inside a call on the same thread (a callback) is refused."""
        me = threading.current_thread()
        now = served()
        if self._owner is me or (now is not None and now[0] is self):
            # The thread the call runs on, or a callback of one of this Saver's calls or background
            # saves, on whatever thread: waiting would wait for ever.
            raise SaverBusyError(
                f"Saver.{call} was called from inside the same Saver's own call or callback (progress or "
                "on_phase, of a call or of an asynchronous save), which would wait for ever; call it once "
                "that call or save has finished"
            )
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _guarded(self, callback: Any, handle: SaveHandle | None = None) -> Any:
        """``callback`` run as this Saver's (and ``handle``'s) callback: a call of this Saver, or a
        wait for ``handle``, from inside it raises SaverBusyError instead of waiting for ever."""
        if callback is None:
            return None

        def guarded(*args: Any) -> Any:
            with serving(self, handle):
                return callback(*args)

        return guarded

    # ----------------------------------------------------------- properties
    @property
    def variables(self) -> dict[str, Any]:
        """The saved arrays by name."""
        return {v.name: v.array for v in self._variables}

    @property
    def devices(self) -> list[str]:
        """The canonical devices, in shard order."""
        return [g.device.canonical for g in self._groups]

    @property
    def last_checkpoints(self) -> list[str]:
        """Prefixes of the checkpoints this saver still keeps, oldest first."""
        return self._retention.prefixes

    def set_last_checkpoints(self, last_checkpoints: list[str]) -> None:
        """Replaces the list of kept checkpoints.

        As in TensorFlow, they are stamped with an infinite time, so that
        retention never deletes them (each one dropped from the list instead
        advances the ``keep_checkpoint_every_n_hours`` clock).
        """
        if not isinstance(last_checkpoints, list):
            raise InvalidArgumentTypeError("last_checkpoints must be a list")
        self._retention.kept = [(os.fspath(p), math.inf) for p in last_checkpoints]

    def set_last_checkpoints_with_time(self, last_checkpoints_with_time: list[tuple[str, float]]) -> None:
        """Replaces the list of kept checkpoints, as ``(prefix, timestamp)`` pairs."""
        if not isinstance(last_checkpoints_with_time, list):
            raise InvalidArgumentTypeError("last_checkpoints_with_time must be a list of (path, time) pairs")
        self._retention.kept = [(str(p), float(t)) for p, t in last_checkpoints_with_time]

    def recover_last_checkpoints(self, checkpoint_paths: list[str]) -> None:
        """Adopts existing checkpoints (e.g. after a restart), timed by their files' mtimes.

        Missing checkpoints are skipped.
        """
        existing = [p for p in checkpoint_paths if cm.checkpoint_exists(p)]
        mtimes = cm.get_checkpoint_mtimes(existing)
        self.set_last_checkpoints_with_time(list(zip(existing, mtimes)))

    # ----------------------------------------------------------------- save
    def _checkpoint_prefix(self, save_path: str, global_step: Any) -> str:
        if global_step is None:
            return save_path
        step = _step_value(global_step)
        return "%s-%08d" % (save_path, step) if self._pad_step_number else "%s-%d" % (save_path, step)

    def save(
        self,
        save_path: str | os.PathLike[str] | None = None,
        global_step: Any = None,
        latest_filename: str | None = None,
        write_state: bool = True,
        meta_graph_suffix: str = "meta",
        write_meta_graph: bool = False,
        strip_default_attrs: bool = False,
        save_debug_info: bool = False,
        *,
        progress: ProgressCallback | None = None,
    ) -> str | None:
        """Saves every variable; returns the checkpoint prefix (None for an empty Saver).

        Args:
            save_path: the prefix (``filename`` by default); its directory must exist.
            global_step: appended as ``-<step>`` (``-%08d`` with ``pad_step_number``).
            latest_filename: the state file's name in the checkpoint's directory
                (``checkpoint``); it must not contain path components.
            write_state: update the state file (and apply retention).
            meta_graph_suffix, write_meta_graph, strip_default_attrs,
                save_debug_info: accepted for compatibility; there is no meta graph
                (``meta_graph_suffix`` names the meta file retention deletes).
            progress: ``callback(done_bytes, total_bytes)`` as the data is written.

        Raises:
            ValueError: a missing directory, a latest_filename with a path or
                one colliding with the checkpoint, a path that is a directory.
            TypeError: a global_step that is not an integer.
            CheckpointWriteError: the save failed (an OSError keeping errno);
                nothing changed on disk.
        """
        with self._exclusive("save"):
            return self._save(save_path, global_step, latest_filename, write_state, meta_graph_suffix, progress)

    def _save(
        self, save_path: Any, global_step: Any, latest_filename: str | None, write_state: bool,
        meta_graph_suffix: str, progress: ProgressCallback | None,
    ) -> str | None:
        early = self._prepare_call()
        if self._coordinator is not None:
            return self._save_ranks(save_path, global_step, latest_filename, write_state, meta_graph_suffix, progress,
                                    early)
        plan = self._plan_save(save_path, global_step, latest_filename, write_state)
        if plan is None:
            return None
        counter = Progress(self._guarded(progress), self._nbytes()) if progress is not None else None
        with _gc.paused(), ordered_with_framework(self._sources):
            return self._write(plan, self._groups, counter, meta_graph_suffix)

    def _save_ranks(
        self, save_path: Any, global_step: Any, latest_filename: str | None, write_state: bool,
        meta_graph_suffix: str, progress: ProgressCallback | None, early: Exception | None,
    ) -> str:
        """``save`` on every rank of a job: arguments checked and compared everywhere, then written together."""
        plan = self._agreed_plan(save_path, global_step, latest_filename, write_state, early)
        counter = Progress(self._guarded(progress), self._nbytes()) if progress is not None else None
        with _gc.paused(), ordered_with_framework(self._sources):
            return self._write(plan, self._groups, counter, meta_graph_suffix)

    def _agreed_plan(
        self, save_path: Any, global_step: Any, latest_filename: str | None, write_state: bool,
        early: Exception | None = None,
    ) -> "_SavePlan":
        """The save's arguments checked on every rank (any rank's error raised on all, ``early`` the one
        this rank met before: see :meth:`_prepare_call`) and compared."""
        from gpusaver.distributed import agree, check_same

        c = self._coordinator
        plan, error = None, early
        if error is None:
            try:
                plan = self._plan_save(save_path, global_step, latest_filename, write_state, empty_ok=True)
            except Exception as e:  # noqa: BLE001 - every rank raises it, naming this rank
                error = e
        agree(c, error=error, what="checking the save's arguments")
        assert plan is not None
        check_same(c, repr((plan.prefix, plan.latest_filename, plan.write_state)), what="the save's prefix and arguments")
        return plan

    def save_async(
        self,
        save_path: str | os.PathLike[str] | None = None,
        global_step: Any = None,
        latest_filename: str | None = None,
        write_state: bool = True,
        meta_graph_suffix: str = "meta",
        write_meta_graph: bool = False,
        strip_default_attrs: bool = False,
        save_debug_info: bool = False,
        *,
        progress: ProgressCallback | None = None,
        snapshot: str = "host",
    ) -> SaveHandle:
        """Starts a save and returns once every variable's bytes are captured; writes in the background.

        Takes :meth:`save`'s arguments and checks them before returning. The
        arrays may change as soon as it returns: the checkpoint holds the values
        they had during the call. Writing, commit, state file and retention
        happen on a background thread; the files are those :meth:`save` writes.
        The next ``save``, ``save_async``, ``restore``, :meth:`wait` or
        :meth:`close` of this Saver first waits for this save, and raises its
        error if it failed and nobody collected the error from the handle. The
        interpreter waits for a pending save at exit.

        Args:
            snapshot: ``"host"`` (default): bytes are copied into the Saver's
                snapshot pool in host memory (``snapshot_bytes``; GPU arrays
                through the pinned buffers). ``"device"``: a GPU group is first
                copied into spare device memory when its free memory (CuPy's
                cached blocks included) holds the group, and written from there;
                otherwise it is captured to the host as with ``"host"``.

        Returns:
            a :class:`~gpusaver.SaveHandle`: ``result(timeout=None)`` returns the
            prefix once committed or raises the save's error; ``done()``.

        Raises:
            what :meth:`save` raises for bad arguments, before anything is written;
            an error while capturing (nothing is committed).
        """
        if snapshot not in ("host", "device"):
            raise InvalidArgumentError(f"snapshot must be 'host' or 'device', not {snapshot!r}")
        with self._exclusive("save_async"):
            return self._save_async(save_path, global_step, latest_filename, write_state, meta_graph_suffix, progress,
                                    snapshot)

    def _save_async(
        self, save_path: Any, global_step: Any, latest_filename: str | None, write_state: bool,
        meta_graph_suffix: str, progress: ProgressCallback | None, snapshot: str,
    ) -> SaveHandle:
        early = self._prepare_call()
        rank_plan = None
        capture_groups = self._groups
        if self._coordinator is not None:
            from gpusaver.pipeline.ranks import plan_ranks

            plan = self._agreed_plan(save_path, global_step, latest_filename, write_state, early)
            rank_plan = plan_ranks(
                self._groups, self._coordinator, sharded=self._sharded, filter_groups=self._without,
                check_replicas=self._check_replicas,
            )
            capture_groups = rank_plan.groups  # what this rank writes (replicas another rank writes left out)
        else:
            plan = self._plan_save(save_path, global_step, latest_filename, write_state)
            if plan is None:
                return SaveHandle.finished(None)
        t0 = time.perf_counter()
        pool = self._snapshot_pool()
        pool.begin()
        handle = SaveHandle(plan.prefix)
        counter = Progress(self._guarded(progress, handle), self._nbytes()) if progress is not None else None
        background: list[Any] = []
        captures: list[tuple[Any, Any]] = []
        device_copies: list[Any] = []
        for g in capture_groups:
            copy = self._device_snapshot(g) if snapshot == "device" and g.device.is_gpu else None
            if copy is not None:
                background.append(copy)
                device_copies.append(copy)
            else:
                recorder = _snapshot.Recorder(pool)
                background.append(_snapshot.ReplayGroup(g.device, recorder))
                captures.append((g, recorder))

        def write() -> str:
            try:
                # A shard that fails stops the pool at once: a capture waiting for memory that shard
                # would have freed raises instead of waiting for ever.
                return self._write(plan, background, counter, meta_graph_suffix, rank_plan=rank_plan,
                                   on_failure=pool.stop, handle=handle)
            except BaseException:
                pool.stop()  # a capture still waiting for the pool stops
                raise

        open_recorders = [r for _, r in captures]
        started = threading.Lock()

        def start() -> None:
            with started:
                if handle._thread is None:
                    handle._start(write)
                    self._pending = handle

        # A state the pool holds whole is captured before the writing starts, so the capture has
        # the CPUs to itself; a larger one streams: the writing starts once the pool is full.
        pool.on_full = start
        try:
            with _gc.paused(), ordered_with_framework(self._sources):
                for copy in device_copies:
                    copy.capture()
                if device_copies:
                    start()
                for g, recorder in captures:
                    write_group(g, recorder)
                    recorder.close()
                    open_recorders.remove(recorder)
            start()
        except _snapshot._Stopped:
            # The background save failed while this was capturing: its error is the handle's.
            for recorder in open_recorders:
                recorder.fail(CheckpointWriteError(0, "the save failed while capturing"))
        except BaseException as e:
            for recorder in open_recorders:
                recorder.fail(e)
            if self._coordinator is not None:
                start()  # the other ranks' saves wait for this one's: it fails at once, and they raise
            with started:
                if handle._thread is not None:
                    handle.wait()
                    handle._collected = True  # raised here: not again by the next call
                else:
                    handle._abandon(e)  # never started: done, its error raised here
            raise
        finally:
            pool.on_full = None
        handle.blocked_seconds = time.perf_counter() - t0
        if self._on_phase:
            snapshot = observe_phases(self._guarded(self._on_phase, handle), plan.prefix)
            assert snapshot is not None
            snapshot("snapshot", handle.blocked_seconds)
            snapshot.raise_deferred()  # type: ignore[attr-defined]
        return handle

    def wait(self) -> None:
        """Waits for this Saver's pending asynchronous save; raises its error if nobody has collected it."""
        with self._exclusive("wait"):
            self._settle()

    def _settle(self) -> None:
        """Waits for the pending asynchronous save; raises its error if nobody collected it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            error = pending._uncollected()
            if error is not None:
                raise error

    def _snapshot_pool(self) -> Any:
        if self._pool is None:
            self._pool = _snapshot.SnapshotPool(self._snapshot_bytes or _snapshot.default_snapshot_bytes())
        return self._pool

    def _device_snapshot(self, group: Any) -> Any:
        """A copy of a GPU group in spare device memory (see ``snapshot="device"``), or None if it does not fit."""
        from gpusaver.pipeline import Group

        backend = group.backend
        free = getattr(backend, "_free_bytes", None)
        need = sum(int(v.array.nbytes) for v in group.variables + group.parts)
        if free is None or need > free(group.device.index):
            return None
        return _DeviceCopy(group, backend)

    def _plan_save(
        self, save_path: Any, global_step: Any, latest_filename: str | None, write_state: bool, empty_ok: bool = False
    ) -> "_SavePlan | None":
        """Checks a save's arguments and its directory (raising before anything is written)."""
        if save_path is None:
            save_path = self._filename
        if save_path is None:
            raise InvalidArgumentError("save_path is required (or give the Saver a filename)")
        if latest_filename is None:
            latest_filename = "checkpoint"
        if not isinstance(latest_filename, str) or not latest_filename or os.path.split(latest_filename)[0]:
            raise InvalidArgumentError(f"'latest_filename' must not contain path components: {latest_filename!r}")
        save_path = os.fspath(save_path)
        prefix = self._checkpoint_prefix(save_path, global_step)  # as spelled: returned and recorded
        if self._is_empty and not empty_ok:
            return None
        local = paths.local_path(prefix)  # what the file system is asked
        parent, parent_local = os.path.dirname(prefix), os.path.dirname(local)
        if not os.path.isdir(parent_local or "."):
            raise InvalidArgumentError(f"Parent directory of {save_path} doesn't exist, can't save.")
        if not os.access(parent_local or ".", os.W_OK | os.X_OK):
            raise CheckpointPermissionError(
                errno.EACCES, f"cannot save {prefix!r}: directory {parent or '.'!r} is not writable", parent
            )
        if os.path.isdir(local):
            raise InvalidArgumentError(
                f"cannot save to {prefix!r}: it is a directory; give a file prefix such as {prefix}/model"
            )
        self._check_state_collision(local, latest_filename, global_step, write_state)
        return _SavePlan(prefix, local, parent, parent_local, latest_filename, write_state)

    def _write(
        self, plan: "_SavePlan", groups: Any, counter: Any, meta_graph_suffix: str, rank_plan: Any = None,
        on_failure: Callable[[], None] | None = None, handle: SaveHandle | None = None,
    ) -> str:
        """Writes ``groups`` as the checkpoint ``plan`` names, commits it, records it, applies retention
        (``handle``: the asynchronous save this is, whose callbacks must not wait for it)."""
        prefix, parent, parent_local, latest_filename = plan.prefix, plan.parent, plan.parent_local, plan.latest_filename
        phases = observe_phases(self._guarded(self._on_phase, handle), prefix)
        clean_stale_temp_dirs(parent_local, self._fileops)
        doomed: list[tuple[str, TempDir]] = []

        def record() -> None:
            def write_state(kept: list[str]) -> None:
                cm.update_checkpoint_state(
                    parent,
                    prefix,
                    all_model_checkpoint_paths=[paths.spelling_for_state(p, parent) for p in kept],
                    latest_filename=latest_filename,
                    save_relative_paths=self._save_relative_paths,
                    durable=self._durable,
                    fileops=self._fileops,
                    _check_collision=False,  # checked above, against the files this save writes
                )

            doomed.extend(
                self._retention.record(
                    prefix, write_state, directory=parent_local, state_file=latest_filename, ops=self._fileops
                )
            )
            self._fileops.phase("state:written")

        options: dict[str, Any] = dict(
            sharded=self._sharded,
            durable=self._durable,
            fileops=self._fileops,
            on_phase=phases,
            after_commit=record if plan.write_state else None,
            state_file=latest_filename if plan.write_state else None,
            progress=counter,
            on_failure=on_failure,
        )
        try:
            if self._coordinator is not None:
                from gpusaver.pipeline.ranks import plan_ranks, save_across_ranks

                if rank_plan is None:
                    rank_plan = plan_ranks(
                        groups, self._coordinator, sharded=self._sharded, filter_groups=self._without,
                        check_replicas=self._check_replicas,
                    )
                    groups = rank_plan.groups
                save_across_ranks(plan.local, rank_plan, groups, self._coordinator, **options)
            else:
                save_checkpoint(plan.local, groups, **options)
        finally:
            # Once the state file no longer lists them, dropped checkpoints go, whatever happens.
            while doomed:
                Retention.delete(*doomed.pop(0), meta_graph_suffix, self._fileops)
        if phases is not None:
            phases.raise_deferred()  # type: ignore[attr-defined]
        return prefix

    def _without(self, names: set[str]) -> list[Any]:
        """This Saver's device groups without the variables named in ``names``."""
        from gpusaver.pipeline import Group

        return [
            Group(g.device, [v for v in g.variables if v.key not in names], [v for v in g.parts if v.key not in names])
            for g in self._groups
        ]

    def _check_state_collision(self, local: str, latest_filename: str, global_step: Any, write_state: bool) -> None:
        """Refuses a save whose state file would overwrite a file of the checkpoint.

        As TensorFlow, an unsharded save without a step may not be named like the
        state file (whether or not the state is written). Otherwise only a real
        collision is refused: the state file being the checkpoint's index or one
        of its data files.
        """
        base = os.path.basename(local)
        real = latest_filename == base + ".index" or (
            latest_filename.startswith(base) and _DATA_FILE.fullmatch(latest_filename[len(base) :]) is not None
        )
        if (not self._sharded and global_step is None and base == latest_filename) or (write_state and real):
            raise StatePathConflictError(
                f"'latest_filename' collides with 'save_path': {latest_filename!r} and {local!r}; "
                "use a different save path or latest_filename"
            )

    # -------------------------------------------------------------- restore
    def restore(
        self,
        save_path: str | os.PathLike[str] | None = None,
        *,
        strict: bool = True,
        cast: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreResult | None:
        """Restores the variables in place from the checkpoint ``save_path``.

        All names, dtypes and shapes are checked before any array changes.
        Every tensor's crc32c is verified.

        Args:
            save_path: the checkpoint prefix (``filename`` by default).
            strict: every variable must be in the checkpoint. With False, the
                variables the checkpoint has are restored and the others keep
                their values (as ``torch.nn.Module.load_state_dict(strict=False)``
                and TensorFlow's ``expect_partial``).
            cast: restore a stored tensor of another dtype by converting it: a
                float may round to a narrower float; nothing else changes a value
                (no wrap-around, no NaN as an integer: such a value is a
                DTypeMismatchError naming it and the target's range, raised before
                anything changes; see :func:`gpusaver.variables.checked_cast`).
                Without it a dtype difference is a DTypeMismatchError, never a
                silent conversion.
            progress: ``callback(done_bytes, total_bytes)`` as the data is read.

        Returns:
            ``(missing_keys, unexpected_keys)``: the variables the checkpoint
            lacks (empty when strict) and the stored variables no variable asked
            for; None for an empty Saver (``allow_empty``), which reads nothing.

        Raises:
            ValueError: ``save_path`` is None or names no checkpoint
                (:class:`~gpusaver.errors.InvalidCheckpointPathError`, also a
                FileNotFoundError), or a variable is immutable (a JAX array, a scalar).
            TensorNotFoundError: with ``strict``, a variable is not in the checkpoint (a KeyError).
            DTypeMismatchError, ShapeMismatchError: a variable does not fit.
            ChecksumError: stored bytes are damaged. It names the first damaged
                variable of a device group, in the Saver's order; every variable
                before it holds checkpoint values, the damaged one its old values
                or unverified bytes. Raised once the group's other reads are done.
        """
        with self._exclusive("restore"):
            early = self._prepare_call()
            return self._restore(save_path, strict, cast, progress, early)

    def _prepare_call(self) -> Exception | None:
        """What every call does first: waits for the pending asynchronous save, makes the views of
        tensors given other memory anew. Alone, an error is raised here; with a coordinator it is
        returned, for the call's first agreement (every rank then raises it at once, instead of the
        others waiting for this rank until the coordinator's timeout)."""
        try:
            self._settle()
            self._refresh()
        except Exception as e:  # noqa: BLE001 - raised here, or by every rank at the agreement
            if self._coordinator is None:
                raise
            return e
        return None

    def _restore(
        self, save_path: Any, strict: bool, cast: bool, progress: ProgressCallback | None,
        early: Exception | None = None,
    ) -> RestoreResult | None:
        """Checks everything a restore could refuse, then writes.

        With a coordinator every rank checks its own variables against the checkpoint, and no rank
        writes a byte before every rank has passed (the ranks first compare the arguments): a refusal
        anywhere is raised on every rank with every array as it was.
        """
        c = self._coordinator
        held: list[BundleReader] = []
        try:
            with _gc.paused():
                if c is None:
                    run = self._check_restore(save_path, strict, cast, progress, held)
                else:
                    from gpusaver.distributed import agree, check_same

                    spelled = save_path if save_path is not None else self._filename
                    if isinstance(spelled, (str, bytes, os.PathLike)):
                        spelled = os.fsdecode(spelled)
                    check_same(c, repr((spelled, bool(strict), bool(cast), self._reshape)),
                               what="the restore's prefix and arguments")
                    run, error = None, early
                    if error is None:
                        try:
                            run = self._check_restore(save_path, strict, cast, progress, held)
                        except Exception as e:  # noqa: BLE001 - every rank raises it, naming this rank
                            error = e
                    agree(c, error=error, what="checking the restore against the checkpoint")
                assert run is not None
                if c is None:
                    return run()
                result, error = None, None
                try:
                    result = run()
                except Exception as e:  # noqa: BLE001 - every rank raises it, naming this rank
                    error = e
                agree(c, error=error, what="restoring")
                return result
        finally:
            for reader in held:
                reader.close()

    def _check_restore(
        self, save_path: Any, strict: bool, cast: bool, progress: ProgressCallback | None, held: list[BundleReader]
    ) -> Callable[[], RestoreResult | None]:
        """Checks the restore of this process's variables; returns what writes them. The checkpoint's
        reader is appended to ``held`` (the caller closes it)."""
        if self._is_empty:
            return lambda: None  # as TensorFlow: an empty Saver restores nothing, from anywhere
        if save_path is None:
            save_path = self._filename
        if save_path is None:
            raise InvalidArgumentError("Can't load save_path when it is None.")
        prefix = os.fspath(save_path)
        local = paths.local_path(prefix)
        if not os.path.lexists(local + ".index"):  # literally: every prefix save() returned restores
            raise InvalidCheckpointPathError(f"The passed save_path is not a valid checkpoint: {prefix}", prefix)
        if not self._restorable:  # checked again only once the variables are made anew
            for v in self._variables + self._parts:
                if v.immutable is not None:
                    raise InvalidArgumentError(f"variable {v.name!r} cannot be restored in place: {v.immutable}")
            check_restorable(self._variables + self._parts)
            # One array under several names (tied weights) is written once; other views that share
            # memory cannot each get their own values.
            self._ties = restore_targets(self._variables, self._parts)
            self._restorable = True
        reader = BundleReader(local, self._fileops)
        held.append(reader)
        write = self._plan_restore(reader, strict, cast, progress)

        def run() -> RestoreResult:
            with ordered_with_framework(self._sources, writes=True):
                return write()

        return run

    def _all_tensors(self) -> TensorList:
        """Every variable's ``(name, array)``; the group's own list when there is one group."""
        if len(self._groups) == 1:
            return self._groups[0].tensors()
        if self._tensors is None:
            self._tensors = TensorList((v.name, v.array) for v in self._variables)
        return self._tensors

    @functools.cached_property
    def _name_set(self) -> frozenset[str]:
        """Every variable's name (made again with the variables)."""
        return frozenset(v.name for v in self._variables + self._parts)

    def _plan_restore(
        self, reader: BundleReader, strict: bool, cast: bool, progress: ProgressCallback | None
    ) -> Callable[[], RestoreResult]:
        """Checks every variable against the checkpoint (names, dtypes, shapes, memory; casts read and
        converted); returns what restores them, which changes nothing before it is called."""
        parts, missing_parts = self._check_parts(reader, strict, cast) if self._parts else ([], [])
        if not self._variables:
            def only_parts() -> RestoreResult:
                self._restore_with_parts(reader, parts, lambda: None)
                return RestoreResult(missing_parts, sorted(k for k in reader.variables()
                                                           if k not in self._name_set and not k.startswith(RESERVED_PREFIX)))

            return only_parts
        if strict and not cast and progress is None and not self._ties:
            # The fast path: check_restore names a missing variable; nothing else needs the list.
            check_restore(reader, self._variables, self._reshape, self._all_tensors())
            for g in self._restore_groups:
                g.backend.check_restore_memory(g.device, g.tensors(), reader)

            def fast() -> RestoreResult:
                self._restore_with_parts(reader, parts, lambda: restore_checkpoint(
                    reader, self._restore_groups, sequential=self._restore_sequentially,
                    order=self._all_tensors().names))
                return RestoreResult([], _Unexpected(reader, self._name_set))

            return fast
        mine = self._name_set
        stored = reader.variables()
        missing = [v.name for v in self._variables if v.name not in stored]
        unexpected = sorted(k for k in stored if k not in mine and not k.startswith(RESERVED_PREFIX))
        if missing and strict:
            raise TensorNotFoundError(
                f"variable {missing[0]!r} not found in checkpoint {reader.prefix!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; restore(..., strict=False) restores the others",
                missing[0],
            )
        present = [v for v in self._variables if v.name in stored]
        if self._ties:
            present = self._written_once(present, stored, reader)
            through_tie = {self._variables[i].name for group in self._ties
                           if any(self._variables[j].name in stored for j in group) for i in group}
            missing = [n for n in missing if n not in through_tie]  # restored through another of its names
        converted = [v for v in present if cast and self._dtype_differs(v, stored[v.name])]
        cast_ids = {id(v) for v in converted}
        direct = [v for v in present if id(v) not in cast_ids]
        whole = len(direct) == len(self._variables)
        groups = self._restore_groups if whole else group_by_device(direct)
        tensors = self._all_tensors() if whole else TensorList((v.name, v.array) for v in direct)
        check_restore(reader, direct, self._reshape, tensors)
        casts = [(v, self._check_cast(v, stored[v.name], reader)) for v in converted]
        for g in groups:
            g.backend.check_restore_memory(g.device, g.tensors(), reader)

        def general() -> RestoreResult:
            counter = None
            if progress is not None:
                counter = Progress(self._guarded(progress),
                                   sum(_stored_bytes(reader, v.name, stored[v.name]) for v in present))
                reader.set_progress(counter)
            for v, value in casts:  # read and checked up front, before anything changed
                v.backend.assign(v.array, value)
            self._restore_with_parts(reader, parts, lambda: restore_checkpoint(
                reader, groups, sequential=self._restore_sequentially, order=[v.name for v in direct]))
            if counter is not None:
                counter.finish()
            return RestoreResult(missing + missing_parts, unexpected)

        return general

    def _written_once(self, present: list[ResolvedVariable], stored: Mapping[str, Any], reader: BundleReader
                      ) -> list[ResolvedVariable]:
        """``present`` with each array under several names (tied weights) kept once: under its first
        name the checkpoint holds. Its other names must hold the same tensor there (dtype, shape and
        crc32c), else restoring would leave whichever came last.

        Raises:
            InvalidArgumentError: naming two tied variables whose stored values differ.
        """
        here = {id(v) for v in present}
        dropped: set[int] = set()
        for group in self._ties:
            members = [self._variables[i] for i in group if id(self._variables[i]) in here]
            first = members[0] if members else None
            for other in members[1:]:
                same = _stored_identity(reader, first.name, stored[first.name]) == _stored_identity(
                    reader, other.name, stored[other.name])
                if not same:
                    raise InvalidArgumentError(
                        f"variables {first.name!r} and {other.name!r} are one array (tied), but checkpoint "
                        f"{reader.prefix!r} holds different values for them; restore one of the names only"
                    )
                dropped.add(id(other))
        return [v for v in present if id(v) not in dropped]

    def _check_parts(
        self, reader: BundleReader, strict: bool, cast: bool
    ) -> tuple[list[tuple[Any, str, Any]], list[str]]:
        """Each region's stored tensor found and checked (full shape, dtype) before anything changes;
        a region of another stored dtype (``cast``) is read and converted here, exactly or refused.

        Returns the ``(variable, slice spec, converted value or None)`` to restore and the names the
        checkpoint lacks.
        """
        from gpusaver.variables import slice_spec

        todo, missing = [], []
        for v in self._parts:
            assert v.partition is not None
            try:
                entry = reader.entry(v.name)
            except TensorNotFoundError:
                if strict:
                    raise TensorNotFoundError(
                        f"variable {v.name!r} not found in checkpoint {reader.prefix!r}; "
                        "restore(..., strict=False) restores the others", v.name,
                    ) from None
                if v.name not in missing:
                    missing.append(v.name)
                continue
            full, _ = v.partition
            if tuple(entry.shape) != full:
                raise ShapeMismatchError(
                    f"variable {v.name!r} is a region of a tensor of shape {list(full)}, but the checkpoint "
                    f"holds shape {list(entry.shape)}"
                )
            differs = self._dtype_differs(v, entry)
            if differs and not cast:
                raise DTypeMismatchError(
                    f"variable {v.name!r} is {v.dtype} but the checkpoint holds {reader.dtype(v.name)}; "
                    "restore(..., cast=True) converts it where every value fits exactly"
                )
            if not getattr(getattr(v.array, "flags", None), "writeable", True):
                raise InvalidArgumentError(f"variable {v.name!r} is read-only and cannot be restored in place")
            if 0 not in tuple(v.array.shape):  # an empty region reads nothing
                spec = slice_spec(v.partition, tuple(v.array.shape))
                reader.check_slice(v.name, spec)  # its stored slices are whole in their files
                converted = checked_cast(reader.read_slice(v.name, spec), v.dtype, v.name) if differs else None
                todo.append((v, spec, converted))
        return todo, missing

    def _restore_with_parts(self, reader: BundleReader, parts: list[tuple[Any, str]], plain: Callable[[], None]) -> None:
        """Runs ``plain()`` (the plain variables' restore), then restores every region of the partitioned ones,
        whatever damage either meets; then raises the ChecksumError of the damaged variable that comes first in
        the Saver's order, once every other variable is restored."""
        if not parts:
            plain()
            return
        failures: list[ChecksumError] = []
        try:
            plain()
        except ChecksumError as e:
            failures.append(e)
        failures += self._restore_parts(reader, parts)
        if failures:
            position = self._position or {}
            raise min(failures, key=lambda e: position.get(e.tensor or "", len(position)))

    @staticmethod
    def _restore_parts(reader: BundleReader, parts: list[tuple[Any, str, Any]]) -> list[ChecksumError]:
        """Reads each region from the stored slices that overlap it (each checked against its crc32c); a damaged
        slice leaves its region as it was and the others are still restored. Returns the damage met, in order."""
        failures: list[ChecksumError] = []
        for v, spec, converted in parts:
            try:
                value = reader.read_slice(v.name, spec) if converted is None else converted
            except ChecksumError as e:
                failures.append(e)
                continue
            if value.dtype != v.dtype:
                value = value.astype(v.dtype)
            if v.logical_dtype is not None:
                value = value.view(np.dtype(v.array.dtype))
            v.backend.assign(v.array, value.reshape(tuple(v.array.shape)))
        return failures

    def _nbytes(self) -> int:
        """The bytes a save writes (strings counted by their pointers: a bound, made exact at the end)."""
        return sum(int(v.array.nbytes) for v in self._variables + self._parts)

    @staticmethod
    def _dtype_differs(v: ResolvedVariable, entry: Any) -> bool:
        from gpusaver.format import dtypes

        mine = v.dtype
        return entry.dtype != dtypes.from_numpy(mine.newbyteorder("=") if mine.kind != "O" else mine, tensor=v.name)

    def _check_cast(self, v: ResolvedVariable, entry: Any, reader: BundleReader) -> np.ndarray:
        """Reads (verified) and converts a tensor stored with another dtype; checks it fits first."""
        shape = tuple(v.array.shape)
        if tuple(entry.shape) != shape and not (self._reshape and int(np.prod(shape)) == entry.num_elements):
            raise ShapeMismatchError(
                f"variable {v.name!r} has shape {list(shape)} but checkpoint {reader.prefix!r} stores "
                f"shape {list(entry.shape)}"
            )
        if not getattr(getattr(v.array, "flags", None), "writeable", True):
            raise InvalidArgumentError(f"variable {v.name!r} is read-only and cannot be restored in place")
        return checked_cast(reader.get_tensor(v.name), v.dtype, v.name).reshape(shape)

    # --------------------------------------------------------------- protos
    def close(self) -> None:
        """Releases the pinned host buffers and device staging of this Saver's GPUs.

        They are shared by every Saver on the same GPU and made again on the next save or restore;
        close when training is done to give the pinned memory back. ``with Saver(...) as saver:``
        closes on exit. Waits for a pending :meth:`save_async` first, gives back its snapshot
        pool, and raises the save's error if it failed and nobody collected it.
        """
        with self._exclusive("close"):
            self._close()

    def _close(self) -> None:
        pending, self._pending = self._pending, None
        error = pending._uncollected() if pending is not None else None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        gpus = sorted({g.device.index for g in self._groups if g.device.is_gpu})
        if gpus:
            from gpusaver import backends

            backend = backends._cupy_backend
            if backend is not None:
                backend.close(gpus)
        if error is not None:
            raise error

    def __enter__(self) -> "Saver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def as_saver_def(self) -> SaverDef:
        """The SaverDef describing this saver (tensor names as TensorFlow's Saver names them)."""
        return SaverDef(
            filename_tensor_name=f"{self._name}/Const:0",
            # TensorFlow's sharded Saver returns its save path through an Identity op.
            save_tensor_name=f"{self._name}/{'Identity' if self._sharded else 'control_dependency'}:0",
            restore_op_name=f"{self._name}/restore_all",
            max_to_keep=self._max_to_keep,
            sharded=self._sharded,
            keep_checkpoint_every_n_hours=self._keep_hours,
            version=SaverDef.V2,
        )

    def to_proto(self, export_scope: str | None = None) -> SaverDef:
        """The SaverDef (``export_scope`` is accepted for compatibility)."""
        return self.as_saver_def()

    @staticmethod
    def from_proto(
        saver_def: SaverDef, import_scope: str | None = None, *, var_list: Any = None, **kwargs: Any
    ) -> "Saver":
        """A Saver configured from a SaverDef, over ``var_list``."""
        name = saver_def.restore_op_name.split("/")[0] if saver_def.restore_op_name else None
        return Saver(var_list, saver_def=saver_def, name=name, **kwargs)
