"""Building a Saver over a dict of NumPy arrays takes a bulk path (variables._resolve_host_arrays);
it must resolve exactly what the one-variable-at-a-time path resolves, and refuse exactly what it
refuses, with the same error. Speed is measured by benchmarks/checks_bench.py, not asserted here."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pytest

from gpusaver import Saver, Variable, native, variables
from gpusaver.devices import CPU0, parse_device
from gpusaver.pipeline import group_by_device


def _general(var_list: Mapping[str, Any]) -> list[variables.ResolvedVariable]:
    """resolve_var_list with the bulk path turned off."""
    saved = variables._resolve_host_arrays
    variables._resolve_host_arrays = lambda _: None  # type: ignore[assignment]
    try:
        return variables.resolve_var_list(var_list)
    finally:
        variables._resolve_host_arrays = saved


def _array(v: Any) -> Any:
    """The array by identity where it is the caller's own, else (a scalar's new 0-d array) by value."""
    if v.array is v.source:
        return id(v.array)
    return v.array.dtype.str, v.array.shape, v.array.tobytes()


def _outcome(resolve: Callable[[Any], Any], var_list: Any) -> Any:
    try:
        return [(v.name, _array(v), v.device, v.backend, id(v.source), v.immutable, v.logical_dtype) for v in resolve(var_list)]
    except Exception as e:  # noqa: BLE001 - compared below
        return type(e), str(e)


@pytest.fixture(params=[True, False], ids=["native", "python"])
def native_on(request: pytest.FixtureRequest) -> Iterator[bool]:
    was_on = native.lib is not None
    native.use(request.param)
    try:
        yield request.param
    finally:
        native.use(was_on)


def _many(n: int = 300) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {f"v{i:04d}": rng.random((i % 4 + 1, 3)).astype([np.float32, np.float64, np.int8][i % 3]) for i in range(n)}


class _Mapping(Mapping[str, Any]):
    def __init__(self, items: list[tuple[Any, Any]]) -> None:
        self._items = items

    def __getitem__(self, key: Any) -> Any:
        return dict(self._items)[key]

    def __iter__(self) -> Iterator[Any]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)


def _cases() -> dict[str, Callable[[], Any]]:
    def with_item(key: Any, value: Any) -> Callable[[], Any]:
        def make() -> Any:
            d = _many()
            d[key] = value
            return d

        return make

    buf = np.arange(1000, dtype=np.float32)
    shared = np.zeros(10, np.float32)
    strings = np.array([b"a", b"b"], dtype=object)
    return {
        "plain": _many,
        "an empty name": with_item("", np.zeros(2)),
        "a name that is not a str": with_item(7, np.zeros(2)),
        "a name UTF-8 cannot hold": with_item("bad\udc80", np.zeros(2)),
        "the same array twice": lambda: {**_many(), "x": shared, "y": shared},
        "an empty array twice": lambda: (lambda e: {**_many(), "x": e, "y": e})(np.zeros((0, 3))),
        "an unsupported dtype": with_item("t", np.zeros(3, "M8[s]")),
        "a fixed-width string array": with_item("s", np.array(["ab", "c"])),
        "strings": with_item("s", strings),
        "an object array of ints": with_item("s", np.array([1, 2], dtype=object)),
        "a byte-swapped array": with_item("b", np.zeros(3, ">f4")),
        "a memmap-like subclass": with_item("m", np.zeros(3).view(np.matrix)),
        "a scalar": with_item("k", 3.5),
        "a Variable": with_item("w", Variable(np.zeros(2), "w", device="/cpu:1")),
        "disjoint views": lambda: {f"v{i}": buf[10 * i : 10 * i + 10] for i in range(100)},
        "views given in reverse": lambda: {f"v{i}": buf[10 * i : 10 * i + 10] for i in reversed(range(100))},
        "interleaved views": lambda: {"even": buf[::2], "odd": buf[1::2], **{f"v{i}": np.ones(2) for i in range(50)}},
        "overlapping views": lambda: {**{f"v{i}": buf[10 * i : 10 * i + 10] for i in range(50)}, "z": buf[5:15]},
        "a reversed view over another": lambda: {"a": buf[100:200], "b": buf[150:50:-1], "c": np.ones(3)},
        "a view inside its base": lambda: {"base": buf, "inner": buf[3:7]},
        "a mapping that is not a dict": lambda: _Mapping([(f"k{i}", np.ones(2)) for i in range(20)]),
        "a mapping with a name twice": lambda: _Mapping([("k", np.ones(2)), ("k", np.zeros(2))]),
        "nothing": dict,
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_bulk_resolution_is_the_general_one(case: str, native_on: bool) -> None:
    var_list = _cases()[case]()
    assert _outcome(variables.resolve_var_list, var_list) == _outcome(_general, var_list)


def test_bulk_resolution_is_taken_for_plain_arrays_only() -> None:
    d = _many(50)
    out = variables._resolve_host_arrays(d)
    assert out is not None and [v.name for v in out] == list(d)
    assert all(v.device is CPU0 and v.array is d[v.name] and v.source is d[v.name] for v in out)
    d["w"] = Variable(np.zeros(2), "w")
    assert variables._resolve_host_arrays(d) is None


def test_byte_bounds_are_the_python_ones() -> None:
    if not native.available():
        pytest.skip(native.reason)
    import gpusaver._native as C

    buf = np.arange(240, dtype=np.float64).reshape(6, 5, 8)
    arrays = [buf, buf[::2], buf[:, ::-1], buf[..., 3], buf.T, buf[2:2], np.ones((), np.float32), buf[::-2, 1:, ::3]]
    lo, hi = C.byte_bounds(arrays)
    for a, low, high in zip(arrays, lo.tolist(), hi.tolist()):
        bounds = variables._byte_bounds(a)
        assert (low, high) == ((0, 0) if bounds is None else bounds[1:])
    with pytest.raises(TypeError):
        C.byte_bounds([buf, [1, 2]])


def test_group_by_device_keeps_the_sorted_groups() -> None:
    arrays = {f"v{i}": np.full(2, i) for i in range(40)}
    listed = [Variable(a, n, device=f"/cpu:{i % 3}") for i, (n, a) in enumerate(arrays.items())]
    listed.append(Variable(np.ones(1), "last", device=parse_device("/job:localhost/replica:0/task:0/device:CPU:1")))
    groups = group_by_device(variables.resolve_var_list(listed))
    assert [g.device.short for g in groups] == ["/cpu:0", "/cpu:1", "/cpu:2"]
    assert [[v.name for v in g.variables] for g in groups] == [
        [v.name for v in listed if v.device.index == k] for k in range(3)
    ]
    one = group_by_device(variables.resolve_var_list(arrays))
    assert len(one) == 1 and one[0].device == CPU0 and [v.name for v in one[0].variables] == list(arrays)


def test_a_saver_of_many_arrays_round_trips(tmp_path: Any) -> None:
    arrays = _many(2000)
    prefix = Saver(arrays, durable=False).save(str(tmp_path / "ckpt"))
    dest = {k: np.zeros_like(v) for k, v in arrays.items()}
    Saver(dest).restore(prefix)
    assert all(np.array_equal(dest[k], arrays[k]) for k in arrays)
