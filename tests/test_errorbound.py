"""The running error bound is a bound: the exact value always lies within it."""

import operator

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnet import BOUND, BoundArray

CTX = mpmath.MPContext()
CTX.prec = 300

moderate = st.floats(-30, 30, allow_nan=False)
rel_err = st.floats(0, 1e-10)
position = st.floats(-1, 1)      # where the exact input lies within its error interval

EXACT = {
    "exp": CTX.exp, "expm1": CTX.expm1, "log": CTX.log, "log1p": CTX.log1p, "tanh": CTX.tanh,
    "erf": CTX.erf, "erfc": CTX.erfc, "sqrt": CTX.sqrt,
}


def _exact_input(x, e, t):
    return CTX.mpf(x) + CTX.mpf(t) * CTX.mpf(e)


@pytest.mark.parametrize("name", sorted(EXACT))
@given(x=moderate, rel=rel_err, t=position)
def test_elementwise_bound_contains_the_exact_value_of_an_uncertain_input(name, x, rel, t):
    """For x known to ±e, f(x̂) computed in float64 is within its bound of f(x) for every x in
    the interval (the derivative is bounded on the whole interval, not just at x̂)."""
    if name in ("log", "sqrt"):
        x = abs(x) + 1e-3
    if name == "log1p":
        x = abs(x) - 0.5
    e = abs(x) * rel
    a = BoundArray(np.array([x]), np.array([e]))
    out = getattr(BOUND, name)(a)
    exact = EXACT[name](_exact_input(x, e, t))
    assert abs(CTX.mpf(out.v[0]) - exact) <= CTX.mpf(out.e[0]), (name, x, e, t)


@given(a=moderate, b=moderate, ea=rel_err, eb=rel_err, ta=position, tb=position,
       op=st.sampled_from(["+", "-", "*", "/"]))
def test_arithmetic_bound_contains_the_exact_value(a, b, ea, eb, ta, tb, op):
    """+ − × ÷ of uncertain operands: the exact result of any inputs in the intervals is inside."""
    if op == "/" and abs(b) < 1e-3:
        b = 1.0
    ea, eb = abs(a) * ea, abs(b) * eb
    A, B = BoundArray(np.array([a]), np.array([ea])), BoundArray(np.array([b]), np.array([eb]))
    f = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}[op]
    out = f(A, B)
    exact = f(_exact_input(a, ea, ta), _exact_input(b, eb, tb))
    assert abs(CTX.mpf(out.v[0]) - exact) <= CTX.mpf(out.e[0])


@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_matmul_and_sum_bounds_contain_the_exact_value(n, seed):
    """Dot products with cancellation (mixed signs, many binades) stay within γ_n·|A||B|."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((3, n)) * 10.0 ** rng.integers(-8, 8, (3, n))
    b = rng.standard_normal((n, 2))
    out = BOUND.matmul(BoundArray(a), BoundArray(b))
    total = BOUND.sum(BoundArray(a), axis=1)
    for i in range(3):
        row = [CTX.mpf(v) for v in a[i]]
        assert abs(CTX.mpf(total.v[i]) - CTX.fsum(row)) <= CTX.mpf(total.e[i])
        for j in range(2):
            exact = CTX.fsum(CTX.mpf(a[i, p]) * CTX.mpf(b[p, j]) for p in range(n))
            assert abs(CTX.mpf(out.v[i, j]) - exact) <= CTX.mpf(out.e[i, j])


def test_constants_carry_their_representation_error():
    """1/√2 is not a float: its float64 value is held with its exact representation error."""
    c = BOUND.const(lambda ctx: 1 / ctx.sqrt(2))
    exact = 1 / CTX.sqrt(2)
    err = abs(CTX.mpf(float(c.v)) - exact)
    assert 0 < err <= CTX.mpf(float(c.e))
    assert float(c.e) <= 2.0**-53


def test_probabilistic_scale_tracks_cancellation_not_worst_case():
    """σ of a random-sign dot product grows like √n, the rigorous bound like n."""
    rng = np.random.default_rng(0)
    n = 10_000
    a = BoundArray(rng.standard_normal((1, n)), np.full((1, n), 1e-16))
    out = BOUND.matmul(a, BoundArray(np.ones((n, 1))))
    assert out.e[0, 0] > 30 * out.sigma[0, 0]
