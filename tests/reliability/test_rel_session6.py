"""Session 6 attack on the restore job queue, the 3-lane crc32c, streaming copies and split packing.

Targets (commits 6f66817, 619bc8e, cc58053):

* ``reads.checked_read_jobs`` / ``parallel.run_jobs`` / ``BundleReader.read_columns_into``: a restore's reads
  are jobs of about ``read_chunk_bytes``; a tensor read in several jobs has its pieces' crcs combined; large
  and small (C ``unpack``) jobs share one queue. Damage inside a tensor split over many jobs, damage in a large
  and a small tensor at once, unsorted Saver orders, several device groups, several shards, short reads, EIO at
  random jobs, a file truncated under a running restore, tiny and odd ``read_chunk_bytes``/``pack_limit``/
  ``pack_bytes``/``gap_bytes``, concurrent restores: the first damaged variable in the Saver's order is raised
  with the right file and crcs, every undamaged variable holds checkpoint values, a small damaged one keeps its
  old values (C extension).
* ``_native.c``: crc32c lanes (3x8192/512/64 blocks) through ``unpack``'s verification, ``pack(stream=True)``
  across the 256-byte and 256 KiB streaming thresholds at odd output offsets.
* ``snapshot._pack`` / ``_copy``: split packing over the copy threads gives the bytes of a synchronous save and of
  the pure-Python path, byte for byte; TensorFlow reads it; the snapshot keeps the values of the call.

Tests marked ``xfail(strict=True, reason="BUG: ...")`` reproduce bugs found here (see each reason).
"""

from __future__ import annotations

import errno
import glob
import os
import subprocess
import sys
import textwrap
import threading

import crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gpusaver as gs
from gpusaver import config, native
from gpusaver.format import BundleReader
from gpusaver.storage.fileops import PosixFileOps

needs_native = pytest.mark.skipif(not native.available(), reason="needs the C extension")

# sizes on both sides of every threshold: crc lane blocks (3x64, 3x512, 3x8192), the 256-byte streaming size,
# pack_limit's default (64 KiB), page size
EDGE_SIZES = [0, 1, 7, 63, 64, 65, 191, 192, 193, 255, 256, 257, 511, 512, 513, 1535, 1536, 1537, 4095, 4096, 4097,
              3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1, 65535, 65536, 65537, 100003]


# ------------------------------------------------------------------------------------------------ helpers
class _native_path:
    """Context: the C extension on (True) or the pure-Python path (False)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.before = native.lib
        if self.on and not native.available():
            pytest.skip("the C extension is not built")
        native.use(self.on)

    def __exit__(self, *exc) -> None:
        native.lib = self.before


def _locations(prefix: str, names) -> dict[str, tuple[str, int, int]]:
    """name -> (data file, offset, size)."""
    out = {}
    with BundleReader(prefix) as r:
        for n in names:
            e = r.entry(n)
            out[n] = (f"{prefix}.data-{e.shard_id:05d}-of-{r.header.num_shards:05d}", e.offset, e.size)
    return out


def _flip(path: str, at: int, bit: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ bit]))


def _files(prefix: str) -> dict[str, bytes]:
    base = os.path.basename(prefix)
    out = {}
    for f in sorted(glob.glob(prefix + ".*")):
        with open(f, "rb") as fh:
            out[os.path.basename(f).replace(base, "P", 1)] = fh.read()
    return out


class FaultOps(PosixFileOps):
    """Reads through the seam, with faults: ``eio_at`` (the k-th preadv raises EIO), ``short`` (about a third of
    the reads return a random prefix of what was asked), ``truncate`` ((path, size): the file is cut to ``size``
    at the first read, as if truncated under the restore)."""

    def __init__(self, seed: int = 0, eio_at: int = -1, short: bool = False, truncate=None) -> None:
        self.rng = np.random.default_rng(seed)
        self.eio_at, self.short, self.truncate = eio_at, short, truncate
        self.reads = 0
        self.lock = threading.Lock()

    def preadv(self, fd, buffers, offset):
        with self.lock:
            k = self.reads
            self.reads += 1
            r = int(self.rng.integers(0, 1 << 30))
            if self.truncate is not None:
                os.truncate(*self.truncate)
                self.truncate = None
        if k == self.eio_at:
            raise OSError(errno.EIO, "injected EIO")
        total = sum(len(b) for b in buffers)
        if self.short and total > 1 and r % 3 == 0:
            keep, out = 1 + (r >> 2) % (total - 1), []
            for b in buffers:
                if keep <= 0:
                    break
                out.append(b[:keep])
                keep -= len(out[-1])
            return super().preadv(fd, out, offset)
        return super().preadv(fd, buffers, offset)


TINY = dict(reader_threads=3, parallel_read_bytes=1, parallel_chunked_bytes=1)


def _mixed_state(seed: int, n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"t{int(k):03d}": rng.integers(0, 256, int(rng.choice(EDGE_SIZES)), dtype=np.uint8)
            for k in rng.permutation(1000)[:n]}


# ------------------------------------------------------- damage inside a tensor read by many jobs
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("chunk", [7, 1000, 4097, 1 << 24])
def test_damage_in_any_piece_of_a_split_tensor_names_it_and_restores_the_rest(tmp_path, use_native, chunk) -> None:
    """A 200,003-byte tensor read in pieces of ``chunk`` bytes (up to 28,572 jobs whose crcs are combined): a flip in
    its first, a middle, a piece-boundary or its last byte is a ChecksumError naming it and its file with the
    independent crc32c of the damaged bytes; every other variable (large and small, before and after it) holds
    the checkpoint's values."""
    rng = np.random.default_rng(chunk)
    state = {"z_before": rng.integers(0, 256, 70001, dtype=np.uint8),
             "a_small": rng.integers(0, 256, 300, dtype=np.uint8),
             "m_split": rng.integers(0, 256, 200003, dtype=np.uint8),
             "b_small": rng.integers(0, 256, 4097, dtype=np.uint8),
             "y_after": rng.integers(0, 256, 65536, dtype=np.uint8)}
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    path, off, size = _locations(prefix, ["m_split"])["m_split"]
    original = open(path, "rb").read()
    at_list = sorted({0, 1, chunk - 1, chunk, chunk + 1, size // 2, size - 1} & set(range(size)))
    for at in at_list:
        with open(path, "wb") as f:
            f.write(original)
        _flip(path, off + at)
        dest = {k: np.zeros_like(v) for k, v in state.items()}
        with _native_path(use_native), config.set(read_chunk_bytes=chunk, **TINY):
            with pytest.raises(gs.ChecksumError) as info:
                gs.Saver(dest).restore(prefix)
        e = info.value
        bad = bytearray(state["m_split"].tobytes())
        bad[at] ^= 0x40
        assert (e.tensor, e.path) == ("m_split", path), at
        assert (e.expected, e.actual) == (crc32c.crc32c(state["m_split"].tobytes()), crc32c.crc32c(bytes(bad))), at
        assert "m_split" in str(e) and os.path.basename(path) in str(e)
        for k in state:
            if k != "m_split":
                assert np.array_equal(dest[k], state[k]), (k, at)


@pytest.mark.parametrize("pack_limit", [1, 4096, 65536, 1 << 20])
def test_large_and_small_damage_at_once_raise_the_first_in_saver_order(tmp_path, pack_limit) -> None:
    """Two or three damaged tensors, large and small, in one queue: whatever the Saver's order (unsorted, reversed,
    the file's), on one or two device groups, the error names the first damaged one in that order; the undamaged
    ones are restored and the small damaged ones (C extension) keep their old values."""
    sizes = {"z_big": 70000, "a_small": 100, "m_big": 200000, "b_small": 3000, "c_small": 65535, "y_big": 65536}
    rng = np.random.default_rng(pack_limit)
    state = {n: rng.integers(0, 256, s, dtype=np.uint8) for n, s in sizes.items()}
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    loc = _locations(prefix, sizes)
    path = loc["z_big"][0]
    original = open(path, "rb").read()
    names = list(sizes)
    orders = [names, names[::-1], sorted(names), [names[i] for i in (3, 0, 5, 1, 4, 2)]]
    for damaged in ({"m_big": 150000, "b_small": 5}, {"a_small": 0, "z_big": 69999},
                    {"y_big": 0, "c_small": 1}, {"a_small": 3, "b_small": 4, "m_big": 7}):
        with open(path, "wb") as f:
            f.write(original)
        for n, at in damaged.items():
            _flip(loc[n][0], loc[n][1] + at)
        for order in orders:
            for groups in (1, 2):
                old = {n: np.full(sizes[n], 0xEE, np.uint8) for n in order}
                dest = {n: old[n].copy() for n in order}
                variables = [gs.Variable(dest[n], n, device=f"/cpu:{i % groups}") for i, n in enumerate(order)]
                with config.set(read_chunk_bytes=999, pack_limit=pack_limit, pack_bytes=4096, **TINY):
                    with pytest.raises(gs.ChecksumError) as info:
                        gs.Saver(variables).restore(prefix)
                first = min(damaged, key=order.index)
                assert info.value.tensor == first, (damaged, order, groups)
                for n in order:
                    if n not in damaged:
                        assert np.array_equal(dest[n], state[n]), (n, damaged, order)
                    elif native.lib is not None and sizes[n] < pack_limit:
                        assert np.array_equal(dest[n], old[n]), (n, damaged, order)


class _ShortReads(PosixFileOps):
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()

    def preadv(self, fd, bufs, off):
        total = sum(len(b) for b in bufs)
        with self.lock:
            r = int(self.rng.integers(0, 4))
        if r == 0 and total > 1:
            keep, out = total // 2 + 1, []
            for b in bufs:
                if keep <= 0:
                    break
                out.append(b[:keep])
                keep -= len(out[-1])
            return super().preadv(fd, out, off)
        return super().preadv(fd, bufs, off)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.data())
def test_property_any_damage_any_settings_any_order(tmp_path_factory, data) -> None:
    """Random states (sizes on both sides of every threshold), random device groups and shards, random flips in
    zero to all tensors, random read settings and short reads, both host paths: no damage restores every byte;
    damage raises the first damaged variable in the Saver's order with its file and both crcs, and every
    undamaged variable is restored."""
    d = tmp_path_factory.mktemp("prop")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    n = data.draw(st.integers(1, 10), label="n")
    sizes = [data.draw(st.sampled_from(EDGE_SIZES)) for _ in range(n)]
    names = [f"v{int(x)}" for x in rng.permutation(1000)[:n]]
    state = {nm: rng.integers(0, 256, s, dtype=np.uint8) for nm, s in zip(names, sizes)}
    ndev = data.draw(st.integers(1, 3), label="save groups")
    variables = [gs.Variable(state[nm].copy(), nm, device=f"/cpu:{i % ndev}") for i, nm in enumerate(names)]
    with config.set(pack_limit=data.draw(st.sampled_from([1, 64, 4096, 65536]), label="save pack_limit")):
        prefix = gs.Saver(variables, sharded=data.draw(st.booleans(), label="sharded")).save(str(d / "ck"))
    loc = _locations(prefix, names)
    damaged: dict[str, int] = {}
    for nm, s in zip(names, sizes):
        if s and data.draw(st.integers(0, 3), label="damage?") == 0:
            damaged[nm] = data.draw(st.integers(0, s - 1), label="at")
            _flip(loc[nm][0], loc[nm][1] + damaged[nm])
    order = [names[i] for i in rng.permutation(n)] if data.draw(st.booleans(), label="shuffle") else list(names)
    groups = data.draw(st.integers(1, 3), label="restore groups")
    old = {nm: rng.integers(0, 256, state[nm].size, dtype=np.uint8) for nm in order}
    dest = {nm: old[nm].copy() for nm in order}
    rvars = [gs.Variable(dest[nm], nm, device=f"/cpu:{i % groups}") for i, nm in enumerate(order)]
    use_native = data.draw(st.booleans(), label="native") and native.available()
    chunk = data.draw(st.sampled_from([7, 61, 1000, 4097, 65536, 1 << 24]), label="read_chunk_bytes")
    chunk = max(chunk, sum(sizes) // 3000)  # bounded job count: the run time stays small
    knobs = dict(read_chunk_bytes=chunk,
                 pack_limit=data.draw(st.sampled_from([1, 64, 4096, 65536, 1 << 20]), label="pack_limit"),
                 pack_bytes=data.draw(st.sampled_from([1, 100, 4096, 1 << 20]), label="pack_bytes"),
                 gap_bytes=data.draw(st.sampled_from([0, 10, 1 << 16]), label="gap_bytes"),
                 reader_threads=data.draw(st.integers(1, 4), label="threads"),
                 parallel_read_bytes=data.draw(st.sampled_from([1, 1 << 26])),
                 parallel_chunked_bytes=data.draw(st.sampled_from([1, 1 << 26])))
    ops = _ShortReads(seed) if data.draw(st.booleans(), label="short reads") else None
    err = None
    with _native_path(use_native), config.set(**knobs):
        try:
            gs.Saver(rvars, fileops=ops).restore(prefix)
        except gs.ChecksumError as e:
            err = e
    if damaged:
        first = min(damaged, key=order.index)
        assert err is not None and err.tensor == first, (err, first)
        good = state[first].tobytes()
        bad = bytearray(good)
        bad[damaged[first]] ^= 0x40
        assert (err.path, err.expected, err.actual) == (loc[first][0], crc32c.crc32c(good), crc32c.crc32c(bytes(bad)))
    else:
        assert err is None, err
    for nm in order:
        if nm not in damaged:
            assert np.array_equal(dest[nm], state[nm]), nm
        elif use_native and state[nm].size < knobs["pack_limit"]:
            assert np.array_equal(dest[nm], old[nm]), nm


# --------------------------------------------------------------------------------- read faults
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "python"])
def test_eio_at_sampled_jobs_is_raised_as_itself_then_a_clean_restore(tmp_path, use_native) -> None:
    """EIO at a sampled read of a restore in many small jobs (large split tensors and small chunks mixed): the
    OSError keeps its errno, no reader thread is left behind, and the next restore is exact."""
    state = _mixed_state(11, 30)
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    knobs = dict(read_chunk_bytes=3000, pack_bytes=5000, **TINY)
    with _native_path(use_native), config.set(**knobs):
        counting = FaultOps()
        gs.Saver({k: np.zeros_like(v) for k, v in state.items()}, fileops=counting).restore(prefix)
        total = counting.reads
        assert total > 20
        for k in sorted(set(np.random.default_rng(1).integers(0, total, 12).tolist()) | {0, total - 1}):
            with pytest.raises(OSError) as info:
                gs.Saver({n: np.zeros_like(v) for n, v in state.items()}, fileops=FaultOps(eio_at=k)).restore(prefix)
            assert info.value.errno == errno.EIO and not isinstance(info.value, gs.ChecksumError), k
            assert not [t for t in threading.enumerate() if t.name.startswith("gpusaver-read")], k
        dest = {n: np.zeros_like(v) for n, v in state.items()}
        gs.Saver(dest, fileops=FaultOps(seed=3, short=True)).restore(prefix)
    for n, v in state.items():
        assert np.array_equal(dest[n], v), n


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "python"])
def test_short_reads_everywhere_restore_exactly(tmp_path, use_native) -> None:
    """Reads that return a random prefix of what was asked (scatter reads cut inside a buffer, between buffers, at
    one byte): every job finishes its read and every tensor is restored exactly, with each read setting."""
    state = _mixed_state(12, 25)
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    for seed, chunk in enumerate((61, 999, 4097, 1 << 24)):
        dest = {n: np.zeros_like(v) for n, v in state.items()}
        with _native_path(use_native), config.set(read_chunk_bytes=chunk, pack_bytes=777, gap_bytes=3, **TINY):
            gs.Saver(dest, fileops=FaultOps(seed=seed, short=True)).restore(prefix)
        for n, v in state.items():
            assert np.array_equal(dest[n], v), (n, chunk)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "python"])
def test_a_file_truncated_under_a_running_restore_is_a_typed_error_naming_it(tmp_path, use_native) -> None:
    """The data file is cut in the middle of a tensor read in several jobs after the restore checked its size:
    CorruptCheckpointError (a ValueError) naming the data file, never a wrong value passed as restored; with the
    file back, the next restore is exact."""
    rng = np.random.default_rng(5)
    state = {"a": rng.integers(0, 256, 50000, dtype=np.uint8), "b": rng.integers(0, 256, 300000, dtype=np.uint8),
             "c": rng.integers(0, 256, 1000, dtype=np.uint8)}
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    path, off, size = _locations(prefix, ["b"])["b"]
    original = open(path, "rb").read()
    for cut in (off + 1, off + size // 2, off + size - 1):
        dest = {n: np.zeros_like(v) for n, v in state.items()}
        with _native_path(use_native), config.set(read_chunk_bytes=10000, **TINY):
            with pytest.raises(gs.CorruptCheckpointError) as info:
                gs.Saver(dest, fileops=FaultOps(truncate=(path, cut))).restore(prefix)
        assert isinstance(info.value, ValueError) and not isinstance(info.value, gs.ChecksumError)
        assert info.value.path == path and os.path.basename(path) in str(info.value)
        with open(path, "wb") as f:
            f.write(original)
        dest = {n: np.zeros_like(v) for n, v in state.items()}
        gs.Saver(dest).restore(prefix)
        assert all(np.array_equal(dest[n], v) for n, v in state.items())


def test_a_file_truncated_before_the_restore_inside_a_split_tensor_changes_nothing(tmp_path) -> None:
    """Truncated inside a tensor that spans several jobs: CorruptCheckpointError naming the tensor and the file,
    before any array changes."""
    rng = np.random.default_rng(6)
    state = {"a": rng.integers(0, 256, 50000, dtype=np.uint8), "b": rng.integers(0, 256, 300000, dtype=np.uint8),
             "c": rng.integers(0, 256, 1000, dtype=np.uint8)}
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    path, off, size = _locations(prefix, ["b"])["b"]
    os.truncate(path, off + size // 2)
    dest = {n: np.full_like(v, 7) for n, v in state.items()}
    with config.set(read_chunk_bytes=10000, **TINY), pytest.raises(gs.CorruptCheckpointError) as info:
        gs.Saver(dest).restore(prefix)
    assert "'b'" in str(info.value) and os.path.basename(path) in str(info.value)
    assert all((v == 7).all() for v in dest.values())


# -------------------------------------------------------------------------------- concurrency
def test_concurrent_restores_share_the_staging_and_queues_safely(tmp_path) -> None:
    """Four threads restore at once with tiny chunks (each restore itself on three reader threads), one of them
    from a damaged copy: the good ones are exact every time, the damaged one always raises the same error."""
    state = _mixed_state(13, 40)
    good = gs.Saver(dict(state)).save(str(tmp_path / "good"))
    bad = gs.Saver(dict(state)).save(str(tmp_path / "bad"))
    victim = max(state, key=lambda k: state[k].size)
    path, off, size = _locations(bad, [victim])[victim]
    _flip(path, off + size // 3)
    problems: list = []

    def work(k: int) -> None:
        try:
            for _ in range(4):
                dest = {n: np.zeros_like(v) for n, v in state.items()}
                if k == 0:
                    try:
                        gs.Saver(dest).restore(bad)
                        problems.append("no error from the damaged copy")
                    except gs.ChecksumError as e:
                        if e.tensor != victim:
                            problems.append(("wrong tensor", e.tensor))
                else:
                    gs.Saver(dest).restore(good)
                    problems.extend((k, n) for n in state if not np.array_equal(dest[n], state[n]))
        except BaseException as e:  # noqa: BLE001 - reported below
            problems.append(repr(e))

    with config.set(read_chunk_bytes=5000, pack_bytes=10000, **TINY):
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert problems == []


def test_restore_into_views_of_one_flat_buffer(tmp_path) -> None:
    """Variables that are adjacent views of one flat buffer (a flat-parameter layout), restored through large
    split jobs and small chunks at once: every byte lands, nothing outside the views is written; interleaved
    column views (non-contiguous) restore too; a read-only one is refused before any array changes."""
    rng = np.random.default_rng(8)
    sizes = [70000, 100, 65536, 3, 200001, 0, 5000]
    state = {f"p{i}": rng.integers(0, 256, s, dtype=np.uint8) for i, s in enumerate(sizes)}
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    flat = np.full(sum(sizes) + 64, 0xAB, np.uint8)
    views, at = {}, 32
    for k, v in state.items():
        views[k] = flat[at : at + v.size]
        at += v.size
    with config.set(read_chunk_bytes=4096, pack_bytes=9000, **TINY):
        gs.Saver(views).restore(prefix)
    assert (flat[:32] == 0xAB).all() and (flat[-32:] == 0xAB).all()
    assert all(np.array_equal(views[k], state[k]) for k in state)
    grid = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    p2 = gs.Saver({"even": grid[:, ::2].copy(), "odd": grid[:, 1::2].copy()}).save(str(tmp_path / "grid"))
    target = np.zeros_like(grid)
    gs.Saver({"even": target[:, ::2], "odd": target[:, 1::2]}).restore(p2)
    assert np.array_equal(target, grid)
    ro = np.zeros(5000, np.uint8)
    ro.flags.writeable = False
    dest = {k: np.zeros_like(v) for k, v in state.items()}
    dest["p6"] = ro
    with pytest.raises(gs.InvalidArgumentError, match="read-only"):
        gs.Saver(dest).restore(prefix)
    assert not any(v.any() for v in dest.values())


# ------------------------------------------------------------------ the C extension's new code
@needs_native
def test_unpack_finds_a_flip_at_every_lane_block_boundary() -> None:
    """A tensor whose length crosses each lane block (3x8192, 3x512, 3x64 and the 8-byte tail): a flipped bit at
    each block's first and last byte and at each lane boundary inside it is found by ``unpack``'s crc, which then
    leaves the array untouched; the undamaged copy lands."""
    C = native.lib
    n = 3 * 8192 + 3 * 512 + 3 * 64 + 13
    rng = np.random.default_rng(21)
    for skip in (0, 3):
        src = rng.integers(0, 256, n + skip, dtype=np.uint8)
        body = src[skip:]
        want = np.array([crc32c.crc32c(body.tobytes())], np.uint32)
        positions = {0, n - 1}
        base = 0
        for lane in (8192, 512, 64):
            for k in range(4):
                positions |= {base + k * lane - 1, base + k * lane} - {-1}
            base += 3 * lane
        positions |= {base, base + 7, base + 8, n - 1}
        for at in sorted(p for p in positions if 0 <= p < n):
            damaged = src.copy()
            damaged[skip + at] ^= 0x10
            out = [np.zeros(n, np.uint8)]
            offsets = np.array([skip], np.int64)
            bad = C.unpack(memoryview(damaged), 0, out, np.zeros(1, np.int64), 0, 1, offsets, want)
            assert bad == [0] and not out[0].any(), at
        out = [np.zeros(n, np.uint8)]
        assert C.unpack(memoryview(src), 0, out, np.zeros(1, np.int64), 0, 1, np.array([skip], np.int64), want) == []
        assert np.array_equal(out[0], body)


@needs_native
@pytest.mark.parametrize("out_offset", [0, 1, 31, 33])
def test_pack_stream_across_the_256k_copy_size_equals_plain_pack(out_offset) -> None:
    """pack(stream=True) with tensors from 0 bytes to past 256 KiB (head/tail memcpy around the streamed
    128-byte blocks) at odd output offsets: the bytes and crcs of the plain pack; nothing past the end written."""
    C = native.lib
    rng = np.random.default_rng(out_offset)
    sizes = [0, 255, 256, 257, 4095, (256 << 10) - 1, 256 << 10, (256 << 10) + 129, 3 * 8192 + 1, 1]
    arrays = [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]
    total = sum(sizes)
    outs = [np.full(total + out_offset + 64, 0xCD, np.uint8) for _ in range(2)]
    crcs = [np.zeros(len(arrays), np.uint32) for _ in range(2)]
    for out, c, stream in zip(outs, crcs, (False, True)):
        assert C.pack(arrays, 0, len(arrays), out[out_offset:], c, stream) == total
    assert np.array_equal(outs[0], outs[1])
    assert (outs[1][out_offset + total :] == 0xCD).all()
    assert crcs[1].tolist() == [crc32c.crc32c(a.tobytes()) for a in arrays]


# --------------------------------------------------------------- saves: byte for byte, TF reads them
@needs_native
def test_save_save_async_and_python_path_write_the_same_bytes(tmp_path, monkeypatch) -> None:
    """Random states with sizes on both sides of every threshold, split packing forced (the copy split lowered
    to 4 KiB), random pack_limit/slab/pack_bytes: save, save_async and the pure-Python save write identical
    files; the async checkpoint restores exactly."""
    from gpusaver.pipeline import snapshot

    monkeypatch.setattr(snapshot, "_COPY_SPLIT", 4096)
    rng = np.random.default_rng(31)
    for trial in range(10):
        n = int(rng.integers(1, 40))
        state = {}
        for i in range(n):
            dt = np.dtype(str(rng.choice(["u1", "<f4", "<i8", "<f2"])))
            count = int(rng.choice(EDGE_SIZES + [262143, 262144, 262145])) // dt.itemsize
            state[f"v{int(rng.integers(0, 1000)):04d}_{i}"] = rng.integers(0, 255, count, dtype=np.uint8).astype(dt)
        knobs = dict(pack_limit=int(rng.choice([1, 512, 65536, 1 << 20])),
                     snapshot_slab_bytes=int(rng.choice([4096, 65536, 1 << 20])),
                     pack_bytes=int(rng.choice([1, 4096, 1 << 20])))
        with config.set(**knobs):
            a = gs.Saver(dict(state)).save(str(tmp_path / f"s{trial}"))
            b = gs.Saver(dict(state)).save_async(str(tmp_path / f"a{trial}")).result()
            with _native_path(False):
                c = gs.Saver(dict(state)).save(str(tmp_path / f"p{trial}"))
        fa, fb, fc = _files(a), _files(b), _files(c)
        assert fa == fb, (trial, knobs)
        assert fa == fc, (trial, knobs)
        dest = {k: np.zeros_like(v) for k, v in state.items()}
        gs.Saver(dest).restore(b)
        assert all(np.array_equal(dest[k], v) for k, v in state.items())


@needs_native
def test_save_async_split_packing_keeps_the_values_of_the_call(tmp_path, monkeypatch) -> None:
    """Split packing runs on the copy threads; save_async returns only once every part is copied: arrays changed
    right after it returns do not reach the checkpoint."""
    from gpusaver.pipeline import snapshot

    monkeypatch.setattr(snapshot, "_COPY_SPLIT", 64 << 10)
    state = {f"s{i:04d}": np.full(1000, i, np.float32) for i in range(600)}
    want = {k: v.copy() for k, v in state.items()}
    saver = gs.Saver(state)
    handle = saver.save_async(str(tmp_path / "ck"))
    for v in state.values():
        v += 1000.0
    prefix = handle.result()
    dest = {k: np.zeros_like(v) for k, v in state.items()}
    gs.Saver(dest).restore(prefix)
    assert all(np.array_equal(dest[k], want[k]) for k in state)


@needs_native
def test_tensorflow_reads_split_packed_saves_and_gpusaver_reads_tensorflow_in_tiny_jobs(tmp_path, monkeypatch, tf) -> None:
    from gpusaver.pipeline import snapshot

    monkeypatch.setattr(snapshot, "_COPY_SPLIT", 4096)
    rng = np.random.default_rng(41)
    sizes = [0, 1, 63, 64, 513, 3 * 8192 + 1, 16383, 16384, 70001, 65537]
    state = {f"n{i:02d}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(sizes)}
    with config.set(pack_limit=1 << 20, snapshot_slab_bytes=1 << 16):
        prefix = gs.Saver(dict(state)).save_async(str(tmp_path / "gs")).result()
    reader = tf.train.load_checkpoint(prefix)
    for k, v in state.items():
        assert np.array_equal(reader.get_tensor(k), v), k
    tfp = str(tmp_path / "tfck")
    names = list(state)
    tf.raw_ops.SaveV2(prefix=tfp, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(state[n]) for n in names])
    for chunk, pl in ((7, 1), (1000, 4096), (1 << 24, 1 << 20)):
        dest = {n: np.zeros_like(v) for n, v in state.items()}
        with config.set(read_chunk_bytes=chunk, pack_limit=pl, pack_bytes=5000, **TINY):
            gs.Saver(dest).restore(tfp)
        assert all(np.array_equal(dest[n], state[n]) for n in names), (chunk, pl)


# ============================================================================== bugs found
_ATEXIT_SAVE = textwrap.dedent(
    """
    import atexit, os, sys, numpy as np, gpusaver as gs
    d, count = sys.argv[1], int(sys.argv[2])
    state = {f"s{i}": np.full(1024, i, np.float32) for i in range(count)}  # 4 KiB each: one packed run
    if len(sys.argv) > 3:  # and one large tensor, copied in parts on the copy threads
        state["big"] = np.arange(int(sys.argv[3]), dtype=np.float32)
    saver = gs.Saver(state)

    def at_exit():
        try:
            prefix = saver.save_async(os.path.join(d, "ck")).result()
            dest = {k: np.zeros_like(v) for k, v in state.items()}
            gs.Saver(dest).restore(prefix)
            print("ok" if all(np.array_equal(dest[k], v) for k, v in state.items()) else "wrong values")
        except BaseException as e:
            print("error:", type(e).__name__, e)

    atexit.register(at_exit)
    """
)


def _atexit_save(tmp_path, count: int, big: int = 0) -> str:
    done = subprocess.run([sys.executable, "-c", _ATEXIT_SAVE, str(tmp_path), str(count)] + ([str(big)] if big else []),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_save_async_at_exit_of_a_small_state_works(tmp_path) -> None:
    """Control for the bug below: 1 MiB of small tensors (no split packing) saves from an atexit handler."""
    assert _atexit_save(tmp_path, 256) == "ok"


@needs_native
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the packing is split over threads only with 2 CPUs or more")
def test_save_async_at_exit_of_a_12_mib_run_of_small_tensors(tmp_path) -> None:
    """From an atexit handler the copy threads' executor refuses work: the parts are packed on the calling thread."""
    assert _atexit_save(tmp_path, 3072) == "ok"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a large copy is split over threads only with 2 CPUs or more")
def test_save_async_at_exit_of_a_large_tensor(tmp_path) -> None:
    """The same for one 12 MiB tensor, whose copy into the pool is split over the copy threads."""
    assert _atexit_save(tmp_path, 4, 3 << 20) == "ok"


def _partitioned(emb0: np.ndarray, emb1: np.ndarray, w: np.ndarray) -> list:
    return [gs.Variable(emb0, "emb", full_shape=(4, 10), offset=[0, 0]),
            gs.Variable(emb1, "emb", full_shape=(4, 10), offset=[2, 0]),
            gs.Variable(w, "w")]


def test_a_damaged_plain_variable_still_restores_the_partitioned_ones_before_it(tmp_path) -> None:
    full = np.arange(40, dtype=np.float32).reshape(4, 10)
    prefix = gs.Saver(_partitioned(full[:2].copy(), full[2:].copy(), np.arange(7.0))).save(str(tmp_path / "ck"))
    path, off, _ = _locations(prefix, ["w"])["w"]
    _flip(path, off)
    e0, e1, w = np.zeros((2, 10), np.float32), np.zeros((2, 10), np.float32), np.zeros(7)
    with pytest.raises(gs.ChecksumError) as info:
        gs.Saver(_partitioned(e0, e1, w)).restore(prefix)
    assert info.value.tensor == "w"
    assert np.array_equal(e0, full[:2]) and np.array_equal(e1, full[2:])


def test_a_truncated_slice_of_a_partitioned_variable_changes_nothing(tmp_path) -> None:
    full = np.arange(40, dtype=np.float32).reshape(4, 10)
    prefix = gs.Saver(_partitioned(full[:2].copy(), full[2:].copy(), np.arange(7.0))).save(str(tmp_path / "ck"))
    data = prefix + ".data-00000-of-00001"
    with BundleReader(prefix) as r:
        last = max(r.entry(k).offset + r.entry(k).size for k, _ in r._all_entries())
    os.truncate(data, last - 1)
    e0, e1, w = np.zeros((2, 10), np.float32), np.zeros((2, 10), np.float32), np.zeros(7)
    with pytest.raises(gs.CorruptCheckpointError):
        gs.Saver(_partitioned(e0, e1, w)).restore(prefix)
    assert not e0.any() and not e1.any() and not w.any()


def _damaged_string_checkpoint(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    state = {"s": np.array([b"hello", b"world"] * 10, dtype=object), "x": np.arange(12.0).reshape(3, 4),
             "y": np.arange(5, dtype=np.int32)}
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    path, off, size = _locations(prefix, ["s"])["s"]
    _flip(path, off + size - 6, 1)  # inside the string bytes
    return prefix, state


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "python"])
def test_a_damaged_string_tensor_does_not_stop_the_other_restores(tmp_path, use_native) -> None:
    prefix, state = _damaged_string_checkpoint(tmp_path)
    x = np.zeros((3, 8))[:, ::2]
    dest = {"s": np.array([b""] * 20, dtype=object), "x": x, "y": np.zeros(5, np.int32)}
    with _native_path(use_native), pytest.raises(gs.ChecksumError) as info:
        gs.Saver(dest).restore(prefix)
    assert info.value.tensor == "s"
    assert np.array_equal(dest["y"], state["y"])
    assert np.array_equal(x, state["x"])


def test_python_path_names_the_first_damaged_variable_with_a_strided_destination(tmp_path) -> None:
    state = {"a": np.arange(10.0), "b": np.arange(12.0).reshape(3, 4), "c": np.arange(7.0)}
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    loc = _locations(prefix, ["a", "b"])
    for n in ("a", "b"):
        _flip(loc[n][0], loc[n][1])
    bx = np.zeros((3, 8))[:, ::2]
    dest = {"a": np.zeros(10), "b": bx, "c": np.zeros(7)}
    with _native_path(False), pytest.raises(gs.ChecksumError) as info:
        gs.Saver(dest).restore(prefix)
    assert info.value.tensor == "a"
    assert np.array_equal(dest["c"], state["c"])


def test_control_native_path_names_the_first_damaged_variable_with_a_strided_destination(tmp_path) -> None:
    """Control for the bug above: with the C extension the first damaged one is named and 'c' is restored."""
    if not native.available():
        pytest.skip("needs the C extension")
    state = {"a": np.arange(10.0), "b": np.arange(12.0).reshape(3, 4), "c": np.arange(7.0)}
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    loc = _locations(prefix, ["a", "b"])
    for n in ("a", "b"):
        _flip(loc[n][0], loc[n][1])
    dest = {"a": np.zeros(10), "b": np.zeros((3, 8))[:, ::2], "c": np.zeros(7)}
    with _native_path(True), pytest.raises(gs.ChecksumError) as info:
        gs.Saver(dest).restore(prefix)
    assert info.value.tensor == "a" and np.array_equal(dest["c"], state["c"])


def test_read_into_a_two_dimensional_byte_memoryview(tmp_path) -> None:
    prefix = gs.Saver({"a": np.arange(16, dtype=np.uint8), "b": np.arange(4, dtype=np.uint8)}).save(
        str(tmp_path / "ck"))
    with BundleReader(prefix) as r:
        out = np.zeros((4, 4), np.uint8)
        r.read_into("a", memoryview(out))
        assert np.array_equal(out.ravel(), np.arange(16))
        out2 = np.zeros((4, 4), np.uint8)
        r.read_many_into([("a", memoryview(out2))])
        assert np.array_equal(out2.ravel(), np.arange(16))
        with pytest.raises(gs.ShapeMismatchError):
            r.read_into("b", memoryview(np.zeros((4, 2), np.uint8)))


@needs_native
def test_progress_reaches_total_only_with_the_last_read(tmp_path) -> None:
    state = {f"t{i:03d}": np.full(1000, i, np.uint8) for i in range(100)}
    prefix = gs.Saver(dict(state)).save(str(tmp_path / "ck"))
    dest = {k: np.zeros_like(v) for i, (k, v) in enumerate(state.items()) if i % 2 == 0}
    events: list = []

    class Spy(PosixFileOps):
        def preadv(self, fd, bufs, off):
            got = super().preadv(fd, bufs, off)
            events.append(("read", got))
            return got

    with config.set(pack_bytes=4096, reader_threads=1):
        gs.Saver(dest, fileops=Spy()).restore(prefix, strict=False, progress=lambda a, b: events.append((a, b)))
    assert all(np.array_equal(dest[k], state[k]) for k in dest)
    total = sum(v.nbytes for v in dest.values())
    first_full = events.index((total, total))
    last_read = max(i for i, e in enumerate(events) if e[0] == "read")
    assert first_full > last_read, (first_full, last_read, len(events))


# ============================================================================== a save killed inside make_temp_dir
_KILLED_BEFORE_OWNER = textwrap.dedent(
    """
    import os, signal, sys, numpy as np, gpusaver as gs
    from gpusaver.storage.fileops import PosixFileOps

    class DieBeforeOwner(PosixFileOps):
        def rename(self, src, dst):
            if os.path.basename(dst) == "OWNER":  # the owner record is written and locked, not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
            return super().rename(src, dst)

    gs.Saver({"w": np.arange(10.0)}, fileops=DieBeforeOwner()).save(os.path.join(sys.argv[1], "model"), global_step=2)
    """
)


def test_a_save_killed_before_its_owner_record_is_in_place_is_cleaned_once_old(tmp_path) -> None:
    """A process killed between creating its temp directory and renaming its locked owner record into place
    leaves a directory with only ``OWNER.tmp``: nothing tells it from a live save's first instant, so the next save
    leaves it alone until it is ORPHAN_AGE old, then removes it (README, Guarantees); a user's directory of the
    same shape of name with other content is never removed."""
    from gpusaver.pipeline import tempdirs

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    gs.Saver({"w": np.arange(10.0)}).save(str(ckpt / "model"), global_step=1)
    done = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_OWNER, str(ckpt)], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    left = [n for n in os.listdir(ckpt) if "_temp_" in n]
    assert len(left) == 1 and os.listdir(ckpt / left[0]) == ["OWNER.tmp"], left
    user = ckpt / ("notes_temp_" + "a" * 32)
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    empty = ckpt / ("model-3_temp_" + "b" * 32)  # killed right after its mkdir
    empty.mkdir()
    gs.Saver({"w": np.arange(10.0)}).save(str(ckpt / "model"), global_step=4)  # the next save cleans first
    assert sorted(n for n in os.listdir(ckpt) if "_temp_" in n) == sorted([left[0], user.name, empty.name])
    aged = os.stat(ckpt / left[0]).st_mtime - tempdirs.ORPHAN_AGE - 1
    for n in (left[0], user.name, empty.name):
        os.utime(ckpt / n, (aged, aged))
    gs.Saver({"w": np.arange(10.0)}).save(str(ckpt / "model"), global_step=5)
    assert sorted(n for n in os.listdir(ckpt) if "_temp_" in n) == [user.name]
    assert (user / "notes.txt").read_text() == "mine"
    assert gs.latest_checkpoint(str(ckpt)) == str(ckpt / "model-5")
