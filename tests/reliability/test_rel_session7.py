"""Session 7 review, as an attacker: the index built straight from a run's columns
(``_native.build_run_table`` / ``patch_run_table``), ``BundleWriter.prepare_index`` /
``index_table``, the keys a Saver checks once (``KeyColumn``), and the Saver paths that use them.

TensorFlow is the oracle: for the same tensors added in the same order, ``tf.raw_ops.SaveV2``
writes a data file and an ``.index`` that gpusaver must reproduce byte for byte (names in any
order, prefixes of each other, bytes 0x00 / 0xFF, keys longer than a block, counts around block
boundaries, every rank up to 10, zero-size and 0-d tensors, ml_dtypes types, byte-swapped and
non-contiguous arrays that split a run, tensors whose masked crc32c is 0). The C functions are
also called with hostile arguments, in child processes, where a crash must be an exception.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import gpusaver
from gpusaver import config, native
from gpusaver.format import crc, entry, table

from crc_forge import force_crc
from gpusaver.format.writer import BundleWriter, KeyColumn

pytestmark = pytest.mark.skipif(not native.available(), reason=f"gpusaver._native unavailable: {native.reason}")


def _property(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


HEADER = entry.encode_header(1)
DATA = ".data-00000-of-00001"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tf() -> Any:
    tensorflow = pytest.importorskip("tensorflow")
    return tensorflow


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _native_order(arr: np.ndarray) -> np.ndarray:
    """The values as a C-contiguous native-order array (what TensorFlow is handed)."""
    return arr.astype(arr.dtype.newbyteorder("="), order="C")  # (np.ascontiguousarray makes 0-d 1-d)


def _tf_save(tf: Any, prefix: str, names: list[Any], arrays: list[np.ndarray]) -> None:
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(_native_order(a)) for a in arrays],
    )


def _assert_same_files(ours: str, theirs: str) -> None:
    """Index and data file byte for byte; on a difference, the first differing parsed entry."""
    a, b = _read(ours + ".index"), _read(theirs + ".index")
    if a != b:
        ia, ib = table.TableReader(a).items(), table.TableReader(b).items()
        for (ka, va), (kb, vb) in zip(ia, ib):
            assert (ka, entry.decode_entry(va) if ka else va) == (kb, entry.decode_entry(vb) if kb else vb)
        assert len(ia) == len(ib)
        assert a == b  # same entries, other table bytes
    assert _read(ours + DATA) == _read(theirs + DATA)


ZERO_MASK = crc.unmask(0)  # the crc32c whose masked form is 0: protobuf then leaves the field out


def _masks_to_zero(nbytes: int, dtype: Any = np.uint8, seed: int = 0) -> np.ndarray:
    """An array of ``nbytes`` bytes (>= 4) whose crc32c masks to 0."""
    body = np.random.default_rng(seed).integers(0, 256, nbytes - 4, dtype=np.uint8).tobytes()
    raw = body + force_crc(body, ZERO_MASK)
    out = np.frombuffer(raw, dtype=dtype).copy()
    assert crc.mask(crc.value(out.tobytes())) == 0
    return out


def _child(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter (a crash there is a return code, not a lost suite)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )


def _assert_no_crash(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert "CHILD-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


DTYPES = [
    np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
    np.int64, np.uint64, np.bool_, np.complex64, np.complex128,
    ml_dtypes.bfloat16, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn, ml_dtypes.int4, ml_dtypes.uint4,
]
NAMES = st.text(alphabet=st.sampled_from("ab/_.\u00e9\x00\x7f \U0001f600\uffff"), min_size=1, max_size=7)


def _draw_array(data: Any, rng: np.random.Generator) -> np.ndarray:
    dt = np.dtype(data.draw(st.sampled_from(DTYPES), label="dtype"))
    rank = data.draw(st.integers(0, 10), label="rank")
    shape = [data.draw(st.integers(0, 3)) for _ in range(rank)]
    if int(np.prod(shape)) > 300:
        shape = [1] * rank
    if rank and data.draw(st.booleans(), label="long first axis"):
        shape[0] = data.draw(st.sampled_from([17, 40, 300]))
        shape[1:] = [1] * (rank - 1)
    arr = rng.integers(0, 7, int(np.prod(shape))).astype(dt).reshape(shape)
    kind = data.draw(st.sampled_from(["plain", "plain", "plain", "swapped", "strided", "fortran"]), label="kind")
    if kind == "swapped" and dt.kind in "iufc" and dt.itemsize > 1:
        arr = arr.astype(dt.newbyteorder(">"))
    elif kind == "strided" and rank:
        arr = np.repeat(arr, 2, axis=-1)[..., ::2]
    elif kind == "fortran":
        arr = np.asfortranarray(arr)
    return arr


@_property(150)
@given(names=st.lists(NAMES, min_size=1, max_size=25, unique=True), data=st.data(),
       sharded=st.booleans(), small_pack=st.booleans())
def test_saver_writes_what_tensorflow_writes(tmp_path_factory: Any, tf: Any, names: list[str], data: Any,
                                             sharded: bool, small_pack: bool) -> None:
    """A Saver's files equal SaveV2's for the same tensors in the same order, byte for byte,
    on the first save and on a second save of the same Saver (its cached KeyColumn)."""
    d = tmp_path_factory.mktemp("tfeq")
    rng = np.random.default_rng(len(names))
    arrays = {n: _draw_array(data, rng) for n in names}
    _tf_save(tf, str(d / "tf"), list(arrays), list(arrays.values()))
    with config.set(pack_limit=64 if small_pack else 64 << 10, pack_bytes=256 if small_pack else 4 << 20):
        saver = gpusaver.Saver(arrays, sharded=sharded, durable=False)
        for step in range(2):
            prefix = saver.save(str(d / f"ours{step}"))
            _assert_same_files(prefix, str(d / "tf"))
    reader = tf.train.load_checkpoint(prefix)
    back = {n: np.zeros_like(_native_order(a)) for n, a in arrays.items()}
    gpusaver.Saver(back, durable=False).restore(prefix)
    for n, a in arrays.items():
        want = _native_order(a)
        got = reader.get_tensor(n)
        assert got.shape == want.shape and got.tobytes() == want.tobytes()
        assert back[n].tobytes() == want.tobytes()


BYTE_NAMES = st.binary(min_size=1, max_size=5).map(
    lambda b: bytes(bytearray(b"\x00\x01a\x7f\x80\xfe\xff"[x % 7] for x in b))
)


@_property(150)
@given(names=st.lists(BYTE_NAMES, min_size=1, max_size=40, unique=True), data=st.data(),
       checked=st.booleans())
def test_writer_bytes_names_in_any_order_equal_tensorflow(tmp_path_factory: Any, tf: Any, names: list[bytes],
                                                          data: Any, checked: bool) -> None:
    """Keys that are prefixes of each other, differ only in the last byte, hold 0x00 and 0xFF
    (separators and successors at their edge cases), in a random order: the BundleWriter's index,
    with or without a KeyColumn, is SaveV2's."""
    d = tmp_path_factory.mktemp("bytes")
    rng = np.random.default_rng(len(names))
    arrays = [rng.random(data.draw(st.integers(0, 3)), dtype=np.float32) for _ in names]
    _tf_save(tf, str(d / "tf"), names, arrays)
    w = BundleWriter(str(d / "ours"), durable=False)
    column = KeyColumn(names) if checked else None
    w.add_many(column.keys if column else names, arrays, checked=column)
    w.finish()
    _assert_same_files(str(d / "ours"), str(d / "tf"))


def _blocks(prefix: str) -> int:
    return len(table.TableReader(_read(prefix + ".index"))._handles)


def test_counts_around_the_first_block_boundary_equal_tensorflow(tmp_path: Any, tf: Any) -> None:
    """Saver saves of N tensors with 200-byte names, N on both sides of the count that first
    needs a second data block and of the restart interval (16) next to it: SaveV2's files."""
    long = "x" * 190

    def names(n: int) -> list[str]:
        return [f"{long}{i:09d}" for i in range(n)][::-1]  # saved in reverse: the order given is used

    lo, hi = 1, 4000  # the smallest count with two data blocks, by bisection on gpusaver's own index
    while lo < hi:
        mid = (lo + hi) // 2
        w = BundleWriter(str(tmp_path / f"probe{mid}"), durable=False)
        ks = [n.encode() for n in names(mid)]
        w.add_many(ks, [np.zeros(1, np.float32)] * mid)
        w.finish()
        lo, hi = (mid + 1, hi) if _blocks(str(tmp_path / f"probe{mid}")) < 2 else (lo, mid)
    assert lo > 100
    for n in sorted({lo - 17, lo - 16, lo - 1, lo, lo + 1, lo + 15, lo + 16}):
        arrays = {k: np.full(1 + i % 3, i, np.float32) for i, k in enumerate(names(n))}
        _tf_save(tf, str(tmp_path / f"tf{n}"), list(arrays), list(arrays.values()))
        prefix = gpusaver.Saver(arrays, durable=False).save(str(tmp_path / f"ours{n}"))
        _assert_same_files(prefix, str(tmp_path / f"tf{n}"))


def test_keys_around_twice_the_block_size_equal_tensorflow(tmp_path: Any, tf: Any) -> None:
    """Keys whose entry (key + value) is just under, at and over 2 * BLOCK_SIZE flush the block
    before them: SaveV2's index, through a Saver (names in no particular order) and a writer."""
    value_len = len(entry.encode_entry(1, (1,), 0, 100, 4, 1))  # an entry's typical length
    names = []
    for i, delta in enumerate(range(-3, 4)):
        names.append(chr(ord("a") + i) * (2 * table.BLOCK_SIZE - value_len + delta))
    names += ["b", "a", "zz", "c" * 300000]
    rng = np.random.default_rng(1)
    arrays = {n: rng.random(1, dtype=np.float32) for n in names}
    _tf_save(tf, str(tmp_path / "tf"), list(arrays), list(arrays.values()))
    prefix = gpusaver.Saver(arrays, durable=False).save(str(tmp_path / "ours"))
    _assert_same_files(prefix, str(tmp_path / "tf"))
    assert _blocks(prefix) > 8


# --------------------------------------------------------------- crcs that mask to 0


def _zero_crc_arrays(big: int) -> dict[str, np.ndarray]:
    """Small tensors around tensors whose masked crc32c is 0: packed ones (a float32 scalar, a
    bfloat16 vector, an int4 vector), one of ``big`` bytes (written from its own memory above
    pack_limit), a zero-size and a 0-d tensor; names in an order unrelated to the sorted one."""
    rng = np.random.default_rng(7)
    out: dict[str, np.ndarray] = {}
    for i in rng.permutation(300):
        out[f"w{i:03d}"] = rng.random(int(i % 5), dtype=np.float32)
    out["w150"] = _masks_to_zero(4, np.float32, 1).reshape(())
    out["w000"] = _masks_to_zero(2 * 33, ml_dtypes.bfloat16, 2)
    out["w299"] = _masks_to_zero(40, ml_dtypes.int4, 3)  # the last key: its entry ends the last block
    out["big"] = _masks_to_zero(big, np.float32, 4).reshape(-1, 4)
    out["empty"] = np.zeros((3, 0), np.int16)
    out["scalar"] = np.array(2.5)
    return out


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("how", ["save", "save_async", "twice"])
def test_saver_with_crcs_that_mask_to_zero_equals_tensorflow(tmp_path: Any, tf: Any, sharded: bool, how: str) -> None:
    """Every entry whose masked crc is 0 loses its crc field (protobuf), so the index prepared
    with stand-ins must be built again: the result is SaveV2's, packed or not, async or not."""
    arrays = _zero_crc_arrays(big=(64 << 10) + 64)
    _tf_save(tf, str(tmp_path / "tf"), list(arrays), list(arrays.values()))
    zeros = [k for k, v in table.TableReader(_read(str(tmp_path / "tf") + ".index")).items()
             if k and entry.decode_entry(v).crc32c == 0]
    assert sorted(zeros) == [b"big", b"w000", b"w150", b"w299"]
    saver = gpusaver.Saver(arrays, sharded=sharded, durable=False)
    for step in range(2 if how == "twice" else 1):
        path = str(tmp_path / f"ours{step}")
        prefix = saver.save_async(path).result() if how == "save_async" else saver.save(path)
        _assert_same_files(prefix, str(tmp_path / "tf"))


def test_every_crc_masks_to_zero(tmp_path: Any, tf: Any) -> None:
    """A run in which every tensor's masked crc is 0 (none of the stand-in fields survive)."""
    arrays = {f"z{i:02d}": _masks_to_zero(4 + 4 * (i % 3), np.float32, 10 + i) for i in range(40)}
    names = list(arrays)[::-1]
    _tf_save(tf, str(tmp_path / "tf"), names, [arrays[n] for n in names])
    prefix = gpusaver.Saver({n: arrays[n] for n in names}, durable=False).save(str(tmp_path / "ours"))
    _assert_same_files(prefix, str(tmp_path / "tf"))


@_property(80)
@given(n=st.integers(0, 60), zero_at=st.lists(st.integers(0, 59), max_size=3), shard=st.integers(0, 300),
       seed=st.integers(0, 2**32 - 1), other_header=st.booleans())
def test_prepared_index_equals_the_general_path(tmp_path_factory: Any, n: int, zero_at: list[int], shard: int,
                                                seed: int, other_header: bool) -> None:
    """prepare_index (stand-in crcs) then index_table (patched, or rebuilt where a crc masks to 0
    or the header / shard differ) equals the header plus index_items, for any shard id."""
    d = tmp_path_factory.mktemp("prep")
    rng = np.random.default_rng(seed)
    keys = [bytes(rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8)) for _ in range(n)]
    keys = list(dict.fromkeys(keys))
    arrays = [rng.random(int(rng.integers(0, 4)), dtype=np.float32) for _ in keys]
    for i in zero_at:
        if i < len(arrays):
            arrays[i] = _masks_to_zero(8, np.float32, i)
    with config.set(pack_limit=16, pack_bytes=64):
        w = BundleWriter(str(d / "ck"), durable=False)
        column = KeyColumn(keys)
        w.add_many(column.keys, arrays, checked=column)
        w.prepare_index(HEADER, shard)
        w.finish(write_index=False)
    header = entry.encode_header(3) if other_header else HEADER
    got = w.index_table(header, shard)
    want = table.encode_table([(b"", header)] + w.index_items(shard_id=shard, header=False))
    assert bytes(got) == want
    other = table.encode_table([(b"", header)] + w.index_items(shard_id=shard + 1, header=False))
    assert bytes(w.index_table(header, shard + 1)) == other  # another shard id: built anew
    assert bytes(w.index_table(header, shard)) == want  # asked again: the same


# ------------------------------------------------ Savers saved again and again, groups, threads


def _tf_reference(tf: Any, d: Any, name: str, groups: list[list[tuple[str, np.ndarray]]], sharded: bool) -> str:
    """SaveV2's checkpoint for these device groups: one SaveV2 of all of them in group order, or
    (sharded) one per group merged by MergeV2Checkpoints, as TensorFlow's sharded Saver does."""
    prefix = str(d / name)
    if not sharded or len(groups) == 1:
        pairs = [p for g in groups for p in g]
        _tf_save(tf, prefix, [n for n, _ in pairs], [a for _, a in pairs])
        return prefix
    parts = []
    for k, g in enumerate(groups):
        parts.append(str(d / f"{name}_part{k}"))
        _tf_save(tf, parts[-1], [n for n, _ in g], [a for _, a in g])
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=prefix)
    return prefix


def _assert_same_checkpoint(ours: str, theirs: str, shards: int) -> None:
    assert _read(ours + ".index") == _read(theirs + ".index")
    for k in range(shards):
        suffix = ".data-%05d-of-%05d" % (k, shards)
        assert _read(ours + suffix) == _read(theirs + suffix)


def _mutate(arr: np.ndarray, how: str) -> None:
    """Changes an array in place: its shape, its dtype (a view of the same bytes), its byte order."""
    if how == "reshape" and arr.size:
        arr.shape = (arr.size,) if arr.ndim != 1 else (1,) * 8 + (arr.size,)
    elif how == "dtype" and arr.nbytes and arr.dtype.itemsize in (4, 8) and arr.shape[-1:] != (0,):
        arr.shape = (arr.size,)
        arr.dtype = np.int32 if arr.dtype.itemsize == 8 else np.uint8
    elif how == "swap" and arr.dtype.itemsize > 1 and arr.dtype.kind in "iuf":
        arr.dtype = arr.dtype.newbyteorder("S")  # the fast path refuses it: the run splits there
    elif how == "values":
        arr.view(np.uint8)[...] = np.random.default_rng(arr.nbytes).integers(0, 256, arr.nbytes, dtype=np.uint8)


@pytest.mark.parametrize("sharded", [False, True])
def test_one_saver_saved_again_and_again_with_arrays_changed_in_place(tmp_path: Any, tf: Any, sharded: bool) -> None:
    """The KeyColumn is cached per Saver group; shapes, dtypes and byte order are not: after each
    in-place change the save (save and save_async in turn) is SaveV2's (two device groups, so
    sharded makes two files)."""
    rng = np.random.default_rng(11)
    names = [f"layer{i}/{'w' if i % 2 else 'b'}" for i in rng.permutation(60)]
    variables = []
    for i, name in enumerate(names):
        arr = rng.random(int(rng.integers(1, 24)), dtype=np.float64 if i % 3 else np.float32).reshape(-1, 1)
        if i == 7:
            arr = _masks_to_zero(8 * 9000, np.float64, 9).reshape(-1, 1)  # above pack_limit, masks to 0
        variables.append(gpusaver.Variable(arr, name, f"/cpu:{i % 2}"))
    saver = gpusaver.Saver(variables, sharded=sharded, durable=False)
    groups = [[(v.name, v.array) for j, v in enumerate(variables) if j % 2 == k] for k in range(2)]
    hows = ["reshape", "dtype", "swap", "values", "swap", "reshape"]
    for step in range(len(hows) + 1):
        path = str(tmp_path / f"ours{step}")
        prefix = saver.save_async(path).result() if step % 2 else saver.save(path)
        ref = _tf_reference(tf, tmp_path, f"tf{step}", groups, sharded)
        _assert_same_checkpoint(prefix, ref, 2 if sharded else 1)
        if step < len(hows):
            for j, v in enumerate(variables):
                if (j + step) % 3 == 0:
                    _mutate(v.array, hows[step])


def test_concurrent_saves_of_shared_arrays_from_threads(tmp_path: Any, tf: Any) -> None:
    """Two Savers over the same array objects (names in other orders) and one Saver from two
    threads at once: every checkpoint is SaveV2's for its Saver's order."""
    rng = np.random.default_rng(12)
    arrays = [rng.random(int(rng.integers(0, 40)), dtype=np.float32) for _ in range(400)]
    arrays[5] = _masks_to_zero(4 * 20000, np.float32, 5)
    first = {f"a{i:03d}": a for i, a in enumerate(arrays)}
    second = {f"b{(i * 37) % 400:03d}": a for i, a in enumerate(arrays)}
    refs = {"first": str(tmp_path / "tf_first"), "second": str(tmp_path / "tf_second")}
    _tf_save(tf, refs["first"], list(first), list(first.values()))
    _tf_save(tf, refs["second"], list(second), list(second.values()))
    savers = {"first": gpusaver.Saver(first, durable=False), "second": gpusaver.Saver(second, durable=False)}
    errors: list[BaseException] = []
    done: list[tuple[str, str]] = []

    def work(which: str, tag: int) -> None:
        try:
            for step in range(4):
                d = tmp_path / f"{which}{tag}_{step}"
                d.mkdir()
                done.append((which, savers[which].save(str(d / "ck"))))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w, t)) for w, t in [("first", 0), ("first", 1), ("second", 0)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(done) == 12
    for which, prefix in done:
        _assert_same_checkpoint(prefix, refs[which], 1)


# ------------------------------------------------------- the C functions, hostile arguments

_HOSTILE_SETUP = """
import numpy as np
from gpusaver import native
from gpusaver.format import entry
lib = native.lib
H = entry.encode_header(1)
n = 4
K = [b"a", b"b", b"c", b"d"]
E = np.ones(n, np.int32); R = np.ones(n, np.int32); D = np.full(n, 3, np.int64)
O = np.arange(n, dtype=np.int64) * 12; S = np.full(n, 12, np.int64); C = np.full(n, 0xFFFFFFFF, np.uint32)
def args(**kw):
    a = dict(header=H, keys=K, order=None, enums=E, ndims=R, dims=D, offsets=O, sizes=S, crcs=C, shard=0, block=64)
    a.update(kw)
    names = ("header", "keys", "order", "enums", "ndims", "dims", "offsets", "sizes", "crcs", "shard", "block")
    return [a[k] for k in names]
"""


def test_build_and_patch_run_table_refuse_hostile_arguments_without_crashing() -> None:
    """Wrong lengths and types, out-of-range and duplicate orders, bad ranks, negative sizes,
    read-only or short outputs, zero stand-ins: an exception (or None for keys out of order),
    never a crash; what is accepted still reads back."""
    proc = _child(_HOSTILE_SETUP + textwrap.dedent("""
    from gpusaver.format import table
    ro = np.zeros(n, np.int64); ro.flags.writeable = False
    bad = {
        "header str": args(header="x"),
        "keys int": args(keys=5),
        "key str": args(keys=[b"a", "b", b"c", b"d"]),
        "keys longer": args(keys=K + [b"e"]),
        "enums short": args(enums=E[:3]),
        "ndims short": args(ndims=R[:3]),
        "dims short": args(dims=D[:3]),
        "rank negative": args(ndims=np.array([1, -1, 1, 1], np.int32)),
        "rank huge": args(ndims=np.array([1, 1, 255, 1], np.int32), dims=np.zeros(300, np.int64)),
        "rank past dims": args(ndims=np.array([1, 1, 1, 2], np.int32)),
        "dim negative": args(dims=np.array([3, -3, 3, 3], np.int64)),
        "order short": args(order=np.arange(3, dtype=np.int64)),
        "order negative": args(order=np.array([0, 1, -1, 3], np.int64)),
        "order past n": args(order=np.array([0, 1, 2, 4], np.int64)),
        "order int32": args(order=np.arange(n, dtype=np.int32)),
        "order list": args(order=[0, 1, 2, 3]),
        "order strided": args(order=np.arange(2 * n, dtype=np.int64)[::2]),
        "block 0": args(block=0),
        "block negative": args(block=-5),
        "offsets float list": args(offsets=[0.0] * n),
        "crcs short": args(crcs=C[:3]),
    }
    for what, a in bad.items():
        try:
            lib.build_run_table(*a)
        except (TypeError, ValueError, BufferError, OverflowError):
            pass
        else:
            raise AssertionError(what + ": accepted")
    for what, a, at in [
        ("crc_at read-only", args(), ro),
        ("crc_at short", args(), np.zeros(3, np.int64)),
        ("crc_at bytes", args(), bytes(8 * n)),
        ("zero stand-in", args(crcs=np.array([1, 0, 1, 1], np.uint32)), np.zeros(n, np.int64)),
    ]:
        try:
            lib.build_run_table(*a, at)
        except (TypeError, ValueError, BufferError):
            pass
        else:
            raise AssertionError(what + ": accepted")
    # keys out of order, or repeated by the order: None, nothing built
    assert lib.build_run_table(*args(order=np.array([0, 0, 1, 2], np.int64))) is None
    assert lib.build_run_table(*args(keys=[b"a", b"b", b"b", b"c"])) is None
    assert lib.build_run_table(*args(keys=[b"", b"b", b"c", b"d"])) is None  # the header's key
    # accepted oddities read back as what they say
    for a in (args(shard=2**64 - 1), args(block=1), args(block=2**62), args(keys=tuple(K)),
              args(enums=np.array([-1, 0, 2**31 - 1, 300], np.int32)), args(offsets=np.full(n, -1, np.int64)),
              args(ndims=np.array([0, 254, 0, 0], np.int32), dims=np.zeros(254, np.int64))):
        out = lib.build_run_table(*a)
        items = table.TableReader(out).items()
        assert [k for k, _ in items] == [b""] + K
    # patch_run_table
    at = np.zeros(n, np.int64)
    tab, blocks = lib.build_run_table(*args(), at)
    for what, call in [
        ("table bytes", lambda: lib.patch_run_table(bytes(tab), at, C, blocks)),
        ("at past end", lambda: lib.patch_run_table(tab, np.array([len(tab) - 3], np.int64), C[:1], blocks)),
        ("at negative", lambda: lib.patch_run_table(tab, np.array([-1], np.int64), C[:1], blocks)),
        ("crcs short", lambda: lib.patch_run_table(tab, at, C[:3], blocks)),
        ("block past end", lambda: lib.patch_run_table(tab, at, C, np.array([0, len(tab) - 4], np.int64))),
        ("block negative", lambda: lib.patch_run_table(tab, at, C, np.array([-8, 4], np.int64))),
        ("block size huge", lambda: lib.patch_run_table(tab, at, C, np.array([8, 2**63 - 1], np.int64))),
        ("blocks odd", lambda: lib.patch_run_table(tab, at, C, np.zeros(3, np.int64))),
        ("empty table", lambda: lib.patch_run_table(bytearray(), at, C, blocks)),
    ]:
        before = bytes(tab)
        try:
            call()
        except (TypeError, ValueError, BufferError):
            assert bytes(tab) == before, what + ": changed the table"
        else:
            raise AssertionError(what + ": accepted")
    before = bytes(tab)
    assert lib.patch_run_table(tab, at, np.array([5, 0, 5, 5], np.uint32), blocks) is False
    assert bytes(tab) == before  # nothing changed
    assert lib.patch_run_table(tab, at[:0], C[:0], blocks[:0]) is True  # nothing to do
    real = np.array([1, 2, 3, 4], np.uint32)
    assert lib.patch_run_table(tab, at, real, blocks) is True
    assert bytes(tab) == lib.build_run_table(*args(crcs=real))
    # describe: codes dicts it does not expect (ml_dtypes' type numbers >= 256 ask the dict)
    import ml_dtypes
    bf = np.zeros(3, ml_dtypes.bfloat16)
    arrays = [bf, np.zeros(2, np.float32), np.zeros(2, ">f4"), np.zeros(4)[::2], "x", None, np.array(1.5)]
    for codes in ({}, {256: 14}, {"a": 1}, {11: 1.5}, {256: 2**40}, {np.dtype(np.float32).num: 1, 256: 14}):
        try:
            enums, sizes, ndims, dims = lib.describe(arrays, codes)
        except (TypeError, ValueError, OverflowError):
            continue
        assert list(enums[2:6]) == [-1, -1, -1, -1]  # byte-swapped, strided, not arrays
    for bad in ((5, {}), (arrays, []), (arrays, None)):
        try:
            lib.describe(*bad)
        except TypeError:
            pass
        else:
            raise AssertionError(repr(bad) + ": accepted")
    print("CHILD-OK")
    """))
    _assert_no_crash(proc)


_RACE = """
import sys, threading
import numpy as np
from gpusaver import native
from gpusaver.format import entry
lib = native.lib
mode = sys.argv[1]
n = 200000
for attempt in range(10):
    keys = [b"%08d" % i for i in range(n)]
    if mode == "keys":
        # large keys, last: their memory is unmapped once freed
        keys += [b"z%03d" % i + b"q" * (1 << 20) for i in range(8)]
    m = len(keys)
    enums = np.ones(m, np.int32); ndims = np.zeros(m, np.int32); dims = np.zeros(1 << 22, np.int64)
    offsets = np.zeros(m, np.int64); sizes = np.zeros(m, np.int64); crcs = np.full(m, 7, np.uint32)
    order = np.arange(m, dtype=np.int64)
    go = threading.Event()
    def spoil():
        go.wait()  # runs once the caller lets go of the GIL
        if mode == "keys":
            keys.clear()
        elif mode == "order":
            order[-1] = 1 << 40
        elif mode == "ndims":
            ndims[-1] = 200000
    t = threading.Thread(target=spoil)
    t.start()
    go.set()
    try:
        lib.build_run_table(entry.encode_header(1), keys, order, enums, ndims, dims, offsets, sizes, crcs, 0, 262144)
    except (ValueError, TypeError):
        pass
    t.join()
print("CHILD-OK")
"""


# Was a bug (found 2026-11-30, fixed the same day): _native.build_run_table reads the keys' bytes through
# borrowed pointers of the caller's list after releasing the GIL (Py_BEGIN_ALLOW_THREADS); another thread that
# empties the list frees them meanwhile: use after free, the process dies with SIGSEGV (reachable through
# BundleWriter.add_many(names, ..., checked=KeyColumn(names)), whose run keeps the caller's list)
def test_build_run_table_survives_its_keys_list_emptied_by_another_thread() -> None:
    _assert_no_crash(_child(f"import sys; sys.argv = ['x', 'keys']\n{_RACE}"))


# Was a bug (found 2026-11-30, fixed the same day): _native.build_run_table checks order (in range) and ndims
# (<= MAX_RANK, within dims) with the GIL, then releases it and reads both again: another thread changing them
# in between makes it index enums/keys out of bounds or encode a rank of 200000 into the 3366-byte stack
# scratch (ENTRY_ROOM(MAX_RANK)); SIGSEGV
@pytest.mark.parametrize("column", ["order", "ndims"])
def test_build_run_table_survives_its_columns_changed_by_another_thread(column: str) -> None:
    _assert_no_crash(_child(f"import sys; sys.argv = ['x', {column!r}]\n{_RACE}"))


# Was a bug (found 2026-11-30, fixed the same day): _native.build_run_table writes crc_at[i] while it reads
# ndims (and dims), checked beforehand: a crc_at that shares memory with ndims turns later ranks into block
# positions, read past dims and encoded into the fixed stack scratch: stack overflow, SIGSEGV (no overlap
# check, no re-check at use)
def test_build_run_table_crc_at_sharing_memory_with_ndims_does_not_crash() -> None:
    _assert_no_crash(_child(_HOSTILE_SETUP + textwrap.dedent("""
    m = 40
    keys = [b"%04d" % i + b"k" * 1000 for i in range(m)]
    ndims = np.zeros(2 * m, np.int32)  # ranks 0, and (as int64) crc_at's memory
    try:
        lib.build_run_table(H, keys, None, np.ones(m, np.int32), ndims, np.zeros(1 << 20, np.int64),
                            np.zeros(m, np.int64), np.zeros(m, np.int64), np.full(m, 9, np.uint32), 0, 262144,
                            ndims.view(np.int64))
    except ValueError:
        pass
    print("CHILD-OK")
    """)))


# Was a bug (found 2026-11-30, fixed the same day): _native.patch_run_table checks every crc_at[i] and block
# handle before it writes, then writes crcs into the table: where crc_at or blocks lie inside the table
# buffer, a written crc changes a position or block size already checked, and the next write lands outside the
# table: SIGSEGV
@pytest.mark.parametrize("aliased", ["crc_at", "blocks"])
def test_patch_run_table_positions_inside_the_table_do_not_crash(aliased: str) -> None:
    _assert_no_crash(_child(_HOSTILE_SETUP + textwrap.dedent(f"""
    aliased = {aliased!r}
    table = np.zeros(4096, np.uint8)
    if aliased == "crc_at":
        at = table[:16].view(np.int64)
        at[0], at[1] = 8, 16  # the first crc goes over at[1]
        blocks = np.zeros(0, np.int64)
        crcs = np.array([0x7FFFFFF0, 0x7FFFFFF0], np.uint32)
    else:
        blocks = table[:16].view(np.int64)
        blocks[0], blocks[1] = 0, 100
        at = np.array([8], np.int64)  # the crc goes over blocks[1], the block's size
        crcs = np.array([0x7FFFFFF0], np.uint32)
    try:
        lib.patch_run_table(table, at, crcs, blocks)
    except ValueError:
        pass
    print("CHILD-OK")
    """)))


_DESCRIBE_RACE = """
import sys, threading
import numpy as np
from gpusaver import native
lib, codes = native.lib, native.type_codes()
mode = sys.argv[1]
for attempt in range(10):
    arrays = [np.zeros(6, np.float32) for _ in range(300000)]
    go = threading.Event()
    def spoil():
        go.wait()  # gets the GIL the first time describe lets go of it
        if mode == "clear":
            arrays.clear()
        else:
            for a in arrays:
                a.shape = (3, 2)
    t = threading.Thread(target=spoil)
    t.start()
    go.set()
    enums, sizes, ndims, dims = lib.describe(arrays, codes)
    t.join()
    if mode == "reshape":  # each tensor as it was or as it became, never a mix
        at = np.concatenate([[0], np.cumsum(ndims)])
        for i in range(len(ndims)):
            shape = tuple(dims[at[i]:at[i + 1]])
            if shape not in ((6,), (3, 2)):
                print("torn shape", i, shape, "size", sizes[i])
                sys.exit(3)
print("CHILD-OK")
"""


# Was a bug (found 2026-11-30, fixed the same day): _native.describe is not atomic although it holds the GIL
# (d026039): its new_array calls (PyArray_ZEROS) let go of the GIL inside NumPy's default_calloc
# (NPY_BEGIN_THREADS around calloc for >= 1 KiB): for enums/sizes/ndims after it took the list's item pointer,
# and for dims between the loop that reads each array's rank and the loop that reads its shape. Another thread
# reshaping arrays in place meanwhile gets torn entries (the rank of one shape with the dims of the other:
# (3,) or (6, 4) - the old dim and its stride - for 24 bytes; a Saver of 200k (6,) float32 arrays racing such
# reshapes wrote ~60k entries whose shape does not match their size); one emptying the list makes it read
# freed objects: SIGSEGV
@pytest.mark.parametrize("mode", ["reshape", "clear"])
def test_describe_is_atomic_under_a_thread_changing_the_arrays(mode: str) -> None:
    _assert_no_crash(_child(f"import sys; sys.argv = ['x', {mode!r}]\n{_DESCRIBE_RACE}"))


# ------------------------------------------------------------------------ odd tensors


def test_rank_64_and_huge_zero_size_shapes_equal_tensorflow(tmp_path: Any, tf: Any) -> None:
    """NumPy's largest rank, and zero-size tensors with dimensions of 2**40 and 2**62 (10-byte
    varints in the entry): SaveV2's index, and TensorFlow reads the shapes back."""
    arrays = {
        "r64": np.ones((1,) * 64, np.float32),
        "huge0": np.zeros((0, 2**40, 3), np.float32),
        "r32": np.zeros((1,) * 31 + (0,), np.int8),
        "bigdim": np.zeros((2**62, 0), np.uint8),
        "scalar": np.array(7, np.int64),
        "zero_crc": _masks_to_zero(4, np.int32, 21).reshape(()),
    }
    _tf_save(tf, str(tmp_path / "tf"), list(arrays), list(arrays.values()))
    for sharded in (False, True):
        prefix = gpusaver.Saver(arrays, sharded=sharded, durable=False).save(str(tmp_path / f"ours{sharded}"))
        _assert_same_files(prefix, str(tmp_path / "tf"))
    reader = tf.train.load_checkpoint(prefix)
    for n, a in arrays.items():
        assert reader.get_tensor(n).shape == a.shape


@pytest.mark.parametrize("sharded", [False, True])
def test_partitioned_and_plain_variables_in_one_group_equal_tensorflow(tmp_path: Any, tf: Any, sharded: bool) -> None:
    """Slices next to a run (the writer then holds more than one run: the general path) in a
    save and a save_async: SaveV2 with the same shape_and_slices writes the same files."""
    rng = np.random.default_rng(8)
    emb = rng.random((10, 4), dtype=np.float32)
    plain = {f"p{i}": rng.random(3, dtype=np.float32) for i in (3, 1, 2)}
    plain["p0"] = _masks_to_zero(12, np.float32, 8)
    variables = [gpusaver.Variable(a, n) for n, a in plain.items()]
    variables += [gpusaver.Variable(emb[6:].copy(), "emb", full_shape=(10, 4), offset=(6, 0)),
                  gpusaver.Variable(emb[:6].copy(), "emb", full_shape=(10, 4), offset=(0, 0))]
    tf.raw_ops.SaveV2(
        prefix=str(tmp_path / "tf"), tensor_names=list(plain) + ["emb", "emb"],
        shape_and_slices=[""] * len(plain) + ["10 4 6,4:-", "10 4 0,6:-"],
        tensors=[tf.constant(t) for t in list(plain.values()) + [emb[6:], emb[:6]]],
    )
    saver = gpusaver.Saver(variables, sharded=sharded, durable=False)
    _assert_same_files(saver.save(str(tmp_path / "a")), str(tmp_path / "tf"))
    _assert_same_files(saver.save_async(str(tmp_path / "b")).result(), str(tmp_path / "tf"))


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 16, 17, 25])
def test_pack_prefetching_ahead_copies_and_checksums_every_tensor(count: int) -> None:
    """pack / unpack prefetch 8 tensors ahead (2 KiB of each): counts around 8, sizes around 2 KiB
    and zero, a range that starts and stops inside the list."""
    lib = native.lib
    rng = np.random.default_rng(count)
    sizes = [int(rng.choice([0, 1, 63, 2047, 2048, 2049, 5000])) for _ in range(count)]
    arrays = [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]
    for start, stop in {(0, count), (min(1, count), max(min(1, count), count - 1))}:
        out = np.zeros(sum(sizes) + 8, np.uint8)
        crcs = np.zeros(count, np.uint32)
        n = lib.pack(arrays, start, stop, out, crcs)
        want = b"".join(a.tobytes() for a in arrays[start:stop])
        assert n == len(want) and out[:n].tobytes() == want
        assert [int(c) for c in crcs[start:stop]] == [crc.value(a.tobytes()) for a in arrays[start:stop]]


def _python_table(items: list[tuple[bytes, bytes]], block_size: int) -> bytes:
    """The table through the pure-Python TableWriter, one add at a time (an independent encoder)."""
    parts: list[bytes] = []
    w = table.TableWriter(parts.append, block_size)
    for k, v in items:
        w.add(k, v)
    w.finish()
    return b"".join(parts)


@_property(250)
@given(
    keys=st.lists(BYTE_NAMES, max_size=30, unique=True),
    data=st.data(),
    block_size=st.sampled_from([1, 2, 17, 40, 64, 100, 333, 4096]),
    shard=st.sampled_from([0, 1, 127, 128, 2**31 - 1, 2**63]),
    zero=st.booleans(),
)
def test_build_run_table_with_odd_block_sizes_equals_the_python_writer(
    keys: list[bytes], data: Any, block_size: int, shard: int, zero: bool
) -> None:
    """Any order, tiny block sizes (a block per entry, entries over twice the block size), varint
    edges in shard, offsets, sizes and dims: the C table equals the Python TableWriter over
    entry.encode_entry; the stand-in table patched with the real crcs equals it too, and a zero
    masked crc refuses the patch, leaving the table as it was."""
    lib = native.lib
    n = len(keys)
    edge = st.sampled_from([0, 1, 127, 128, 16383, 16384, 2**35, 2**62])
    enums = np.array([data.draw(st.sampled_from([0, 1, 14, 127, 128, 300])) for _ in keys], np.int32)
    shapes = [tuple(data.draw(st.lists(edge, max_size=4))) for _ in keys]
    ndims = np.array([len(s) for s in shapes], np.int32)
    offsets = np.array([data.draw(edge) for _ in keys], np.int64)
    sizes = np.array([data.draw(edge) for _ in keys], np.int64)
    crcs = np.array([data.draw(st.integers(1, 2**32 - 1)) for _ in keys], np.uint32)
    if zero and n:
        crcs[data.draw(st.integers(0, n - 1))] = 0
    sorted_pos = sorted(range(n), key=keys.__getitem__)

    def columns(idx: list[int]) -> tuple[Any, ...]:
        """keys, enums, ndims, dims, offsets and sizes with the tensors in the order idx gives."""
        pick = np.array(idx, np.int64)
        return ([keys[i] for i in idx], enums[pick], ndims[pick],
                np.array([d for i in idx for d in shapes[i]], np.int64), offsets[pick], sizes[pick])

    perm = data.draw(st.permutations(range(n)))  # the columns' order
    order = None
    if data.draw(st.booleans()):
        where = {i: j for j, i in enumerate(perm)}
        order = np.array([where[i] for i in sorted_pos], np.int64)
    elif perm != sorted_pos:  # out of order and no order given: None, nothing built
        assert lib.build_run_table(HEADER, *columns(perm)[:1], None, *columns(perm)[1:],
                                   crcs[np.array(perm, np.int64)], shard, block_size) is None
        perm = sorted_pos
    cols = columns(perm)
    crcs_in = crcs[np.array(perm, np.int64)]
    want = _python_table(
        [(b"", HEADER)] + [
            (keys[i], entry.encode_entry(int(enums[i]), shapes[i], shard, int(offsets[i]), int(sizes[i]), int(crcs[i])))
            for i in sorted_pos
        ],
        block_size,
    )
    args = (HEADER, cols[0], order, *cols[1:])
    assert lib.build_run_table(*args, crcs_in, shard, block_size) == want
    at = np.full(n, -1, np.int64)
    tab, blocks = lib.build_run_table(*args, np.full(n, 0xFFFFFFFF, np.uint32), shard, block_size, at)
    before = bytes(tab)
    if zero and n:
        assert lib.patch_run_table(tab, at, crcs_in, blocks) is False
        assert bytes(tab) == before
    else:
        assert lib.patch_run_table(tab, at, crcs_in, blocks) is True
        assert bytes(tab) == want


def test_thirty_thousand_tensors_in_random_order_equal_tensorflow(tmp_path: Any, tf: Any) -> None:
    """A save of the size the prepared index is for: 30,000 tensors (unicode names of many lengths,
    saved in an order unrelated to the sorted one, a few above pack_limit, a few whose crc masks
    to 0): several index blocks, SaveV2's bytes, saved twice by the same Saver."""
    rng = np.random.default_rng(30)
    stems = ["layer", "\u00e9t\u00e9", "\U0001f600", "a" * 40, "x/y/z"]
    names = [f"{stems[i % 5]}/{i:05d}" for i in rng.permutation(30000)]
    arrays = {n: rng.random(int(rng.integers(0, 30)), dtype=np.float32) for n in names}
    for j, n in enumerate(names[100:130]):
        arrays[n] = _masks_to_zero(4 * (1 + j % 3) if j % 10 else 4 * 20000, np.float32, j)
    _tf_save(tf, str(tmp_path / "tf"), names, [arrays[n] for n in names])
    saver = gpusaver.Saver(arrays, durable=False)
    for step in range(2):
        prefix = saver.save(str(tmp_path / f"ours{step}"))
        _assert_same_files(prefix, str(tmp_path / "tf"))
    assert _blocks(prefix) > 2
