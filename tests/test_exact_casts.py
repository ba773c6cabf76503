"""``cast=True`` is exact or refused: a value never wraps, saturates or turns into another.

Python int leaves take any stored integer exactly (2**63 + 5 stays 2**63 + 5) and a float only
when it is finite and integral; NaN, inf and out-of-range values are a DTypeMismatchError naming
the variable, the value and the target's range, raised before any leaf or array changes. The same
rule holds for arrays restored by a Saver with ``cast=True`` (floats may still round to a narrower
float). The hint "cast=True converts it" appears only where a cast can succeed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gpusaver as gs
from gpusaver.errors import DTypeMismatchError
from gpusaver.variables import checked_cast


def test_python_int_leaf_takes_any_stored_integer_exactly(tmp_path) -> None:
    gs.save({"x": 2**63 + 5, "y": -(2**63), "z": np.uint8(200)}, str(tmp_path / "c"))
    got = gs.load(str(tmp_path / "c"), like={"x": 0, "y": 0, "z": 0})
    assert got == {"x": 2**63 + 5, "y": -(2**63), "z": 200}
    assert all(type(v) is int for v in got.values())
    assert gs.load(str(tmp_path / "c"), like={"x": 0, "y": 0, "z": 0}, cast=True) == got


@pytest.mark.parametrize("value,text", [(float("nan"), "nan"), (float("inf"), "inf"), (2.5, "2.5")])
def test_python_int_leaf_refuses_what_is_not_an_integer(tmp_path, value, text) -> None:
    gs.save({"f": value, "g": 1.0}, str(tmp_path / "c"))
    with pytest.raises(DTypeMismatchError, match=rf"'f'.*{text}.*Python int"):
        gs.load(str(tmp_path / "c"), like={"f": 0, "g": 0}, cast=True)
    assert gs.load(str(tmp_path / "c"), like={"f": 0.0, "g": 0}, cast=True)["g"] == 1  # integral floats convert


def test_python_int_leaf_takes_a_huge_integral_float_exactly(tmp_path) -> None:
    gs.save({"f": 1e300}, str(tmp_path / "c"))
    assert gs.load(str(tmp_path / "c"), like={"f": 0}, cast=True)["f"] == int(1e300)


def test_python_float_leaf(tmp_path) -> None:
    gs.save({"a": np.float32(1.5), "b": 2**53 + 1, "c": 7}, str(tmp_path / "c"))
    got = gs.load(str(tmp_path / "c"), like={"a": 0.0, "c": 0.0}, strict=False, cast=True)
    assert got == {"a": 1.5, "c": 7.0} and type(got["c"]) is float
    with pytest.raises(DTypeMismatchError, match="9007199254740993"):
        gs.load(str(tmp_path / "c"), like={"b": 0.0}, strict=False, cast=True)


def test_numpy_scalar_and_array_targets_never_wrap(tmp_path) -> None:
    gs.save({"big": np.int64(300), "neg": np.int64(-1), "nan": np.float64("nan")}, str(tmp_path / "c"))
    with pytest.raises(DTypeMismatchError, match=r"'big'.*300.*integers from -128 to 127"):
        gs.load(str(tmp_path / "c"), like={"big": np.int8(0)}, strict=False, cast=True)
    with pytest.raises(DTypeMismatchError, match=r"'neg'.*-1.*from 0 to 255"):
        gs.load(str(tmp_path / "c"), like={"neg": np.zeros((), np.uint8)}, strict=False, cast=True)
    target = np.zeros((), np.int32)
    with pytest.raises(DTypeMismatchError, match=r"'nan'.*nan"):
        gs.Saver({"nan": target}).restore(str(tmp_path / "c"), strict=False, cast=True)
    assert target == 0


def test_a_refused_cast_changes_nothing(tmp_path) -> None:
    gs.save({"ok": np.arange(4, dtype=np.float64), "bad": np.array([1.0, 2**40])}, str(tmp_path / "c"))
    ok, bad = np.zeros(4, np.int16), np.zeros(2, np.int16)
    with pytest.raises(DTypeMismatchError, match="'bad'"):
        gs.load(str(tmp_path / "c"), like={"ok": ok, "bad": bad}, cast=True)
    assert (ok == 0).all() and (bad == 0).all()
    gs.load(str(tmp_path / "c"), like={"ok": ok}, strict=False, cast=True)
    assert (ok == np.arange(4)).all()


def test_float_narrowing_rounds_but_never_overflows(tmp_path) -> None:
    gs.save({"x": np.array([1 / 3, 1e39, np.inf, np.nan])}, str(tmp_path / "c"))
    with pytest.raises(DTypeMismatchError, match=r"1e\+39.*largest finite float32"):
        gs.load(str(tmp_path / "c"), like={"x": np.zeros(4, np.float32)}, cast=True)
    gs.save({"x": np.array([1 / 3, -np.inf, np.nan])}, str(tmp_path / "d"))
    got = gs.load(str(tmp_path / "d"), like={"x": np.zeros(3, np.float32)}, cast=True)["x"]
    assert got[0] == np.float32(1 / 3) and got[1] == -np.inf and np.isnan(got[2])


def test_hint_only_where_a_cast_can_succeed(tmp_path) -> None:
    gs.save({"s": "text", "n": np.int64(3)}, str(tmp_path / "c"))
    with pytest.raises(DTypeMismatchError) as e:
        gs.load(str(tmp_path / "c"), like={"s": np.int64(0)}, strict=False)
    assert "cast=True" not in str(e.value) and "strings and numbers do not convert" in str(e.value)
    with pytest.raises(DTypeMismatchError, match="strings and numbers do not convert"):
        gs.load(str(tmp_path / "c"), like={"s": np.int64(0)}, strict=False, cast=True)
    with pytest.raises(DTypeMismatchError, match="cast=True converts it where every value fits"):
        gs.load(str(tmp_path / "c"), like={"n": np.int8(0)}, strict=False)


# the bounds of every integer type, as integers and as the floats nearest them
_EDGES = [e for b in (7, 8, 15, 16, 31, 32, 53, 63, 64) for k in (2**b - 1, 2**b, 2**b + 1, -(2**b), -(2**b) - 1)
          for e in (k, float(k))]

_NUMERIC = [np.bool_, np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64,
            np.float16, np.float32, np.float64, np.complex64]


@settings(max_examples=300, deadline=None)
@given(src=st.sampled_from(_NUMERIC), dst=st.sampled_from(_NUMERIC),
       values=st.lists(st.one_of(st.integers(-(2**64), 2**64), st.floats(allow_nan=True, allow_infinity=True),
                                 st.sampled_from(_EDGES)), min_size=1, max_size=6))
def test_checked_cast_is_exact_or_refused(src, dst, values) -> None:
    """Against Python's exact arithmetic: a cast that returns gives back each value (or its rounding
    to a narrower float); one that refuses names a value that does not fit."""
    with np.errstate(all="ignore"):
        try:
            arr = np.array(values, dtype=object).astype(src)
        except (OverflowError, ValueError, TypeError):
            return
    try:
        out = checked_cast(arr, np.dtype(dst), "v")
    except DTypeMismatchError as e:
        assert "'v'" in str(e)
        return
    for a, b in zip(arr.tolist(), out.tolist()):
        a, b = complex(a), complex(b)
        if np.dtype(dst).kind in "fc" and np.dtype(src).kind in "fc":
            if np.isnan(a.real) or np.isnan(a.imag):
                continue
            assert np.isfinite(abs(b)) == np.isfinite(abs(a))
            assert abs(b - a) <= abs(a) * 1e-2 + 1e-4 or a == b  # rounding of precision only
        elif np.dtype(src).kind in "fc":  # a float into an integer: the same number, exactly
            assert int(a.real) == int(b.real) and a.imag == 0, (src, dst, a, b)
        else:
            assert a == b, (src, dst, a, b)


@pytest.mark.parametrize("value,dtype", [
    (2.0**63, np.int64), (2.0**64, np.uint64), (np.float32(2**63), np.int64), (-(2**31), np.float16),
    (-(2**63), np.float16), (np.inf, "float8_e4m3fn"), (-np.inf, "float8_e4m3fn"), (2.0**31, np.int32),
])
def test_the_edges_that_once_wrapped_are_refused(value, dtype) -> None:
    """float64 2**63 into int64 became INT64_MIN (2**63 - 1 rounds to 2**63 as a float bound); an int32
    INT_MIN into float16 became -inf (inf casts back to INT_MIN); inf into float8_e4m3fn became NaN."""
    import ml_dtypes

    target = np.dtype(getattr(ml_dtypes, dtype)) if isinstance(dtype, str) else np.dtype(dtype)
    src = np.array([value], dtype=np.int32 if value == -(2**31) else None)
    with pytest.raises(DTypeMismatchError, match="'v'"):
        checked_cast(src, target, "v")


def test_the_largest_exact_values_still_convert() -> None:
    assert checked_cast(np.array([-(2.0**63)]), np.dtype(np.int64), "v")[0] == -(2**63)
    assert checked_cast(np.array([2.0**64 - 2048]), np.dtype(np.uint64), "v")[0] == 2**64 - 2048
    assert checked_cast(np.array([2.0**62]), np.dtype(np.int64), "v")[0] == 2**62
    assert np.isinf(checked_cast(np.array([np.inf]), np.dtype(np.float16), "v")[0])


def test_regions_of_partitioned_variables_cast_exactly_or_refuse(tmp_path) -> None:
    """A region restored with cast=True went through a bare astype ([1.5, nan, 2**40] into int32 gave
    [1, INT_MIN, INT_MIN]); it is read, checked and converted before anything changes."""
    prefix = gs.Saver([gs.Variable(np.array([1.5, np.nan, 2.0**40, -1.0]), "w", full_shape=[8], offset=[0]),
                       gs.Variable(np.array([1.0, 2.0, 3.0, 4.0]), "w", full_shape=[8], offset=[4])]).save(
        str(tmp_path / "c"))
    plain_before = np.zeros(2, np.float64)
    region = np.zeros(4, np.int32)
    with pytest.raises(DTypeMismatchError, match="'w'"):
        gs.Saver([gs.Variable(plain_before, "other"), gs.Variable(region, "w", full_shape=[8], offset=[0])]).restore(
            prefix, strict=False, cast=True)
    assert (region == 0).all()
    fine = np.zeros(4, np.int16)
    gs.Saver([gs.Variable(fine, "w", full_shape=[8], offset=[4])]).restore(prefix, cast=True)
    assert fine.tolist() == [1, 2, 3, 4]
