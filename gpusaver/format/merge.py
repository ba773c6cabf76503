"""merge_bundles: several shard bundles into one checkpoint, committed atomically.

The merged index is what TensorFlow's MergeV2Checkpoints produces for the same
inputs (same entries, shard ids and header). The order of operations makes
the merge safe against crashes (design.md, "Commit protocol"):

1. any existing ``<merged>.index`` is removed first, so an old checkpoint of the
   same name becomes invisible before its data files are replaced;
2. stale data files of that old checkpoint are removed;
3. each input's data file is renamed to ``<merged>.data-0000k-of-0000N``;
4. the merged index is written to a temporary name, fsynced and renamed to
   ``<merged>.index``, then the directory is fsynced: the checkpoint exists;
5. the inputs' index files (and their directories, when then empty) are removed.

Named phases (``fileops.phase``) mark each step for fault injection.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from typing import Iterator, Sequence

from gpusaver.errors import CorruptCheckpointError, InvalidArgumentError
from gpusaver.storage.fileops import POSIX, FileOps
from gpusaver.format.entry import decode_entry, decode_header, encode_entry, encode_header
from gpusaver.format.naming import data_files, data_filename, index_filename
from gpusaver.format.table import TableReader, encode_table
from gpusaver.format.wire import Malformed, encode_varint
from gpusaver.storage import os_error
from gpusaver.storage.paths import local_path

__all__ = ["merge_bundles"]


def _read_input(prefix: str) -> tuple[int, bytes, int, list[tuple[bytes, bytes]]]:
    path = index_filename(prefix)
    try:
        table = TableReader.open(path)
        items = table.items()
        if not items or items[0][0] != b"":
            raise Malformed("no header entry")
        header = decode_header(items[0][1])
    except Malformed as e:
        raise CorruptCheckpointError(f"cannot merge {path!r}: {e}", path) from None
    return header.num_shards, header.version_bytes, header.endianness, items[1:]


def merge_bundles(
    prefixes: Sequence[str],
    merged_prefix: str,
    *,
    durable: bool = True,
    fileops: FileOps | None = None,
    allow_missing_files: bool = False,
) -> None:
    """Merges the bundles ``prefixes`` into the checkpoint ``merged_prefix``.

    Inputs with no tensors are skipped (their data file is removed): the format
    cannot express an empty shard.

    Args:
        prefixes: the input bundles, in shard order.
        merged_prefix: the checkpoint to create (replaced if it exists).
        durable: fsync the new index and the directory.
        fileops: file operations (tests inject faults here).
        allow_missing_files: skip inputs whose index is missing instead of failing.

    Raises:
        ValueError: no inputs, a duplicate tensor, inputs that disagree on
            version or endianness, slices of one tensor that overlap.
        CorruptCheckpointError: an unreadable input.
        CheckpointWriteError: an OSError, keeping its errno.
    """
    ops = fileops or POSIX
    merged_prefix = local_path(merged_prefix)
    inputs = []
    for prefix in prefixes:
        prefix = local_path(prefix)
        if not os.path.exists(index_filename(prefix)):
            if allow_missing_files:
                continue
            raise InvalidArgumentError(f"cannot merge: {index_filename(prefix)!r} does not exist")
        inputs.append((prefix, *_read_input(prefix)))
    if not inputs:
        raise InvalidArgumentError(f"cannot merge into {merged_prefix!r}: no input bundle exists")

    merged: dict[bytes, bytes] = {}
    sliced: dict[bytes, tuple] = {}
    file_ids: dict[str, int] = {}
    empty_inputs: list[str] = []
    version, endianness = inputs[0][2], inputs[0][3]
    for prefix, num_shards, in_version, in_endianness, items in inputs:
        if in_endianness != endianness or in_version != version:
            raise InvalidArgumentError(f"cannot merge {prefix!r}: its version or endianness differs from {inputs[0][0]!r}")
        if not items:
            empty_inputs.append(prefix)
            continue
        for key, value in items:
            try:
                entry = decode_entry(value)
            except Malformed as e:
                raise CorruptCheckpointError(f"cannot merge {prefix!r}: entry {key!r}: {e}", prefix) from None
            if key in merged or key in sliced:
                if key in sliced and entry.slices:
                    full = sliced[key]
                    if full.dtype != entry.dtype or full.shape != entry.shape:
                        raise InvalidArgumentError(f"cannot merge: slices of {key!r} disagree on dtype or shape")
                    full.slices.extend(entry.slices)
                    continue
                raise InvalidArgumentError(f"cannot merge: duplicate tensor keyed by {key.decode('utf-8', 'replace')!r}")
            old_file = data_filename(prefix, entry.shard_id, num_shards)
            entry.shard_id = file_ids.setdefault(old_file, len(file_ids))
            if entry.slices:
                sliced[key] = entry
            else:
                merged[key] = encode_entry(
                    entry.dtype, entry.shape, entry.shard_id, entry.offset, entry.size, entry.crc32c
                )
    for key, full in sliced.items():
        _check_disjoint(key, full.shape, full.slices, "cannot merge: ")
        merged[key] = encode_entry(full.dtype, full.shape, full.shard_id, slices=full.slices)
    num_files = len(file_ids)
    header = encode_header(num_files)
    if version != b"\x08\x01" or endianness:
        header = (b"\x08" + encode_varint(num_files) if num_files else b"") + (
            b"\x10" + encode_varint(endianness) if endianness else b""
        ) + (b"\x1a" + encode_varint(len(version)) + version)

    directory = os.path.dirname(merged_prefix)
    if directory and not os.path.isdir(directory):
        try:
            ops.mkdir(directory)
        except FileExistsError:
            pass
        except OSError as e:
            raise os_error(e, "creating directory", directory) from e
    commit_merged(ops, merged_prefix, header, sorted(merged.items()), file_ids, durable=durable)
    _cleanup_inputs(ops, [p for p, *_ in inputs], merged_prefix, empty_inputs)


def commit_merged(
    ops: FileOps,
    merged_prefix: str,
    header: bytes,
    items: Sequence[tuple[bytes, bytes]],
    file_ids: dict[str, int],
    *,
    durable: bool = True,
    table: bytes | bytearray | None = None,
) -> None:
    """The commit of a merge: old index out, data files renamed in, new index last.

    Args:
        ops: file operations.
        merged_prefix: the checkpoint to create.
        header: the encoded header entry.
        items: the sorted ``(key, entry)`` pairs, entries already naming their new shard ids.
        file_ids: current data file path -> new shard id.
        durable: fsync the index and the directory.
        table: the whole index table, encoded already (then ``header`` and ``items`` are not used).

    Raises:
        CheckpointWriteError: an OSError, keeping its errno.
    """
    ops.phase("merge:start")
    try:
        with commit_lock(os.path.dirname(merged_prefix) or "."):
            ops.phase("merge:locked")
            _commit(ops, merged_prefix, header, items, file_ids, len(file_ids), durable, table)
    except OSError as e:
        raise os_error(e, "merging into", merged_prefix) from e


@contextlib.contextmanager
def commit_lock(directory: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` on the checkpoint's directory for one commit.

    Two saves committing one prefix at once (two Savers, two processes) would otherwise interleave:
    one's data files renamed in, the other's whole commit, then the first one's index over the
    other's data. Commits in one directory take turns instead (a commit is renames and one index
    write). Where the file system has no such lock (some network file systems), commits go on
    without it.
    """
    fd = None
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # drops the lock


def _commit(
    ops: FileOps,
    merged_prefix: str,
    header: bytes,
    items: Sequence[tuple[bytes, bytes]],
    file_ids: dict[str, int],
    num_files: int,
    durable: bool,
    table: bytes | bytearray | None = None,
) -> None:
    """The commit itself, under the directory's commit lock."""
    index = index_filename(merged_prefix)
    directory = os.path.dirname(merged_prefix) or "."
    if os.path.lexists(index):
        ops.remove(index)
        ops.phase("merge:old_index_removed")
    new_names = {data_filename(merged_prefix, i, num_files) for i in file_ids.values()}
    for stale in data_files(merged_prefix):
        if stale not in new_names and stale not in file_ids:
            ops.remove(stale)
    renamed: list[str] = []
    tmp = f"{index}.tempstate{uuid.uuid4().hex}"
    committed = False
    try:
        for old, new_id in file_ids.items():
            new = data_filename(merged_prefix, new_id, num_files)
            ops.rename(old, new)
            renamed.append(new)
            ops.phase(f"merge:data_renamed:{new_id}")
        if table is None:
            table = encode_table([(b"", header)] + list(items))
        fd = ops.create(tmp)
        try:
            ops.write(fd, [memoryview(table)])
            ops.phase("merge:index_written")
            if durable:
                ops.fsync(fd)
                ops.phase("merge:index_fsynced")
        finally:
            ops.close(fd)
        ops.phase("merge:before_index_rename")
        ops.rename(tmp, index)
        committed = True
        ops.phase("merge:index_renamed")
        if durable:
            ops.fsync_dir(directory)
            ops.phase("merge:dir_fsynced")
    except OSError:
        # Before the commit point a failed save leaves nothing behind. After it (the
        # directory fsync failed) the checkpoint is complete and stays; the error says
        # its durability is not assured, and the caller does not record it.
        if not committed:
            for path in [tmp] + renamed:
                try:
                    ops.remove(path)
                except OSError:
                    pass
        raise


def _cleanup_inputs(ops: FileOps, prefixes: list[str], merged_prefix: str, empty: list[str]) -> None:
    """Best effort, after the commit: input indexes, empty inputs' data files, empty input dirs."""
    merged_dir = os.path.dirname(os.path.abspath(merged_prefix))
    for prefix in prefixes:
        doomed = [index_filename(prefix)]
        if prefix in empty:
            doomed += data_files(prefix)
        for path in doomed:
            try:
                ops.remove(path)
            except OSError:
                pass
        in_dir = os.path.dirname(os.path.abspath(prefix))
        if in_dir != merged_dir:
            try:
                ops.rmdir(in_dir)
            except OSError:
                pass


def find_overlap(boxes: Sequence[Sequence[tuple[int, int]]]) -> tuple[int, int] | None:
    """Two of ``boxes`` that share an element, as their positions ``(i, j)`` with ``i < j``; None when
    they are disjoint.

    Each box is a ``(start, stop)`` per dimension, all of one rank; an empty box (``start >= stop``
    somewhere) holds nothing and meets no other. The boxes are swept in order of their starts along the
    dimension where the starts differ most (a row split's rows, a column split's columns), each checked
    only against the earlier ones it can still reach there. The answer depends only on ``boxes``: ranks
    that look at the same boxes name the same pair.
    """
    live = [i for i, box in enumerate(boxes) if all(lo < hi for lo, hi in box)]
    if len(live) < 2:
        return None
    ndim = len(boxes[live[0]])
    if ndim == 0:
        return live[0], live[1]  # two regions of a scalar are the scalar, twice
    axis = max(range(ndim), key=lambda d: len({boxes[i][d][0] for i in live}))
    active: list[int] = []
    for i in sorted(live, key=lambda k: (boxes[k][axis][0], k)):
        start = boxes[i][axis][0]
        active = [j for j in active if boxes[j][axis][1] > start]
        for j in active:
            if all(a < d and c < b for (a, b), (c, d) in zip(boxes[i], boxes[j])):
                return min(i, j), max(i, j)
        active.append(i)
    return None


def _box(shape: Sequence[int], extents: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(0, dim) if length == -1 else (start, start + length) for dim, (start, length) in zip(shape, extents)]


def _spec(extents: Sequence[tuple[int, int]]) -> str:
    return ":".join("-" if length == -1 else f"{start},{length}" for start, length in extents)


def combine_slices(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Sorted index items of several shards, with each partitioned tensor's entries made one.

    Each shard lists the slices it holds in its own entry for the tensor; the merged index holds one
    entry listing them all (as TensorFlow's MergeBundles does). The slices of the shards must be
    disjoint: TensorFlow refuses a tensor whose slices overlap, and a reader would take either
    shard's values where they meet. Slices that leave holes are kept (the format allows them).

    Raises:
        InvalidArgumentError: one name stored twice, or as slices that disagree on dtype or shape, or
            slices that overlap.
    """
    out: list[tuple[bytes, bytes]] = []
    n, at = len(items), 0
    while at < n:
        key, value = items[at]
        end = at + 1
        while end < n and items[end][0] == key:
            end += 1
        if end == at + 1:
            out.append((key, value))
        else:
            out.append((key, _combined(key, [v for _, v in items[at:end]])))
        at = end
    return out


def _combined(key: bytes, values: list[bytes]) -> bytes:
    """One entry for a tensor whose slices several shards list."""
    name = key.decode("utf-8", "replace")
    entries = [decode_entry(v) for v in values]
    first = entries[0]
    for other in entries[1:]:
        if not first.slices or not other.slices:
            raise InvalidArgumentError(f"tensor {name!r} is stored twice")
        if tuple(first.shape) != tuple(other.shape):
            raise InvalidArgumentError(
                f"the slices of {name!r} disagree: {list(first.shape)} and {list(other.shape)}"
            )
        if first.dtype != other.dtype:
            raise InvalidArgumentError(
                f"the slices of {name!r} disagree on the dtype: DataType {first.dtype} and {other.dtype}"
            )
    slices = [list(s) for e in entries for s in e.slices]
    _check_disjoint(key, first.shape, slices)
    return encode_entry(first.dtype, first.shape, first.shard_id, slices=slices)


def _check_disjoint(key: bytes, shape: Sequence[int], slices: Sequence[Sequence[tuple[int, int]]], what: str = "") -> None:
    """Raises InvalidArgumentError, naming two of them, when ``slices`` of the tensor ``key`` overlap."""
    pair = find_overlap([_box(shape, s) for s in slices])
    if pair is not None:
        a, b = (slices[k] for k in pair)
        raise InvalidArgumentError(
            f"{what}the slices of {key.decode('utf-8', 'replace')!r} overlap: {_spec(a)} and {_spec(b)} of shape "
            f"{list(shape)}"
        )
