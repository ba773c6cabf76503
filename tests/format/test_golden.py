"""gpusaver against the golden checkpoints TensorFlow wrote (``tests/golden``).

No TensorFlow here: what each file must hold comes from ``tests/golden/cases.py``,
the same definitions ``tests/golden/generate.py`` handed to TensorFlow.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import CheckpointNotFoundError, GpuSaverError, TensorNotFoundError
from gpusaver.format import BundleReader, BundleWriter, merge_bundles
from gpusaver.format.table import TableReader, encode_table

# Every test runs on both host paths: the C extension and its pure-Python twin.
pytestmark = pytest.mark.usefixtures("host_path")

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
DATA = GOLDEN / "data"


from golden import cases as golden  # noqa: E402  (tests/golden, on the path beside this file)
CASES = list(golden.CASES.values())
SAVEV2_CASES = [c for c in CASES if c.kind == "savev2"]
SLICE_READS = [(c, name, spec) for c in CASES for name, spec in c.slice_reads]
INDEX_FILES = sorted(DATA.glob("*/*.index"))


def _prefix(case: Any) -> str:
    return str(DATA / case.name / case.prefix)


def _check_tensor(case: Any, name: str, got: object) -> str | None:
    """None when ``got`` is what ``cases.py`` says ``name`` holds, else why not."""
    expected = case.expected[name]
    if name in case.opaque:
        if not isinstance(got, np.ndarray) or got.dtype != expected.dtype or got.shape != expected.shape:
            return f"expected a {expected.dtype} array of shape {expected.shape}, got {got!r:.120}"
        if not isinstance(got.item(), bytes) or b"VARIABLE_VALUE" not in got.item():
            return f"not a serialized object graph: {got.item()!r:.120}"
        return None
    return golden.describe_difference(got, expected)


def _read_all(case: Any, get: Callable[[str], Any]) -> list[str]:
    failures = []
    for name in case.expected:
        try:
            diff = _check_tensor(case, name, get(name))
        except Exception as e:  # noqa: BLE001 - every failure is reported, not just the first
            diff = f"raised {type(e).__name__}: {e}"
        if diff is not None:
            failures.append(f"{case.name}/{name}: {diff}")
    return failures


def _write_entries(prefix: str, entries: Sequence[Any]) -> None:
    writer = BundleWriter(prefix, durable=False)
    for e in entries:
        if e.full_shape is None:
            writer.add(e.name, e.array)
        else:
            writer.add_slice(e.name, list(e.full_shape), e.slice_spec, e.array)
    writer.finish()


def _index_difference(ours: bytes, theirs: bytes) -> str | None:
    """None when equal; else the first differing table entry (or byte, if entries agree)."""
    if ours == theirs:
        return None
    diff = golden.describe_items_difference(
        TableReader.from_bytes(ours).items(), TableReader.from_bytes(theirs).items()
    )
    return diff or golden.describe_bytes_difference(ours, theirs, "index (same entries, other layout)")


# ---------------------------------------------------------------------------- files


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_files_present(case: Any) -> None:
    case_dir = DATA / case.name
    want = {f"{case.prefix}.index", *case.data_files} | ({"checkpoint"} if case.kind == "tf2" else set())
    assert {p.name for p in case_dir.iterdir()} == want


def test_golden_data_is_small() -> None:
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 3 * 1024 * 1024


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_load_checkpoint_reads_every_tensor(case: Any) -> None:
    reader = gpusaver.load_checkpoint(_prefix(case))
    failures = _read_all(case, reader.get_tensor)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bundle_reader_reads_every_tensor(case: Any) -> None:
    reader = BundleReader(_prefix(case))
    failures = _read_all(case, reader.get_tensor)
    assert not failures, "\n".join(failures[:20])
    assert all(reader.has_tensor(name) for name in case.expected)
    assert not reader.has_tensor("no/such/tensor")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_has_tensor(case: Any) -> None:
    reader = gpusaver.load_checkpoint(_prefix(case))
    missing = [name for name in case.expected if not reader.has_tensor(name)]
    assert not missing
    assert not reader.has_tensor("no/such/tensor")
    assert not reader.has_tensor("")  # the header key is not a tensor


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_shape_and_dtype_maps(case: Any) -> None:
    reader = gpusaver.load_checkpoint(_prefix(case))
    shapes = reader.get_variable_to_shape_map()
    assert shapes == {name: list(arr.shape) for name, arr in case.expected.items()}
    assert all(type(s) is list for s in shapes.values())
    dtypes = reader.get_variable_to_dtype_map()
    assert {n: np.dtype(d) for n, d in dtypes.items()} == case.dtype_map


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_list_variables_matches_tf(case: Any) -> None:
    # cases.listing is exactly what tf.train.list_variables returned (generate.py checks it).
    assert gpusaver.list_variables(_prefix(case)) == case.listing


def test_tf2_checkpoint_through_its_directory() -> None:
    case = golden.CASES["tf2_checkpoint"]
    directory = str(DATA / case.name)
    reader = gpusaver.load_checkpoint(directory)
    assert not _read_all(case, reader.get_tensor)
    assert gpusaver.list_variables(directory) == case.listing
    counter = reader.get_tensor("save_counter/.ATTRIBUTES/VARIABLE_VALUE")
    assert counter.dtype == np.int64 and counter.shape == () and counter == 1


def test_sliced_tensors_are_assembled() -> None:
    case = golden.CASES["slices"]
    reader = gpusaver.load_checkpoint(_prefix(case))
    for name in ("pv", "part", "big", "grid", "cube", "flags", "complex"):
        diff = golden.describe_difference(reader.get_tensor(name), case.expected[name])
        assert diff is None, f"{name}: {diff}"


@pytest.mark.parametrize(
    ("case", "name", "spec"), SLICE_READS, ids=[f"{c.name}-{n}-{s}" for c, n, s in SLICE_READS]
)
def test_read_slice(case: Any, name: str, spec: str) -> None:
    full = case.expected[name]
    got = BundleReader(_prefix(case)).read_slice(name, spec)
    diff = golden.describe_difference(got, full[golden.slice_region(spec, full.shape)])
    assert diff is None, diff


def test_missing_tensor() -> None:
    reader = gpusaver.load_checkpoint(_prefix(golden.CASES["dtypes"]))
    with pytest.raises(TensorNotFoundError) as info:
        reader.get_tensor("no/such/tensor")
    assert isinstance(info.value, KeyError)
    assert "no/such/tensor" in str(info.value)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        gpusaver.load_checkpoint(str(tmp_path / "nothing"))
    assert isinstance(info.value, FileNotFoundError)
    assert not gpusaver.checkpoint_exists(str(tmp_path / "nothing"))
    assert gpusaver.checkpoint_exists(_prefix(golden.CASES["dtypes"]))


def test_data_file_is_opened_by_header_shard_count(tmp_path: Path) -> None:
    # A merged bundle names its data files by the header's num_shards: with a
    # data file renamed away, a tensor stored there cannot be read.
    case = golden.CASES["merged"]
    shutil.copytree(DATA / case.name, tmp_path / case.name)
    prefix = str(tmp_path / case.name / case.prefix)
    (tmp_path / case.name / case.data_files[1]).rename(tmp_path / case.name / "elsewhere")
    reader = gpusaver.load_checkpoint(prefix)
    assert golden.bit_equal(reader.get_tensor("a"), case.expected["a"])  # in shard 0
    with pytest.raises(GpuSaverError, match="data-00001-of-00002"):
        reader.get_tensor("z")  # in shard 1


# ---------------------------------------------------------------------------- index table


@pytest.mark.parametrize("path", INDEX_FILES, ids=lambda p: p.parent.name)
def test_index_reencodes_byte_identical(path: Path) -> None:
    data = path.read_bytes()
    items = TableReader.from_bytes(data, str(path)).items()
    assert items[0][0] == b""
    keys = [k for k, _ in items]
    assert all(a < b for a, b in zip(keys, keys[1:])), "keys are not strictly increasing"
    diff = golden.describe_bytes_difference(encode_table(items), data, path.name)
    assert diff is None, diff


def test_every_case_has_an_index() -> None:
    assert sorted(p.parent.name for p in INDEX_FILES) == sorted(c.name for c in CASES)


def test_many_keys_index_spans_several_blocks() -> None:
    # Guards the case itself: the index must be big enough to need several data blocks.
    path = DATA / "many_keys" / "ckpt.index"
    assert path.stat().st_size > 3 * 262144
    items = TableReader.from_bytes(path.read_bytes()).items()
    assert len(items) == 1 + len(golden.CASES["many_keys"].expected)


# ---------------------------------------------------------------------------- writing


@pytest.mark.parametrize("case", SAVEV2_CASES, ids=lambda c: c.name)
def test_bundle_writer_reproduces_savev2(case: Any, tmp_path: Path) -> None:
    prefix = str(tmp_path / case.prefix)
    _write_entries(prefix, case.shards[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{case.prefix}.index", *case.data_files])
    theirs_dir = DATA / case.name
    data_name = case.data_files[0]
    diff = golden.describe_bytes_difference(
        (tmp_path / data_name).read_bytes(), (theirs_dir / data_name).read_bytes(), data_name
    )
    assert diff is None, diff
    index_name = f"{case.prefix}.index"
    diff = _index_difference((tmp_path / index_name).read_bytes(), (theirs_dir / index_name).read_bytes())
    assert diff is None, diff


def test_merge_bundles_reproduces_merge_v2_checkpoints(tmp_path: Path) -> None:
    case = golden.CASES["merged"]
    temp = tmp_path / f"{case.prefix}_temp"
    n = len(case.shards)
    parts = [str(temp / f"part-{i:05d}-of-{n:05d}") for i in range(n)]
    for part, entries in zip(parts, case.shards):
        _write_entries(part, entries)
    merge_bundles(parts, str(tmp_path / case.prefix))
    theirs_dir = DATA / case.name
    for data_name in case.data_files:
        diff = golden.describe_bytes_difference(
            (tmp_path / data_name).read_bytes(), (theirs_dir / data_name).read_bytes(), data_name
        )
        assert diff is None, diff
    index_name = f"{case.prefix}.index"
    diff = _index_difference((tmp_path / index_name).read_bytes(), (theirs_dir / index_name).read_bytes())
    assert diff is None, diff
    reader = gpusaver.load_checkpoint(str(tmp_path / case.prefix))
    assert not _read_all(case, reader.get_tensor)


def test_bundle_writer_round_trip_of_every_case(tmp_path: Path) -> None:
    # Every tensor of every case (the TF2 object graph aside), written by us, reads back.
    for case in CASES:
        prefix = str(tmp_path / case.name / "ckpt")
        writer = BundleWriter(prefix, durable=False)
        for name, arr in case.expected.items():
            if name not in case.opaque:
                writer.add(name, arr)
        writer.finish()
        reader = BundleReader(prefix)
        for name, arr in case.expected.items():
            if name not in case.opaque:
                diff = golden.describe_difference(reader.get_tensor(name), arr)
                assert diff is None, f"{case.name}/{name}: {diff}"
