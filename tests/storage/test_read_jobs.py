"""The read engine's jobs: reads split into pieces, taken by threads in any order, checksums joined.

``checked_read_jobs`` cuts buffers larger than ``read_chunk_bytes`` into pieces, packs pieces into
jobs of at most that many bytes (and at most 1024 buffers each), and ``finish`` joins each split
buffer's pieces' crcs. ``run_jobs`` hands the jobs to threads one at a time. These tests run the
jobs in random orders, on real files, with sizes on both sides of every cut.
"""

from __future__ import annotations

import os
import random
import threading

import crc32c
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from gpusaver import config
from gpusaver.errors import CorruptCheckpointError
from gpusaver.storage import PosixFileOps, checked_read_jobs, read_with_checksums
from gpusaver.storage.parallel import run_jobs

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _file(tmp_path, data: bytes) -> int:
    path = tmp_path / "data"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


@PROPERTY
@given(
    chunk=st.sampled_from([1, 7, 64, 4096]),
    sizes=st.lists(st.integers(0, 9000), max_size=12),
    gaps=st.lists(st.integers(0, 2), max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_order_of_jobs_gives_every_buffer_and_its_crc(tmp_path, chunk, sizes, gaps, seed) -> None:
    """Buffers in one or more runs (a gap starts a new run), read by jobs executed in a random order: every buffer
    holds its file bytes and its crc32c, whether it was read whole or in pieces."""
    rng = np.random.default_rng(seed)
    total = sum(sizes) + 50
    data = rng.integers(0, 256, total, dtype=np.uint8).tobytes()
    fd = _file(tmp_path, data)
    try:
        runs: list[tuple[int, int, str, list]] = []
        bufs, expect = [], []
        pos = 0
        for i, n in enumerate(sizes):
            gap = gaps[i] if i < len(gaps) else 0
            if gap or not runs:
                pos += gap
                runs.append((fd, pos, "data", []))
            n = min(n, total - pos)
            buf = bytearray(n)
            runs[-1][3].append(memoryview(buf))
            bufs.append(buf)
            expect.append(data[pos : pos + n])
            pos += n
        with config.set(read_chunk_bytes=chunk):
            jobs, finish = checked_read_jobs(runs, len(bufs))
        for job in random.Random(seed).sample(jobs, len(jobs)):
            job()
        crcs = finish()
        assert [bytes(b) for b in bufs] == expect
        assert crcs == [crc32c.crc32c(e) for e in expect]
    finally:
        os.close(fd)


def test_job_sizes_and_iov_limit(tmp_path) -> None:
    """2,500 one-byte buffers and a 10-chunk one: a job holds at most 1,024 buffers, and less than two chunks of
    bytes (it closes at the piece that reaches a chunk; pieces are at most a chunk)."""
    data = bytes(range(256)) * 60
    fd = _file(tmp_path, data)
    try:
        small = [memoryview(bytearray(1)) for _ in range(2500)]
        big = memoryview(bytearray(10 * 1000))
        runs = [(fd, 0, "data", small + [big])]
        seen: list[int] = []

        class Spy(PosixFileOps):  # the read seam: every preadv a job makes
            def preadv(self, fd_, views, offset):
                seen.append(len(views))
                assert sum(len(v) for v in views) < 2 * 1000
                return super().preadv(fd_, views, offset)

        with config.set(read_chunk_bytes=1000):
            jobs, finish = checked_read_jobs(runs, 2501, Spy())
        run_jobs(jobs, 2, "test-read")
        assert max(seen) <= 1024
        crcs = finish()
        assert bytes(big) == data[2500:12500]
        assert crcs[-1] == crc32c.crc32c(data[2500:12500])
        assert crcs[:2500] == [crc32c.crc32c(data[i : i + 1]) for i in range(2500)]
    finally:
        os.close(fd)


def test_short_file_raises_naming_it(tmp_path) -> None:
    """A run past the file's end raises CorruptCheckpointError naming the file, from whichever thread read it."""
    fd = _file(tmp_path, b"x" * 100)
    try:
        runs = [(fd, 0, "the-data-file", [memoryview(bytearray(60)), memoryview(bytearray(60))])]
        with config.set(read_chunk_bytes=50), pytest.raises(CorruptCheckpointError, match="the-data-file"):
            read_with_checksums(runs, 2)
    finally:
        os.close(fd)


def test_run_jobs_runs_each_once_on_several_threads() -> None:
    """Every job runs exactly once; with more workers than jobs, or none, nothing breaks; the threads share them.

    The first job waits until a job runs on another thread (not for a time: a busy machine can
    delay a thread by any amount), so a run_jobs that used one thread alone fails the test."""
    for n_jobs, workers in ((0, 3), (1, 4), (5, 1), (40, 2), (40, 8)):
        ran: list[int] = []
        threads: set[int] = set()
        lock = threading.Lock()
        first: list[int] = []
        elsewhere = threading.Event()
        wait_for_others = n_jobs >= 40 and workers > 1

        def job(i: int):
            def run() -> None:
                me = threading.get_ident()
                with lock:
                    ran.append(i)
                    threads.add(me)
                    is_first = not first
                    if is_first:
                        first.append(me)
                    elif me != first[0]:
                        elsewhere.set()
                if is_first and wait_for_others:
                    elsewhere.wait(120)
            return run

        run_jobs([job(i) for i in range(n_jobs)], workers, "test-jobs")
        assert sorted(ran) == list(range(n_jobs))
        if wait_for_others:
            assert len(threads) > 1


def test_run_jobs_stops_taking_jobs_after_an_error_and_raises_the_first() -> None:
    """After a job raises, its thread starts no other job and the error is raised once every thread has stopped;
    with one thread, exactly the jobs up to the failed one ran."""
    for workers in (1, 2, 4):
        started: list[int] = []
        lock = threading.Lock()
        alive: list[threading.Thread] = []

        def job(i: int):
            def run() -> None:
                with lock:
                    started.append(i)
                    alive.append(threading.current_thread())
                if i == 3:
                    raise OSError(5, "boom")
            return run

        with pytest.raises(OSError, match="boom"):
            run_jobs([job(i) for i in range(1000)], workers, "test-jobs")
        assert 3 in started and len(set(started)) == len(started)
        assert not any(t.is_alive() for t in alive if t is not threading.current_thread())
        if workers == 1:
            assert started == [0, 1, 2, 3]
