"""Live interoperability with TensorFlow, both ways, in temporary directories.

TensorFlow's own reader and writer are the oracle: TF must read what gpusaver
writes (``load_checkpoint``, ``list_variables``, ``RestoreV2`` with slice
specs), gpusaver must read what TF writes (``SaveV2``, a sharded TF1 ``Saver``
on two logical CPUs), and for the same tensors in the same order both writers
must produce the same bytes.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpusaver
from gpusaver.errors import ChecksumError, CorruptCheckpointError
from gpusaver.format import BundleReader, BundleWriter, merge_bundles
from gpusaver.format.table import TableReader

# Every test runs on both host paths: the C extension and its pure-Python twin.
pytestmark = [pytest.mark.tf, pytest.mark.usefixtures("host_path")]

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


from golden import cases as golden  # noqa: E402  (tests/golden, on the path beside this file)


def _two_logical_cpus() -> None:
    """Splits the CPU into /cpu:0 and /cpu:1 for eager code, when TF is not yet running.

    The graph-mode Session below also asks for two CPUs in its own ConfigProto,
    so the sharded-Saver test does not depend on this having happened first.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
        )
    except RuntimeError:  # the TF runtime was initialized by an earlier test module
        pass


_two_logical_cpus()

SMALL_SAVEV2 = [c for c in golden.CASES.values() if c.kind == "savev2" and c.name != "many_keys"]


# ---------------------------------------------------------------------------- helpers


def tf_value(value: Any) -> np.ndarray:
    """TF's ``get_tensor`` result as an ndarray (a scalar string comes back as ``bytes``)."""
    if isinstance(value, bytes):
        out = np.empty((), dtype=object)
        out[()] = value
        return out
    if isinstance(value, tf.Tensor):
        return tf_value(value.numpy())
    return np.asarray(value)


def tf_save(prefix: str, entries: Sequence[Any]) -> None:
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=[e.name for e in entries],
        shape_and_slices=[e.shape_and_slice for e in entries],
        tensors=[tf.constant(e.array) for e in entries],
    )


def our_save(prefix: str, entries: Sequence[Any]) -> None:
    writer = BundleWriter(prefix, durable=False)
    for e in entries:
        if e.full_shape is None:
            writer.add(e.name, e.array)
        else:
            writer.add_slice(e.name, list(e.full_shape), e.slice_spec, e.array)
    writer.finish()


def entries_of(tensors: Mapping[str, np.ndarray]) -> list[Any]:
    return [golden.Entry(name, arr) for name, arr in tensors.items()]


def tf_restore(prefix: str, requests: Sequence[tuple[str, str, np.dtype]]) -> list[np.ndarray]:
    """One RestoreV2 op over (name, shape_and_slice, dtype) requests."""
    out = tf.raw_ops.RestoreV2(
        prefix=prefix,
        tensor_names=[r[0] for r in requests],
        shape_and_slices=[r[1] for r in requests],
        dtypes=[tf.as_dtype(r[2]) for r in requests],
    )
    return [tf_value(t) for t in out]


def assert_tf_reads(prefix: str, expected: Mapping[str, np.ndarray]) -> None:
    """TF's list_variables, dtype map and get_tensor agree with ``expected``, bit for bit."""
    listing = [(name, list(shape)) for name, shape in tf.train.list_variables(prefix)]
    assert listing == sorted((n, list(a.shape)) for n, a in expected.items())
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    failures = []
    for name, want in expected.items():
        want_dtype = tf.string if want.dtype == object else tf.as_dtype(want.dtype)
        if dtypes[name] != want_dtype:
            failures.append(f"{name}: TF reads dtype {dtypes[name].name}, expected {want_dtype.name}")
            continue
        try:
            diff = golden.describe_difference(tf_value(reader.get_tensor(name)), want)
        except tf.errors.OpError as e:
            diff = f"TF raised {type(e).__name__}: {e.message}"
        if diff is not None:
            failures.append(f"{name}: {diff}")
    assert not failures, "TF disagrees with what we wrote:\n" + "\n".join(failures[:20])


def assert_we_read(prefix: str, expected: Mapping[str, np.ndarray]) -> None:
    """gpusaver's list_variables and get_tensor agree with ``expected``, bit for bit."""
    assert gpusaver.list_variables(prefix) == sorted((n, list(a.shape)) for n, a in expected.items())
    reader = gpusaver.load_checkpoint(prefix)
    failures = []
    for name, want in expected.items():
        diff = golden.describe_difference(reader.get_tensor(name), want)
        if diff is not None:
            failures.append(f"{name}: {diff}")
    assert not failures, "we disagree with what TF wrote:\n" + "\n".join(failures[:20])


def assert_same_files(ours: Path, theirs: Path, names: Sequence[str]) -> None:
    for name in names:
        a, b = (ours / name).read_bytes(), (theirs / name).read_bytes()
        if a == b:
            continue
        if name.endswith(".index"):
            diff = golden.describe_items_difference(
                TableReader.from_bytes(a).items(), TableReader.from_bytes(b).items()
            )
            if diff is not None:
                pytest.fail(f"{name}: {diff}")
        pytest.fail(golden.describe_bytes_difference(a, b, name))


# ---------------------------------------------------------------------------- TF reads ours


@pytest.mark.parametrize("case", SMALL_SAVEV2, ids=lambda c: c.name)
def test_tf_reads_our_bundle(case: Any, tmp_path: Path) -> None:
    prefix = str(tmp_path / "ckpt")
    our_save(prefix, case.shards[0])
    assert_tf_reads(prefix, case.expected)


@pytest.mark.parametrize("case", SMALL_SAVEV2, ids=lambda c: c.name)
def test_same_bytes_as_tf_savev2(case: Any, tmp_path: Path) -> None:
    (tmp_path / "ours").mkdir()
    (tmp_path / "tf").mkdir()
    our_save(str(tmp_path / "ours" / "ckpt"), case.shards[0])
    tf_save(str(tmp_path / "tf" / "ckpt"), case.shards[0])
    assert_same_files(tmp_path / "ours", tmp_path / "tf", ["ckpt.index", "ckpt.data-00000-of-00001"])


# Regions of the "slices" case, many cutting across stored slices.
RESTORE_SPECS = [
    ("pv", "10 4 2,3:-"),
    ("pv", "10 4 4,2:1,2"),
    ("pv", "10 4 0,10:0,4"),
    ("pv", "10 4 -:3,1"),
    ("part", "10 4 3,4:-"),
    ("part", "10 4 9,1:3,1"),
    ("big", "200 3 90,20:1,2"),
    ("big", "200 3 0,200:-"),
    ("grid", "6 8 2,2:3,2"),
    ("grid", "6 8 1,4:2,5"),
    ("cube", "4 3 2 1,2:-:1,1"),
    ("cube", "4 3 2 -:0,2:-"),
    ("flags", "8 2,3"),
    ("complex", "4 2 1,2:-"),
    ("plain", "10 4 1,3:2,2"),
    ("full_dash", "3 2 1,1:-"),
    ("full_explicit", "3 2 -:1,1"),
]


@pytest.fixture(scope="module")
def slices_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The "slices" case written once by us and once by TF."""
    case = golden.CASES["slices"]
    root = tmp_path_factory.mktemp("slices")
    ours, theirs = str(root / "ours" / "ckpt"), str(root / "tf" / "ckpt")
    (root / "tf").mkdir()
    our_save(ours, case.shards[0])
    tf_save(theirs, case.shards[0])
    return {"ours": ours, "tf": theirs}


@pytest.mark.parametrize(("name", "shape_and_slice"), RESTORE_SPECS, ids=[f"{n}-{s}" for n, s in RESTORE_SPECS])
def test_restore_v2_reads_regions_of_our_slices(
    slices_bundles: dict[str, str], name: str, shape_and_slice: str
) -> None:
    full = golden.CASES["slices"].expected[name]
    shape, spec = golden.full_slice_region(shape_and_slice)
    assert shape == list(full.shape)
    (got,) = tf_restore(slices_bundles["ours"], [(name, shape_and_slice, full.dtype)])
    diff = golden.describe_difference(got, full[golden.slice_region(spec, shape)])
    assert diff is None, f"RestoreV2 of our {name!r} at {shape_and_slice!r}: {diff}"


@pytest.mark.parametrize(("name", "shape_and_slice"), RESTORE_SPECS, ids=[f"{n}-{s}" for n, s in RESTORE_SPECS])
def test_we_read_regions_of_tf_slices(slices_bundles: dict[str, str], name: str, shape_and_slice: str) -> None:
    full = golden.CASES["slices"].expected[name]
    shape, spec = golden.full_slice_region(shape_and_slice)
    got = BundleReader(slices_bundles["tf"]).read_slice(name, spec)
    (want,) = tf_restore(slices_bundles["tf"], [(name, shape_and_slice, full.dtype)])
    assert golden.bit_equal(want, full[golden.slice_region(spec, shape)])  # the oracle agrees
    diff = golden.describe_difference(got, want)
    assert diff is None, f"read_slice of TF's {name!r} at {spec!r}: {diff}"


def _merge_layout(root: Path, n: int) -> list[str]:
    temp = root / "model_temp"
    temp.mkdir(parents=True)
    return [str(temp / f"part-{i:05d}-of-{n:05d}") for i in range(n)]


def test_tf_reads_our_merged_shards(tmp_path: Path) -> None:
    case = golden.CASES["merged"]
    ours, theirs = tmp_path / "ours", tmp_path / "tf"
    our_parts = _merge_layout(ours, len(case.shards))
    for part, entries in zip(our_parts, case.shards):
        our_save(part, entries)
    merge_bundles(our_parts, str(ours / "model"))
    assert_tf_reads(str(ours / "model"), case.expected)
    # A region of "w" spanning the slice in data file 0 and the one in data file 1.
    w = case.expected["w"]
    got = tf_restore(str(ours / "model"), [("w", "10 4 3,4:-", w.dtype), ("v", "6 2,2", np.int32)])
    assert golden.bit_equal(got[0], w[3:7])
    assert golden.bit_equal(got[1], case.expected["v"][2:4])
    # And TF's own merge of TF-written shards gives the same files.
    tf_parts = _merge_layout(theirs, len(case.shards))
    for part, entries in zip(tf_parts, case.shards):
        tf_save(part, entries)
    tf.raw_ops.MergeV2Checkpoints(
        checkpoint_prefixes=tf_parts, destination_prefix=str(theirs / "model"), delete_old_dirs=True
    )
    assert_same_files(ours, theirs, ["model.index", *case.data_files])


def test_tf_reads_our_15000_keys(tmp_path: Path) -> None:
    names = golden.many_key_names(15_000, "interop")
    kinds = [(np.float16, ()), (np.int32, (3,)), (np.uint8, (0, 2)), (np.float64, ())]
    tensors = {}
    for i, name in enumerate(names):
        dtype, shape = kinds[i % len(kinds)]
        tensors[name] = golden.det_array(f"interop/{i}", dtype, shape)
    (tmp_path / "ours").mkdir()
    (tmp_path / "tf").mkdir()
    ours = str(tmp_path / "ours" / "ckpt")
    our_save(ours, entries_of(tensors))
    listing = [(n, list(s)) for n, s in tf.train.list_variables(ours)]
    assert listing == sorted((n, list(a.shape)) for n, a in tensors.items())
    got = tf_restore(ours, [(n, "", a.dtype) for n, a in tensors.items()])
    bad = [n for (n, want), g in zip(tensors.items(), got) if not golden.bit_equal(g, want)]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    tf_save(str(tmp_path / "tf" / "ckpt"), entries_of(tensors))
    assert_same_files(tmp_path / "ours", tmp_path / "tf", ["ckpt.index", "ckpt.data-00000-of-00001"])


def test_key_longer_than_two_blocks(tmp_path: Path) -> None:
    # key + value >= 2 * block_size makes the table flush the block before the entry.
    tensors = {
        "a": np.arange(3, dtype=np.float32),
        "b" * 600_000: np.array([1, 2], np.int64),
        "c": golden.det_array("huge/c", object, (2,)),
    }
    (tmp_path / "ours").mkdir()
    (tmp_path / "tf").mkdir()
    our_save(str(tmp_path / "ours" / "ckpt"), entries_of(tensors))
    tf_save(str(tmp_path / "tf" / "ckpt"), entries_of(tensors))
    assert_same_files(tmp_path / "ours", tmp_path / "tf", ["ckpt.index", "ckpt.data-00000-of-00001"])
    assert_tf_reads(str(tmp_path / "ours" / "ckpt"), tensors)


# ---------------------------------------------------------------------------- we read TF's


@pytest.mark.parametrize("case", SMALL_SAVEV2, ids=lambda c: c.name)
def test_we_read_tf_savev2(case: Any, tmp_path: Path) -> None:
    prefix = str(tmp_path / "ckpt")
    tf_save(prefix, case.shards[0])
    assert_we_read(prefix, case.expected)


def _tf1_sharded_save(prefix: Path, variables: Sequence[Any]) -> None:
    """A TF1 graph-mode ``Saver(sharded=True)`` over variables on /cpu:0 and /cpu:1."""
    graph = tf.Graph()
    part_re = re.compile(r"/part_(\d+)(/|$)")
    with graph.as_default():
        for var in variables:
            if not var.partitions:
                with graph.device(f"/cpu:{var.device}"):
                    tf.compat.v1.Variable(var.array, name=var.name)
                continue

            def place(op: Any, devices: tuple[int, ...] = var.partitions) -> str:
                match = part_re.search(op.name)
                return f"/cpu:{devices[int(match.group(1))] if match else devices[0]}"

            def init(shape: Any, dtype: Any = None, partition_info: Any = None, full: np.ndarray = var.array) -> Any:
                offset = partition_info.var_offset if partition_info else [0] * len(shape)
                return tf.constant(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])

            with graph.device(place):
                tf.compat.v1.get_variable(
                    var.name,
                    shape=var.array.shape,
                    dtype=tf.as_dtype(var.array.dtype),
                    initializer=init,
                    partitioner=tf.compat.v1.fixed_size_partitioner(len(var.partitions)),
                )
        saver = tf.compat.v1.train.Saver(sharded=True)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": 2}, allow_soft_placement=False)
        with tf.compat.v1.Session(graph=graph, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix), write_meta_graph=False, write_state=False)


def test_we_read_tf1_sharded_saver(tmp_path: Path) -> None:
    case = golden.CASES["saver_sharded"]
    prefix = tmp_path / "model.ckpt"
    _tf1_sharded_save(prefix, case.variables)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.ckpt.index", *case.data_files])
    assert_we_read(str(prefix), case.expected)
    reader = BundleReader(str(prefix))
    pv = case.expected["pv"]
    for spec in ("3,4:-", "4,2:2,2", "-:-"):
        diff = golden.describe_difference(reader.read_slice("pv", spec), pv[golden.slice_region(spec, pv.shape)])
        assert diff is None, f"pv[{spec}]: {diff}"


def test_we_read_tf2_checkpoint_sharded_by_size(tmp_path: Path) -> None:
    # TF2's saver groups variables by host, so CPU devices share one shard; a
    # MaxShardSizePolicy splits them over several shards instead (cutting big
    # tensors into slices) before MergeV2Checkpoints joins them.
    case = golden.CASES["tf2_checkpoint"]
    root = tf.train.Checkpoint()
    root.model = tf.Module()
    for var in case.variables:
        setattr(root.model, var.name.replace("/", "_"), tf.Variable(var.array))
    root.model.big = tf.Variable(golden.det_array("tf2/big", np.float32, (10, 4)))
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=64)
    prefix = root.save(str(tmp_path / "ckpt"), options=tf.train.CheckpointOptions(experimental_sharding_callback=policy))
    assert len(list(tmp_path.glob("ckpt-1.data-*"))) >= 3
    tf_reader = tf.train.load_checkpoint(prefix)
    expected = {
        name: tf_value(tf_reader.get_tensor(name)) for name in tf_reader.get_variable_to_shape_map()
    }
    for var in case.variables:
        assert golden.bit_equal(expected[f"model/{var.name.replace('/', '_')}/.ATTRIBUTES/VARIABLE_VALUE"], var.array)
    reader = gpusaver.load_checkpoint(str(tmp_path))  # through the "checkpoint" file
    for name, want in expected.items():
        diff = golden.describe_difference(reader.get_tensor(name), want)
        assert diff is None, f"{name}: {diff}"
    assert gpusaver.list_variables(prefix) == [(n, list(s)) for n, s in tf.train.list_variables(prefix)]
    big = expected["model/big/.ATTRIBUTES/VARIABLE_VALUE"]
    got = BundleReader(prefix).read_slice("model/big/.ATTRIBUTES/VARIABLE_VALUE", "3,5:1,3")
    assert golden.bit_equal(got, big[3:8, 1:4])


# ---------------------------------------------------------------------------- corruption


@pytest.fixture
def small_bundle(tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    tensors = {
        "f": np.arange(64, dtype=np.float32),
        "s": golden.det_array("corrupt/s", object, (5,)),
    }
    prefix = str(tmp_path / "ckpt")
    our_save(prefix, entries_of(tensors))
    return prefix, tensors


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_both_reject_a_corrupt_tensor(small_bundle: tuple[str, dict[str, np.ndarray]]) -> None:
    prefix, _ = small_bundle
    _flip(prefix + ".data-00000-of-00001", 10)  # inside "f"
    with pytest.raises(tf.errors.OpError, match="Checksum does not match"):
        tf.train.load_checkpoint(prefix).get_tensor("f")
    with pytest.raises(ChecksumError):
        gpusaver.load_checkpoint(prefix).get_tensor("f")
    # The other tensor is intact for both.
    assert tf.train.load_checkpoint(prefix).get_tensor("s").shape == (5,)
    assert gpusaver.load_checkpoint(prefix).get_tensor("s").shape == (5,)


def test_both_reject_a_corrupt_string_length_checksum(small_bundle: tuple[str, dict[str, np.ndarray]]) -> None:
    prefix, tensors = small_bundle
    # "s" follows the 256 bytes of "f": five 1-byte length varints, then the length checksum.
    _flip(prefix + ".data-00000-of-00001", 256 + 5 + 1)
    with pytest.raises(tf.errors.OpError, match="length checksum does not match"):
        tf.train.load_checkpoint(prefix).get_tensor("s")
    with pytest.raises(CorruptCheckpointError):
        gpusaver.load_checkpoint(prefix).get_tensor("s")


def test_both_reject_a_corrupt_index_block(small_bundle: tuple[str, dict[str, np.ndarray]]) -> None:
    prefix, _ = small_bundle
    _flip(prefix + ".index", 3)  # inside the header entry of the first data block
    with pytest.raises(tf.errors.OpError):
        tf.train.load_checkpoint(prefix).get_tensor("f")
    with pytest.raises(CorruptCheckpointError):
        gpusaver.load_checkpoint(prefix).get_tensor("f")


def test_both_reject_a_truncated_index(small_bundle: tuple[str, dict[str, np.ndarray]]) -> None:
    prefix, _ = small_bundle
    index = Path(prefix + ".index")
    index.write_bytes(index.read_bytes()[:-1])
    with pytest.raises(tf.errors.OpError):
        tf.train.load_checkpoint(prefix).get_tensor("f")
    with pytest.raises(CorruptCheckpointError):
        gpusaver.load_checkpoint(prefix).get_tensor("f")


def test_checkpoint_exists_agrees_with_tf(small_bundle: tuple[str, dict[str, np.ndarray]]) -> None:
    prefix, _ = small_bundle
    for path in (prefix, prefix + "-missing", os.path.dirname(prefix) + "/nothing/ckpt"):
        assert gpusaver.checkpoint_exists(path) == tf.compat.v1.train.checkpoint_exists(path), path


# ---------------------------------------------------------------------------- properties

DTYPE_CHOICES = [*golden.DTYPES.values(), np.dtype(object)]
NAME_ALPHABET = "abcxyzABZ0189_/.-\u00e9\u540d"
# The dtypes whose slices TF 2.21 can assemble or cut ("Dtype half not supported" otherwise:
# float16, the float8s, uint16/32/64 and strings are refused by its slice-copy code).
TF_SLICEABLE = {
    np.dtype(t)
    for t in ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool", "complex64", "complex128")
} | {golden.DTYPES["bfloat16"]}


@dataclasses.dataclass
class Bundle:
    """A SaveV2 call: its entries in order, and the full tensors they describe."""

    entries: list[Any]
    tensors: dict[str, np.ndarray]


def _split(draw: Any, name: str, full: np.ndarray) -> list[Any]:
    """Two slice entries of ``full``, cut along a random axis of size >= 2, in random order.

    The other dimensions are written as ``-`` or explicitly as ``0,n``, at random.
    """
    axis = draw(st.sampled_from([d for d, n in enumerate(full.shape) if n >= 2]))
    cut = draw(st.integers(1, full.shape[axis] - 1))
    specs = []
    for lo, hi in ((0, cut), (cut, full.shape[axis])):
        pieces = [
            f"{lo},{hi - lo}" if d == axis else draw(st.sampled_from(["-", f"0,{n}"]))
            for d, n in enumerate(full.shape)
        ]
        specs.append(":".join(pieces))
    if draw(st.booleans()):
        specs.reverse()
    return [
        golden.Entry(name, full[golden.slice_region(s, full.shape)].copy(), tuple(full.shape), s)
        for s in specs
    ]


@st.composite
def bundles(draw: Any) -> Bundle:
    """1 to 6 tensors of random dtypes (strings included) and shapes (scalars, empties).

    Tensors of a dtype TF can slice, with every dimension >= 1 and one >= 2, are
    sometimes saved as two slices.
    """
    names = draw(
        st.lists(st.text(NAME_ALPHABET, min_size=1, max_size=16), min_size=1, max_size=6, unique=True)
    )
    entries: list[Any] = []
    tensors: dict[str, np.ndarray] = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPE_CHOICES))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
        seed = draw(st.integers(0, 2**32 - 1))
        arr = golden.det_array(f"property/{seed}", dtype, shape)
        tensors[name] = arr
        splittable = dtype in TF_SLICEABLE and arr.ndim > 0 and min(arr.shape) >= 1 and max(arr.shape) >= 2
        if splittable and draw(st.booleans()):
            entries.extend(_split(draw, name, arr))
        else:
            entries.append(golden.Entry(name, arr))
    return Bundle(entries, tensors)


PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(bundle=bundles())
def test_property_tf_reads_what_we_write(tmp_path_factory: pytest.TempPathFactory, bundle: Bundle) -> None:
    prefix = str(tmp_path_factory.mktemp("prop_ours") / "ckpt")
    our_save(prefix, bundle.entries)
    assert_tf_reads(prefix, bundle.tensors)


@PROPERTY_SETTINGS
@given(bundle=bundles())
def test_property_we_read_what_tf_writes(tmp_path_factory: pytest.TempPathFactory, bundle: Bundle) -> None:
    prefix = str(tmp_path_factory.mktemp("prop_tf") / "ckpt")
    tf_save(prefix, bundle.entries)
    assert_we_read(prefix, bundle.tensors)


@PROPERTY_SETTINGS
@given(bundle=bundles())
def test_property_same_bytes_as_tf(tmp_path_factory: pytest.TempPathFactory, bundle: Bundle) -> None:
    root = tmp_path_factory.mktemp("prop_bytes")
    (root / "ours").mkdir()
    (root / "tf").mkdir()
    our_save(str(root / "ours" / "ckpt"), bundle.entries)
    tf_save(str(root / "tf" / "ckpt"), bundle.entries)
    assert_same_files(root / "ours", root / "tf", ["ckpt.index", "ckpt.data-00000-of-00001"])
