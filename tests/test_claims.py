"""Claims of shared/CLAIMS.md that the other test files do not already settle, one test each.
Verdicts and numbers: spec/claims.md. Sampling tolerances are derived in each docstring."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnet import FLOAT64, MPBackend
from refnet.layers.activations import ACTIVATIONS
from refnet.layers.dense import Dense
from refnet.model import Model
from refnet.study.grid import Config, measure


def activation(name, **options):
    return ACTIVATIONS[name]({"type": name, **options}, (1,), f"claims ({name})")


def derivative(name, z, bk):
    layer = activation(name)
    x = bk.asarray(np.array([z]))
    _, cache = layer.forward(bk, {}, x)
    dz, _ = layer.backward(bk, {}, bk.asarray(np.ones(1)), cache)
    return dz[0]


# --- backprop and the chain rule ------------------------------------------------------------
def test_claim1_weight_gradient_is_the_product_of_layer_jacobians_times_dh_dw():
    """Claim 1: ∂L/∂W_t = (∂L/∂h_L · J_L ⋯ J_{t+1}) ⊗ ∂h_t/∂W_t. For a 3-layer tanh MLP and one
    sample, the explicit Jacobian product (J_l = diag(tanh'(z_l))·W_l, formed as matrices at 50
    digits) gives the same ∂L/∂W_1 as refnet's backward to 45 digits."""
    spec = {"input_shape": [3], "seed": 3, "batch": 1, "loss": {"type": "mse"},
            "layers": [{"type": "dense", "out": 4}, {"type": "tanh"}, {"type": "dense", "out": 4},
                       {"type": "tanh"}, {"type": "dense", "out": 2}]}
    model = Model(spec)
    params, x, y = model.prepare()
    mp = MPBackend(50)
    ctx = mp.ctx
    g = model.loss_and_grads(mp, params, x, y)
    W = [ctx.matrix(params[f"{i}.weight"].tolist()) for i in (0, 2, 4)]
    b = [ctx.matrix(params[f"{i}.bias"].tolist()) for i in (0, 2, 4)]
    h0 = ctx.matrix(x[0].tolist())
    z1 = W[0] * h0 + b[0]
    h1 = z1.apply(ctx.tanh)
    z2 = W[1] * h1 + b[1]
    h2 = z2.apply(ctx.tanh)
    out = W[2] * h2 + b[2]
    dL_dout = (out - ctx.matrix(y[0].tolist())) * (ctx.mpf(2) / 2)        # mse mean over 2
    diag = lambda z: ctx.diag([1 - ctx.tanh(v) ** 2 for v in z])           # noqa: E731
    J2 = W[2] * diag(z2)                 # ∂out/∂z2 ... chain written as row-vector products
    J1 = W[1] * diag(z1)
    delta_z1 = (dL_dout.T * J2 * J1).T   # ∂L/∂z1, a column
    expected = delta_z1 * h0.T           # ⊗ ∂z1/∂W1 = h0
    got = g.params["0.weight"]
    for i in range(4):
        for j in range(3):
            assert abs(got[i, j] - expected[i, j]) <= ctx.mpf(10) ** -45 * abs(expected[i, j])


def test_claim2_dx_depends_on_dy_and_w_only_and_dw_on_dy_and_x_only():
    """Claim 2: a dense layer's dx = dy·W (its input x does not enter) and dW = dyᵀ·x (W does not
    enter): changing x leaves dx bit for bit unchanged, changing W leaves dW unchanged."""
    layer = Dense({"type": "dense", "out": 3}, (4,), "claim 2")
    rng = np.random.default_rng(0)
    p = layer.init_params(rng)
    x, dy = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))

    def back(params, inputs):
        _, cache = layer.forward(FLOAT64, params, inputs)
        return layer.backward(FLOAT64, params, dy, cache)
    dx1, g1 = back(p, x)
    dx2, _ = back(p, 3 * x + 1)
    _, g3 = back({**p, "weight": -2 * p["weight"]}, x)
    assert np.array_equal(dx1, dx2) and np.array_equal(g1["weight"], g3["weight"])
    assert np.array_equal(dx1, dy @ p["weight"]) and np.array_equal(g1["weight"], dy.T @ x)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu", "gelu", "elu", "selu", "softplus"])
def test_claim3_an_elementwise_activation_has_a_diagonal_jacobian(name):
    """Claim 3: perturbing z_j changes h_j alone — exactly (an elementwise op reads only its own
    input), so every off-diagonal Jacobian entry is exactly 0 (relu's diagonal is 0 for z < 0 too).
    """
    layer = ACTIVATIONS[name]({"type": name}, (6,), name)
    z = np.linspace(-2.5, 2.5, 6).reshape(1, 6)
    h, _ = layer.forward(FLOAT64, {}, z)
    for j in range(6):
        bumped = z.copy()
        bumped[0, j] += 1e-3
        hb, _ = layer.forward(FLOAT64, {}, bumped)
        changed = np.flatnonzero(hb != h)
        assert set(changed.tolist()) <= {j}            # off-diagonal: exactly 0
        if z[0, j] > 0:                                 # f' > 0 there for every one of these
            assert changed.tolist() == [j]


# --- vanishing and exploding ----------------------------------------------------------------
@given(st.floats(-700, 700, allow_nan=False).filter(lambda v: v != 0))
def test_claim4_sigmoid_derivative_is_below_a_quarter_and_tanh_derivative_below_one_except_at_0(z):
    """Claim 4: σ'(z) < 1/4 and tanh'(z) < 1 for z ≠ 0 (equality at 0). Near 0 the gap is
    z²/16 and z², so it is resolved with 2·|log10 z| + 30 digits — at 50 digits σ'(1e-300) would
    round to exactly 1/4."""
    dps = int(2 * abs(math.log10(abs(z)))) + 30
    mp = MPBackend(dps)
    assert derivative("sigmoid", z, mp) < mp.ctx.mpf(1) / 4
    assert derivative("tanh", z, mp) < 1
    mp50 = MPBackend(50)
    assert derivative("sigmoid", 0.0, mp50) == mp50.ctx.mpf(1) / 4
    assert derivative("tanh", 0.0, mp50) == 1


def test_claim5_in_a_4_layer_sigmoid_net_the_first_bias_gradient_is_smaller_than_the_third():
    """Claim 5 (Nielsen's 4-layer sigmoid net, width 30, N(0, 1) weights and biases, mse): over 50
    seeds ‖∂C/∂b1‖ < ‖∂C/∂b3‖ every time; the ratio lies in [0.13, 0.36] (median 0.23), about
    0.48 per layer. The stated reason is over-simplified — a third of N(0, 1) weights exceed 1 —
    the per-layer factor is ‖W diag σ'‖, which the product of 30 terms makes ≈ 0.5."""
    ratios = []
    for seed in range(50):
        layers = []
        for _ in range(4):
            layers += [{"type": "dense", "out": 30, "init": {"name": "normal", "std": 1.0},
                        "bias_init": {"name": "normal", "std": 1.0}}, {"type": "sigmoid"}]
        layers.append({"type": "dense", "out": 10, "init": {"name": "normal", "std": 1.0},
                       "bias_init": {"name": "normal", "std": 1.0}})
        model = Model({"input_shape": [30], "seed": seed, "batch": 16, "layers": layers,
                       "loss": {"type": "mse"}})
        params, x, y = model.prepare()
        g = model.loss_and_grads(FLOAT64, params, x, y)
        ratios.append(np.linalg.norm(g.params["0.bias"]) / np.linalg.norm(g.params["4.bias"]))
    assert max(ratios) < 1 and 0.1 < float(np.median(ratios)) < 0.4


def test_claim6_products_of_factors_explode_and_sums_do_not():
    """Claim 6: 1.5¹⁰⁰ = 4.0656e17 (exact: 3¹⁰⁰/2¹⁰⁰); a chain of 100 scalar layers of weight 1.5
    has exactly that input gradient (float64, within 100 roundings of it); 100 terms of 1.5 sum
    to 150."""
    exact = Fraction(3, 2) ** 100
    assert f"{float(exact):.4e}" == "4.0656e+17"
    layers = [{"type": "dense", "out": 1, "bias": False, "init": {"name": "constant", "val": 1.5}}
              for _ in range(100)]
    model = Model({"input_shape": [1], "batch": 1, "layers": layers, "loss": {"type": "mse"}})
    params, _, _ = model.prepare()
    x, y = np.array([[1.0]]), np.array([[0.0]])
    g = model.loss_and_grads(FLOAT64, params, x, y)
    # L = (1.5¹⁰⁰·x)², dL/dx = 2·1.5²⁰⁰·x; every step of 1.5 is exact up to 1.5^k ≤ 2^53·... so
    # the float64 result is within 200 roundings of the exact value
    expected = 2 * exact ** 2
    assert abs(Fraction(float(g.x[0, 0])) - expected) <= 200 * 2.0 ** -53 * expected
    assert sum([1.5] * 100) == 150.0


def test_claim7_small_normal_init_trains_a_shallow_relu_net_but_vanishes_in_a_deep_one():
    """Claim 7: N(0, 0.01) works for a small net, not a deep one. relu, width 32: healthy at depth
    3, vanishing at depth 12 (every weight-gradient norm below 1e-6: the forward signal shrinks by
    0.01·√(32/2) = 0.04 per layer). For sigmoid it fails already at depth 3 (first/last 6e-6)."""
    assert measure(Config("relu", "normal-0.01", 3, "plain"), ("float64",), False)[0].verdict \
        == "healthy"
    deep = measure(Config("relu", "normal-0.01", 12, "plain"), ("float64",), False)[0]
    assert deep.verdict == "vanishing" and max(deep.grad_norms) < 1e-6
    assert measure(Config("sigmoid", "normal-0.01", 3, "plain"), ("float64",), False)[0].verdict \
        == "vanishing"


def test_claim8_normalization_is_what_keeps_an_exploding_init_in_check():
    """Claim 8 ("explosion is rare because outputs are normalized") holds only where something
    normalizes: relu + N(0, 1), depth 12, explodes plain (norms to 5e7) and is healthy with
    BatchNorm."""
    plain = measure(Config("relu", "normal-1", 12, "plain"), ("float64",), False)[0]
    bn = measure(Config("relu", "normal-1", 12, "batchnorm"), ("float64",), False)[0]
    assert plain.verdict == "exploding" and max(plain.grad_norms) > 1e6
    assert bn.verdict == "healthy"


def test_claim9_inf_comes_first_from_overflow_then_nan_from_inf_minus_inf():
    """Claim 9: in fp16 the 8-layer N(0, 1) ReLU net overflows to inf at the 5th Linear (layer 8);
    the next Linear multiplies inf by weights of both signs and sums them: inf − inf = NaN first
    appears there (layer 10). The non-finite values come from the forward activations, not from
    a gradient: "most likely exploding gradients" is qualified."""
    from refnet.lowp.emulation import Precision, run
    from refnet.study.presets import preset
    model = Model(preset("relu-normal1"))
    params, x, y = model.prepare()
    r = run(model, Precision("fp16"), params, x, y)
    first_inf = first_nan = None
    for name, kind, out in r.outputs:
        v = np.asarray(out, dtype=np.float64)
        if first_inf is None and np.isinf(v).any():
            first_inf = name
        if first_nan is None and np.isnan(v).any():
            first_nan = name
    assert (first_inf, first_nan) == ("8", "10")


# --- initialization and activations ---------------------------------------------------------
def linear_chain(depth, width, std, batch, seed=0):
    layers = [{"type": "dense", "out": width, "bias": False, "init": {"name": "normal", "std": std}}
              for _ in range(depth)]
    model = Model({"input_shape": [width], "seed": seed, "batch": batch, "layers": layers,
                   "loss": {"type": "mse"}})
    params, x, y = model.prepare()
    state = model.default_state()
    state.outputs = []
    model.forward(FLOAT64, params, x, y, state)
    return model, params, x, [np.asarray(o) for _, _, o in state.outputs]


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_claim15_linear_layers_scale_the_variance_by_n_gamma(gain):
    """Claim 15: with Var[w] = γ, Var[h_t] = n·γ·Var[h_{t−1}]. Width n = 256, batch 1024, γ =
    gain/n: each of 4 layers multiplies the variance by `gain`. Tolerance: the factor is
    mean_i ‖w_i‖²/γn (relative sd √(2/n²) ≈ 0.6 %) times a sample variance (relative sd
    √(2/(batch·n)) ≈ 0.3 %): 5 combined sd ≈ 3.5 %, so 4 %."""
    n = 256
    _, _, x, outs = linear_chain(4, n, math.sqrt(gain / n), 1024)
    variances = [np.var(x)] + [np.var(h) for h in outs]
    for before, after in zip(variances, variances[1:]):
        assert after / before == pytest.approx(gain, rel=0.04)


def test_claim17_kaiming_keeps_relu_variance_over_50_layers_and_xavier_halves_it():
    """Claim 17: relu, width 256, batch 256, 50 layers. With Var[w] = 2/n the pre-activation
    variance after 50 layers stays within a factor 4 of the first layer's (a random walk in log
    variance: per-layer sd ≈ √(5/n) ≈ 14 %, ≈ 1 over 50 layers in log, 4 ≈ e^1.4); with Xavier
    (1/n here, fan_in = fan_out) it halves per layer: log2 ratio ≈ −49 ± 3."""
    n, depth = 256, 50
    def pre_activation_variances(std):
        layers = []
        for _ in range(depth):
            layers += [{"type": "dense", "out": n, "bias": False,
                        "init": {"name": "normal", "std": std}}, {"type": "relu"}]
        model = Model({"input_shape": [n], "seed": 1, "batch": 256, "layers": layers,
                       "loss": {"type": "mse"}})
        params, x, y = model.prepare()
        state = model.default_state()
        state.outputs = []
        model.forward(FLOAT64, params, x, y, state)
        return [np.var(np.asarray(o)) for name, kind, o in state.outputs if kind == "dense"]
    kaiming = pre_activation_variances(math.sqrt(2 / n))
    assert 0.25 < kaiming[-1] / kaiming[0] < 4
    xavier = pre_activation_variances(math.sqrt(1 / n))
    assert -52 < math.log2(xavier[-1] / xavier[0]) < -46


def test_claim18_tanh_relu_and_4_sigmoid_minus_2_look_like_identity_at_0_sigmoid_does_not():
    """Claim 18: f(0) = 0 and f'(0) = 1 for tanh, relu (for x > 0: slope 1, exactly) and
    4σ(x) − 2 (scaled_sigmoid); sigmoid has σ(0) = 1/2, σ'(0) = 1/4. Exact at 50 digits."""
    mp = MPBackend(50)
    for name in ("tanh", "scaled_sigmoid"):
        layer = activation(name)
        h, cache = layer.forward(mp, {}, mp.asarray(np.array([0.0])))
        assert h[0] == 0 and derivative(name, 0.0, mp) == 1
    assert derivative("relu", 1e-300, mp) == 1
    h, _ = activation("sigmoid").forward(mp, {}, mp.asarray(np.array([0.0])))
    assert h[0] == mp.ctx.mpf(1) / 2 and derivative("sigmoid", 0.0, mp) == mp.ctx.mpf(1) / 4


def test_claims19_20_relu_reduces_vanishing_but_neither_removes_it_nor_prevents_explosion():
    """Claim 19 is over-stated, claim 20 holds: at depth 12 with Xavier, sigmoid vanishes
    (first/last < 1e-3) and relu is healthy; but relu still vanishes with N(0, 0.01) and explodes
    with N(0, 1)."""
    v = lambda a, i: measure(Config(a, i, 12, "plain"), ("float64",), False)[0].verdict  # noqa
    assert v("sigmoid", "xavier") == "vanishing" and v("relu", "xavier") == "healthy"
    assert v("relu", "normal-0.01") == "vanishing" and v("relu", "normal-1") == "exploding"


def test_claim22_relu_output_is_not_zero_centred_and_elu_is_nearer_zero():
    """Claims 21 (ELU part) and 22: for z ~ N(0, 1), E[relu(z)] = 1/√(2π) = 0.3989 and E[elu(z)] =
    1/√(2π) + e^{1/2}Φ(−1) − 1/2 = 0.1605. Sample of 10⁶: standard errors 0.0006 and 0.0007
    (Var relu = 1/2 − 1/(2π)); 5 of them."""
    z = np.random.default_rng(0).standard_normal(10 ** 6)
    relu_mean = float(np.mean(np.maximum(z, 0)))
    elu_mean = float(np.mean(np.where(z > 0, z, np.expm1(np.minimum(z, 0)))))
    assert relu_mean == pytest.approx(1 / math.sqrt(2 * math.pi), abs=5 * 0.0006)
    phi = 0.5 * math.erfc(1 / math.sqrt(2))
    assert elu_mean == pytest.approx(1 / math.sqrt(2 * math.pi) + math.exp(0.5) * phi - 0.5,
                                     abs=5 * 0.0007)
    assert abs(elu_mean) < relu_mean / 2


# --- remedies ---------------------------------------------------------------------------------
def test_claim25_batchnorm_keeps_sigmoid_pre_activations_out_of_saturation():
    """Claim 25: sigmoid + N(0, 1) at depth 12 saturates (z ~ N(0, 32·Var h): 5–10 % of outputs
    outside [0.001, 0.999]); with BatchNorm before each sigmoid, z has unit variance and
    saturation (|z| > 6.9) is a < 1e-9 event: none."""
    plain = measure(Config("sigmoid", "normal-1", 12, "plain"), ("float64",), False)[0]
    bn = measure(Config("sigmoid", "normal-1", 12, "batchnorm"), ("float64",), False)[0]
    assert plain.saturated > 0.03 and bn.saturated == 0.0


def test_claim26_the_residual_identity_path_carries_the_gradient_but_only_mitigates():
    """Claim 26: sigmoid + N(0, 0.01) at depth 12: plain first/last ≈ 1e-22, residual ≈ 1e-3..1
    (the identity path: ∂(h + f(h))/∂h = 1 + f'); but a residual net with an exploding init
    (relu + N(0, 1)) still explodes: it mitigates vanishing, it does not solve explosion."""
    plain = measure(Config("sigmoid", "normal-0.01", 12, "plain"), ("float64",), False)[0]
    res = measure(Config("sigmoid", "normal-0.01", 12, "residual"), ("float64",), False)[0]
    assert plain.ratio < 1e-20 and res.ratio > 1e-4
    assert measure(Config("relu", "normal-1", 12, "residual"), ("float64",), False)[0].verdict \
        == "exploding"
