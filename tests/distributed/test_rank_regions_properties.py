"""Property tests of partitioned variables over random rank layouts (ranks as threads: threadranks.py).

A layout: 2 to 4 ranks; 1 to 3 partitioned variables, each cut into a random grid of tiles, each tile
held by a random set of ranks (none: a hole; several: a replicated region); plain variables, each held
by a random non-empty set of ranks (replicated where several). Some layouts get one more region on one
rank that overlaps another rank's region without being it.

* A layout with an overlap is refused on every rank (a CoordinatorError from the planning, its cause an
  InvalidArgumentError naming the variable); the checkpoint saved before from the same layout without
  the overlap stays the newest, and nothing else is in the directory.
* Every other layout saves; each rank restores its own regions and variables exactly; TensorFlow reads
  every region (RestoreV2 with its slice spec), every plain variable, and each variable without holes
  whole, with the same values.

Also :func:`gpusaver.format.merge.find_overlap` against a check of every pair.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

import gpusaver as gs
from gpusaver.errors import CoordinatorError, InvalidArgumentError
from gpusaver.format.merge import find_overlap
from threadranks import run_ranks

DTYPES = [np.float32, np.int32, np.float64]


def _intersect(a, b) -> bool:
    return all(lo < hi2 and lo2 < hi for (lo, hi), (lo2, hi2) in zip(a, b))


@st.composite
def layouts(draw, overlapping: bool):
    size = draw(st.sampled_from([2, 3, 4]))
    ranks = st.integers(0, size - 1)
    parts = []  # (name, full values, {box: holders})
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
        cuts = [sorted({0, d, *draw(st.lists(st.integers(1, d - 1), max_size=3))}) if d > 1 else [0, d] for d in shape]
        tiles = list(itertools.product(*[list(zip(c[:-1], c[1:])) for c in cuts]))
        held = {}
        for tile in tiles:
            # mostly one holder; sometimes several (a replica), sometimes none (a hole)
            holders = draw(st.one_of(st.sets(ranks, min_size=1, max_size=1), st.sets(ranks, max_size=size)))
            if holders:
                held[tile] = sorted(holders)
        dtype = draw(st.sampled_from(DTYPES))
        full = (np.arange(int(np.prod(shape))).reshape(shape) * (i + 2) - 7).astype(dtype)
        parts.append((f"part{i}", full, held))
    plain = [
        (f"plain{j}", np.arange(j + 2, dtype=np.float64) * (j + 1), sorted(draw(st.sets(ranks, min_size=1))))
        for j in range(draw(st.integers(0, 3)))
    ]
    overlap = None
    if overlapping:
        which = draw(st.integers(0, len(parts) - 1))
        name, full, held = parts[which]
        # inside a tile of several elements that not every rank holds (it meets that tile only), or anywhere
        tiles = [t for t in sorted(held) if len(held[t]) < size and any(hi - lo > 1 for lo, hi in t)]
        tile = draw(st.sampled_from(tiles)) if tiles and draw(st.booleans()) else None
        box = []
        for lo_most, hi_most in tile or [(0, d) for d in full.shape]:
            lo = draw(st.integers(lo_most, hi_most - 1))
            box.append((lo, draw(st.integers(lo + 1, hi_most))))
        if tile is not None and tuple(box) == tile:
            d = next(k for k, (lo, hi) in enumerate(tile) if hi - lo > 1)
            box[d] = (tile[d][0], tile[d][1] - 1)  # a part of the tile, not all of it (that is a replica)
        box = tuple(box)
        met = [t for t in held if _intersect(t, box)]
        # a rank holding nothing the box meets (else one process would refuse it), meeting another rank's region
        free = [r for r in range(size) if not any(r in held[t] for t in met)]
        assume(met and free and box not in held)
        overlap = (which, box, draw(st.sampled_from(free)))
    return size, parts, plain, overlap, draw(st.booleans())


def _variables(rank: int, parts, plain, extra=None) -> list[gs.Variable]:
    out = []
    for i, (name, full, held) in enumerate(parts):
        boxes = [t for t, holders in held.items() if rank in holders]
        if extra is not None and extra[0] == i and extra[2] == rank:
            boxes.append(extra[1])
        for box in boxes:
            region = full[tuple(slice(lo, hi) for lo, hi in box)].copy()  # each rank's own memory
            out.append(gs.Variable(region, name, full_shape=full.shape, offset=[lo for lo, _ in box]))
    out += [gs.Variable(a.copy(), n) for n, a, holders in plain if rank in holders]
    return out


def _save_and_restore(size, parts, plain, extra, prefix, step, check_replicas):
    """Every rank saves its variables, then (if that worked) zeroes and restores them: each rank's result or
    error, and whether its restore gave back what it saved."""

    def rank(c):
        mine = _variables(c.rank, parts, plain, extra)
        saver = gs.Saver(mine, coordinator=c, check_replicas=check_replicas, allow_empty=True)
        path = saver.save(prefix, global_step=step)
        want = [v.value.copy() for v in mine]
        for v in mine:
            v.value[...] = 0
        saver.restore(path)
        return path, all(np.array_equal(v.value, w) for v, w in zip(mine, want))

    return run_ranks(size, rank)


def _check_tf_reads(tf, prefix, parts, plain) -> None:
    names, specs, kinds, want = [], [], [], []
    for name, full, held in parts:
        for box in held:
            names.append(name)
            specs.append(" ".join(map(str, full.shape)) + " " + ":".join(f"{lo},{hi - lo}" for lo, hi in box))
            kinds.append(tf.as_dtype(full.dtype))
            want.append(full[tuple(slice(lo, hi) for lo, hi in box)])
    got = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=names, shape_and_slices=specs, dtypes=kinds) if names else []
    for n, s, g, w in zip(names, specs, got, want):
        assert g.numpy().dtype == w.dtype and np.array_equal(g.numpy(), w), (n, s)
    reader = tf.train.load_checkpoint(prefix)
    assert reader.get_variable_to_shape_map() == {
        **{n: list(full.shape) for n, full, held in parts if held},
        **{n: list(a.shape) for n, a, _ in plain},
    }
    for name, full, held in parts:
        if sum(int(np.prod([hi - lo for lo, hi in t])) for t in held) == full.size:  # no hole: read whole
            assert np.array_equal(reader.get_tensor(name), full), name
    for name, value, _ in plain:
        assert np.array_equal(reader.get_tensor(name), value), name


def _events(size, parts) -> None:
    event(f"{size} ranks")
    if any(sum(int(np.prod([hi - lo for lo, hi in t])) for t in held) < full.size for _, full, held in parts):
        event("a hole")
    if any(len(holders) > 1 for _, _, held in parts for holders in held.values()):
        event("a replicated region")


def _saved(tf, directory, size, parts, plain, check_replicas) -> str:
    """The layout saved as ``m-1`` by every rank, each restoring its own exactly, TensorFlow reading the values."""
    prefix = str(directory / "m")
    results = _save_and_restore(size, parts, plain, None, prefix, 1, check_replicas)
    for r, got in enumerate(results):
        assert got == (prefix + "-1", True), (r, got)
    _check_tf_reads(tf, prefix + "-1", parts, plain)
    return prefix


@settings(max_examples=40, deadline=None)
@given(layout=layouts(overlapping=False))
def test_random_legal_rank_layouts_save_restore_exactly_and_tf_reads_them(tmp_path_factory, tf, layout) -> None:
    size, parts, plain, _, check_replicas = layout
    _events(size, parts)
    assume(any(held for _, _, held in parts) or plain)  # else nothing to save: no checkpoint at all
    _saved(tf, tmp_path_factory.mktemp("layout"), size, parts, plain, check_replicas)


@settings(max_examples=30, deadline=None)
@given(layout=layouts(overlapping=True))
def test_random_rank_layouts_with_an_overlap_are_refused_everywhere_and_commit_nothing(
    tmp_path_factory, tf, layout
) -> None:
    """The layout without its overlap saves first (``m-1``); with it, the save of ``m-2`` is refused."""
    size, parts, plain, overlap, check_replicas = layout
    _events(size, parts)
    directory = tmp_path_factory.mktemp("layout")
    prefix = _saved(tf, directory, size, parts, plain, check_replicas)
    before = sorted(os.listdir(directory))
    results = _save_and_restore(size, parts, plain, overlap, prefix, 2, check_replicas)
    name = parts[overlap[0]][0]
    for r, got in enumerate(results):
        assert isinstance(got, CoordinatorError), (r, got)
        assert got.error_type == "gpusaver.errors.InvalidArgumentError", (r, got)
        assert isinstance(got.__cause__, InvalidArgumentError), (r, got.__cause__)
        assert str(got).startswith("planning the save failed"), (r, str(got))
        assert f"partitioned variable {name!r}: the region" in str(got) and "overlaps the region" in str(got), str(got)
    assert sorted(os.listdir(directory)) == before
    assert gs.latest_checkpoint(str(directory)) == prefix + "-1"


@st.composite
def boxes(draw):
    ndim = draw(st.integers(0, 3))
    out = []
    for _ in range(draw(st.integers(0, 12))):
        box = []
        for _ in range(ndim):
            lo = draw(st.integers(0, 6))
            box.append((lo, lo + draw(st.integers(0, 3))))  # length 0: an empty box
        out.append(box)
    return out


@settings(max_examples=300, deadline=None)
@given(boxes())
def test_find_overlap_finds_a_pair_exactly_when_one_exists(boxes) -> None:
    def meet(a, b):
        return all(lo < hi for lo, hi in a) and all(lo < hi for lo, hi in b) and _intersect(a, b)

    pairs = [(i, j) for i, j in itertools.combinations(range(len(boxes)), 2) if meet(boxes[i], boxes[j])]
    got = find_overlap(boxes)
    if not pairs:
        assert got is None
    else:
        assert got in pairs
        assert find_overlap([list(b) for b in boxes]) == got  # the same answer for the same boxes
