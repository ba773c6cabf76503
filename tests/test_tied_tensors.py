"""One array under several names (tied weights) and other views that share memory.

A ``state_dict()`` holds the tied embedding and output head of a GPT-2 as two tensor objects over
the same memory. A Saver saves every name (TensorFlow sees both variables); a restore into them
writes that memory once, after checking that the checkpoint holds one value for all its names
(dtype, shape, crc32c), and refuses a checkpoint that holds two. Views that overlap without being
the same view are saved as they are; a restore into them is refused, naming both, before anything
changes. Tested with transformers' own GPT-2 (a tiny config), torch and NumPy views, and as a
property over random views of one buffer.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gpusaver as gs
from gpusaver.errors import InvalidArgumentError

import tiny_models  # noqa: E402

torch = pytest.importorskip("torch")


_gpt2 = tiny_models.gpt2


def test_gpt2_state_dict_saves_and_restores_with_its_tie(tmp_path, tf) -> None:
    model = _gpt2(0)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    prefix = gs.Saver(sd).save(str(tmp_path / "gpt2"))
    reader = tf.train.load_checkpoint(prefix)
    np.testing.assert_array_equal(reader.get_tensor("lm_head.weight"), sd["transformer.wte.weight"].numpy())
    other = _gpt2(1)
    osd = other.state_dict()
    assert not torch.equal(osd["transformer.wte.weight"], sd["transformer.wte.weight"])
    gs.Saver(osd).restore(prefix)
    for k, v in sd.items():
        assert torch.equal(osd[k], v), k
    assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 2, 3, 4]])
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)


def test_gs_save_and_load_like_a_tied_state_dict(tmp_path) -> None:
    model, other = _gpt2(2), _gpt2(3)
    gs.save(model.state_dict(), str(tmp_path / "g"))
    gs.load(str(tmp_path / "g"), like=other.state_dict())
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_checkpoint_with_two_values_for_a_tie_is_refused_before_anything_changes(tmp_path) -> None:
    w = torch.arange(6.0)
    gs.save({"emb": np.zeros(6, np.float32), "head": np.ones(6, np.float32), "bias": np.full(2, 5.0)},
            str(tmp_path / "two"))
    bias = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(InvalidArgumentError, match="'emb' and 'head' are one array"):
        gs.Saver({"emb": w, "head": w.detach(), "bias": bias}).restore(str(tmp_path / "two"))
    assert torch.equal(w, torch.arange(6.0)) and (bias == 0).all()


def test_a_tie_restores_from_a_checkpoint_holding_one_of_its_names(tmp_path) -> None:
    w = torch.zeros(3)
    gs.save({"head": np.full(3, 2.0, np.float32)}, str(tmp_path / "one"))
    result = gs.Saver({"emb": w, "head": w.detach()}).restore(str(tmp_path / "one"), strict=False)
    assert (w == 2).all() and result.missing_keys == []  # emb is restored, through head


def test_overlapping_views_save_as_they_are_and_a_restore_names_them(tmp_path) -> None:
    base = np.arange(10.0)
    views = {"low": base[:6], "high": base[4:], "odd": base[1::2]}
    prefix = gs.Saver(views).save(str(tmp_path / "v"))
    got = gs.load(prefix)
    for k, v in views.items():
        np.testing.assert_array_equal(got[k], v)
    with pytest.raises(InvalidArgumentError, match="share memory"):
        gs.Saver(views).restore(prefix)
    np.testing.assert_array_equal(base, np.arange(10.0))
    apart = {"even": base[::2], "odd": base[1::2]}  # interleaved, no shared byte: restores
    gs.Saver(apart).restore(gs.Saver(apart).save(str(tmp_path / "apart")))


_VIEW = st.tuples(st.integers(0, 11), st.integers(0, 12), st.sampled_from([1, 2, 3]))


@settings(max_examples=60, deadline=None)
@given(views=st.lists(_VIEW, min_size=1, max_size=5))
def test_random_views_of_one_buffer(tmp_path_factory, views) -> None:
    """Any set of views saves, each name with its own values; a restore succeeds exactly when no two
    views share a byte without being the same view, and brings back the saved values."""
    tmp = tmp_path_factory.mktemp("views")
    base = np.arange(12.0)
    arrays = {f"v{i}": base[a:b:s] for i, (a, b, s) in enumerate(views)}
    prefix = gs.Saver(arrays).save(str(tmp / "c"))
    got = gs.load(prefix)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
    clash = False
    for i in range(len(views)):
        for j in range(i):
            vi, vj = arrays[f"v{i}"], arrays[f"v{j}"]
            if vi.size and vj.size and np.shares_memory(vi, vj):
                identical = (vi.__array_interface__["data"][0], vi.shape, vi.strides) == (
                    vj.__array_interface__["data"][0], vj.shape, vj.strides)
                clash = clash or not identical
    base[:] = -1
    if clash:
        with pytest.raises(InvalidArgumentError, match="share memory"):
            gs.Saver(arrays).restore(prefix)
        assert (base == -1).all()
    else:
        gs.Saver(arrays).restore(prefix)
        for k, v in arrays.items():
            np.testing.assert_array_equal(v, got[k])


def test_a_numpy_array_and_torch_from_numpy_of_it_are_one_array(tmp_path) -> None:
    """Their .base chains differ (NumPy owns the memory; torch's view leads elsewhere): still a tie,
    and a view of it that is not the same view is an overlap."""
    a = np.zeros(4, np.float32)
    saver = gs.Saver({"x": a, "y": torch.from_numpy(a)})
    gs.save({"x": np.ones(4, np.float32), "y": np.full(4, 2.0, np.float32)}, str(tmp_path / "two"))
    with pytest.raises(InvalidArgumentError, match="'x' and 'y' are one array"):
        saver.restore(str(tmp_path / "two"))
    assert (a == 0).all()
    b = np.ones(4, np.float32)
    with pytest.raises(InvalidArgumentError, match="share memory"):
        gs.Saver({"x": b, "y": torch.from_numpy(b)[1:3]}).restore(
            gs.save({"x": np.zeros(4, np.float32), "y": np.full(2, 2.0, np.float32)}, str(tmp_path / "v")))
    assert (b == 1).all()


def test_regions_share_the_restore_checks(tmp_path) -> None:
    """A read-only region, a JAX region, a region sharing memory with a plain variable: refused before
    any variable changes (they were found only while writing, after the plain variables)."""
    full = np.arange(6.0)
    prefix = gs.Saver([gs.Variable(full, "plain"), gs.Variable(np.arange(3.0), "emb", full_shape=[6], offset=[0]),
                       gs.Variable(np.arange(3.0, 6.0), "emb", full_shape=[6], offset=[3])]).save(str(tmp_path / "c"))
    plain = np.zeros(6)
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(InvalidArgumentError, match="read-only"):
        gs.Saver([gs.Variable(plain, "plain"), gs.Variable(ro, "emb", full_shape=[6], offset=[0])]).restore(prefix)
    assert (plain == 0).all()
    with pytest.raises(InvalidArgumentError, match="share memory"):
        gs.Saver([gs.Variable(plain, "plain"), gs.Variable(plain[:3], "emb", full_shape=[6], offset=[0])]).restore(prefix)
    assert (plain == 0).all()
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(InvalidArgumentError, match="cannot be restored in place"):
        gs.Saver([gs.Variable(plain, "plain"), gs.Variable(jnp.zeros(3), "emb", full_shape=[6], offset=[0])]).restore(prefix)
    assert (plain == 0).all()


def test_a_tie_stored_in_slices_and_strict_false_reports_only_what_is_missing(tmp_path) -> None:
    """Both names stored as the same slices restore (they were refused as 'different values'); a name
    restored through its tie is not reported missing."""
    part = lambda a, n, o: gs.Variable(a, n, full_shape=[6], offset=[o])  # noqa: E731
    prefix = gs.Saver([part(np.arange(3.0), "emb", 0), part(np.arange(3.0, 6.0), "emb", 3),
                       part(np.arange(3.0), "head", 0), part(np.arange(3.0, 6.0), "head", 3)]).save(str(tmp_path / "s"))
    w = torch.zeros(6, dtype=torch.float64)
    gs.Saver({"emb": w, "head": w.detach()}).restore(prefix)
    assert w.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    gs.save({"head": np.full(3, 2.0, np.float32)}, str(tmp_path / "one"))
    v = torch.zeros(3)
    result = gs.Saver({"emb": v, "head": v.detach(), "other": torch.zeros(1)}).restore(str(tmp_path / "one"),
                                                                                      strict=False)
    assert (v == 2).all() and result.missing_keys == ["other"]
