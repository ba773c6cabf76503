"""The ``gpusaver`` command line: ``inspect``, ``verify`` and ``info``.

``main(argv)`` returns the exit status instead of exiting, so tests call it
directly. Exit status: 0 success, 1 a damaged checkpoint (or any other error
gpusaver reports), 2 a usage error or a missing checkpoint. Expected errors are
one line on stderr, never a traceback.

Example:
    $ gpusaver inspect ckpts/            # the newest checkpoint named by ckpts/checkpoint
    $ gpusaver verify ckpts/model-100    # every crc32c, exit 1 on damage
    $ gpusaver info --json               # the GPUs NVML sees
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence, TextIO

from gpusaver import nvml
from gpusaver._version import __version__
from gpusaver.errors import (
    ChecksumError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    GpuSaverError,
    TensorNotFoundError,
    UnsupportedDTypeError,
)
from gpusaver.format import crc, dtypes
from gpusaver.format import slices as _slices
from gpusaver.format.entry import BundleEntry
from gpusaver.format.naming import data_filename
from gpusaver.format.reader import BundleReader, read_exact
from gpusaver.format.tensors import decode_strings

__all__ = ["main"]

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2

_CHUNK = 8 << 20  # verify reads large tensors in pieces of this size


# ------------------------------------------------------------------ helpers
def _human(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` -> ``"?"``."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


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

    def __init__(self, reader: BundleReader, out: TextIO) -> None:
        self.reader = reader
        self.out = out
        self.num_shards = reader.header.num_shards
        self.tensors = 0
        self.damaged = 0
        self.bytes = 0
        self.missing: dict[int, int] = {}  # shard -> tensors it holds
        self._buf = bytearray()  # grows to at most _CHUNK bytes, reused for every tensor
        for shard in range(self.num_shards):
            if not os.path.isfile(data_filename(reader.prefix, shard, self.num_shards)):
                self.missing[shard] = 0

    def damage(self, what: str, message: str) -> None:
        self.damaged += 1
        print(f"DAMAGED {what}: {message}", file=self.out)

    def entry(self, name: str, label: str, entry: BundleEntry) -> None:
        """Checks one stored tensor (a whole variable or one slice of one)."""
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
                        f"expected 0x{e.expected:08x}, actual 0x{e.actual:08x}")
        except (CorruptCheckpointError, UnsupportedDTypeError) as e:
            self.damage(label, str(e))
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
            read_exact(fd, memoryview(buf), offset, path)
            decode_strings(buf, entry.shape, crc.unmask(entry.crc32c), path, name)
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
        running, done = 0, 0
        while done < size:
            n = min(len(view), size - done)
            read_exact(fd, view[:n], offset + done, path)
            running = crc.extend(running, view[:n])
            done += n
        expected = crc.unmask(entry.crc32c)
        if running != expected:
            raise ChecksumError(path, name, expected, running)

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


def _cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    start = time.perf_counter()
    with BundleReader(resolve_prefix(args.path)) as reader:
        reader.verify_index()
        variables = reader.variables()
        check = _Verifier(reader, out)
        for name, entry in sorted(variables.items()):
            check.variable(name, entry)
        check.report_missing()
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
        prog="gpusaver", description="Inspect and verify TensorFlow V2 checkpoints; list GPUs."
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
    p.set_defaults(run=_cmd_verify)
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
    try:
        return int(args.run(args, out))
    except BrokenPipeError:  # e.g. piped into head
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        except OSError:
            pass
        return EXIT_DAMAGED
    except (CheckpointNotFoundError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (GpuSaverError, OSError) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return EXIT_DAMAGED
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
