"""The ``gpusaver`` command line: ``inspect``, ``verify``, ``diff``, ``convert`` and ``info``.

``main(argv)`` returns the exit status instead of exiting, so tests call it
directly. Exit status: 0 success, 1 a damaged checkpoint (or any other error
gpusaver reports), 2 a usage error or a missing checkpoint; ``diff`` exits 0
when the checkpoints are identical, 1 when they differ and 2 on any error.
Expected errors are one line on stderr, never a traceback. ``verify`` and
``convert`` show their progress on stderr (see :mod:`gpusaver.cli.progress_bar`).

Example:
    $ gpusaver inspect ckpts/            # the newest checkpoint named by ckpts/checkpoint
    $ gpusaver verify ckpts/model-100    # every crc32c, exit 1 on damage
    $ gpusaver diff ckpts/model-100 ckpts/model-200     # by the stored crc32c
    $ gpusaver convert ckpts/ out/model.safetensors     # and back: convert x.safetensors ck/model
    $ gpusaver info --json               # the GPUs NVML sees
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence, TextIO

from gpusaver.cuda import nvml
from gpusaver.cli.progress_bar import ProgressReporter, progress_reporter
from gpusaver._version import __version__
from gpusaver.errors import (
    ChecksumError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    GpuSaverError,
    InvalidArgumentError,
    TensorNotFoundError,
    UnsupportedDTypeError,
)
from gpusaver.format import crc, dtypes
from gpusaver.format import slices as _slices
from gpusaver.format.entry import BundleEntry
from gpusaver.format.naming import data_filename
from gpusaver.format.reader import BundleReader
from gpusaver.storage import read_exact
from gpusaver.format.tensors import verify_strings

__all__ = ["main"]

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2

_CHUNK = 8 << 20  # verify reads large tensors in pieces of this size
_SHOWN_PER_FILE = 5  # verify lists this many damaged tensors per data file, then counts the rest


# ------------------------------------------------------------------ helpers
def _human(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` -> ``"?"``."""
    from gpusaver.cli.progress_bar import human_bytes

    return "?" if n is None else human_bytes(n)


def _bytes(n: int) -> str:
    """``225`` -> ``"225 bytes"``; ``1536`` -> ``"1536 bytes (1.5 KiB)"``."""
    return f"{n} bytes" if n < 1024 else f"{n} bytes ({_human(n)})"


def _cpu_ranges(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    parts: list[str] = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)


def _numpy_name(dtype_enum: int) -> str | None:
    try:
        return str(dtypes.to_numpy(dtype_enum))
    except UnsupportedDTypeError:
        return None


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def resolve_prefix(path: str) -> str:
    """The checkpoint prefix that ``path`` names (see :func:`gpusaver.checkpoint_reader.resolve_checkpoint_path`)."""
    from gpusaver.checkpoint_reader import resolve_checkpoint_path

    return resolve_checkpoint_path(path)


# ------------------------------------------------------------------ inspect
def _slice_record(reader: BundleReader, name: str, extents: list[tuple[int, int]]) -> dict[str, Any]:
    record: dict[str, Any] = {"spec": _slices.format_slice_spec(extents)}
    try:
        part = reader.entry(_slices.encode_slice_key(name, extents))
    except TensorNotFoundError:
        return {**record, "shape": None, "shard": None, "offset": None, "size": None, "crc32c": None}
    return {
        **record,
        "shape": list(part.shape),
        "shard": part.shard_id,
        "offset": part.offset,
        "size": part.size,
        "crc32c": f"0x{crc.unmask(part.crc32c):08x}",
    }


def _describe(reader: BundleReader) -> dict[str, Any]:
    num_shards = reader.header.num_shards
    shards = []
    for shard in range(num_shards):
        path = data_filename(reader.prefix, shard, num_shards)
        shards.append({"shard": shard, "path": path, "size": _file_size(path)})
    variables = []
    total = 0
    for name, entry in sorted(reader.variables().items()):
        record: dict[str, Any] = {
            "name": name,
            "dtype": dtypes.dtype_name(entry.dtype),
            "numpy_dtype": _numpy_name(entry.dtype),
            "shape": list(entry.shape),
        }
        if entry.slices:
            parts = [_slice_record(reader, name, ext) for ext in entry.slices]
            size = sum(p["size"] or 0 for p in parts)
            record.update(shard=None, offset=None, size=size, crc32c=None, slices=parts)
        else:
            size = entry.size
            record.update(
                shard=entry.shard_id,
                offset=entry.offset,
                size=size,
                crc32c=f"0x{crc.unmask(entry.crc32c):08x}",
                slices=None,
            )
        total += size
        variables.append(record)
    return {
        "prefix": reader.prefix,
        "index": {"path": reader.index_path, "size": _file_size(reader.index_path)},
        "num_shards": num_shards,
        "shards": shards,
        "variables": variables,
        "totals": {"variables": len(variables), "bytes": total},
    }


def _print_description(info: dict[str, Any], out: TextIO) -> None:
    print(f"checkpoint  {info['prefix']}", file=out)
    print(f"index       {info['index']['path']}  ({_human(info['index']['size'])})", file=out)
    print(f"data files  {info['num_shards']}", file=out)
    for shard in info["shards"]:
        size = "MISSING" if shard["size"] is None else f"{shard['size']} bytes"
        print(f"  shard {shard['shard']}  {os.path.basename(shard['path'])}  {size}", file=out)
    print(file=out)
    rows = [["name", "dtype", "numpy", "shape", "shard", "offset", "bytes", "slices"]]
    for v in info["variables"]:
        shape = "[" + ",".join(str(d) for d in v["shape"]) + "]"  # no blanks: one column
        if v["slices"] is None:
            shard, offset, nslices = str(v["shard"]), str(v["offset"]), ""
        else:
            shard = ",".join(str(s) for s in sorted({p["shard"] for p in v["slices"] if p["shard"] is not None}))
            offset, nslices = "-", str(len(v["slices"]))
        rows.append([v["name"], v["dtype"], v["numpy_dtype"] or "?", shape, shard or "-", offset, str(v["size"]), nslices])
    if len(rows) > 1:
        _table(rows, out)
        print(file=out)
    totals = info["totals"]
    print(
        f"{totals['variables']} variable{'s' if totals['variables'] != 1 else ''}, "
        f"{_bytes(totals['bytes'])} in {info['num_shards']} data "
        f"file{'s' if info['num_shards'] != 1 else ''}",
        file=out,
    )


def _cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    with BundleReader(resolve_prefix(args.path)) as reader:
        info = _describe(reader)
    if args.json:
        json.dump(info, out, indent=2)
        print(file=out)
    else:
        _print_description(info, out)
    return EXIT_OK


# ------------------------------------------------------------------- verify
class _Verifier:
    """Reads every stored tensor once, in pieces, and checks its crc32c."""

    def __init__(self, reader: BundleReader, out: TextIO, progress: Any = None) -> None:
        self.reader = reader
        self.out = out
        self.progress = progress  # a gpusaver.progress.Progress counting the bytes checked, or None
        self.num_shards = reader.header.num_shards
        self.tensors = 0
        self.damaged = 0
        self.bytes = 0
        self._ticked = 0  # bytes counted towards progress so far
        self.missing: dict[int, int] = {}  # shard -> tensors it holds
        self._buf = bytearray()  # grows to at most _CHUNK bytes, reused for every tensor
        self._shown: dict[int, int] = {}  # shard -> damaged tensors reported in it, line by line
        self._unshown: dict[int, int] = {}  # shard -> damaged tensors past those, counted only
        for shard in range(self.num_shards):
            if not os.path.isfile(data_filename(reader.prefix, shard, self.num_shards)):
                self.missing[shard] = 0

    def damage(self, what: str, message: str, shard: int | None = None) -> None:
        """Reports damage; in data file ``shard``, only the first few, the rest counted (see :meth:`report_unshown`)."""
        self.damaged += 1
        if shard is not None:
            shown = self._shown.get(shard, 0)
            if shown >= _SHOWN_PER_FILE:
                self._unshown[shard] = self._unshown.get(shard, 0) + 1
                return
            self._shown[shard] = shown + 1
        print(f"DAMAGED {what}: {message}", file=self.out)

    def report_unshown(self) -> None:
        """One line per data file with more damaged tensors than were shown."""
        for shard, count in sorted(self._unshown.items()):
            path = data_filename(self.reader.prefix, shard, self.num_shards)
            print(f"... and {count} more damaged tensor{'s' if count != 1 else ''} in {path}", file=self.out)

    def _tick(self, n: int) -> None:
        self._ticked += n
        if self.progress is not None and n > 0:
            self.progress.add(n)

    def entry(self, name: str, label: str, entry: BundleEntry) -> None:
        """Checks one stored tensor (a whole variable or one slice of one); counts its bytes as done."""
        start = self._ticked
        try:
            self._entry(name, label, entry)
        finally:
            self._tick(entry.size - (self._ticked - start))

    def _entry(self, name: str, label: str, entry: BundleEntry) -> None:
        self.tensors += 1
        if entry.shard_id >= self.num_shards:
            self.damage(label, f"its entry names shard {entry.shard_id} of {self.num_shards}")
            return
        if entry.shard_id in self.missing:
            self.missing[entry.shard_id] += 1
            self.damaged += 1
            return
        try:
            self._check(name, entry)
        except ChecksumError as e:
            self.damage(label, f"crc32c mismatch in {e.path} (offset {entry.offset}, {entry.size} bytes): "
                        f"expected 0x{e.expected:08x}, actual 0x{e.actual:08x}", entry.shard_id)
        except (CorruptCheckpointError, UnsupportedDTypeError) as e:
            self.damage(label, str(e), entry.shard_id)
        else:
            self.bytes += entry.size

    def _check(self, name: str, entry: BundleEntry) -> None:
        reader = self.reader
        dtype = dtypes.to_numpy(entry.dtype, path=reader.index_path, tensor=name)
        if dtype == dtypes.OBJECT:
            if entry.size < entry.num_elements + 4:
                raise CorruptCheckpointError(f"{entry.size} bytes cannot hold {entry.num_elements} strings")
            fd, offset, size, path = reader.data_location(name, entry)
            buf = bytearray(size)
            read_exact(fd, memoryview(buf), offset, path, reader.fileops)
            verify_strings(buf, entry.shape, crc.unmask(entry.crc32c), path, name)  # no array: any shape
            return
        if entry.size != entry.num_elements * dtype.itemsize:
            raise CorruptCheckpointError(
                f"its entry says {entry.size} bytes but shape {list(entry.shape)} of {dtype} "
                f"needs {entry.num_elements * dtype.itemsize}"
            )
        fd, offset, size, path = reader.data_location(name, entry)
        if len(self._buf) < min(_CHUNK, size):
            self._buf = bytearray(min(_CHUNK, size))
        view = memoryview(self._buf)
        running, done = crc.Running(entry.crc32c, path, name), 0
        while done < size:
            n = min(len(view), size - done)
            read_exact(fd, view[:n], offset + done, path, reader.fileops)
            running.update(view[:n])
            done += n
            self._tick(n)
        running.check()

    def variable(self, name: str, entry: BundleEntry) -> None:
        """Checks a variable: its bytes, or each of its slices and that they tile it."""
        if not entry.slices:
            self.entry(name, f"tensor {name!r}", entry)
            return
        stored, complete = 0, True
        regions = []
        for extents in entry.slices:
            label = f"tensor {name!r} slice {_slices.format_slice_spec(extents)}"
            want = tuple(_slices.slice_shape(entry.shape, extents))
            regions.append(_slices.normalize(entry.shape, extents))
            try:
                part = self.reader.entry(_slices.encode_slice_key(name, extents))
            except TensorNotFoundError:
                self.tensors += 1
                self.damage(label, "listed in the index but not stored")
                complete = False
                continue
            if part.shape != want or part.dtype != entry.dtype:
                self.tensors += 1
                self.damage(label, f"stored as {dtypes.dtype_name(part.dtype)} {list(part.shape)}, expected "
                            f"{dtypes.dtype_name(entry.dtype)} {list(want)}")
                complete = False
                continue
            stored += part.num_elements
            self.entry(name, label, part)
        if complete and (stored != entry.num_elements or _overlap(regions)):
            self.damage(f"tensor {name!r}", f"its {len(entry.slices)} slices do not tile shape {list(entry.shape)}")

    def report_missing(self) -> None:
        for shard, count in sorted(self.missing.items()):
            path = data_filename(self.reader.prefix, shard, self.num_shards)
            print(f"DAMAGED data file {path}: missing ({count} tensor{'s' if count != 1 else ''} unreadable)",
                  file=self.out)
            if count == 0:
                self.damaged += 1


def _overlap(regions: list[list[tuple[int, int]]]) -> bool:
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            if all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(a, b)):
                return True
    return False


def _stored_bytes(reader: BundleReader, variables: dict[str, BundleEntry]) -> int:
    """The bytes verify reads: every whole tensor's and every stored slice's."""
    total = 0
    for name, entry in variables.items():
        if not entry.slices:
            total += entry.size
            continue
        for extents in entry.slices:
            try:
                total += reader.entry(_slices.encode_slice_key(name, extents)).size
            except GpuSaverError:  # reported, in order, when the variable is checked
                pass
    return total


def _reporter(args: argparse.Namespace, label: str) -> ProgressReporter | None:
    """The progress display on stderr, unless ``--no-progress``."""
    return None if args.no_progress else progress_reporter(label, sys.stderr)


def _cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    from gpusaver.progress import Progress

    start = time.perf_counter()
    reporter = _reporter(args, "verify")
    try:
        with BundleReader(resolve_prefix(args.path)) as reader:
            reader.verify_index()
            variables = reader.variables()
            counter = Progress(reporter, _stored_bytes(reader, variables)) if reporter is not None else None
            check = _Verifier(reader, out, counter)
            for name, entry in sorted(variables.items()):
                check.variable(name, entry)
            check.report_unshown()
            check.report_missing()
            if counter is not None:
                counter.finish()
    finally:
        if reporter is not None:
            reporter.close()
    seconds = time.perf_counter() - start
    summary = (f"{check.tensors} tensor{'s' if check.tensors != 1 else ''} of {len(variables)} "
               f"variable{'s' if len(variables) != 1 else ''} in {check.num_shards} data "
               f"file{'s' if check.num_shards != 1 else ''}")
    if check.damaged:
        print(f"FAILED {reader.prefix}: {check.damaged} damaged; {summary}; {check.bytes} bytes verified "
              f"in {seconds:.3f} s", file=out)
        return EXIT_DAMAGED
    rate = f", {_human(check.bytes / seconds)}/s" if seconds > 0 and check.bytes else ""
    print(f"OK {reader.prefix}: {summary}; {_bytes(check.bytes)} verified "
          f"in {seconds:.3f} s{rate}", file=out)
    return EXIT_OK


# --------------------------------------------------------------------- diff
def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _crc_text(entry: BundleEntry) -> str:
    return f"0x{crc.unmask(entry.crc32c):08x}"


def _slice_entry(reader: BundleReader, name: str, extents: list[tuple[int, int]]) -> BundleEntry:
    try:
        return reader.entry(_slices.encode_slice_key(name, extents))
    except TensorNotFoundError:
        raise CorruptCheckpointError(
            f"slice {_slices.format_slice_spec(extents)} of {name!r} is listed but not stored in "
            f"{reader.index_path!r}",
            reader.index_path,
        ) from None


def _same_values(a: Any, b: Any) -> bool:
    """Bit-exact equality of two tensors read whole (NaNs equal to themselves, -0.0 not to 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == dtypes.OBJECT:
        return a.reshape(-1).tolist() == b.reshape(-1).tolist()
    import numpy as np

    return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def _content_change(
    ra: BundleReader, rb: BundleReader, name: str, ea: BundleEntry, eb: BundleEntry
) -> dict[str, Any] | None:
    """How the bytes of a tensor of equal dtype and shape differ (None: they do not).

    By the crc32c and size in the index entries, of the tensor or of each of its
    slices when both store the same slices; no data is read. Only tensors stored
    in different slices, or checkpoints of different byte orders, are read (once
    each, verified) and compared value by value.
    """
    record: dict[str, Any] = {"name": name, "a": None, "b": None, "slices": None, "compared": "crc32c"}
    same_order = ra.big_endian == rb.big_endian
    if not ea.slices and not eb.slices and same_order:
        if (ea.size, ea.crc32c) == (eb.size, eb.crc32c):
            return None
        return {**record, "a": _crc_text(ea), "b": _crc_text(eb)}
    layout_a = sorted(tuple(map(tuple, ext)) for ext in ea.slices)
    layout_b = sorted(tuple(map(tuple, ext)) for ext in eb.slices)
    if ea.slices and layout_a == layout_b and same_order:
        differ = []
        for extents in sorted(ea.slices):
            pa, pb = _slice_entry(ra, name, extents), _slice_entry(rb, name, extents)
            if (pa.size, pa.crc32c) != (pb.size, pb.crc32c):
                differ.append(_slices.format_slice_spec(extents))
        return {**record, "slices": differ} if differ else None
    if ea.num_elements == 0:  # no values to differ (and maybe a shape NumPy cannot hold, [0, 2**61])
        return None
    if _same_values(ra.get_tensor(name), rb.get_tensor(name)):
        return None
    return {**record, "compared": "values"}


def _diff(ra: BundleReader, rb: BundleReader) -> dict[str, Any]:
    va, vb = ra.variables(), rb.variables()

    def brief(entry: BundleEntry, name: str) -> dict[str, Any]:
        return {"name": name, "dtype": dtypes.dtype_name(entry.dtype), "shape": list(entry.shape)}

    result: dict[str, Any] = {
        "a": ra.prefix,
        "b": rb.prefix,
        "identical": True,
        "only_in_a": [brief(va[n], n) for n in sorted(set(va) - set(vb))],
        "only_in_b": [brief(vb[n], n) for n in sorted(set(vb) - set(va))],
        "dtype": [],
        "shape": [],
        "bytes": [],
        "same": 0,
    }
    for name in sorted(set(va) & set(vb)):
        ea, eb = va[name], vb[name]
        if ea.dtype != eb.dtype:
            result["dtype"].append({"name": name, "a": dtypes.dtype_name(ea.dtype), "b": dtypes.dtype_name(eb.dtype)})
        if ea.shape != eb.shape:
            result["shape"].append({"name": name, "a": list(ea.shape), "b": list(eb.shape)})
        if ea.dtype != eb.dtype or ea.shape != eb.shape:
            continue
        change = _content_change(ra, rb, name, ea, eb)
        if change is None:
            result["same"] += 1
        else:
            result["bytes"].append(change)
    result["identical"] = not any(result[k] for k in ("only_in_a", "only_in_b", "dtype", "shape", "bytes"))
    return result


def _print_diff(info: dict[str, Any], out: TextIO) -> None:
    print(f"a  {info['a']}", file=out)
    print(f"b  {info['b']}", file=out)
    rows = []
    for side in ("a", "b"):
        for v in info[f"only_in_{side}"]:
            rows.append([f"only in {side}", v["name"], f"{v['dtype']} {_shape_text(v['shape'])}"])
    for v in info["dtype"]:
        rows.append(["dtype", v["name"], f"{v['a']} -> {v['b']}"])
    for v in info["shape"]:
        rows.append(["shape", v["name"], f"{_shape_text(v['a'])} -> {_shape_text(v['b'])}"])
    for v in info["bytes"]:
        if v["compared"] == "values":
            detail = "values differ (stored in different slices or byte orders)"
        elif v["slices"] is not None:
            detail = f"slice{'s' if len(v['slices']) != 1 else ''} {' '.join(v['slices'])}"
        else:
            detail = f"crc32c {v['a']} -> {v['b']}"
        rows.append(["bytes", v["name"], detail])
    if rows:
        print(file=out)
        _table(rows, out)
    print(file=out)
    if info["identical"]:
        print(f"IDENTICAL: {info['same']} variable{'s' if info['same'] != 1 else ''}", file=out)
        return
    kinds = [("only_in_a", "only in a"), ("only_in_b", "only in b"), ("dtype", "in dtype"), ("shape", "in shape"),
             ("bytes", "in bytes")]
    parts = ", ".join(f"{len(info[key])} {what}" for key, what in kinds if info[key])
    differ = len({v["name"] for key, _ in kinds for v in info[key]})  # a variable may differ in dtype and shape
    print(f"DIFFERENT: {differ} variable{'s' if differ != 1 else ''} differ{'s' if differ == 1 else ''}: {parts}; "
          f"{info['same']} identical", file=out)


def _cmd_diff(args: argparse.Namespace, out: TextIO) -> int:
    with BundleReader(resolve_prefix(args.a)) as ra, BundleReader(resolve_prefix(args.b)) as rb:
        info = _diff(ra, rb)
    if args.json:
        json.dump(info, out, indent=2)
        print(file=out)
    else:
        _print_diff(info, out)
    return EXIT_OK if info["identical"] else EXIT_DAMAGED


# ------------------------------------------------------------------ convert
def _cmd_convert(args: argparse.Namespace, out: TextIO) -> int:
    from gpusaver import convert

    try:
        way = convert.direction(args.src, args.dst)
        if args.max_shard_size is not None:
            if way != "to_safetensors":
                raise InvalidArgumentError("--max-shard-size applies to writing safetensors, not a checkpoint")
            convert.parse_size(args.max_shard_size)
    except InvalidArgumentError as e:
        print(f"gpusaver convert: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    def warn(message: str) -> None:
        print(f"gpusaver convert: warning: {message}", file=sys.stderr)

    reporter = _reporter(args, "convert")
    try:
        if way == "to_safetensors":
            result = convert._to_safetensors(
                args.src, args.dst, args.max_shard_size, reporter, args.skip_unsupported, warn
            )
        else:
            result = convert._from_safetensors(args.src, args.dst, reporter, args.skip_unsupported, warn)
    finally:
        if reporter is not None:
            reporter.close()
    for path in result.paths:
        print(f"wrote {path}", file=out)
    n, files = len(result.tensors), len(result.paths)
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    print(f"OK {args.src} -> {args.dst}: {n} tensor{'s' if n != 1 else ''}{skipped}, "
          f"{_bytes(result.total_bytes)} in {files} file{'s' if files != 1 else ''}", file=out)
    return EXIT_OK


# --------------------------------------------------------------------- info
def _cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    gpus = nvml.inventory(refresh=True)
    status = nvml.nvml_status()
    if args.json:
        json.dump({"status": status, "gpus": [vars(g) for g in gpus]}, out, indent=2)
        print(file=out)
        return EXIT_OK
    if not gpus:
        print(f"no NVIDIA GPU / NVML not available ({status})", file=out)
        return EXIT_OK
    print(status, file=out)
    for g in gpus:
        print(f"GPU {g.index}  {g.name}", file=out)
        print(f"  uuid        {g.uuid}", file=out)
        print(f"  pci bus id  {g.pci_bus_id}", file=out)
        print(f"  memory      {_human(g.memory_total)} total, {_human(g.memory_free)} free", file=out)
        print(f"  cpus        {_cpu_ranges(g.cpu_affinity) or 'unknown'}", file=out)
    return EXIT_OK


# --------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpusaver",
        description="Inspect, verify, compare and convert TensorFlow V2 checkpoints; list GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"gpusaver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    path_help = "a checkpoint prefix, its .index file, or a directory with a 'checkpoint' state file"
    p = sub.add_parser("inspect", help="list a checkpoint's data files and variables")
    p.add_argument("path", metavar="PATH", help=path_help)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_cmd_inspect)
    p = sub.add_parser("verify", help="check every checksum; exit 1 on damage")
    p.add_argument("path", metavar="PATH", help=path_help)
    p.add_argument("--no-progress", action="store_true", help="show no progress on stderr")
    p.set_defaults(run=_cmd_verify)
    p = sub.add_parser(
        "diff",
        help="compare two checkpoints by their stored crc32c; exit 0 identical, 1 different, 2 error",
        description="Lists the variables only in A, only in B, of another dtype or shape, and those whose "
        "bytes differ, comparing the crc32c stored in the indexes (slice by slice for partitioned "
        "variables) without reading the data. Exit 0 when identical, 1 when they differ, 2 on errors.",
    )
    p.add_argument("a", metavar="A", help=path_help)
    p.add_argument("b", metavar="B", help="the checkpoint to compare with, in any of the same forms")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_cmd_diff, error_status=EXIT_USAGE)
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint to safetensors, or safetensors to a checkpoint",
        description="SRC a checkpoint and DST a '.safetensors' file or a directory (Hugging Face's "
        "sharded form): writes safetensors. SRC a '.safetensors' file, a '*.safetensors.index.json' or a "
        "directory holding them: writes a checkpoint at prefix DST. Bit-exact; nothing is overwritten.",
    )
    p.add_argument("src", metavar="SRC", help="a checkpoint, or safetensors (file, index.json or directory)")
    p.add_argument("dst", metavar="DST", help="a .safetensors file or a directory, or a checkpoint prefix")
    p.add_argument("--max-shard-size", metavar="SIZE", default=None,
                   help="most bytes per safetensors file, e.g. 5GB or 500MiB (default: one file; 5GB for a "
                   "directory); shards are named model-00001-of-0000N.safetensors with an index.json")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="leave out, with a warning, tensors the other format cannot hold (e.g. strings)")
    p.add_argument("--no-progress", action="store_true", help="show no progress on stderr")
    p.set_defaults(run=_cmd_convert)
    p = sub.add_parser("info", help="list the NVIDIA GPUs NVML sees")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    Args:
        argv: the arguments after the program name (``sys.argv[1:]`` when None).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out = sys.stdout
    where = f"gpusaver {args.command}"
    failed = getattr(args, "error_status", EXIT_DAMAGED)  # diff: 1 means "different", errors are 2
    try:
        return int(args.run(args, out))
    except BrokenPipeError:  # e.g. piped into head
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        except OSError:
            pass
        return failed
    except (CheckpointNotFoundError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (GpuSaverError, OSError) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return failed
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
