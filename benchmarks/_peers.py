"""The CPU peers of ``bench.py``: each saves a dict of NumPy arrays and reads it back.

Every peer gets the same arrays (the same memory: see ``_benchlib.SharedArrays``)
and a directory of its own on the same file system. ``setup_*`` runs untimed
(building a Saver, converting arrays to a library's tensor type); ``save`` and
``restore`` are the timed calls, each for one *variant* of the peer (a dict:
``durable`` for an fsync, ``threads`` for a writer-thread count).
``restore`` returns the arrays read (by name) or None when it wrote into the
destination arrays in place. Libraries are imported only when a peer is used.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = ["PEERS", "PEER_ORDER", "Peer", "available", "iov_batches", "label", "writer_count"]

_IOV_MAX = 1024
_MAX_IO = 1 << 30  # bytes per pwritev/preadv call (Linux stops near 2 GiB)
_SPLIT_ALIGN = 4096  # the N-thread raw reference splits the file at page boundaries


#: Why gpusaver's writer-thread count could not be read (then the raw reference runs 1 thread only).
WRITER_COUNT_PROBLEM: list[str] = []


def writer_count() -> int:
    """gpusaver's writer-thread count (``gpusaver.storage.writer_count()``; it honours
    ``GPUSAVER_WRITER_THREADS``), or 1 when it can't be read (``WRITER_COUNT_PROBLEM`` says why)."""
    try:
        from gpusaver.storage import writer_count as _writer_count

        return int(_writer_count())
    except Exception as e:  # noqa: BLE001 - an older or refactored gpusaver: the reference still runs
        if not WRITER_COUNT_PROBLEM:
            WRITER_COUNT_PROBLEM.append(f"gpusaver.storage.writer_count() unavailable ({type(e).__name__}: {e})")
        return 1


def label(peer: str, variant: Mapping[str, Any]) -> str:
    """``raw 2t (durable)``, ``gpusaver``, ``dcp 1t``..."""
    out = peer
    if variant.get("threads"):
        out += f" {variant['threads']}t"
    if variant.get("durable"):
        out += " (durable)"
    return out


def _nbytes(buf: Any) -> int:
    return buf.nbytes if isinstance(buf, (np.ndarray, memoryview)) else len(buf)


def iov_batches(buffers: Iterable[Any]) -> Iterator[list[Any]]:
    """Groups buffers into lists of at most IOV_MAX buffers and about 1 GiB.

    Buffers (C-contiguous arrays are passed as they are, no views are made)
    larger than 1 GiB are split into byte memoryviews.
    """
    batch: list[Any] = []
    total = 0
    for buf in buffers:
        n = _nbytes(buf)
        if n > _MAX_IO:
            if batch:
                yield batch
                batch, total = [], 0
            view = memoryview(buf).cast("B")
            for lo in range(0, n, _MAX_IO):
                yield [view[lo : lo + _MAX_IO]]
            continue
        if batch and (len(batch) >= _IOV_MAX or total + n > _MAX_IO):
            yield batch
            batch, total = [], 0
        batch.append(buf)
        total += n
    if batch:
        yield batch


def _skip(buffers: list[Any], n: int) -> list[Any]:
    """What is left of ``buffers`` after their first ``n`` bytes."""
    out = []
    for buf in buffers:
        size = _nbytes(buf)
        if n >= size:
            n -= size
            continue
        out.append(memoryview(buf).cast("B")[n:] if n else buf)
        n = 0
    return out


def split_ranges(buffers: Sequence[Any], parts: int) -> list[tuple[int, list[Any]]]:
    """The buffers laid end to end, cut into ``parts`` runs of about equal bytes.

    Returns ``(file offset, buffers)`` per run; cuts fall on 4 KiB boundaries of
    the file, a buffer that a cut crosses is split into byte memoryviews, every
    other buffer is passed as it is.
    """
    total = sum(_nbytes(b) for b in buffers)
    if parts <= 1 or total < parts * _SPLIT_ALIGN:
        return [(0, list(buffers))]
    cuts = [min(total, (total * k // parts) // _SPLIT_ALIGN * _SPLIT_ALIGN) for k in range(1, parts)] + [total]
    runs: list[tuple[int, list[Any]]] = []
    start, cur, pos, k = 0, [], 0, 0
    for buf in buffers:
        n = _nbytes(buf)
        lo = 0
        while lo < n:
            room = cuts[k] - (pos + lo)
            take = n - lo if room >= n - lo else room
            if take > 0:
                cur.append(buf if (lo == 0 and take == n) else memoryview(buf).cast("B")[lo : lo + take])
                lo += take
            if pos + lo == cuts[k] and k < len(cuts) - 1:
                runs.append((start, cur))
                start, cur, k = cuts[k], [], k + 1
        pos += n
    runs.append((start, cur))
    return [r for r in runs if r[1]]


class _Pool:
    """``n`` - 1 long-lived threads; ``run(fns)`` runs ``fns[0]`` here and the others on them."""

    def __init__(self, n: int) -> None:
        import queue

        self.jobs: Any = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._loop, daemon=True, name=f"raw-{i}") for i in range(n - 1)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, box, done = job
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.append(e)
            done.release()

    def run(self, fns: Sequence[Callable[[], None]]) -> None:
        box: list[BaseException] = []
        done = threading.Semaphore(0)
        for fn in fns[1:]:
            self.jobs.put((fn, box, done))
        fns[0]()
        for _ in fns[1:]:
            done.acquire()
        if box:
            raise box[0]

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)


class Peer:
    """One library's save and restore."""

    name = ""
    module: str | None = None  # what must be importable
    verifies = "no"  # what its restore checks
    in_place = False  # restores into the destination arrays it is given
    #: variants of the timed calls, in the order they run within a round (see :meth:`variants`)
    save_variants: list[dict[str, Any]] = [{}]
    restore_variants: list[dict[str, Any]] = [{}]

    def __init__(self, directory: str) -> None:
        self.dir = directory

    @classmethod
    def variants(cls, op: str) -> list[dict[str, Any]]:
        """The variants of ``op`` ("save" or "restore") this peer runs, in order."""
        return list(cls.save_variants if op == "save" else cls.restore_variants)

    @classmethod
    def unsupported(cls, dtypes: set[str]) -> str | None:
        """Why this peer can't take a workload of these dtypes, or None."""
        return None

    @classmethod
    def note(cls, dtypes: set[str]) -> str | None:
        """How this peer handles the workload, when it needs saying."""
        return None

    def setup_save(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays

    def save(self, variant: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def setup_restore(self, arrays: Mapping[str, np.ndarray], dest: Mapping[str, np.ndarray] | None) -> None:
        """``arrays``: the saved values (names, shapes, dtypes); ``dest``: where in-place peers read into."""
        self.arrays = arrays
        self.dest = dest

    def restore(self, variant: Mapping[str, Any]) -> Mapping[str, Any] | None:
        raise NotImplementedError

    def restored_arrays(self, result: Mapping[str, Any] | None) -> list[Any]:
        """The values read, in the workload's order, as NumPy arrays (any dtype: bytes are compared)."""
        if result is None:
            assert self.dest is not None
            return list(self.dest.values())
        return [np.asarray(result[k]) for k in self.arrays]

    def close(self) -> None:
        pass


class Raw(Peer):
    """The reference: ``os.pwritev`` / ``os.preadv`` of the arrays' own memory, one file,
    from 1 thread and from N threads (N = gpusaver's writer-thread count), each thread
    taking one contiguous run of about 1/N of the bytes; fsync when durable. The faster
    of the two (by median) is the reference that ratios are taken against."""

    name = "raw"
    in_place = True

    @classmethod
    def variants(cls, op: str) -> list[dict[str, Any]]:
        # gpusaver is imported here, not at import time: a child puts --gpusaver-src on sys.path first
        threads = sorted({1, writer_count()})
        if op == "save":
            return [{"durable": d, "threads": t} for d in (True, False) for t in threads]
        return [{"threads": t} for t in threads]

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "raw.bin")

    def _plans(self, arrays: Mapping[str, np.ndarray]) -> None:
        buffers = list(arrays.values())
        self.plans = {t: [(off, list(iov_batches(bufs))) for off, bufs in split_ranges(buffers, t)]
                      for t in {1, writer_count()}}
        self.pool = _Pool(max(len(p) for p in self.plans.values()))

    def setup_save(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().setup_save(arrays)
        self._plans(arrays)

    def setup_restore(self, arrays: Mapping[str, np.ndarray], dest: Mapping[str, np.ndarray] | None) -> None:
        super().setup_restore(arrays, dest)
        assert dest is not None
        self._plans(dest)

    @staticmethod
    def _write(fd: int, offset: int, batches: list[list[Any]]) -> None:
        for batch in batches:
            want = sum(_nbytes(b) for b in batch)
            while want:
                done = os.pwritev(fd, batch, offset)
                offset += done
                want -= done
                if want:
                    batch = _skip(batch, done)

    @staticmethod
    def _read(fd: int, offset: int, batches: list[list[Any]], path: str) -> None:
        for batch in batches:
            want = sum(_nbytes(b) for b in batch)
            while want:
                got = os.preadv(fd, batch, offset)
                if got <= 0:
                    raise OSError(f"{path}: short file")
                offset += got
                want -= got
                if want:
                    batch = _skip(batch, got)

    def save(self, variant: Mapping[str, Any]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            plan = self.plans[variant.get("threads") or 1]
            self.pool.run([lambda off=off, b=b: self._write(fd, off, b) for off, b in plan])
            if variant.get("durable"):
                os.fsync(fd)
        finally:
            os.close(fd)

    def restore(self, variant: Mapping[str, Any]) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            plan = self.plans[variant.get("threads") or 1]
            self.pool.run([lambda off=off, b=b: self._read(fd, off, b, self.path) for off, b in plan])
        finally:
            os.close(fd)
        return None

    def close(self) -> None:
        if hasattr(self, "pool"):
            self.pool.close()


class GpuSaver(Peer):
    """``gpusaver.Saver(arrays, durable=...).save(prefix)`` / ``Saver(dest).restore(prefix)`` in place, crc32c verified."""

    name = "gpusaver"
    module = "gpusaver"
    verifies = "crc32c"
    in_place = True
    save_variants = [{"durable": True}, {"durable": False}]

    @property
    def prefix(self) -> str:
        return os.path.join(self.dir, "model")

    def setup_save(self, arrays: Mapping[str, np.ndarray]) -> None:
        import gpusaver

        super().setup_save(arrays)
        self.savers = {d: gpusaver.Saver(dict(arrays), durable=d) for d in (True, False)}

    def save(self, variant: Mapping[str, Any]) -> None:
        self.savers[bool(variant.get("durable"))].save(self.prefix)

    def setup_restore(self, arrays: Mapping[str, np.ndarray], dest: Mapping[str, np.ndarray] | None) -> None:
        import gpusaver

        super().setup_restore(arrays, dest)
        assert dest is not None
        self.saver = gpusaver.Saver(dict(dest))

    def restore(self, variant: Mapping[str, Any]) -> None:
        self.saver.restore(self.prefix)
        return None


class TensorFlow(Peer):
    """``tf.raw_ops.SaveV2`` / ``RestoreV2``, eager; restore verifies crc32c and returns new tensors."""

    name = "tensorflow"
    module = "tensorflow"
    verifies = "crc32c"

    @property
    def prefix(self) -> str:
        return os.path.join(self.dir, "model")

    def _names(self, arrays: Mapping[str, np.ndarray]) -> None:
        import tensorflow as tf

        self.tf = tf
        self.names = tf.constant(list(arrays))
        self.slices = tf.constant([""] * len(arrays))

    def setup_save(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().setup_save(arrays)
        self._names(arrays)
        self.tensors = [self.tf.convert_to_tensor(a) for a in arrays.values()]

    def save(self, variant: Mapping[str, Any]) -> None:
        self.tf.raw_ops.SaveV2(
            prefix=self.prefix, tensor_names=self.names, shape_and_slices=self.slices, tensors=self.tensors
        )

    def setup_restore(self, arrays: Mapping[str, np.ndarray], dest: Mapping[str, np.ndarray] | None) -> None:
        super().setup_restore(arrays, dest)
        self._names(arrays)
        self.dtypes = [self.tf.as_dtype(a.dtype) for a in arrays.values()]

    def restore(self, variant: Mapping[str, Any]) -> Mapping[str, Any]:
        out = self.tf.raw_ops.RestoreV2(
            prefix=self.prefix, tensor_names=self.names, shape_and_slices=self.slices, dtypes=self.dtypes
        )
        return dict(zip(self.arrays, out))

    def restored_arrays(self, result: Mapping[str, Any] | None) -> list[Any]:
        assert result is not None
        return [result[k].numpy() for k in self.arrays]


class SafeTensors(Peer):
    """``safetensors.numpy.save_file`` / ``load_file`` (new arrays, no checksum)."""

    name = "safetensors"
    module = "safetensors"

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "model.safetensors")

    def save(self, variant: Mapping[str, Any]) -> None:
        from safetensors.numpy import save_file

        save_file(dict(self.arrays), self.path)

    def restore(self, variant: Mapping[str, Any]) -> Mapping[str, Any]:
        from safetensors.numpy import load_file

        return load_file(self.path)


def _torch_view(torch: Any, arr: np.ndarray) -> Any:
    """A torch tensor on ``arr``'s memory (bfloat16 through an int16 view: NumPy has no bfloat16)."""
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _torch_numpy(torch: Any, t: Any) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


class Torch(Peer):
    """``torch.save`` of ``torch.from_numpy`` tensors / ``torch.load(weights_only=True)`` (new tensors)."""

    name = "torch"
    module = "torch"

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "model.pt")

    def setup_save(self, arrays: Mapping[str, np.ndarray]) -> None:
        import torch

        super().setup_save(arrays)
        self.torch = torch
        self.tensors = {k: _torch_view(torch, v) for k, v in arrays.items()}

    def save(self, variant: Mapping[str, Any]) -> None:
        self.torch.save(self.tensors, self.path)

    def setup_restore(self, arrays: Mapping[str, np.ndarray], dest: Mapping[str, np.ndarray] | None) -> None:
        import torch

        super().setup_restore(arrays, dest)
        self.torch = torch

    def restore(self, variant: Mapping[str, Any]) -> Mapping[str, Any]:
        return self.torch.load(self.path, weights_only=True)

    def restored_arrays(self, result: Mapping[str, Any] | None) -> list[Any]:
        assert result is not None
        return [_torch_numpy(self.torch, result[k]) for k in self.arrays]


class Numpy(Peer):
    """``numpy.savez`` / ``numpy.load`` reading every member (zip CRC-32 checked by zipfile)."""

    name = "numpy"
    module = "numpy"
    verifies = "crc32 (zip)"

    @classmethod
    def note(cls, dtypes: set[str]) -> str | None:
        if "bfloat16" in dtypes:
            return "bfloat16 has no .npy type code: savez stores those tensors as 2-byte void ('|V2'), same bytes"
        return None

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "model.npz")

    def save(self, variant: Mapping[str, Any]) -> None:
        np.savez(self.path, **self.arrays)

    def restore(self, variant: Mapping[str, Any]) -> Mapping[str, Any]:
        with np.load(self.path) as f:
            return {k: f[k] for k in f.files}


class DCP(Peer):
    """PyTorch Distributed Checkpoint, one process, no process group:
    ``dcp.save(state_dict, storage_writer=FileSystemWriter(path, thread_count=t, sync_files=durable))``
    (t files, written by t threads) / ``dcp.load(state_dict, storage_reader=FileSystemReader(path))``,
    which reads into the given tensors (here torch views of the destination arrays)."""

    name = "dcp"
    module = "torch.distributed.checkpoint"
    in_place = True
    save_variants = [{"durable": d, "threads": t} for d in (True, False) for t in (1, 2)]

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "dcp")

    def _torch(self) -> Any:
        import warnings

        import torch
        import torch.distributed.checkpoint as dcp

        # "torch.distributed is ... uninitialized, assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        self.dcp = dcp
        return torch

    def setup_save(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().setup_save(arrays)
        torch = self._torch()
        self.state = {k: _torch_view(torch, v) for k, v in arrays.items()}

    def save(self, variant: Mapping[str, Any]) -> None:
        writer = self.dcp.FileSystemWriter(
            self.path, thread_count=variant.get("threads") or 1, sync_files=bool(variant.get("durable"))
        )
        self.dcp.save(self.state, storage_writer=writer)

    def setup_restore(self, arrays: Mapping[str, np.ndarray], dest: Mapping[str, np.ndarray] | None) -> None:
        super().setup_restore(arrays, dest)
        assert dest is not None
        torch = self._torch()
        self.state = {k: _torch_view(torch, v) for k, v in dest.items()}

    def restore(self, variant: Mapping[str, Any]) -> None:
        self.dcp.load(self.state, storage_reader=self.dcp.FileSystemReader(self.path))
        return None


class Orbax(Peer):
    """``orbax.checkpoint.StandardCheckpointer().save(path, arrays)`` then ``wait_until_finished()``
    (orbax saves in the background: the timed call covers the whole write; TensorStore, OCDBT;
    it fsyncs its files, so it is a durable save) / ``.restore(path, target)`` with the saved
    structure (NumPy arrays of the names, shapes and dtypes) as the target: new NumPy arrays,
    no JAX device transfer."""

    name = "orbax"
    module = "orbax.checkpoint"
    save_variants = [{"durable": True}]

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "orbax")

    def _checkpointer(self) -> None:
        import orbax.checkpoint as ocp
        from absl import logging as absl_logging

        # orbax logs through absl, INFO lines for every save and restore where absl's verbosity is raised
        # (flags, another library): warnings and errors only, set in this process (the peer's own) alone
        absl_logging.set_verbosity(absl_logging.WARNING)
        self.ckpt = ocp.StandardCheckpointer()

    def setup_save(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().setup_save(arrays)
        self._checkpointer()
        self.tree = dict(arrays)

    def save(self, variant: Mapping[str, Any]) -> None:
        # orbax refuses an existing directory: a previous save's files go first (the bench deletes every
        # peer's files after its turn, so there is normally nothing to delete here)
        if os.path.lexists(self.path):
            import shutil

            shutil.rmtree(self.path)
        self.ckpt.save(self.path, self.tree)
        self.ckpt.wait_until_finished()

    def setup_restore(self, arrays: Mapping[str, np.ndarray], dest: Mapping[str, np.ndarray] | None) -> None:
        super().setup_restore(arrays, dest)
        self._checkpointer()
        # the target only says what to read and as what (np.empty: never filled); orbax returns new arrays
        self.target = {k: np.empty(v.shape, v.dtype) for k, v in arrays.items()}

    def restore(self, variant: Mapping[str, Any]) -> Mapping[str, Any]:
        return self.ckpt.restore(self.path, self.target)

    def close(self) -> None:
        if hasattr(self, "ckpt"):
            self.ckpt.close()


PEERS: dict[str, type[Peer]] = {p.name: p for p in (Raw, GpuSaver, TensorFlow, SafeTensors, Torch, Numpy, DCP, Orbax)}
PEER_ORDER = tuple(PEERS)


def available(name: str) -> str | None:
    """None when the peer's module is installed here, else why not (an import that fails
    is found by the peer's own process and reported the same way)."""
    module = PEERS[name].module
    if module is None:
        return None
    try:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    except ModuleNotFoundError as e:  # a parent package is missing
        return f"{module} is not installed ({e})"
    except Exception as e:  # noqa: BLE001
        return f"{module}: {type(e).__name__}: {e}"
    return None


if __name__ == "__main__":  # a quick self-check of split_ranges
    bufs = [np.arange(n, dtype=np.uint8) for n in (10_000, 1, 5000, 70_000, 3)]
    for parts in (1, 2, 3, 4):
        runs = split_ranges(bufs, parts)
        joined = b"".join(bytes(memoryview(b).cast("B")) for _, r in runs for b in r)
        assert joined == b"".join(b.tobytes() for b in bufs), parts
        assert [o for o, _ in runs] == sorted(o for o, _ in runs)
        print(parts, [(o, sum(_nbytes(b) for b in r)) for o, r in runs], file=sys.stderr)
