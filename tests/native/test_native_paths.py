"""The host batch paths (C extension) against their pure-Python twins, end to end.

Every test runs twice through the ``host_path`` fixture: with gpusaver's C
extension (``BundleWriter.add_many``'s packed runs, ``BundleReader.columns`` /
``fits`` / ``read_columns_into``) and with the pure-Python code. They check what
both paths guarantee: the same bytes on disk, the same values restored (bit for
bit), the same errors, raised before any array changes where the Saver promises
that. A few assertions hold only on the native path and say so.

Sizes are chosen around the batch paths' limits: 64 KiB (below it tensors are
packed on save and unpacked on restore), 1 MiB (the writer's segments) and 4 MiB
(pack staging buffers and restore chunks), and more than 8 MiB of small tensors
(several reader threads).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import gpusaver as gs
from gpusaver import config, native
from gpusaver._proto.tensor_bundle_pb2 import BundleEntryProto
from gpusaver.errors import (
    ChecksumError,
    CorruptCheckpointError,
    DTypeMismatchError,
    ShapeMismatchError,
    TensorNotFoundError,
)
from gpusaver.format import BundleReader, BundleWriter, data_filename, index_filename
from gpusaver.format.table import TableReader, encode_table

pytestmark = pytest.mark.usefixtures("host_path")

KIB = 1 << 10
MIB = 1 << 20
PACK_LIMIT = config.get("pack_limit")  # packed on save and unpacked on restore below this (64 KiB)
CHUNK = config.get("pack_bytes")  # pack staging buffers and restore chunks (4 MiB)

# --------------------------------------------------------------------- helpers


def bits(a: np.ndarray) -> Any:
    """An array's values as comparable bytes (native byte order, C order); lists for strings."""
    if a.dtype.kind == "O":
        return a.tolist()
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="), copy=False))
    return a.reshape(-1).view(np.uint8).tobytes()


def assert_bit_equal(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert bits(got) == bits(want), f"{what}: values differ"


def snapshot(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: bits(v) for k, v in arrays.items()}


def assert_untouched(arrays: dict[str, np.ndarray], before: dict[str, Any]) -> None:
    changed = [k for k, v in arrays.items() if bits(v) != before[k]]
    assert not changed, f"modified before the error: {changed[:8]}"


def fill(arrays: dict[str, np.ndarray], value: int = 0x5A) -> None:
    """Overwrites every array with a sentinel (bytes ``value``; b"?" for strings)."""
    for a in arrays.values():
        if a.dtype.kind == "O":
            a[...] = b"?"
        elif a.size:
            # works for views, Fortran order and byte-swapped arrays alike
            a[...] = np.frombuffer(bytes([value]) * a.dtype.itemsize, a.dtype)[0]


def like(a: np.ndarray, layout: str = "same") -> np.ndarray:
    """A fresh sentinel-filled destination for ``a``, in the given memory layout."""
    if a.dtype.kind == "O":
        out = np.empty(a.shape, object)
    elif layout == "view":  # a non-contiguous view into a larger buffer
        base = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        out = base[..., 1::2]
    elif layout == "fortran":
        out = np.asfortranarray(np.zeros(a.shape, a.dtype))
    elif layout == "swapped":
        out = np.zeros(a.shape, a.dtype.newbyteorder(">"))
    else:
        out = np.zeros(a.shape, a.dtype.newbyteorder("="))
    fill({"x": out})
    return out


def u8(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=np.uint8)


def on_cpus(arrays: dict[str, np.ndarray], n_devices: int) -> list[gs.Variable]:
    return [gs.Variable(a, name, device=f"/cpu:{i % n_devices}") for i, (name, a) in enumerate(arrays.items())]


def locate(prefix: str, name: str) -> tuple[str, int, int]:
    """``(data file, offset, size)`` of a stored tensor."""
    with BundleReader(prefix) as r:
        e = r.entry(name)
        return data_filename(prefix, e.shard_id, r.header.num_shards), e.offset, e.size


def flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def corrupt(prefix: str, name: str, where: int = 0) -> None:
    """Flips one byte of ``name``'s stored bytes (``where`` bytes in; negative: from its end)."""
    path, offset, size = locate(prefix, name)
    assert size > 0
    flip(path, offset + (where % size))


def rewrite_entry(prefix: str, name: str, **fields: int) -> None:
    """Rewrites one index entry's fields (e.g. ``size``), keeping the rest of the index."""
    with open(index_filename(prefix), "rb") as f:
        items = TableReader(f.read()).items()
    out = []
    for k, v in items:
        if k == name.encode():
            e = BundleEntryProto()
            e.ParseFromString(v)
            for field, value in fields.items():
                setattr(e, field, value)
            v = e.SerializeToString()
        out.append((k, v))
    with open(index_filename(prefix), "wb") as f:
        f.write(encode_table(out))


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != "checkpoint"}


def other_path(host_path: str) -> str:
    return "python" if host_path == "native" else "native"


class on_path:
    """Runs a block on one host path (``"native"`` or ``"python"``), then puts the previous back."""

    def __init__(self, which: str) -> None:
        self.which = which

    def __enter__(self) -> None:
        if self.which == "native" and not native.available():
            pytest.skip(f"the C extension is not built: {native.reason}")
        self.before = native.lib
        native.use(self.which == "native")

    def __exit__(self, *exc: Any) -> None:
        native.lib = self.before


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return -1


def mixed(seed: int = 0) -> dict[str, np.ndarray]:
    """Every kind of tensor: dtypes, ranks, sizes around 64 KiB and 1 MiB, 0-d, zero-size."""
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((7, 11)).astype(np.float32),
        "f64_scalar": np.array(rng.standard_normal(), np.float64),
        "i64": rng.integers(-(2**62), 2**62, (5, 3), dtype=np.int64),
        "bool": rng.random((9,)) < 0.5,
        "c64": (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64),
        "f16": rng.standard_normal((4, 4)).astype(np.float16),
        "bf16": rng.standard_normal((33, 7)).astype(ml_dtypes.bfloat16),
        "f8": rng.standard_normal((100,)).astype(ml_dtypes.float8_e4m3fn),
        "f8e5": rng.standard_normal((10, 3)).astype(ml_dtypes.float8_e5m2),
        "i4": rng.integers(-8, 8, (17,)).astype(ml_dtypes.int4),
        "u4": rng.integers(0, 16, (3, 5)).astype(ml_dtypes.uint4),
        "empty": np.zeros((0, 5), np.float32),
        "empty_scalarish": np.zeros((3, 0, 2), np.int8),
        "u8_65535": u8(rng, 65535),
        "u8_65536": u8(rng, 65536),
        "u8_65537": u8(rng, 65537),
        "f32_1mib": rng.standard_normal(MIB // 4).astype(np.float32),
        "u8_1mib_plus": u8(rng, MIB + 1),
        "strings": np.array([b"alpha", b"", b"\x00\xff" * 3000, "uni\u00e9".encode()], dtype=object),
        "u16": rng.integers(0, 2**16, (2, 3, 4), dtype=np.uint16),
        "u64": rng.integers(0, 2**63, (8,), dtype=np.uint64),
        "tail": np.array([1], np.int32),
    }


# ------------------------------------------------------------ values restored


def test_mixed_checkpoint_round_trips_bit_exactly_through_every_layout(tmp_path: Path) -> None:
    saved = mixed(1)
    rng = np.random.default_rng(1)
    base = rng.standard_normal((64, 300))
    saved["src_view"] = base[:, ::3]  # saved from a non-contiguous view
    saved["src_fortran"] = np.asfortranarray(rng.standard_normal((40, 30)))
    saved["src_swapped"] = rng.standard_normal((1000,)).astype(">f4")
    saved["src_swapped_view"] = rng.standard_normal((50, 40)).astype(">f8")[::2, 1::3]
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    # Most destinations fit the batch path; a few take the general path.
    layouts = {"f32": "view", "u8_65537": "view", "i64": "fortran", "f32_1mib": "swapped", "c64": "swapped"}
    targets = {k: like(v, layouts.get(k, "same")) for k, v in saved.items()}
    gs.Saver(targets).restore(prefix)
    for k in saved:
        assert_bit_equal(targets[k], saved[k], k)
    assert targets["f32"].flags.c_contiguous is False and targets["f32_1mib"].dtype.byteorder == ">"


def test_restore_into_the_saved_arrays_themselves(tmp_path: Path) -> None:
    arrays = mixed(2)
    want = {k: v.copy() for k, v in arrays.items()}
    saver = gs.Saver(arrays)
    prefix = saver.save(str(tmp_path / "m"))
    fill(arrays)
    saver.restore(prefix)
    for k in arrays:
        assert_bit_equal(arrays[k], want[k], k)


@pytest.mark.parametrize("shape", [(6, 4), (24,), (2, 3, 4), (1, 24, 1)])
def test_reshape_restores_into_another_shape_with_the_same_count(shape: tuple[int, ...], tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    saved = {
        "w": rng.standard_normal((4, 6)).astype(np.float32),
        "big": rng.standard_normal((256, 128)).astype(np.float32),  # 128 KiB
        "s": np.array(5, np.int64),
        "keep": np.arange(24, dtype=np.int16).reshape(4, 6),
    }
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    targets = {
        "w": np.zeros(shape, np.float32),
        "big": np.zeros((128, 256), np.float32),
        "s": np.zeros((1, 1), np.int64),
        "keep": np.zeros((4, 6), np.int16),
    }
    before = snapshot(targets)
    with pytest.raises(ShapeMismatchError, match="reshape=True"):
        gs.Saver(targets).restore(prefix)
    assert_untouched(targets, before)
    gs.Saver(targets, reshape=True).restore(prefix)
    for k in saved:
        assert bits(targets[k]) == bits(saved[k]), k
    # a different element count is refused even with reshape=True, before any change
    targets["w"] = np.zeros((5, 5), np.float32)
    fill(targets)
    before = snapshot(targets)
    with pytest.raises(ShapeMismatchError):
        gs.Saver(targets, reshape=True).restore(prefix)
    assert_untouched(targets, before)


# ----------------------------------------------- checks before any array changes


@pytest.mark.parametrize("bad", ["read_only", "dtype", "shape", "missing", "string_dtype", "swapped_dtype"])
def test_check_errors_come_before_any_array_changes(bad: str, tmp_path: Path) -> None:
    saved = mixed(4)
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    layouts = {"f32": "view", "i64": "fortran", "u8_65536": "swapped"}
    targets = {k: like(v, layouts.get(k, "same")) for k, v in saved.items()}
    # the bad variable sits in the middle, between tensors that fit the batch path
    items = list(targets.items())
    mid = len(items) // 2
    if bad == "read_only":
        ro = like(saved["u8_65535"])
        ro.flags.writeable = False
        items = [(k, ro if k == "u8_65535" else v) for k, v in items]
        error: type[Exception] = ValueError
        culprit = "u8_65535"
    elif bad == "dtype":
        items = [(k, np.zeros(v.shape, np.float64) if k == "f16" else v) for k, v in items]
        error, culprit = DTypeMismatchError, "f16"
    elif bad == "shape":
        items = [(k, np.zeros((11, 7), np.float32) if k == "f32" else v) for k, v in items]
        error, culprit = ShapeMismatchError, "f32"
    elif bad == "missing":
        items.insert(mid, ("zz_missing", np.zeros(3, np.float32)))
        error, culprit = TensorNotFoundError, "zz_missing"
    elif bad == "string_dtype":
        items = [(k, np.zeros(4, np.int32) if k == "strings" else v) for k, v in items]
        error, culprit = DTypeMismatchError, "strings"
    else:  # a byte-swapped array of another dtype: the check compares values' dtypes
        items = [(k, np.zeros(v.shape, ">i8") if k == "u64" else v) for k, v in items]
        error, culprit = DTypeMismatchError, "u64"
    targets = dict(items)
    before = snapshot(targets)
    with pytest.raises(error) as info:
        gs.Saver(targets).restore(prefix)
    assert culprit in str(info.value)
    assert_untouched(targets, before)


@pytest.mark.parametrize("n_devices", [1, 3])
@pytest.mark.parametrize("cut", ["last_byte", "inside_small", "inside_large", "missing_file"])
def test_damaged_data_file_is_found_before_any_array_changes(cut: str, n_devices: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    saved: dict[str, np.ndarray] = {}
    for i in range(30):
        saved[f"s{i:02d}"] = rng.standard_normal(int(rng.integers(1, 4000))).astype(np.float32)
    saved["large"] = u8(rng, 200 * KIB)
    saved["z_small"] = u8(rng, 100)
    prefix = gs.Saver(on_cpus(saved, n_devices), sharded=True).save(str(tmp_path / "m"))
    victim = {"last_byte": "z_small", "inside_small": "s10", "inside_large": "large", "missing_file": "large"}[cut]
    path, offset, size = locate(prefix, victim)
    if cut == "missing_file":
        os.remove(path)
    else:
        os.truncate(path, offset + size - (1 if cut == "last_byte" else size // 2))
    targets = {k: like(v) for k, v in saved.items()}
    before = snapshot(targets)
    with pytest.raises(CorruptCheckpointError) as info:
        gs.Saver(on_cpus(targets, n_devices)).restore(prefix)
    assert not isinstance(info.value, ChecksumError)
    assert_untouched(targets, before)


@pytest.mark.parametrize("which", ["numeric", "string"])
def test_corrupt_entry_size_is_found_before_any_array_changes(
    which: str, tmp_path: Path, host_path: str
) -> None:
    rng = np.random.default_rng(6)
    saved = {
        "a": rng.standard_normal(100).astype(np.float32),
        "b": rng.standard_normal(50).astype(np.float32),
        "s": np.array([b"one", b"two", b"three"], dtype=object),
        "c": rng.standard_normal(20000).astype(np.float32),
    }
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    if which == "numeric":
        rewrite_entry(prefix, "b", size=50 * 4 - 4)  # still inside the file: only the size is wrong
    else:
        rewrite_entry(prefix, "s", size=3)  # too small for 3 strings' lengths and crc
    targets = {k: like(v) for k, v in saved.items()}  # the string variable too: checked before any read
    before = snapshot(targets)
    with pytest.raises(CorruptCheckpointError, match="invalid size|cannot hold"):
        gs.Saver(targets).restore(prefix)
    assert_untouched(targets, before)


@pytest.mark.parametrize("offset", [2**63 - 50, 2**63 - 1])
def test_entry_offset_near_int64_max_is_corrupt_before_any_array_changes(
    offset: int, tmp_path: Path, host_path: str
) -> None:
    saved = {"a": np.arange(100, dtype=np.float32), "b": np.arange(25, dtype=np.float32)}
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    rewrite_entry(prefix, "b", offset=offset)
    targets = {k: like(v) for k, v in saved.items()}
    before = snapshot(targets)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        gs.Saver(targets).restore(prefix)
    assert_untouched(targets, before)


@pytest.mark.parametrize("second", ["missing", "dtype"])
def test_missing_data_file_does_not_hide_a_variable_error(
    second: str, tmp_path: Path, host_path: str
) -> None:
    a, b = np.arange(10, dtype=np.float32), np.arange(10, dtype=np.float32) + 1
    prefix = gs.Saver([gs.Variable(a, "a", "/cpu:0"), gs.Variable(b, "b", "/cpu:1")], sharded=True).save(
        str(tmp_path / "m")
    )
    os.remove(data_filename(prefix, 1, 2))
    if second == "missing":
        targets = {"a": np.zeros(10, np.float32), "b": np.zeros(10, np.float32), "zz": np.zeros(1, np.float32)}
        error: type[Exception] = TensorNotFoundError
    else:
        targets = {"a": np.zeros(10, np.float64), "b": np.zeros(10, np.float32)}
        error = DTypeMismatchError
    with pytest.raises(error):
        gs.Saver(targets).restore(prefix)


def test_partitioned_and_quantized_entries_take_the_general_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(24)
    full = rng.standard_normal((10, 4)).astype(np.float32)
    plain = {f"p{i}": u8(rng, int(n)) for i, n in enumerate([10, PACK_LIMIT, 300, 0])}
    q = rng.integers(-128, 128, 64).astype(np.int8)
    prefix = str(tmp_path / "m")
    w = BundleWriter(prefix, durable=False)
    w.add_many(list(plain) + ["q"], list(plain.values()) + [q])
    w.add_slice("part", [10, 4], "0,6:-", full[:6])
    w.add_slice("part", [10, 4], "6,4:-", full[6:])
    w.finish()
    rewrite_entry(prefix, "q", dtype=11)  # DT_QINT8: read as int8
    targets = {k: like(v) for k, v in plain.items()}
    targets["part"] = like(full)
    targets["q"] = like(q)
    gs.Saver(targets).restore(prefix)
    for k, want in {**plain, "part": full, "q": q}.items():
        assert_bit_equal(targets[k], want, k)


def test_big_endian_checkpoint_restores_swapped_values(tmp_path: Path) -> None:
    from gpusaver._proto.tensor_bundle_pb2 import BundleHeaderProto

    want = {"a": np.arange(1, 5, dtype=np.float32), "b": np.arange(3, dtype=np.int64).reshape(3, 1)}
    stored = {k: v.astype(v.dtype.newbyteorder(">")).view(v.dtype) for k, v in want.items()}  # big-endian bytes
    prefix = gs.Saver(stored).save(str(tmp_path / "m"))
    with open(index_filename(prefix), "rb") as f:
        items = TableReader(f.read()).items()
    header = BundleHeaderProto()
    header.ParseFromString(items[0][1])
    header.endianness = BundleHeaderProto.BIG
    items[0] = (b"", header.SerializeToString())
    with open(index_filename(prefix), "wb") as f:
        f.write(encode_table(items))
    with BundleReader(prefix) as r:
        assert_bit_equal(r.get_tensor("a"), want["a"], "get_tensor")
    targets = {k: np.zeros_like(v) for k, v in want.items()}
    gs.Saver(targets).restore(prefix)
    for k in want:
        assert_bit_equal(targets[k], want[k], k)


# -------------------------------------------------------------------- checksums


def _checksum_setup(tmp_path: Path, sizes: list[int], seed: int) -> tuple[dict[str, np.ndarray], str]:
    rng = np.random.default_rng(seed)
    saved = {f"t{i:03d}": u8(rng, n) for i, n in enumerate(sizes)}
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    return saved, prefix


@pytest.mark.parametrize("where", [0, -1, 12345])
def test_corrupt_small_tensor_raises_checksum_error_naming_it(
    where: int, tmp_path: Path, host_path: str
) -> None:
    sizes = [100, 65535, 3000, 0, 777, 65535, 40000, 5, 200]
    saved, prefix = _checksum_setup(tmp_path, sizes, 7)
    corrupt(prefix, "t006", where)
    targets = {k: like(v) for k, v in saved.items()}
    before = snapshot(targets)
    with pytest.raises(ChecksumError) as info:
        gs.Saver(targets).restore(prefix)
    err = info.value
    assert err.tensor == "t006" and "'t006'" in str(err)
    assert err.path == data_filename(prefix, 0, 1)
    assert err.expected != err.actual
    for k in ["t000", "t001", "t002", "t003", "t004", "t005"]:  # earlier tensors hold checkpoint values
        assert_bit_equal(targets[k], saved[k], k)
    if host_path == "native":  # unpack verifies before it copies
        assert bits(targets["t006"]) == before["t006"]
    with gs.load_checkpoint(prefix) as reader, pytest.raises(ChecksumError):
        reader.get_tensor("t006")


@pytest.mark.parametrize("where", [0, -1, MIB + 3])
def test_corrupt_large_tensor_raises_checksum_error_naming_it(where: int, tmp_path: Path) -> None:
    sizes = [PACK_LIMIT, 3 * MIB, PACK_LIMIT + 1, 2 * MIB + 5, PACK_LIMIT * 3]
    saved, prefix = _checksum_setup(tmp_path, sizes, 8)
    corrupt(prefix, "t003", where)
    targets = {k: like(v) for k, v in saved.items()}
    with pytest.raises(ChecksumError) as info:
        gs.Saver(targets).restore(prefix)
    assert info.value.tensor == "t003"
    for k in ["t000", "t001", "t002"]:
        assert_bit_equal(targets[k], saved[k], k)


@pytest.mark.parametrize(
    "sizes, damaged, named, seed",
    [
        ([100, 2000, 200 * KIB, 300], ["t002"], "t002", 9),  # a large one after small ones
        ([100, 5000, 200 * KIB, 300], ["t001", "t002"], "t001", 10),  # a small one, then a large one
    ],
    ids=["large-after-small", "small-then-large"],
)
def test_checksum_error_names_the_first_damaged_and_restores_those_before(
    sizes: list[int], damaged: list[str], named: str, seed: int, tmp_path: Path
) -> None:
    """The batch path reads large tensors first; the error is still the first damaged one in
    the Saver's order, and every tensor before it holds checkpoint values."""
    saved, prefix = _checksum_setup(tmp_path, sizes, seed)
    for name in damaged:
        corrupt(prefix, name, 17 if len(damaged) == 1 else 0)
    targets = {k: like(v) for k, v in saved.items()}
    with pytest.raises(ChecksumError) as info:
        gs.Saver(targets).restore(prefix)
    assert info.value.tensor == named
    for k in sorted(saved)[: sorted(saved).index(named)]:
        assert_bit_equal(targets[k], saved[k], k)


def test_corrupt_tensor_in_a_many_threaded_chunked_restore(tmp_path: Path, host_path: str) -> None:
    # 12 MiB of small tensors: read_columns_into splits the chunks over several threads
    rng = np.random.default_rng(11)
    sizes = [int(n) for n in rng.integers(40 * KIB, PACK_LIMIT, 240)]
    saved = {f"t{i:03d}": u8(rng, n) for i, n in enumerate(sizes)}
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    targets = {k: like(v) for k, v in saved.items()}
    gs.Saver(targets).restore(prefix)
    for k in saved:
        assert bits(targets[k]) == bits(saved[k]), k
    victim = "t150"
    corrupt(prefix, victim, -3)
    fill(targets)
    before = snapshot(targets)
    with pytest.raises(ChecksumError) as info:
        gs.Saver(targets).restore(prefix)
    assert info.value.tensor == victim
    # tensors of the chunks before the victim's are restored on both paths
    for k in list(saved)[:80]:
        assert_bit_equal(targets[k], saved[k], k)
    if host_path == "native":
        assert bits(targets[victim]) == before[victim]


@pytest.mark.parametrize("count", [130, 200, 260])  # 8.1, 12.5, 16.2 MiB: 3, 4, 5 chunks over the threads
def test_chunked_restore_over_several_threads_restores_every_chunk(count: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(count)
    saved = {f"t{i:03d}": u8(rng, PACK_LIMIT - 1) for i in range(count)}
    saved["last"] = u8(rng, 3)
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    targets = {k: like(v) for k, v in saved.items()}
    gs.Saver(targets).restore(prefix)
    for k in saved:
        assert bits(targets[k]) == bits(saved[k]), k


def test_two_corrupt_small_tensors_far_apart_the_first_is_named(tmp_path: Path) -> None:
    # 16 MiB of small tensors: the two damaged ones fall in different reader threads' parts
    rng = np.random.default_rng(23)
    saved = {f"t{i:03d}": u8(rng, PACK_LIMIT - 1) for i in range(260)}
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    corrupt(prefix, "t020", 5)
    corrupt(prefix, "t240", 5)
    targets = {k: like(v) for k, v in saved.items()}
    with pytest.raises(ChecksumError) as info:
        gs.Saver(targets).restore(prefix)
    assert info.value.tensor == "t020"
    for k in list(saved)[:20]:
        assert bits(targets[k]) == bits(saved[k]), k


# ------------------------------------------------- sizes around the batch limits


def _boundary_sizes() -> list[int]:
    sizes = [0, 1, PACK_LIMIT - 1, PACK_LIMIT, PACK_LIMIT + 1, 0, 7]
    sizes += [PACK_LIMIT - 1] * 64 + [64]  # 64 small tensors ending exactly on 4 MiB from the run's start
    sizes += [CHUNK // 64] * 63 + [CHUNK // 64 - 1, 1, 1]  # (16 KiB tensors: 4 MiB, then one byte across)
    sizes += [MIB - 1, MIB, MIB + 1, 0, CHUNK - 1, CHUNK, CHUNK + 1, 3]
    sizes += [PACK_LIMIT - 1] * 70  # a run of small tensors crossing 4 MiB
    return sizes


def test_sizes_straddling_the_pack_and_chunk_limits(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    saved = {f"t{i:03d}": u8(rng, n) for i, n in enumerate(_boundary_sizes())}
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    with BundleReader(prefix) as r:  # tensors lie back to back, in order
        offsets = [r.entry(k).offset for k in saved]
        ends = [r.entry(k).offset + r.entry(k).size for k in saved]
        assert offsets[0] == 0 and offsets[1:] == ends[:-1]
        assert ends[-1] == r.data_file_size(0)
    targets = {k: like(v) for k, v in saved.items()}
    gs.Saver(targets).restore(prefix)
    for k in saved:
        assert bits(targets[k]) == bits(saved[k]), k


@pytest.mark.parametrize("pattern", ["every_other", "gaps_around_64k", "sparse", "one"])
def test_restoring_a_subset_skips_the_bytes_in_between(pattern: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    sizes = [int(n) for n in rng.choice([0, 1, 100, 4000, 30000, PACK_LIMIT - 1, PACK_LIMIT, 70000], 160)]
    if pattern == "gaps_around_64k":  # gaps just below, at and above the reader's 64 KiB gap limit
        sizes = []
        for gap in [PACK_LIMIT - 1, PACK_LIMIT, PACK_LIMIT + 1, 100, 0, 2 * PACK_LIMIT] * 6:
            sizes += [300, gap, 5000]
    saved = {f"t{i:03d}": u8(rng, n) for i, n in enumerate(sizes)}
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    names = list(saved)
    if pattern == "every_other":
        keep = names[::2]
    elif pattern == "gaps_around_64k":
        keep = [n for i, n in enumerate(names) if i % 3 != 1]
    elif pattern == "sparse":
        keep = [n for n in names if rng.random() < 0.2]
    else:
        keep = [names[len(names) // 2]]
    rng.shuffle(keep)  # the Saver's order is not the file's
    targets = {k: like(saved[k]) for k in keep}
    gs.Saver(targets).restore(prefix)
    for k in keep:
        assert bits(targets[k]) == bits(saved[k]), k


def test_many_small_tensors_with_zero_size_ones_among_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    saved: dict[str, np.ndarray] = {}
    for i in range(3000):
        kind = i % 5
        if kind == 0:
            saved[f"v{i:04d}"] = np.zeros((int(rng.integers(0, 3)), 0), np.float32)
        elif kind == 1:
            saved[f"v{i:04d}"] = np.array(rng.standard_normal(), np.float32)  # 0-d
        else:
            saved[f"v{i:04d}"] = rng.standard_normal(int(rng.integers(1, 3000))).astype(np.float32)
    prefix = gs.Saver(saved).save(str(tmp_path / "m"))
    targets = {k: like(v) for k, v in saved.items()}
    gs.Saver(targets).restore(prefix)
    for k in saved:
        assert bits(targets[k]) == bits(saved[k]), k


# --------------------------------------------------------- shards and devices


@pytest.mark.parametrize(("save_devices", "sharded", "restore_devices"), [(4, True, 1), (1, False, 4), (4, True, 3), (3, False, 2)])
def test_checkpoints_restore_under_another_device_layout(
    save_devices: int, sharded: bool, restore_devices: int, tmp_path: Path
) -> None:
    rng = np.random.default_rng(15)
    saved = mixed(15)
    for i in range(40):
        saved[f"extra{i:02d}"] = u8(rng, int(rng.choice([0, 10, 5000, PACK_LIMIT - 1, PACK_LIMIT, 90000])))
    prefix = gs.Saver(on_cpus(saved, save_devices), sharded=sharded).save(str(tmp_path / "m"))
    with BundleReader(prefix) as r:
        assert r.header.num_shards == (save_devices if sharded else 1)
    names = list(saved)
    rng.shuffle(names)
    targets = {k: like(saved[k], "view" if k == "f32" else "same") for k in names}
    gs.Saver(on_cpus(targets, restore_devices), sharded=sharded).restore(prefix)
    for k in saved:
        assert_bit_equal(targets[k], saved[k], k)


@pytest.mark.parametrize("saver_path", ["native", "python"])
def test_checkpoints_cross_between_the_paths(saver_path: str, tmp_path: Path, host_path: str) -> None:
    """Written on one path (``saver_path``), restored on the fixture's."""
    saved = mixed(16)
    saved["view"] = np.random.default_rng(16).standard_normal((30, 40))[::3, ::2]
    with on_path(saver_path):
        prefix = gs.Saver(on_cpus(saved, 3), sharded=True).save(str(tmp_path / "m"))
    assert native.lib is (native._built if host_path == "native" else None)
    targets = {k: like(v, "fortran" if k == "i64" else "same") for k, v in saved.items()}
    gs.Saver(on_cpus(targets, 2)).restore(prefix)
    for k in saved:
        assert_bit_equal(targets[k], saved[k], k)


@pytest.mark.parametrize(("n_devices", "sharded"), [(1, False), (4, True), (3, False)])
def test_both_paths_write_byte_identical_files(
    n_devices: int, sharded: bool, tmp_path: Path, host_path: str
) -> None:
    rng = np.random.default_rng(17)
    arrays = mixed(17)
    arrays["view"] = rng.standard_normal((64, 300))[:, ::2]  # fallback: non-contiguous
    arrays["swapped"] = rng.standard_normal(3000).astype(">f4")  # fallback: big-endian
    arrays["swapped_view"] = rng.standard_normal((70, 80)).astype(">i8")[::2, ::-1]
    arrays["fortran"] = np.asfortranarray(rng.standard_normal((200, 90)))
    arrays["strings2"] = np.array([[b"x" * 70000, b""], [b"a", b"bc"]], dtype=object)
    for i in range(70):  # small tensors crossing a 4 MiB pack job
        arrays[f"run{i:02d}"] = u8(rng, PACK_LIMIT - 1 - i)
    arrays["u8_4mib"] = u8(rng, CHUNK)
    names = list(arrays)
    rng.shuffle(names)  # fallback tensors land between packed runs
    arrays = {k: arrays[k] for k in names}
    written = {}
    for which in (host_path, other_path(host_path)):
        directory = tmp_path / which
        directory.mkdir()
        with on_path(which):
            gs.Saver(on_cpus(arrays, n_devices), sharded=sharded).save(str(directory / "m"), global_step=3)
        written[which] = files_of(directory)
    assert sorted(written["native"]) == sorted(written["python"])
    for name in written["native"]:
        assert written["native"][name] == written["python"][name], name


# -------------------------------------------------- BundleWriter.add_many itself


def _write(prefix: str, names: list[Any], arrays: list[Any]) -> None:
    w = BundleWriter(prefix, durable=False)
    w.add_many(names, arrays)
    w.finish()


def test_add_many_bytes_and_str_names_and_one_array_under_two_names(tmp_path: Path, host_path: str) -> None:
    rng = np.random.default_rng(18)
    shared = rng.standard_normal(20000).astype(np.float32)  # 80 KB: written from its own memory
    small = np.arange(10, dtype=np.int16)
    arrays = [shared, small, shared, small, rng.standard_normal((3, 3))[:, ::2], np.array(7, np.uint8)]
    names_str = ["a", "b", "c/shared_again", "d\u00e9", "e_view", "f"]
    names_bytes = [n.encode() for n in names_str]
    _write(str(tmp_path / "s"), names_str, arrays)
    _write(str(tmp_path / "b"), names_bytes, arrays)
    with on_path(other_path(host_path)):
        _write(str(tmp_path / "o"), names_bytes, arrays)
    for suffix in (".index", ".data-00000-of-00001"):
        s = (tmp_path / f"s{suffix}").read_bytes()
        assert s == (tmp_path / f"b{suffix}").read_bytes() == (tmp_path / f"o{suffix}").read_bytes()
    with BundleReader(str(tmp_path / "b")) as r:
        for name, arr in zip(names_str, arrays):
            assert_bit_equal(r.get_tensor(name), arr, name)


@pytest.mark.parametrize("names", [["a", "b", "a"], ["a", b"a"], ["x", ""]])
def test_add_many_refuses_duplicate_and_empty_names(names: list[Any], tmp_path: Path) -> None:
    w = BundleWriter(str(tmp_path / "m"), durable=False)
    try:
        with pytest.raises(ValueError, match="duplicate|empty"):
            w.add_many(names, [np.zeros(3, np.float32) for _ in names])
    finally:
        w.abort()


def test_add_many_refuses_names_added_before(tmp_path: Path) -> None:
    w = BundleWriter(str(tmp_path / "m"), durable=False)
    try:
        w.add_many(["a", "b"], [np.zeros(3, np.float32), np.ones(2, np.int8)])
        w.add("c", np.zeros(1))
        for name in ("a", "c", b"b"):
            with pytest.raises(ValueError, match="duplicate"):
                w.add_many(["new", name], [np.zeros(1), np.zeros(1)])
        with pytest.raises(ValueError, match="duplicate"):
            w.add("b", np.zeros(1))
    finally:
        w.abort()


def test_add_slice_refuses_a_name_added_by_add_many(
    tmp_path: Path, host_path: str
) -> None:
    w = BundleWriter(str(tmp_path / "m"), durable=False)
    try:
        w.add_many(["w"], [np.zeros(4, np.float32)])
        with pytest.raises(ValueError, match="duplicate"):
            w.add_slice("w", [8], "0,4", np.zeros(4, np.float32))
    finally:
        w.abort()


def test_add_many_keeps_the_order_of_fallback_tensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(19)
    arrays: list[Any] = []
    for i in range(60):
        k = i % 6
        if k == 0:
            arrays.append(rng.standard_normal((8, 10))[:, ::2])
        elif k == 1:
            arrays.append(rng.standard_normal(100).astype(">f8"))
        elif k == 2:
            arrays.append(np.array([b"s%d" % i] * 3, dtype=object))
        elif k == 3:
            arrays.append([[1.5, 2.5]])  # not an ndarray
        else:
            arrays.append(u8(rng, int(rng.choice([5, PACK_LIMIT - 1, PACK_LIMIT + 3]))))
    names = [f"n{i:02d}" for i in range(60)]
    prefix = str(tmp_path / "m")
    w = BundleWriter(prefix, durable=False)
    w.add_many(names, arrays)
    w.finish()
    with BundleReader(prefix) as r:
        offsets = [r.entry(n).offset for n in names]
        assert offsets == sorted(offsets)
        for n, a in zip(names, arrays):
            want = np.asarray(a) if not isinstance(a, np.ndarray) else a
            assert_bit_equal(r.get_tensor(n), want, n)


# ---------------------------------------------------------------- concurrency


def test_two_threads_restore_one_checkpoint_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(20)
    saved = {f"t{i:03d}": u8(rng, int(n)) for i, n in enumerate(rng.integers(0, 90000, 200))}
    prefix = gs.Saver(on_cpus(saved, 2), sharded=True).save(str(tmp_path / "m"))
    failures: list[BaseException] = []
    results: list[dict[str, np.ndarray]] = []
    start = threading.Barrier(2)

    def work(seed: int) -> None:
        try:
            targets = {k: like(v) for k, v in saved.items()}
            saver = gs.Saver(on_cpus(targets, 1 + seed))
            start.wait()
            for _ in range(3):
                fill(targets, seed + 1)
                saver.restore(prefix)
            results.append(targets)
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(results) == 2
    for targets in results:
        for k in saved:
            assert bits(targets[k]) == bits(saved[k]), k


def test_saves_and_restores_leak_no_file_descriptors(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    saved = {f"t{i:02d}": u8(rng, int(n)) for i, n in enumerate(rng.integers(0, 100000, 40))}
    saver = gs.Saver(on_cpus(saved, 3), sharded=True, max_to_keep=2)
    targets = {k: like(v) for k, v in saved.items()}
    restorer = gs.Saver(on_cpus(targets, 2))
    prefix = saver.save(str(tmp_path / "m"), global_step=0)
    restorer.restore(prefix)
    before = open_fds()
    for step in range(1, 4):
        prefix = saver.save(str(tmp_path / "m"), global_step=step)
        restorer.restore(prefix)
    corrupt(prefix, "t05", 1)
    for _ in range(2):
        with pytest.raises(ChecksumError):
            restorer.restore(prefix)
    if before >= 0:
        assert open_fds() == before


def test_one_saver_restores_from_different_checkpoints_in_turn(tmp_path: Path) -> None:
    """The entry columns are cached by the key list's identity: never across checkpoints."""
    rng = np.random.default_rng(22)
    shapes = {"a": (3, 5), "b": (70000,), "c": ()}
    first = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    second = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    # the second checkpoint stores its tensors in another order, so offsets differ too
    p1 = gs.Saver(first).save(str(tmp_path / "one"))
    p2 = gs.Saver(dict(reversed(list(second.items())))).save(str(tmp_path / "two"))
    targets = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    saver = gs.Saver(targets)
    for prefix, want in [(p1, first), (p2, second), (p1, first), (p2, second)]:
        saver.restore(prefix)
        for k in shapes:
            assert_bit_equal(targets[k], want[k], k)


@pytest.mark.parametrize("big", [1 << 20, 400_000 * 4, 5 << 20], ids=["1MiB", "1.6MB", "5MiB"])
def test_small_adds_before_a_large_add_land_at_their_offsets(tmp_path: Path, big: int) -> None:
    # Regression: the pending batch of small tensors was queued at the offset past the large
    # tensor, so their bytes were never written where the index says (ChecksumError on read).
    rng = np.random.default_rng(3)
    arrays = {f"s{i}": rng.standard_normal(5).astype(np.float32) for i in range(3)}
    arrays["big"] = rng.integers(0, 255, big, dtype=np.uint8)
    arrays["after"] = rng.standard_normal(7).astype(np.float32)
    prefix = str(tmp_path / "ck")
    w = BundleWriter(prefix)
    for name, arr in arrays.items():
        w.add(name, arr)
    w.finish()
    with gs.load_checkpoint(prefix) as reader:
        for name, want in arrays.items():
            assert_bit_equal(reader.get_tensor(name), want, name)
