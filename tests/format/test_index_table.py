"""The index built straight from a writer's columns (``BundleWriter.index_table``, C
``build_run_table``) against the general path (``index_items`` then ``encode_table``), and the
keys a Saver checks once for all its saves (``KeyColumn``): random names in random orders, tensor
sizes on both sides of the packing limit, several device groups in one data file, saves repeated.
TensorFlow's reader reads what the fast path writes (tests/format/test_tf_interop.py reads Saver
checkpoints in general; here: many index blocks, names in an order unrelated to the layout)."""

from __future__ import annotations

import os
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import gpusaver
from gpusaver import config, native
from gpusaver.format import entry, table
from gpusaver.format.reader import BundleReader
from gpusaver.format.writer import BundleWriter, KeyColumn

from crc_forge import force_crc

needs_native = pytest.mark.skipif(not native.available(), reason=f"gpusaver._native unavailable: {native.reason}")
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

NAMES = st.text(alphabet=st.sampled_from("ab/_0\u00e9\U0001f600"), min_size=1, max_size=6)


def _index(prefix: str) -> bytes:
    with open(prefix + ".index", "rb") as f:
        return f.read()


@needs_native
@PROPERTY
@given(
    names=st.lists(NAMES, unique=True, max_size=40),
    sizes=st.data(),
    use_checked=st.booleans(),
    refuse=st.booleans(),
)
def test_index_table_matches_the_general_path(tmp_path_factory: Any, names: list[str], sizes: Any,
                                             use_checked: bool, refuse: bool) -> None:
    """A writer's index from its columns is byte for byte the general path's, whatever the names'
    order, packed or written from their own memory (sizes around pack_limit = 64 bytes); a refused
    array (byte-swapped) in the batch splits it into runs, and the general path takes over."""
    d = tmp_path_factory.mktemp("idx")
    arrays = [
        np.arange(sizes.draw(st.sampled_from([0, 1, 15, 16, 17, 40])), dtype=np.float32) for _ in names
    ]
    if refuse and arrays:
        arrays[len(arrays) // 2] = arrays[len(arrays) // 2].astype(">f4")
    keys = [n.encode() for n in names]
    with config.set(pack_limit=64, pack_bytes=128):
        w = BundleWriter(str(d / "ck"), durable=False)
        checked = KeyColumn(keys) if use_checked else None
        w.add_many(checked.keys if checked else keys, arrays, checked=checked)
        w.finish()
    written = _index(str(d / "ck"))
    general = table.encode_table(w.index_items())
    assert written == general
    fast = w.index_table(entry.encode_header(1))
    if refuse and arrays:
        assert fast is None  # several runs plus a tensor added alone
    elif use_checked or keys == sorted(keys):
        assert fast == general  # (no tensors: the header alone)
    else:
        assert fast is None  # names out of order, and no order given: the general path sorts them
    reader = BundleReader(str(d / "ck"))
    try:
        for name, arr in zip(names, arrays):
            np.testing.assert_array_equal(reader.get_tensor(name), arr)
    finally:
        reader.close()


def test_key_column() -> None:
    """Valid only for unique, non-empty bytes; the order sorts the keys (None when sorted)."""
    assert KeyColumn([b"a", b"b", b"c"]).order is None
    k = KeyColumn([b"c", b"a", b"b", b"a\x00"])
    assert k.valid and [k.keys[i] for i in k.order] == [b"a", b"a\x00", b"b", b"c"]
    for bad in ([b"a", b"a"], [b"", b"a"], ["a", b"b"], [bytearray(b"a")]):
        assert not KeyColumn(bad).valid  # type: ignore[arg-type]


@needs_native
def test_checked_keys_only_for_the_names_they_were_made_from(tmp_path: Any) -> None:
    """A KeyColumn made from other names is ignored (the writer checks the names given), and a
    duplicate among the names given still raises, naming it."""
    w = BundleWriter(str(tmp_path / "ck"), durable=False)
    with pytest.raises(gpusaver.InvalidArgumentError, match="duplicate tensor name 'a'"):
        w.add_many([b"a", b"a"], [np.zeros(1), np.ones(1)], checked=KeyColumn([b"a", b"b"]))
    w.abort()
    w = BundleWriter(str(tmp_path / "ck2"), durable=False)
    w.add_many([b"x", b"y"], [np.zeros(1), np.ones(1)], checked=KeyColumn([b"y", b"x"]))
    w.finish()
    assert [k for k, _ in table.TableReader(_index(str(tmp_path / "ck2"))).items()] == [b"", b"x", b"y"]
    names = [b"b", b"a"]  # names equal to the column's but not its list: checked again, not trusted
    w = BundleWriter(str(tmp_path / "ck3"), durable=False)
    k = KeyColumn(names)
    assert k.keys == names and k.keys is not names
    w.add_many(names, [np.zeros(1), np.ones(1)], checked=k)
    names[0] = b"renamed"  # after add_many: the writer kept keys of its own
    w.finish()
    assert [k for k, _ in table.TableReader(_index(str(tmp_path / "ck3"))).items()] == [b"", b"a", b"b"]
    w = BundleWriter(str(tmp_path / "ck4"), durable=False)
    w.add_many(k.keys, [np.zeros(1), np.ones(1)], checked=k)
    w.finish()
    assert [k for k, _ in table.TableReader(_index(str(tmp_path / "ck4"))).items()] == [b"", b"a", b"b"]


@needs_native
def test_groups_in_one_file_saved_again_and_again(tmp_path: Any) -> None:
    """Two device groups into one data file (not sharded): the second group's run must not change
    the first group's cached key set; every save's index is the general path's, and restores."""
    rng = np.random.default_rng(3)
    names = [f"n{i}" for i in rng.permutation(300)]
    variables = [
        gpusaver.Variable(rng.random(int(rng.integers(1, 50)), dtype=np.float32), name, f"/cpu:{i % 2}")
        for i, name in enumerate(names)
    ]
    saver = gpusaver.Saver(variables, sharded=False, durable=False)
    before = [set(g.tensors().key_column.set) for g in saver._groups] if hasattr(saver, "_groups") else None
    for step in range(3):
        prefix = saver.save(str(tmp_path / "model"), global_step=step)
        back = {v.name: np.zeros_like(v.array) for v in variables}
        gpusaver.Saver(back).restore(prefix)
        for v in variables:
            np.testing.assert_array_equal(back[v.name], v.array)
        items = table.TableReader(_index(prefix)).items()
        assert [k for k, _ in items[1:]] == sorted(n.encode() for n in names)
    if before is not None:
        assert [set(g.tensors().key_column.set) for g in saver._groups] == before


@needs_native
def test_tensorflow_reads_an_index_of_many_blocks(tmp_path: Any) -> None:
    """TensorFlow's own reader on a 20,000-tensor save whose names come in an order unrelated to
    their sorted order (an index of several blocks, built from the columns)."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(5)
    names = [f"layer_{i}/w" for i in rng.permutation(20000)]
    arrays = {n: rng.random(int(rng.integers(1, 20)), dtype=np.float32) for n in names}
    prefix = gpusaver.Saver(arrays, durable=False).save(str(tmp_path / "ck"))
    assert len(table.TableReader(_index(prefix))._handles) > 1
    reader = tf.train.load_checkpoint(prefix)
    for n in names[:: 97]:
        np.testing.assert_array_equal(reader.get_tensor(n), arrays[n])
    assert sorted(reader.get_variable_to_shape_map()) == sorted(names)


@needs_native
def test_a_crc_that_masks_to_zero(tmp_path: Any) -> None:
    """protobuf leaves a zero field out, so an entry whose masked crc is 0 is 5 bytes shorter than
    the index prepared with stand-in crcs: that index is built again. Every reader agrees."""
    from gpusaver.format import crc

    zero_crc = crc.unmask(0)
    special = np.frombuffer(force_crc(b"", zero_crc), np.float32).copy()
    rng = np.random.default_rng(9)
    arrays = {f"t{i:05d}": rng.random(3, dtype=np.float32) for i in range(2000)}
    arrays["t01000"] = special
    w = BundleWriter(str(tmp_path / "ck"), durable=False)
    checked = KeyColumn([k.encode() for k in arrays])
    w.add_many(checked.keys, list(arrays.values()), checked=checked)
    w.finish()
    written = _index(str(tmp_path / "ck"))
    assert written == table.encode_table(w.index_items())
    value = dict(table.TableReader(written).items())[b"t01000"]
    assert entry.decode_entry(value).crc32c == 0 and b"\x35" not in value[-5:-4]
    prefix = gpusaver.Saver(arrays, durable=False).save(str(tmp_path / "saver"))
    assert _index(prefix) == table.encode_table(table.TableReader(_index(prefix)).items())
    back = {k: np.zeros_like(v) for k, v in arrays.items()}
    gpusaver.Saver(back).restore(prefix)
    np.testing.assert_array_equal(back["t01000"], special)
    tf = pytest.importorskip("tensorflow")
    np.testing.assert_array_equal(tf.train.load_checkpoint(prefix).get_tensor("t01000"), special)
