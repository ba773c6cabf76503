"""One checkpoint from several processes (ranks), coordinated through a :class:`~gpusaver.distributed.Coordinator`.

Every rank calls the save with the same arguments. The steps, each ending in an
agreement of all ranks (any failure raises on every rank, naming the first rank
that failed):

1. **Plan.** Each rank sends how many shards it writes and its variables' names,
   dtypes and shapes (a region of a partitioned variable: its tensor's full shape
   and its offset too). Shard numbers are global, in (rank, device) order. A name
   held by several ranks is a *replicated* variable: its shapes and dtypes must
   agree, and one of its holders writes it (the holders take turns, name by
   name, so that no rank writes them all). The regions of a partitioned variable
   must be of one tensor (full shape, dtype) and disjoint across the ranks; the
   same region held by several ranks is replicated as a variable is; a name may
   not be a whole variable on one rank and partitioned on another. Any of these
   refused here is refused on every rank before anything is written.
2. **Write.** Each rank writes its shards into a temporary directory of its own,
   ``<prefix>_temp_<uuid>`` (locked by its process, as a single-process save's),
   and sends the encoded index entries and the paths of its data files.
3. **Commit.** The coordinator rank (the last, as TensorFlow merges on the last
   device) checks that it sees every data file (else the save fails, naming the
   rank, its host and the path: the ranks must share a file system), merges the
   entries, and commits with the single-process protocol: old index out, data
   files renamed in, new index last; then it records the checkpoint in the state
   file and applies retention. Every rank returns the prefix, or raises.

A rank that dies makes the others raise (see :mod:`gpusaver.distributed`); its
temporary directory is cleaned by a later save, and nothing was committed.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import socket
import threading
import time
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from gpusaver.distributed import agree, broadcast_result
from gpusaver.errors import CheckpointWriteError, DTypeMismatchError, InvalidArgumentError, ShapeMismatchError
from gpusaver.format import BundleWriter
from gpusaver.format.entry import encode_header
from gpusaver.format.merge import combine_slices, commit_merged, find_overlap
from gpusaver.format.naming import index_filename
from gpusaver.pipeline import write_group
from gpusaver.pipeline.tempdirs import COMMITTING, make_temp_dir, roll_back_unrecorded
from gpusaver.storage import os_error
from gpusaver.storage.fileops import POSIX, FileOps

__all__ = ["RankPlan", "plan_ranks", "save_across_ranks", "plan_replicas"]


def _frame(parts: Sequence[bytes]) -> bytes:
    """Length-prefixed parts in one buffer."""
    lengths = np.array([len(p) for p in parts], np.int64)
    return np.array([len(parts)], np.int64).tobytes() + lengths.tobytes() + b"".join(parts)


def _unframe(data: bytes) -> list[bytes]:
    n = int(np.frombuffer(data, np.int64, 1)[0])
    lengths = np.frombuffer(data, np.int64, n, 8)
    at, out = 8 + 8 * n, []
    view = memoryview(data)
    for length in lengths.tolist():
        out.append(bytes(view[at : at + length]))
        at += length
    return out


def _encode_items(items: Sequence[tuple[bytes, bytes]]) -> bytes:
    keys, values = [k for k, _ in items], [v for _, v in items]
    return _frame([_frame(keys), _frame(values)])


def _decode_items(data: bytes) -> list[tuple[bytes, bytes]]:
    keys, values = (_unframe(p) for p in _unframe(data))
    return list(zip(keys, values))


def _host_crc(array: Any) -> int:
    """The crc32c of an array's C-order bytes (a GPU array is copied to the host for it)."""
    from gpusaver.format import crc
    from gpusaver.format.tensors import byte_view

    host = array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray) else np.asarray(array)
    if host.dtype == object:
        return zlib.crc32(b"\0".join(bytes(x) for x in host.ravel()))
    return crc.extend(0, byte_view(np.ascontiguousarray(host)))


def _describe(groups: Sequence[Any], with_crc: bool) -> bytes:
    """Each variable's key, dtype, shape (and with ``with_crc`` the crc32c of its bytes), as JSON; a region of a
    partitioned variable also its name, its tensor's full shape and its offset."""
    rows = [
        [v.key, str(v.dtype), list(np.shape(v.array)), _host_crc(v.array) if with_crc else None]
        for g in groups
        for v in g.variables
    ]
    rows += [
        [v.key, str(v.dtype), list(np.shape(v.array)), _host_crc(v.array) if with_crc else None,
         v.name, list(v.partition[0]), list(v.partition[1])]
        for g in groups
        for v in getattr(g, "parts", ())
    ]
    return json.dumps(rows).encode()


class _Replica:
    """One variable, or one region, and the ranks that hold it."""

    __slots__ = ("key", "dtype", "shape", "holders", "checksum")

    def __init__(self, key: str, dtype: str, shape: tuple[int, ...], rank: int, checksum: Any) -> None:
        self.key, self.dtype, self.shape, self.holders, self.checksum = key, dtype, shape, [rank], checksum


def _check_bytes(what: str, got: _Replica, rank: int, checksum: Any) -> None:
    if checksum is not None and got.checksum is not None and checksum != got.checksum:
        raise InvalidArgumentError(
            f"{what} differs between rank {got.holders[0]} and rank {rank} "
            f"(crc32c {got.checksum:#010x} and {checksum:#010x}; check_replicas=True)"
        )


def _where(offset: Sequence[int], shape: Sequence[int]) -> str:
    return f"offset {list(offset)} shape {list(shape)}"


def _plan(described: Sequence[bytes], rank: int) -> tuple[set[str], set[str]]:
    """:func:`plan_replicas`, as the keys of the plain variables and those of the regions this rank does not write."""
    plain: dict[str, _Replica] = {}
    #: a partitioned variable's name -> (full shape, dtype, the first rank holding a region of it)
    tensors: dict[str, tuple[tuple[int, ...], str, int]] = {}
    #: (name, offset, shape) -> the region
    regions: dict[tuple[str, tuple[int, ...], tuple[int, ...]], _Replica] = {}
    for r, blob in enumerate(described):
        for row in json.loads(blob):
            key, dtype, shape, checksum = row[0], row[1], tuple(row[2]), row[3]
            if len(row) == 4:
                got = plain.get(key)
                if got is None:
                    plain[key] = _Replica(key, dtype, shape, r, checksum)
                    continue
                if got.dtype != dtype:
                    raise DTypeMismatchError(
                        f"replicated variable {key!r}: rank {got.holders[0]} holds {got.dtype}, rank {r} holds {dtype}"
                    )
                if got.shape != shape:
                    raise ShapeMismatchError(
                        f"replicated variable {key!r}: rank {got.holders[0]} holds shape {list(got.shape)}, "
                        f"rank {r} holds {list(shape)}"
                    )
                _check_bytes(f"replicated variable {key!r}", got, r, checksum)
                got.holders.append(r)
                continue
            name, full, offset = row[4], tuple(row[5]), tuple(row[6])
            tensor = tensors.setdefault(name, (full, dtype, r))
            if tensor[0] != full:
                raise ShapeMismatchError(
                    f"partitioned variable {name!r}: rank {tensor[2]} holds a region of a tensor of shape "
                    f"{list(tensor[0])}, rank {r} a region of a tensor of shape {list(full)}"
                )
            if tensor[1] != dtype:
                raise DTypeMismatchError(
                    f"partitioned variable {name!r}: rank {tensor[2]} holds a region of a {tensor[1]} tensor, "
                    f"rank {r} a region of a {dtype} tensor"
                )
            got = regions.get((name, offset, shape))
            if got is None:
                regions[(name, offset, shape)] = _Replica(key, dtype, shape, r, checksum)
                continue
            _check_bytes(f"the region {_where(offset, shape)} of partitioned variable {name!r}", got, r, checksum)
            got.holders.append(r)
    for name, (full, _, r) in tensors.items():
        whole = plain.get(name)
        if whole is not None:
            raise InvalidArgumentError(
                f"variable {name!r} is a whole variable of shape {list(whole.shape)} on rank {whole.holders[0]} "
                f"and a partitioned one (a region of a tensor of shape {list(full)}) on rank {r}: every rank "
                "must hold it the same way"
            )
    by_name: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], _Replica]]] = {}
    for (name, offset, shape), region in regions.items():
        by_name.setdefault(name, []).append((offset, shape, region))
    for name, held in by_name.items():
        pair = find_overlap([[(o, o + n) for o, n in zip(offset, shape)] for offset, shape, _ in held])
        if pair is None:
            continue
        (oa, sa, a), (ob, sb, b) = sorted((held[k] for k in pair), key=lambda h: h[2].holders[0])
        raise InvalidArgumentError(
            f"partitioned variable {name!r}: the region {_where(oa, sa)} on rank {a.holders[0]} overlaps the region "
            f"{_where(ob, sb)} on rank {b.holders[0]}; the regions of a variable must be disjoint across ranks "
            "(a region that several ranks hold whole is a replica, written once)"
        )
    # Replicas, plain and regions alike, in order of their keys: each holder set's holders take turns.
    replicated = sorted(
        [(v.key, 0, v) for v in plain.values() if len(v.holders) > 1]
        + [(v.key, 1, v) for v in regions.values() if len(v.holders) > 1],
        key=lambda t: (t[0], t[1]),
    )
    skip: tuple[set[str], set[str]] = (set(), set())
    turns: dict[tuple[int, ...], int] = {}
    for key, kind, v in replicated:
        holders = tuple(v.holders)
        turn = turns.get(holders, 0)
        turns[holders] = turn + 1
        if rank in holders and holders[turn % len(holders)] != rank:
            skip[kind].add(key)
    return skip


def plan_replicas(described: Sequence[bytes], rank: int) -> set[str]:
    """The replicated keys (names; a region's name and slice spec) this rank does not write (another holder does),
    after checking that the ranks agree about the variables.

    A name held by ranks ``h_0 < h_1 < ...`` is written by ``h_(c mod len(h))``, where ``c`` counts the
    replicated names with that same holder set before it in sorted order: each holder takes every
    ``len(h)``-th of them.

    A region of a partitioned variable is replicated as a variable is: the same region (name, offset and
    shape, of one full shape and dtype) held by several ranks is written once, by one of its holders, the
    holders taking turns over the replicated keys as above (with ``check_replicas``, their bytes compared
    too). Regions that overlap without being the same are refused, as one process refuses them: the
    stored slices would overlap, which TensorFlow refuses ("Overlapping slices") and from which a reader
    takes one rank's values. Regions that leave holes are allowed (TensorFlow's partial slices).

    Raises:
        DTypeMismatchError, ShapeMismatchError: holders of a name disagree on its dtype or shape, or
            ranks holding regions of a partitioned variable disagree on its dtype or full shape.
        InvalidArgumentError: regions of a partitioned variable on two ranks overlap without being the same; a
            name is a whole variable on one rank and partitioned on another; with crcs (``check_replicas``),
            holders hold different bytes. All of them the same on every rank (``described`` is).
    """
    skip_plain, skip_regions = _plan(described, rank)
    return skip_plain | skip_regions


def _without(groups: Sequence[Any], skip_plain: set[str], skip_regions: set[str]) -> list[Any]:
    """``groups`` without the plain variables keyed in ``skip_plain`` and the regions keyed in ``skip_regions``."""
    from gpusaver.pipeline import Group

    return [
        Group(g.device, [v for v in g.variables if v.key not in skip_plain],
              [v for v in getattr(g, "parts", ()) if v.key not in skip_regions])
        for g in groups
    ]


def _ambiguous(groups: Sequence[Any], skip_plain: set[str], skip_regions: set[str]) -> bool:
    """Whether one of the keys to leave out is also the key of a variable of the other kind this rank writes
    (a plain variable named like a region, ``"emb/0,5"``): a filter by key alone would drop both."""
    parts = {v.key for g in groups for v in getattr(g, "parts", ())}
    if not parts:
        return False  # the common case: checked without a look at the (maybe millions of) plain variables
    if (skip_plain & parts) - skip_regions:
        return True
    return bool(skip_regions) and any(
        v.key in skip_regions and v.key not in skip_plain for g in groups for v in g.variables
    )


class _Written:
    """What one rank wrote: per shard, its data file and its sorted index entries."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.items: list[list[tuple[bytes, bytes]]] = []


class RankPlan(NamedTuple):
    """What this rank writes: its device groups (replicated variables others write left out), its
    first shard number and the checkpoint's number of shards."""

    groups: list[Any]
    base: int
    total: int


def plan_ranks(
    groups: Sequence[Any],
    coordinator: Any,
    *,
    sharded: bool,
    filter_groups: Callable[[set[str]], Sequence[Any]] | None = None,
    check_replicas: bool = False,
) -> RankPlan:
    """Step 1, on every rank: names, dtypes and shapes gathered; replicated variables assigned; shards numbered.

    Args:
        groups: this rank's device groups (with ``variables``).
        filter_groups: ``filter_groups(skip)`` gives ``groups`` without the variables named in ``skip``.
        check_replicas: compare the crc32c of every replicated variable's bytes across its holders.

    Raises:
        CoordinatorError: on every rank, before anything is written, when the ranks disagree about the variables
            (``error_type`` and, on each rank, ``__cause__`` say how: see :func:`plan_replicas`), or a rank failed.
    """
    c = coordinator
    error: BaseException | None = None
    described = agree(c, _describe(groups, check_replicas), what="planning the save")
    skip_plain: set[str] = set()
    skip_regions: set[str] = set()
    try:
        skip_plain, skip_regions = _plan(described, c.rank)
    except BaseException as e:  # noqa: BLE001 - the same on every rank; agreed below all the same
        error = e
    agree(c, error=error, what="planning the save")
    mine: Sequence[Any] = groups
    if skip_plain or skip_regions:
        if filter_groups is not None and not _ambiguous(groups, skip_plain, skip_regions):
            mine = filter_groups(skip_plain | skip_regions)
        else:
            mine = _without(groups, skip_plain, skip_regions)
    mine = [g for g in mine if g.variables or getattr(g, "parts", None)]
    count = (len(mine) if sharded else 1) if mine else 0
    counts = [int(x) for x in agree(c, str(count).encode(), what="counting the shards")]
    return RankPlan(mine, sum(counts[: c.rank]), sum(counts))


def save_across_ranks(
    prefix: str,
    plan: RankPlan,
    groups: Sequence[Any],
    coordinator: Any,
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
    """Steps 2 and 3: writes this rank's part of the checkpoint ``prefix``; every rank commits it or raises.

    Args:
        prefix: the checkpoint prefix (a local path), the same on every rank.
        plan: this rank's :func:`plan_ranks`.
        groups: what to write: ``plan.groups`` (or stand-ins for them, one for one, in order: an
            asynchronous save's recorded snapshot).
        coordinator: the job's :class:`~gpusaver.distributed.Coordinator`.
        sharded: one shard per device group; else one per rank.
        The others: as :func:`gpusaver.pipeline.save_checkpoint`; ``after_commit`` runs on the
        coordinator rank only.

    Raises:
        CoordinatorError: on every rank, when any rank failed (naming the first) or died.
    """
    c = coordinator
    rank, size = c.rank, c.size
    root = size - 1
    ops = fileops or POSIX
    started = time.perf_counter()
    ops.phase("save:start")
    error: BaseException | None = None
    groups = list(groups)
    shard_lists = ([[g] for g in groups] if sharded else [groups]) if groups else []
    base, total = plan.base, plan.total

    # 2. write this rank's shards into a temp directory of its own
    temp = None
    written = _Written()
    payload = b""
    try:
        temp = make_temp_dir(prefix, ops, state_file=state_file if rank == root else None)
        _write_shards(temp.path, shard_lists, base, total, written, durable, ops, on_phase, progress, on_failure)
        host = socket.gethostname()
        meta = json.dumps({"host": host, "files": written.files}).encode()
        payload = _frame([meta] + [_encode_items(items) for items in written.items])
    except BaseException as e:  # noqa: BLE001 - reported to every rank
        error = e
        if on_failure is not None:
            on_failure()
    try:
        gathered = agree(c, payload, error=error, what="writing the shards")
    except BaseException:
        if temp is not None:
            temp.remove(ops)
        raise

    # 3. the coordinator rank commits; every rank learns how it went
    keep_marker = False

    def commit() -> bytes:
        nonlocal keep_marker
        t0 = time.perf_counter()
        runs: list[list[tuple[bytes, bytes]]] = []
        file_ids: dict[str, int] = {}
        shard = 0
        for r, blob in enumerate(gathered):
            parts = _unframe(blob)
            meta = json.loads(parts[0])
            for path, items in zip(meta["files"], parts[1:]):
                if not os.path.lexists(path):
                    raise CheckpointWriteError(
                        errno.ENOENT,
                        f"rank {root} on host {socket.gethostname()} cannot see the data file {path} that rank {r} "
                        f"wrote on host {meta['host']}: the ranks of a save must share a file system",
                        path,
                    )
                file_ids[path] = shard
                runs.append(_decode_items(items))
                shard += 1
        items = runs[0] if len(runs) == 1 else combine_slices(list(heapq.merge(*runs)))
        if progress is not None:
            progress.finish()
        assert temp is not None
        ops.close(ops.create(os.path.join(temp.path, COMMITTING)))
        try:
            commit_merged(ops, prefix, encode_header(total), items, file_ids, durable=durable)
        except BaseException:
            if os.path.lexists(index_filename(prefix)) and not roll_back_unrecorded(prefix, state_file, ops):
                keep_marker = True
            raise
        if on_phase:
            on_phase("merge", time.perf_counter() - t0)
        try:
            ops.phase("save:committed")
            if after_commit is not None:
                after_commit()
        except BaseException:
            if not roll_back_unrecorded(prefix, state_file, ops):
                keep_marker = True
            raise
        return b""

    try:
        broadcast_result(c, root, commit, what="committing the checkpoint")
    finally:
        if temp is not None:
            if keep_marker:
                temp.release()
            else:
                temp.remove(ops)
    if on_phase:
        on_phase("total", time.perf_counter() - started)
    return prefix


def _write_shards(
    directory: str,
    shard_lists: Sequence[Sequence[Any]],
    base: int,
    total: int,
    written: _Written,
    durable: bool,
    ops: FileOps,
    on_phase: Callable[[str, float], None] | None,
    progress: Any,
    on_failure: Callable[[], None] | None = None,
) -> None:
    """Writes each shard (global number ``base + k``) on a thread of its own; raises the first error."""
    n = len(shard_lists)
    writers: list[Any] = [None] * n
    errors: list[BaseException] = []
    abort = threading.Event()

    def write(k: int) -> None:
        t0 = time.perf_counter()
        shard = base + k
        try:
            first = shard_lists[k][0]
            init = getattr(first.backend, "thread_init", None) if len(shard_lists[k]) == 1 else None
            thread_init = (lambda: init(first.device)) if init is not None else None
            writer = BundleWriter(
                os.path.join(directory, "part-%05d-of-%05d" % (shard, total)),
                durable=durable, fileops=ops, thread_init=thread_init, progress=progress,
            )
            try:
                for group in shard_lists[k]:
                    if abort.is_set():
                        return
                    write_group(group, writer)
                writer.finish(write_index=False)
            except BaseException:
                writer.abort()
                raise
            writers[k] = writer
            ops.phase(f"shard:written:{shard}")
            if on_phase:
                on_phase(f"shard:{shard}", time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - raised below
            abort.set()
            errors.append(e)
            if on_failure is not None:
                on_failure()

    threads = [threading.Thread(target=write, args=(k,), name=f"gpusaver-shard-{base + k}") for k in range(1, n)]
    for t in threads:
        t.start()
    if n:
        write(0)
    for t in threads:
        t.join()
    if errors:
        err = errors[0]
        if isinstance(err, OSError) and not isinstance(err, CheckpointWriteError):
            raise os_error(err, "saving", directory) from err
        raise err
    for k, w in enumerate(writers):
        written.files.append(w.data_path)
        written.items.append(w.index_items(shard_id=base + k, header=False))
