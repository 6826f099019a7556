"""Activations: each derivative is the derivative of its forward, accurate and overflow-free."""

import mpmath
import numpy as np
import pytest
from conftest import HAVE_TORCH
from hypothesis import assume, given
from hypothesis import strategies as st

from refnet import BOUND, FLOAT32, FLOAT64, MPBackend
from refnet.layers.activations import ACTIVATIONS

KINKED = {"relu", "leaky_relu", "prelu", "elu", "selu", "softplus", "hardtanh", "relu6",
          "hardsigmoid", "hardswish", "celu", "softsign"}
# Where each kinked activation's pieces meet (softplus: its switch βz = threshold, below).
KINK_POINTS = {"hardtanh": (-1.0, 1.0), "relu6": (0.0, 6.0), "hardsigmoid": (-3.0, 3.0),
               "hardswish": (-3.0, 3.0)}
OPTIONS = {"leaky_relu": {"slope": 0.02}, "elu": {"alpha": 1.3}, "softplus": {"beta": 2.0,
                                                                                 "threshold": 15.0}}


def make(name, shape=(1,), **options):
    config = {"type": name, **OPTIONS.get(name, {}), **options}
    return ACTIVATIONS[name](config, shape, f"test ({name})")


def forward_backward(layer, bk, z, dh=None):
    params = {k: bk.asarray(v) for k, v in layer.init_params(np.random.default_rng(0)).items()}
    z = bk.asarray(z)
    h, cache = layer.forward(bk, params, z)
    dh = bk.asarray(np.ones(z.shape) if dh is None else dh)
    dz, grads = layer.backward(bk, params, dh, cache)
    return h, dz, grads


def kink_margin(name, z):
    if name == "softplus":
        return abs(2.0 * z - 15.0)
    if name in KINK_POINTS:
        return min(abs(z - k) for k in KINK_POINTS[name])
    return abs(z)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(z=st.floats(-60, 60, allow_nan=False))
def test_derivative_equals_high_precision_central_difference_of_the_forward(name, z):
    """f'(z) from backward agrees with (f(z+h) − f(z−h))/2h to >= 25 digits. (f' can be as small
    as tanh'(60) = 3e-52 while f ~ 1: 130 digits resolve f(z ± h) − f(z) ~ 1e-72 to 50 digits.)"""
    layer = make(name)
    assume(name not in KINKED or kink_margin(name, z) > 1e-6)
    mp = MPBackend(130)
    _, dz, _ = forward_backward(layer, mp, np.array([z]))
    h = mp.ctx.mpf("1e-20")
    zp, zm = mp.asarray(np.array([z])) + h, mp.asarray(np.array([z])) - h
    params = {k: mp.asarray(v) for k, v in layer.init_params(np.random.default_rng(0)).items()}
    fd = (layer.forward(mp, params, zp)[0][0] - layer.forward(mp, params, zm)[0][0]) / (2 * h)
    scale = max(abs(dz[0]), mp.ctx.mpf("1e-100"))
    assert abs(fd - dz[0]) <= scale * mp.ctx.mpf("1e-25"), (name, z, fd, dz[0])


EXTREMES = np.array([-1.7976931348623157e308, -1e300, -1e20, -746.0, -710.0, -40.0, -1e-300,
                     -5e-324, 0.0, 5e-324, 1e-300, 40.0, 710.0, 746.0, 1e20, 1e300,
                     1.7976931348623157e308])


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_forward_and_backward_are_finite_without_warnings_for_every_finite_input(name):
    """No overflow, no NaN, no warning at ±max float, ±1e300, the exp overflow edge, subnormals.
    (Every warning numpy shows by default is an error here; underflow, which numpy ignores by
    default, is the correctly rounded result for subnormal inputs.)"""
    z = EXTREMES
    if name == "selu":          # λ·z is beyond the float64 range there: inf is the right answer
        z = z[np.abs(z) < np.finfo(np.float64).max / 1.06]
    layer = make(name, shape=(z.size,))
    # A tiny upstream gradient keeps PReLU's Σ z·dy (a true sum beyond 1e308 otherwise) finite.
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        h, dz, grads = forward_backward(layer, FLOAT64, z[None, :], np.full((1, z.size), 1e-10))
    assert np.all(np.isfinite(h)), (name, z[~np.isfinite(h[0])])
    assert np.all(np.isfinite(dz)), (name, z[~np.isfinite(dz[0])])
    for g in grads.values():
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(z=st.floats(-700, 700, allow_nan=False))
def test_float64_values_and_derivatives_are_within_their_error_bound(name, z):
    """float64 f(z) and f'(z) are within the running error bound of the exact values (so they are
    accurate where the bound is small: e.g. sigmoid'(40) keeps its 4e-18, unlike s(1 − s))."""
    assume(name not in KINKED or kink_margin(name, z) > 1e-9)
    layer = make(name)
    mp = MPBackend(60)
    hb, db, _ = forward_backward(layer, BOUND, np.array([[z]]))
    hm, dm, _ = forward_backward(layer, mp, np.array([[z]]))
    for bound, exact in ((hb, hm), (db, dm)):
        err = abs(mp.ctx.mpf(bound.v[0, 0]) - exact[0, 0])
        assert err <= mp.ctx.mpf(bound.e[0, 0]), (name, z, err, bound.e[0, 0])


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "scaled_sigmoid", "gelu", "softplus"])
def test_saturated_derivatives_keep_full_relative_accuracy(name):
    """Deep in saturation the derivative is tiny but not zero, and float64 gets it to a few ulps
    (torch's s(1 − s) for sigmoid'(40) returns 0; the exact value is 4.2e-18)."""
    z = np.array([[30.0, -30.0]])
    layer = make(name, shape=(2,))
    mp = MPBackend(60)
    _, d64, _ = forward_backward(layer, FLOAT64, z)
    _, dmp, _ = forward_backward(layer, mp, z)
    exact = mp.to_numpy(dmp)
    nonzero = exact != 0
    assert np.all(np.abs(d64[nonzero] - exact[nonzero]) <= 8 * np.spacing(np.abs(exact[nonzero])))


def test_derivative_conventions_at_exactly_zero_follow_torch():
    """At z = 0: relu' = 0, leaky_relu' = slope, prelu' = a, elu' = α, selu' = λα; smooth ones
    take their value: sigmoid' = 1/4, tanh' = 1, gelu' = 1/2, scaled_sigmoid' = 1."""
    expected = {"relu": 0.0, "leaky_relu": 0.02, "prelu": 0.25, "elu": 1.3,
                "selu": 1.0507009873554805 * 1.6732632423543772, "sigmoid": 0.25, "tanh": 1.0,
                "gelu": 0.5, "scaled_sigmoid": 1.0, "identity": 1.0, "softplus": 0.5}
    for name, value in expected.items():
        _, dz, _ = forward_backward(make(name), FLOAT64, np.array([[0.0]]))
        assert dz[0, 0] == pytest.approx(value, rel=4e-16), name


def test_prelu_slope_gradient_sums_z_times_dy_over_negative_inputs_per_channel():
    """∂L/∂a_c = Σ_{n, z<=0} z·dy over the batch (and spatial positions) of channel c."""
    layer = make("prelu", shape=(3,), num_parameters=3)
    z = np.array([[-1.0, 2.0, -3.0], [-0.5, -2.0, 4.0]])
    dy = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    _, dz, grads = forward_backward(layer, FLOAT64, z, dy)
    assert np.array_equal(grads["weight"], [-1.0 * 1 + -0.5 * 4, -2.0 * 5, -3.0 * 3])
    assert np.array_equal(dz, [[0.25, 2.0, 0.75], [1.0, 1.25, 6.0]])


def test_selu_constants_are_the_fixed_point_of_mean_zero_unit_variance():
    """E[selu(z)] = 0 and E[selu(z)²] = 1 for z ~ N(0, 1), to the 30 digits the constants carry."""
    ctx = mpmath.MPContext()
    ctx.dps = 40
    lam = ctx.mpf("1.0507009873554804934193349852946")
    alpha = ctx.mpf("1.6732632423543772848170429916717")
    selu = lambda z: lam * (z if z > 0 else alpha * ctx.expm1(z))   # noqa: E731
    density = lambda z: ctx.exp(-z * z / 2) / ctx.sqrt(2 * ctx.pi)  # noqa: E731
    mean = ctx.quad(lambda z: selu(z) * density(z), [-ctx.inf, 0, ctx.inf])
    second = ctx.quad(lambda z: selu(z) ** 2 * density(z), [-ctx.inf, 0, ctx.inf])
    assert abs(mean) < 1e-29 and abs(second - 1) < 1e-29


def test_activation_options_are_validated():
    with pytest.raises(ValueError, match="slope"):
        make("leaky_relu", slope="steep")
    with pytest.raises(ValueError, match="unknown key"):
        make("relu", slope=0.1)
    with pytest.raises(ValueError, match="beta"):
        make("softplus", beta=0)
    with pytest.raises(ValueError, match="num_parameters"):
        make("prelu", shape=(4,), num_parameters=3)


TORCH_FUNCS = {
    "identity": lambda F, t: t, "sigmoid": lambda F, t: F.sigmoid(t),
    "tanh": lambda F, t: F.tanh(t), "relu": lambda F, t: F.relu(t),
    "leaky_relu": lambda F, t: F.leaky_relu(t, 0.02), "elu": lambda F, t: F.elu(t, 1.3),
    "selu": lambda F, t: F.selu(t), "gelu": lambda F, t: F.gelu(t),
    "softplus": lambda F, t: F.softplus(t, beta=2.0, threshold=15.0),
    "scaled_sigmoid": lambda F, t: 4 * F.sigmoid(t) - 2,
    # hardsigmoid is not here: torch's float64 backward multiplies by float32(1/6)
    # (test_more_activations.py pins it).
    "silu": lambda F, t: F.silu(t), "mish": lambda F, t: F.mish(t),
    "hardtanh": lambda F, t: F.hardtanh(t), "relu6": lambda F, t: F.relu6(t),
    "hardswish": lambda F, t: F.hardswish(t), "celu": lambda F, t: F.celu(t),
    "softsign": lambda F, t: F.softsign(t), "logsigmoid": lambda F, t: F.logsigmoid(t),
}


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("name", sorted(TORCH_FUNCS))
def test_values_and_derivatives_match_torch_float64(name):
    """On moderate inputs, refnet's f and f' equal torch's float64 ones to a few ulps of scale
    (torch's formulas differ, e.g. s(1 − s); both are accurate to a few ulps away from saturation;
    4 ulps of max(|value|, 1) covers both roundings)."""
    import torch
    import torch.nn.functional as F
    z = np.linspace(-6, 6, 241) + 1e-3          # avoid exactly 0 (a kink for some)
    t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    out = TORCH_FUNCS[name](F, t)
    out.backward(torch.ones_like(out))
    h, dz, _ = forward_backward(make(name, shape=(z.size,)), FLOAT64, z[None, :])
    tol = lambda ref: 4 * np.spacing(np.maximum(np.abs(ref), 1.0))   # noqa: E731
    ref_h, ref_d = out.detach().numpy(), t.grad.numpy()
    assert np.all(np.abs(h[0] - ref_h) <= tol(ref_h)), name
    assert np.all(np.abs(dz[0] - ref_d) <= tol(ref_d)), name


# --- softplus: torch's branch test, βz > threshold, on the product in the working precision ---
# Points an ulp from the kink where that test disagrees with another plausible one — the
# quotient test z > threshold/β (float64), or the product formed in float64 instead of float32
# (found by search): (β, threshold, z as hex, dtype, does fl(βz) > threshold hold in that dtype).
SOFTPLUS_EDGES = [
    (3.0, 1.0, "0x1.5555555555556p-2", "float64", False),   # z > 1/3, but 3z rounds to 1
    (1.7, 7.0, "0x1.0787878787879p+2", "float64", True),    # z < 7/1.7, but 1.7z rounds above 7
    (3.0, 1.0, "0x1.555556p-2", "float32", False),          # float32 3z is 1, float64 3z > 1
]


def other_rule(beta, threshold, z, dtype):
    """The rule each edge tells apart from torch's: float64 z > threshold/β; for float32, the
    product and comparison done in float64."""
    if dtype == "float64":
        return bool(np.float64(z) > threshold / beta)
    return bool(np.float64(z) * beta > threshold)


def softplus_at(bk, beta, threshold, z):
    layer = make("softplus", shape=(1,), beta=beta, threshold=threshold)
    h, dz, _ = forward_backward(layer, bk, np.array([[z]]))
    return float(bk.to_numpy(h)[0, 0]), float(bk.to_numpy(dz)[0, 0])


@pytest.mark.parametrize("beta, threshold, z_hex, dtype, linear", SOFTPLUS_EDGES)
def test_softplus_takes_the_linear_branch_exactly_where_beta_z_exceeds_threshold_in_its_dtype(
        beta, threshold, z_hex, dtype, linear):
    """At each edge the working-precision test fl(βz) > threshold and the other rule disagree
    (checked here, so the test can tell the two apart); refnet follows the first: h = z and
    f' = 1 exactly on the linear branch, h ≠ z and f' = σ(βz) < 0.99 on the smooth one
    (threshold ≤ 7: the branches are far apart)."""
    np_dtype = np.dtype(dtype).type
    z = np_dtype(float.fromhex(z_hex))
    assert bool(z * np_dtype(beta) > np_dtype(threshold)) == linear
    assert other_rule(beta, threshold, z, dtype) != linear
    bk = FLOAT64 if dtype == "float64" else FLOAT32
    h, d = softplus_at(bk, beta, threshold, float(z))
    if linear:
        assert h == float(z) and d == 1.0
    else:
        assert h != float(z) and d < 0.99


def test_softplus_in_mp_decides_by_its_own_product():
    """mp forms βz at its digits: at z = 0x1.5555555555556p-2, β = 3, threshold = 1 the exact
    product exceeds 1, so mp takes the linear branch where float64 (3z rounds to 1) does not: the
    two runs lie on different sides of the kink, which the kink signatures show."""
    z = float.fromhex("0x1.5555555555556p-2")
    h, d = softplus_at(MPBackend(40), 3.0, 1.0, z)
    assert h == z and d == 1.0
    layer = make("softplus", shape=(1,), beta=3.0, threshold=1.0)
    sides = [layer.kink_signature(layer.forward(bk, {}, bk.asarray(np.array([[z]])))[1])[0][0, 0]
             for bk in (FLOAT64, MPBackend(40))]
    assert sides == [False, True]


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("beta, threshold, z_hex, dtype, linear", SOFTPLUS_EDGES)
def test_softplus_matches_torch_forward_and_backward_at_the_kink_edges(beta, threshold, z_hex,
                                                                       dtype, linear):
    """Where the two rules disagree, refnet's value and derivative are torch's F.softplus (same
    dtype): the same branch, and on the smooth one the same function to 8 ulps (each side rounds
    exp, log1p and a division, or sigmoid's form, a few times; the branches differ by > 0.1)."""
    import torch
    import torch.nn.functional as F
    z = float(np.dtype(dtype).type(float.fromhex(z_hex)))
    t = torch.tensor([z], dtype=getattr(torch, dtype), requires_grad=True)
    out = F.softplus(t, beta=beta, threshold=threshold)
    out.backward(torch.ones_like(out))
    h, d = softplus_at(FLOAT64 if dtype == "float64" else FLOAT32, beta, threshold, z)
    spacing = lambda v: np.spacing(np.abs(np.dtype(dtype).type(v)))    # noqa: E731
    for ours, theirs in ((h, out.item()), (d, t.grad.item())):
        assert abs(ours - theirs) <= 8 * spacing(theirs), (ours, theirs)
    assert (t.grad.item() == 1.0) == linear


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@given(beta=st.floats(0.05, 20), threshold=st.floats(-3, 15), k=st.integers(-3, 3))
def test_softplus_branch_matches_torch_an_ulp_or_three_from_the_kink(beta, threshold, k):
    """z = threshold/β moved k ulps: refnet float64 takes torch's branch (torch's derivative is
    exactly 1 on its linear branch and σ(βz) ≤ σ(15 + ulps) < 1 − 3e-7 on its smooth one), and
    the value and derivative agree to 8 ulps, as above."""
    import torch
    import torch.nn.functional as F
    z = threshold / beta
    for _ in range(abs(k)):
        z = float(np.nextafter(z, np.inf if k > 0 else -np.inf))
    t = torch.tensor([z], dtype=torch.float64, requires_grad=True)
    out = F.softplus(t, beta=beta, threshold=threshold)
    out.backward(torch.ones_like(out))
    h, d = softplus_at(FLOAT64, beta, threshold, z)
    assert (d == 1.0) == (t.grad.item() == 1.0) == (z * beta > threshold)
    for ours, theirs in ((h, out.item()), (d, t.grad.item())):
        assert abs(ours - theirs) <= 8 * np.spacing(abs(theirs)), (z, ours, theirs)
