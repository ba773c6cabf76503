"""A Saver always saves and restores the caller's tensors as they are now.

A torch tensor given to a Saver can get other memory while the Saver holds it: ``param.data =
new``, ``model.double().float()``, ``t.set_(...)``, a transpose assigned back to ``.data``, a view
of another dtype. Every save writes the tensor's current bytes (never the memory it had when the
Saver was made), every restore writes where the tensor reads now; a deleted JAX array is a typed
error, never JAX's own RuntimeError. Checked with real torch modules and optimizers, and as a
property over random sequences of saves, asynchronous saves, restores and replacements.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gpusaver as gs
from gpusaver.errors import InvalidArgumentError

torch = pytest.importorskip("torch")


def _saved(prefix: str) -> dict[str, np.ndarray]:
    return gs.load(prefix)


def _live(state: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in state.items()}


def test_param_data_replaced_is_saved_as_it_is_now(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    saver = gs.Saver(dict(model.named_parameters()))
    saver.save(str(tmp_path / "a"))  # the views are made and used once
    model.weight.data = torch.full((3, 4), 3.0)
    model.bias.data = torch.zeros(3)
    got = _saved(saver.save(str(tmp_path / "b")))
    assert (got["weight"] == 3.0).all() and (got["bias"] == 0.0).all()


def test_model_double_float_round_trip_is_saved_as_it_is_now(tmp_path) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Linear(5, 2))
    saver = gs.Saver(dict(model.named_parameters()))
    saver.save(str(tmp_path / "a"))
    model.double().float()  # every parameter gets new memory
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    want = _live(dict(model.named_parameters()))
    got = _saved(saver.save(str(tmp_path / "b")))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_restore_writes_into_the_tensors_current_memory(tmp_path) -> None:
    model = torch.nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.fill_(7.0)
        model.bias.fill_(-1.0)
    saver = gs.Saver(dict(model.named_parameters()))
    prefix = saver.save(str(tmp_path / "a"))
    model.weight.data = torch.zeros(3, 3)
    model.bias.data = torch.zeros(3)
    saver.restore(prefix)
    assert (model.weight.detach() == 7.0).all() and (model.bias.detach() == -1.0).all()


def test_same_pointer_other_layout_shape_or_dtype(tmp_path) -> None:
    """``.data`` replaced by a view of the same memory: same data pointer, other strides, shape or dtype."""
    w = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    b = torch.arange(8, dtype=torch.float32)
    c = torch.arange(4, dtype=torch.float32)
    saver = gs.Saver({"w": w, "b": b, "c": c})
    saver.save(str(tmp_path / "a"))
    w.data = w.data.t()  # strides (1, 4)
    b.data = b.data[:5]  # shape (5,)
    c.data = c.data.view(torch.int32)  # same bytes, int32
    got = _saved(saver.save(str(tmp_path / "b")))
    np.testing.assert_array_equal(got["w"], w.numpy())
    np.testing.assert_array_equal(got["b"], b.numpy())
    assert got["c"].dtype == np.int32
    np.testing.assert_array_equal(got["c"], c.numpy())


def test_set_is_seen_and_resize_cannot_move_the_memory(tmp_path) -> None:
    t = torch.zeros(6)
    u = torch.ones(4)
    saver = gs.Saver({"t": t, "u": u})
    saver.save(str(tmp_path / "a"))
    t.set_(torch.full((2, 3), 5.0))
    got = _saved(saver.save(str(tmp_path / "b")))
    assert got["t"].shape == (2, 3) and (got["t"] == 5.0).all()
    with pytest.raises(RuntimeError, match="not resizable"):
        u.resize_(100)  # torch refuses to move memory a NumPy view shares, but keeps the new size
    assert u.shape == (100,) and u.untyped_storage().nbytes() == 16
    with pytest.raises(InvalidArgumentError, match="'u' .* reach past its storage of 16 bytes"):
        saver.save(str(tmp_path / "c"))  # never 400 bytes read from a 16-byte allocation
    assert not (tmp_path / "c.index").exists()


def test_optimizer_load_state_dict_swaps_the_moments(tmp_path) -> None:
    """Adam's ``load_state_dict`` gives its state new tensors: a Saver over the old ones' ``.data``
    holders (the state entries of the parameters) sees the current ones."""
    torch.manual_seed(2)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    moments = {f"{i}/{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items() if k != "step"}
    saver = gs.Saver(moments)
    for t in moments.values():
        t.data = t.data + 1.0  # what an in-place rebuild of the moments does to a held tensor
    got = _saved(saver.save(str(tmp_path / "m")))
    for k, t in moments.items():
        np.testing.assert_array_equal(got[k], t.numpy())


def test_save_async_after_replacement(tmp_path) -> None:
    p = torch.nn.Parameter(torch.zeros(1000))
    saver = gs.Saver({"p": p})
    saver.save_async(str(tmp_path / "a")).result()
    p.data = torch.full((1000,), 4.0)
    prefix = saver.save_async(str(tmp_path / "b")).result()
    assert (_saved(prefix)["p"] == 4.0).all()
    saver.close()


def test_replaced_by_a_tie_is_saved_live_and_restored_once(tmp_path) -> None:
    """``b.data = a.data``: b is now a's memory under another name (a tie). The save writes the
    live bytes under both names; a restore writes that memory once, and refuses a checkpoint that
    holds two different values for it rather than keep whichever came last."""
    a, b = torch.ones(4), torch.zeros(4)
    saver = gs.Saver({"a": a, "b": b})
    untied = saver.save(str(tmp_path / "x"))
    b.data = a.data
    tied = saver.save(str(tmp_path / "y"))
    got = _saved(tied)
    assert (got["a"] == 1).all() and (got["b"] == 1).all()
    with pytest.raises(InvalidArgumentError, match="'a' and 'b' are one array .* different values"):
        saver.restore(untied)
    assert (a == 1).all()
    with torch.no_grad():
        a.zero_()
    saver.restore(tied)
    assert (a == 1).all() and (b == 1).all()


def test_deleted_jax_array_is_a_typed_error(tmp_path) -> None:
    jnp = pytest.importorskip("jax.numpy")
    a = jnp.arange(4.0)
    b = jnp.ones(3)
    saver = gs.Saver({"a": a, "b": b})
    saver.save(str(tmp_path / "x"))
    b.delete()
    with pytest.raises(InvalidArgumentError, match="'b' is a deleted JAX array"):
        saver.save(str(tmp_path / "y"))
    assert not (tmp_path / "y.index").exists()
    with pytest.raises(InvalidArgumentError, match="'b' is a deleted JAX array"):
        gs.save({"a": a, "b": b}, str(tmp_path / "z"))
    assert not list(tmp_path.glob("z*"))


# ------------------------------------------------------------------ property

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("replace"), st.integers(0, 2), st.sampled_from(["new", "double_float", "transpose"])),
        st.tuples(st.just("inplace"), st.integers(0, 2)),
        st.tuples(st.just("save"), st.booleans()),  # async or not
        st.tuples(st.just("restore"), st.integers(0, 9)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, seed=st.integers(0, 2**16))
def test_random_sequences_save_what_is_live_and_restore_into_it(tmp_path_factory, ops, seed) -> None:
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("seq")
    tensors = {f"t{i}": torch.nn.Parameter(torch.from_numpy(rng.standard_normal((3, 3)).astype(np.float32)))
               for i in range(3)}
    saver = gs.Saver(tensors, max_to_keep=None)
    saved: list[tuple[str, dict[str, np.ndarray]]] = []  # (prefix, what was live when it was saved)
    handles = []
    for op in ops:
        name = f"t{op[1]}" if op[0] in ("replace", "inplace") else None
        if op[0] == "replace":
            t = tensors[name]
            if op[2] == "new":
                t.data = torch.from_numpy(rng.standard_normal((3, 3)).astype(np.float32))
            elif op[2] == "double_float":
                t.data = (t.data.double() + 1).float()
            else:
                t.data = t.data.t()
        elif op[0] == "inplace":
            with torch.no_grad():
                tensors[name].add_(1.0)
        elif op[0] == "save":
            live = _live(tensors)
            path = str(tmp / f"c{len(saved)}")
            if op[1]:
                handles.append(saver.save_async(path))
            else:
                saver.save(path)
            saved.append((path, live))
        elif saved:
            path, values = saved[op[1] % len(saved)]
            saver.restore(path)
            for k, t in tensors.items():
                np.testing.assert_array_equal(t.detach().numpy(), values[k])
    saver.close()
    for h in handles:
        h.result()
    for path, values in saved:
        got = _saved(path)
        for k in values:
            np.testing.assert_array_equal(got[k], values[k])


def test_a_lazy_conjugate_put_in_place_is_seen(tmp_path) -> None:
    """``t.data = t.data.conj()`` keeps the memory, shape, strides and dtype: only the conj bit moves. A
    Saver made before it saved the unconjugated values; now it refuses, as a new Saver does."""
    t = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    saver = gs.Saver({"t": t})
    saver.save(str(tmp_path / "a"))
    t.data = t.data.conj()
    with pytest.raises(gs.UnsupportedDTypeError, match="conjugate"):
        saver.save(str(tmp_path / "b"))
    assert not list(tmp_path.glob("b*"))
    with pytest.raises(gs.UnsupportedDTypeError, match="conjugate"):
        saver.restore(str(tmp_path / "a"))
