"""The tensor values of every golden checkpoint, defined with NumPy alone.

``generate.py`` feeds these values to TensorFlow to write ``data/``; the tests
read the same definitions to know what each file must hold. Nothing here
imports TensorFlow or gpusaver.

Every "random" value comes from :func:`det_bytes`, a SHA-256 counter stream
keyed by a label, so the values never depend on NumPy's generators and are the
same on every machine and every NumPy version.

A case is one checkpoint, of one of four kinds:

* ``savev2``: one ``tf.raw_ops.SaveV2`` call (one bundle, one data file).
  ``shards[0]`` lists its tensors in the order SaveV2 received them.
* ``merged``: one SaveV2 call per entry of ``shards``, then
  ``tf.raw_ops.MergeV2Checkpoints`` over them, in order.
* ``saver_sharded``: a TF1 graph-mode ``Saver(sharded=True)`` over the
  ``variables`` of the case, placed on ``/cpu:0`` and ``/cpu:1``.
* ``tf2``: ``tf.train.Checkpoint.save`` of the ``variables`` of the case.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

__all__ = [
    "CASES",
    "DTYPES",
    "Case",
    "Entry",
    "STRING",
    "TF2_OBJECT_GRAPH_KEY",
    "Variable",
    "bit_equal",
    "det_bytes",
    "det_array",
    "describe_bytes_difference",
    "describe_difference",
    "describe_items_difference",
    "full_slice_region",
    "many_key_names",
    "slice_region",
]

#: Every numeric dtype the V2 format stores, by the name used in tensor names.
DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}

#: NumPy's dtype for string tensors: object arrays holding ``bytes``.
STRING = np.dtype(object)

#: The key under which a TF2 checkpoint stores its serialized object graph.
TF2_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


# --------------------------------------------------------------------------------------
# Deterministic values


def det_bytes(label: str, n: int) -> bytes:
    """``n`` pseudo-random bytes that depend only on ``label``."""
    out = bytearray()
    counter = 0
    seed = label.encode("utf-8")
    while len(out) < n:
        out += hashlib.sha256(seed + b"\x00" + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:n])


def det_array(label: str, dtype: np.dtype | type, shape: Sequence[int]) -> np.ndarray:
    """A deterministic array of any supported dtype, strings included.

    Numeric arrays take every bit pattern (so floats include NaNs with payloads,
    infinities, signed zeros and subnormals); bools are 0 or 1; strings are
    ``bytes`` of 0 to 24 arbitrary bytes, empty ones included.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == STRING:
        raw = det_bytes(label + "/lengths", count)
        items = []
        for i, r in enumerate(raw):
            length = r % 25 if r % 7 else 0
            items.append(det_bytes(f"{label}/{i}", length))
        out = np.empty(count, dtype=object)
        out[:] = items
        return out.reshape(shape)
    if dtype == np.bool_:
        raw = np.frombuffer(det_bytes(label, count), dtype=np.uint8)
        return (raw & 1).astype(np.bool_).reshape(shape)
    raw = det_bytes(label, count * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _strings(values: Sequence[bytes], shape: Sequence[int] | None = None) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out.reshape(tuple(shape) if shape is not None else (len(values),))


def _bits(dtype: np.dtype | type, words: Sequence[int]) -> np.ndarray:
    """An array made of exact bit patterns (given as unsigned integers)."""
    dtype = np.dtype(dtype)
    unsigned = np.dtype(f"<u{dtype.itemsize}")
    return np.array(words, dtype=unsigned).view(dtype)


# --------------------------------------------------------------------------------------
# Comparison


def bit_equal(actual: object, expected: np.ndarray) -> bool:
    """True when ``actual`` is an ndarray equal to ``expected`` in dtype, shape and bits."""
    return describe_difference(actual, expected) is None


def describe_difference(actual: object, expected: np.ndarray) -> str | None:
    """None when ``actual`` matches ``expected`` bit for bit, else what differs."""
    if not isinstance(actual, np.ndarray):
        return f"expected an ndarray, got {type(actual).__name__}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} != expected {expected.dtype}"
    if actual.shape != expected.shape:
        return f"shape {actual.shape} != expected {expected.shape}"
    if expected.dtype == STRING:
        got = [bytes(x) if isinstance(x, (bytes, bytearray)) else x for x in actual.reshape(-1)]
        want = list(expected.reshape(-1))
        for i, (g, w) in enumerate(zip(got, want)):
            if not isinstance(g, bytes) or g != w:
                return f"element {i}: {g!r:.80} != expected {w!r:.80}"
        return None
    a = np.ascontiguousarray(actual).view(np.uint8).reshape(-1)
    e = np.ascontiguousarray(expected).view(np.uint8).reshape(-1)
    if not np.array_equal(a, e):
        first = int(np.flatnonzero(a != e)[0]) // expected.dtype.itemsize
        return (
            f"element {first} (flat) differs: {actual.reshape(-1)[first]!r} != expected "
            f"{expected.reshape(-1)[first]!r} (bits compared)"
        )
    return None


def describe_bytes_difference(ours: bytes, theirs: bytes, what: str = "file") -> str | None:
    """None when equal, else the first differing offset with both bytes around it."""
    if ours == theirs:
        return None
    n = min(len(ours), len(theirs))
    first = next((i for i in range(n) if ours[i] != theirs[i]), n)
    lo = max(0, first - 8)
    return (
        f"{what}: {len(ours)} bytes (ours) vs {len(theirs)} (TF); first difference at offset "
        f"{first}: ours {ours[lo:first + 16].hex(' ')} | TF {theirs[lo:first + 16].hex(' ')} "
        f"(from offset {lo})"
    )


def describe_items_difference(
    ours: Sequence[tuple[bytes, bytes]], theirs: Sequence[tuple[bytes, bytes]]
) -> str | None:
    """None when two tables' (key, value) lists are equal, else the first difference."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return (
                f"entry {i}: ours key {a[0]!r:.100} value {a[1].hex(' ')[:160]} | "
                f"TF key {b[0]!r:.100} value {b[1].hex(' ')[:160]}"
            )
    if len(ours) != len(theirs):
        return f"ours has {len(ours)} entries, TF {len(theirs)}"
    return None


# --------------------------------------------------------------------------------------
# Slices


def slice_region(spec: str, full_shape: Sequence[int]) -> tuple[slice, ...]:
    """The NumPy index of a TF slice spec such as ``"0,5:-"`` within ``full_shape``."""
    pieces = [p for p in spec.split(":") if p]
    if len(pieces) != len(full_shape):
        raise ValueError(f"slice {spec!r} has {len(pieces)} dims, shape has {len(full_shape)}")
    region = []
    for piece, dim in zip(pieces, full_shape):
        if piece == "-":
            region.append(slice(0, dim))
        else:
            start, length = (int(x) for x in piece.split(","))
            region.append(slice(start, start + length))
    return tuple(region)


def full_slice_region(shape_and_slice: str) -> tuple[list[int], str]:
    """Splits RestoreV2's ``"10 4 2,3:-"`` into its full shape and slice spec."""
    tokens = shape_and_slice.split(" ")
    return [int(t) for t in tokens[:-1]], tokens[-1]


# --------------------------------------------------------------------------------------
# Case definitions


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor handed to SaveV2 (or BundleWriter).

    Attributes:
        name: the tensor name.
        array: the tensor; for a slice, the slice's values.
        full_shape: the full tensor's shape when this is a slice, else None.
        slice_spec: TF's slice part, e.g. ``"0,5:-"``; empty when not a slice.
    """

    name: str
    array: np.ndarray
    full_shape: tuple[int, ...] | None = None
    slice_spec: str = ""

    @property
    def shape_and_slice(self) -> str:
        """SaveV2's ``shape_and_slices`` element for this entry."""
        if self.full_shape is None:
            return ""
        return " ".join(str(d) for d in self.full_shape) + " " + self.slice_spec


@dataclasses.dataclass(frozen=True)
class Variable:
    """A variable of a ``saver_sharded`` or ``tf2`` case.

    Attributes:
        name: the variable's name (TF1) or its attribute path (TF2, ``/``-joined).
        array: its value.
        device: the CPU index (TF1 sharded Saver) it lives on.
        partitions: for a TF1 partitioned variable, the devices of its parts along
            axis 0, in order (equal parts); empty for an ordinary variable.
    """

    name: str
    array: np.ndarray
    device: int = 0
    partitions: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """The checkpoint key of a TF2 variable."""
        return f"{self.name}/.ATTRIBUTES/VARIABLE_VALUE"


@dataclasses.dataclass(frozen=True)
class Case:
    """One golden checkpoint.

    Attributes:
        name: the directory under ``data/``.
        kind: ``savev2``, ``merged``, ``saver_sharded`` or ``tf2``.
        prefix: the checkpoint prefix, relative to the case directory.
        shards: the SaveV2 calls (``savev2``: one; ``merged``: one per input).
        variables: the variables of a ``saver_sharded`` or ``tf2`` case.
        expected: every listed tensor by name, as a reader returns it.
        opaque: names whose value TF computes itself (the TF2 object graph);
            only their dtype and shape are known in advance.
        slice_reads: (name, slice spec) regions worth reading back.
    """

    name: str
    kind: str
    prefix: str
    shards: tuple[tuple[Entry, ...], ...] = ()
    variables: tuple[Variable, ...] = ()
    expected: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    opaque: frozenset[str] = frozenset()
    slice_reads: tuple[tuple[str, str], ...] = ()

    @property
    def listing(self) -> list[tuple[str, list[int]]]:
        """What ``list_variables`` returns: (name, shape), sorted by name."""
        return sorted((name, list(arr.shape)) for name, arr in self.expected.items())

    @property
    def dtype_map(self) -> dict[str, np.dtype]:
        """What ``get_variable_to_dtype_map`` returns."""
        return {name: arr.dtype for name, arr in self.expected.items()}

    @property
    def data_files(self) -> list[str]:
        """The data file names (relative to the case directory)."""
        n = {"savev2": 1, "tf2": 1}.get(self.kind, 2)
        return [f"{self.prefix}.data-{i:05d}-of-{n:05d}" for i in range(n)]


def _expected_from_entries(shards: Sequence[Sequence[Entry]]) -> dict[str, np.ndarray]:
    """The full tensors that a set of SaveV2 entries describes (slices assembled)."""
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        for entry in shard:
            if entry.full_shape is None:
                out[entry.name] = entry.array
                continue
            full = out.get(entry.name)
            if full is None:
                full = np.zeros(entry.full_shape, dtype=entry.array.dtype)
                out[entry.name] = full
            full[slice_region(entry.slice_spec, entry.full_shape)] = entry.array
    return out


def _sliced(name: str, full: np.ndarray, specs: Sequence[str]) -> list[Entry]:
    return [
        Entry(name, full[slice_region(s, full.shape)].copy(), tuple(full.shape), s) for s in specs
    ]


def _savev2_case(name: str, entries: Sequence[Entry], **kwargs: object) -> Case:
    shards = (tuple(entries),)
    return Case(
        name, "savev2", "ckpt", shards=shards, expected=_expected_from_entries(shards), **kwargs
    )


def _dtypes_case() -> Case:
    entries: list[Entry] = []
    # Reverse order of the dict, so the data file order differs from the sorted key order.
    for dname, dtype in reversed(list(DTYPES.items())):
        entries.append(Entry(f"{dname}/matrix", det_array(f"dtypes/{dname}/m", dtype, (3, 5))))
        entries.append(Entry(f"{dname}/scalar", det_array(f"dtypes/{dname}/s", dtype, ())))
        entries.append(Entry(f"{dname}/empty", det_array("", dtype, (2, 0, 3))))
        entries.append(Entry(f"{dname}/vector", det_array(f"dtypes/{dname}/v", dtype, (37,))))
    entries.append(Entry("float32/empty1d", np.zeros((0,), np.float32)))
    entries.append(
        Entry(
            "float32/special",
            _bits(
                np.float32,
                [0x7FC00000, 0x7FC00001, 0xFFBADBAD, 0x7F800001, 0x7F800000, 0xFF800000,
                 0x80000000, 0x00000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0x3F800000],
            ),
        )
    )
    entries.append(
        Entry(
            "float64/special",
            _bits(
                np.float64,
                [0x7FF8000000000000, 0x7FF0000000000001, 0xFFF8DEADBEEF0001,
                 0x8000000000000000, 0x0000000000000001, 0x7FF0000000000000],
            ),
        )
    )
    entries.append(
        Entry("float16/special", _bits(np.float16, [0x7E00, 0x7C01, 0xFE55, 0x8000, 0x0001, 0x7C00]))
    )
    entries.append(
        Entry("bfloat16/special", _bits(ml_dtypes.bfloat16, [0x7FC0, 0x7F81, 0xFFC1, 0x8000, 0x0001]))
    )
    entries.append(
        Entry("complex64/special", _bits(np.complex64, [0x7FC00001_FF800000, 0x80000000_7F800001]))
    )
    entries.append(Entry("uint64/max", np.array([0, 1, 2**63, 2**64 - 1], np.uint64)))
    entries.append(Entry("int64/extremes", np.array([-(2**63), -1, 0, 2**63 - 1], np.int64)))
    entries.append(Entry("bool/all", np.array([[True, False], [False, True]])))
    return _savev2_case("dtypes", entries)


def _strings_case() -> Case:
    long_a = det_bytes("strings/long_a", 70_000)  # a 3-byte length varint
    long_b = b"y" * 200  # a 2-byte length varint
    entries = [
        Entry("scalar", _strings([b"hello, checkpoint"], ())),
        Entry("scalar_empty", _strings([b""], ())),
        Entry("all_empty", _strings([b"", b"", b""])),
        Entry("mixed", _strings(
            [b"", b"a", b"\x00\xff\xfe\x01", "h\u00e9llo".encode(), "\u540d\u524d".encode(),
             b"tab\tnewline\n"], (2, 3))),
        Entry("long", _strings([long_a, long_b, b"z", b""])),
        Entry("zero_elements", _strings([], (0,))),
        Entry("zero_elements_2d", _strings([], (2, 0))),
        Entry("random", det_array("strings/random", STRING, (4, 4))),
        Entry("\u00fcn\u00efcode/\u540d\u524d", _strings([b"non-ASCII name"])),
        Entry("a.b", _strings([b"sorts before a/b"])),
        Entry("a/b", _strings([b"sorts after a.b"])),
        Entry("A", _strings([b"upper case sorts first"])),
    ]
    return _savev2_case("strings", entries)


def _slices_case() -> Case:
    pv = det_array("slices/pv", np.float32, (10, 4))
    part = det_array("slices/part", np.int64, (10, 4))
    big = det_array("slices/big", np.float32, (200, 3))
    grid = det_array("slices/grid", np.int32, (6, 8))
    cube = det_array("slices/cube", ml_dtypes.bfloat16, (4, 3, 2))
    flags = det_array("slices/flags", np.bool_, (8,))
    cplx = det_array("slices/complex", np.complex64, (4, 2))
    full_dash = det_array("slices/full_dash", np.float64, (3, 2))
    full_explicit = det_array("slices/full_explicit", np.int16, (3, 2))
    pv_parts = _sliced("pv", pv, ["0,5:0,4", "5,5:0,4"])  # TF1 PartitionedVariable form
    entries = [
        pv_parts[1],  # the second slice first, so data order != slice order
        Entry("plain", det_array("slices/plain", np.float64, (10, 4))),
        pv_parts[0],
        *_sliced("part", part, ["0,5:-", "5,5:-"]),
        *_sliced("big", big, ["0,100:-", "100,100:-"]),
        *_sliced("grid", grid, ["0,3:0,4", "0,3:4,4", "3,3:0,4", "3,3:4,4"]),
        *_sliced("cube", cube, ["-:0,1:-", "-:1,2:-"]),
        *_sliced("flags", flags, ["0,3", "3,5"]),
        *_sliced("complex", cplx, ["2,2:-", "0,2:-"]),
        *_sliced("full_dash", full_dash, ["-:-"]),  # a full slice is an ordinary entry
        *_sliced("full_explicit", full_explicit, ["0,3:0,2"]),
    ]
    reads = (
        ("pv", "2,3:-"),
        ("pv", "4,2:1,2"),
        ("pv", "0,10:0,4"),
        ("part", "3,4:-"),
        ("part", "9,1:3,1"),
        ("big", "90,20:1,2"),
        ("big", "99,2:-"),
        ("grid", "2,2:3,2"),
        ("grid", "-:-"),
        ("cube", "1,2:-:1,1"),
        ("flags", "2,3"),
        ("complex", "1,2:-"),
        ("plain", "1,3:2,2"),
        ("full_dash", "1,1:-"),
    )
    return _savev2_case("slices", entries, slice_reads=reads)


def _merged_case() -> Case:
    w = det_array("merged/w", np.float32, (10, 4))
    v = det_array("merged/v", np.int32, (6,))
    w_parts = _sliced("w", w, ["0,5:-", "5,5:-"])
    shard0 = (
        w_parts[0],
        Entry("a", det_array("merged/a", np.float32, (3,))),
        Entry("shard0/strings", _strings([b"first", b"", b"shard"])),
    )
    shard1 = (
        Entry("z", det_array("merged/z", np.int32, (2, 2))),
        w_parts[1],
        # "v" first appears in the second input, so its full entry gets shard_id 1.
        *_sliced("v", v, ["3,3", "0,3"]),
        Entry("shard1/empty", np.zeros((0, 2), np.float16)),
    )
    shards = (shard0, shard1)
    return Case(
        "merged",
        "merged",
        "model",
        shards=shards,
        expected=_expected_from_entries(shards),
        slice_reads=(("w", "3,4:-"), ("w", "4,2:1,3"), ("v", "2,2")),
    )


def many_key_names(count: int, label: str) -> list[str]:
    """``count`` distinct long names whose sorted neighbours share little prefix."""
    names = []
    for i in range(count):
        h = hashlib.sha256(f"{label}/{i}".encode()).hexdigest()
        names.append(f"{h[:10]}/encoder/layer_{i:05d}/{h[10:22]}/kernel")
    return names


def _many_keys_case() -> Case:
    names = many_key_names(12_500, "many_keys")
    kinds = [(np.int8, ()), (np.float32, (2,)), (np.uint8, (0,)), (np.int64, ())]
    entries = []
    for i, name in enumerate(names):
        dtype, shape = kinds[i % len(kinds)]
        entries.append(Entry(name, det_array(f"many/{i}", dtype, shape)))
    return _savev2_case("many_keys", entries)


def _saver_sharded_case() -> Case:
    variables = (
        Variable("w", det_array("saver/w", np.float32, (2, 3)), device=0),
        Variable("b", det_array("saver/b", np.int64, (3,)), device=1),
        Variable("s", _strings([b"x", b"", "\u00e9".encode()]), device=0),
        Variable("h", det_array("saver/h", np.float16, (4,)), device=1),
        Variable("scope/step", np.array(42, np.int64), device=1),
        Variable("pv", det_array("saver/pv", np.float32, (10, 4)), partitions=(0, 1)),
    )
    return Case(
        "saver_sharded",
        "saver_sharded",
        "model.ckpt",
        variables=variables,
        expected={v.name: v.array for v in variables},
        slice_reads=(("pv", "3,4:-"), ("pv", "4,2:2,2")),
    )


def _tf2_case() -> Case:
    variables = (
        Variable("model/dense/kernel", det_array("tf2/kernel", np.float32, (3, 2))),
        Variable("model/dense/bias", det_array("tf2/bias", np.float32, (2,))),
        Variable("model/embedding", det_array("tf2/embedding", ml_dtypes.bfloat16, (5, 4))),
        Variable("model/vocab", _strings([b"<pad>", b"hello", b"w\xc3\xb6rld"])),
        Variable("step", np.array(7, np.int64)),
    )
    expected: dict[str, np.ndarray] = {v.key: v.array for v in variables}
    expected["save_counter/.ATTRIBUTES/VARIABLE_VALUE"] = np.array(1, np.int64)
    expected[TF2_OBJECT_GRAPH_KEY] = _strings([b""], ())
    return Case(
        "tf2_checkpoint",
        "tf2",
        "ckpt-1",
        variables=variables,
        expected=expected,
        opaque=frozenset({TF2_OBJECT_GRAPH_KEY}),
    )


#: Every golden case, by name.
CASES: dict[str, Case] = {
    c.name: c
    for c in (
        _dtypes_case(),
        _strings_case(),
        _slices_case(),
        _merged_case(),
        _many_keys_case(),
        _saver_sharded_case(),
        _tf2_case(),
    )
}
