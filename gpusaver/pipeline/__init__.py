"""The save and restore pipelines, and the commit protocol that makes a save atomic.

Save: variables are grouped by canonical device (sorted; group k is shard k of
N). Each group runs on a worker thread of its own, streaming its tensors
through its backend into ``<prefix>_temp_<uuid>/part-0000k-of-0000N``. The
worker of the last group is the coordinator: once every group has finished it
merges the shards into ``<prefix>`` from the shard writers' in-memory entries
(:func:`gpusaver.format.merge.commit_merged`, the same commit as
:func:`gpusaver.format.merge_bundles`: index last, via temp file, fsync and rename). Any failure removes the temp
directory and leaves every earlier checkpoint untouched.

Phases reported to ``FileOps.phase`` (fault-injection points), in order:
``save:start``, ``shard:written:<k>`` for each shard, then the merge's
``merge:start``, ``merge:locked`` (the directory's commit lock taken), ``merge:old_index_removed`` (only when replacing),
``merge:data_renamed:<k>``, ``merge:index_written``, ``merge:index_fsynced``,
``merge:before_index_rename``, ``merge:index_renamed``, ``merge:dir_fsynced``,
and ``save:committed``. The Saver adds ``state:written`` and
``retention:removed:<prefix>``.
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from gpusaver import native
from gpusaver.storage.parallel import run_parallel
from gpusaver.backends.base import TensorList, describe
from gpusaver.devices import DeviceSpec
from gpusaver.errors import (
    CheckpointWriteError,
    ChecksumError,
    DTypeMismatchError,
    InvalidArgumentError,
    ShapeMismatchError,
    TensorNotFoundError,
)
from gpusaver.storage.fileops import POSIX, FileOps
from gpusaver.format import BundleReader, BundleWriter, dtypes
from gpusaver.format.entry import encode_header
from gpusaver.format.merge import combine_slices, commit_merged
from gpusaver.format.naming import index_filename
from gpusaver.format.slices import encode_slice_key
from gpusaver.pipeline.tempdirs import COMMITTING, clean_stale_temp_dirs, make_temp_dir, roll_back_unrecorded
from gpusaver.storage import os_error
from gpusaver.variables import ResolvedVariable, slice_spec

__all__ = ["Group", "group_by_device", "save_checkpoint", "restore_checkpoint", "clean_stale_temp_dirs"]



class Group:
    """The variables of one device."""

    def __init__(
        self, device: DeviceSpec, variables: list[ResolvedVariable], parts: list[ResolvedVariable] | None = None
    ) -> None:
        self.device = device
        self.variables = variables
        #: regions of partitioned variables on this device, saved as TensorFlow slices
        self.parts: list[ResolvedVariable] = parts or []
        self._tensors: TensorList | None = None

    @property
    def backend(self) -> Any:
        return (self.variables or self.parts)[0].backend

    def tensors(self) -> TensorList:
        """The ``(name, array)`` pairs, made once (a Saver's variables never change)."""
        if self._tensors is None:
            self._tensors = TensorList((v.name, v.array) for v in self.variables)
            self._tensors.logical = {i: v.logical_dtype for i, v in enumerate(self.variables) if v.logical_dtype is not None}
        return self._tensors


def group_by_device(variables: Sequence[ResolvedVariable]) -> list[Group]:
    """Groups variables by canonical device string, sorted as TensorFlow sorts them."""
    from itertools import repeat
    from operator import attrgetter, is_

    devices = list(map(attrgetter("device"), variables))
    if devices and all(map(is_, devices, repeat(devices[0]))):
        return [Group(devices[0], list(variables))]  # one device object for all (a dict of host arrays)
    canonical: dict[int, str] = {}  # each device object's canonical string, made once
    by_device: dict[str, list[ResolvedVariable]] = {}
    for v, device in zip(variables, devices):
        key = canonical.get(id(device))
        if key is None:
            key = canonical[id(device)] = device.canonical
        by_device.setdefault(key, []).append(v)
    return [Group(by_device[k][0].device, by_device[k]) for k in sorted(by_device)]


# ------------------------------------------------------------------------ save
def write_group(group: Any, writer: Any) -> None:
    """A group's variables through its backend, then its regions of partitioned variables as slices
    (from host memory: a GPU region is copied to the host first)."""
    group.backend.save_group(group.tensors(), writer)
    for v in getattr(group, "parts", ()):
        if 0 in tuple(v.array.shape):
            continue  # an empty region (an uneven split's): nothing to store
        host = v.array if isinstance(v.array, np.ndarray) else v.array.get()
        if v.logical_dtype is not None:
            host = host.view(v.logical_dtype)
        writer.add_slice(v.name, v.partition[0], slice_spec(v.partition, tuple(v.array.shape)), host)


def save_checkpoint(
    prefix: str,
    groups: Sequence[Group],
    *,
    sharded: bool,
    durable: bool = True,
    fileops: FileOps | None = None,
    on_phase: Callable[[str, float], None] | None = None,
    after_commit: Callable[[], None] | None = None,
    state_file: str | None = None,
    progress: Any = None,
    on_failure: Callable[[], None] | None = None,
) -> str:
    """Writes ``groups`` as the checkpoint ``prefix``, atomically. Returns ``prefix``.

    Args:
        prefix: the checkpoint prefix; its directory must exist.
        groups: device groups (see :func:`group_by_device`), in shard order.
        sharded: one shard per group, written concurrently; else one data file.
        durable: fsync files and directories.
        fileops: file operations (tests inject faults here).
        on_phase: called with ``(phase, seconds)`` as each stage of the save ends: for
            each shard k ``stage:k`` (its worker handing the tensors to the writer:
            layout, device-to-host copies, waits for the writer threads),
            ``checksum:k`` and ``write:k`` (thread-seconds of the writer threads,
            which overlap the staging), ``fsync:k`` (the data file) and ``shard:k``
            (the shard's wall time); then ``merge`` and ``total``.
        after_commit: run once the checkpoint is committed, before the temp
            directory goes (the Saver records the checkpoint in its state file
            here). If it raises, the commit is rolled back unless the state file
            lists the checkpoint, and the error propagates.
        state_file: the state file ``after_commit`` writes, noted in the temp
            directory so that a crash in between can be cleaned up.
        progress: a :class:`gpusaver.progress.Progress` counting the bytes written.
        on_failure: called as soon as a shard fails, before the others stop (an asynchronous
            save's capture waiting for memory that shard would have freed stops waiting).

    Raises:
        CheckpointWriteError: an OSError, keeping its errno; nothing is committed.
    """
    ops = fileops or POSIX
    ops.phase("save:start")
    started = time.perf_counter()
    try:
        temp = make_temp_dir(prefix, ops, state_file=state_file)
    except OSError as e:
        raise os_error(e, "creating the temporary directory for", prefix) from e
    shard_lists = [[g] for g in groups] if sharded else [list(groups)]
    n = len(shard_lists)
    part_prefixes = [os.path.join(temp.path, "part-%05d-of-%05d" % (k, n)) for k in range(n)]
    errors: list[BaseException] = []
    after_commit_point: list[bool] = []
    keep_marker = False
    writers: list[Any] = [None] * n
    done = [threading.Event() for _ in range(n)]
    abort = threading.Event()

    def write_shard(k: int) -> None:
        try:
            t0 = time.perf_counter()
            init = getattr(shard_lists[k][0].backend, "thread_init", None) if len(shard_lists[k]) == 1 else None
            device = shard_lists[k][0].device
            thread_init = (lambda: init(device)) if init is not None else None
            writer = BundleWriter(
                part_prefixes[k], durable=durable, fileops=ops, thread_init=thread_init, progress=progress
            )
            try:
                for group in shard_lists[k]:
                    if abort.is_set():
                        raise _Aborted()
                    write_group(group, writer)
                staged = time.perf_counter() - t0
                if n == 1:  # the index, but for the crcs, while the writer threads write
                    writer.prepare_index(encode_header(1))
                writer.finish(write_index=False)  # the coordinator merges from memory
            except BaseException:
                writer.abort()
                raise
            writers[k] = writer
            ops.phase(f"shard:written:{k}")
            if on_phase:
                timings = writer.timings
                on_phase(f"stage:{k}", staged)
                for name in ("checksum", "write", "fsync"):
                    on_phase(f"{name}:{k}", timings[name])
                on_phase(f"shard:{k}", time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            abort.set()
            errors.append(e)
            if on_failure is not None:
                on_failure()
        finally:
            done[k].set()
        if k == n - 1:  # the last device's worker coordinates the merge
            for ev in done:
                ev.wait()
            if errors:
                return
            try:
                t0 = time.perf_counter()
                # One writer of one run: its table straight from its columns (None where that does not apply).
                table = writers[0].index_table(encode_header(1)) if n == 1 else None
                items: list[tuple[bytes, bytes]] = []
                if table is None:
                    # Each writer's items are sorted already: merge them, don't sort again.
                    runs = [w.index_items(shard_id=j, header=False) for j, w in enumerate(writers)]
                    items = runs[0] if n == 1 else combine_slices(list(heapq.merge(*runs)))
                file_ids = {w.data_path: j for j, w in enumerate(writers)}
                if progress is not None:  # every byte is written: reported before the commit, so a
                    progress.finish()  # callback that raises fails the save with nothing committed
                # Marks the temp dir: from here on this save may replace <prefix>'s files.
                ops.close(ops.create(os.path.join(temp.path, COMMITTING)))
                try:
                    commit_merged(ops, prefix, encode_header(n), items, file_ids, durable=durable, table=table)
                except BaseException:
                    # The old index went first: an index now is this save's, committed
                    # before the failure (the directory fsync): it is taken back below.
                    after_commit_point.append(os.path.lexists(index_filename(prefix)))
                    raise
                if on_phase:
                    on_phase("merge", time.perf_counter() - t0)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=write_shard, args=(k,), name=f"gpusaver-shard-{k}") for k in range(n - 1)]
    for t in threads:
        t.start()
    write_shard(n - 1)
    for t in threads:
        t.join()
    try:
        if errors:
            if any(after_commit_point) and not roll_back_unrecorded(prefix, state_file, ops):
                keep_marker = True
            real = [e for e in errors if not isinstance(e, _Aborted)] or errors
            err = real[0]
            if isinstance(err, OSError) and not isinstance(err, CheckpointWriteError):
                raise os_error(err, "saving", prefix) from err
            raise err
        try:
            ops.phase("save:committed")
            if after_commit is not None:
                after_commit()  # e.g. the state file: the temp dir marks the save unfinished until then
        except BaseException:
            # Not recorded, so not saved: take the commit back. Where that fails, the
            # temp dir stays, unlocked, and the next save of this directory finishes it.
            if not roll_back_unrecorded(prefix, state_file, ops):
                keep_marker = True
            raise
    finally:
        if keep_marker:
            temp.release()
        else:
            temp.remove(ops)
    if on_phase:
        on_phase("total", time.perf_counter() - started)
    return prefix


class _Aborted(Exception):
    """Another shard failed; this one stopped early."""


# --------------------------------------------------------------------- restore
def check_restore(
    reader: BundleReader, variables: Sequence[ResolvedVariable], reshape: bool, tensors: TensorList | None = None
) -> None:
    """Checks every variable against the checkpoint before any array is touched.

    With the C extension, the variables that fit their entries exactly are
    checked as one batch; the rest (and any error) go through the checks below.

    Args:
        tensors: the variables' ``(name, array)`` pairs, when the caller has them cached.

    Raises:
        TensorNotFoundError: a variable is missing (a KeyError).
        DTypeMismatchError / ShapeMismatchError: it does not fit (ValueErrors).
    """
    if native.lib is not None:
        tensors = tensors if tensors is not None else TensorList((v.name, v.array) for v in variables)
        cols = reader.columns(tensors.keys, tensors.arrays)  # with the arrays: checked in the same pass
        assert cols is not None
        good = reader.fits(cols, tensors.arrays)
        if not good.all():
            rest = np.array([i for i in np.flatnonzero(~good).tolist() if not isinstance(tensors.arrays[i], np.ndarray)],
                            np.int64)
            if len(rest):
                logical = {i: v.logical_dtype for i, v in enumerate(variables) if v.logical_dtype is not None}
                good[rest] = _device_arrays_fit(reader, cols, tensors, rest, logical)
        if good.all():
            return
        variables = [variables[i] for i in np.flatnonzero(~good)]
    _check_restore_each(reader, variables, reshape)


def _device_arrays_fit(
    reader: BundleReader, cols: Any, tensors: TensorList, which: np.ndarray, logical: dict[int, np.dtype]
) -> np.ndarray:
    """For arrays ``which`` that are not NumPy's (device arrays, which the C extension cannot inspect),
    whether each fits its entry exactly: a plain entry of the same dtype, shape and byte size whose
    bytes lie inside its data file. Vectorised: one pass over the arrays' attributes."""
    arrays = [tensors.arrays[i] for i in which.tolist()]
    fit = np.zeros(len(arrays), bool)
    if reader.big_endian or not len(arrays):
        return fit
    n = len(arrays)
    positions = {i: k for k, i in enumerate(which.tolist())}
    enums, ndims, dims = describe(arrays, {positions[i]: dt for i, dt in logical.items() if i in positions})
    nbytes = np.fromiter((a.nbytes for a in arrays), np.int64, n)
    fit = cols.ok[which].astype(bool) & (cols.enums[which] == enums) & (cols.ndims[which] == ndims)
    fit &= cols.sizes[which] == nbytes
    # dimensions, where the ranks agree: compare each stored dim with the array's
    starts = cols.dim_starts[which].astype(np.int64)
    mine_at = np.zeros(n + 1, np.int64)
    np.cumsum(ndims, out=mine_at[1:])
    owner = np.repeat(np.arange(n), ndims)
    pos = np.arange(len(dims)) - mine_at[owner]
    stored = cols.dims[np.minimum(starts[owner] + pos, max(len(cols.dims) - 1, 0))] if len(cols.dims) else dims * 0
    fit[owner[stored != dims]] = False  # (no np.unique: it imports numpy.ma on first use)
    return reader.inside_data_files(cols.shards[which], cols.offsets[which], cols.sizes[which], fit)


def _check_restore_each(reader: BundleReader, variables: Sequence[ResolvedVariable], reshape: bool) -> None:
    try:
        entries = reader.entries([v.name for v in variables])
    except TensorNotFoundError as e:
        raise TensorNotFoundError(
            f"variable {e.name!r} not found in checkpoint {reader.prefix!r}; restore(..., strict=False) "
            "restores the others",
            e.name,
        ) from None
    for v, entry in zip(variables, entries):
        stored = dtypes.to_numpy(entry.dtype, path=reader.index_path, tensor=v.name)
        mine = v.dtype
        if mine.kind != "O" and mine.byteorder not in "=|":
            mine = mine.newbyteorder("=")
        if stored != mine:
            raise DTypeMismatchError(
                f"variable {v.name!r} is {mine} but checkpoint {reader.prefix!r} stores it as "
                f"{dtypes.dtype_name(entry.dtype)} ({stored})"
            )
        shape = tuple(v.array.shape)
        if tuple(entry.shape) != shape:
            same_count = int(np.prod(shape, dtype=np.int64)) == entry.num_elements
            if not (reshape and same_count):
                hint = "" if reshape else " (reshape=True allows a different shape with the same element count)"
                raise ShapeMismatchError(
                    f"variable {v.name!r} has shape {list(shape)} but checkpoint {reader.prefix!r} stores "
                    f"shape {list(entry.shape)}{hint}"
                )
        if not getattr(getattr(v.array, "flags", None), "writeable", True):
            raise InvalidArgumentError(f"variable {v.name!r} is read-only and cannot be restored in place")
        # A corrupt entry size, a missing or truncated data file: found now, before any array changes.
        if entry.slices:
            for extents in entry.slices:
                part = reader.entry(encode_slice_key(v.name, extents))
                reader.check_size(v.name, part)
                reader.data_location(v.name, part)
        else:
            reader.check_size(v.name, entry)
            if entry.offset + entry.size > reader.data_file_size(entry.shard_id):
                reader.data_location(v.name, entry)  # raises, naming the file


def restore_checkpoint(
    reader: BundleReader,
    groups: Sequence[Group],
    *,
    sequential: bool = False,
    order: Sequence[str] | None = None,
) -> None:
    """Restores every group in place (groups in parallel unless ``sequential``).

    Every group runs to its end. Damage found in several groups raises the ChecksumError of the
    variable that comes first in ``order`` (the Saver's; default: the groups' order), whichever
    thread found it first; any other error wins over damage.
    """
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(g: Group) -> None:
        try:
            g.backend.restore_group(reader, g.tensors(), sequential=sequential)
        except BaseException as e:  # noqa: BLE001 - ranked and re-raised below
            with lock:
                errors.append(e)

    if sequential or len(groups) == 1:
        for g in groups:
            run(g)
    else:
        run_parallel(run, groups, "gpusaver-restore", caller_takes_first=False)
    if not errors:
        return
    others = [e for e in errors if not isinstance(e, ChecksumError)]
    if others:
        raise others[0]
    names = order if order is not None else [v.name for g in groups for v in g.variables]
    position = {name: i for i, name in enumerate(names)}
    raise min(errors, key=lambda e: position.get(getattr(e, "tensor", None) or "", len(position)))
