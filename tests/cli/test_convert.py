"""``gpusaver.convert`` and ``gpusaver convert``: checkpoints to safetensors and back, bit for bit.

The real safetensors library is the oracle both ways (its torch and NumPy
loaders read what gpusaver writes; what its ``save_file`` functions write
gpusaver converts), Hugging Face's sharded layout is written by hand as the
Hub lays it out, and TensorFlow reads a checkpoint converted from safetensors.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpusaver import convert as cv
from gpusaver.cli import main
from gpusaver.errors import (
    BackendUnavailableError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ChecksumError,
    CorruptCheckpointError,
    GpuSaverError,
    InvalidArgumentError,
    UnsupportedDTypeError,
)
from gpusaver.format import BundleReader, BundleWriter, dtypes

#: The dtypes both formats hold that the installed safetensors writes (C64 and the fnuz
#: float8s only where it knows them).
WRITABLE = sorted(cv._writable_codes(safetensors))
NUMPY_LOADABLE = ["BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "F32", "F64"]

TORCH = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
}


def test_the_dtypes_the_issue_names_are_all_converted() -> None:
    must = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64",
            "F8_E4M3", "F8_E5M2"}
    assert must <= set(WRITABLE)
    assert cv.SAFETENSORS_DTYPES["F8_E4M3"] == np.dtype(ml_dtypes.float8_e4m3fn)
    assert cv.SAFETENSORS_DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    assert "C64" in WRITABLE  # safetensors >= 0.6 writes complex64; the installed one does


# ------------------------------------------------------------------ helpers
def raw_array(code: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    """An array of safetensors dtype ``code`` holding exactly ``data`` (bools as 0/1)."""
    dt = cv.SAFETENSORS_DTYPES[code]
    if code == "BOOL":
        data = bytes(b & 1 for b in data)
    return np.frombuffer(data, dtype=dt).reshape(shape).copy()


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_checkpoint(prefix: Path, tensors: dict[str, np.ndarray]) -> Path:
    w = BundleWriter(str(prefix), durable=False)
    for name, value in tensors.items():
        w.add(name, value)
    w.finish()
    return prefix


def assert_checkpoint_holds(prefix: Path, tensors: dict[str, np.ndarray]) -> None:
    """The checkpoint holds exactly these tensors: names, dtype enums, shapes and bytes."""
    with BundleReader(str(prefix)) as r:
        assert sorted(r.variables()) == sorted(tensors)
        for name, want in tensors.items():
            got = r.get_tensor(name)
            assert r.entry(name).dtype == dtypes.from_numpy(want.dtype), name
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert got.tobytes() == want.tobytes(), name


def header_of(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]], header_extra: Any = None) -> None:
    """A safetensors file written by hand from the documented layout (for dtypes no library writes)."""
    header: dict[str, Any] = {}
    data = b""
    for name, (code, shape, raw) in tensors.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if header_extra is not None:
        header.update(header_extra)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# --------------------------------------------------------- round trips, hypothesis
tensor_specs = st.lists(
    st.tuples(
        st.sampled_from(WRITABLE),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=tensor_specs, data=st.data())
def test_round_trip_is_bit_exact_and_safetensors_reads_it(specs: list[tuple[str, tuple[int, ...]]], data: st.DataObject) -> None:
    tensors: dict[str, np.ndarray] = {}
    for k, (code, shape) in enumerate(specs):
        n = int(np.prod(shape, dtype=np.int64)) * cv.SAFETENSORS_DTYPES[code].itemsize
        raw = data.draw(st.binary(min_size=n, max_size=n), label=f"bytes {k}")  # NaN payloads and all
        tensors[f"layer{k}/{code.lower()}"] = raw_array(code, shape, raw)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = write_checkpoint(root / "ck" / "model", tensors)
        result = cv.to_safetensors(str(src), str(root / "model.safetensors"))
        assert result.paths == (str(root / "model.safetensors"),)
        assert result.total_bytes == sum(t.nbytes for t in tensors.values())
        # The real library reads it: dtype codes, shapes and bytes.
        loaded = safetensors.torch.load_file(str(root / "model.safetensors"))
        assert sorted(loaded) == sorted(tensors)
        with safetensors.safe_open(str(root / "model.safetensors"), framework="pt") as f:
            for name, want in tensors.items():
                code = name.rsplit("/", 1)[1].upper()
                assert f.get_slice(name).get_dtype() == code
                assert tuple(loaded[name].shape) == want.shape
                assert loaded[name].dtype == TORCH[code]
                assert tensor_bytes(loaded[name]) == want.tobytes()
        back = cv.from_safetensors(str(root / "model.safetensors"), str(root / "back" / "model"))
        assert back.paths == (str(root / "back" / "model.data-00000-of-00001"), str(root / "back" / "model.index"))
        assert_checkpoint_holds(root / "back" / "model", tensors)


def test_numpy_loader_reads_what_we_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        code: raw_array(code, (2, 3), rng.integers(0, 256, 6 * cv.SAFETENSORS_DTYPES[code].itemsize, np.uint8).tobytes())
        for code in NUMPY_LOADABLE + ["C64"]
    }
    tensors["scalar"] = np.array(2.5, np.float32)
    tensors["empty"] = np.zeros((0, 4), np.int32)
    cv.to_safetensors(str(write_checkpoint(tmp_path / "model", tensors)), str(tmp_path / "out.safetensors"))
    loaded = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
    assert sorted(loaded) == sorted(tensors)
    for name, want in tensors.items():
        assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape, name
        assert loaded[name].tobytes() == want.tobytes(), name


def test_partitioned_tensor_is_written_whole(tmp_path: Path) -> None:
    w = BundleWriter(str(tmp_path / "model"), durable=False)
    w.add_slice("emb", [6, 2], "0,2:-", np.full((2, 2), 1, np.int64))
    w.add_slice("emb", [6, 2], "2,4:-", np.arange(8, dtype=np.int64).reshape(4, 2))
    w.add("w", np.ones(3, np.float16))
    w.finish()
    cv.to_safetensors(str(tmp_path / "model"), str(tmp_path / "out.safetensors"))
    loaded = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
    assert np.array_equal(loaded["emb"], np.concatenate([np.ones((2, 2), np.int64), np.arange(8).reshape(4, 2)]))
    assert loaded["emb"].dtype == np.int64 and loaded["w"].dtype == np.float16


@pytest.mark.usefixtures("host_path")
def test_unaligned_tensors_convert_on_both_host_paths(tmp_path: Path) -> None:
    """Offsets the layout allows but no library writes: a 3-byte tensor first puts the rest off alignment."""
    rng = np.random.default_rng(4)
    f64 = rng.standard_normal((5, 3))
    i16 = np.arange(-4, 4, dtype=np.int16)
    big = rng.integers(0, 256, 100_000, dtype=np.uint8).view(np.float32)  # past the small-tensor paths
    write_raw_safetensors(tmp_path / "odd.safetensors", {
        "u8": ("U8", [3], b"\x01\x02\x03"),
        "f64": ("F64", [5, 3], f64.tobytes()),
        "i16": ("I16", [2, 4], i16.tobytes()),
        "big": ("F32", [25_000], big.tobytes()),
        "none": ("BF16", [0, 2], b""),
    })
    cv.from_safetensors(str(tmp_path / "odd.safetensors"), str(tmp_path / "ck"))
    assert_checkpoint_holds(tmp_path / "ck", {
        "u8": np.array([1, 2, 3], np.uint8), "f64": f64, "i16": i16.reshape(2, 4), "big": big,
        "none": np.zeros((0, 2), ml_dtypes.bfloat16),
    })


# ----------------------------------------------------- what safetensors writes
def torch_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out: dict[str, torch.Tensor] = {}
    for code in WRITABLE:
        raw = torch.randint(0, 256, (3 * 4 * TORCH[code].itemsize,), dtype=torch.uint8, generator=g)
        if code == "BOOL":
            raw = raw & 1
        out[f"t/{code}"] = raw.view(TORCH[code]).reshape(3, 4)
    out["scalar"] = torch.tensor(7, dtype=torch.int64)
    out["empty"] = torch.zeros((2, 0), dtype=torch.bfloat16)
    return out


def test_we_convert_what_torch_save_file_writes(tmp_path: Path) -> None:
    tensors = torch_tensors()
    safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    result = cv.from_safetensors(str(tmp_path / "model.safetensors"), str(tmp_path / "ck" / "model"))
    assert sorted(result.tensors) == sorted(tensors)
    with BundleReader(str(tmp_path / "ck" / "model")) as r:
        for name, t in tensors.items():
            got = r.get_tensor(name)
            code = name.split("/")[-1] if name.startswith("t/") else {"scalar": "I64", "empty": "BF16"}[name]
            assert got.dtype == cv.SAFETENSORS_DTYPES[code], name
            assert got.shape == tuple(t.shape) and got.tobytes() == tensor_bytes(t), name


def test_we_convert_what_numpy_save_file_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tensors = {
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "bf16": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "e4m3": rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e4m3fn),
        "u64": rng.integers(0, 2**63, 3, dtype=np.uint64),
        "flag": np.array([True, False]),
        "zero_d": np.array(-0.0, np.float64),
    }
    safetensors.numpy.save_file(tensors, str(tmp_path / "np.safetensors"))
    cv.from_safetensors(str(tmp_path / "np.safetensors"), str(tmp_path / "ck"))
    assert_checkpoint_holds(tmp_path / "ck", tensors)


# --------------------------------------------------------- Hugging Face's sharded form
def write_hf_sharded(directory: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    """As huggingface_hub's save_torch_state_dict lays it out: shards, then the index."""
    directory.mkdir(parents=True)
    n = len(shards)
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        safetensors.torch.save_file(shard, str(directory / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def test_reads_hugging_face_sharded_form(tmp_path: Path) -> None:
    tensors = torch_tensors()
    names = sorted(tensors)
    shards = [{n: tensors[n] for n in names[:5]}, {n: tensors[n] for n in names[5:12]}, {n: tensors[n] for n in names[12:]}]
    write_hf_sharded(tmp_path / "hf", shards)
    for src in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors.index.json"):
        prefix = tmp_path / f"ck-{src.name}" / "model"
        result = cv.from_safetensors(str(src), str(prefix))
        assert sorted(result.tensors) == names
        with BundleReader(str(prefix)) as r:
            for name, t in tensors.items():
                assert r.get_tensor(name).tobytes() == tensor_bytes(t), name


def test_writes_hugging_face_sharded_form(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = {f"layers.{k}.weight": rng.standard_normal((10, 10)).astype(np.float32) for k in range(7)}  # 400 B each
    tensors["embed"] = rng.standard_normal((60, 10)).astype(ml_dtypes.bfloat16)  # 1200 B: larger than a shard
    src = write_checkpoint(tmp_path / "ck" / "model", tensors)
    result = cv.to_safetensors(str(src), str(tmp_path / "hf"), max_shard_size="1KB")
    # In name order: embed alone (over the limit), then two 400 B tensors per 1000 B shard.
    names = [p.name for p in map(Path, result.paths)]
    assert names == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)] + ["model.safetensors.index.json"]
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(names)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in tensors.values())}
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["weight_map"]["embed"] == "model-00001-of-00005.safetensors"
    for name in names[:-1]:
        with safetensors.safe_open(str(tmp_path / "hf" / name), framework="pt") as f:
            keys = set(f.keys())
        assert keys == {k for k, v in index["weight_map"].items() if v == name}
        assert sum(tensors[k].nbytes for k in keys) <= 1000 or len(keys) == 1
        for key, t in safetensors.torch.load_file(str(tmp_path / "hf" / name)).items():
            assert tensor_bytes(t) == tensors[key].tobytes()
    # ... and it reads back whole.
    cv.from_safetensors(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert_checkpoint_holds(tmp_path / "back", tensors)


def test_shards_are_cut_as_hugging_face_cuts_them() -> None:
    items = [cv._Out(f"t{k}", None, cv._BY_CODE["U8"], size) for k, size in enumerate([6, 6, 2, 6, 2, 2])]  # type: ignore[arg-type]
    shards = cv._split(items, 10)
    assert [[i.nbytes for i in s] for s in shards] == [[6], [6, 2], [6, 2, 2]]
    assert [[i.nbytes for i in s] for s in cv._split(items, 5)] == [[6], [6], [6], [2, 2], [2]]
    assert cv._split(items, None) == [items]


def test_a_directory_destination_without_a_size_is_one_model_file(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "model", {"w": np.ones(4, np.float32)})
    result = cv.to_safetensors(str(src), str(tmp_path / "hf") + "/")
    assert result.paths == (str(tmp_path / "hf" / "model.safetensors"),)
    assert os.listdir(tmp_path / "hf") == ["model.safetensors"]


def test_a_named_file_is_sharded_under_its_own_name(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "model", {"a": np.ones(100, np.uint8), "b": np.ones(100, np.uint8)})
    result = cv.to_safetensors(str(src), str(tmp_path / "out" / "net.safetensors"), max_shard_size=150)
    assert [Path(p).name for p in result.paths] == [
        "net-00001-of-00002.safetensors", "net-00002-of-00002.safetensors", "net.safetensors.index.json"]


@pytest.mark.parametrize(("text", "value"), [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5kb", 1500), ("100", 100), (4096, 4096),
])
def test_parse_size(text: Any, value: int) -> None:
    assert cv.parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "5XB", "-1GB", "0", 0, True, "GB"])
def test_parse_size_refuses(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        cv.parse_size(bad)


# ----------------------------------------------------------------- TensorFlow
@pytest.mark.tf
def test_tensorflow_reads_a_checkpoint_converted_from_safetensors(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    tensors = torch_tensors()
    tensors = {k: v for k, v in tensors.items() if "FNUZ" not in k}  # TensorFlow has no numpy type for these
    safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    cv.from_safetensors(str(tmp_path / "model.safetensors"), str(tmp_path / "ck" / "model"))
    reader = tf.train.load_checkpoint(str(tmp_path / "ck" / "model"))
    assert sorted(reader.get_variable_to_shape_map()) == sorted(tensors)
    dtype_map = reader.get_variable_to_dtype_map()
    for name, t in tensors.items():
        got = reader.get_tensor(name)
        assert got.shape == tuple(t.shape), name
        assert np.asarray(got).tobytes() == tensor_bytes(t), name
        code = name.split("/")[-1] if name.startswith("t/") else {"scalar": "I64", "empty": "BF16"}[name]
        assert dtype_map[name].as_numpy_dtype == cv.SAFETENSORS_DTYPES[code], name


# --------------------------------------------------------------------- errors
def test_a_string_tensor_is_refused_by_name_and_nothing_is_written(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "ck" / "model", {"w": np.ones(3, np.float32),
                                                     "vocab": np.array([b"a", b"bc"], dtype=object)})
    before = listing(tmp_path)
    for dst in (tmp_path / "out" / "m.safetensors", tmp_path / "hf"):
        with pytest.raises(UnsupportedDTypeError) as info:
            cv.to_safetensors(str(src), str(dst) + ("/" if dst.name == "hf" else ""))
        assert isinstance(info.value, GpuSaverError) and isinstance(info.value, TypeError)
        assert "'vocab'" in str(info.value) and "DT_STRING" in str(info.value)
    assert listing(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["ck"]


@pytest.mark.parametrize(("value", "what"), [
    (np.arange(3, dtype=np.complex128), "DT_COMPLEX128"),
    (np.arange(3).astype(ml_dtypes.int4), "DT_INT4"),
    (np.arange(3).astype(ml_dtypes.float8_e4m3b11fnuz), "DT_FLOAT8_E4M3B11FNUZ"),
])
def test_other_dtypes_safetensors_cannot_hold_are_refused(tmp_path: Path, value: np.ndarray, what: str) -> None:
    src = write_checkpoint(tmp_path / "model", {"odd": value})
    with pytest.raises(UnsupportedDTypeError, match=f"'odd'.*{what}"):
        cv.to_safetensors(str(src), str(tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists()


def test_skip_unsupported_warns_and_leaves_them_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_checkpoint(tmp_path / "model", {"w": np.ones(3, np.float32), "vocab": np.array([b"x"], dtype=object),
                                                "__metadata__": np.zeros(1, np.int8)})
    with pytest.warns(UserWarning) as record:
        result = cv.to_safetensors(str(src), str(tmp_path / "a.safetensors"), skip_unsupported=True)
    assert sorted(str(w.message).split(":")[0] for w in record) == [
        "skipped tensor '__metadata__'", "skipped tensor 'vocab'"]
    assert result.tensors == ("w",) and [n for n, _ in result.skipped] == ["__metadata__", "vocab"]
    assert list(safetensors.numpy.load_file(str(tmp_path / "a.safetensors"))) == ["w"]
    rc = main(["convert", "--skip-unsupported", str(src), str(tmp_path / "b.safetensors")])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "gpusaver convert: warning: skipped tensor 'vocab': string tensors (DT_STRING)" in err
    assert "1 tensor, 2 skipped" in out


def test_a_damaged_tensor_fails_the_conversion_and_leaves_nothing(tmp_path: Path) -> None:
    tensors = {f"t{k}": np.full(64, k, np.float32) for k in range(4)}
    src = write_checkpoint(tmp_path / "ck" / "model", tensors)
    with BundleReader(str(src)) as r:
        entry = r.entry("t3")  # in the last of the shards
    data = tmp_path / "ck" / "model.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 10] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError) as info:
        cv.to_safetensors(str(src), str(tmp_path / "hf" / "deep") + "/", max_shard_size=256)
    assert info.value.tensor == "t3"
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no shard, no temp file, no directory it made


def test_an_existing_destination_is_never_overwritten(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "model", {"w": np.ones(3, np.float32)})
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    with pytest.raises(CheckpointWriteError) as info:
        cv.to_safetensors(str(src), str(tmp_path / "out.safetensors"))
    assert info.value.errno == errno.EEXIST
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"
    # a stale shard of another model in the directory
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model-00001-of-00002.safetensors").write_bytes(b"old")
    with pytest.raises(CheckpointWriteError):
        cv.to_safetensors(str(src), str(tmp_path / "hf"))
    assert os.listdir(tmp_path / "hf") == ["model-00001-of-00002.safetensors"]
    # and the checkpoint side
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "x.safetensors"))
    before = (tmp_path / "model.index").read_bytes()
    with pytest.raises(CheckpointWriteError) as info:
        cv.from_safetensors(str(tmp_path / "x.safetensors"), str(tmp_path / "model"))
    assert info.value.errno == errno.EEXIST and (tmp_path / "model.index").read_bytes() == before


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        cv.to_safetensors(str(tmp_path / "missing"), str(tmp_path / "o.safetensors"))
    with pytest.raises(FileNotFoundError):
        cv.from_safetensors(str(tmp_path / "missing.safetensors"), str(tmp_path / "ck"))
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(InvalidArgumentError, match="which way"):
        cv.convert(str(tmp_path / "ck"), str(tmp_path / "notes.txt"))
    with pytest.raises(InvalidArgumentError, match="both"):
        cv.convert(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        cv.from_safetensors(str(tmp_path / "x.safetensors"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "x.safetensors"]


def test_malformed_safetensors_are_refused_before_writing(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    safetensors.numpy.save_file({"x": np.arange(4, dtype=np.float32)}, str(good))
    raw = good.read_bytes()
    cases = {
        "truncated": raw[:-3],
        "short": raw[:5],
        "huge header": struct.pack("<Q", 1 << 40) + raw[8:],
        "not json": struct.pack("<Q", 8) + b"{nope!!}" + raw[8:],
    }
    for what, data in cases.items():
        bad = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(CorruptCheckpointError):
            cv.from_safetensors(str(bad), str(tmp_path / "ck" / what.replace(" ", "_")))
    write_raw_safetensors(tmp_path / "size.safetensors", {"x": ("F32", [3], b"\0" * 8)})
    with pytest.raises(CorruptCheckpointError, match="needs 12 bytes"):
        cv.from_safetensors(str(tmp_path / "size.safetensors"), str(tmp_path / "ck" / "size"))
    assert not (tmp_path / "ck").exists()


def test_a_safetensors_dtype_tensorflow_lacks_is_refused_or_skipped(tmp_path: Path) -> None:
    path = tmp_path / "mx.safetensors"
    write_raw_safetensors(path, {"scale": ("F8_E8M0", [4], b"\x7f" * 4), "w": ("F32", [1], b"\0\0\x80\x3f")},
                          {"__metadata__": {"format": "pt"}})
    with pytest.raises(UnsupportedDTypeError, match="'scale'.*F8_E8M0"):
        cv.from_safetensors(str(path), str(tmp_path / "ck" / "a"))
    assert not (tmp_path / "ck").exists()
    with pytest.warns(UserWarning, match="skipped tensor 'scale'"):
        result = cv.from_safetensors(str(path), str(tmp_path / "ck" / "b"), skip_unsupported=True)
    assert result.tensors == ("w",) and result.skipped[0][0] == "scale"
    assert_checkpoint_holds(tmp_path / "ck" / "b", {"w": np.ones(1, np.float32)})


def test_an_inconsistent_index_is_refused(tmp_path: Path) -> None:
    shards = [{"a": torch.ones(2)}, {"b": torch.zeros(3)}]
    write_hf_sharded(tmp_path / "hf", shards)
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for weight_map, match in [
        ({"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}, "'b'"),
        ({"a": "model-00001-of-00002.safetensors", "b": "../model-00002-of-00002.safetensors"}, "beside the index"),
        ({"a": "model-00001-of-00002.safetensors", "b": "gone.safetensors"}, "missing"),
    ]:
        index_path.write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(CorruptCheckpointError, match=match):
            cv.from_safetensors(str(tmp_path / "hf"), str(tmp_path / "ck" / "m"))
    assert not (tmp_path / "ck").exists()


def test_missing_safetensors_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_checkpoint(tmp_path / "model", {"w": np.ones(3, np.float32)})
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    with pytest.raises(BackendUnavailableError, match=r"gpusaver\[safetensors\]"):
        cv.to_safetensors(str(src), str(tmp_path / "o.safetensors"))


# --------------------------------------------------------------- progress, CLI
def test_progress_is_reported_both_ways(tmp_path: Path) -> None:
    tensors = {f"t{k}": np.full(1000 * (k + 1), k, np.float64) for k in range(5)}
    src = write_checkpoint(tmp_path / "model", tensors)
    total = sum(t.nbytes for t in tensors.values())
    for run in (
        lambda cb: cv.to_safetensors(str(src), str(tmp_path / "o.safetensors"), progress=cb),
        lambda cb: cv.from_safetensors(str(tmp_path / "o.safetensors"), str(tmp_path / "back"), progress=cb),
    ):
        calls: list[tuple[int, int]] = []
        run(lambda done, all_: calls.append((done, all_)))
        assert calls and calls[-1] == (total, total)
        assert all(t == total for _, t in calls)
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_cli_converts_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3).astype(ml_dtypes.bfloat16)}
    src = write_checkpoint(tmp_path / "ck" / "model", tensors)
    (tmp_path / "ck" / "checkpoint").write_text('model_checkpoint_path: "model"\n')
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--max-shard-size", "20"]) == 0
    out, _ = capsys.readouterr()
    assert f"wrote {tmp_path / 'hf' / 'model.safetensors.index.json'}" in out
    assert out.splitlines()[-1].startswith(f"OK {tmp_path / 'ck'} -> {tmp_path / 'hf'}: 2 tensors, 30 bytes in 3 files")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back" / "model")]) == 0
    capsys.readouterr()
    assert_checkpoint_holds(tmp_path / "back" / "model", tensors)
    assert main(["diff", str(src), str(tmp_path / "back" / "model")]) == 0


def test_cli_exit_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_checkpoint(tmp_path / "model", {"s": np.array([b"x"], dtype=object)})
    assert main(["convert", str(src), str(tmp_path / "o.safetensors")]) == 1  # unsupported
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "o.safetensors")]) == 2  # missing
    (tmp_path / "notes.txt").write_text("a file")
    assert main(["convert", str(src), str(tmp_path / "notes.txt")]) == 2  # which way?
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--max-shard-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: cannot convert tensor 's' to safetensors" in err
    assert "invalid shard size 'lots'" in err
    assert not (tmp_path / "o.safetensors").exists()
