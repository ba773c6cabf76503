"""Regions of partitioned variables held by several ranks (ranks as threads: tests/distributed/threadranks.py).

One process refuses two regions of one variable that overlap; several ranks must too. Every rank sends
its regions when the save is planned (gpusaver/pipeline/ranks.py), and before anything is written:

* regions of one variable on two ranks that overlap are refused on every rank, naming the variable,
  both regions and both ranks; nothing is written, the previous checkpoint stays the newest;
* so is a name that is a whole variable on one rank and partitioned on another, and ranks whose
  regions of one variable disagree on its full shape or dtype (even where both regions have the same
  slice spec, which used to be taken for one replicated region);
* the same region on several ranks is a replica, as a plain variable several ranks hold is: written
  once, by one of its holders (the holders taking turns), its bytes compared with ``check_replicas``;
* regions that leave holes are saved (TensorFlow's partial slices): each rank restores its own,
  TensorFlow reads them, a read of the hole is refused;
* a plain variable named like a region's key (``"emb/6,4"``) is not taken for the region.

The commit's merge (``combine_slices``) refuses overlapping slices too, as a last guard.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import gpusaver as gs
from gpusaver.errors import (
    CoordinatorError,
    CorruptCheckpointError,
    DTypeMismatchError,
    InvalidArgumentError,
    ShapeMismatchError,
)
from gpusaver.format import BundleReader
from gpusaver.format.entry import decode_entry, encode_entry
from gpusaver.format.merge import combine_slices
from gpusaver.format.slices import encode_slice_key
from gpusaver.storage.fileops import PosixFileOps
from threadranks import run_ranks

FULL = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)


class _Phases(PosixFileOps):
    """Records the phases a save reaches ("save:start": this rank began writing its shards)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def phase(self, name: str) -> None:
        self.seen.append(name)


def _region(name: str, full: np.ndarray, offset: tuple[int, ...], shape: tuple[int, ...], plus: float = 0):
    box = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return gs.Variable(full[box] + np.asarray(plus, full.dtype), name, full_shape=full.shape, offset=offset)


def _save(size: int, layout, prefix: str, step: int | None = None, **kwargs) -> tuple[list, list[_Phases]]:
    """Every rank saves ``layout(rank)``: each rank's result (or exception) and its recorded phases."""
    ops = [_Phases() for _ in range(size)]

    def rank(c):
        return gs.Saver(layout(c.rank), coordinator=c, fileops=ops[c.rank], **kwargs).save(prefix, global_step=step)

    return run_ranks(size, rank), ops


def _refused_while_planning(results: list, ops: list[_Phases], kind: type, *texts: str) -> None:
    """Every rank raised the planning's CoordinatorError (its own error of type ``kind`` the cause), naming
    ``texts``; no rank began writing."""
    for k, r in enumerate(results):
        assert isinstance(r, CoordinatorError), (k, r)
        assert str(r).startswith("planning the save failed"), (k, str(r))
        assert r.error_type == f"gpusaver.errors.{kind.__name__}", (k, r.error_type)
        assert isinstance(r.__cause__, kind), (k, r.__cause__)
        for text in texts:
            assert text in str(r), (k, text, str(r))
    for k, o in enumerate(ops):
        assert "save:start" not in o.seen, (k, o.seen)


def _previous(tmp_path, size: int) -> list[str]:
    """A good checkpoint ``m-1`` (rank k holds rows of FULL, disjoint): the directory's listing after it."""
    edges = np.linspace(0, 10, size + 1).astype(int)

    def layout(r):
        return [_region("emb", FULL, (int(edges[r]), 0), (int(edges[r + 1] - edges[r]), 3))]

    results, _ = _save(size, layout, str(tmp_path / "m"), 1)
    assert results == [str(tmp_path / "m-1")] * size
    return sorted(os.listdir(tmp_path))


def _unchanged(tmp_path, before: list[str]) -> None:
    """Nothing was committed or left behind: the listing of ``_previous``, and m-1 the newest, restoring FULL."""
    assert sorted(os.listdir(tmp_path)) == before
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-1")
    assert np.array_equal(gs.load_checkpoint(str(tmp_path / "m-1")).get_tensor("emb"), FULL)


# Each layout: per rank, its regions of FULL as (offset, shape); then the two regions and ranks the error names.
OVERLAPS = [
    pytest.param([[((0, 0), (6, 3))], [((4, 0), (6, 3))]], "offset [0, 0] shape [6, 3] on rank 0",
                 "offset [4, 0] shape [6, 3] on rank 1", id="rows"),
    pytest.param([[((0, 0), (5, 2))], [((4, 1), (6, 2))]], "offset [0, 0] shape [5, 2] on rank 0",
                 "offset [4, 1] shape [6, 2] on rank 1", id="one-corner"),
    pytest.param([[((0, 0), (10, 1))], [((0, 1), (10, 2))], [((2, 0), (10 - 2, 1))]],
                 "offset [0, 0] shape [10, 1] on rank 0", "offset [2, 0] shape [8, 1] on rank 2", id="columns"),
    pytest.param([[((0, 0), (3, 3)), ((3, 0), (3, 3))], [((3, 0), (3, 3))], [((5, 0), (5, 3))]],
                 "offset [3, 0] shape [3, 3] on rank 0", "offset [5, 0] shape [5, 3] on rank 2",
                 id="with-a-replica"),
]


@pytest.mark.parametrize("regions,first,second", OVERLAPS)
def test_regions_that_overlap_across_ranks_are_refused_on_every_rank_before_anything_is_written(
    tmp_path, regions, first, second
) -> None:
    size = len(regions)
    before = _previous(tmp_path, size)

    def layout(r):
        return [_region("emb", FULL, o, s, plus=100 * (r + 1)) for o, s in regions[r]]

    results, ops = _save(size, layout, str(tmp_path / "m"), 2)
    _refused_while_planning(results, ops, InvalidArgumentError, "partitioned variable 'emb'", first, second,
                            "must be disjoint")
    _unchanged(tmp_path, before)


def test_a_name_whole_on_one_rank_and_partitioned_on_another_is_refused(tmp_path) -> None:
    before = _previous(tmp_path, 2)

    def layout(r):
        return [gs.Variable(FULL.copy(), "emb")] if r == 1 else [_region("emb", FULL, (0, 0), (5, 3))]

    results, ops = _save(2, layout, str(tmp_path / "m"), 2)
    _refused_while_planning(results, ops, InvalidArgumentError, "variable 'emb' is a whole variable of shape [10, 3] "
                            "on rank 1 and a partitioned one (a region of a tensor of shape [10, 3]) on rank 0")
    _unchanged(tmp_path, before)


@pytest.mark.parametrize(
    "odd,kind,text",
    [
        # the same slice spec ("0,5:-") of two tensors: once taken for a replica, and one rank's shape lost
        (lambda: gs.Variable(FULL[:5].copy(), "emb", full_shape=(12, 3), offset=(0, 0)), ShapeMismatchError,
         "rank 0 holds a region of a tensor of shape [10, 3], rank 1 a region of a tensor of shape [12, 3]"),
        (lambda: gs.Variable(np.zeros((2, 3), np.float32), "emb", full_shape=(12, 3), offset=(10, 0)),
         ShapeMismatchError, "rank 0 holds a region of a tensor of shape [10, 3], rank 1 a region of a tensor of "
         "shape [12, 3]"),
        (lambda: gs.Variable(FULL[5:].astype(np.float64), "emb", full_shape=(10, 3), offset=(5, 0)),
         DTypeMismatchError, "rank 0 holds a region of a float32 tensor, rank 1 a region of a float64 tensor"),
    ],
    ids=["full-shape-same-spec", "full-shape", "dtype"],
)
def test_ranks_that_disagree_on_a_regions_tensor_are_refused(tmp_path, odd, kind, text) -> None:
    before = _previous(tmp_path, 2)

    def layout(r):
        return [odd()] if r == 1 else [_region("emb", FULL, (0, 0), (5, 3))]

    results, ops = _save(2, layout, str(tmp_path / "m"), 2)
    _refused_while_planning(results, ops, kind, "partitioned variable 'emb'", text)
    _unchanged(tmp_path, before)


def test_the_same_region_on_several_ranks_is_a_replica_written_once(tmp_path, tf) -> None:
    """Rows 0:4 on every rank, rows 4:7 on ranks 1 and 2, rows 7:10 on rank 2 (and plain "w" on all): each
    region stored once; the replicated ones by their holders in turn; every rank restores its regions; TF
    reads the whole tensor."""
    held = {0: [(0, 4)], 1: [(0, 4), (4, 3)], 2: [(0, 4), (4, 3), (7, 3)]}
    second = np.arange(6 * 4, dtype=np.int64).reshape(6, 4)
    held2 = {r: [(2 * r, 2), (0, 2)] if r else [(0, 2)] for r in range(3)}  # rows 0:2 on all three

    def variables(r):
        mine = [_region("emb", FULL, (o, 0), (n, 3)) for o, n in held[r]]
        mine += [_region("other", second, (o, 0), (n, 4)) for o, n in held2[r]]
        return mine + [gs.Variable(np.full(3, 7.0), "w")]

    def rank(c):
        mine = variables(c.rank)
        saver = gs.Saver(mine, coordinator=c, check_replicas=True)
        path = saver.save(str(tmp_path / "m"))
        for v in mine:
            v.value[...] = 0
        saver.restore(path)
        return path, [v.value.copy() for v in mine]

    results = run_ranks(3, rank)
    for r, got in enumerate(results):
        assert not isinstance(got, BaseException), (r, got)
        assert got[0] == str(tmp_path / "m")
        assert all(np.array_equal(a, v.value) for a, v in zip(got[1], variables(r))), r
    with BundleReader(str(tmp_path / "m")) as reader:
        assert sorted(reader.entry("emb").slices) == [[(0, 4), (0, -1)], [(4, 3), (0, -1)], [(7, 3), (0, -1)]]
        assert sorted(reader.entry("other").slices) == [[(0, 2), (0, -1)], [(2, 2), (0, -1)], [(4, 2), (0, -1)]]
    prefix = str(tmp_path / "m")
    reader = tf.train.load_checkpoint(prefix)
    assert np.array_equal(reader.get_tensor("emb"), FULL)
    assert np.array_equal(reader.get_tensor("other"), second)
    # the replicated keys in order, each written by the next of its holders in turn (shard k is rank k's):
    # emb/0,4:- (ranks 0-2) by rank 0, emb/4,3:- (ranks 1, 2) by rank 1, other/0,2:- (0-2) by 1, w (0-2) by 2
    with BundleReader(prefix) as bundle:
        writers = [bundle.entry(encode_slice_key(n, [(o, s), (0, -1)])).shard_id
                   for n, o, s in (("emb", 0, 4), ("emb", 4, 3), ("emb", 7, 3), ("other", 0, 2))]
        assert writers + [bundle.entry("w").shard_id] == [0, 1, 2, 1, 2]


def test_replicas_of_a_region_with_other_bytes_are_refused_with_check_replicas(tmp_path) -> None:
    before = _previous(tmp_path, 3)

    def layout(r):
        return [_region("emb", FULL, (0, 0), (5, 3), plus=1 if r == 2 else 0), _region("emb", FULL, (5, 0), (5, 3))]

    results, ops = _save(3, layout, str(tmp_path / "m"), 2, check_replicas=True)
    _refused_while_planning(results, ops, InvalidArgumentError,
                            "the region offset [0, 0] shape [5, 3] of partitioned variable 'emb' differs between "
                            "rank 0 and rank 2")
    _unchanged(tmp_path, before)


def test_regions_with_a_hole_are_saved_each_rank_restores_its_own_and_tf_reads_them(tmp_path, tf) -> None:
    """Rows 0:3 on rank 0, rows 6:10 on rank 1: rows 3:6 are in no rank's region."""
    held = {0: (0, 3), 1: (6, 4)}

    def rank(c):
        o, n = held[c.rank]
        mine = np.ascontiguousarray(FULL[o : o + n])
        saver = gs.Saver([gs.Variable(mine, "emb", full_shape=FULL.shape, offset=(o, 0))], coordinator=c)
        path = saver.save(str(tmp_path / "m"))
        mine[...] = -1
        saver.restore(path)
        return path, mine.copy()

    results = run_ranks(2, rank)
    for r, got in enumerate(results):
        assert not isinstance(got, BaseException), (r, got)
        o, n = held[r]
        assert got[0] == str(tmp_path / "m") and np.array_equal(got[1], FULL[o : o + n]), r
    prefix = str(tmp_path / "m")
    for o, n in held.values():
        (value,) = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=["emb"], shape_and_slices=[f"10 3 {o},{n}:-"],
                                        dtypes=[tf.float32])
        assert np.array_equal(value.numpy(), FULL[o : o + n])
    assert tf.train.load_checkpoint(prefix).get_variable_to_shape_map() == {"emb": [10, 3]}
    # a region reaching into the hole is not there to read: refused, not made up
    with pytest.raises(CorruptCheckpointError, match="sufficient slices"):
        gs.load_checkpoint(prefix).get_tensor("emb")
    hole = np.zeros((2, 3), np.float32)
    with pytest.raises(CorruptCheckpointError, match="sufficient slices"):
        gs.Saver([gs.Variable(hole, "emb", full_shape=(10, 3), offset=(2, 0))]).restore(prefix)
    assert not hole.any()


def test_a_plain_variable_named_like_a_region_is_not_taken_for_it(tmp_path) -> None:
    """Rank 0 holds regions emb rows 0:3, 3:6, 6:10 and plain variables named like their keys ("emb/0,3:-", ...),
    rank 1 only the plain ones: the plain ones are replicas (each written by one of ranks 0 and 1, in turn), the
    regions rank 0's own; neither is left out for the other."""
    rows = [(0, 3), (3, 3), (6, 4)]
    plain = {f"emb/{o},{n}:-": np.full(4, o + 0.5) for o, n in rows}

    def rank(c):
        mine = [gs.Variable(a.copy(), n) for n, a in plain.items()]
        if c.rank == 0:
            mine += [_region("emb", FULL, (o, 0), (n, 3)) for o, n in rows]
        return gs.Saver(mine, coordinator=c).save(str(tmp_path / "m"))

    assert run_ranks(2, rank) == [str(tmp_path / "m")] * 2
    reader = gs.load_checkpoint(str(tmp_path / "m"))
    assert np.array_equal(reader.get_tensor("emb"), FULL)
    for n, a in plain.items():
        assert np.array_equal(reader.get_tensor(n), a), n
    with BundleReader(str(tmp_path / "m")) as bundle:
        assert sorted(bundle.entry(n).shard_id for n in plain) == [0, 0, 1]


def _sliced(dtype: int, shape: tuple[int, ...], *slices: list[tuple[int, int]]) -> bytes:
    return encode_entry(dtype, shape, 0, slices=[list(s) for s in slices])


def test_the_merge_refuses_overlapping_slices_of_two_shards() -> None:
    """combine_slices, the commit's last guard: one entry of all the shards' disjoint slices (holes kept);
    overlapping slices, or slices of two dtypes, are refused, naming them."""
    a = _sliced(1, (10, 3), [(0, 3), (0, -1)])
    b = _sliced(1, (10, 3), [(6, 4), (0, -1)])
    (key, value), = combine_slices([(b"emb", a), (b"emb", b)])
    assert key == b"emb" and decode_entry(value).slices == [[(0, 3), (0, -1)], [(6, 4), (0, -1)]]
    with pytest.raises(InvalidArgumentError, match=r"the slices of 'emb' overlap: 0,3:- and 2,4:- of shape \[10, 3\]"):
        combine_slices([(b"emb", a), (b"emb", b), (b"emb", _sliced(1, (10, 3), [(2, 4), (0, -1)]))])
    with pytest.raises(InvalidArgumentError, match="disagree on the dtype"):
        combine_slices([(b"emb", a), (b"emb", _sliced(2, (10, 3), [(6, 4), (0, -1)]))])
    with pytest.raises(InvalidArgumentError, match=r"disagree: \[10, 3\] and \[12, 3\]"):
        combine_slices([(b"emb", a), (b"emb", _sliced(1, (12, 3), [(6, 4), (0, -1)]))])


def test_merge_bundles_refuses_bundles_whose_slices_overlap(tmp_path) -> None:
    """The public merge of bundles written apart: overlapping slices of one tensor are refused before the commit
    (no merged checkpoint, the inputs as they were); disjoint ones with a hole merge."""
    from gpusaver.format import BundleWriter, merge_bundles

    def bundle(name: str, rows: tuple[int, int]) -> str:
        prefix = str(tmp_path / name / "part")
        os.makedirs(os.path.dirname(prefix))
        writer = BundleWriter(prefix, durable=False)
        writer.add_slice("emb", FULL.shape, f"{rows[0]},{rows[1] - rows[0]}:-", FULL[rows[0] : rows[1]])
        writer.finish()
        return prefix

    a, b, c = bundle("a", (0, 6)), bundle("b", (4, 8)), bundle("c", (8, 10))
    inputs = sorted(os.listdir(tmp_path / "a") + os.listdir(tmp_path / "b"))
    with pytest.raises(InvalidArgumentError, match=r"cannot merge: the slices of 'emb' overlap: 0,6:- and 4,4:-"):
        merge_bundles([a, b], str(tmp_path / "merged"))
    assert not os.path.exists(tmp_path / "merged.index")
    assert sorted(os.listdir(tmp_path / "a") + os.listdir(tmp_path / "b")) == inputs
    merge_bundles([a, c], str(tmp_path / "merged"))
    with BundleReader(str(tmp_path / "merged")) as reader:
        assert np.array_equal(reader.read_slice("emb", "0,6:-"), FULL[:6])
        assert np.array_equal(reader.read_slice("emb", "8,2:-"), FULL[8:])
