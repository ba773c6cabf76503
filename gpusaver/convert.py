"""Conversion between gpusaver (TensorFlow V2) checkpoints and safetensors files, both ways.

Bit-exact for every dtype both formats hold: bool, int8..int64, uint8..uint64,
float16, bfloat16, float32, float64, float8 e4m3fn and e5m2 (safetensors'
``F8_E4M3``, ``F8_E5M2``), and, where the installed safetensors writes them,
float8 e4m3fnuz / e5m2fnuz and complex64 (``C64``). Names are kept as they are.

* :func:`to_safetensors` reads a checkpoint (a prefix, its ``.index`` file, or a
  directory with a ``checkpoint`` state file) and writes one ``.safetensors``
  file, or Hugging Face's sharded form (``model-00001-of-00003.safetensors`` ...
  plus ``model.safetensors.index.json``). The files are written with the
  ``safetensors`` library (the ``gpusaver[safetensors]`` extra), from the
  checkpoint's data files mapped into memory, each tensor's crc32c checked on
  the way: nothing is held in memory twice, and only partitioned tensors (read
  whole) are held at all. They are written under temporary names and renamed
  into place, the index last, once all of them are complete.
* :func:`from_safetensors` reads a ``.safetensors`` file, a
  ``*.safetensors.index.json`` with its shards, or a directory holding either,
  straight from the files (the documented layout: an 8-byte little-endian
  header length, a JSON header, the data; the library is not needed, and its
  NumPy reader cannot return float8), and writes one checkpoint through
  :class:`~gpusaver.format.BundleWriter`, which commits it atomically. The files
  are read in large pieces, never mapped: one that shrinks meanwhile raises
  :class:`~gpusaver.errors.CorruptCheckpointError` naming it (a mapping would die
  of SIGBUS), and the destination is left as it was.

Both check everything they can before a byte is written: a tensor that the
other format cannot hold raises :class:`~gpusaver.errors.UnsupportedDTypeError`
naming it (or is left out with a warning, ``skip_unsupported=True``), and an
output that already exists is refused, never overwritten.
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import mmap
import os
import re
import struct
import threading
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from gpusaver.tree import RESERVED_PREFIX
from gpusaver.errors import (
    BackendUnavailableError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    UnsupportedDTypeError,
    write_error,
)
from gpusaver.format import BundleReader, BundleWriter, crc, dtypes
from gpusaver.format.entry import BundleEntry
from gpusaver.format.naming import data_files, data_filename, index_filename
from gpusaver.storage import os_error
from gpusaver.storage.paths import local_path, open_regular
from gpusaver.progress import Progress, ProgressCallback

__all__ = [
    "ConversionResult",
    "DEFAULT_MAX_SHARD_SIZE",
    "SAFETENSORS_DTYPES",
    "convert",
    "direction",
    "from_safetensors",
    "parse_size",
    "to_safetensors",
]

#: Hugging Face's default shard size (``"5GB"``), used when the destination is a directory.
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
#: safetensors refuses headers larger than this (100 MB); so does this reader.
_MAX_HEADER = 100_000_000
#: Checkpoint bytes are checksummed, and progress counted, this many at a time.
_SEGMENT = 16 << 20
#: safetensors -> checkpoint: tensors below _LARGE_BYTES are read and handed to the BundleWriter in
#: groups of at most _GROUP_BYTES (from the first's start to the last's end) and _GROUP_COUNT tensors,
#: each group in a buffer of its own; larger ones in _SLAB_BYTES pieces, into _SLAB_COUNT slabs reused
#: once written. The source is read, never mapped: a file that shrinks is an error, not a SIGBUS.
_LARGE_BYTES = 1 << 20
_GROUP_BYTES = 4 << 20
_GROUP_COUNT = 1024
_SLAB_BYTES = 16 << 20
_SLAB_COUNT = 6
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class _DType:
    code: str  # the safetensors header's dtype
    tf: int  # TensorFlow's DataType enum
    spec: str  # the name safetensors.TensorSpec takes

    @property
    def numpy(self) -> np.dtype:
        return dtypes.to_numpy(self.tf)


_DTYPES = [
    _DType("BOOL", 10, "bool"),
    _DType("U8", 4, "uint8"),
    _DType("I8", 6, "int8"),
    _DType("I16", 5, "int16"),
    _DType("U16", 17, "uint16"),
    _DType("I32", 3, "int32"),
    _DType("U32", 22, "uint32"),
    _DType("I64", 9, "int64"),
    _DType("U64", 23, "uint64"),
    _DType("F16", 19, "float16"),
    _DType("BF16", 14, "bfloat16"),
    _DType("F32", 1, "float32"),
    _DType("F64", 2, "float64"),
    _DType("F8_E4M3", 25, "float8_e4m3fn"),
    _DType("F8_E5M2", 24, "float8_e5m2"),
    _DType("F8_E4M3FNUZ", 26, "float8_e4m3fnuz"),
    _DType("F8_E5M2FNUZ", 28, "float8_e5m2fnuz"),
    _DType("C64", 8, "complex64"),
]
_BY_CODE = {d.code: d for d in _DTYPES}
_BY_TF = {d.tf: d for d in _DTYPES}

#: safetensors dtype -> the NumPy dtype a converted tensor has (every dtype both formats can hold;
#: whether the installed safetensors can *write* each one is checked when it is needed).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {d.code: d.numpy for d in _DTYPES}


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote.

    Attributes:
        destination: the checkpoint prefix, ``.safetensors`` file or directory written.
        paths: every file written, in the order they were committed (the
            index, when there is one, last).
        tensors: the names of the tensors written, in the order written.
        total_bytes: their bytes (the tensors' data, not the files' sizes).
        skipped: ``(name, why)`` of each tensor left out (``skip_unsupported``).
    """

    destination: str
    paths: tuple[str, ...]
    tensors: tuple[str, ...]
    total_bytes: int
    skipped: tuple[tuple[str, str], ...] = ()


Warn = Callable[[str], None]


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=2)


# ------------------------------------------------------------------ helpers
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """A shard size in bytes: an int, or a string as Hugging Face writes them.

    ``"5GB"`` is 5 * 10**9 bytes (KB, MB, GB, TB are decimal, as in
    huggingface_hub), ``"500MiB"`` is 500 * 2**20 (KiB, MiB, GiB, TiB binary);
    units are case-insensitive, a bare number is bytes, ``"1.5GB"`` is allowed.

    Raises:
        InvalidArgumentError: not a positive size.
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    elif isinstance(size, str) and (match := _SIZE_RE.fullmatch(size)) is not None and match.group(2).upper() in _UNITS:
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    else:
        raise InvalidArgumentError(
            f"invalid shard size {size!r}: give bytes, or a number with a unit such as '5GB', '500MB' or '2GiB'"
        )
    if value < 1:
        raise InvalidArgumentError(f"invalid shard size {size!r}: it must be at least one byte")
    return value


def _safetensors() -> Any:
    """The ``safetensors`` module, imported on first use."""
    try:
        import safetensors
    except ImportError:
        raise BackendUnavailableError(
            "writing safetensors needs the 'safetensors' package: pip install 'gpusaver[safetensors]'"
        ) from None
    return safetensors


def _writable_codes(lib: Any) -> frozenset[str]:
    """The dtypes of :data:`_DTYPES` that the installed safetensors can write."""
    spec = getattr(lib, "TensorSpec", None)
    codes = set()
    for d in _DTYPES:
        try:
            if spec is not None:
                lib.serialize({"x": spec(dtype=d.spec, shape=[0], data_ptr=0, data_len=0)})
            else:  # before TensorSpec: a dict of dtype, shape and bytes per tensor
                lib.serialize({"x": {"dtype": d.code, "shape": [0], "data": b""}})
        except Exception:  # noqa: BLE001 - any refusal means: not this dtype
            continue
        codes.add(d.code)
    return frozenset(codes)


def _is_safetensors_name(path: str) -> bool:
    return path.endswith((".safetensors", ".safetensors.index.json"))


def _is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "checkpoint")) or os.path.isfile(path + ".index")


def _holds_safetensors(directory: str) -> bool:
    try:
        return any(_is_safetensors_name(n) for n in os.listdir(directory))
    except OSError:
        return False


def direction(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> str:
    """Which way ``convert(src, dst)`` goes: ``"to_safetensors"`` or ``"from_safetensors"``.

    ``src`` is safetensors when it ends in ``.safetensors`` or
    ``.safetensors.index.json``, or is a directory holding such files (and no
    checkpoint state file); then ``dst`` is a checkpoint prefix. Otherwise
    ``src`` is a checkpoint and ``dst`` a ``.safetensors`` file or, named
    anything else, a directory (made if missing) for Hugging Face's form.

    Raises:
        InvalidArgumentError: the paths do not say which way.
    """
    s, d = local_path(src), local_path(dst)
    from_st = _is_safetensors_name(s.rstrip("/" + os.sep)) or (
        os.path.isdir(s) and not _is_checkpoint_dir(s) and _holds_safetensors(s)
    )
    if from_st:
        if _is_safetensors_name(d):
            raise InvalidArgumentError(
                f"both {os.fspath(src)!r} and {os.fspath(dst)!r} are safetensors; one side must be a checkpoint"
            )
        return "from_safetensors"
    if _is_safetensors_name(d) or not os.path.lexists(d) or os.path.isdir(d):
        return "to_safetensors"
    raise InvalidArgumentError(
        f"cannot tell which way to convert {os.fspath(src)!r} to {os.fspath(dst)!r}: {os.fspath(dst)!r} is a "
        "file; to write safetensors, DST ends in '.safetensors' or is a directory; to read them, SRC is a "
        "'.safetensors' file, a '*.safetensors.index.json' or a directory holding them"
    )


def _refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise write_error(errno.EEXIST, f"{path!r} already exists; convert never overwrites", path)


def _makedirs(directory: str, created: list[str]) -> None:
    """Creates ``directory`` and its missing parents, recording each one created."""
    missing = []
    d = os.path.abspath(directory or ".")
    while not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        except OSError as e:
            raise os_error(e, "creating directory", d) from e
        created.append(d)


def _remove_quietly(paths: Sequence[str], created_dirs: Sequence[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
    for d in reversed(created_dirs):
        try:
            os.rmdir(d)  # only if empty
        except OSError:
            pass


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


def _temp_name(final: str) -> str:
    return f"{final}.tempstate{uuid.uuid4().int & ((1 << 63) - 1)}"


# ------------------------------------------------------- checkpoint -> safetensors
@dataclass
class _Out:
    """One checkpoint tensor to write."""

    name: str
    entry: BundleEntry
    dtype: _DType
    nbytes: int


class _CheckpointBytes:
    """Each tensor's bytes, verified: a view of the data file mapped into memory
    (partitioned tensors and big-endian checkpoints: read whole, into memory)."""

    def __init__(self, reader: BundleReader, counter: Progress | None) -> None:
        self.reader = reader
        self.counter = counter
        self._maps: dict[int, tuple[mmap.mmap | None, np.ndarray]] = {}

    def _count(self, n: int) -> None:
        if self.counter is not None and n:
            self.counter.add(n)

    def _mapped(self, shard: int, fd: int) -> np.ndarray:
        cached = self._maps.get(shard)
        if cached is None:
            if os.fstat(fd).st_size == 0:
                cached = (None, np.empty(0, np.uint8))
            else:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                cached = (mm, np.frombuffer(mm, np.uint8))
            self._maps[shard] = cached
        return cached[1]

    def get(self, item: _Out) -> np.ndarray:
        """The tensor's little-endian bytes, as a flat uint8 array, its crc32c checked.

        Raises:
            ChecksumError: the stored bytes do not match their crc32c.
        """
        reader, entry = self.reader, item.entry
        if entry.slices and not item.nbytes:  # nothing stored (and maybe a shape NumPy cannot hold, [0, 2**61])
            return np.empty(0, np.uint8)
        if entry.slices or (reader.big_endian and item.nbytes):
            value = np.ascontiguousarray(reader.get_tensor(item.name))
            self._count(value.nbytes)
            return value.reshape(-1).view(np.uint8)
        fd, offset, size, path = reader.data_location(item.name, entry)
        view = self._mapped(entry.shard_id, fd)[offset : offset + size]
        running = crc.Running(entry.crc32c, path, item.name)
        for lo in range(0, size, _SEGMENT):
            piece = view[lo : lo + _SEGMENT]
            running.update(piece)
            self._count(len(piece))
        running.check()
        return view

    def close(self) -> None:
        """Unmaps the data files (their arrays are dropped first)."""
        mms = [mm for mm, _ in self._maps.values() if mm is not None]
        self._maps = {}
        for mm in mms:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere: the collector closes it
                pass


def _plan_to(
    reader: BundleReader, writable: frozenset[str], version: str, skip: bool, warn: Warn
) -> tuple[list[_Out], list[tuple[str, str]]]:
    """What to write (sorted by name) and what to skip, checked before anything is written."""
    items: list[_Out] = []
    skipped: list[tuple[str, str]] = []
    for name, entry in sorted(reader.variables().items()):
        if name.startswith(RESERVED_PREFIX):
            continue  # gpusaver's own (the tree's structure): not a tensor of the model
        d = _BY_TF.get(entry.dtype)
        reserved = name == "__metadata__"
        if reserved:
            reason = "its name '__metadata__' is reserved for the safetensors header's metadata"
        elif entry.dtype == dtypes.DT_STRING:
            reason = "string tensors (DT_STRING) have no safetensors dtype"
        elif d is None:
            reason = f"{dtypes.dtype_name(entry.dtype)} has no safetensors dtype"
        elif d.code not in writable:
            reason = (f"{dtypes.dtype_name(entry.dtype)} is safetensors {d.code}, which the installed "
                      f"safetensors {version} cannot write")
        else:
            reason = ""
        if reason:
            if skip:
                skipped.append((name, reason))
                warn(f"skipped tensor {name!r}: {reason}")
                continue
            message = (f"cannot convert tensor {name!r} to safetensors: {reason} "
                       "(skip_unsupported=True, or --skip-unsupported, leaves it out)")
            if reserved:
                raise InvalidArgumentError(message)
            raise UnsupportedDTypeError(message)
        assert d is not None
        if not entry.slices:
            reader.check_size(name, entry)
        items.append(_Out(name, entry, d, entry.num_elements * d.numpy.itemsize))
    return items, skipped


def _split(items: list[_Out], limit: int | None) -> list[list[_Out]]:
    """Shards as Hugging Face cuts them: in order, a new shard when the next tensor
    would pass ``limit``; a tensor larger than ``limit`` gets a shard of its own."""
    if limit is None:
        return [items]
    shards: list[list[_Out]] = []
    current: list[_Out] = []
    size = 0
    for item in items:
        if item.nbytes > limit:
            shards.append([item])
            continue
        if current and size + item.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _write_safetensors_file(lib: Any, path: str, items: list[_Out], source: _CheckpointBytes) -> None:
    """Writes one safetensors file with the library, from the checkpoint's verified bytes."""
    spec = getattr(lib, "TensorSpec", None)
    keep: list[np.ndarray] = []  # the buffers TensorSpec points into, alive until written
    tensors: dict[str, Any] = {}
    for item in items:
        data = source.get(item)
        shape = [int(d) for d in item.entry.shape]
        if spec is not None:
            keep.append(data)
            tensors[item.name] = spec(dtype=item.dtype.spec, shape=shape, data_ptr=data.ctypes.data,
                                      data_len=data.nbytes)
        else:  # an older safetensors takes bytes
            tensors[item.name] = {"dtype": item.dtype.code, "shape": shape, "data": data.tobytes()}
    failure = getattr(lib, "SafetensorError", OSError)
    try:
        lib.serialize_file(tensors, path)
        _fsync_file(path)
    except OSError as e:
        raise os_error(e, "writing", path) from e
    except failure as e:
        raise write_error(None, f"writing {path!r} failed: {e}", path) from e
    finally:
        del keep


def _to_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    max_shard_size: int | str | None,
    progress: ProgressCallback | None,
    skip_unsupported: bool,
    warn: Warn,
) -> ConversionResult:
    from gpusaver.checkpoint_reader import resolve_checkpoint_path

    lib = _safetensors()
    out = local_path(dst)
    as_dir = os.path.isdir(out) or not out.endswith(".safetensors")
    if as_dir and os.path.lexists(out) and not os.path.isdir(out):
        raise InvalidArgumentError(
            f"safetensors destination {os.fspath(dst)!r} is a file; name a '.safetensors' file or a directory"
        )
    if max_shard_size is not None:
        limit: int | None = parse_size(max_shard_size)
    else:
        limit = DEFAULT_MAX_SHARD_SIZE if as_dir else None
    if as_dir:
        directory, stem = out.rstrip("/" + os.sep) or out, "model"
    else:
        directory, base = os.path.split(out)
        stem = base[: -len(".safetensors")]
        if not stem:
            raise InvalidArgumentError(f"safetensors destination {os.fspath(dst)!r} has no name before '.safetensors'")
    with BundleReader(resolve_checkpoint_path(src)) as reader:
        items, skipped = _plan_to(reader, _writable_codes(lib), getattr(lib, "__version__", "?"),
                                  skip_unsupported, warn)
        shards = _split(items, limit)
        n = len(shards)
        if n == 1:
            names = [f"{stem}.safetensors"]
        else:  # Hugging Face's names: model-00001-of-00003.safetensors ...
            names = [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        finals = [os.path.join(directory, name) for name in names]
        index = os.path.join(directory, f"{stem}.safetensors.index.json") if n > 1 else None
        # Refuse before writing: the files we would write, and any other file of this name's
        # single or sharded form, which would leave two models in one place.
        pattern = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
        if os.path.isdir(directory):
            for existing in sorted(os.listdir(directory)):
                if pattern.fullmatch(existing):
                    _refuse_existing(os.path.join(directory, existing))
        total = sum(item.nbytes for item in items)
        counter = Progress(progress, total) if progress is not None else None
        created: list[str] = []
        temps: list[str] = []
        committed: list[str] = []
        source = _CheckpointBytes(reader, counter)
        try:
            _makedirs(directory, created)
            pending = []
            for final, shard in zip(finals, shards):
                tmp = _temp_name(final)
                temps.append(tmp)
                _write_safetensors_file(lib, tmp, shard, source)
                pending.append((tmp, final))
            if index is not None:
                weight_map = {item.name: name for name, shard in zip(names, shards) for item in shard}
                body = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                  indent=2, sort_keys=True) + "\n"
                tmp = _temp_name(index)
                temps.append(tmp)
                try:
                    with open(tmp, "w", encoding="utf-8") as f:
                        f.write(body)
                        f.flush()
                        os.fsync(f.fileno())
                except OSError as e:
                    raise os_error(e, "writing", tmp) from e
                pending.append((tmp, index))
            for tmp, final in pending:  # the shards, then the index: it names only complete files
                _refuse_existing(final)
                try:
                    os.replace(tmp, final)
                except OSError as e:
                    raise os_error(e, "renaming", tmp) from e
                committed.append(final)
            _fsync_dir(directory)
        except BaseException:
            source.close()
            _remove_quietly(temps + committed, created)
            raise
        source.close()
    if counter is not None:
        counter.finish()
    return ConversionResult(
        destination=os.fspath(dst),
        paths=tuple(committed),
        tensors=tuple(item.name for item in items),
        total_bytes=total,
        skipped=tuple(skipped),
    )


def to_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    progress: ProgressCallback | None = None,
    skip_unsupported: bool = False,
) -> ConversionResult:
    """Writes a checkpoint's tensors as safetensors, bit for bit.

    Args:
        src: the checkpoint: a prefix, its ``.index`` file, or a directory whose
            ``checkpoint`` state file names it.
        dst: a ``.safetensors`` file, or a directory (any other name; made if
            missing) for Hugging Face's form: ``model.safetensors``, or
            ``model-00001-of-0000N.safetensors`` ... and
            ``model.safetensors.index.json`` when there are several shards.
            With ``max_shard_size``, a file name ``x.safetensors`` is sharded as
            ``x-00001-of-0000N.safetensors`` plus ``x.safetensors.index.json``.
        max_shard_size: the most bytes of tensors per file (``"5GB"``, ``"500MiB"``
            or an int; see :func:`parse_size`); a larger tensor gets a file of its
            own. Default: one file, or 5GB shards when ``dst`` is a directory.
        progress: ``callback(done_bytes, total_bytes)``, counting the tensors'
            bytes as they are read and verified.
        skip_unsupported: leave out, with a warning, the tensors safetensors
            cannot hold (strings, complex128, int4 ..., and the name
            ``__metadata__``) instead of raising.

    Returns:
        A :class:`ConversionResult`: the files written (the index last), the tensors.

    Raises:
        CheckpointNotFoundError: no checkpoint at ``src`` (a ``FileNotFoundError``).
        UnsupportedDTypeError: a tensor safetensors cannot hold, named.
        InvalidArgumentError: a bad ``dst`` or ``max_shard_size``.
        ChecksumError: a damaged tensor; nothing is left behind.
        CheckpointWriteError: an output file exists already (errno EEXIST) or
            cannot be written; nothing is left behind.
        BackendUnavailableError: the ``safetensors`` package is not installed.
    """
    return _to_safetensors(src, dst, max_shard_size, progress, skip_unsupported, _warn)


# ------------------------------------------------------- safetensors -> checkpoint
@dataclass
class _In:
    """One tensor of a safetensors file."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int  # in the file
    end: int


@dataclass
class _SafetensorsFile:
    path: str
    tensors: list[_In]


def _corrupt(path: str, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path!r} is not a valid safetensors file: {why}", path)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidArgumentError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: The most dimensions a tensor may have (TensorFlow's limit).
_MAX_RANK = 254


def _read_header(path: str) -> list[_In]:
    """The tensors of a safetensors file, in the order of their data, checked.

    Every tensor's offsets must lie inside the file and, for the dtypes
    gpusaver converts, hold exactly its shape's bytes.

    Raises:
        CheckpointNotFoundError: no such file.
        CorruptCheckpointError: not a valid safetensors file (or not a regular file).
    """
    try:
        fd = open_regular(path, "safetensors file")
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(f"no safetensors file at {path!r}", path) from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise _corrupt(path, f"it has {size} bytes, fewer than the 8 of the header's length")
        (n,) = _U64.unpack(head)
        if n > _MAX_HEADER or 8 + n > size:
            raise _corrupt(path, f"its header would be {n} bytes, in a file of {size}")
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _corrupt(path, f"its header is not a JSON object ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_size = size - 8 - n
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise _corrupt(path, "'__metadata__' is not a map of strings")
            continue
        if not isinstance(info, dict):
            raise _corrupt(path, f"the entry of tensor {name!r} is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(code, str):
            raise _corrupt(path, f"tensor {name!r} has no dtype")
        if (not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_count(d) for d in shape)
                or not all(d < 1 << 62 for d in shape) or int(np.prod(shape, dtype=object)) >= 1 << 62):
            raise _corrupt(path, f"tensor {name!r} has an invalid shape {str(shape)[:200]}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1] or offsets[1] > data_size):
            raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r} outside the {data_size} bytes of data")
        d = _BY_CODE.get(code)
        if d is not None:
            need = int(np.prod(shape, dtype=object)) * d.numpy.itemsize
            if offsets[1] - offsets[0] != need:
                raise _corrupt(path, f"tensor {name!r} ({code} {shape}) needs {need} bytes, its offsets hold "
                               f"{offsets[1] - offsets[0]}")
        tensors.append(_In(name, code, tuple(shape), 8 + n + offsets[0], 8 + n + offsets[1]))
    tensors.sort(key=lambda t: (t.begin, t.end))
    for before, after in zip(tensors, tensors[1:]):  # as the safetensors library: no two tensors share bytes
        if after.begin < before.end:
            raise _corrupt(path, f"tensors {before.name!r} and {after.name!r} overlap in the data")
    return tensors


def _read_index(path: str) -> dict[str, str]:
    """The weight map of a ``*.safetensors.index.json``: tensor name -> shard file name."""
    try:
        fd = open_regular(path, "safetensors index")
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(f"no safetensors index at {path!r}", path) from None
    try:
        size = os.fstat(fd).st_size
        if size > _MAX_HEADER * 10:
            raise CorruptCheckpointError(f"safetensors index {path!r} is {size} bytes: too large", path)
        raw = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    try:
        index = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"safetensors index {path!r} is not valid JSON ({e})", path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"safetensors index {path!r} has no 'weight_map' of tensor names to files", path)
    for file in set(weight_map.values()):
        if file in ("", ".", "..") or os.path.basename(file) != file or "\\" in file or "\x00" in file:
            raise CorruptCheckpointError(
                f"safetensors index {path!r} names the file {file!r}: shards must be files beside the index", path
            )
    return weight_map


def _sources(src: str | os.PathLike[str]) -> list[_SafetensorsFile]:
    """The safetensors files ``src`` names, each with its tensors, consistent with the index."""
    path = local_path(src)
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        files = [n for n in names if n.endswith(".safetensors")]
        if "model.safetensors.index.json" in indexes:
            indexes = ["model.safetensors.index.json"]
        if len(indexes) == 1:
            path = os.path.join(path, indexes[0])
        elif indexes:
            raise InvalidArgumentError(f"directory {os.fspath(src)!r} holds several indexes {indexes}; name one")
        elif "model.safetensors" in files or len(files) == 1:
            path = os.path.join(path, "model.safetensors" if "model.safetensors" in files else files[0])
        elif files:
            raise InvalidArgumentError(
                f"directory {os.fspath(src)!r} holds {len(files)} safetensors files and no index; name one"
            )
        else:
            raise CheckpointNotFoundError(f"directory {os.fspath(src)!r} holds no safetensors file", path)
    if not path.endswith(".index.json"):
        return [_SafetensorsFile(path, _read_header(path))]
    weight_map = _read_index(path)
    directory = os.path.dirname(path)
    out = []
    for file in sorted(set(weight_map.values())):
        shard = os.path.join(directory, file)
        try:
            tensors = _read_header(shard)
        except CheckpointNotFoundError:
            raise CorruptCheckpointError(f"{shard!r}, a shard that index {path!r} names, is missing", shard) from None
        held = {t.name for t in tensors}
        listed = {name for name, f in weight_map.items() if f == file}
        if held != listed:
            what = sorted(listed - held)
            if what:
                raise CorruptCheckpointError(f"index {path!r} places tensor {what[0]!r} in {shard!r}, which does not "
                                             "hold it", path)
            raise CorruptCheckpointError(f"{shard!r} holds tensor {sorted(held - listed)[0]!r}, which index "
                                         f"{path!r} does not place there", path)
        out.append(_SafetensorsFile(shard, tensors))
    return out


def _from_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    progress: ProgressCallback | None,
    skip_unsupported: bool,
    warn: Warn,
) -> ConversionResult:
    files = _sources(src)
    plan: list[tuple[_SafetensorsFile, list[tuple[_In, _DType]]]] = []
    skipped: list[tuple[str, str]] = []
    for file in files:
        chosen = []
        for t in file.tensors:
            d = _BY_CODE.get(t.code)
            if not t.name:
                raise InvalidArgumentError(
                    f"{file.path!r} holds a tensor with an empty name, which a checkpoint cannot hold"
                )
            if d is None:
                reason = f"safetensors dtype {t.code!r} has no TensorFlow DataType"
                if not skip_unsupported:
                    raise UnsupportedDTypeError(
                        f"cannot convert tensor {t.name!r} of {file.path!r} to a checkpoint: {reason} "
                        "(skip_unsupported=True, or --skip-unsupported, leaves it out)"
                    )
                skipped.append((t.name, reason))
                warn(f"skipped tensor {t.name!r}: {reason}")
                continue
            chosen.append((t, d))
        plan.append((file, chosen))
    prefix = local_path(dst)
    if os.path.isdir(prefix) or prefix.endswith(("/", os.sep)):
        raise InvalidArgumentError(
            f"checkpoint destination {os.fspath(dst)!r} is a directory; give a prefix such as "
            f"{os.path.join(os.fspath(dst), 'model')!r}"
        )
    _refuse_existing(index_filename(prefix))
    for existing in data_files(prefix):
        _refuse_existing(existing)
    total = sum(t.end - t.begin for _, chosen in plan for t, _ in chosen)
    counter = Progress(progress, total) if progress is not None else None
    created: list[str] = []
    names: list[str] = []
    _makedirs(os.path.dirname(prefix), created)
    try:
        writer = BundleWriter(prefix)
    except BaseException:
        _remove_quietly([], created)
        raise
    try:
        slabs = _Slabs(_SLAB_COUNT, _SLAB_BYTES)
        for file, chosen in plan:
            if chosen:
                _add_file(writer, file, chosen, counter, slabs)
            names.extend(t.name for t, _ in chosen)
        writer.finish()  # the index appears last, once everything is written
    except BaseException:
        writer.abort()
        _remove_quietly([], created)
        raise
    if counter is not None:
        counter.finish()
    return ConversionResult(
        destination=os.fspath(dst),
        paths=(data_filename(prefix, 0, 1), index_filename(prefix)),
        tensors=tuple(names),
        total_bytes=total,
        skipped=tuple(skipped),
    )


class _Slabs:
    """A few reusable buffers that large tensors are read into, a slab at a time: :meth:`take` waits
    until the writer has written one (its ``done`` callback gives it back), so at most ``count`` slabs
    of the source are in memory however large the file."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._left = count  # slabs not made yet: made on first need, so a small file allocates little
        self._free: list[np.ndarray] = []
        self._ready = threading.Condition()

    def take(self) -> np.ndarray:
        with self._ready:
            while not self._free:
                if self._left:
                    self._left -= 1
                    return np.empty(self.size, np.uint8)
                self._ready.wait()
            return self._free.pop()

    def give(self, slab: np.ndarray) -> None:
        with self._ready:
            self._free.append(slab)
            self._ready.notify()


def _read_source(fd: int, file: _SafetensorsFile, out: np.ndarray, offset: int, tensor: _In) -> None:
    """Fills ``out`` with the file's bytes at ``offset`` (within ``tensor``'s data, or a group of tensors'
    ending with it), in as few ``preadv`` calls as the kernel allows.

    Raises:
        CorruptCheckpointError: the file ends first: it shrank after its header was read.
    """
    view = memoryview(out)
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CorruptCheckpointError(
                f"{file.path!r} was truncated while being converted: tensor {tensor.name!r} needs bytes "
                f"[{tensor.begin}, {tensor.end}) but the file now has {os.fstat(fd).st_size} bytes",
                file.path,
            )
        done += got


def _add_file(
    writer: BundleWriter,
    file: _SafetensorsFile,
    chosen: list[tuple[_In, _DType]],
    counter: Progress | None,
    slabs: _Slabs,
) -> None:
    """Hands one file's tensors to the writer, read from the file (never mapped: a file that shrinks
    meanwhile is an error, not a SIGBUS).

    Small tensors are read a group at a time, one read per group into a buffer of the group's own, and
    handed to the writer together as arrays over it (freed once written). Large ones are read in slabs
    that are reused once written.
    """
    fd = open_regular(file.path, "safetensors file")
    try:
        if os.fstat(fd).st_size < max(t.end for t, _ in chosen):
            raise CorruptCheckpointError(
                f"{file.path!r} was truncated while being converted: it now has {os.fstat(fd).st_size} bytes, "
                "fewer than its header describes",
                file.path,
            )
        if hasattr(os, "posix_fadvise"):  # read once, front to back: a larger readahead from a cold disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        group: list[tuple[_In, _DType]] = []
        for t, d in chosen:
            count = t.end - t.begin
            if count >= _LARGE_BYTES:
                _add_group(writer, fd, file, group, counter)
                group = []
                writer.add_raw(t.name, d.numpy, t.shape, _slab_chunks(fd, file, t, slabs, counter))
                continue
            if (not count or len(t.shape) > 32) and not _fits_numpy(t.shape, d.numpy):
                # a valid shape no NumPy array can have ([0, 2**61] float32, 65 dimensions): raw bytes
                chunk = np.empty(count, np.uint8)
                _read_source(fd, file, chunk, t.begin, t)
                writer.add_raw(t.name, d.numpy, t.shape, [(chunk, None)] if count else ())
                if counter is not None and count:
                    counter.add(count)
                continue
            if group and (t.end - group[0][0].begin > _GROUP_BYTES or len(group) >= _GROUP_COUNT):
                _add_group(writer, fd, file, group, counter)
                group = []
            group.append((t, d))
        _add_group(writer, fd, file, group, counter)
    finally:
        os.close(fd)


def _add_group(
    writer: BundleWriter, fd: int, file: _SafetensorsFile, group: list[tuple[_In, _DType]], counter: Progress | None
) -> None:
    """Reads consecutive small tensors with one read (the bytes between them too) and adds them at once."""
    if not group:
        return
    start, end = group[0][0].begin, group[-1][0].end
    buf = np.empty(end - start, np.uint8)
    _read_source(fd, file, buf, start, group[-1][0])
    arrays = []
    for t, d in group:
        arrays.append(buf[t.begin - start : t.end - start].view(d.numpy).reshape(t.shape))
    writer.add_many([t.name for t, _ in group], arrays)
    if counter is not None and sum(t.end - t.begin for t, _ in group):
        counter.add(sum(t.end - t.begin for t, _ in group))


def _slab_chunks(
    fd: int, file: _SafetensorsFile, t: _In, slabs: _Slabs, counter: Progress | None
) -> Iterator[tuple[np.ndarray, Callable[[], None]]]:
    """A large tensor's bytes for :meth:`BundleWriter.add_raw`, a slab at a time, each given back once written."""
    for lo in range(t.begin, t.end, slabs.size):
        n = min(slabs.size, t.end - lo)
        slab = slabs.take()
        try:
            _read_source(fd, file, slab[:n], lo, t)
        except BaseException:
            slabs.give(slab)
            raise
        yield slab[:n], functools.partial(slabs.give, slab)
        if counter is not None:
            counter.add(n)


def _fits_numpy(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether NumPy can make an array of this shape (a zero-element one included: NumPy refuses
    shapes whose nonzero dimensions times the item size pass its largest size, and ranks above its limit)."""
    try:
        np.empty(0, dtype).reshape(shape)
    except ValueError:
        return False
    return True


def from_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
    skip_unsupported: bool = False,
) -> ConversionResult:
    """Writes safetensors tensors as one checkpoint, bit for bit.

    Args:
        src: a ``.safetensors`` file, a ``*.safetensors.index.json`` (Hugging
            Face's sharded form; every shard it names is read and must hold
            exactly the tensors it places there), or a directory holding either
            (``model.safetensors.index.json`` or ``model.safetensors`` first).
        dst: the checkpoint prefix to write (``dst.index``,
            ``dst.data-00000-of-00001``); missing parent directories are created.
        progress: ``callback(done_bytes, total_bytes)``, counting the tensors'
            bytes as they are handed to the writer (the last call once committed).
        skip_unsupported: leave out, with a warning, tensors whose safetensors
            dtype TensorFlow has no DataType for (``F8_E8M0``, ``F4`` ...).

    Returns:
        A :class:`ConversionResult`: ``paths`` are the data file and the index.

    Raises:
        CheckpointNotFoundError: no such file (a ``FileNotFoundError``).
        CorruptCheckpointError: a malformed file or index, a shard missing, or a file that
            shrank while it was read (named); nothing is committed.
        UnsupportedDTypeError: a dtype a checkpoint cannot hold, naming the tensor.
        CheckpointWriteError: the checkpoint exists already (errno EEXIST) or
            cannot be written; nothing is committed.
    """
    return _from_safetensors(src, dst, progress, skip_unsupported, _warn)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    progress: ProgressCallback | None = None,
    skip_unsupported: bool = False,
) -> ConversionResult:
    """:func:`to_safetensors` or :func:`from_safetensors`, as :func:`direction` tells from the paths.

    Raises:
        InvalidArgumentError: the paths do not say which way, or
            ``max_shard_size`` is given for writing a checkpoint.
    """
    if direction(src, dst) == "to_safetensors":
        return _to_safetensors(src, dst, max_shard_size, progress, skip_unsupported, _warn)
    if max_shard_size is not None:
        raise InvalidArgumentError("max_shard_size applies to writing safetensors, not to writing a checkpoint")
    return _from_safetensors(src, dst, progress, skip_unsupported, _warn)
