"""Partitioned variables: ``Variable(region, name, full_shape=..., offset=...)``.

* a tensor saved as regions (any grid, on one device or several, sharded or not, synchronously or
  with save_async) restores onto any other partitioning, onto the whole tensor, and from a whole
  tensor onto regions; TensorFlow's reader sees the full tensor (random grids, hypothesis);
* bad regions (outside the tensor, overlapping, disagreeing about the tensor, one of the two
  arguments) are typed errors before anything is written; a restore that does not fit changes
  nothing;
* regions of GPU arrays (fake CuPy) save and restore the same bytes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gpusaver as gs
from gpusaver.errors import InvalidArgumentError, ShapeMismatchError, TensorNotFoundError, DTypeMismatchError
from gpu_fake import fake  # noqa: F401 - the fixture


def _cuts(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """k pieces of n (some possibly empty), as edges."""
    inner = sorted(rng.integers(0, n + 1, k - 1).tolist())
    return [0, *inner, n]


def _regions(full: np.ndarray, rows: list[int], cols: list[int], copy: bool = True) -> list[tuple[np.ndarray, list[int]]]:
    out = []
    for r0, r1 in zip(rows, rows[1:]):
        for c0, c1 in zip(cols, cols[1:]):
            block = full[r0:r1, c0:c1]
            out.append((block.copy() if copy else np.zeros_like(block), [r0, c0]))
    return out


@settings(max_examples=25)
@given(
    shape=st.tuples(st.integers(1, 23), st.integers(1, 9)),
    save_grid=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    load_grid=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
    sharded=st.booleans(),
    use_async=st.booleans(),
)
def test_any_partitioning_restores_onto_any_other(tmp_path_factory, tf, shape, save_grid, load_grid, seed, sharded, use_async) -> None:
    rng = np.random.default_rng(seed)
    full = rng.standard_normal(shape).astype(np.float32)
    d = tmp_path_factory.mktemp("parts")
    saved = _regions(full, _cuts(shape[0], save_grid[0], rng), _cuts(shape[1], save_grid[1], rng))
    variables = [
        gs.Variable(block, "emb", f"/cpu:{i % 3}", full_shape=shape, offset=off) for i, (block, off) in enumerate(saved)
    ] + [gs.Variable(np.arange(3.0), "bias")]
    saver = gs.Saver(variables, sharded=sharded)
    if use_async:
        prefix = saver.save_async(str(d / "m")).result()
    else:
        prefix = saver.save(str(d / "m"))
    assert np.array_equal(tf.train.load_checkpoint(prefix).get_tensor("emb"), full)
    assert np.array_equal(gs.load_checkpoint(prefix).get_tensor("emb"), full)
    # onto another partitioning
    wanted = _regions(full, _cuts(shape[0], load_grid[0], rng), _cuts(shape[1], load_grid[1], rng), copy=False)
    restorer = gs.Saver([gs.Variable(b, "emb", full_shape=shape, offset=off) for b, off in wanted], allow_empty=True)
    result = restorer.restore(prefix, strict=False)
    assert result.unexpected_keys == ["bias"]
    for block, (r0, c0) in wanted:
        assert np.array_equal(block, full[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]])
    # onto the whole tensor
    whole = np.zeros_like(full)
    gs.Saver({"emb": whole}).restore(prefix, strict=False)
    assert np.array_equal(whole, full)


def test_regions_restore_from_a_whole_tensor_and_save_as_slices_tf_reads(tmp_path, tf) -> None:
    full = np.arange(60, dtype=np.int64).reshape(10, 6)
    gs.Saver({"w": full}).save(str(tmp_path / "whole"))
    top, bottom = np.zeros((4, 6), np.int64), np.zeros((6, 6), np.int64)
    s = gs.Saver([gs.Variable(top, "w", full_shape=[10, 6], offset=[0, 0]),
                  gs.Variable(bottom, "w", full_shape=[10, 6], offset=[4, 0])])
    assert s.restore(str(tmp_path / "whole")) == ([], [])
    assert np.array_equal(np.concatenate([top, bottom]), full)
    s.save(str(tmp_path / "sliced"))
    reader = tf.train.load_checkpoint(str(tmp_path / "sliced"))
    assert reader.get_variable_to_shape_map() == {"w": [10, 6]}
    assert np.array_equal(reader.get_tensor("w"), full)


def test_bad_regions_are_typed_errors_before_anything_is_written(tmp_path) -> None:
    a = np.ones((4, 3), np.float32)
    with pytest.raises(InvalidArgumentError, match="outside the full shape"):
        gs.Variable(a, "e", full_shape=[5, 3], offset=[2, 0])
    with pytest.raises(InvalidArgumentError, match="both full_shape and offset"):
        gs.Variable(a, "e", full_shape=[5, 3])
    with pytest.raises(InvalidArgumentError, match="one entry per dimension"):
        gs.Variable(a, "e", full_shape=[5, 3, 1], offset=[0, 0, 0])
    with pytest.raises(InvalidArgumentError, match="overlap"):
        gs.Saver([gs.Variable(a, "e", full_shape=[8, 3], offset=[0, 0]),
                  gs.Variable(a.copy(), "e", full_shape=[8, 3], offset=[3, 0])])
    with pytest.raises(InvalidArgumentError, match="disagree"):
        gs.Saver([gs.Variable(a, "e", full_shape=[8, 3], offset=[0, 0]),
                  gs.Variable(a.copy(), "e", full_shape=[9, 3], offset=[4, 0])])
    with pytest.raises(InvalidArgumentError, match="same name"):
        gs.Saver([gs.Variable(a, "e", full_shape=[8, 3], offset=[0, 0]), gs.Variable(a.copy(), "e")])
    assert os.listdir(tmp_path) == []


def test_a_restore_that_does_not_fit_changes_nothing(tmp_path) -> None:
    full = np.arange(24, dtype=np.float32).reshape(6, 4)
    gs.Saver({"e": full, "other": np.ones(2)}).save(str(tmp_path / "m"))
    region = np.full((3, 4), -1, np.float32)
    plain = np.full(2, -1.0)
    with pytest.raises(ShapeMismatchError, match="region of a tensor of shape"):
        gs.Saver([gs.Variable(region, "e", full_shape=[7, 4], offset=[0, 0]),
                  gs.Variable(plain, "other")]).restore(str(tmp_path / "m"))
    with pytest.raises(DTypeMismatchError):
        gs.Saver([gs.Variable(region.astype(np.float64), "e", full_shape=[6, 4], offset=[0, 0]),
                  gs.Variable(plain, "other")]).restore(str(tmp_path / "m"))
    with pytest.raises(TensorNotFoundError):
        gs.Saver([gs.Variable(region, "missing", full_shape=[6, 4], offset=[0, 0]),
                  gs.Variable(plain, "other")]).restore(str(tmp_path / "m"))
    assert (region == -1).all() and (plain == -1).all()
    result = gs.Saver([gs.Variable(region, "missing", full_shape=[6, 4], offset=[0, 0]),
                       gs.Variable(plain, "other")]).restore(str(tmp_path / "m"), strict=False)
    assert result.missing_keys == ["missing"] and (plain == 1).all() and (region == -1).all()


def test_a_damaged_slice_is_a_checksum_error(tmp_path) -> None:
    full = np.arange(400, dtype=np.float32).reshape(20, 20)
    gs.Saver([gs.Variable(full[:10].copy(), "e", full_shape=[20, 20], offset=[0, 0]),
              gs.Variable(full[10:].copy(), "e", full_shape=[20, 20], offset=[10, 0])]).save(str(tmp_path / "m"))
    data = str(tmp_path / "m.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.seek(600)
        byte = f.read(1)
        f.seek(600)
        f.write(bytes([byte[0] ^ 1]))
    region = np.zeros((5, 20), np.float32)
    with pytest.raises(gs.ChecksumError):
        gs.Saver([gs.Variable(region, "e", full_shape=[20, 20], offset=[0, 0])]).restore(str(tmp_path / "m"))
    # the other stored slice is not read, so a region inside it restores
    gs.Saver([gs.Variable(region, "e", full_shape=[20, 20], offset=[12, 0])]).restore(str(tmp_path / "m"))
    assert np.array_equal(region, full[12:17])


def test_regions_of_gpu_arrays_fake_cupy(tmp_path, fake) -> None:
    from gpu_fake import put
    full = np.arange(12 * 5, dtype=np.float64).reshape(12, 5)
    top, bottom = put(fake, full[:7].copy(), 0), put(fake, full[7:].copy(), 1)
    saver = gs.Saver([gs.Variable(top, "e", full_shape=[12, 5], offset=[0, 0]),
                      gs.Variable(bottom, "e", full_shape=[12, 5], offset=[7, 0])], sharded=True)
    saver.save(str(tmp_path / "sync"))
    saver.save_async(str(tmp_path / "async")).result()
    for prefix in ("sync", "async"):
        assert np.array_equal(gs.load_checkpoint(str(tmp_path / prefix)).get_tensor("e"), full)
    left = put(fake, np.zeros((12, 2)), 0)
    gs.Saver([gs.Variable(left, "e", full_shape=[12, 5], offset=[0, 3])]).restore(str(tmp_path / "async"))
    fake.module.cuda.Device(0).synchronize()
    assert np.array_equal(left.get(), full[:, 3:])
    saver.close()
