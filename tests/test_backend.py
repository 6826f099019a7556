"""Backends: one layer code, many precisions, no hidden global state."""

import mpmath
import numpy as np
import pytest
from conftest import small_spec
from hypothesis import given
from hypothesis import strategies as st

from refnet import BOUND, FLOAT32, FLOAT64, Model, MPBackend, get_backend, verify
from refnet.layers.activations import ACTIVATIONS
from refnet.losses import LOSSES

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


def test_mp_backends_use_private_contexts_and_leave_mpmath_mp_alone():
    """Two mp backends of different precision coexist; mpmath.mp's dps/prec never change."""
    before = (mpmath.mp.dps, mpmath.mp.prec)
    low, high = MPBackend(30), MPBackend(120)
    third = low.asarray(np.array([1.0])) / 3
    assert len(str(third[0])) < 40
    assert str(high.asarray(np.array([1.0]))[0] / 3).startswith("0." + "3" * 110)
    model = Model(small_spec("gelu"))
    params, x, y = model.prepare()
    model.loss_and_grads(high, params, x, y)
    verify(model)
    assert (mpmath.mp.dps, mpmath.mp.prec) == before


def test_mp_conversion_is_exact_and_back_conversion_correctly_rounded():
    """float64 -> mp is exact; mp -> float64 rounds to nearest."""
    mp = MPBackend(50)
    x = np.array([0.1, -1e-310, 5e-324, 1.7976931348623157e308, 0.0])
    back = mp.to_numpy(mp.asarray(x))
    assert np.array_equal(back, x)
    third = mp.to_numpy(mp.asarray(np.array([1.0])) / 3)
    assert third[0] == 1.0 / 3


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1),
       st.integers(-300, 300))
def test_mp_matmul_is_the_exact_product_rounded_once(m, k, n, seed, scale_exp):
    """The mp backend's matmul (integer fixed point) equals a dot product evaluated at far higher
    precision and rounded once, for operands spanning many binades and of mixed sign."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)) * 2.0 ** rng.integers(-60, 60, (m, k)) * 2.0**scale_exp
    b = rng.standard_normal((k, n)) * 2.0 ** rng.integers(-60, 60, (k, n))
    a[rng.random((m, k)) < 0.2] = 0.0
    mp = MPBackend(30)
    got = mp.matmul(mp.asarray(a), mp.asarray(b))
    ref = mpmath.MPContext()
    ref.prec = 4000           # far more than any exponent spread here: the dot product is exact
    for i in range(m):
        for j in range(n):
            exact = ref.fsum(ref.mpf(a[i, p]) * ref.mpf(b[p, j]) for p in range(k))
            rounded = mp.ctx.mpf(exact)           # one rounding to 30 digits
            assert got[i, j] == rounded


def test_mp_sum_is_exact_then_rounded():
    """sum(1e30, 1, -1e30) is 1 in the mp backend (no intermediate rounding)."""
    mp = MPBackend(20)
    total = mp.sum(mp.asarray(np.array([1e30, 1.0, -1e30])))
    assert total[()] == 1


def test_float32_backend_keeps_float32_through_every_layer_and_loss():
    """No silent promotion to float64: every gradient of a float32 run is float32."""
    for activation in ACTIVATIONS:
        for loss in LOSSES:
            model = Model(small_spec(activation, loss=loss))
            params, x, y = model.prepare()
            g = model.loss_and_grads(FLOAT32, params, x, y)
            assert np.asarray(g.loss).dtype == np.float32, (activation, loss)
            assert g.x.dtype == np.float32
            assert all(v.dtype == np.float32 for v in g.params.values()), (activation, loss)


def test_float32_backend_keeps_float32_through_the_regularization_penalty():
    """The loss with an L1 + L2 penalty, and the penalty alone, stay float32. Both are 0-d
    values times a Python number: numpy 1.x promoted exactly that to float64 (CI runs the
    suite under numpy 1.26 and 2.x)."""
    from refnet.regularize import penalty
    spec = small_spec("tanh", loss="mse")
    spec["regularization"] = {"l1": 0.01, "l2": 0.1, "params": "all"}
    model = Model(spec)
    params, x, y = model.prepare()
    g = model.loss_and_grads(FLOAT32, params, x, y)
    assert np.asarray(g.loss).dtype == np.float32
    assert all(v.dtype == np.float32 for v in g.params.values())
    w = {k: FLOAT32.asarray(v) for k, v in params.items()}
    r, grads = penalty(FLOAT32, w, list(w), 0.01, 0.1)
    assert np.asarray(r).dtype == np.float32
    assert all(np.asarray(v).dtype == np.float32 for v in grads.values())


def test_float32_gradients_are_close_to_float64_at_float32_precision():
    """float32 runs the same code: its gradients agree with float64 to ~1e-5 relative (a
    depth-2 net of width 4: a few dozen roundings of u32 = 6e-8 each, with margin)."""
    model = Model(small_spec("tanh", loss="softmax_cross_entropy", widths=(4, 4)))
    params, x, y = model.prepare()
    g32 = model.loss_and_grads(FLOAT32, params, x, y)
    g64 = model.loss_and_grads(FLOAT64, params, x, y)
    for name in g64.params:
        scale = np.max(np.abs(g64.params[name]))
        assert np.max(np.abs(g32.params[name] - g64.params[name])) <= 1e-5 * scale, name


def test_bound_backend_values_are_bitwise_the_float64_backend_values():
    """The error-bound backend computes exactly what float64 computes, for every layer and loss."""
    for activation in ACTIVATIONS:
        for loss in LOSSES:
            model = Model(small_spec(activation, loss=loss, widths=(5, 5)))
            params, x, y = model.prepare()
            g = model.loss_and_grads(FLOAT64, params, x, y)
            b = model.loss_and_grads(BOUND, params, x, y)
            assert np.array_equal(np.asarray(g.loss), b.loss.v)
            assert np.array_equal(g.x, b.x.v)
            for name in g.params:
                assert np.array_equal(g.params[name], b.params[name].v), (activation, loss, name)


def test_get_backend_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        get_backend("float16")
    with pytest.raises(ValueError, match="dps"):
        MPBackend(5)


@pytest.mark.parametrize("example", ["small-cnn", "small-resnet", "residual-mlp"])
def test_float32_backend_keeps_float32_through_conv_pool_norm_dropout_and_residual(example):
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "spec" / "examples" / f"{example}.json"
    model = Model.load(path)
    params, x, y = model.prepare()
    g = model.loss_and_grads(FLOAT32, params, x, y)
    assert g.x.dtype == np.float32
    assert all(v.dtype == np.float32 for v in g.params.values())


def test_mp_sums_over_astronomical_exponent_spans_stay_exact_enough_and_do_not_abort():
    """exp(−1e15) next to 1 (a softmax of logits ~1e15, as relu + N(0, 1) nets at depth 20
    produce) would need a 1.4e15-bit integer for an exact fixed-point sum; GMP aborts the process
    on that. Terms more than 2¹⁶ bits below the largest are dropped: the sum is then 1 + 2⁻¹⁰⁰
    to all 50 digits, and the tiny term alone is still represented exactly."""
    mp = MPBackend(50)
    ctx = mp.ctx
    terms = np.array([ctx.one, ctx.exp(-1e15), ctx.mpf(2) ** -100], dtype=object)
    total = mp.sum(terms)
    assert abs(total - (1 + ctx.mpf(2) ** -100)) <= ctx.mpf(10) ** -49
    tiny = mp.sum(np.array([ctx.exp(-1e15)], dtype=object))
    assert tiny == ctx.exp(-1e15)
    model = Model({"input_shape": [2], "batch": 2, "loss": {"type": "softmax_cross_entropy"},
                   "layers": [{"type": "dense", "out": 3, "bias": False}]})
    params = {"0.weight": np.array([[1e15, 0.0], [0.0, 1e15], [-1e15, 0.0]])}
    g = model.loss_and_grads(mp, params, np.array([[1.0, 0.5], [0.2, 1.0]]), np.array([0, 2]))
    assert all(np.all(np.isfinite(mp.to_numpy(v))) for v in g.params.values())


def test_mp_maximum_with_zero_is_mpmaths_comparison_read_off_the_signs():
    """relu's maximum(z, 0) decides z >= 0 from the mpf tuples, not by comparing objects: the
    result is, element for element, where(z >= 0, z, 0) with mpmath's own comparison, at zero,
    at ±inf, at NaN (mpmath: NaN >= 0 is false) and for values far outside float64's range."""
    mp = MPBackend(30)
    ctx = mp.ctx
    z = np.array([ctx.mpf(1) / 3, -ctx.mpf(1) / 3, ctx.zero, ctx.inf, -ctx.inf, ctx.nan,
                  ctx.mpf(2) ** -5000, -ctx.mpf(2) ** 5000], dtype=object).reshape(2, 4)
    got = mp.maximum(z, 0)
    expected = [x if x >= 0 else ctx.zero for x in z.flat]
    assert [g._mpf_ for g in got.flat] == [e._mpf_ for e in expected]
    assert all(type(g) is type(ctx.one) for g in got.flat)


def test_mp_where_makes_every_element_an_mpf_of_its_own_context():
    """Python scalars, float arrays and mpf of another context all come out as mpf of the
    backend's context (the latter rounded to its precision, as asarray does); operands that
    already are pass unchanged."""
    mp, wide = MPBackend(20), MPBackend(60)
    third = wide.asarray(np.array([1.0, 2.0])) / 3                  # 60-digit values
    mine = mp.asarray(np.array([0.5, -0.25]))
    cond = np.array([True, False])
    for a, b in ((mine, 0), (-np.inf, mine), (third, np.array([1.5, 2.5])), (1, third)):
        out = mp.where(cond, a, b)
        assert all(type(v) is type(mp.ctx.one) for v in out.flat)
    assert mp.where(cond, mine, 0)[0] is mine[0]
    assert mp.where(cond, third, 0)[0] == mp.ctx.mpf(third[0])     # rounded to 20 digits


@given(st.lists(st.one_of(finite, st.sampled_from([0.0, -0.0, 5e-324, -2.5e-310, 1.0, -3.0])),
                min_size=1, max_size=40), st.sampled_from([16, 30, 50, 200]))
def test_mp_asarray_of_floats_gives_mpmaths_own_exact_tuples(values, dps):
    """The vectorized float64 → mpf conversion (tuples computed in numpy) gives exactly the
    normalized tuple (sign, odd man, exp, bc) of mpmath's own conversion of each float,
    subnormals, signed zeros and extremes included, at any precision."""
    mp = MPBackend(dps)
    got = mp.asarray(np.array(values))
    assert [g._mpf_ for g in got] == [mp.ctx.mpf(v)._mpf_ for v in values]
    assert all(type(g) is type(mp.ctx.one) for g in got)


# The float backends' where: a bitwise select for boolean masks, np.where otherwise.
SPECIAL_VALUES = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3e38, -1.5, 2.0])


def _bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


@pytest.mark.parametrize("bk", [FLOAT64, FLOAT32], ids=["float64", "float32"])
@pytest.mark.parametrize("shapes", [((128, 64), (128, 64), (128, 64)), ((128, 64), (), (128, 64)),
                                    ((128, 64), (128, 64), ()), ((128, 1), (128, 64), (64,)),
                                    ((8, 32, 32), (32, 32), ()), ((8192,), (), ()),
                                    ((3, 5), (3, 5), ())])
def test_float_where_gives_np_where_bit_for_bit(bk, shapes):
    """bk.where (a bitwise select from BITWISE_WHERE_MIN = 8192 elements on, np.where below:
    the last case) returns np.where's
    result cast to the backend's dtype bit for bit — NaN payloads and signs, −0, ±inf,
    subnormals — for every mix of arrays (C and F order, broadcast) and numbers (Python ints
    and floats, +0 and −0: +0 takes a shortcut), so that no float result depends on which
    path ran. One wrong bit anywhere fails."""
    rng = np.random.default_rng(sum(map(len, shapes)))
    dtype = bk.dtype

    def operands(shape):
        if shape == ():
            return [0, 0.0, -0.0, 1, 0.01, -np.inf, np.nan, dtype.type(2.5)]
        v = rng.choice(SPECIAL_VALUES, size=shape).astype(dtype)
        return [v] + ([np.asfortranarray(v), v.T.copy().T] if v.ndim == 2 else [])

    cond = rng.random(shapes[0]) < 0.5
    for a in operands(shapes[1]):
        for b in operands(shapes[2]):
            got = bk.where(cond, a, b)
            with np.errstate(over="ignore"):
                want = np.where(cond, a, b).astype(dtype, copy=False)
            assert got.dtype == dtype and got.shape == want.shape
            assert np.array_equal(_bits(got), _bits(want)), (shapes, np.ndim(a), np.ndim(b))


def test_float_where_flips_one_bit_when_the_mask_is_off_by_one_element():
    """The check above can fail: a mask differing in one element of 8192 gives a result that
    differs in exactly that element (the select really follows cond, element by element)."""
    from refnet.numerics.backend import BITWISE_WHERE_MIN
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(BITWISE_WHERE_MIN), rng.standard_normal(BITWISE_WHERE_MIN)
    cond = rng.random(BITWISE_WHERE_MIN) < 0.5
    flipped = cond.copy()
    flipped[1234] = ~flipped[1234]
    diff = np.flatnonzero(_bits(FLOAT64.where(cond, a, b)) != _bits(FLOAT64.where(flipped, a, b)))
    assert diff.tolist() == [1234]


# --- the float backends' fused forms (numerics.backend.muladd, sum_product) ---------------------

from refnet.numerics.backend import FUSED_MIN_SIZE  # noqa: E402  (this section's threshold)

# The first five above FUSED_MIN_SIZE (32768 elements), where the fused form runs; the last
# three below it, and empty.
MULADD_SHAPES = [((8, 3, 40, 40), (1, 3, 1, 1), (1, 3, 1, 1)),    # BatchNorm's per-channel γ, β
                 ((8, 3, 40, 40), (8, 3, 40, 40), (1, 3, 1, 1)),  # t·k − q with full t
                 ((8, 3, 40, 40), (1, 3, 1, 1), (8, 3, 40, 40)),  # dy − x̂·p
                 ((5000, 7), (7,), (7,)),                          # LayerNorm's trailing weight
                 ((16, 50, 41), (50, 1), ()),                      # fewer dimensions, a scalar
                 ((3,), (3,), (3,)), ((1, 4, 1), (1, 4, 1), (1, 4, 1)), ((0, 3), (3,), (3,))]


@pytest.mark.parametrize("bk", [FLOAT64, FLOAT32], ids=["float64", "float32"])
@pytest.mark.parametrize("shapes", MULADD_SHAPES)
def test_float_muladd_gives_the_bits_of_a_times_b_plus_c(bk, shapes):
    """muladd(bk, a, b, c) is a * b + c bit for bit in the float backends (the product rounded,
    then the sum; broadcast operands only repeated to a row first): over values with NaN, ±inf,
    −0, subnormals and exact cancellations, every broadcasting pattern the layers use."""
    from refnet.numerics.backend import muladd
    rng = np.random.default_rng(len(shapes[0]) + sum(map(len, shapes)))
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-310, -3e-45, 1.0, -1.0])

    def draw(shape):
        v = np.atleast_1d(rng.standard_normal(shape) * 2.0 ** rng.integers(-60, 60, shape))
        mask = rng.random(v.shape) < 0.2
        v[mask] = rng.choice(special, size=int(mask.sum()))
        with np.errstate(all="ignore"):                 # float32: 2^60·x can overflow to ±inf
            v = v.astype(bk.dtype)
        return v.reshape(shape) if shape else bk.dtype.type(v[0])
    a, b, c = (draw(s) for s in shapes)
    if shapes in MULADD_SHAPES[:5]:                  # the fused form (the rest: the plain one)
        assert np.size(a) >= FUSED_MIN_SIZE
    with np.errstate(all="ignore"):
        got, want = muladd(bk, a, b, c), a * b + c
    assert got.dtype == want.dtype == bk.dtype and got.shape == want.shape
    bits = np.dtype(f"u{bk.dtype.itemsize}")
    assert np.array_equal(got.view(bits), np.asarray(want).view(bits))


@pytest.mark.parametrize("bk", [FLOAT64, FLOAT32], ids=["float64", "float32"])
def test_float_sum_product_is_within_the_bound_of_any_summation_order(bk):
    """sum_product(bk, a, b, axes) (np.einsum's one pass, no a·b temporary) is within
    γ_n·Σ|a·b| of the exact Σ a·b over the n summed terms — the bound of a sum of rounded (or
    fused) products in any order, with γ_n = n·u/(1 − n·u): the bound numpy's own sum of a * b
    meets too. Mixed signs and magnitudes over 12 binades; exact reference by Fractions. The
    bound is met with room (measured: at most 0.0002 of it); summing over the wrong axes, or
    dropping a term, misses it by orders of magnitude."""
    from fractions import Fraction

    from refnet.numerics.backend import sum_product
    rng = np.random.default_rng(7)
    u = float(np.finfo(bk.dtype).eps) / 2
    shape, axes = (8, 4, 40, 30), (0, 2, 3)           # above FUSED_MIN_SIZE: einsum runs
    a = (rng.standard_normal(shape) * 2.0 ** rng.integers(-20, 20, shape)).astype(bk.dtype)
    b = (rng.standard_normal(shape) * 2.0 ** rng.integers(-20, 20, shape)).astype(bk.dtype)
    assert a.size >= FUSED_MIN_SIZE                   # the fused form, not bk.sum(a * b)
    got = sum_product(bk, a, b, axes)
    assert got.shape == (4,) and got.dtype == bk.dtype
    n = 8 * 40 * 30
    gamma = n * u / (1 - n * u)
    for ch in range(4):
        pa, pb = a[:, ch].astype(np.float64).ravel(), b[:, ch].astype(np.float64).ravel()
        exact = sum(Fraction(float(p)) * Fraction(float(q)) for p, q in zip(pa, pb))
        bound = gamma * float(np.sum(np.abs(pa * pb)))
        err = abs(Fraction(float(got[ch])) - exact)
        assert err <= Fraction(bound), (ch, float(err), bound)


def test_fused_forms_fall_back_to_the_plain_expressions_in_the_other_backends():
    """sum_product and muladd run as bk.sum(a * b) and a * b + c where the backend has no fused
    form (mp) or the operands are not plain arrays of its dtype (a storage format's arrays,
    which round every operation): the same values as those expressions, exactly."""
    from refnet.lowp.emulation import StorageArithmetic
    from refnet.numerics.backend import muladd, sum_product
    rng = np.random.default_rng(3)
    a, b, c = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal(4)
    mp = MPBackend(40)
    ma, mb, mc = mp.asarray(a), mp.asarray(b), mp.asarray(c)
    assert all(x == y for x, y in zip(sum_product(mp, ma, mb, (0,)), mp.sum(ma * mb, axis=(0,))))
    assert all(x == y for x, y in zip(muladd(mp, ma, mb, mc).ravel(), (ma * mb + mc).ravel()))
    half = StorageArithmetic("fp16")
    ha, hb, hc = half.asarray(a), half.asarray(b), half.asarray(c)
    assert np.array_equal(np.asarray(sum_product(half, ha, hb, (0,))),
                          np.asarray(half.sum(ha * hb, axis=(0,))))
    assert np.array_equal(np.asarray(muladd(half, ha, hb, hc)), np.asarray(ha * hb + hc))


@pytest.mark.parametrize("bk", [FLOAT64, FLOAT32], ids=["float64", "float32"])
def test_float_sum_over_strided_axes_is_within_the_bound_and_trailing_ones_are_add_reduce(bk):
    """bk.sum over axes that skip a kept one (BatchNorm's (0, 2, 3)) runs as np.einsum above
    FUSED_MIN_SIZE: within γ_{n−1}·Σ|x| of the exact sum (Fractions; measured: at most 5e-5 of
    the bound), any order's bound. A trailing block of axes, or all of them, stays np.add.reduce
    (pairwise there), bit for bit — as does everything below the threshold."""
    from fractions import Fraction
    rng = np.random.default_rng(11)
    u = float(np.finfo(bk.dtype).eps) / 2
    a = (rng.standard_normal((8, 4, 40, 30)) * 2.0 ** rng.integers(-20, 20, (8, 4, 40, 30))
         ).astype(bk.dtype)
    assert a.size >= FUSED_MIN_SIZE
    got = bk.sum(a, axis=(0, 2, 3))
    assert got.shape == (4,) and got.dtype == bk.dtype
    assert bk.sum(a, axis=(0, 2, 3), keepdims=True).shape == (1, 4, 1, 1)
    n = 8 * 40 * 30
    gamma = (n - 1) * u / (1 - (n - 1) * u)
    for ch in range(4):
        terms = a[:, ch].astype(np.float64).ravel()
        exact = sum(Fraction(float(t)) for t in terms)
        bound = gamma * float(np.sum(np.abs(terms)))
        assert abs(Fraction(float(got[ch])) - exact) <= Fraction(bound), ch
    bits = np.dtype(f"u{bk.dtype.itemsize}")
    for axis in [(2, 3), (1, 2, 3), None, 0, (0, 1)]:
        plain = np.add.reduce(a, axis=axis, dtype=bk.dtype)
        assert np.array_equal(np.asarray(bk.sum(a, axis=axis)).view(bits),
                              np.asarray(plain).view(bits)), axis


def test_sample_shaped_statistics_change_no_value_of_batchnorm():
    """normalize subtracts and divides by μ and s repeated to one sample (sample_shaped, for
    numpy's inner loop): x̂ is bit for bit (x − μ)/s with the (1, C, 1, 1) statistics."""
    from refnet.layers.norm import normalize
    from refnet.numerics.backend import FUSED_MIN_SIZE as threshold
    rng = np.random.default_rng(5)
    for bk in (FLOAT64, FLOAT32):
        x = (3 * rng.standard_normal((8, 5, 30, 30)) + 2).astype(bk.dtype)
        assert x.size >= threshold
        xhat, std, m, mean, var = normalize(bk, x, (0, 2, 3), 1e-5)
        assert std.shape == mean.shape == (1, 5, 1, 1)
        assert np.array_equal(xhat, (x - mean) / std)


@pytest.mark.parametrize("bk", [FLOAT64, FLOAT32], ids=["float64", "float32"])
def test_float_muladd_into_a_reused_array_gives_the_same_bits_and_only_there(bk):
    """muladd(..., reuse=r) writes a·b + c into r — the caller's own array of the result's shape
    and dtype — with the bits of the fresh result, even when r is the operand a itself (the
    product is formed element by element before the sum overwrites it); an r of another
    shape, dtype or a read-only one is left alone and a fresh array returned."""
    from refnet.numerics.backend import muladd
    rng = np.random.default_rng(9)
    a = rng.standard_normal((8, 3, 40, 40)).astype(bk.dtype)
    b, c = (rng.standard_normal((1, 3, 1, 1)).astype(bk.dtype) for _ in range(2))
    assert a.size >= FUSED_MIN_SIZE
    want = a * b + c
    mine = a.copy()
    got = muladd(bk, mine, b, c, reuse=mine)
    assert got is mine and np.array_equal(got, want)
    other = np.zeros(a.shape, dtype=bk.dtype)
    assert muladd(bk, a, b, c, reuse=other) is other and np.array_equal(other, want)
    for wrong in (np.zeros((8, 3, 40, 41), bk.dtype), np.zeros(a.shape, np.float16),
                  np.broadcast_to(np.zeros((1,), bk.dtype), a.shape)):
        before = wrong.copy()
        got = muladd(bk, a, b, c, reuse=wrong)
        assert got is not wrong and np.array_equal(got, want) and np.array_equal(wrong, before)
