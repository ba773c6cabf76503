"""Regenerates the golden checkpoints in ``tests/golden/data`` with TensorFlow.

Run from the repository root::

    .venv/bin/python tests/golden/generate.py

The tensor values come from ``cases.py``; TensorFlow writes the files. After
writing, every checkpoint is read back through TensorFlow and compared bit for
bit with the values in ``cases.py``, so a file that TensorFlow itself would not
read back identically never lands in ``data/``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases as golden  # noqa: E402  (a sibling module, importable once HERE is on the path)

#: The TensorFlow release the committed files were written with.
TF_VERSION = "2.21.0"
#: The data directory must stay small.
MAX_TOTAL_BYTES = 3 * 1024 * 1024


def _import_tf() -> ModuleType:
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    return tf


def _save_v2(tf: ModuleType, prefix: Path, entries: Sequence[golden.Entry]) -> None:
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=[e.name for e in entries],
        shape_and_slices=[e.shape_and_slice for e in entries],
        tensors=[tf.constant(e.array) for e in entries],
    )


def _write_savev2(tf: ModuleType, case: golden.Case, case_dir: Path) -> None:
    _save_v2(tf, case_dir / case.prefix, case.shards[0])


def _write_merged(tf: ModuleType, case: golden.Case, case_dir: Path) -> None:
    # The same layout TF's own sharded savers use: <prefix>_temp/part-NNNNN-of-NNNNN.
    temp = case_dir / f"{case.prefix}_temp"
    temp.mkdir()
    n = len(case.shards)
    parts = [temp / f"part-{i:05d}-of-{n:05d}" for i in range(n)]
    for part, entries in zip(parts, case.shards):
        _save_v2(tf, part, entries)
    tf.raw_ops.MergeV2Checkpoints(
        checkpoint_prefixes=[str(p) for p in parts],
        destination_prefix=str(case_dir / case.prefix),
        delete_old_dirs=True,
    )


def _write_saver_sharded(tf: ModuleType, case: golden.Case, case_dir: Path) -> None:
    graph = tf.Graph()
    part_re = re.compile(r"/part_(\d+)(/|$)")
    with graph.as_default():
        for var in case.variables:
            if not var.partitions:
                with graph.device(f"/cpu:{var.device}"):
                    tf.compat.v1.Variable(var.array, name=var.name)
                continue
            devices = var.partitions

            def place(op: Any, devices: tuple[int, ...] = devices) -> str:
                match = part_re.search(op.name)
                return f"/cpu:{devices[int(match.group(1))] if match else devices[0]}"

            def init(shape: Any, dtype: Any = None, partition_info: Any = None, full: np.ndarray = var.array) -> Any:
                offset = partition_info.var_offset if partition_info else [0] * len(shape)
                region = tuple(slice(o, o + n) for o, n in zip(offset, shape))
                return tf.constant(full[region])

            with graph.device(place):
                tf.compat.v1.get_variable(
                    var.name,
                    shape=var.array.shape,
                    dtype=tf.as_dtype(var.array.dtype),
                    initializer=init,
                    partitioner=tf.compat.v1.fixed_size_partitioner(len(devices)),
                )
        saver = tf.compat.v1.train.Saver(sharded=True)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": 2}, allow_soft_placement=False)
        with tf.compat.v1.Session(graph=graph, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(
                sess, str(case_dir / case.prefix), write_meta_graph=False, write_state=False
            )


def _write_tf2(tf: ModuleType, case: golden.Case, case_dir: Path) -> None:
    root = tf.train.Checkpoint()
    for var in case.variables:
        *path, leaf = var.name.split("/")
        node = root
        for part in path:
            child = getattr(node, part, None)
            if child is None:
                child = tf.Module()
                setattr(node, part, child)
            node = child
        setattr(node, leaf, tf.Variable(var.array))
    saved = root.save(str(case_dir / "ckpt"))
    if Path(saved).name != case.prefix:
        raise AssertionError(f"TF saved {saved!r}, expected prefix {case.prefix!r}")


_WRITERS = {
    "savev2": _write_savev2,
    "merged": _write_merged,
    "saver_sharded": _write_saver_sharded,
    "tf2": _write_tf2,
}


def _tf_value(value: object) -> np.ndarray:
    """TF's ``get_tensor`` result as an ndarray (it returns a scalar string as ``bytes``)."""
    if isinstance(value, bytes):
        out = np.empty((), dtype=object)
        out[()] = value
        return out
    return np.asarray(value)


def _verify(tf: ModuleType, case: golden.Case, case_dir: Path) -> None:
    """Reads the case back through TensorFlow and checks it against ``cases.py``."""
    prefix = str(case_dir / case.prefix)
    files = sorted(p.name for p in case_dir.iterdir())
    want = sorted([f"{case.prefix}.index", *case.data_files] + (["checkpoint"] if case.kind == "tf2" else []))
    if files != want:
        raise AssertionError(f"{case.name}: files {files}, expected {want}")
    listing = [(name, list(shape)) for name, shape in tf.train.list_variables(prefix)]
    if listing != case.listing:
        raise AssertionError(f"{case.name}: list_variables {listing} != {case.listing}")
    source = str(case_dir) if case.kind == "tf2" else prefix
    reader = tf.train.load_checkpoint(source)
    dtypes = reader.get_variable_to_dtype_map()
    for name, expected in case.expected.items():
        got = _tf_value(reader.get_tensor(name))
        if np.dtype(dtypes[name].as_numpy_dtype) != expected.dtype and expected.dtype != golden.STRING:
            raise AssertionError(f"{case.name}/{name}: TF dtype {dtypes[name]} != {expected.dtype}")
        if name in case.opaque:
            if got.dtype != expected.dtype or got.shape != expected.shape or not got.item():
                raise AssertionError(f"{case.name}/{name}: unexpected {got!r:.200}")
            continue
        diff = golden.describe_difference(got, expected)
        if diff is not None:
            raise AssertionError(f"{case.name}/{name}: {diff}")
    for name, spec in case.slice_reads:
        full = case.expected[name]
        shape_and_slice = " ".join(str(d) for d in full.shape) + " " + spec
        (got,) = tf.raw_ops.RestoreV2(
            prefix=prefix,
            tensor_names=[name],
            shape_and_slices=[shape_and_slice],
            dtypes=[tf.as_dtype(full.dtype)],
        )
        want_region = full[golden.slice_region(spec, full.shape)]
        diff = golden.describe_difference(got.numpy(), want_region)
        if diff is not None:
            raise AssertionError(f"{case.name}/{name}[{spec}]: {diff}")


def main(argv: Sequence[str] | None = None) -> int:
    """Writes every (or the named) golden case and checks it; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "data", help="the data directory")
    args = parser.parse_args(argv)
    names = args.cases or list(golden.CASES)
    unknown = sorted(set(names) - set(golden.CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(golden.CASES)}")

    tf = _import_tf()
    if tf.__version__ != TF_VERSION:
        print(
            f"warning: TensorFlow {tf.__version__} differs from {TF_VERSION}, which the "
            "committed files and README name",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        case = golden.CASES[name]
        case_dir = args.out / name
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir()
        _WRITERS[case.kind](tf, case, case_dir)
        _verify(tf, case, case_dir)
        size = sum(p.stat().st_size for p in case_dir.iterdir())
        print(f"{name:16s} {case.kind:14s} {len(case.expected):6d} tensors {size:9d} bytes")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{'total':16s} {total:41d} bytes")
    if total > MAX_TOTAL_BYTES:
        print(f"error: {args.out} holds {total} bytes, over {MAX_TOTAL_BYTES}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
