"""The CPU peers of ``bench.py``: each saves a dict of NumPy arrays and reads it back.

Every peer gets the same arrays and a directory of its own on the same file
system. ``setup_*`` runs untimed (building a Saver, converting arrays to a
library's tensor type); ``save``/``restore`` are the timed calls.
``restore`` returns the arrays read (by name) or None when it wrote into the
given arrays in place. Libraries are imported only when a peer is used.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

__all__ = ["PEERS", "Peer", "available", "iov_batches"]

_IOV_MAX = 1024
_MAX_IO = 1 << 30  # bytes per writev/preadv call (Linux stops near 2 GiB)


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


class Peer:
    """One library's save and restore."""

    name = ""
    module: str | None = None  # what must be importable
    fsyncs = False  # has a durable (fsync) mode
    verifies = "no"  # what its restore checks

    def __init__(self, directory: str) -> None:
        self.dir = directory

    def setup_save(self, arrays: Mapping[str, np.ndarray], durable: bool) -> None:
        self.arrays = arrays
        self.durable = durable

    def save(self) -> None:
        raise NotImplementedError

    def setup_restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays

    def restore(self) -> Mapping[str, Any] | None:
        raise NotImplementedError

    def restored_arrays(self, result: Mapping[str, Any] | None) -> list[np.ndarray]:
        """The values read, in the workload's order, as NumPy arrays."""
        if result is None:
            return list(self.arrays.values())
        return [np.asarray(result[k]) for k in self.arrays]


class Raw(Peer):
    """The limit: ``os.writev`` of the arrays themselves (their buffers, no views made)
    into one file, fsync when durable; ``os.preadv`` back into the same arrays."""

    name = "raw"
    fsyncs = True

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "raw.bin")

    def save(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for batch in iov_batches(self.arrays.values()):
                want = sum(_nbytes(b) for b in batch)
                done = os.writev(fd, batch)
                while done < want:
                    batch = _skip(batch, done)
                    want -= done
                    done = os.writev(fd, batch)
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def restore(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            offset = 0
            for batch in iov_batches(self.arrays.values()):
                want = sum(_nbytes(b) for b in batch)
                while want:
                    got = os.preadv(fd, batch, offset)
                    if got <= 0:
                        raise OSError(f"{self.path}: short file")
                    offset += got
                    want -= got
                    batch = _skip(batch, got)
        finally:
            os.close(fd)
        return None


class GpuSaver(Peer):
    """``gpusaver.Saver(arrays).save(prefix)`` / ``.restore(prefix)`` in place, crc32c verified."""

    name = "gpusaver"
    module = "gpusaver"
    fsyncs = True
    verifies = "crc32c"

    @property
    def prefix(self) -> str:
        return os.path.join(self.dir, "model")

    def setup_save(self, arrays: Mapping[str, np.ndarray], durable: bool) -> None:
        import gpusaver

        super().setup_save(arrays, durable)
        self.saver = gpusaver.Saver(dict(arrays), durable=durable)

    def save(self) -> None:
        self.saver.save(self.prefix)

    def setup_restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        import gpusaver

        super().setup_restore(arrays)
        self.saver = gpusaver.Saver(dict(arrays))

    def restore(self) -> None:
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

    def setup_save(self, arrays: Mapping[str, np.ndarray], durable: bool) -> None:
        super().setup_save(arrays, durable)
        self._names(arrays)
        self.tensors = [self.tf.convert_to_tensor(a) for a in arrays.values()]

    def save(self) -> None:
        self.tf.raw_ops.SaveV2(
            prefix=self.prefix, tensor_names=self.names, shape_and_slices=self.slices, tensors=self.tensors
        )

    def setup_restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().setup_restore(arrays)
        self._names(arrays)
        self.dtypes = [self.tf.float32] * len(arrays)

    def restore(self) -> Mapping[str, Any]:
        out = self.tf.raw_ops.RestoreV2(
            prefix=self.prefix, tensor_names=self.names, shape_and_slices=self.slices, dtypes=self.dtypes
        )
        return dict(zip(self.arrays, out))

    def restored_arrays(self, result: Mapping[str, Any] | None) -> list[np.ndarray]:
        assert result is not None
        return [result[k].numpy() for k in self.arrays]


class SafeTensors(Peer):
    """``safetensors.numpy.save_file`` / ``load_file`` (new arrays, no checksum)."""

    name = "safetensors"
    module = "safetensors"

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "model.safetensors")

    def save(self) -> None:
        from safetensors.numpy import save_file

        save_file(dict(self.arrays), self.path)

    def restore(self) -> Mapping[str, Any]:
        from safetensors.numpy import load_file

        return load_file(self.path)


class Torch(Peer):
    """``torch.save`` of ``torch.from_numpy`` tensors / ``torch.load(weights_only=True)`` (new tensors)."""

    name = "torch"
    module = "torch"

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "model.pt")

    def setup_save(self, arrays: Mapping[str, np.ndarray], durable: bool) -> None:
        import torch

        super().setup_save(arrays, durable)
        self.torch = torch
        self.tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def save(self) -> None:
        self.torch.save(self.tensors, self.path)

    def setup_restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        import torch

        super().setup_restore(arrays)
        self.torch = torch

    def restore(self) -> Mapping[str, Any]:
        return self.torch.load(self.path, weights_only=True)

    def restored_arrays(self, result: Mapping[str, Any] | None) -> list[np.ndarray]:
        assert result is not None
        return [result[k].numpy() for k in self.arrays]


class Numpy(Peer):
    """``numpy.savez`` / ``numpy.load`` reading every member (zip CRC-32 checked by zipfile)."""

    name = "numpy"
    module = "numpy"
    verifies = "crc32 (zip)"

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "model.npz")

    def save(self) -> None:
        np.savez(self.path, **self.arrays)

    def restore(self) -> Mapping[str, Any]:
        with np.load(self.path) as f:
            return {k: f[k] for k in f.files}


PEERS: dict[str, type[Peer]] = {p.name: p for p in (Raw, GpuSaver, TensorFlow, SafeTensors, Torch, Numpy)}


def available(name: str) -> str | None:
    """None when the peer can run here, else why not."""
    module = PEERS[name].module
    if module is None:
        return None
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None
