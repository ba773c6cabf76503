"""The eager Saver, held to ``tf.compat.v1.train.Saver``'s documented behaviour.

Every test runs on NumPy arrays spread over virtual CPU devices (``/cpu:k``), so
sharding is exercised without a GPU; the ``xp`` fixture repeats the
backend-independent tests with CuPy arrays where a GPU is usable. TensorFlow is
only imported by the few ``tf``-marked tests that compare with its SaverDef.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest

import gpusaver as gs
from gpusaver._proto.saver_pb2 import SaverDef
from gpusaver import config
from gpusaver.errors import (
    CheckpointWriteError,
    ChecksumError,
    CorruptCheckpointError,
    DTypeMismatchError,
    ShapeMismatchError,
    StatePathConflictError,
    TensorNotFoundError,
    UnsupportedDTypeError,
)
from gpusaver.storage.fileops import PosixFileOps

# Every test runs on both host paths: the C extension and its pure-Python twin.
pytestmark = pytest.mark.usefixtures("host_path")

N_DEVICES = [1, 2, 4]
HOUR = 3600.0
Place = Callable[[ModuleType, dict[str, Any], int], list[gs.Variable]]

# ------------------------------------------------------------------------ helpers


def on_cpus(arrays: dict[str, np.ndarray], n_devices: int) -> list[gs.Variable]:
    """NumPy variables, the i-th on virtual device ``/cpu:(i % n_devices)``."""
    return [gs.Variable(a, name, device=f"/cpu:{i % n_devices}") for i, (name, a) in enumerate(arrays.items())]


def distinct_devices(xp: ModuleType, n: int) -> int:
    """How many device groups the ``place`` fixture makes for ``n`` requested devices."""
    return n if xp is np else min(n, int(xp.cuda.runtime.getDeviceCount()))


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy array as is; a CuPy array copied to the host."""
    return array if isinstance(array, np.ndarray) else array.get()


def _floats(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    values = rng.standard_normal(shape).astype(np.float32)
    flat = values.reshape(-1)
    specials = [np.nan, -0.0, np.inf, -np.inf]
    flat[: min(len(specials), flat.size)] = specials[: flat.size]
    return values.astype(dtype)


def sample_arrays(xp: ModuleType, seed: int = 0) -> dict[str, np.ndarray]:
    """Host arrays of many dtypes and layouts; the ones CuPy cannot hold only for NumPy."""
    rng = np.random.default_rng(seed)
    nan_payload = np.array([0x7FC00001, 0xFFC12345, 0x3F800000], np.uint32).view(np.float32)
    arrays: dict[str, np.ndarray] = {
        "f32": _floats(rng, (7, 5), np.float32),
        "f64": _floats(rng, (3, 4, 2), np.float64),
        "f16": _floats(rng, (9,), np.float16),
        "nan_payloads": nan_payload,
        "i8": rng.integers(-128, 128, (11,), dtype=np.int8),
        "i16": rng.integers(-(2**15), 2**15, (3, 3), dtype=np.int16),
        "i32": rng.integers(-(2**31), 2**31, (6,), dtype=np.int32),
        "i64": rng.integers(-(2**63), 2**63 - 1, (2, 5), dtype=np.int64),
        "u8": rng.integers(0, 256, (13,), dtype=np.uint8),
        "u16": rng.integers(0, 2**16, (4,), dtype=np.uint16),
        "u32": rng.integers(0, 2**32, (4,), dtype=np.uint32),
        "u64": rng.integers(0, 2**63, (4,), dtype=np.uint64) * np.uint64(2) + np.uint64(1),
        "bool": rng.random((5, 3)) > 0.5,
        "c64": (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64),
        "c128": rng.standard_normal((2, 2)) + 1j * rng.standard_normal((2, 2)),
        "scalar_f32": np.array(3.25, np.float32),
        "scalar_i64": np.array(-(2**40), np.int64),
        "empty": np.zeros((0,), np.float32),
        "empty_3d": np.zeros((3, 0, 2), np.int32),
        "big": _floats(rng, (300_000,), np.float32),  # above the writer's small-tensor threshold
        "dir/sub/name": rng.standard_normal((2, 3)).astype(np.float32),
        "ünïcödé/ß": np.arange(5, dtype=np.int16),
    }
    if xp is np:
        base = _floats(rng, (8, 10), np.float64)
        arrays.update(
            {
                "bf16": _floats(rng, (4, 6), ml_dtypes.bfloat16),
                "f8_e4m3fn": _floats(rng, (10,), ml_dtypes.float8_e4m3fn),
                "f8_e5m2": _floats(rng, (10,), ml_dtypes.float8_e5m2),
                "i4": rng.integers(-8, 8, (9,)).astype(ml_dtypes.int4),
                "u4": rng.integers(0, 16, (9,)).astype(ml_dtypes.uint4),
                "strings": np.array(
                    [[b"", b"a", b"\x00\xff\x80"], [b"x" * 300, "unicode ✓".encode(), b"z"]], dtype=object
                ),
                "scalar_string": np.array(b"a scalar string", dtype=object),
                "empty_strings": np.zeros((0, 2), dtype=object),
                "strided": base[:, ::3],
                "transposed": _floats(rng, (10, 8), np.float64).T,  # views of one buffer may not overlap
                "fortran": np.asfortranarray(_floats(rng, (5, 7), np.float32)),
                "big_endian_f32": _floats(rng, (6,), ">f4"),
                "big_endian_i64": rng.integers(-(2**62), 2**62, (3,)).astype(">i8"),
            }
        )
    return arrays


def snapshot(array: Any) -> np.ndarray:
    """A host copy that keeps dtype (byte order included) and values."""
    return np.array(to_numpy(array), copy=True)


def assert_bit_equal(got: Any, want: np.ndarray, name: str = "") -> None:
    got = to_numpy(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    if want.dtype.kind == "O":
        assert got.dtype.kind == "O", name

        def as_bytes(x: Any) -> bytes:
            return x.encode() if isinstance(x, str) else bytes(x)

        assert [as_bytes(x) for x in got.reshape(-1)] == [as_bytes(x) for x in want.reshape(-1)], name
        return
    little = want.dtype.newbyteorder("<")
    assert got.dtype.newbyteorder("<") == little, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert (
        np.ascontiguousarray(got.astype(little)).tobytes() == np.ascontiguousarray(want.astype(little)).tobytes()
    ), f"{name}: values differ"


def scramble(array: Any) -> None:
    """Overwrites an array in place with values unlike the saved ones."""
    if array.dtype.kind == "O":
        array[...] = b"scrambled"
    elif array.dtype.kind == "b":
        array[...] = ~array
    else:
        array[...] = 1


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def data_files(prefix: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(glob.escape(prefix) + ".data-*"))


def expected_data_files(name: str, n: int) -> list[str]:
    return [f"{name}.data-{k:05d}-of-{n:05d}" for k in range(n)]


def f32_vars(count: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"v{i}": rng.standard_normal((3, 2)).astype(np.float32) for i in range(count)}


def simple_saver(tmp_path: Path, n_devices: int = 2, **kwargs: Any) -> tuple[gs.Saver, dict[str, np.ndarray]]:
    arrays = f32_vars()
    return gs.Saver(on_cpus(arrays, n_devices), sharded=True, **kwargs), arrays


class Recorder(PosixFileOps):
    """Plain POSIX file operations that log every call, thread-safely."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.threads: list[str] = []  # the thread of each event
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()

    def _log(self, *event: str) -> None:
        with self._lock:
            self.events.append(event)
            self.threads.append(threading.current_thread().name)

    def kinds(self, kind: str) -> list[tuple[str, ...]]:
        return [e for e in self.events if e[0] == kind]

    def index_of(self, predicate: Callable[[tuple[str, ...]], bool]) -> list[int]:
        return [i for i, e in enumerate(self.events) if predicate(e)]

    def phase(self, name: str) -> None:
        self._log("phase", name)

    def create(self, path: str) -> int:
        fd = super().create(path)
        with self._lock:
            self._paths[fd] = path
        self._log("create", path)
        return fd

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self._log("fsync", self._paths.get(fd, "?"))

    def close(self, fd: int) -> None:
        path = self._paths.pop(fd, "?")
        super().close(fd)
        self._log("close", path)

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self._log("rename", src, dst)

    def remove(self, path: str) -> None:
        super().remove(path)
        self._log("remove", path)

    def mkdir(self, path: str) -> None:
        super().mkdir(path)
        self._log("mkdir", path)

    def rmtree(self, path: str) -> None:
        super().rmtree(path)
        self._log("rmtree", path)

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self._log("fsync_dir", path)


# ---------------------------------------------------------------- var_list forms


def test_var_list_as_dict_of_arrays_list_of_variables_and_dict_of_variables(tmp_path: Path) -> None:
    a, b = np.arange(3.0), np.arange(4, dtype=np.int32)
    by_dict = gs.Saver({"a": a, "b": b})
    by_list = gs.Saver([gs.Variable(a, "a"), gs.Variable(b, "b")])
    by_var_dict = gs.Saver({"a": gs.Variable(a, "ignored"), "b": gs.Variable(b)})
    for saver in (by_dict, by_list, by_var_dict):
        assert set(saver.variables) == {"a", "b"}
        assert saver.variables["a"] is a and saver.variables["b"] is b
    # The dict key names the variable (as in TensorFlow), whatever the Variable was called.
    prefix = by_var_dict.save(str(tmp_path / "m"))
    assert [n for n, _ in gs.list_variables(prefix)] == ["a", "b"]


def test_variable_default_devices_and_virtual_cpus() -> None:
    v = gs.Variable(np.zeros(2), name="v")
    assert v.device.canonical == "/job:localhost/replica:0/task:0/device:CPU:0"
    w = gs.Variable(np.zeros(2), name="w", device="/cpu:3")
    assert w.device.canonical == "/job:localhost/replica:0/task:0/device:CPU:3"
    assert v.name == "v" and v.shape == (2,) and v.dtype == np.float64


@pytest.mark.gpu
def test_cupy_variable_defaults_to_its_own_gpu() -> None:
    import cupy

    n = cupy.cuda.runtime.getDeviceCount()
    with cupy.cuda.Device(n - 1):
        arr = cupy.zeros(3)
    v = gs.Variable(arr, name="v")
    assert v.device.canonical == f"/job:localhost/replica:0/task:0/device:GPU:{n - 1}"
    with pytest.raises(ValueError):
        gs.Variable(arr, name="v", device="/cpu:0")


def test_duplicate_names_raise_value_error() -> None:
    a, b = np.zeros(2), np.ones(2)
    with pytest.raises(ValueError, match="same name"):
        gs.Saver([gs.Variable(a, "x"), gs.Variable(b, "x")])


def test_one_array_under_two_names_raises_value_error() -> None:
    a = np.zeros(2)
    with pytest.raises(ValueError):
        gs.Saver({"x": a, "y": a})
    with pytest.raises(ValueError):
        gs.Saver([gs.Variable(a, "x"), gs.Variable(a, "y", device="/cpu:1")])


def test_bad_var_list_entries() -> None:
    with pytest.raises(ValueError):
        gs.Saver([gs.Variable(np.zeros(2))])  # unnamed
    with pytest.raises(TypeError):
        gs.Saver([np.zeros(2)])  # a list holds Variables
    with pytest.raises(ValueError):
        gs.Saver({"": np.zeros(2)})
    with pytest.raises(ValueError):
        gs.Saver({3: np.zeros(2)})  # type: ignore[dict-item]
    with pytest.raises((TypeError, UnsupportedDTypeError)):
        gs.Saver({"v": [1.0, 2.0]})  # not an array
    with pytest.raises(UnsupportedDTypeError):
        gs.Saver({"v": np.zeros(2, "datetime64[s]")})
    with pytest.raises(TypeError):
        gs.Saver({"v": np.array([1, 2], dtype=object)})  # object arrays hold bytes or str


def test_empty_var_list_needs_allow_empty(tmp_path: Path) -> None:
    for var_list in (None, {}, []):
        with pytest.raises(ValueError):
            gs.Saver(var_list)
    for var_list in (None, {}, []):
        saver = gs.Saver(var_list, allow_empty=True)
        assert saver.save(str(tmp_path / "m")) is None
        assert saver.save(str(tmp_path / "m"), global_step=3) is None
        assert saver.restore(str(tmp_path / "does-not-exist")) is None
        assert saver.last_checkpoints == []
    assert listing(tmp_path) == []


def test_write_version_v1_is_rejected() -> None:
    with pytest.raises(ValueError):
        gs.Saver({"v": np.zeros(2)}, write_version=SaverDef.V1)
    with pytest.raises(ValueError):
        gs.Saver({"v": np.zeros(2)}, saver_def=SaverDef(version=SaverDef.V1))


# -------------------------------------------------------------------- round trips


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("n_devices", N_DEVICES)
def test_round_trip_in_place_bit_exact(
    xp: ModuleType, place: Place, n_devices: int, sharded: bool, tmp_path: Path
) -> None:
    host = sample_arrays(xp)
    expected = {k: snapshot(v) for k, v in host.items()}
    variables = place(xp, host, n_devices)
    saver = gs.Saver(variables, sharded=sharded)
    n = distinct_devices(xp, n_devices)
    assert len(saver.devices) == n

    prefix = saver.save(str(tmp_path / "model"))
    assert prefix == str(tmp_path / "model")
    n_files = n if sharded else 1
    assert listing(tmp_path) == sorted(["checkpoint", "model.index", *expected_data_files("model", n_files)])

    # The checkpoint holds the values (every read verified against its crc32c).
    with gs.load_checkpoint(prefix) as reader:
        assert sorted(reader.get_variable_to_shape_map()) == sorted(host)
        for name, want in expected.items():
            assert_bit_equal(reader.get_tensor(name), want, name)

    before = saver.variables
    for v in variables:
        scramble(v.value)
    saver.restore(prefix)
    after = saver.variables
    for v in variables:
        assert after[v.name] is v.value and before[v.name] is v.value
        assert_bit_equal(v.value, expected[v.name], v.name)


@pytest.mark.parametrize("n_devices", N_DEVICES)
def test_each_device_group_is_one_shard(n_devices: int, tmp_path: Path) -> None:
    arrays = {f"t{i}": np.full((2, 2), i, np.float32) for i in range(8)}
    variables = on_cpus(arrays, n_devices)
    saver = gs.Saver(variables, sharded=True)
    prefix = saver.save(str(tmp_path / "m"))
    assert data_files(prefix) == expected_data_files("m", n_devices)
    # Group k (devices sorted) is shard k.
    with gs.load_checkpoint(prefix) as reader:
        for v in variables:
            shard = saver.devices.index(v.device.canonical)
            assert reader.bundle.entry(v.name).shard_id == shard


@pytest.mark.parametrize("n_devices", N_DEVICES)
def test_unsharded_save_writes_one_data_file(n_devices: int, tmp_path: Path) -> None:
    saver = gs.Saver(on_cpus(f32_vars(), n_devices), sharded=False)
    prefix = saver.save(str(tmp_path / "m"))
    assert data_files(prefix) == ["m.data-00000-of-00001"]


@pytest.mark.parametrize("n_devices", N_DEVICES)
def test_non_contiguous_arrays_round_trip_and_restore_through_views(
    xp: ModuleType, n_devices: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Small chunks make the staging of non-contiguous arrays take many steps.
    overrides = config.set(host_chunk_bytes=64)
    request.addfinalizer(lambda: overrides.__exit__(None, None, None))
    rng = np.random.default_rng(5)
    bases = {f"base{i}": xp.asarray(rng.standard_normal((12, 9)).astype(np.float32)) for i in range(2 * n_devices)}
    views = {}
    for i in range(n_devices):  # two views of separate buffers: views of one buffer may not overlap
        views[f"strided{i}"] = bases[f"base{2 * i}"][1::2, ::3]
        views[f"transposed{i}"] = bases[f"base{2 * i + 1}"].T[2:5]
    variables = [
        gs.Variable(view, name, device=f"/cpu:{i % n_devices}") if xp is np else gs.Variable(view, name)
        for i, (name, view) in enumerate(views.items())
    ]
    expected = {k: snapshot(v) for k, v in views.items()}
    saver = gs.Saver(variables, sharded=True)
    prefix = saver.save(str(tmp_path / "m"))
    with gs.load_checkpoint(prefix) as reader:
        for name, want in expected.items():
            assert_bit_equal(reader.get_tensor(name), want, name)
    for base in bases.values():
        base[...] = -5
    saver.restore(prefix)
    for name, view in views.items():
        assert saver.variables[name] is view
        assert_bit_equal(view, expected[name], name)


def test_save_writes_straight_from_the_arrays(tmp_path: Path, host_path: str) -> None:
    """Large tensors go to the file from their own memory on both paths. Small ones
    (below the pack limit) do too in Python; the C extension packs them into a
    staging buffer instead, which costs less than one buffer object per tensor."""
    class Capture(PosixFileOps):
        def __init__(self, targets: dict[str, np.ndarray]) -> None:
            self.targets = targets
            self.hits: set[str] = set()
            self.lock = threading.Lock()

        def _see(self, buffers: Any) -> list[Any]:
            buffers = list(buffers)
            for buf in buffers:
                view = np.frombuffer(buf, np.uint8)
                for name, arr in self.targets.items():
                    if np.may_share_memory(view, arr):
                        with self.lock:
                            self.hits.add(name)
            return buffers

        def write(self, fd: int, buffers: Any) -> None:
            super().write(fd, self._see(buffers))

        def pwrite(self, fd: int, buffers: Any, offset: int) -> None:
            super().pwrite(fd, self._see(buffers), offset)

    arrays = {f"big{i}": np.full(1 << 19, i, np.float32) for i in range(4)}  # 2 MiB each
    arrays.update({f"small{i}": np.full(8, i, np.float32) for i in range(4)})
    ops = Capture(arrays)
    saver = gs.Saver(on_cpus(arrays, 4), sharded=True, fileops=ops)
    saver.save(str(tmp_path / "m"))
    direct = set(arrays) if host_path == "python" else {n for n in arrays if n.startswith("big")}
    assert ops.hits == direct, f"written from a copy: {sorted(direct - ops.hits)}, directly: {sorted(ops.hits - direct)}"
    saver.restore(str(tmp_path / "m"))


@pytest.mark.parametrize("n_devices", [2, 4])
def test_device_groups_are_written_concurrently(n_devices: int, tmp_path: Path) -> None:
    # Every shard's writer must be inside create() at once: sequential shards
    # would time out at the barrier and fail the save.
    class Rendezvous(PosixFileOps):
        def __init__(self) -> None:
            self.barrier = threading.Barrier(n_devices, timeout=300)  # a hang guard, not a speed bound
            self.threads: set[str] = set()

        def create(self, path: str) -> int:
            fd = super().create(path)
            if re.search(r"part-\d{5}-of-\d{5}\.data-", os.path.basename(path)):
                self.threads.add(threading.current_thread().name)
                self.barrier.wait()
            return fd

    ops = Rendezvous()
    saver = gs.Saver(on_cpus(f32_vars(count=2 * n_devices), n_devices), sharded=True, fileops=ops)
    prefix = saver.save(str(tmp_path / "m"))
    assert len(ops.threads) == n_devices
    assert data_files(prefix) == expected_data_files("m", n_devices)


# ------------------------------------------------------------- temp dir and commit


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("n_devices", N_DEVICES)
def test_temp_directory_naming_and_removal(n_devices: int, sharded: bool, tmp_path: Path) -> None:
    rec = Recorder()
    saver = gs.Saver(on_cpus(f32_vars(), n_devices), sharded=sharded, fileops=rec)
    prefix = saver.save(str(tmp_path / "m"), global_step=3)
    n = n_devices if sharded else 1

    mkdirs = [e[1] for e in rec.kinds("mkdir")]
    assert len(mkdirs) == 1
    temp = mkdirs[0]
    assert re.fullmatch(re.escape(prefix) + r"_temp_[0-9a-f]{32}", temp), temp
    created = [e[1] for e in rec.kinds("create")]
    for k in range(n):
        part = os.path.join(temp, f"part-{k:05d}-of-{n:05d}")
        assert any(p.startswith(part + ".data-") for p in created), part
    assert not any(re.search(rf"part-\d{{5}}-of-(?!{n:05d})", p) for p in created)
    assert ("rmtree", temp) in rec.events
    assert not os.path.exists(temp)
    assert not [p for p in os.listdir(tmp_path) if "_temp_" in p]

    # Data files land first, the index last (atomically, by rename).
    renames = [e for e in rec.kinds("rename") if os.path.dirname(e[2]) == str(tmp_path)]
    final_index = [i for i, e in enumerate(renames) if e[2] == prefix + ".index"]
    final_data = [i for i, e in enumerate(renames) if e[2].startswith(prefix + ".data-")]
    assert len(final_index) == 1 and len(final_data) == n
    assert max(final_data) < final_index[0]
    assert not any(e[1] == prefix + ".index" for e in rec.kinds("create"))

    # The coordinator that merges is the last device's worker.
    last_part = rec.index_of(
        lambda e: e[0] == "create" and os.path.basename(e[1]).startswith(f"part-{n - 1:05d}-of-{n:05d}.data-")
    )
    index_rename = rec.index_of(lambda e: e[0] == "rename" and e[2] == prefix + ".index")
    assert rec.threads[last_part[0]] == rec.threads[index_rename[0]]

    # Each save uses a temp directory of its own.
    saver.save(str(tmp_path / "m"), global_step=4)
    assert len({e[1] for e in rec.kinds("mkdir")}) == 2


def test_stale_temp_directories_are_cleaned_and_fresh_ones_kept(tmp_path: Path) -> None:
    stale = tmp_path / ("m_temp_" + "0" * 32)
    stale.mkdir()
    (stale / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"junk")
    old = time.time() - 48 * HOUR
    os.utime(stale, (old, old))
    fresh = tmp_path / ("other_temp_" + "1" * 32)
    fresh.mkdir()
    saver, _ = simple_saver(tmp_path)
    saver.save(str(tmp_path / "m"))
    assert not stale.exists()
    assert fresh.exists()


def test_failed_shard_commits_nothing_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    class FailSecondShard(PosixFileOps):
        armed = False

        def create(self, path: str) -> int:
            if self.armed and "part-00001-of-00002.data-" in path:
                raise OSError(28, "No space left on device", path)
            return super().create(path)

    ops = FailSecondShard()
    saver, arrays = simple_saver(tmp_path, 2, fileops=ops)
    good = saver.save(str(tmp_path / "m"), global_step=1)
    expected = {k: snapshot(v) for k, v in arrays.items()}
    state_before = (tmp_path / "checkpoint").read_bytes()
    ops.armed = True
    for v in arrays.values():
        v[...] = 42
    with pytest.raises(CheckpointWriteError) as info:
        saver.save(str(tmp_path / "m"), global_step=2)
    assert isinstance(info.value, OSError) and info.value.errno == 28
    assert listing(tmp_path) == sorted(["checkpoint", "m-1.index", *expected_data_files("m-1", 2)])
    assert (tmp_path / "checkpoint").read_bytes() == state_before
    assert saver.last_checkpoints == [good]
    saver.restore(good)
    for name, arr in arrays.items():
        assert_bit_equal(arr, expected[name], name)


# -------------------------------------------------------------------- durability


def _durable_names(rec: Recorder) -> set[str]:
    """Paths whose contents were fsynced, followed through later renames."""
    durable: set[str] = set()
    for event in rec.events:
        if event[0] == "fsync":
            durable.add(event[1])
        elif event[0] == "rename" and event[1] in durable:
            durable.add(event[2])
    return durable


@pytest.mark.parametrize("n_devices", N_DEVICES)
def test_durable_by_default_fsyncs_every_committed_file(
    n_devices: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    rec = Recorder()
    saver = gs.Saver(on_cpus(f32_vars(), n_devices), sharded=True, fileops=rec)
    prefix = saver.save(str(tmp_path / "m"))
    durable = _durable_names(rec)
    for path in [prefix + ".index", *(str(tmp_path / f) for f in data_files(prefix)), str(tmp_path / "checkpoint")]:
        assert path in durable, f"{path} was never fsynced"
    # The directory is fsynced after the index and after the state file appear.
    index_at = rec.index_of(lambda e: e[0] == "rename" and e[2] == prefix + ".index")[0]
    state_at = rec.index_of(lambda e: e[0] == "rename" and e[2] == str(tmp_path / "checkpoint"))[0]
    dir_syncs = rec.index_of(lambda e: e[0] == "fsync_dir" and os.path.abspath(e[1]) == str(tmp_path))
    assert any(i > index_at for i in dir_syncs) and any(i > state_at for i in dir_syncs)
    assert len(calls) >= len(rec.kinds("fsync")) >= n_devices + 2


@pytest.mark.parametrize("n_devices", N_DEVICES)
def test_durable_off_never_fsyncs(n_devices: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    rec = Recorder()
    saver = gs.Saver(on_cpus(f32_vars(), n_devices), sharded=True, durable=False, fileops=rec, max_to_keep=1)
    for step in range(3):
        prefix = saver.save(str(tmp_path / "m"), global_step=step)
    assert rec.kinds("fsync") == [] and rec.kinds("fsync_dir") == []
    assert calls == []
    assert gs.latest_checkpoint(str(tmp_path)) == prefix
    saver.restore(prefix)


# ------------------------------------------------------------------------- naming


@pytest.mark.parametrize(
    "step",
    [7, np.int64(7), np.int32(7), np.uint16(7), np.array(7), np.array(7, np.int32), np.array(7, np.uint64)],
    ids=repr,
)
def test_global_step_integers(step: Any, tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path)
    assert saver.save(str(tmp_path / "m"), global_step=step) == str(tmp_path / "m-7")
    assert (tmp_path / "m-7.index").exists()


def test_global_step_zero_and_large(tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path, max_to_keep=None)
    assert saver.save(str(tmp_path / "m"), global_step=0) == str(tmp_path / "m-0")
    assert saver.save(str(tmp_path / "m"), global_step=10**12) == str(tmp_path / f"m-{10**12}")


def test_global_step_device_scalar(xp: ModuleType, tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path)
    assert saver.save(str(tmp_path / "m"), global_step=xp.array(12)) == str(tmp_path / "m-12")


@pytest.mark.parametrize(
    "step",
    [7.0, "7", True, False, np.bool_(True), np.float32(7), np.array(7.0), np.array([7]), np.array(True), [7]],
    ids=repr,
)
def test_global_step_non_integers_raise_type_error_and_write_nothing(step: Any, tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path)
    with pytest.raises(TypeError):
        saver.save(str(tmp_path / "m"), global_step=step)
    assert listing(tmp_path) == []


def test_pad_step_number(tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path, pad_step_number=True, max_to_keep=None)
    assert saver.save(str(tmp_path / "m"), global_step=42) == str(tmp_path / "m-00000042")
    assert saver.save(str(tmp_path / "m"), global_step=np.int64(0)) == str(tmp_path / "m-00000000")
    assert saver.save(str(tmp_path / "m"), global_step=123456789) == str(tmp_path / "m-123456789")
    assert saver.save(str(tmp_path / "m")) == str(tmp_path / "m")
    assert (tmp_path / "m-00000042.index").exists()


def test_save_accepts_path_like_and_filename_default(tmp_path: Path) -> None:
    arrays = f32_vars()
    saver = gs.Saver(arrays, filename=str(tmp_path / "default"))
    assert saver.save(tmp_path / "m", global_step=1) == str(tmp_path / "m-1")
    assert saver.save() == str(tmp_path / "default")
    saver.restore()
    saver.restore(tmp_path / "m-1")
    with pytest.raises(ValueError):
        gs.Saver(arrays).save()


# --------------------------------------------------------------------- state file


def test_state_file_content_absolute_paths(tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path, max_to_keep=3)
    for step in (1, 2, 3, 4):
        saver.save(str(tmp_path / "m"), global_step=step)
    d = str(tmp_path)
    assert (tmp_path / "checkpoint").read_text() == (
        f'model_checkpoint_path: "{d}/m-4"\n'
        f'all_model_checkpoint_paths: "{d}/m-2"\n'
        f'all_model_checkpoint_paths: "{d}/m-3"\n'
        f'all_model_checkpoint_paths: "{d}/m-4"\n'
    )
    state = gs.get_checkpoint_state(d)
    assert state is not None
    assert state.model_checkpoint_path == f"{d}/m-4"
    assert list(state.all_model_checkpoint_paths) == saver.last_checkpoints == [f"{d}/m-{s}" for s in (2, 3, 4)]
    assert gs.latest_checkpoint(d) == f"{d}/m-4"


def test_state_file_with_save_relative_paths(tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path, max_to_keep=2, save_relative_paths=True)
    for step in (1, 2, 3):
        saver.save(str(tmp_path / "m"), global_step=step)
    assert (tmp_path / "checkpoint").read_text() == (
        'model_checkpoint_path: "m-3"\nall_model_checkpoint_paths: "m-2"\nall_model_checkpoint_paths: "m-3"\n'
    )
    assert saver.last_checkpoints == [str(tmp_path / "m-2"), str(tmp_path / "m-3")]
    assert gs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-3")
    # The directory can move: the relative state file still finds its checkpoints.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    os.rename(tmp_path, moved)
    try:
        assert gs.latest_checkpoint(str(moved)) == str(moved / "m-3")
    finally:
        os.rename(moved, tmp_path)


def test_state_file_with_a_relative_save_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("ckpt")
    saver = gs.Saver(f32_vars(), max_to_keep=2)
    assert saver.save("ckpt/m", global_step=1) == "ckpt/m-1"
    assert saver.save("ckpt/m", global_step=2) == "ckpt/m-2"
    assert (tmp_path / "ckpt" / "checkpoint").read_text() == (
        'model_checkpoint_path: "m-2"\nall_model_checkpoint_paths: "m-1"\nall_model_checkpoint_paths: "m-2"\n'
    )
    assert saver.last_checkpoints == ["ckpt/m-1", "ckpt/m-2"]
    assert gs.latest_checkpoint("ckpt") == os.path.join("ckpt", "m-2")


def test_state_file_is_replaced_atomically(tmp_path: Path) -> None:
    rec = Recorder()
    saver = gs.Saver(f32_vars(), fileops=rec)
    saver.save(str(tmp_path / "m"), global_step=1)
    state = str(tmp_path / "checkpoint")
    assert not any(e[1] == state for e in rec.kinds("create"))
    (into_state,) = [e for e in rec.kinds("rename") if e[2] == state]
    assert os.path.dirname(into_state[1]) == str(tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("checkpoint.")]


def test_latest_filename_and_write_state(tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path, max_to_keep=2)
    p1 = saver.save(str(tmp_path / "m"), global_step=1, latest_filename="my_state")
    assert (tmp_path / "my_state").exists() and not (tmp_path / "checkpoint").exists()
    assert gs.latest_checkpoint(str(tmp_path), latest_filename="my_state") == p1
    p2 = saver.save(str(tmp_path / "m"), global_step=2, write_state=False)
    assert (tmp_path / "m-2.index").exists()
    assert not (tmp_path / "checkpoint").exists()
    assert saver.last_checkpoints == [p1]  # write_state=False records nothing
    assert gs.latest_checkpoint(str(tmp_path), latest_filename="my_state") == p1
    saver.restore(p2)


@pytest.mark.parametrize("latest_filename", ["sub/checkpoint", "../checkpoint", "/tmp/checkpoint", "a/"])
def test_latest_filename_with_a_path_component_is_a_value_error(latest_filename: str, tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path)
    with pytest.raises(ValueError, match="path"):
        saver.save(str(tmp_path / "m"), latest_filename=latest_filename)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize(("save_name", "latest_filename"), [("checkpoint", None), ("model", "model")])
def test_latest_filename_colliding_with_save_path(
    save_name: str, latest_filename: str | None, sharded: bool, tmp_path: Path
) -> None:
    saver = gs.Saver(on_cpus(f32_vars(), 2), sharded=sharded)
    if sharded:
        # As TensorFlow (its testNameCollision): a V2 checkpoint's files are <prefix>.index and
        # <prefix>.data-*, so a prefix named like the state file collides with nothing.
        prefix = saver.save(str(tmp_path / save_name), latest_filename=latest_filename)
        assert gs.latest_checkpoint(str(tmp_path), latest_filename) == prefix
        saver.restore(prefix)
    else:
        for catch in (ValueError, StatePathConflictError):  # TensorFlow's unsharded Saver refuses it
            with pytest.raises(catch, match="collides"):
                saver.save(str(tmp_path / save_name), latest_filename=latest_filename)
        assert listing(tmp_path) == []
    # With a step the names differ: no collision.
    assert saver.save(str(tmp_path / save_name), global_step=1, latest_filename=latest_filename)


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("latest_filename", ["model.index", "model.data-00000-of-00001", "model.data-00001-of-00002"])
def test_state_file_named_like_a_file_of_the_checkpoint_is_refused(
    latest_filename: str, sharded: bool, tmp_path: Path
) -> None:
    saver = gs.Saver(on_cpus(f32_vars(), 2), sharded=sharded)
    with pytest.raises(StatePathConflictError, match="collides"):
        saver.save(str(tmp_path / "model"), latest_filename=latest_filename)
    assert listing(tmp_path) == []


def test_missing_parent_directory_is_a_value_error(tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path)
    with pytest.raises(ValueError, match="doesn't exist"):
        saver.save(str(tmp_path / "nope" / "m"), global_step=1)
    assert listing(tmp_path) == []


def test_save_path_that_is_a_directory_is_a_value_error(tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path)
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError):
        saver.save(str(tmp_path / "m"))
    (tmp_path / "n-3").mkdir()
    with pytest.raises(ValueError):
        saver.save(str(tmp_path / "n"), global_step=3)
    assert listing(tmp_path) == ["m", "n-3"]
    assert listing(tmp_path / "m") == [] and listing(tmp_path / "n-3") == []


# ---------------------------------------------------------------------- retention


def existing(paths: list[str]) -> list[str]:
    return [p for p in paths if gs.checkpoint_exists(p)]


@pytest.mark.parametrize("n_devices", N_DEVICES)
@pytest.mark.parametrize("max_to_keep", [1, 2, 3])
def test_max_to_keep_keeps_the_newest(max_to_keep: int, n_devices: int, tmp_path: Path) -> None:
    saver = gs.Saver(on_cpus(f32_vars(), n_devices), sharded=True, max_to_keep=max_to_keep)
    saved = []
    for step in range(6):
        saved.append(saver.save(str(tmp_path / "m"), global_step=step))
        kept = saved[-max_to_keep:]
        assert saver.last_checkpoints == kept
        assert existing(saved) == kept
        state = gs.get_checkpoint_state(str(tmp_path))
        assert state is not None and list(state.all_model_checkpoint_paths) == kept
    files = [f for f in listing(tmp_path) if f != "checkpoint"]
    n = distinct_devices(np, n_devices)
    names = [os.path.basename(p) for p in saved[-max_to_keep:]]
    assert files == sorted(f for name in names for f in [name + ".index", *expected_data_files(name, n)])


@pytest.mark.parametrize("max_to_keep", [None, 0])
def test_max_to_keep_none_or_zero_keeps_everything(max_to_keep: int | None, tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path, max_to_keep=max_to_keep)
    saved = [saver.save(str(tmp_path / "m"), global_step=s) for s in range(5)]
    assert existing(saved) == saved
    assert saver.last_checkpoints == []
    assert (tmp_path / "checkpoint").read_text() == (
        f'model_checkpoint_path: "{saved[-1]}"\nall_model_checkpoint_paths: "{saved[-1]}"\n'
    )


def test_retention_deletes_one_checkpoint_per_save_the_oldest(tmp_path: Path) -> None:
    writer, _ = simple_saver(tmp_path, max_to_keep=None)
    old = [writer.save(str(tmp_path / "old"), global_step=s, write_state=False) for s in range(4)]
    saver, _ = simple_saver(tmp_path, max_to_keep=2)
    now = time.time()
    saver.set_last_checkpoints_with_time([(p, now) for p in old])
    assert saver.last_checkpoints == old
    new1 = saver.save(str(tmp_path / "new"), global_step=1)
    # As TensorFlow's Saver: one over the limit is dropped per save, the oldest.
    assert saver.last_checkpoints == [*old[1:], new1]
    assert existing(old) == old[1:]
    new2 = saver.save(str(tmp_path / "new"), global_step=2)
    assert saver.last_checkpoints == [*old[2:], new1, new2]
    assert existing(old) == old[2:]


def test_saving_the_same_prefix_again_is_recorded_once(tmp_path: Path) -> None:
    saver, arrays = simple_saver(tmp_path, max_to_keep=2)
    a = saver.save(str(tmp_path / "a"))
    b = saver.save(str(tmp_path / "b"))
    arrays["v0"][...] = 9
    a2 = saver.save(str(tmp_path / "a"))
    assert a2 == a
    assert saver.last_checkpoints == [b, a]
    assert existing([a, b]) == [a, b]
    with gs.load_checkpoint(a) as reader:
        assert (reader.get_tensor("v0") == 9).all()
    c = saver.save(str(tmp_path / "c"))
    assert saver.last_checkpoints == [a, c]
    assert existing([a, b, c]) == [a, c]


def test_retention_never_touches_checkpoints_it_did_not_record(tmp_path: Path) -> None:
    other, _ = simple_saver(tmp_path, max_to_keep=None)
    foreign = [other.save(str(tmp_path / "foreign"), global_step=s) for s in range(3)]
    (tmp_path / "mine-0.data-00000-of-00009").write_bytes(b"not ours")  # looks like ours, is not
    (tmp_path / "notes.txt").write_text("keep me")
    saver, _ = simple_saver(tmp_path, max_to_keep=1)
    mine = [saver.save(str(tmp_path / "mine"), global_step=s) for s in range(1, 5)]
    assert existing(foreign) == foreign
    assert existing(mine) == mine[-1:]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "mine-0.data-00000-of-00009").exists()


def test_retention_runs_after_commit_and_state_file(tmp_path: Path) -> None:
    rec = Recorder()
    saver = gs.Saver(on_cpus(f32_vars(), 2), sharded=True, max_to_keep=1, fileops=rec)
    p1 = saver.save(str(tmp_path / "m"), global_step=1)
    rec.events.clear()
    rec.threads.clear()
    p2 = saver.save(str(tmp_path / "m"), global_step=2)
    index_at = rec.index_of(lambda e: e[0] == "rename" and e[2] == p2 + ".index")
    state_at = rec.index_of(lambda e: e[0] == "rename" and e[2] == str(tmp_path / "checkpoint"))
    removed_at = rec.index_of(lambda e: e[0] == "remove" and e[1].startswith(p1 + "."))
    assert len(index_at) == 1 and len(state_at) == 1 and removed_at
    assert index_at[0] < state_at[0] < min(removed_at)
    removed = {rec.events[i][1] for i in removed_at}
    assert removed == {p1 + ".index", *(str(tmp_path / f) for f in expected_data_files("m-1", 2))}
    # The index goes first, so the old checkpoint vanishes at once.
    assert rec.events[min(removed_at)][1] == p1 + ".index"
    assert not any(e[0] == "remove" and e[1].startswith(p2) for e in rec.events)


class Clock:
    """A stand-in for ``time.time`` that moves only when told."""

    def __init__(self) -> None:
        self.now = 1.7e9

    def __call__(self) -> float:
        return self.now

    def advance(self, hours: float) -> None:
        self.now += hours * HOUR


def test_keep_checkpoint_every_n_hours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    saver, _ = simple_saver(tmp_path, max_to_keep=2, keep_checkpoint_every_n_hours=2)

    def save(name: str) -> str:
        return saver.save(str(tmp_path / name))

    clock.advance(2.5)  # past the first two-hour mark
    s1 = save("s1")
    s2 = save("s2")
    assert saver.last_checkpoints == [s1, s2]
    s3 = save("s3")  # s1 drops out of the list but is old enough to keep for good
    assert saver.last_checkpoints == [s2, s3]
    s4 = save("s4")  # s2 is within the same two hours as s1: deleted
    assert saver.last_checkpoints == [s3, s4]
    assert existing([s1, s2, s3, s4]) == [s1, s3, s4]

    clock.advance(2.5)  # 5 h: the next mark is at 4 h
    s5 = save("s5")  # s3 (2.5 h) is before the 4 h mark: deleted
    s6 = save("s6")  # s4 (2.5 h): deleted
    s7 = save("s7")  # s5 (5 h) is past the 4 h mark: kept for good
    assert saver.last_checkpoints == [s6, s7]
    assert existing([s1, s2, s3, s4, s5, s6, s7]) == [s1, s5, s6, s7]


def test_keep_hours_with_set_last_checkpoints_with_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    writer, _ = simple_saver(tmp_path, max_to_keep=None)
    young = writer.save(str(tmp_path / "young"), write_state=False)
    aged = writer.save(str(tmp_path / "aged"), write_state=False)
    saver, _ = simple_saver(tmp_path, max_to_keep=1, keep_checkpoint_every_n_hours=1)
    start = clock.now
    # "aged" was taken 1.5 h after this saver's clock started; "young" only 0.5 h.
    saver.set_last_checkpoints_with_time([(young, start + 0.5 * HOUR), (aged, start + 1.5 * HOUR)])
    assert saver.last_checkpoints == [young, aged]
    clock.advance(2)
    n1 = saver.save(str(tmp_path / "n1"))
    assert not gs.checkpoint_exists(young)
    assert saver.last_checkpoints == [aged, n1]
    n2 = saver.save(str(tmp_path / "n2"))
    assert gs.checkpoint_exists(aged)  # kept for good
    assert saver.last_checkpoints == [n1, n2]
    with pytest.raises(TypeError):
        saver.set_last_checkpoints_with_time((young, 1.0))  # type: ignore[arg-type]


def test_default_keep_hours_keeps_nothing_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    saver, _ = simple_saver(tmp_path, max_to_keep=1)
    saved = []
    for step in range(4):
        clock.advance(24)
        saved.append(saver.save(str(tmp_path / "m"), global_step=step))
    assert existing(saved) == saved[-1:]


def test_recover_last_checkpoints(tmp_path: Path) -> None:
    first, _ = simple_saver(tmp_path, max_to_keep=5)
    saved = [first.save(str(tmp_path / "m"), global_step=s) for s in range(3)]
    stray, _ = simple_saver(tmp_path, max_to_keep=None)
    unrelated = stray.save(str(tmp_path / "unrelated"), write_state=False)

    restarted, _ = simple_saver(tmp_path, max_to_keep=3)
    state = gs.get_checkpoint_state(str(tmp_path))
    assert state is not None
    missing = str(tmp_path / "m-99")
    restarted.recover_last_checkpoints([*state.all_model_checkpoint_paths, missing])
    assert restarted.last_checkpoints == saved
    s3 = restarted.save(str(tmp_path / "m"), global_step=3)
    assert restarted.last_checkpoints == [*saved[1:], s3]
    assert existing(saved) == saved[1:]
    assert gs.checkpoint_exists(unrelated)
    state = gs.get_checkpoint_state(str(tmp_path))
    assert state is not None and list(state.all_model_checkpoint_paths) == [*saved[1:], s3]


def test_set_last_checkpoints(tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path, max_to_keep=1)
    a = saver.save(str(tmp_path / "a"))
    saver.set_last_checkpoints([])
    b = saver.save(str(tmp_path / "b"))
    assert gs.checkpoint_exists(a)  # forgotten, so never deleted
    assert saver.last_checkpoints == [b]
    with pytest.raises(TypeError):
        saver.set_last_checkpoints(b)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ restore


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "parallel"])
@pytest.mark.parametrize("n_devices", N_DEVICES)
def test_restore_from_latest_checkpoint(
    xp: ModuleType, place: Place, n_devices: int, sequential: bool, tmp_path: Path
) -> None:
    host = sample_arrays(xp, seed=3)
    variables = place(xp, host, n_devices)
    expected = {v.name: snapshot(v.value) for v in variables}
    saver = gs.Saver(variables, sharded=True, max_to_keep=2)
    saver.save(str(tmp_path / "m"), global_step=1)
    for v in variables:
        scramble(v.value)
    saver.save(str(tmp_path / "m"), global_step=2)  # the scrambled values
    scrambled = {v.name: snapshot(v.value) for v in variables}

    restorer = gs.Saver(variables, sharded=True, restore_sequentially=sequential)
    restorer.restore(str(tmp_path / "m-1"))
    for v in variables:
        assert restorer.variables[v.name] is v.value
        assert_bit_equal(v.value, expected[v.name], v.name)
    restorer.restore(gs.latest_checkpoint(str(tmp_path)))
    for v in variables:
        assert_bit_equal(v.value, scrambled[v.name], v.name)


def test_restore_a_subset_of_the_checkpoint(tmp_path: Path) -> None:
    saver, arrays = simple_saver(tmp_path, 2)
    prefix = saver.save(str(tmp_path / "m"))
    target = np.zeros((3, 2), np.float32)
    gs.Saver({"v1": target}).restore(prefix)
    assert_bit_equal(target, arrays["v1"])


@pytest.mark.parametrize("shape", [(2, 6), (12,), (1, 3, 4)])
def test_reshape_restores_same_element_count(shape: tuple[int, ...], tmp_path: Path) -> None:
    source = np.arange(12, dtype=np.float32).reshape(3, 4)
    gs.Saver({"w": source}).save(str(tmp_path / "m"))
    target = np.zeros(shape, np.float32)
    with pytest.raises(ShapeMismatchError, match="'w'"):
        gs.Saver({"w": target}).restore(str(tmp_path / "m"))
    gs.Saver({"w": target}, reshape=True).restore(str(tmp_path / "m"))
    assert_bit_equal(target, source.reshape(shape))


def test_restore_into_big_endian_and_fortran_arrays(tmp_path: Path) -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    gs.Saver({"a": values, "b": values.copy()}).save(str(tmp_path / "m"))
    be = np.zeros((2, 3), ">f4")
    fortran = np.asfortranarray(np.zeros((2, 3), np.float32))
    gs.Saver({"a": be, "b": fortran}).restore(str(tmp_path / "m"))
    assert (be == values).all() and (fortran == values).all()
    assert be.dtype == np.dtype(">f4") and fortran.flags.f_contiguous


def _restore_error_setup(
    tmp_path: Path, n_devices: int, bad: str
) -> tuple[gs.Saver, dict[str, np.ndarray], str, type[BaseException] | tuple[type[BaseException], ...]]:
    """A checkpoint, then a Saver over sentinel arrays whose LAST variable (on the last device) does not fit."""
    rng = np.random.default_rng(11)
    saved = {f"a{i}": rng.standard_normal((4, 3)).astype(np.float32) for i in range(2 * n_devices)}
    saved["zz_bad"] = rng.standard_normal((2, 3)).astype(np.float32)
    saved["zz_text"] = np.array([b"one", b"two"], dtype=object)
    prefix = gs.Saver(on_cpus(saved, n_devices), sharded=True).save(str(tmp_path / "m"))

    targets = {k: np.full(v.shape, -7.0, v.dtype) for k, v in saved.items() if k.startswith("a")}
    targets["zz_text"] = np.array([b"sentinel", b"sentinel"], dtype=object)
    reshape = False
    error: Any
    if bad == "missing":
        targets["zz_missing"], error = np.full(3, -7.0, np.float32), TensorNotFoundError
    elif bad == "dtype":
        targets["zz_bad"], error = np.full((2, 3), -7.0, np.float64), DTypeMismatchError
    elif bad == "string_dtype":
        targets["zz_bad"], error = np.array([[b"s"] * 3] * 2, dtype=object), DTypeMismatchError
    elif bad == "shape":
        targets["zz_bad"], error = np.full((3, 2), -7.0, np.float32), ShapeMismatchError
    elif bad == "element_count":
        targets["zz_bad"], error, reshape = np.full((7,), -7.0, np.float32), ShapeMismatchError, True
    elif bad == "read_only":
        arr = np.full((2, 3), -7.0, np.float32)
        arr.flags.writeable = False
        targets["zz_bad"], error = arr, ValueError
    else:
        raise AssertionError(bad)
    names = list(targets)
    variables = [
        gs.Variable(targets[k], k, device=f"/cpu:{n_devices - 1 if k.startswith('zz') else i % n_devices}")
        for i, k in enumerate(names)
    ]
    return gs.Saver(variables, sharded=True, reshape=reshape), targets, prefix, error


def _assert_untouched(targets: dict[str, np.ndarray], before: dict[str, np.ndarray]) -> None:
    for name, arr in targets.items():
        assert_bit_equal(arr, before[name], f"{name} was modified before the error")


@pytest.mark.parametrize("n_devices", N_DEVICES)
@pytest.mark.parametrize("bad", ["missing", "dtype", "string_dtype", "shape", "element_count", "read_only"])
def test_restore_errors_come_before_any_array_changes(bad: str, n_devices: int, tmp_path: Path) -> None:
    saver, targets, prefix, error = _restore_error_setup(tmp_path, n_devices, bad)
    before = {k: snapshot(v) for k, v in targets.items()}
    with pytest.raises(error) as info:
        saver.restore(prefix)
    bad_name = "zz_missing" if bad == "missing" else "zz_bad"
    assert bad_name in str(info.value)
    _assert_untouched(targets, before)


@pytest.mark.parametrize("n_devices", N_DEVICES)
@pytest.mark.parametrize("damage", ["missing_data_file", "truncated_data_file"])
def test_damaged_data_files_are_found_before_any_array_changes(damage: str, n_devices: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    saved = {f"a{i}": rng.standard_normal((64,)).astype(np.float32) for i in range(n_devices)}
    variables = on_cpus(saved, n_devices)
    saver = gs.Saver(variables, sharded=True)
    prefix = saver.save(str(tmp_path / "m"))
    last = str(tmp_path / expected_data_files("m", n_devices)[-1])
    if damage == "missing_data_file":
        os.remove(last)
    else:
        os.truncate(last, os.path.getsize(last) - 8)
    for v in variables:
        v.value[...] = -7
    before = {v.name: snapshot(v.value) for v in variables}
    with pytest.raises(CorruptCheckpointError):
        saver.restore(prefix)
    _assert_untouched({v.name: v.value for v in variables}, before)


@pytest.mark.parametrize("damage", ["missing_data_file", "truncated_data_file"])
def test_damaged_string_shard_is_found_before_any_array_changes(damage: str, tmp_path: Path) -> None:
    # The last device holds only a string tensor; the first a numeric one.
    numbers = np.arange(8, dtype=np.float32)
    text = np.array([b"alpha", b"beta", b"gamma"], dtype=object)
    variables = [gs.Variable(numbers, "numbers", "/cpu:0"), gs.Variable(text, "text", "/cpu:1")]
    saver = gs.Saver(variables, sharded=True)
    prefix = saver.save(str(tmp_path / "m"))
    last = str(tmp_path / "m.data-00001-of-00002")
    if damage == "missing_data_file":
        os.remove(last)
    else:
        os.truncate(last, 3)
    numbers[...] = -7
    text[...] = b"sentinel"
    before = {"numbers": snapshot(numbers), "text": snapshot(text)}
    with pytest.raises(CorruptCheckpointError):
        saver.restore(prefix)
    _assert_untouched({"numbers": numbers, "text": text}, before)


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "parallel"])
@pytest.mark.parametrize("n_devices", N_DEVICES)
def test_corrupt_tensor_bytes_raise_checksum_error(n_devices: int, sequential: bool, tmp_path: Path) -> None:
    arrays = {f"a{i}": np.arange(256, dtype=np.float32) + i for i in range(n_devices - 1)}
    arrays["w"] = np.arange(256, dtype=np.float32)  # alone on the last device, at offset 0 of its shard
    saver = gs.Saver(on_cpus(arrays, n_devices), sharded=True, restore_sequentially=sequential)
    prefix = saver.save(str(tmp_path / "m"))
    data = tmp_path / expected_data_files("m", n_devices)[-1]
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="'w'") as info:
        saver.restore(prefix)
    assert isinstance(info.value, ValueError)
    with gs.load_checkpoint(prefix) as reader, pytest.raises(ChecksumError):
        reader.get_tensor("w")


def test_restore_none_is_a_value_error(tmp_path: Path) -> None:
    saver, _ = simple_saver(tmp_path)
    with pytest.raises(ValueError, match="None"):
        saver.restore(None)
    with pytest.raises(ValueError):
        saver.restore()


@pytest.mark.parametrize("what", ["nothing", "directory", "plain_file", "data_only"])
def test_restore_of_a_non_checkpoint(what: str, tmp_path: Path) -> None:
    saver, arrays = simple_saver(tmp_path)
    before = {k: snapshot(v) for k, v in arrays.items()}
    target = tmp_path / "x"
    if what == "directory":
        target.mkdir()
    elif what == "plain_file":
        target.write_bytes(b"not a checkpoint")
    elif what == "data_only":
        (tmp_path / "x.data-00000-of-00001").write_bytes(b"\0" * 64)
    for catch in (ValueError, FileNotFoundError):
        with pytest.raises(catch, match=re.escape(str(target))):
            saver.restore(str(target))
    _assert_untouched(arrays, before)


def test_restore_of_a_garbage_index_is_a_value_error(tmp_path: Path) -> None:
    saver, arrays = simple_saver(tmp_path)
    before = {k: snapshot(v) for k, v in arrays.items()}
    (tmp_path / "x.index").write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptCheckpointError) as info:
        saver.restore(str(tmp_path / "x"))
    assert isinstance(info.value, ValueError)
    _assert_untouched(arrays, before)


# ------------------------------------------------------------------------ protos


def test_as_saver_def_to_proto_from_proto_round_trip(tmp_path: Path) -> None:
    arrays = f32_vars()
    saver = gs.Saver(arrays, sharded=True, max_to_keep=3, keep_checkpoint_every_n_hours=1.5, name="mysaver")
    saver_def = saver.as_saver_def()
    assert (saver_def.max_to_keep, saver_def.sharded, saver_def.keep_checkpoint_every_n_hours) == (3, True, 1.5)
    assert saver_def.version == SaverDef.V2
    assert saver_def.restore_op_name.startswith("mysaver/")
    assert saver.to_proto() == saver_def
    parsed = SaverDef.FromString(saver_def.SerializeToString())
    again = gs.Saver.from_proto(parsed, var_list={k: v.copy() for k, v in arrays.items()})
    assert again.as_saver_def() == saver_def

    # from_proto's settings govern behaviour: three kept, sharded by device.
    saved = [again.save(str(tmp_path / "m"), global_step=s) for s in range(5)]
    assert existing(saved) == saved[-3:]


def test_saver_def_overrides_arguments() -> None:
    saver_def = SaverDef(max_to_keep=7, sharded=True, keep_checkpoint_every_n_hours=3.0, version=SaverDef.V2)
    saver = gs.Saver(f32_vars(), saver_def=saver_def, max_to_keep=1)
    got = saver.as_saver_def()
    assert (got.max_to_keep, got.sharded, got.keep_checkpoint_every_n_hours) == (7, True, 3.0)


TF_SAVER_KWARGS = [
    {},
    {"max_to_keep": None},
    {"max_to_keep": 0},
    {"max_to_keep": 3, "keep_checkpoint_every_n_hours": 1.5},
    {"sharded": True},
    {"name": "mysaver"},
]


def _tf_saver_def(tf: ModuleType, kwargs: dict[str, Any]) -> SaverDef:
    graph = tf.Graph()
    with graph.as_default():
        v = tf.compat.v1.Variable([1.0], name="v")
        saver_def = tf.compat.v1.train.Saver({"v": v}, **kwargs).as_saver_def()
    return SaverDef.FromString(saver_def.SerializeToString())


@pytest.mark.tf
@pytest.mark.parametrize("kwargs", TF_SAVER_KWARGS, ids=repr)
def test_saver_def_settings_match_tensorflow(tf: ModuleType, kwargs: dict[str, Any]) -> None:
    theirs = _tf_saver_def(tf, kwargs)
    ours = gs.Saver({"v": np.ones(1, np.float32)}, **kwargs).as_saver_def()
    for field in ("max_to_keep", "sharded", "keep_checkpoint_every_n_hours", "version"):
        assert getattr(ours, field) == getattr(theirs, field), field
    # And our Saver, built from TensorFlow's SaverDef, describes itself the same way.
    rebuilt = gs.Saver.from_proto(theirs, var_list={"v": np.ones(1, np.float32)}).as_saver_def()
    for field in ("max_to_keep", "sharded", "keep_checkpoint_every_n_hours", "version"):
        assert getattr(rebuilt, field) == getattr(theirs, field), field


@pytest.mark.tf
@pytest.mark.parametrize("kwargs", TF_SAVER_KWARGS, ids=repr)
def test_saver_def_tensor_names_match_tensorflow(tf: ModuleType, kwargs: dict[str, Any]) -> None:
    theirs = _tf_saver_def(tf, kwargs)
    ours = gs.Saver({"v": np.ones(1, np.float32)}, **kwargs).as_saver_def()
    assert ours == theirs


# -------------------------------------------------------------- module helpers


def test_get_checkpoint_mtimes_and_remove_checkpoint(tmp_path: Path) -> None:
    saver = gs.Saver(on_cpus(f32_vars(), 4), sharded=True, max_to_keep=None)
    a = saver.save(str(tmp_path / "m"), global_step=1)
    b = saver.save(str(tmp_path / "m"), global_step=2)
    mtimes = gs.get_checkpoint_mtimes([a, str(tmp_path / "absent"), b])
    assert mtimes == pytest.approx([os.stat(a + ".index").st_mtime, os.stat(b + ".index").st_mtime], abs=1e-6)
    gs.remove_checkpoint(a)
    assert not gs.checkpoint_exists(a)
    assert listing(tmp_path) == sorted(["checkpoint", "m-2.index", *expected_data_files("m-2", 4)])


def test_update_checkpoint_state_then_restore(tmp_path: Path) -> None:
    saver, arrays = simple_saver(tmp_path, max_to_keep=None)
    a = saver.save(str(tmp_path / "m"), global_step=1, write_state=False)
    expected = {k: snapshot(v) for k, v in arrays.items()}
    b = saver.save(str(tmp_path / "m"), global_step=2, write_state=False)
    gs.update_checkpoint_state(str(tmp_path), a, all_model_checkpoint_paths=[b, a])
    assert gs.latest_checkpoint(str(tmp_path)) == a
    for v in arrays.values():
        scramble(v)
    saver.restore(gs.latest_checkpoint(str(tmp_path)))
    for name, arr in arrays.items():
        assert_bit_equal(arr, expected[name], name)


def test_saving_again_with_fewer_shards_leaves_no_stale_data_files(tmp_path: Path) -> None:
    arrays = {f"v{i}": np.full(3, i, np.float32) for i in range(4)}
    gs.Saver(on_cpus(arrays, 4), sharded=True).save(str(tmp_path / "m"))
    assert data_files(str(tmp_path / "m")) == expected_data_files("m", 4)
    for arr in arrays.values():
        arr += 10
    saver = gs.Saver(on_cpus(arrays, 2), sharded=True)
    saver.save(str(tmp_path / "m"))
    assert data_files(str(tmp_path / "m")) == expected_data_files("m", 2)
    with gs.load_checkpoint(str(tmp_path / "m")) as reader:
        for name, arr in arrays.items():
            assert_bit_equal(reader.get_tensor(name), arr, name)


def test_read_only_arrays_can_be_saved(tmp_path: Path) -> None:
    frozen = np.arange(6, dtype=np.int32)
    frozen.flags.writeable = False
    prefix = gs.Saver({"frozen": frozen}).save(str(tmp_path / "m"))
    with gs.load_checkpoint(prefix) as reader:
        assert_bit_equal(reader.get_tensor("frozen"), frozen)


def test_a_retention_failure_does_not_fail_the_committed_save(tmp_path: Path) -> None:
    # TensorFlow's Saver logs "Ignoring: ..." when it cannot delete an old
    # checkpoint: the new checkpoint is committed and named in the state file,
    # so save() must return its prefix rather than raise.
    class CannotDelete(PosixFileOps):
        protected = ""

        def remove(self, path: str) -> None:
            if self.protected and os.path.basename(path).startswith(self.protected):
                raise PermissionError(13, "Permission denied", path)
            super().remove(path)

    ops = CannotDelete()
    saver = gs.Saver(on_cpus(f32_vars(), 2), sharded=True, max_to_keep=1, fileops=ops)
    first = saver.save(str(tmp_path / "m"), global_step=1)
    ops.protected = "m-1."
    second = saver.save(str(tmp_path / "m"), global_step=2)
    assert second == str(tmp_path / "m-2")
    assert gs.latest_checkpoint(str(tmp_path)) == second
    assert saver.last_checkpoints == [second]
    assert gs.checkpoint_exists(first)
    ops.protected = ""
    assert saver.save(str(tmp_path / "m"), global_step=3) == str(tmp_path / "m-3")
    assert not gs.checkpoint_exists(second)


def test_save_path_without_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    saver = gs.Saver(f32_vars(), max_to_keep=2)
    assert [saver.save("m", global_step=s) for s in (1, 2, 3)] == ["m-1", "m-2", "m-3"]
    assert (tmp_path / "checkpoint").read_text() == (
        'model_checkpoint_path: "m-3"\nall_model_checkpoint_paths: "m-2"\nall_model_checkpoint_paths: "m-3"\n'
    )
    assert saver.last_checkpoints == ["m-2", "m-3"]
    assert existing(["m-1", "m-2", "m-3"]) == ["m-2", "m-3"]
    saver.restore(gs.latest_checkpoint("."))


@pytest.mark.parametrize(
    "values", [np.array([["ab", "ünï"], ["", "c"]]), np.array([b"ab", b"\x01\xff", b"c"])], ids=["str_U", "bytes_S"]
)
def test_fixed_width_string_arrays_never_give_a_corrupt_checkpoint(values: np.ndarray, tmp_path: Path) -> None:
    # NumPy's fixed-width "U"/"S" arrays map to DT_STRING. A Saver may refuse
    # them up front (naming the variable), but one it accepts must write a
    # valid string tensor and restore it into the same array.
    want = [x.encode() if isinstance(x, str) else x for x in values.reshape(-1).tolist()]
    try:
        saver = gs.Saver({"s": values, "x": np.arange(3.0)})
    except (TypeError, ValueError) as e:
        assert "'s'" in str(e)
        return
    prefix = saver.save(str(tmp_path / "m"))
    with gs.load_checkpoint(prefix) as reader:
        got = reader.get_tensor("s")
        assert got.shape == values.shape
        assert list(got.reshape(-1)) == want
    original = values.copy()
    values[...] = values.reshape(-1)[::-1].reshape(values.shape)
    saver.restore(prefix)
    assert (values == original).all()


@pytest.mark.parametrize("slow", ["pwrite", "fsync", None])
@pytest.mark.parametrize("durable", [True, False])
def test_on_phase_reports_each_stage_of_a_save(tmp_path: Path, slow: str | None, durable: bool) -> None:
    """``on_phase`` reports stage, checksum, write, fsync and shard for every shard, then merge
    and total; an operation slowed down through the FileOps seam shows up in its own phase."""
    delay = 0.05

    class Slow(PosixFileOps):
        def pwrite(self, fd: int, buffers: Any, offset: int) -> None:
            if slow == "pwrite":
                time.sleep(delay)
            super().pwrite(fd, buffers, offset)

        def fsync(self, fd: int) -> None:
            if slow == "fsync":
                time.sleep(delay)
            super().fsync(fd)

    arrays = {f"w{i}": np.full(1000 * (i + 1), i, np.float32) for i in range(12)}
    arrays["big"] = np.ones(1 << 20, np.float32)  # written from its own memory, in segments
    phases: list[tuple[str, float]] = []
    saver = gs.Saver(
        on_cpus(arrays, 2), sharded=True, durable=durable, fileops=Slow(), on_phase=lambda p, s: phases.append((p, s))
    )
    saver.save(str(tmp_path / "m"))
    names = [p for p, _ in phases]
    per_shard = ["stage", "checksum", "write", "fsync", "shard"]
    for k in (0, 1):
        mine = [n for n in names if n.endswith(f":{k}")]
        assert mine == [f"{p}:{k}" for p in per_shard], names
    assert names[-2:] == ["merge", "total"], names
    got = dict(phases)
    assert all(s >= 0 for s in got.values()), got
    for k in (0, 1):
        assert got[f"shard:{k}"] >= got[f"stage:{k}"]
        assert got[f"checksum:{k}"] > 0 and got[f"write:{k}"] > 0, got
        assert (got[f"fsync:{k}"] > 0) == durable, got
        if slow == "pwrite":
            assert got[f"write:{k}"] >= delay, got
        if slow == "fsync" and durable:
            assert got[f"fsync:{k}"] >= delay, got
    assert got["total"] >= max(got["shard:0"], got["shard:1"]) and got["total"] >= got["merge"]
