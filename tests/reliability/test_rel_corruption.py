"""Corruption is always detected, never returned, and never costs a large allocation.

The checkpoint: eight tensors of eight dtypes (strings included) on four shards,
so four data files and one index; and the same checkpoint with its index
rewritten in small (24-byte) blocks (a valid table TensorFlow would read too), so the
index has many blocks and block boundaries.

* A flipped bit at every byte of every data file: ``Saver.restore`` and
  ``load_checkpoint(p).get_tensor(name)`` raise ``ChecksumError`` naming the file,
  the tensor, and the expected and actual crc32c (recomputed here by an
  independent crc32c); the other tensors still read bit-identically.
* A flipped bit at every byte of every index block (contents and crc): a
  ``ChecksumError`` naming the index file, with the block's stored and actual crc.
  Bytes no reader depends on (the empty metaindex block, the footer's padding)
  either raise a typed error or change nothing.
* Truncation of every file at 0, 1, every block or tensor boundary -1/+0/+1, and
  size-1, and a file of zeros of the same size: typed errors
  (``GpuSaverError``), never ``IndexError``, ``struct.error`` or the like, and
  never a wrong value.
* An index that claims a huge tensor: a typed error before any allocation larger
  than the files (``tracemalloc`` peak).
"""

from __future__ import annotations

import os
import random
import shutil
import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest

import gpusaver as gs
from gpusaver.format import BundleReader
from gpusaver.format.entry import encode_entry, encode_header
from gpusaver.format.slices import encode_slice_key
from gpusaver.format.table import TableReader, encode_table
import relkit

SPECS = relkit.SPECS["small"]
STEP = 7


@dataclass
class Block:
    offset: int
    size: int
    kind: str  # "data", "index" or "meta"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _blocks(index: bytes) -> list[Block]:
    """The blocks of a table, read here from the footer and the index block (not by gpusaver)."""
    foot = len(index) - 48
    meta_off, p = _varint(index, foot)
    meta_size, p = _varint(index, p)
    idx_off, p = _varint(index, p)
    idx_size, p = _varint(index, p)
    blocks = [Block(meta_off, meta_size, "meta"), Block(idx_off, idx_size, "index")]
    restarts = int.from_bytes(index[idx_off + idx_size - 4 : idx_off + idx_size], "little")
    pos, end = idx_off, idx_off + idx_size - 4 - 4 * restarts
    while pos < end:
        _, pos = _varint(index, pos)
        unshared, pos = _varint(index, pos)
        vlen, pos = _varint(index, pos)
        pos += unshared
        off, q = _varint(index, pos)
        size, _ = _varint(index, q)
        blocks.append(Block(off, size, "data"))
        pos += vlen
    return sorted(blocks, key=lambda b: b.offset)


@dataclass
class Ckpt:
    prefix: str
    files: dict[str, bytes]  # path -> original bytes
    tensors: dict[str, tuple[str, int, int, int]]  # name -> (data file, offset, size, masked crc)

    def index_path(self) -> str:
        return self.prefix + ".index"


def _describe(prefix: str) -> Ckpt:
    files = {}
    directory = os.path.dirname(prefix)
    for n in os.listdir(directory):
        if n.startswith(os.path.basename(prefix) + "."):
            with open(os.path.join(directory, n), "rb") as f:
                files[os.path.join(directory, n)] = f.read()
    tensors = {}
    with BundleReader(prefix) as r:
        for name, e in r.variables().items():
            path = f"{prefix}.data-{e.shard_id:05d}-of-{r.header.num_shards:05d}"
            tensors[name] = (path, e.offset, e.size, e.crc32c)
    return Ckpt(prefix, files, tensors)


@pytest.fixture(scope="module", params=["native", "reblocked"])
def ckpt(request, tmp_path_factory: pytest.TempPathFactory) -> Ckpt:
    directory = str(tmp_path_factory.mktemp("corrupt"))
    arrays = relkit.zeros(SPECS)
    saver = relkit.make_saver(arrays, SPECS)
    relkit.fill(arrays, SPECS, STEP)
    prefix = saver.save(os.path.join(directory, "model"), global_step=STEP)
    if request.param == "reblocked":
        items = TableReader.open(prefix + ".index").items()
        with open(prefix + ".index", "wb") as f:
            f.write(encode_table(items, block_size=24))
        assert len([b for b in _blocks(open(prefix + ".index", "rb").read()) if b.kind == "data"]) > 3
    return _describe(prefix)


def _restore_error(prefix: str) -> BaseException | None:
    arrays = relkit.zeros(SPECS)
    try:
        relkit.make_saver(arrays, SPECS).restore(prefix)
    except BaseException as e:  # noqa: BLE001 - the caller checks the type
        return e
    want = relkit.values(SPECS, STEP)
    bad = [n for n in SPECS if not relkit.same(arrays[n], want[n])]
    return AssertionError(f"restored wrong values silently: {bad}") if bad else None


def _read_error(prefix: str, name: str) -> BaseException | None:
    try:
        with gs.load_checkpoint(prefix) as reader:
            got = reader.get_tensor(name)
    except BaseException as e:  # noqa: BLE001 - the caller checks the type
        return e
    if not relkit.same(got, relkit.value(name, SPECS[name], STEP)):
        return AssertionError(f"get_tensor({name!r}) returned a wrong value silently")
    return None


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _check_data_checksum_error(e: BaseException | None, path: str, name: str, original: bytes, corrupt: bytes,
                               masked: int) -> str | None:
    """None if ``e`` is the right ChecksumError for a flip inside tensor ``name``."""
    if SPECS[name][1] == "|O":  # strings: lengths, their crc and the bytes are all checked
        if isinstance(e, gs.ChecksumError) and e.path == path and e.tensor == name and e.expected != e.actual:
            return None
        if isinstance(e, gs.CorruptCheckpointError) and not isinstance(e, gs.ChecksumError) and name in str(e):
            return None
        return f"string tensor: {e!r}"
    if not isinstance(e, gs.ChecksumError):
        return f"not a ChecksumError: {e!r}"
    want = (path, name, relkit.unmask(masked), relkit.crc32c(corrupt))
    got = (e.path, e.tensor, e.expected, e.actual)
    if got != want or relkit.crc32c(original) != want[2]:
        return f"ChecksumError attributes {got}, expected {want}"
    if name not in str(e) or os.path.basename(path) not in str(e):
        return f"message does not name the tensor and the file: {e}"
    return None


def test_bit_flip_anywhere_in_a_data_file(ckpt: Ckpt) -> None:
    rng = random.Random(1)
    problems = []
    flips = 0
    for path in sorted(p for p in ckpt.files if ".data-" in p):
        original = ckpt.files[path]
        owners = {o: n for n, (p, off, size, _) in ckpt.tensors.items() if p == path for o in range(off, off + size)}
        assert len(owners) == len(original), f"{path}: bytes that belong to no tensor"
        for pos in range(len(original)):
            name = owners[pos]
            _, off, size, masked = ckpt.tensors[name]
            corrupt = bytearray(original)
            corrupt[pos] ^= 1 << rng.randrange(8)
            _write(path, bytes(corrupt))
            for how, e in (("restore", _restore_error(ckpt.prefix)), ("get_tensor", _read_error(ckpt.prefix, name))):
                bad = _check_data_checksum_error(e, path, name, original[off : off + size],
                                                 bytes(corrupt[off : off + size]), masked)
                if bad:
                    problems.append(f"{os.path.basename(path)} byte {pos} ({name}), {how}: {bad}")
            other = next(n for n in sorted(ckpt.tensors) if n != name)
            if _read_error(ckpt.prefix, other) is not None:
                problems.append(f"{os.path.basename(path)} byte {pos}: undamaged {other} no longer reads")
            flips += 1
        _write(path, original)
    assert flips > 150
    assert not problems, "\n".join(problems[:20])


def _index_regions(index: bytes) -> dict[int, str]:
    """Byte position -> region: block contents, block crc, block type, meta, footer."""
    regions = {}
    for b in _blocks(index):
        for pos in range(b.offset, b.offset + b.size + 5):
            if b.kind == "meta":
                regions[pos] = "meta"
            elif pos < b.offset + b.size:
                regions[pos] = "contents"
            elif pos == b.offset + b.size:
                regions[pos] = "type"
            else:
                regions[pos] = "crc"
    for pos in range(len(index) - 48, len(index)):
        regions[pos] = "footer"
    assert sorted(regions) == list(range(len(index))), "the blocks do not tile the index"
    return regions


def _flip_index(ckpt: Ckpt, wanted: set[str]) -> list[str]:
    path = ckpt.index_path()
    original = ckpt.files[path]
    regions = _index_regions(original)
    blocks = _blocks(original)
    rng = random.Random(2)
    problems = []
    for pos, region in regions.items():
        if region not in wanted:
            continue
        corrupt = bytearray(original)
        corrupt[pos] ^= 1 << rng.randrange(8)
        _write(path, bytes(corrupt))
        outcomes = [("restore", _restore_error(ckpt.prefix))]
        # Blocks are read lazily: get_tensor of a tensor whose entry is in an intact
        # block may succeed (with the right value); at least one must fail.
        outcomes += [(f"get_tensor({n!r})", _read_error(ckpt.prefix, n)) for n in sorted(ckpt.tensors)]
        if region not in ("meta", "footer") and all(e is None for how, e in outcomes[1:]):
            problems.append(f"index byte {pos} ({region}): every get_tensor succeeded")
        for how, e in outcomes:
            where = f"index byte {pos} ({region}), {how}"
            if region in ("meta", "footer") or (e is None and how != "restore"):
                if e is not None and not isinstance(e, gs.GpuSaverError):
                    problems.append(f"{where}: {e!r}")
                continue
            block = next(b for b in blocks if b.offset <= pos <= b.offset + b.size + 4)
            stored = int.from_bytes(corrupt[block.offset + block.size + 1 : block.offset + block.size + 5], "little")
            actual = relkit.crc32c(bytes(corrupt[block.offset : block.offset + block.size + 1]))
            if not isinstance(e, gs.ChecksumError):
                problems.append(f"{where}: not a ChecksumError: {e!r}")
            elif (e.path, e.tensor, e.expected, e.actual) != (path, None, relkit.unmask(stored), actual):
                problems.append(f"{where}: attributes {(e.path, e.tensor, e.expected, e.actual)}")
    _write(path, original)
    return problems


def test_bit_flip_in_index_blocks_is_a_checksum_error(ckpt: Ckpt) -> None:
    problems = _flip_index(ckpt, {"contents", "crc", "meta", "footer"})
    assert not problems, "\n".join(problems[:20])


def test_bit_flip_in_a_block_type_byte_is_a_checksum_error(ckpt: Ckpt) -> None:
    problems = _flip_index(ckpt, {"type"})
    assert not problems, "\n".join(problems[:20])


def _cut_points(path: str, ckpt: Ckpt) -> list[int]:
    data = ckpt.files[path]
    bounds = {0, len(data)}
    if path.endswith(".index"):
        for b in _blocks(data):
            bounds |= {b.offset, b.offset + b.size, b.offset + b.size + 5}
        bounds.add(len(data) - 48)
    else:
        for p, off, size, _ in ckpt.tensors.values():
            if p == path:
                bounds |= {off, off + size}
    cuts = {0, 1, len(data) - 1} | {b + d for b in bounds for d in (-1, 0, 1)}
    return sorted(c for c in cuts if 0 <= c < len(data))


def test_truncation_at_every_boundary_and_zeroed_files(ckpt: Ckpt) -> None:
    problems = []
    cases = 0
    for path, original in sorted(ckpt.files.items()):
        damaged = [(f"cut at {c}", original[:c]) for c in _cut_points(path, ckpt)]
        damaged.append(("all zeros", bytes(len(original))))
        for what, data in damaged:
            _write(path, data)
            cases += 1
            where = f"{os.path.basename(path)} {what}"
            e = _restore_error(ckpt.prefix)
            if not isinstance(e, gs.GpuSaverError):
                problems.append(f"{where}: restore: {e!r}")
            for name in sorted(ckpt.tensors):
                e = _read_error(ckpt.prefix, name)
                if e is not None and not isinstance(e, gs.GpuSaverError):
                    problems.append(f"{where}: get_tensor({name!r}): {e!r}")
            try:
                with gs.load_checkpoint(ckpt.prefix) as reader:
                    reader.get_variable_to_shape_map()
            except gs.GpuSaverError:
                pass
            except BaseException as e:  # noqa: BLE001 - reported
                problems.append(f"{where}: variables: {e!r}")
        _write(path, original)
    assert cases > 40
    assert not problems, "\n".join(problems[:20])


# ------------------------------------------------------------ huge claims
def _craft(directory: str, entries: dict[bytes, bytes], data: bytes = b"\x01" * 100) -> str:
    prefix = os.path.join(directory, "crafted")
    items = [(b"", encode_header(1))] + sorted(entries.items())
    _write(prefix + ".index", encode_table(items))
    _write(prefix + ".data-00000-of-00001", data)
    return prefix


def _peak_during(fn) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        fn()
        error = None
    except BaseException as e:  # noqa: BLE001 - the caller checks the type
        error = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return error, peak


HUGE = {
    "4 GiB float32, size consistent, 100-byte file": (1, (1 << 15, 1 << 15), 4 << 30),
    "shape of 2**40 float64, size 8": (2, (1 << 40,), 8),
    "2**40 strings in 100 bytes": (7, (1 << 40,), 100),
    "2**62 bool, size consistent": (10, (1 << 31, 1 << 31), 1 << 62),
    "huge offset": (4, (10,), 10),
}


@pytest.mark.parametrize("case", sorted(HUGE))
def test_a_huge_claim_is_refused_before_allocating(tmp_path, case) -> None:
    dtype, shape, size = HUGE[case]
    offset = (1 << 62) if case == "huge offset" else 0
    prefix = _craft(str(tmp_path), {b"t": encode_entry(dtype, shape, 0, offset, size, 0)})

    def read() -> None:
        with gs.load_checkpoint(prefix) as reader:
            reader.get_tensor("t")

    error, peak = _peak_during(read)
    assert isinstance(error, gs.CorruptCheckpointError), repr(error)
    assert peak < 1 << 20, f"{peak} bytes allocated before the error"
    if len(shape) == 1 and shape[0] == 10:
        arrays = {"t": np.zeros(10, np.uint8)}

        def restore() -> None:
            gs.Saver(arrays).restore(prefix)

        error, peak = _peak_during(restore)
        assert isinstance(error, gs.CorruptCheckpointError) and peak < 1 << 20, (error, peak)


@pytest.mark.parametrize("full", [1 << 40, 1 << 26], ids=["1TiB", "64MiB"])
def test_a_huge_partitioned_tensor_is_refused_before_allocating(tmp_path, full: int) -> None:
    extents = [(0, 10)]
    entries = {
        b"big": encode_entry(6, (full,), 0, slices=[extents]),
        encode_slice_key(b"big", extents): encode_entry(6, (10,), 0, 0, 10, 0),
    }
    prefix = _craft(str(tmp_path), entries)

    def read() -> None:
        with gs.load_checkpoint(prefix) as reader:
            reader.get_tensor("big")

    error, peak = _peak_during(read)
    assert isinstance(error, gs.GpuSaverError), repr(error)
    assert peak < 1 << 20, f"{peak} bytes allocated before the error"


# ------------------------------------------------------------- the CuPy path
NUMERIC = sorted(n for n in SPECS if SPECS[n][1] != "|O")


@pytest.mark.gpu
def test_bit_flips_on_the_cupy_path(ckpt: Ckpt) -> None:
    """A flipped bit in each numeric tensor: restoring into CuPy arrays and reading onto a GPU raise
    the same ChecksumError as the host path."""
    import cupy as cp

    problems = []
    for name in NUMERIC:
        path, off, size, masked = ckpt.tensors[name]
        original = ckpt.files[path]
        corrupt = bytearray(original)
        corrupt[off + size // 2] ^= 0x10
        _write(path, bytes(corrupt))
        try:
            arrays = {n: cp.zeros(SPECS[n][2], SPECS[n][1]) for n in NUMERIC}
            errors = []
            try:
                gs.Saver(arrays).restore(ckpt.prefix)
                errors.append(None)
            except BaseException as e:  # noqa: BLE001 - checked below
                errors.append(e)
            with gs.load_checkpoint(ckpt.prefix) as reader:
                try:
                    reader.get_tensor(name, device=0)
                    errors.append(None)
                except BaseException as e:  # noqa: BLE001 - checked below
                    errors.append(e)
        finally:
            _write(path, original)
        for how, e in zip(("restore", "get_tensor(device=0)"), errors):
            bad = _check_data_checksum_error(e, path, name, original[off : off + size],
                                             bytes(corrupt[off : off + size]), masked)
            if bad:
                problems.append(f"{name}, {how}: {bad}")
    assert not problems, "\n".join(problems)


@pytest.mark.gpu
@pytest.mark.parametrize("claim", ["4 GiB in 100 bytes", "size disagrees with shape"])
def test_a_bad_claim_is_refused_before_allocating_on_the_gpu(tmp_path, monkeypatch, claim: str) -> None:
    import cupy as cp

    entry = {
        "4 GiB in 100 bytes": encode_entry(1, (1 << 15, 1 << 15), 0, 0, 4 << 30, 0),
        "size disagrees with shape": encode_entry(1, (4,), 0, 0, 8, 0),
    }[claim]
    prefix = _craft(str(tmp_path), {b"t": entry})
    requested: list[int] = []
    real_empty = cp.empty

    def recording_empty(shape, dtype=float, *args, **kwargs):
        requested.append(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        return real_empty(shape, dtype, *args, **kwargs)

    monkeypatch.setattr(cp, "empty", recording_empty)
    with gs.load_checkpoint(prefix) as reader:
        with pytest.raises(gs.CorruptCheckpointError):
            reader.get_tensor("t", device=0)
    assert max(requested, default=0) <= 100, f"allocated {max(requested)} bytes on the GPU first"


def test_crc32c_here_agrees_with_the_format(ckpt: Ckpt) -> None:
    """The independent crc32c used above is right (check value of the Castagnoli crc)."""
    assert relkit.crc32c(b"123456789") == 0xE3069283
    for name, (path, off, size, masked) in ckpt.tensors.items():
        if SPECS[name][1] == "|O":
            continue  # a string tensor's crc also covers its lengths as fixed-width integers
        assert relkit.crc32c(ckpt.files[path][off : off + size]) == relkit.unmask(masked)


def test_copying_the_checkpoint_elsewhere_still_reads(ckpt: Ckpt, tmp_path) -> None:
    """After all the damage above, the files are restored and read bit-identically."""
    for path, data in ckpt.files.items():
        shutil.copy(path, tmp_path / os.path.basename(path))
        with open(path, "rb") as f:
            assert f.read() == data
    assert _restore_error(str(tmp_path / os.path.basename(ckpt.prefix))) is None
