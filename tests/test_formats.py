"""Rounding to fp16 / bf16 / fp8: bit-exact, once, ties to even, subnormals kept."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnet.numerics.formats import FORMATS, get_format, round_to

try:
    import ml_dtypes
except ImportError:            # the optional extra: comparisons with it are skipped
    ml_dtypes = None


def all_fp16_values():
    return np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float64)


def all_bf16_values():
    bits = np.arange(2**16, dtype=np.uint32) << 16
    with np.errstate(invalid="ignore"):            # signalling-NaN patterns warn on the cast
        return bits.view(np.float32).astype(np.float64)


@pytest.mark.parametrize("fmt, values", [("fp16", all_fp16_values), ("bf16", all_bf16_values)])
def test_all_65536_bit_patterns_round_trip(fmt, values):
    """Every fp16 / bf16 value (±0, subnormals, ±max, ±inf, NaNs) rounds to itself."""
    v = values()
    r = round_to(v, fmt)
    nan = np.isnan(v)
    assert np.array_equal(np.isnan(r), nan)
    assert np.array_equal(r[~nan], v[~nan])
    assert np.array_equal(np.signbit(r[~nan]), np.signbit(v[~nan]))       # −0 stays −0


EDGES = [0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, -65520.0, 2.0**-24, 2.0**-25,
         3 * 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11,
         1e-8, 6e-8, 1e300, -1e-300, 5e-324]


def ties_and_neighbours(fmt_name):
    """Values rich in ties (midpoints between neighbours), their float64 neighbours, and edges."""
    fmt = get_format(fmt_name)
    draw_exp = st.integers(fmt.emin - fmt.precision - 1, int(np.log2(fmt.max)) + 1)
    mantissa = st.integers(0, 2 ** (fmt.precision + 1))
    tie = st.builds(lambda e, m, s: s * (m + 0.5) * 2.0 ** (e - fmt.precision), draw_exp,
                    mantissa, st.sampled_from([-1.0, 1.0]))
    nudged = st.builds(lambda t, d: np.nextafter(t, d * np.inf), tie, st.sampled_from([-1, 1]))
    return st.one_of(tie, nudged, st.sampled_from(EDGES),
                     st.floats(allow_nan=False, width=64))


@given(ties_and_neighbours("fp16"))
def test_fp16_rounding_equals_numpy_single_rounding_from_float64(x):
    """numpy's float64 → float16 cast rounds once, to nearest even, keeping subnormals."""
    got = round_to(np.array([x]), "fp16")[0]
    with np.errstate(over="ignore"):
        ref = float(np.float64(x).astype(np.float16))
    assert got == ref or (np.isnan(got) and np.isnan(ref))
    assert np.signbit(got) == np.signbit(ref)


def exact_round(x: float, fmt) -> float:
    """Reference by exact rational arithmetic: the nearest grid point, ties to the even one."""
    from fractions import Fraction
    if x == 0:
        return x
    if np.isinf(x):
        return x if fmt.has_inf else float("nan")
    fx = Fraction(x)
    e = max(abs(fx).numerator.bit_length() - abs(fx).denominator.bit_length(), fmt.emin - 1)
    while Fraction(2) ** (e + 1) <= abs(fx):
        e += 1
    while e > fmt.emin and Fraction(2) ** e > abs(fx):
        e -= 1
    e = max(e, fmt.emin)
    q = Fraction(2) ** (e - fmt.precision + 1)
    n, rem = divmod(abs(fx), q)
    if rem * 2 > q or (rem * 2 == q and n % 2 == 1):
        n += 1
    if n * q > Fraction(fmt.max):
        return float(np.copysign(np.inf, x)) if fmt.has_inf else float("nan")
    return float(n * q) * (1 if x > 0 else -1)


@pytest.mark.parametrize("name", sorted(FORMATS))
@given(data=st.data())
def test_rounding_equals_exact_rational_rounding(name, data):
    """Against a reference in exact rational arithmetic (fractions), for every format."""
    x = data.draw(ties_and_neighbours(name))
    fmt = get_format(name)
    got = round_to(np.array([x]), fmt)[0]
    ref = exact_round(x, fmt)
    assert got == ref or (np.isnan(got) and np.isnan(ref)), (x, got, ref)


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes not installed")
@pytest.mark.parametrize("name, dtype", [("bf16", "bfloat16"), ("fp8_e5m2", "float8_e5m2"),
                                         ("fp8_e4m3fn", "float8_e4m3fn")])
@given(data=st.data())
def test_rounding_agrees_with_ml_dtypes_from_float32(name, dtype, data):
    """From float32 inputs (where ml_dtypes rounds once) refnet and ml_dtypes agree exactly."""
    x = np.float32(data.draw(st.floats(allow_nan=False, width=32)))
    ref = float(np.array([x]).astype(getattr(ml_dtypes, dtype))[0])
    got = round_to(np.array([x], dtype=np.float64), name)[0]
    assert got == ref or (np.isnan(got) and np.isnan(ref)), (x, got, ref)


def test_overflow_edges():
    assert round_to([65519.99, 65520.0, -65520.0], "fp16").tolist() == [65504.0, np.inf, -np.inf]
    r = round_to([464.0, 465.0, np.inf], "fp8_e4m3fn")
    assert r[0] == 448.0 and np.isnan(r[1]) and np.isnan(r[2])
    assert round_to([2.0**-25, 3 * 2.0**-26], "fp16").tolist() == [0.0, 2.0**-24]


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="unknown format 'fp4'"):
        round_to([1.0], "fp4")
