"""The expansion engine (``refnet/numerics/expansion.py``) is held to its stated bound by mpmath.

The engine promises the standard model of floating-point arithmetic with unit roundoff
ε = 2^(1−prec) (prec: the bits the mp backend rounds to at the same dps, plus one): every
operation's result lies within relative ε of the exact result of that operation on the engine's
own operands (products and sums within 2^−prec: exact, then rounded once; a matmul within
2^−prec·|AB| + 2^−(prec+2)·(|A| @ |B|), the dot product's form of the model, since it leaves
out the slice products that weigh less). mpmath at 80
digits (266 bits, its own error ~2^-266, 2^-95 of ε) is the judge, element by element.

A whole computation then obeys the error analysis of ``refnet/numerics/errorbound.py`` with u
replaced by ε: the float64 running bound ``e`` (computed with u = 2^-53) scaled by ε/u bounds the
engine's error, up to a factor 2 — ``e`` charges a result's rounding as half its float64 ulp,
which can be as small as 2^-54 |v| where the engine's per-operation bound is ε|v| — and the
second-order terms, which only shrink with ε. So every gradient element of every layer type must
satisfy |engine − mp80| ≤ 2·(ε/u)·e (+ mp80's own error), checked below.
"""

import math

import numpy as np
import pytest
from conftest import small_spec

from refnet import BOUND, Model, MPBackend
from refnet.numerics import expansion as ex
from refnet.numerics.expansion import Expansion, ExpansionBackend, ExpansionRangeError

E = ExpansionBackend(50)
REF = MPBackend(80)
EPS = 2.0 ** (1 - E.prec)


def _relative_errors(x: Expansion, exact) -> np.ndarray:
    """|x − exact| / |exact| per element, computed in the reference context (exact zero must
    be matched exactly: inf otherwise)."""
    ctx = REF.ctx
    got = np.asarray(E.to_mpf(x), dtype=object).ravel()
    want = np.asarray(exact, dtype=object).ravel()
    out = []
    for g, w in zip(got, want):
        g, w = ctx.mpf(g), ctx.mpf(w)
        if w == 0:
            out.append(0.0 if g == 0 else math.inf)
        else:
            out.append(float(abs(g - w) / abs(w)))
    return np.array(out)


def _operands(rng, shape, kind):
    """Engine operands with several components: products and sums of floats (exact in the
    engine), or ``cancel``: a + (−a + tiny), whose exact value is tiny against its terms."""
    a = E.asarray(rng.standard_normal(shape))
    b = E.asarray(rng.standard_normal(shape))
    c = E.asarray(rng.standard_normal(shape))
    wide = a * b + c * E.const("0.1")                  # ~3-4 components
    if kind == "wide":
        return wide
    tiny = E.asarray(rng.standard_normal(shape) * 2.0 ** -90)
    return (wide + tiny) - wide * E.asarray(np.ones(shape))


def _exact(x):
    """The engine operand as exact mpf of the reference context."""
    ctx = REF.ctx
    return np.vectorize(lambda v: ctx.mpf(v), otypes=[object])(np.asarray(E.to_mpf(x), dtype=object))


BINARY = {
    "add": (lambda a, b: a + b, lambda a, b: a + b),
    "subtract": (lambda a, b: a - b, lambda a, b: a - b),
    "multiply": (lambda a, b: a * b, lambda a, b: a * b),
    "divide elementwise": (lambda a, b: a / b, lambda a, b: a / b),
}


@pytest.mark.parametrize("kind", ["wide", "cancel"])
@pytest.mark.parametrize("op", sorted(BINARY))
def test_each_arithmetic_operation_is_within_its_unit_roundoff_of_mpmath(op, kind):
    """+ − × ÷ on multi-component operands (and on cancelling ones): every element within
    relative ε = 2^(1−prec) of the exact result."""
    rng = np.random.default_rng(1)
    a, b = _operands(rng, (6, 7), kind), _operands(rng, (6, 7), "wide")
    fast, exact = BINARY[op]
    got = fast(a, b)
    want = np.vectorize(exact, otypes=[object])(_exact(a), _exact(b))
    assert np.max(_relative_errors(got, want)) <= EPS


def test_division_by_a_broadcast_divisor_goes_through_the_reciprocal_within_the_bound():
    """A (6, 7) / (6, 1) division (softmax's normalization, a mean) is a K-component reciprocal
    times a product: two roundings, ≤ 2^-(53K−1) + 2^-prec ≤ ε."""
    rng = np.random.default_rng(2)
    a, b = _operands(rng, (6, 7), "wide"), _operands(rng, (6, 1), "wide")
    got = a / b
    want = np.vectorize(lambda x, y: x / y, otypes=[object])(_exact(a), _exact(b))
    assert np.max(_relative_errors(got, want)) <= EPS


@pytest.mark.parametrize("name", ["exp", "expm1", "log", "log1p", "tanh", "sqrt", "erf", "erfc"])
def test_each_elementwise_function_is_within_its_unit_roundoff_of_mpmath(name):
    rng = np.random.default_rng(3)
    x = _operands(rng, (5, 4), "wide")
    if name in ("log", "sqrt"):
        x = E.abs(x) + E.const("0.01")
    if name == "log1p":
        x = E.abs(x)
    got = getattr(E, name)(x)
    f = getattr(REF.ctx, name)
    want = np.vectorize(f, otypes=[object])(_exact(x))
    assert np.max(_relative_errors(got, want)) <= EPS


@pytest.mark.parametrize("name", ["expm1", "log1p"])
def test_expm1_and_log1p_keep_their_relative_accuracy_near_zero_and_far_from_it(name):
    """expm1 and log1p are the engine's own (mpmath's exp and log at more bits): relative to
    their result within ε where exp − 1 and log(1 + x) cancel most — arguments down to 1e-250,
    on both sides of zero, next to −1 for log1p — and far out (exp(x) − 1 → −1, huge logs)."""
    tiny = [1e-250, 3e-60, 2e-51, 1e-20, 1e-5, 0.3]
    x = [s * v for v in tiny for s in (1, -1)] + ([-30.0, 5.0, 600.0] if name == "expm1"
                                                 else [-0.999999, -1 + 2.0 ** -40, 3.0, 1e280])
    x = E.asarray(np.array(x)) * (E.const(1) + E.asarray(np.full(len(x), 2.0 ** -70)))
    got = getattr(E, name)(x)
    want = np.vectorize(getattr(REF.ctx, name), otypes=[object])(_exact(x))
    assert np.max(_relative_errors(got, want)) <= EPS


def test_a_log_of_a_negative_number_is_a_one_line_error():
    with pytest.raises(ValueError, match="log of a negative number"):
        E.log(E.asarray(np.array([1.0, -2.0])))


def _dot_model_excess(got: Expansion, a: Expansion, b: Expansion) -> float:
    """The largest |got − AB| / (2^-prec·|AB| + 2^-(prec+2)·(|A| @ |B|)) over the elements,
    computed in the reference context: a matmul keeps its promise where this is at most 1."""
    A, B = _exact(a), _exact(b)
    want = np.matmul(A, B)
    magnitude = np.matmul(np.vectorize(abs, otypes=[object])(A),
                          np.vectorize(abs, otypes=[object])(B))
    got = np.asarray(E.to_mpf(got), dtype=object)
    ctx = REF.ctx
    worst = 0.0
    for g, w, m in zip(np.ravel(got), np.ravel(want), np.ravel(magnitude)):
        allowed = ctx.ldexp(abs(w), -E.prec) + ctx.ldexp(m, -(E.prec + 2))
        err = abs(ctx.mpf(g) - w)
        worst = max(worst, float(err / allowed) if allowed else (0.0 if err == 0 else math.inf))
    return worst


def _gradient_operands(rng, rows, k, cols):
    """A weight gradient's operands at the size where the engine leaves diagonals out: a
    backpropagated expansion (4 components) against float64 activations, over a batch of k."""
    return _operands(rng, (rows, k), "wide") * E.const("0.3"), E.asarray(rng.standard_normal((k, cols)))


@pytest.mark.parametrize("shapes", [((5, 9), (9, 4)), ((9,), (9, 4)), ((5, 9), (9,)),
                                    ((2, 3, 9), (2, 9, 4)), ((2, 3, 9), (9, 4))])
@pytest.mark.parametrize("kind", ["wide", "cancel"])
def test_matmul_keeps_the_dot_product_model(shapes, kind):
    """The Ozaki GEMMs on float64 BLAS are error-free, and the diagonals left out weigh below
    2^-(prec+2)·(|A| @ |B|): every element is within 2^-prec·|AB| + 2^-(prec+2)·(|A| @ |B|),
    including numpy's vector and broadcast-batch rules and rows that cancel."""
    rng = np.random.default_rng(4)
    a, b = _operands(rng, shapes[0], kind), _operands(rng, shapes[1], "wide")
    got = E.matmul(a, b)
    assert got.shape == np.matmul(np.zeros(a.shape), np.zeros(b.shape)).shape
    assert _dot_model_excess(got, a, b) <= 1.0


def test_a_weight_gradient_leaves_diagonals_out_and_keeps_the_dot_product_model(monkeypatch):
    """At a weight gradient's shapes (4 components against floats, batch 32) the engine does
    leave low diagonals out — and the result still keeps the model."""
    chosen = []
    first_diagonal = ex._first_diagonal
    monkeypatch.setattr(ex, "_first_diagonal", lambda *args: chosen.append(
        first_diagonal(*args)) or chosen[-1])
    a, b = _gradient_operands(np.random.default_rng(7), 6, 32, 5)
    got = E.matmul(a, b)
    assert chosen and chosen[-1] >= 2
    assert _dot_model_excess(got, a, b) <= 1.0


def test_the_truncation_bound_is_the_same_scaled_to_the_lowest_bits_or_to_the_tops(monkeypatch):
    """``_first_diagonal``'s one-pass form (magnitudes scaled to each group's lowest bit) leaves
    out exactly the diagonals its general form (scaled to the tops, for spans near float64's
    range) does: the same smallest allowed diagonal, on weight gradients and forward products."""
    rng = np.random.default_rng(14)
    cases = [_gradient_operands(rng, 12, 32, 9),
             (_operands(rng, (6, 40), "cancel"), E.asarray(rng.standard_normal((40, 7)))),
             (E.asarray(rng.standard_normal((5, 30)) * np.exp(rng.uniform(-30, 30, (5, 30)))),
              _operands(rng, (30, 4), "wide"))]
    firsts = []
    for limit in (ex._UNIT_SCALED_LIMIT, 0):
        monkeypatch.setattr(ex, "_UNIT_SCALED_LIMIT", limit)
        seen = []
        original = ex._first_diagonal
        monkeypatch.setattr(ex, "_first_diagonal", lambda *a: seen.append(original(*a)) or seen[-1])
        for a, b in cases:
            E.matmul(a, b)
        monkeypatch.setattr(ex, "_first_diagonal", original)
        firsts.append(seen)
    assert firsts[0] == firsts[1] and max(firsts[0]) > 0


def test_the_dot_model_check_catches_an_error_just_above_its_bound():
    """The check of the two tests above has teeth: one element moved by 1.01× its allowance
    fails it, by 0.99× passes (the move itself is rounded within 2^-prec of it)."""
    a, b = _gradient_operands(np.random.default_rng(8), 3, 32, 2)
    exact = E.matmul(a, b)
    A, B = _exact(a), _exact(b)
    ctx = REF.ctx
    w = np.matmul(A, B)[1, 0]
    m = sum(abs(A[1, j]) * abs(B[j, 0]) for j in range(A.shape[1]))
    allowed = ctx.ldexp(abs(w), -E.prec) + ctx.ldexp(m, -(E.prec + 2))
    for factor, fails in ((1.01, True), (0.99, False)):
        moved = E.asarray(np.asarray([[w + factor * allowed]], dtype=object))
        got = E.where(np.array([[False, False], [True, False], [False, False]]), moved, exact)
        assert (_dot_model_excess(got, a, b) > 1.0) is fails


def test_leaving_out_two_more_diagonals_than_the_bound_allows_breaks_the_model(monkeypatch):
    """The bound is not vacuous, and the check would catch one that claimed too much: two
    diagonals (~40 bits) beyond the one it proves safe, the product breaks the model (by
    ~10^5 here; one diagonal beyond it still keeps it, at ~0.05 of the allowance, and the
    engine's own choice at ~10^-8: the bound is within two diagonals of tight)."""
    first_diagonal = ex._first_diagonal
    monkeypatch.setattr(ex, "_first_diagonal", lambda *args: first_diagonal(*args) + 2)
    a, b = _gradient_operands(np.random.default_rng(7), 6, 32, 5)
    assert _dot_model_excess(E.matmul(a, b), a, b) > 1.0


def test_the_untruncated_product_is_exact():
    """With nothing left out (``prec=None``) the slice products recombine to the exact
    product: only the final rounding (2^-prec relative) remains."""
    a, b = _gradient_operands(np.random.default_rng(9), 4, 32, 3)
    got = E._from_limbs(*ex._matmul_limbs(a.c, b.c, None))
    want = np.matmul(_exact(a), _exact(b))
    assert np.max(_relative_errors(got, np.asarray(want, dtype=object))) <= 2.0 ** -E.prec


def test_a_product_is_the_same_bits_with_its_slices_prescaled_or_not(monkeypatch):
    """The slices scaled by their weight (carries in four passes) and left as integers (the
    range fallback): the same digits, so the same result bit for bit."""
    a, b = _gradient_operands(np.random.default_rng(12), 20, 32, 30)
    results = []
    for prescale in (True, False):
        monkeypatch.setattr(ex, "_PRESCALE", prescale)
        results.append(E.matmul(a, b).c)
    assert np.array_equal(results[0], results[1])


def test_a_sum_with_one_nonzero_term_per_output_is_that_term_and_two_are_summed_exactly():
    """A max pool's gradient scattered back has one nonzero term a position: the sum is that
    term exactly (the shortcut); with a second nonzero term the full exact sum runs."""
    rng = np.random.default_rng(13)
    a = _operands(rng, (6, 4), "wide")
    mask = np.zeros((6, 4), dtype=bool)
    mask[np.arange(6), rng.integers(0, 4, 6)] = True
    one = E.where(mask, a, 0.0)
    assert np.max(_relative_errors(E.sum(one, axis=1), np.sum(_exact(one), axis=1))) == 0.0
    mask[0, :2] = True
    two = E.where(mask, a, 0.0)
    assert np.max(_relative_errors(E.sum(two, axis=1), np.sum(_exact(two), axis=1))) <= 2.0 ** -E.prec


def _hard_terms(rng, n):
    """Terms of n elements, the odd ones of which need more than one rounding round (huge
    terms that cancel, a small remainder) and the even ones not."""
    terms = [rng.standard_normal(n) * 2.0 ** (60 * i) for i in range(8)]
    terms += [-t for t in terms[1:]]
    terms.append(rng.standard_normal(n) * 2.0 ** -20)
    easy = np.arange(n) % 2 == 0
    return [np.where(easy, 0.0, t) for t in terms[:-1]] + [terms[-1]]


def test_every_element_is_rounded_by_its_own_terms_alone(monkeypatch):
    """An element's components do not depend on the other elements it is rounded with: the
    hard elements (three rounds) rounded together with easy ones, and each alone, agree bit
    for bit — which is why the block size and the thread count change no result."""
    retried = []                # the elements rounded again, all components error-free
    round_terms = ex._round_terms
    monkeypatch.setattr(ex, "_round_terms", lambda terms, bk, ordered=False, r=ex._ROUNDS,
                        error_free=False: (error_free and retried.append(terms[0].size),
                                           round_terms(terms, bk, ordered, r, error_free))[1])
    terms = _hard_terms(np.random.default_rng(1), 6)
    together = np.stack(ex._round_terms(terms, E))
    assert 0 < retried[0] < 6                       # some elements, not all, needed another round
    for j in range(6):
        alone = ex._round_terms([t[j:j + 1] for t in terms], E)
        alone = np.concatenate([np.stack(alone), np.zeros((E.K - len(alone), 1))])
        assert np.array_equal(alone[:, 0], together[:, j])


def test_a_product_is_the_same_for_any_block_size_and_thread_count(monkeypatch):
    """Blocks of 2^30 (one), of 64 elements on one thread and on three: the same bits."""
    a, b = _gradient_operands(np.random.default_rng(10), 24, 32, 40)
    results = []
    for block, threads in ((2 ** 30, 1), (64, 1), (64, 3)):
        monkeypatch.setattr(ex, "_BLOCK", block)
        results.append(ExpansionBackend(50, threads=threads).matmul(a, b).c)
    assert all(np.array_equal(r, results[0]) for r in results[1:])


def test_the_default_thread_count_follows_the_blas_settings(monkeypatch):
    """verify's FD workers run their BLAS on one thread (OMP_NUM_THREADS=1 ...): the engine
    then runs one too; with none of the variables set, as many as the process's cores."""
    for name in ex.BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cores = ex.default_threads()
    assert cores >= 1 and ExpansionBackend(50).threads == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ExpansionBackend(50).threads == 1
    with pytest.raises(ValueError, match="threads"):
        ExpansionBackend(50, threads=0)


@pytest.mark.parametrize("axis", [None, 0, 1, (0, 2), -1])
@pytest.mark.parametrize("keepdims", [False, True])
def test_sum_is_the_exact_sum_rounded_once(axis, keepdims):
    rng = np.random.default_rng(5)
    a = _operands(rng, (3, 4, 5), "cancel")
    got = E.sum(a, axis=axis, keepdims=keepdims)
    want = np.sum(_exact(a), axis=axis, keepdims=keepdims)
    assert got.shape == np.shape(want)
    assert np.max(_relative_errors(got, np.asarray(want, dtype=object))) <= 2.0 ** -E.prec


def test_an_exact_cancellation_gives_exactly_zero():
    """x + (−x) over a long sum is 0 exactly (a BatchNorm bias gradient is exactly zero)."""
    rng = np.random.default_rng(6)
    a = _operands(rng, (4, 8), "wide")
    total = E.sum(E.where(np.ones((4, 8), dtype=bool), a, 0) - a, axis=1)
    assert not np.any(total.c)


def test_comparisons_and_argmax_are_exact_on_differences_far_below_float64():
    """a and a + 2^-150·a compare as they are, although their float64 values are equal: the
    sign of a difference is the sign of its leading component (dominance)."""
    a = E.asarray(np.array([1.5, -2.0, 3.0])) * E.const("1.1")
    b = a + a * E.asarray(np.array([2.0 ** -150, -(2.0 ** -150), 0.0]))
    assert np.array_equal(E.to_numpy(a), E.to_numpy(b))
    assert list(b > a) == [True, True, False] and list(b == a) == [False, False, True]
    m = max(a.c.shape[0], b.c.shape[0])
    stacked = Expansion(np.stack([ex._pad(a.c, m), ex._pad(b.c, m)], axis=-1), E)
    assert list(E.argmax(stacked, axis=1)) == [1, 1, 0]   # a tie: the first maximum


def test_to_numpy_rounds_correctly_next_to_a_rounding_midpoint():
    """1 + 2^-53 (a midpoint) plus or minus 2^-160: the float64 sum of the components would
    round both to even; the exact value rounds up and down."""
    one = E.asarray(np.array([1.0, 1.0, 1.0]))
    half_ulp = E.asarray(np.array([2.0 ** -53] * 3))
    nudge = E.asarray(np.array([2.0 ** -160, -(2.0 ** -160), 0.0]))
    x = one + half_ulp + nudge
    want = [float(REF.ctx.mpf(v)) for v in E.to_mpf(x)]
    assert list(E.to_numpy(x)) == want == [1.0 + 2.0 ** -52, 1.0, 1.0]


def test_values_outside_the_exact_range_raise_instead_of_losing_digits():
    """Below TINY a product's error term would underflow: the engine refuses (verify then uses
    the mp backend) rather than return fewer digits than it promises."""
    with pytest.raises(ExpansionRangeError):
        E.asarray(np.array([1.0, 1e-300]))
    small = E.asarray(np.array([2.0 ** -500]))
    with pytest.raises(ExpansionRangeError):
        small * small
    with pytest.raises(ExpansionRangeError):
        E.asarray(np.array([2.0 ** 1000]))


def test_the_rounding_check_flags_a_residual_just_above_its_limit_and_not_one_just_below():
    """The a-posteriori check is the engine's guarantee; it must reject a leftover of
    (1 + 2^-30) × 2^-prec·|x₀| and accept (1 − 2^-30) × that (the check's own float rounding
    is 2^-45 relative)."""
    x0 = np.array([1.0])
    limit = E._limit
    above = [x0 * limit * (1 + 2.0 ** -30)]
    below = [x0 * limit * (1 - 2.0 ** -30)]
    assert ex._failing([x0], above, limit) is not None
    assert ex._failing([x0], below, limit) is None


def test_infinities_pass_through_as_in_float64():
    """Max-pool pads with −inf: where, max and comparisons treat it as float64 does."""
    a = E.where(np.array([True, False]), E.asarray(np.array([0.5, 0.5])), -np.inf)
    assert list(a > 0) == [True, False]
    assert E.to_numpy(E.max(a, axis=0)) == 0.5
    assert E.to_numpy(a + 1.0)[1] == -np.inf


# --- whole networks: every layer type, gradients within the engine's analysed bound ----------

def _net(layers, input_shape, loss="mse", batch=3, **extra):
    return {"input_shape": list(input_shape), "seed": 0, "batch": batch, "layers": layers,
            "loss": {"type": loss}, **extra}


CNN = [{"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1, "stride": 1},
       {"type": "batchnorm"}, {"type": "relu"},
       {"type": "conv2d", "out_channels": 4, "kernel_size": 2, "stride": 2, "dilation": 1,
        "groups": 1},
       {"type": "maxpool2d", "kernel_size": 2},
       {"type": "flatten"}, {"type": "dense", "out": 3}]

NETWORKS = {
    **{f"mlp-{act}": small_spec(act, widths=(5, 4)) for act in
       ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "softplus", "prelu",
        "scaled_sigmoid", "identity", "silu", "mish", "hardtanh", "relu6", "hardsigmoid",
        "hardswish", "celu", "softsign", "logsigmoid")},
    "mlp-gelu-tanh": small_spec("gelu", widths=(5, 4), approximate="tanh"),
    "cnn-groupnorm-instancenorm": _net(
        [{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
         {"type": "groupnorm", "num_groups": 2}, {"type": "tanh"},
         {"type": "instancenorm2d", "affine": True, "track_running_stats": True},
         {"type": "flatten"}, {"type": "dense", "out": 2}], (2, 4, 4), batch=2, mode="train"),
    "mlp-cross-entropy": small_spec("tanh", loss="softmax_cross_entropy", widths=(5,), out_dim=3),
    "mlp-bce": small_spec("tanh", loss="bce_with_logits", widths=(5,), out_dim=2),
    "mlp-l1-l2": {**small_spec("tanh", widths=(5,)),
                  "regularization": {"l1": 1e-3, "l2": 1e-2, "params": "weights"}},
    "cnn-bn-maxpool": _net(CNN, (2, 6, 6), "softmax_cross_entropy", batch=2),
    "cnn-avgpool-global": _net(
        [{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": 1, "groups": 2},
         {"type": "avgpool2d", "kernel_size": 2, "padding": 1},
         {"type": "conv2d", "out_channels": 2, "kernel_size": 2, "dilation": 1},
         {"type": "global_avgpool"}, {"type": "flatten"}, {"type": "dense", "out": 2}],
        (2, 5, 5), batch=2),
    "pool-options": _net(
        [{"type": "conv2d", "out_channels": 2, "kernel_size": 2, "padding": 1},
         {"type": "maxpool2d", "kernel_size": 2, "stride": 2, "padding": 1, "dilation": 2,
          "ceil_mode": True},
         {"type": "avgpool2d", "kernel_size": 2, "ceil_mode": True, "divisor_override": 3},
         {"type": "flatten"}, {"type": "dense", "out": 2}], (1, 7, 7), batch=2),
    "adaptive-pools": _net(
        [{"type": "conv2d", "out_channels": 2, "kernel_size": 2},
         {"type": "adaptive_maxpool2d", "output_size": [3, 2]},
         {"type": "adaptive_avgpool2d", "output_size": 2},
         {"type": "flatten"}, {"type": "dense", "out": 2}], (1, 7, 6), batch=2),
    "dense-on-sequences": _net(
        [{"type": "dense", "out": 4}, {"type": "tanh"}, {"type": "dense", "out": 2}], (3, 5)),
    "layernorm-dropout-train": _net(
        [{"type": "dense", "out": 6}, {"type": "layernorm"}, {"type": "tanh"},
         {"type": "dropout", "p": 0.3}, {"type": "dense", "out": 2}], (4,), mode="train"),
    # batch 32 and 24 wide: the weight gradients leave low diagonals out (issue 14's MLP shape)
    "mlp-relu-batch32": _net([{"type": "dense", "out": 24}, {"type": "relu"},
                              {"type": "dense", "out": 16}, {"type": "relu"},
                              {"type": "dense", "out": 3}], (20,), "softmax_cross_entropy",
                             batch=32),
    "residual-projection": _net(
        [{"type": "residual", "shortcut": [{"type": "dense", "out": 5}], "body": [
            {"type": "dense", "out": 5}, {"type": "relu"}, {"type": "dense", "out": 5}]},
         {"type": "dense", "out": 2}], (3,)),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_gradient_of_every_layer_type_is_within_the_engine_bound_of_mpmath(name):
    model = Model(NETWORKS[name])
    params, x, y = model.prepare()
    got = model.loss_and_grads(E, params, x, y)
    want = model.loss_and_grads(REF, params, x, y)
    bound = model.loss_and_grads(BOUND, params, x, y)
    scale = 2 * EPS / 2.0 ** -53
    for key in list(want.params) + ["x"]:
        g = got.params[key] if key != "x" else got.x
        w = want.params[key] if key != "x" else want.x
        e = (bound.params[key] if key != "x" else bound.x).e
        diff = REF.to_numpy(REF.abs(REF.asarray(E.to_mpf(g)) - w))
        allowed = scale * e + 1e-70 * np.abs(REF.to_numpy(w))      # + mp80's own rounding
        assert np.all(diff <= allowed), (key, float(np.max(diff / np.maximum(allowed, 1e-300))))


def test_the_network_check_has_teeth_a_component_short_engine_fails_it():
    """The same comparison fails for an engine that keeps one component less than it claims
    (errors ~2^-159 against a bound of ~2^-165 · the float64 bound's growth)."""
    weak = ExpansionBackend(50)
    weak.K -= 1
    weak._limit = 2.0 ** -(53 * weak.K - 24)        # its rounding then passes its own check
    model = Model(NETWORKS["mlp-tanh"])
    params, x, y = model.prepare()
    got = model.loss_and_grads(weak, params, x, y)
    want = model.loss_and_grads(REF, params, x, y)
    bound = model.loss_and_grads(BOUND, params, x, y)
    scale = 2 * EPS / 2.0 ** -53
    worst = 0.0
    for key in want.params:
        diff = REF.to_numpy(REF.abs(REF.asarray(weak.to_mpf(got.params[key])) - want.params[key]))
        worst = max(worst, float(np.max(diff / (scale * bound.params[key].e))))
    assert worst > 1.0
