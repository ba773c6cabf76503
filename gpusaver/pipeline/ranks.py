"""One checkpoint from several processes (ranks), coordinated through a :class:`~gpusaver.distributed.Coordinator`.

Every rank calls the save with the same arguments. The steps, each ending in an
agreement of all ranks (any failure raises on every rank, naming the first rank
that failed):

1. **Plan.** Each rank sends how many shards it writes and its variables' names,
   dtypes and shapes. Shard numbers are global, in (rank, device) order. A name
   held by several ranks is a *replicated* variable: its shapes and dtypes must
   agree, and one of its holders writes it (the holders take turns, name by
   name, so that no rank writes them all).
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
from gpusaver.format.merge import combine_slices, commit_merged
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
    """Each variable's name, dtype, shape (and with ``with_crc`` the crc32c of its bytes), as JSON."""
    rows = [
        [v.key, str(v.dtype), list(np.shape(v.array)), _host_crc(v.array) if with_crc else None]
        for g in groups
        for v in [*g.variables, *getattr(g, "parts", ())]
    ]
    return json.dumps(rows).encode()


def plan_replicas(described: Sequence[bytes], rank: int) -> set[str]:
    """The replicated keys (names; a region's name and slice spec) this rank does not write (another holder does), after checking that every
    holder of a name has the same dtype and shape.

    A name held by ranks ``h_0 < h_1 < ...`` is written by ``h_(c mod len(h))``, where ``c`` counts the
    replicated names with that same holder set before it in sorted order: each holder takes every
    ``len(h)``-th of them.

    Raises:
        DTypeMismatchError, ShapeMismatchError: holders disagree (the same on every rank).
        InvalidArgumentError: with crcs (``check_replicas``), holders hold different bytes.
    """
    seen: dict[str, tuple[str, tuple[int, ...], list[int], Any]] = {}
    for r, blob in enumerate(described):
        for name, dtype, shape, checksum in json.loads(blob):
            got = seen.get(name)
            if got is None:
                seen[name] = (dtype, tuple(shape), [r], checksum)
                continue
            if got[0] != dtype:
                raise DTypeMismatchError(
                    f"replicated variable {name!r}: rank {got[2][0]} holds {got[0]}, rank {r} holds {dtype}"
                )
            if got[1] != tuple(shape):
                raise ShapeMismatchError(
                    f"replicated variable {name!r}: rank {got[2][0]} holds shape {list(got[1])}, "
                    f"rank {r} holds {list(shape)}"
                )
            if checksum is not None and got[3] is not None and checksum != got[3]:
                raise InvalidArgumentError(
                    f"replicated variable {name!r} differs between rank {got[2][0]} and rank {r} "
                    f"(crc32c {got[3]:#010x} and {checksum:#010x}; check_replicas=True)"
                )
            got[2].append(r)
    skip: set[str] = set()
    turns: dict[tuple[int, ...], int] = {}
    for name in sorted(n for n, (_, _, holders, _) in seen.items() if len(holders) > 1):
        holders = tuple(seen[name][2])
        turn = turns.get(holders, 0)
        turns[holders] = turn + 1
        if rank in holders and holders[turn % len(holders)] != rank:
            skip.add(name)
    return skip


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
        CoordinatorError: on every rank, when holders of a replicated variable disagree (or a rank failed).
    """
    c = coordinator
    error: BaseException | None = None
    described = agree(c, _describe(groups, check_replicas), what="planning the save")
    skip: set[str] = set()
    try:
        skip = plan_replicas(described, c.rank)
    except BaseException as e:  # noqa: BLE001 - the same on every rank; agreed below all the same
        error = e
    agree(c, error=error, what="planning the save")
    mine = filter_groups(skip) if skip and filter_groups is not None else groups
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
