"""Property tests of the bundle writer and reader, and of Saver round trips.

Hypothesis drives one :class:`~gpusaver.format.BundleWriter` with a random
sequence of ``add``, ``add_slice`` and ``add_many`` calls, interleaved in any
order, over random dtypes (every float, integer, bool and complex type, the
ml_dtypes narrow floats, and strings as object arrays of ``bytes``), random
layouts (C-contiguous, strided, Fortran-ordered, big-endian, read-only; 0-d and
zero-size shapes) and byte sizes drawn on both sides of every threshold the
writer, the reader and the host backend have (``T``), also in groups of many
small tensors whose count or total sits on a threshold. The thresholds are read
from gpusaver (``gpusaver.config``, or the module constants of trees before it),
never hard-coded, so the sizes follow them when they change; a threshold that
can no longer be found is an error at import. Each example may also override
gpusaver's settings, separately for writing and for reading: thread counts,
reads forced onto several threads, and thresholds shrunk so that small tensors
cross them many times. Every test runs on both host paths (the C extension and
its pure-Python twin, the ``host_path`` fixture).

Properties:

* ``test_bundle_roundtrip``: after ``finish()`` every tensor reads back
  bit-exactly (dtype, shape, bytes) through ``gpusaver.load_checkpoint``;
  ``list_variables`` names exactly the tensors added, with their shapes;
  ``BundleReader.read_slice`` of a random region equals that region of the
  value; ``read_into`` fills a flat buffer with the tensor's exact bytes;
  ``read_many_into`` of a random subset in random order does too; no
  ``.tempstate`` file remains.
* ``test_bundle_roundtrip_tf``: TensorFlow's ``tf.train.load_checkpoint``
  reads every tensor of the same kind of bundle bit-exactly (sliced tensors of
  dtypes TF 2.21 cannot assemble -- float16, float8, uint16/32/64, strings --
  are compared through gpusaver only).
* ``test_saver_roundtrip``: a ``gpusaver.Saver`` over the same kind of random
  variables, spread over 1..4 virtual devices ``/cpu:k``, sharded or not,
  saves to the prefix it returns; the arrays are overwritten; ``restore`` puts
  the saved values back into the very same array objects (views, big-endian
  and Fortran arrays included) bit-exactly, sequentially or not; a second Saver
  over a random subset restores that subset alone (reads with gaps);
  ``gpusaver.load_checkpoint`` reads every variable.
* ``test_saver_roundtrip_tf``: TensorFlow reads what the Saver wrote.

A failing read is reported once for all tensors of the example (which ones a
writer defect damages may depend on the order the writer threads ran in), so
hypothesis replays a failure consistently. The writer defect fixed in
``BundleWriter._write`` (small tensors queued by ``add``, then an ``add`` of at
least ``small_bytes``: the small ones were written at the wrong offset, a
ChecksumError on read) fails ``test_bundle_roundtrip`` and
``test_bundle_roundtrip_tf`` on the code before the fix; its minimal example is
``add("v0", <2 bytes>)`` then ``add("v1", <1 MiB>)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gpusaver
from gpusaver.backends import numpy_backend
from gpusaver.format import BundleReader, BundleWriter
from gpusaver.format import reader as reader_mod
from gpusaver.format import writer as writer_mod
from gpusaver.format.wire import encode_varint

pytestmark = pytest.mark.usefixtures("host_path")

KIB, MIB = 1 << 10, 1 << 20


try:  # every tunable size, in one place (older trees kept them as module constants)
    from gpusaver import config as _config
except ImportError:  # pragma: no cover - a tree before gpusaver/config.py
    _config = None

#: Each threshold: its setting in gpusaver.config, or the module constant that held it before.
_SOURCES = {
    "small_bytes": (writer_mod, "_SMALL"),
    "segment_bytes": (writer_mod, "_SEGMENT"),
    "pack_limit": (writer_mod, "_PACK_LIMIT"),
    "pack_bytes": (writer_mod, "_PACK_BYTES"),
    "batch_bytes": (writer_mod, "_BATCH_BYTES"),
    "batch_count": (writer_mod, "_BATCH_COUNT"),
    "read_segment_bytes": (reader_mod, "_SEGMENT_BYTES"),
    "unpack_limit": (reader_mod, "_UNPACK_LIMIT"),
    "chunk_bytes": (reader_mod, "_CHUNK_BYTES"),
    "gap_bytes": (reader_mod, "_GAP_BYTES"),
    "parallel_chunked_bytes": (reader_mod, "_PARALLEL_CHUNKED"),
    "parallel_read_bytes": (reader_mod, "_PARALLEL_BYTES"),
    "host_chunk_bytes": (numpy_backend, "CHUNK_BYTES"),
    "iov_max": (reader_mod, "_IOV_MAX"),
}
#: Names the reader's thresholds have in gpusaver.config (they share the writer's settings).
_CONFIG_NAMES = {
    "read_segment_bytes": "read_chunk_bytes",
    "unpack_limit": "pack_limit",
    "chunk_bytes": "pack_bytes",
}


def _threshold(name: str) -> int:
    """A threshold's current value, read from gpusaver (never hard-coded here).

    Raises:
        LookupError: gpusaver has it neither as a setting nor as a constant: the
            test must learn where it went, rather than silently test less.
    """
    module, constant = _SOURCES[name]
    if _config is not None:
        try:
            return int(_config.get(_CONFIG_NAMES.get(name, name)))
        except Exception:  # noqa: BLE001 - not a setting (e.g. the reader's iovec limit)
            pass
    value = getattr(module, constant, None)
    if not isinstance(value, (int, np.integer)):
        raise LookupError(f"threshold {name!r}: neither gpusaver.config nor {module.__name__}.{constant} has it")
    return int(value)


#: Every threshold of the writer, the reader and the host backend, by name.
T = {name: _threshold(name) for name in _SOURCES}
#: Byte-size thresholds a single tensor may sit on.
SIZE_THRESHOLDS = [T[n] for n in _SOURCES if n not in ("batch_count", "iov_max", "host_chunk_bytes")]
#: Count thresholds: buffers per batch, buffers per scatter read.
COUNT_THRESHOLDS = [T["batch_count"], T["iov_max"]]

#: The largest single tensor drawn (memory and time stay small; 64 MiB thresholds are
#: reached by the forced-parallel reads and by many tensors together instead).
MAX_TENSOR = 5 * MIB + 64 * KIB
#: Bytes drawn per example, all tensors together.
EXAMPLE_BUDGET = 14 * MIB


def _around(values: Sequence[int | None], limit: int) -> list[int]:
    out = set()
    for v in values:
        if v is None:
            continue
        for d in (-1, 0, 1):
            if 0 <= v + d <= limit:
                out.add(v + d)
    return sorted(out)


_BASE_SIZES = [0, 1, 64 * KIB, 1 * MIB, 4 * MIB]
_STAGING = [T["pack_bytes"] + T["pack_limit"], T["chunk_bytes"] + T["unpack_limit"]]
#: Every byte size on or next to a threshold (single tensors).
THRESHOLD_SIZES = _around(_BASE_SIZES + SIZE_THRESHOLDS + _STAGING, MAX_TENSOR)
SMALL_SIZES = sorted({s for s in THRESHOLD_SIZES if s < 64 * KIB} | {2, 3, 7, 8, 100, 4095, 4096})
#: Totals a group of many tensors is sized to reach (packing, batching, chunked reads).
TOTAL_THRESHOLDS = _around(
    [T["pack_bytes"], T["batch_bytes"], T["chunk_bytes"], T["parallel_chunked_bytes"], T["small_bytes"]], 10 * MIB
)

FLOATS = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]
INTS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
NUMERIC = [np.dtype(d) for d in FLOATS + INTS + [np.bool_, np.complex64, np.complex128]]
STRING = np.dtype(object)
DTYPES = NUMERIC + [STRING]
#: Sliced tensors TensorFlow 2.21 cannot assemble ("Dtype ... not supported").
TF_NO_SLICED = {
    np.dtype(d)
    for d in (np.float16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, np.uint16, np.uint32, np.uint64, object)
}

LAYOUTS = ["c", "c", "strided", "fortran", "big", "big_strided", "readonly"]

PROFILE = dict(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# ------------------------------------------------------------------------- values
def c_order(arr: np.ndarray) -> np.ndarray:
    """``arr`` C-contiguous, keeping its shape (``np.ascontiguousarray`` makes 0-d arrays 1-d)."""
    return np.require(arr, requirements="C")


def _is_ml(dtype: np.dtype) -> bool:
    return type(dtype).__module__.startswith("ml_dtypes") or dtype.type.__module__.startswith("ml_dtypes")


def _random_values(rng: np.random.Generator, dtype: np.dtype, count: int) -> np.ndarray:
    """``count`` values of ``dtype`` from random bytes (every bit pattern, NaN payloads too)."""
    if dtype == np.bool_:
        return rng.integers(0, 2, count, dtype=np.uint8).view(np.bool_)
    return np.frombuffer(bytearray(rng.bytes(count * dtype.itemsize)), dtype=dtype)


def _random_strings(rng: np.random.Generator, target: int, count: int) -> list[bytes]:
    """``count`` byte strings whose encoded tensor (varints, crc, bytes) is about ``target`` bytes."""
    if count == 0:
        return []
    heads = [int(x) for x in rng.integers(0, 20, count - 1)]
    fixed = sum(len(encode_varint(n)) + n for n in heads) + 4
    last = max(0, target - fixed - 1)
    while last > 0 and fixed + len(encode_varint(last)) + last > target:
        last -= 1
    lengths = heads + [last]
    return [rng.bytes(n) for n in lengths]


def _shape_for(kind: str, count: int, rng: np.random.Generator) -> tuple[int, ...]:
    if kind == "0d" and count == 1:
        return ()
    if kind in ("2d", "3d") and count > 1:
        divisors = [d for d in (2, 3, 4, 5, 8, 16, 64, 256) if count % d == 0]
        if divisors:
            c = divisors[int(rng.integers(len(divisors)))]
            if kind == "3d" and (count // c) % 2 == 0:
                return (count // c // 2, 2, c)
            return (count // c, c)
    return (count,)


class _Compact:
    """Printed by its own ``__repr__`` in hypothesis's reports too (not field by field, arrays in full)."""

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


@dataclasses.dataclass(eq=False)
class Tensor(_Compact):
    """One tensor: ``value`` goes to the writer, ``expected`` is what must come back."""

    name: str
    value: np.ndarray
    expected: np.ndarray  # C-contiguous, native byte order
    layout: str

    @property
    def nbytes(self) -> int:
        return _encoded_size(self.expected)

    def __repr__(self) -> str:  # the values are random bytes: dtype, shape and layout say what matters
        e = self.expected
        return f"Tensor({self.name!r}, {e.dtype}, shape={e.shape}, {self.layout}, {self.nbytes} bytes)"


def _encoded_size(arr: np.ndarray) -> int:
    if arr.dtype == STRING:
        items = arr.reshape(-1).tolist()
        return sum(len(encode_varint(len(b))) + len(b) for b in items) + 4
    return arr.nbytes


def _with_layout(expected: np.ndarray, layout: str, rng: np.random.Generator) -> np.ndarray:
    """``expected``'s values in the given memory layout."""
    dtype = expected.dtype
    swappable = dtype != STRING and dtype.itemsize > 1 and not _is_ml(dtype) and dtype != np.bool_
    if layout in ("strided", "big_strided") and expected.ndim >= 1 and expected.size:
        base = np.empty((expected.shape[0] * 2,) + expected.shape[1:], dtype)
        if dtype == STRING:
            base[...] = b"junk"
        else:
            base.reshape(-1).view(np.uint8)[...] = rng.integers(0, 256, base.nbytes, dtype=np.uint8) & (
                1 if dtype == np.bool_ else 255
            )
        base[::2] = expected
        value = base[::2]
        if layout == "big_strided" and swappable:
            big = np.empty(base.shape, dtype.newbyteorder(">"))
            big[...] = base
            value = big[::2]
        return value
    if layout == "fortran" and expected.ndim >= 2:
        return np.asfortranarray(expected)
    if layout == "big" and swappable:
        return expected.astype(dtype.newbyteorder(">"))
    if layout == "readonly":
        value = expected.copy()
        value.flags.writeable = False
        return value
    return expected.copy()


@st.composite
def tensors(
    draw: Any, name: str, size: int | None = None, dtype: np.dtype | None = None, sliceable: bool = False
) -> Tensor:
    """A random tensor named ``name`` of about ``size`` bytes (drawn around a threshold when None)."""
    dtype = dtype if dtype is not None else draw(st.sampled_from(DTYPES))
    if size is None:
        size = draw(st.sampled_from(THRESHOLD_SIZES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["1d", "2d", "3d", "0d", "empty"] if not sliceable else ["1d", "2d", "3d"]))
    layout = draw(st.sampled_from(LAYOUTS))
    if dtype == STRING:
        count = 0 if kind == "empty" else (1 if kind == "0d" else draw(st.integers(1, 6)))
        if sliceable:
            count = max(count, 2)
        items = _random_strings(rng, size, count)
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        shape = (0, 3) if kind == "empty" else _shape_for(kind, len(items), rng)
        expected = arr.reshape(shape)
    else:
        if kind == "empty":
            shape = draw(st.sampled_from([(0,), (0, 3), (2, 0, 5)]))
            count = 0
        else:
            count = size // dtype.itemsize if draw(st.booleans()) else -(-size // dtype.itemsize)
            count = 1 if kind == "0d" else max(count, 2 if sliceable else 0)
            shape = _shape_for(kind, count, rng)
        expected = _random_values(rng, dtype, count).reshape(shape)
    return Tensor(name, _with_layout(expected, layout, rng), c_order(expected).copy(), layout)


def _floor(largest: int) -> int:
    """The smallest unit a tensor of ``largest`` bytes may be cut into (a few thousand pieces at most)."""
    return max(1, -(-largest // 2048))


@st.composite
def tunings(draw: Any, largest: int) -> dict[str, int]:
    """Overrides of gpusaver's settings: thread counts, reads forced onto several threads, and
    thresholds shrunk so that small tensors cross them many times (bounded by the ``largest``
    tensor, so no example is cut into millions of pieces). Empty without gpusaver.config."""
    if _config is None:
        return {}
    out: dict[str, int] = {}
    if draw(st.booleans()):
        out["writer_threads"] = draw(st.sampled_from([1, 2, 4]))
        out["reader_threads"] = draw(st.sampled_from([1, 2, 4]))
    if draw(st.booleans()):
        out["parallel_read_bytes"] = draw(st.sampled_from([1, 4096, MIB]))
        out["parallel_chunked_bytes"] = draw(st.sampled_from([1, 4096, MIB]))
    if draw(st.integers(0, 2)) == 2:
        lo = _floor(largest)

        def pick(*choices: int) -> int:
            return draw(st.sampled_from(sorted({max(lo, c) for c in choices})))

        out.update(
            segment_bytes=pick(1, 3, 4096, 65537),
            read_chunk_bytes=pick(1, 3, 4096, 65537),
            host_chunk_bytes=pick(1, 5, 4096, 65537),
            small_bytes=draw(st.sampled_from([1, 2, 100, 4096])),
            batch_bytes=draw(st.sampled_from([1, 2, 100, 65536])),
            batch_count=draw(st.sampled_from([1, 2, 3, 7])),
            pack_limit=draw(st.sampled_from([1, 2, 64, 4096])),
            pack_bytes=draw(st.sampled_from([1, 8, 4096, 65536])),
            gap_bytes=draw(st.sampled_from([0, 1, 64, 4096])),
        )
    return out


@dataclasses.dataclass(eq=False)
class Part(_Compact):
    """One ``add_slice`` call."""

    name: str
    full_shape: list[int]
    spec: str
    value: np.ndarray

    def __repr__(self) -> str:
        v = self.value
        size = _encoded_size(v)
        return f"Part({self.name!r}, {self.full_shape}, {self.spec!r}, {v.dtype}, shape={v.shape}, {size} bytes)"


@dataclasses.dataclass(eq=False)
class Op(_Compact):
    kind: str  # "add", "add_many", "add_slice", "add_each" (many adds)
    tensors: list[Tensor] = dataclasses.field(default_factory=list)
    part: Part | None = None

    def __repr__(self) -> str:
        if self.part is not None:
            return f"{self.kind}({self.part!r})"
        n = len(self.tensors)
        shown = repr(self.tensors) if n <= 6 else f"[{self.tensors[0]!r}, ... {n} tensors]"
        return f"{self.kind}({shown})"


@dataclasses.dataclass(eq=False)
class Case(_Compact):
    ops: list[Op]
    whole: list[Tensor]  # every tensor, as the reader must return it (partitioned ones assembled)
    sliced: set[str]  # names stored as slices
    regions: dict[str, str]  # name -> a slice spec to read back
    many_order: list[str]  # names for read_many_into, in order
    write_tuning: dict[str, int]  # gpusaver.config overrides while writing ...
    read_tuning: dict[str, int]  # ... and while reading
    durable: bool

    def __repr__(self) -> str:
        ops = ",\n  ".join(repr(op) for op in self.ops)
        return (
            f"Case(ops=[\n  {ops}],\n sliced={sorted(self.sliced)}, regions={self.regions}, "
            f"read_many_into of {len(self.many_order)} tensors, write_tuning={self.write_tuning}, "
            f"read_tuning={self.read_tuning}, durable={self.durable})"
        )


def _spec(extents: Sequence[tuple[int, int]], shape: Sequence[int]) -> str:
    return ":".join("-" if (a == 0 and n == d) else f"{a},{n}" for (a, n), d in zip(extents, shape))


@st.composite
def partitioned(draw: Any, name: str, size: int) -> tuple[Tensor, list[Part]]:
    """A tensor cut into 1..4 slices along its first axis (and maybe its second)."""
    t = draw(tensors(name, size=size, sliceable=True))
    full = t.expected
    shape = list(full.shape)
    cuts0 = sorted(draw(st.sets(st.integers(1, shape[0] - 1), max_size=min(3, shape[0] - 1)))) if shape[0] > 1 else []
    cuts1: list[int] = []
    if len(shape) >= 2 and shape[1] > 1 and draw(st.booleans()):
        cuts1 = sorted(draw(st.sets(st.integers(1, shape[1] - 1), max_size=1)))
    bounds0 = list(zip([0] + cuts0, cuts0 + [shape[0]]))
    bounds1 = list(zip([0] + cuts1, cuts1 + [shape[1]])) if len(shape) >= 2 else [(None, None)]
    parts = []
    for a0, b0 in bounds0:
        for a1, b1 in bounds1:
            extents = [(a0, b0 - a0)]
            region: tuple[slice, ...] = (slice(a0, b0),)
            if len(shape) >= 2:
                extents.append((a1, b1 - a1))
                region += (slice(a1, b1),)
            extents += [(0, d) for d in shape[len(extents) :]]
            piece = c_order(full[region])
            explicit = draw(st.booleans())  # "0,n" for a whole dimension, or "-"
            spec = ":".join(f"{a},{n}" for a, n in extents) if explicit else _spec(extents, shape)
            value = _with_layout(piece, t.layout, np.random.default_rng(len(parts)))
            parts.append(Part(name, shape, spec, value))
    return t, parts


@st.composite
def bulk(draw: Any, prefix: str) -> list[Tensor]:
    """Many small tensors whose count or total sits on a count or byte threshold."""
    dtype = draw(st.sampled_from(NUMERIC))
    size = draw(st.sampled_from(SMALL_SIZES))
    per = max(dtype.itemsize, size - size % dtype.itemsize)
    by_count = draw(st.booleans())
    if by_count or not TOTAL_THRESHOLDS:
        count = draw(st.sampled_from(_around(COUNT_THRESHOLDS, 1 << 20) or [1]))
        per = min(per, 4 * KIB)
    else:
        total = draw(st.sampled_from(TOTAL_THRESHOLDS))
        count = max(1, min(2048, total // per + draw(st.integers(-1, 1))))
    per -= per % dtype.itemsize
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    flat = _random_values(rng, dtype, count * (per // dtype.itemsize))
    pieces = flat.reshape(count, per // dtype.itemsize) if count else flat.reshape(0, 0)
    return [Tensor(f"{prefix}/{i:05d}", pieces[i], pieces[i].copy(), "c") for i in range(count)]


NAME_HEADS = st.text(alphabet="ab/_.é0", max_size=3)


@st.composite
def variable_sets(draw: Any, allow_bulk: bool = True) -> list[Tensor]:
    """1..8 random tensors (and maybe a group of many small ones) within the example's byte budget."""
    budget = EXAMPLE_BUDGET
    out: list[Tensor] = []
    for i in range(draw(st.integers(1, 8))):
        size = draw(st.sampled_from(THRESHOLD_SIZES))
        if size > budget:
            size = draw(st.sampled_from(SMALL_SIZES))
        t = draw(tensors(f"{draw(NAME_HEADS)}v{i}", size=size))
        budget -= t.nbytes
        out.append(t)
    if allow_bulk and draw(st.integers(0, 3)) == 3:
        out += draw(bulk(f"{draw(NAME_HEADS)}bulk"))
    return out


@st.composite
def cases(draw: Any) -> Case:
    """A random sequence of writer calls, with what to read back and how."""
    singles = draw(variable_sets(allow_bulk=False))
    budget = EXAMPLE_BUDGET - sum(t.nbytes for t in singles)
    ops: list[Op] = []
    groups: dict[int, list[Tensor]] = {}
    for t in singles:
        how = draw(st.sampled_from(["add", "add", "many0", "many1"]))
        if how == "add":
            ops.append(Op("add", [t]))
        else:
            groups.setdefault(int(how[-1]), []).append(t)
    ops += [Op("add_many", g) for g in groups.values()]
    whole = list(singles)
    sliced: set[str] = set()
    for j in range(draw(st.integers(0, 2))):
        size = draw(st.sampled_from(THRESHOLD_SIZES))
        if size > budget:
            size = draw(st.sampled_from(SMALL_SIZES))
        t, parts = draw(partitioned(f"{draw(NAME_HEADS)}p{j}", max(size, 16)))
        budget -= t.nbytes
        whole.append(t)
        if len(parts) > 1:
            sliced.add(t.name)
        ops += [Op("add_slice", part=p) for p in parts]
    many: list[Tensor] = []
    if draw(st.booleans()):
        many = draw(bulk(f"{draw(NAME_HEADS)}bulk"))
        ops.append(Op(draw(st.sampled_from(["add_many", "add_each"])), many))
    ops = draw(st.permutations(ops))
    regions = {}
    for t in whole:  # the group of many small tensors is read back whole
        shape = t.expected.shape
        if not shape or 0 in shape or not draw(st.booleans()):
            continue
        extents = []
        for d in shape:
            a = draw(st.integers(0, d - 1))
            b = draw(st.integers(a + 1, d))
            extents.append((a, b - a))
        regions[t.name] = _spec(extents, shape)
    whole += many
    numeric = [t.name for t in whole if t.name not in sliced and t.expected.dtype != STRING]
    # A random subset in random order (drawn from a seed: thousands of names would overrun the draws).
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    many_order = [numeric[i] for i in rng.permutation(len(numeric))[: draw(st.integers(0, len(numeric)))]]
    largest = max([t.nbytes for t in whole] + [0])
    return Case(
        ops, whole, sliced, regions, many_order, draw(tunings(largest)), draw(tunings(largest)), draw(st.booleans())
    )


# ------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def scratch() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="gpusaver-prop-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def tuned(overrides: dict[str, int]) -> Iterator[None]:
    """gpusaver's tunable sizes and thread counts set to ``overrides`` for the block."""
    if not overrides or _config is None:
        yield
        return
    with _config.set(**overrides):
        yield


def write(prefix: str, case: Case) -> None:
    with tuned(case.write_tuning):
        _write(prefix, case)


def _write(prefix: str, case: Case) -> None:
    w = BundleWriter(prefix, durable=case.durable)
    try:
        for op in case.ops:
            if op.kind == "add":
                w.add(op.tensors[0].name, op.tensors[0].value)
            elif op.kind == "add_each":
                for t in op.tensors:
                    w.add(t.name, t.value)
            elif op.kind == "add_many":
                w.add_many([t.name for t in op.tensors], [t.value for t in op.tensors])
            else:
                assert op.part is not None
                w.add_slice(op.part.name, op.part.full_shape, op.part.spec, op.part.value)
        w.finish()
    except BaseException:
        w.abort()
        raise


def native_order(arr: np.ndarray) -> np.ndarray:
    arr = c_order(arr)
    if arr.dtype != STRING and arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def assert_same(actual: Any, expected: np.ndarray, what: str) -> None:
    """Bit-exact equality: dtype, shape and bytes (strings: the same ``bytes`` items)."""
    if isinstance(actual, bytes):  # TF returns a 0-d string tensor as bytes
        scalar = np.empty((), dtype=object)
        scalar[()] = actual
        actual = scalar
    actual = native_order(np.asarray(actual))
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.dtype == STRING:
        assert actual.dtype == STRING, f"{what}: dtype {actual.dtype} is not a string tensor"
        got, want = actual.reshape(-1).tolist(), expected.reshape(-1).tolist()
        assert all(isinstance(x, bytes) for x in got), f"{what}: items are not bytes"
        assert got == want, f"{what}: string values differ"
        return
    assert (actual.dtype.name, actual.dtype.itemsize) == (expected.dtype.name, expected.dtype.itemsize), (
        f"{what}: dtype {actual.dtype} != {expected.dtype}"
    )
    if actual.tobytes() != expected.tobytes():
        a = np.frombuffer(actual.tobytes(), np.uint8)
        e = np.frombuffer(expected.tobytes(), np.uint8)
        first = int(np.flatnonzero(a != e)[0]) if a.size == e.size else -1
        raise AssertionError(f"{what}: bytes differ (first at byte {first} of {e.size})")


def failure_of(action: Callable[[], Any]) -> str | None:
    """Runs ``action``; returns what it raised, as text (None when it succeeded)."""
    try:
        action()
    except Exception as e:  # noqa: BLE001 - reported by the caller's one assertion
        return f"{type(e).__name__}: {e}"
    return None


def assert_all_read(tensors: Sequence[Tensor], read: Callable[[str], Any], what: str) -> None:
    """Every tensor reads back bit-exactly through ``read``; one assertion names all that do not.

    Which tensors a writer defect damages can depend on the order in which the
    writer threads ran; failing once, from one place, for all of them keeps
    hypothesis's replay of a failing example consistent.
    """
    bad = []
    for t in tensors:
        error = failure_of(lambda: assert_same(read(t.name), t.expected, f"{t.name!r} [{t.layout}]"))
        if error is not None:
            bad.append(error)
    assert not bad, f"{what}: {len(bad)} of {len(tensors)} tensors do not read back: " + "; ".join(bad[:4])


def assert_succeeds(action: Callable[[], Any], what: str) -> None:
    error = failure_of(action)
    assert error is None, f"{what} failed: {error}"


def assert_no_debris(directory: str) -> None:
    left = []
    for root, dirs, files in os.walk(directory):
        left += [os.path.join(root, n) for n in dirs + files if "tempstate" in n or "_temp_" in n or ".tmp" in n]
    assert not left, f"temporary files left behind: {left}"


def _expected_region(t: Tensor, spec: str) -> np.ndarray:
    region = []
    for piece, d in zip(spec.split(":"), t.expected.shape):
        if piece == "-":
            region.append(slice(0, d))
        else:
            a, n = (int(x) for x in piece.split(","))
            region.append(slice(a, a + n))
    return c_order(t.expected[tuple(region)])


def describe(case: Case) -> None:
    """Hypothesis events (``--hypothesis-show-statistics``): what the examples cover."""
    small = T["small_bytes"]
    sizes = [t.nbytes for op in case.ops for t in op.tensors] + [
        op.part.value.nbytes for op in case.ops if op.part is not None
    ]
    large = sum(n >= small for n in sizes)
    event(f"tensors of >= small_bytes: {large if large <= 3 else 'more than 3'}")
    event(f"total bytes: {'>= 8 MiB' if sum(sizes) >= 8 * MIB else '>= 1 MiB' if sum(sizes) >= MIB else '< 1 MiB'}")
    for kind in sorted({op.kind for op in case.ops}):
        event(f"calls: {kind}")
    for side, tuning in (("write", case.write_tuning), ("read", case.read_tuning)):
        kind = "thresholds shrunk" if "pack_bytes" in tuning else "threads or parallel reads" if tuning else "defaults"
        event(f"{side} tuning: {kind}")
    pending = False  # a small tensor queued by add(), then add() of a large one
    for op in case.ops:
        if op.kind in ("add", "add_each", "add_slice"):
            for n in [t.nbytes for t in op.tensors] or [op.part.value.nbytes if op.part is not None else 0]:
                if pending and n >= small:
                    event("small add() then a large add()")
                pending = pending or 0 < n < small
        else:
            pending = False


# -------------------------------------------------------------------------- tests
@settings(max_examples=60, **PROFILE)
@given(case=cases())
def test_bundle_roundtrip(case: Case) -> None:
    describe(case)
    with scratch() as d:
        prefix = os.path.join(d, "dir", "bundle")
        write(prefix, case)
        assert_no_debris(d)
        by_name = {t.name: t for t in case.whole}
        listed = dict(gpusaver.list_variables(prefix))
        assert listed == {t.name: list(t.expected.shape) for t in case.whole}
        with tuned(case.read_tuning), BundleReader(prefix) as reader:
            ckpt = gpusaver.load_checkpoint(prefix)
            assert_all_read(case.whole, ckpt.get_tensor, "gpusaver.load_checkpoint().get_tensor")
            for name, spec in case.regions.items():
                got = reader.read_slice(name, spec)
                assert_same(got, _expected_region(by_name[name], spec), f"read_slice({name!r}, {spec!r})")
            for name in case.many_order[:8]:
                out = np.full(by_name[name].expected.nbytes, 0xA5, np.uint8)
                reader.read_into(name, out)
                assert out.tobytes() == by_name[name].expected.tobytes(), f"read_into({name!r})"
            outs = [np.full(by_name[n].expected.nbytes, 0x5A, np.uint8) for n in case.many_order]
            reader.read_many_into(list(zip(case.many_order, outs)))
            for name, out in zip(case.many_order, outs):
                assert out.tobytes() == by_name[name].expected.tobytes(), f"read_many_into: {name!r}"


@pytest.mark.tf
@settings(max_examples=25, **PROFILE)
@given(case=cases())
def test_bundle_roundtrip_tf(tf: Any, case: Case) -> None:
    with scratch() as d:
        prefix = os.path.join(d, "bundle")
        write(prefix, case)
        reader = tf.train.load_checkpoint(prefix)
        assert set(reader.get_variable_to_shape_map()) == {t.name for t in case.whole}
        ckpt = gpusaver.load_checkpoint(prefix)
        tf_readable = [t for t in case.whole if not (t.name in case.sliced and t.expected.dtype in TF_NO_SLICED)]
        others = [t for t in case.whole if t.name in case.sliced and t.expected.dtype in TF_NO_SLICED]
        assert_all_read(tf_readable, reader.get_tensor, "tf.train.load_checkpoint().get_tensor")
        assert_all_read(others, ckpt.get_tensor, "gpusaver.load_checkpoint().get_tensor (sliced, not for TF)")


@dataclasses.dataclass(eq=False)
class SaverCase(_Compact):
    variables: list[Tensor]
    devices: list[int]
    sharded: bool
    sequential: bool
    subset: list[int]
    global_step: int | None
    save_tuning: dict[str, int]  # gpusaver.config overrides while saving ...
    restore_tuning: dict[str, int]  # ... and while restoring

    def __repr__(self) -> str:
        n = len(self.variables)
        shown = self.variables if n <= 12 else [*self.variables[:8], f"... {n} in all"]
        fields = {k: v for k, v in vars(self).items() if k != "variables"}
        return f"SaverCase(variables={shown!r}, {fields})"


@st.composite
def saver_cases(draw: Any) -> SaverCase:
    # Restored in place, so every array must be writable.
    variables = [t for t in draw(variable_sets()) if t.layout != "readonly"]
    if not variables:
        variables = [Tensor("only", np.arange(3.0), np.arange(3.0), "c")]
    n_dev = draw(st.integers(1, 4))
    devices = [draw(st.integers(0, n_dev - 1)) for _ in variables]
    subset = sorted(draw(st.sets(st.integers(0, len(variables) - 1), min_size=1)))
    largest = max(t.nbytes for t in variables)
    return SaverCase(
        variables,
        devices,
        draw(st.booleans()),
        draw(st.booleans()),
        subset,
        draw(st.one_of(st.none(), st.integers(0, 10**6))),
        draw(tunings(largest)),
        draw(tunings(largest)),
    )


def _scramble(arr: np.ndarray) -> None:
    """Overwrites an array in place with other values (a restore must undo it)."""
    if arr.size == 0:
        return
    if arr.dtype == STRING:
        arr[...] = b"scrambled"
    elif arr.dtype == np.bool_:
        arr[...] = ~arr
    else:
        native = c_order(arr).astype(arr.dtype.newbyteorder("="))
        arr[...] = np.invert(native.reshape(-1).view(np.uint8)).view(native.dtype).reshape(arr.shape)


def _saver(case: SaverCase, which: Sequence[int]) -> gpusaver.Saver:
    return gpusaver.Saver(
        [
            gpusaver.Variable(case.variables[i].value, name=case.variables[i].name, device=f"/cpu:{case.devices[i]}")
            for i in which
        ],
        sharded=case.sharded,
        restore_sequentially=case.sequential,
        max_to_keep=None,
    )


def _save(case: SaverCase, d: str) -> tuple[gpusaver.Saver, str]:
    """A Saver over every variable, and the prefix it saved them to."""
    saver = _saver(case, range(len(case.variables)))
    with tuned(case.save_tuning):
        path = saver.save(os.path.join(d, "model"), global_step=case.global_step)
    assert path == os.path.join(d, "model") + ("" if case.global_step is None else f"-{case.global_step}")
    assert_no_debris(d)
    return saver, path


@settings(max_examples=30, **PROFILE)
@given(case=saver_cases())
def test_saver_roundtrip(case: SaverCase) -> None:
    with scratch() as d:
        saver, path = _save(case, d)
        ckpt = gpusaver.load_checkpoint(path)
        assert_all_read(case.variables, ckpt.get_tensor, "gpusaver.load_checkpoint().get_tensor")
        arrays = saver.variables
        for t in case.variables:
            _scramble(t.value)
        with tuned(case.restore_tuning):
            assert_succeeds(lambda: saver.restore(path), f"restore({path!r})")
        for t in case.variables:
            assert arrays[t.name] is t.value
            assert_same(t.value, t.expected, f"restored {t.name!r} [{t.layout}]")
        # A Saver over some of the variables restores those alone (reads with gaps between them).
        for t in case.variables:
            _scramble(t.value)
        with tuned(case.restore_tuning):
            assert_succeeds(lambda: _saver(case, case.subset).restore(path), f"restore({path!r}) by a subset Saver")
        for i, t in enumerate(case.variables):
            if i in case.subset:
                assert_same(t.value, t.expected, f"restored {t.name!r} by a subset Saver [{t.layout}]")


@pytest.mark.tf
@settings(max_examples=12, **PROFILE)
@given(case=saver_cases())
def test_saver_roundtrip_tf(tf: Any, case: SaverCase) -> None:
    with scratch() as d:
        _, path = _save(case, d)
        reader = tf.train.load_checkpoint(path)
        assert_all_read(case.variables, reader.get_tensor, "tf.train.load_checkpoint().get_tensor")
