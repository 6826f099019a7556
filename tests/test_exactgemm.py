"""The mp backend's error-free GEMM on BLAS (refnet.numerics.exactgemm, the Ozaki scheme).

Its error bound is zero: the exact product, rounded once. The judge is the big-integer
reference path (``MPBackend._matmul_reference``, one exponent per array, a Python-int GEMM),
which computes the same exact integer another way: the two must agree bit for bit. mpmath's
``fdot`` at a precision far above every exponent span is an independent witness."""

from pathlib import Path

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnet import Model, MPBackend
from refnet.numerics import exactgemm

EXAMPLES = Path(__file__).resolve().parent.parent / "spec" / "examples"


def same_bits(x, y):
    """Equal shapes and every element the same mpf tuple (sign, man, exp, bc)."""
    x, y = np.asarray(x, dtype=object), np.asarray(y, dtype=object)
    return x.shape == y.shape and all(p._mpf_ == q._mpf_ for p, q in zip(x.flat, y.flat))


def operand(mp, rng, shape, spread, scale, kind, zeros):
    """Mixed-sign values over 2·spread binades around 2^scale. ``float``: float64 inputs (53-bit
    mantissas); ``mp``: results of an earlier mp operation (x/3: a full working-precision
    mantissa); ``mixed``: both. A fraction ``zeros`` of exact zeros."""
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread + 1, shape)
    x[rng.random(shape) < zeros] = 0.0
    a = mp.asarray(x) * mp.ctx.mpf(2) ** scale          # exact: a power of two
    if kind == "mp":
        a = a / 3
    elif kind == "mixed":
        a = np.where(rng.random(shape) < 0.5, a / 3, a)
    return np.asarray(a, dtype=object)


kinds = st.sampled_from(["float", "mp", "mixed"])


@given(st.integers(1, 5), st.sampled_from([1, 2, 3, 17, 256, 2048]), st.integers(1, 5),
       st.sampled_from([30, 50, 80, 200]), kinds, kinds, st.integers(0, 60),
       st.integers(-1200, 1200), st.floats(0, 0.5), st.integers(0, 2**32 - 1))
def test_ozaki_matmul_is_bit_for_bit_the_bigint_reference(m, k, n, dps, kind_a, kind_b, spread,
                                                          scale, zeros, seed):
    """Random shapes (k = 1 to 2048), precisions (30-200 digits), magnitudes (2^±1200, spreads
    up to 2^±60 within an operand), mixed signs, zeros, float64-born and ~full-precision mp
    values: the error-free GEMM and the big-integer GEMM give the same rounded result."""
    rng = np.random.default_rng(seed)
    mp = MPBackend(dps)
    a = operand(mp, rng, (m, k), spread, scale, kind_a, zeros)
    b = operand(mp, rng, (k, n), spread, -scale // 2, kind_b, zeros)
    fast = mp._matmul_ozaki(a, b)
    assert fast is not None, "the fast path must apply here"
    assert same_bits(fast, mp._matmul_reference(a, b))


@given(st.sampled_from([(3, 2, 4, 5), (2, 1, 3)]), st.integers(1, 4), kinds,
       st.integers(0, 2**32 - 1))
def test_ozaki_batched_and_vector_matmul_follow_numpy_and_match_the_reference(shape, n, kind,
                                                                              seed):
    """Leading axes broadcast as in numpy's matmul (conv's (G, O, CK) @ (N, G, CK, L)); a vector
    operand is a row (left) or a column (right) with that axis removed."""
    rng = np.random.default_rng(seed)
    mp = MPBackend(50)
    a = operand(mp, rng, shape, 20, 0, kind, 0.1)
    b = operand(mp, rng, shape[1:-2] + (shape[-1], n), 20, 0, "mp", 0.1)
    assert same_bits(mp._matmul_ozaki(a, b), mp._matmul_reference(a, b))
    v = operand(mp, rng, (shape[-1],), 20, 0, kind, 0.0)
    assert same_bits(mp._matmul_ozaki(a, v), mp._matmul_reference(a, v))
    w = operand(mp, rng, (shape[-2],), 20, 0, kind, 0.0)
    assert same_bits(mp._matmul_ozaki(w, a), mp._matmul_reference(w, a))


@given(st.sampled_from([(7,), (4, 33), (3, 2, 5), (2, 3, 4, 5)]), st.data(), kinds,
       st.sampled_from([30, 50, 200]), st.integers(0, 2**32 - 1))
def test_ozaki_sum_is_bit_for_bit_the_bigint_reference(shape, data, kind, dps, seed):
    """Exact sums over any axes (None, one, several; keepdims or not), rounded once: the float64
    slice sums and the Python-int sum agree bit for bit."""
    rng = np.random.default_rng(seed)
    mp = MPBackend(dps)
    a = operand(mp, rng, shape, 40, 0, kind, 0.2)
    axis = data.draw(st.one_of(
        st.none(), st.integers(-len(shape), len(shape) - 1),
        st.sets(st.integers(0, len(shape) - 1), min_size=1).map(tuple)))
    keepdims = data.draw(st.booleans())
    fast = mp._sum_ozaki(a, axis, keepdims)
    assert fast is not None, "the fast path must apply here"
    assert same_bits(fast, mp._sum_reference(a, axis=axis, keepdims=keepdims))


def test_ozaki_matmul_is_the_fdot_of_a_far_higher_precision_rounded_once():
    """An independent witness: mpmath's fdot at 12 000 bits (above every span here, so exact)
    rounded once to 50 digits is what the error-free GEMM returns, element by element."""
    rng = np.random.default_rng(7)
    mp = MPBackend(50)
    a = operand(mp, rng, (4, 300), 50, 900, "mixed", 0.1)
    b = operand(mp, rng, (300, 3), 50, -2000, "mp", 0.1)
    got = mp._matmul_ozaki(a, b)
    wide = mpmath.MPContext()
    wide.prec = 12000
    for i in range(4):
        for j in range(3):
            exact = wide.fdot([wide.mpf(x) for x in a[i]], [wide.mpf(y) for y in b[:, j]])
            assert got[i, j] == mp.ctx.mpf(exact), (i, j)


def test_dropping_the_last_slice_pair_is_caught_by_the_equality_with_the_reference(monkeypatch):
    """The judge can fail: an engine that forgets the highest slice pair (the planted bug of an
    off-by-one loop bound) disagrees with the big-integer reference."""
    rng = np.random.default_rng(3)
    mp = MPBackend(50)
    a = operand(mp, rng, (6, 40), 10, 0, "mp", 0.0)
    b = operand(mp, rng, (40, 5), 10, 0, "mp", 0.0)
    assert same_bits(mp._matmul_ozaki(a, b), mp._matmul_reference(a, b))
    real = exactgemm.slice_pairs
    monkeypatch.setattr(exactgemm, "slice_pairs", lambda sa, sb: real(sa, sb)[:-1])
    assert not same_bits(mp._matmul_ozaki(a, b), mp._matmul_reference(a, b))


def _all_high_slices(mp, rng, rows, cols, width, slices):
    """Integers whose every ``width``-bit slice lies in [2^width − 2^(width − 4), 2^width), the
    lowest one odd (so each group's exponent is 0 and slices align to the bits written)."""
    top, low = 2 ** width, 2 ** width - 2 ** (width - 4)
    vals = np.empty((rows, cols), dtype=object)
    for i in range(rows):
        for j in range(cols):
            chunks = [int(c) for c in rng.integers(low, top, slices)]
            chunks[0] |= 1
            vals[i, j] = mp.ctx.mpf(sum(c << (width * t) for t, c in enumerate(chunks)))
    return vals


def test_slices_at_the_width_bound_are_exact_and_one_bit_wider_are_not(monkeypatch):
    """The slice width is the whole error analysis: k = 1000 needs w_A + w_B ≤ 53 − ⌈log2 k⌉
    = 43, so w = 21. Operands whose every slice is near its maximum make the slice dot products
    as large as the bound allows: at w = 21 (sums below 2^52) the engine is exact; at w = 22
    (sums near 2^53.8, one bit per slice above the bound) float64 rounds partial sums and the
    result differs from the exact one."""
    rng = np.random.default_rng(11)
    mp = MPBackend(50)
    k = 1000
    assert exactgemm.contraction_bits(k) == 43
    for width, exact in ((21, True), (22, False)):
        a = _all_high_slices(mp, rng, 3, k, width, 3)
        b = _all_high_slices(mp, rng, k, 3, width, 3)
        if not exact:
            monkeypatch.setattr(exactgemm, "contraction_bits", lambda k: 53 - 10 + 2)
        assert exactgemm.slice_widths(k, 3 * width, 3 * width) == (width, width)
        assert same_bits(mp._matmul_ozaki(a, b), mp._matmul_reference(a, b)) is exact, width


def test_spans_beyond_the_fast_limits_take_the_reference_path_with_the_same_result():
    """1 next to 2^-5000 in one row (a span above MAX_SPAN_BITS): the fast path declines and
    the backend's result is the reference's; inf or NaN is refused either way."""
    mp = MPBackend(30)
    one, tiny = mp.ctx.mpf(1), mp.ctx.mpf(2) ** -5000
    a = np.array([[one, tiny], [tiny, one]], dtype=object)
    assert exactgemm.matmul_exact(a, a) is None and mp._matmul_ozaki(a, a) is None
    assert same_bits(mp.matmul(a, a), mp._matmul_reference(a, a))
    bad = np.array([[one, mp.ctx.inf]], dtype=object)
    for product in (mp._matmul_ozaki, mp._matmul_reference):
        with pytest.raises(ValueError, match="non-finite"):
            product(bad, a)
    with pytest.raises(ValueError, match="engine"):
        MPBackend(30, engine="blas")


@pytest.mark.parametrize("example", ["relu-mlp-kaiming", "small-cnn"])
def test_mp_gradients_with_the_ozaki_engine_are_bit_for_bit_those_of_the_bigint_engine(example):
    """Whole models (dense, conv2d via im2col, batchnorm, pools, softmax cross-entropy): the
    50-digit loss, input gradient and every parameter gradient are the same bits with either
    engine."""
    model = Model.load(EXAMPLES / f"{example}.json")
    params, x, y = model.prepare()
    fast = model.loss_and_grads(MPBackend(50), params, x, y)
    ref = model.loss_and_grads(MPBackend(50, engine="bigint"), params, x, y)
    assert same_bits(fast.loss, ref.loss)
    assert same_bits(fast.x, ref.x)
    for name in ref.params:
        assert same_bits(fast.params[name], ref.params[name]), name
