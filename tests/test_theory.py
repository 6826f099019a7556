"""Theory as tests: the statements of shared/THEORY.md, numbered as there, checked on refnet's own
layers and initializers. Exact statements are checked at high precision or with a rounding
tolerance; statistical ones with a band of 5 standard errors estimated from the sample itself
(false alarm ≈ 6e-7 per test), on many small seeded networks rather than one wide one."""

import math
from itertools import combinations

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refnet import FLOAT64, MPBackend
from refnet.init import initialize
from refnet.layers.activations import ACTIVATIONS
from refnet.layers.base import ForwardState
from refnet.layers.dropout import Dropout
from refnet.model import Model

Z5 = 5.0                      # standard errors in every statistical band


def act(name, n=1, **options):
    return ACTIVATIONS[name]({"type": name, **options}, (n,), f"theory ({name})")


def deriv(name, z, bk, **options):
    layer = act(name, **options)
    params = {k: bk.asarray(v) for k, v in layer.init_params(np.random.default_rng(0)).items()}
    _, cache = layer.forward(bk, params, bk.asarray(np.array([z])))
    dz, _ = layer.backward(bk, params, bk.asarray(np.ones(1)), cache)
    return dz[0]


def mean_band(samples):
    """(mean, 5 standard errors) of a sample."""
    samples = np.asarray(samples, dtype=np.float64)
    return float(samples.mean()), Z5 * float(samples.std(ddof=1)) / math.sqrt(samples.size)


# --- 2. derivative bounds (exact) -----------------------------------------------------------
@given(st.floats(-300, 300, allow_nan=False))
def test_2_tanh_derivative_is_four_times_sigmoid_derivative_at_twice_the_argument(z):
    """tanh'(z) = 4σ'(2z) (tanh z = 2σ(2z) − 1): equal to 45 of 50 digits."""
    mp = MPBackend(50)
    a, b = deriv("tanh", z, mp), 4 * deriv("sigmoid", 2 * z, mp)
    assert abs(a - b) <= mp.ctx.mpf(10) ** -45 * abs(a)


def test_2_gelu_derivative_lies_in_its_range_with_extremes_at_minus_and_plus_root_2():
    """GELU'(z) = Φ(z) + zφ(z); GELU'' = φ(z)(2 − z²) vanishes at ±√2, so the extremes are
    GELU'(∓√2) = Φ(∓√2) ∓ √2φ(√2) = −0.1289042 and 1.1289042 (they sum to 1); GELU'(0) = 1/2.
    A grid of 20 001 points on [−10, 10] stays inside, within 1e-15 of the extremes."""
    ctx = mpmath.MPContext()
    ctx.dps = 30
    r2 = ctx.sqrt(2)
    phi = ctx.exp(-1) / ctx.sqrt(2 * ctx.pi)
    low = ctx.ncdf(-r2) - r2 * phi
    high = ctx.ncdf(r2) + r2 * phi
    assert abs(float(low) + 0.1289042) < 1e-7 and abs(float(high) - 1.1289042) < 1e-7
    layer = act("gelu", 20001)
    z = np.linspace(-10, 10, 20001).reshape(1, -1)
    _, cache = layer.forward(FLOAT64, {}, z)
    d, _ = layer.backward(FLOAT64, {}, np.ones_like(z), cache)
    assert d.min() >= float(low) - 1e-15 and d.max() <= float(high) + 1e-15
    assert d[0, 10000] == 0.5
    mp = MPBackend(50)
    assert abs(deriv("gelu", float(-r2), mp) - low) < 1e-14             # √2 rounded to float64


@given(st.floats(-700, 50, allow_nan=False))
def test_2_selu_derivative_is_at_most_lambda_alpha(z):
    """SELU'(z) = λαe^z for z ≤ 0 and λ for z > 0: never above λα = 1.7580993408473766."""
    mp = MPBackend(50)
    lam_alpha = mp.const("1.0507009873554804934193349852946") * mp.const(
        "1.6732632423543772848170429916717")
    assert deriv("selu", z, mp) <= lam_alpha
    assert abs(float(lam_alpha) - 1.7580993408473766) < 1e-15


# --- 3. the chain bound (exact) -------------------------------------------------------------
def jacobian(model, params, x):
    """∂h_L/∂h_0 of a one-sample network, by backpropagating each output unit."""
    state = ForwardState(train=False)
    out, caches = model.net.forward(FLOAT64, params, x, state)
    rows = []
    for k in range(out.shape[1]):
        dy = np.zeros_like(out)
        dy[0, k] = 1.0
        dx, _ = model.net.backward(FLOAT64, params, dy, caches)
        rows.append(dx[0])
    return np.array(rows)


@settings(max_examples=30)
@given(st.integers(0, 2 ** 31), st.sampled_from([("tanh", 1.0), ("sigmoid", 0.25)]))
def test_3_jacobian_norm_is_at_most_the_product_of_weight_norms_times_gamma_to_the_depth(
        seed, activation_gamma):
    """Pascanu et al. 2013: ‖∂h_L/∂h_0‖₂ ≤ ∏‖W_t‖₂·γ^L, γ = 1 for tanh and 1/4 for sigmoid
    (h_t = act(W_t h_{t−1} + b_t), L = 4, width 6, weights N(0, 1)). Exact up to the rounding of
    both sides (1e-12 relative)."""
    name, gamma = activation_gamma
    layers = []
    for _ in range(4):
        layers += [{"type": "dense", "out": 6, "init": {"name": "normal", "std": 1.0}},
                   {"type": name}]
    model = Model({"input_shape": [6], "seed": seed, "batch": 1, "layers": layers,
                   "loss": {"type": "mse"}})
    params, x, _ = model.prepare()
    norm = np.linalg.norm(jacobian(model, params, x), 2)
    bound = math.prod(np.linalg.norm(params[f"{2 * t}.weight"], 2) for t in range(4)) * gamma ** 4
    assert norm <= bound * (1 + 1e-12)


# --- 6. orthogonal init (exact) -------------------------------------------------------------
@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_6_orthogonal_init_gives_wtw_g2_i_and_a_linear_chain_keeps_every_singular_value(gain):
    """WᵀW = g²I to rounding (n·u·g², n = 64), and a chain of 10 orthogonal layers (gain 1)
    has all singular values 1 within 10·n·u."""
    rng = np.random.default_rng(0)
    n, u = 64, 2.0 ** -53
    w = initialize({"name": "orthogonal", "gain": gain}, (n, n), rng)
    assert np.max(np.abs(w.T @ w - gain ** 2 * np.eye(n))) <= n * u * gain ** 2 * 4
    chain = np.eye(n)
    for _ in range(10):
        chain = initialize("orthogonal", (n, n), rng) @ chain
    s = np.linalg.svd(chain, compute_uv=False)
    assert np.max(np.abs(s - 1)) <= 10 * n * u * 4


# --- 7. positive homogeneity (exact) ---------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "prelu", "identity"])
def test_7_zero_bias_piecewise_linear_nets_are_positively_homogeneous(activation):
    """For f with zero biases and positively homogeneous activations: J(x)·x = f(x), and
    ⟨W_l, ∂f_k/∂W_l⟩ = f_k for every layer l and output k; per hidden unit, the incoming and
    outgoing ⟨W, ∇W⟩ are equal (Du et al. 2018). Checked at 50 digits: equal to 40."""
    layers = []
    for _ in range(3):
        layers += [{"type": "dense", "out": 5, "bias": False, "init": "kaiming_normal"},
                   {"type": activation}]
    layers.append({"type": "dense", "out": 2, "bias": False, "init": "kaiming_normal"})
    model = Model({"input_shape": [4], "seed": 5, "batch": 1, "layers": layers,
                   "loss": {"type": "mse"}})
    params, x, _ = model.prepare()
    mp = MPBackend(50)
    tensors = {k: mp.asarray(v) for k, v in params.items()}
    out, caches = model.net.forward(mp, tensors, mp.asarray(x), ForwardState(train=False))
    tol = mp.ctx.mpf(10) ** -40
    weights = [k for k in params if k.endswith("weight") and params[k].ndim == 2]
    for k in range(2):
        dy = np.zeros((1, 2), dtype=object)
        dy[:] = mp.ctx.zero
        dy[0, k] = mp.ctx.one
        dx, grads = model.net.backward(mp, tensors, dy, caches)
        f = out[0, k]
        assert abs(mp.sum(dx * tensors_x(mp, x)) - f) <= tol * (abs(f) + 1)
        for name in weights:
            assert abs(mp.sum(grads[name] * tensors[name]) - f) <= tol * (abs(f) + 1)
        for j in range(len(weights) - 1):
            w_in, w_out = weights[j], weights[j + 1]
            incoming = mp.sum(grads[w_in] * tensors[w_in], axis=1)
            outgoing = mp.sum(grads[w_out] * tensors[w_out], axis=0)
            # holds for PReLU too: prelu is positively homogeneous, so scaling a unit's
            # incoming weights by λ > 0 and its outgoing ones by 1/λ leaves f unchanged
            assert all(abs(a - b) <= tol * (abs(f) + 1) for a, b in zip(incoming, outgoing))


def tensors_x(mp, x):
    return mp.asarray(x)


# --- 8. residual paths (exact) --------------------------------------------------------------
def test_8_a_linear_residual_chain_is_the_sum_over_all_2_to_the_n_paths():
    """∏(I + A_i) = Σ over the 2ⁿ subsets S of ∏_{i∈S} A_i (in order): n = 4 linear residual
    blocks (body: one bias-free dense layer), Jacobian by refnet's backward at 50 digits against
    the 16 paths summed; and the number of paths of length k is C(n, k) (Bin(n, 1/2) × 2ⁿ)."""
    n, d = 4, 3
    blocks = [{"type": "residual", "body": [{"type": "dense", "out": d, "bias": False,
                                             "init": {"name": "normal", "std": 0.5}}]}
              for _ in range(n)]
    model = Model({"input_shape": [d], "seed": 9, "batch": 1, "layers": blocks,
                   "loss": {"type": "mse"}})
    params, x, _ = model.prepare()
    ctx = mpmath.MPContext()
    ctx.dps = 50
    A = [ctx.matrix(params[f"{i}.body.0.weight"].tolist()) for i in range(n)]
    total = ctx.zeros(d, d)
    lengths = []
    for k in range(n + 1):
        for subset in combinations(range(n), k):
            term = ctx.eye(d)
            for i in subset:
                term = A[i] * term
            total += term
            lengths.append(k)
    mp = MPBackend(50)
    tensors = {k: mp.asarray(v) for k, v in params.items()}
    _, caches = model.net.forward(mp, tensors, mp.asarray(x), ForwardState(train=False))
    for row in range(d):
        dy = np.full((1, d), mp.ctx.zero, dtype=object)
        dy[0, row] = mp.ctx.one
        dx, _ = model.net.backward(mp, tensors, dy, caches)
        for col in range(d):
            assert abs(dx[0, col] - total[row, col]) <= mp.ctx.mpf(10) ** -45
    assert [lengths.count(k) for k in range(n + 1)] == [math.comb(n, k) for k in range(n + 1)]


# --- 10. zero and constant init (exact) -----------------------------------------------------
@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
def test_10_with_zero_init_only_the_output_bias_gets_a_gradient(activation):
    layers = []
    for _ in range(3):
        layers += [{"type": "dense", "out": 5, "init": "zeros", "bias_init": "zeros"},
                   {"type": activation}]
    layers.append({"type": "dense", "out": 3, "init": "zeros", "bias_init": "zeros"})
    model = Model({"input_shape": [4], "seed": 1, "batch": 6, "layers": layers,
                   "loss": {"type": "softmax_cross_entropy"}})
    params, x, y = model.prepare()
    g = model.loss_and_grads(FLOAT64, params, x, y)
    last_bias = list(g.params)[-1]
    assert np.any(g.params[last_bias] != 0)
    assert all(np.all(v == 0) for k, v in g.params.items() if k != last_bias)


def test_10_with_constant_init_the_units_of_a_layer_stay_identical_through_training():
    """With every weight of the network constant, the units of a hidden layer compute the same
    function and get the same gradient, so after 20 full-batch SGD steps they are still
    identical (to rounding: BLAS may order a row's sum differently, 1e-14 relative)."""
    from refnet.training.loop import train
    from refnet.training.optim import make_optimizer
    layers = [{"type": "dense", "out": 6, "init": {"name": "constant", "val": 0.3},
               "bias_init": {"name": "constant", "val": 0.1}}, {"type": "tanh"},
              {"type": "dense", "out": 6, "init": {"name": "constant", "val": -0.2},
               "bias_init": "zeros"}, {"type": "tanh"},
              {"type": "dense", "out": 3, "init": {"name": "constant", "val": 0.15}}]
    model = Model({"input_shape": [4], "seed": 2, "batch": 8, "layers": layers,
                   "loss": {"type": "softmax_cross_entropy"}})
    result = train(model, None, None, None, make_optimizer("sgd", 0.5), 20)
    for name in ("0.weight", "2.weight", "4.weight"):
        # hidden units are the rows of their incoming weight and the columns of the outgoing
        w = result.params[name]
        units = [w.T] if name == "4.weight" else [w] + ([w.T] if name == "2.weight" else [])
        for m in units:
            assert np.max(np.abs(m - m[0])) <= 1e-14 * np.max(np.abs(m)), name
        assert np.max(np.abs(w - model.init_params()[name])) > 1e-3       # it did train


# --- 13. the He law (statistical and exact) ---------------------------------------------------
CHUNK = 2000                  # nets drawn at a time (memory: CHUNK·n² weights per layer)


def second_moment_ratios(n, depth, seeds, init, activation="relu", rng=None, **act_options):
    """M_L/M_0 (M = ‖h‖²/n, h post-activation) of `seeds` independent zero-bias nets, one
    input each, weights from refnet's initializer, activations by refnet's layer."""
    rng = np.random.default_rng(0) if rng is None else rng
    layer = act(activation, n, **act_options)
    params = {k: np.asarray(v) for k, v in layer.init_params(rng).items()}
    out = []
    for start in range(0, seeds, CHUNK):
        count = min(CHUNK, seeds - start)
        h = rng.standard_normal((count, n))
        m0 = np.mean(h * h, axis=1)
        for _ in range(depth):
            w = initialize(init, (count * n, n), rng).reshape(count, n, n)   # fan_in = n
            h, _ = layer.forward(FLOAT64, params, np.einsum("sij,sj->si", w, h))
        out.append(np.mean(h * h, axis=1) / m0)
    return np.concatenate(out)


def test_13_kaiming_keeps_the_mean_second_moment_of_relu_nets():
    """E[M_L/M_0] = (n·Var w/2)^L = 1 for Kaiming (n = 16, L = 10, 20 000 nets)."""
    mean, band = mean_band(second_moment_ratios(16, 10, 20000, "kaiming_normal"))
    assert abs(mean - 1) <= band, (mean, band)


def test_13_xavier_halves_it_per_relu_layer():
    """Xavier on square layers is Var w = 1/n (kaiming with gain 1): E[M_L/M_0] = 2^−L."""
    ratios = second_moment_ratios(16, 10, 20000, {"name": "kaiming_normal",
                                                   "nonlinearity": "linear"})
    mean, band = mean_band(ratios)
    assert abs(mean - 2.0 ** -10) <= band


def test_13_prelu_with_matched_gain_keeps_it():
    """PReLU with slope a: E[prelu(z)²] = (1 + a²)/2·E[z²], so Var w = 2/((1 + a²)n) keeps
    E[M_L/M_0] = 1 (a = 0.25, kaiming_normal with nonlinearity leaky_relu and a)."""
    ratios = second_moment_ratios(16, 10, 20000, {"name": "kaiming_normal",
                                                   "nonlinearity": "leaky_relu", "a": 0.25},
                                  activation="prelu")
    mean, band = mean_band(ratios)
    assert abs(mean - 1) <= band


def test_13_the_exact_log_law_of_kaiming_relu_nets():
    """M_j = M_{j−1}·2χ²_K/n with K ~ Bin(n, 1/2) live units, so E[log M_L/M_0 | no layer dies] =
    L·Σ_{k≥1} P(K = k | K ≥ 1)·(log(4/n) + ψ(k/2)) (E log χ²_k = ψ(k/2) + log 2): −1.764 for
    n = 16, L = 10. Measured on 20 000 nets (the ~3 whose signal dies are excluded, as the
    conditioning says)."""
    n, depth = 16, 10
    ctx = mpmath.MPContext()
    ctx.dps = 30
    alive = 1 - ctx.mpf(2) ** -n
    per_layer = sum(ctx.binomial(n, k) / ctx.mpf(2) ** n / alive * (ctx.log(ctx.mpf(4) / n) +
                                                                     ctx.digamma(ctx.mpf(k) / 2))
                    for k in range(1, n + 1))
    exact = float(depth * per_layer)
    assert abs(exact - (-1.764)) < 5e-4
    ratios = second_moment_ratios(n, depth, 20000, "kaiming_normal")
    mean, band = mean_band(np.log(ratios[ratios > 0]))
    assert abs(mean - exact) <= band, (mean, exact, band)


# --- 14. Glorot's linear-net observations (statistical) --------------------------------------
def backward_second_moment_ratios(n, depth, seeds, init, rng):
    """‖δ_0‖²/‖δ_L‖² of linear nets (δ = ∂L/∂h): backprop multiplies by Wᵀ."""
    delta = rng.standard_normal((seeds, n))
    d0 = np.sum(delta * delta, axis=1)
    for _ in range(depth):
        w = initialize(init, (seeds * n, n), rng).reshape(seeds, n, n)
        delta = np.einsum("sij,si->sj", w, delta)
    return np.sum(delta * delta, axis=1) / d0


def test_14_torch_default_uniform_init_shrinks_linear_backward_variance_by_3_per_layer():
    """U(±1/√n) (torch's default nn.Linear init) has Var w = 1/(3n): a linear net's backward
    second moment is multiplied by n·Var w = 1/3 per layer (n = 16, 10 layers: 3^−10)."""
    rng = np.random.default_rng(1)
    ratios = backward_second_moment_ratios(16, 10, 20000, "torch_default", rng)
    mean, band = mean_band(ratios * 3 ** 10)
    assert abs(mean - 1) <= band


def test_14_with_glorot_init_the_weight_gradients_are_equal_in_size_across_layers():
    """Square linear layers with Glorot (Var w = 1/n both ways) and an upstream gradient dy
    independent of the forward pass (Glorot's assumption): δ_l depends only on the layers above
    l, h_{l−1} only on those below, so E‖∂L/∂W_l‖² = E‖δ_l‖²·E‖h_{l−1}‖² = n·n = 64 for every
    layer (x, dy ~ N(0, I), n = 8, depth 6, 2 000 nets)."""
    n, depth, nets = 8, 6, 2000
    layers = [{"type": "dense", "out": n, "bias": False, "init": "xavier_normal"}
              for _ in range(depth)]
    rng = np.random.default_rng(7)
    per_layer = []
    for seed in range(nets):
        model = Model({"input_shape": [n], "seed": seed, "batch": 1, "layers": layers,
                       "loss": {"type": "mse"}})
        params, x, _ = model.prepare()
        _, caches = model.net.forward(FLOAT64, params, x, ForwardState(train=False))
        _, grads = model.net.backward(FLOAT64, params, rng.standard_normal((1, n)), caches)
        per_layer.append([np.sum(grads[f"{k}.weight"] ** 2) for k in range(depth)])
    for column in np.array(per_layer).T:
        mean, band = mean_band(column)
        assert abs(mean - n * n) <= band, (mean, band)


# --- 17. dying ReLU (statistical) -------------------------------------------------------------
@pytest.mark.parametrize("depth, measured", [(2, 0.438), (5, 0.763), (10, 0.944), (20, 0.997)])
def test_17_a_narrow_relu_net_dies_with_probability_1_minus_1_minus_2_to_minus_n_to_the_l(
        depth, measured):
    """Zero bias, symmetric weights, width N = 2, one input x ≠ 0: each layer kills the signal
    independently with probability 2^−N = 1/4 (both pre-activations negative), so P(dead) =
    1 − (3/4)^L, whatever the weight scale. 20 000 nets: binomial 5 SE band."""
    seeds, n = 20000, 2
    rng = np.random.default_rng(depth)
    layer = act("relu", n)
    h = rng.standard_normal((seeds, n))
    for _ in range(depth):
        w = initialize({"name": "normal", "std": 3.0}, (seeds * n, n), rng).reshape(seeds, n, n)
        h, _ = layer.forward(FLOAT64, {}, np.einsum("sij,sj->si", w, h))
    dead = np.mean(np.all(h == 0, axis=1))
    p = 1 - 0.75 ** depth
    assert abs(dead - p) <= Z5 * math.sqrt(p * (1 - p) / seeds)
    assert abs(measured - p) < 0.01


# --- 18. residual scaling (statistical) -------------------------------------------------------
@pytest.mark.slow
def test_18_scaled_relu_residual_blocks_grow_the_signal_by_1_plus_eta_squared_per_block():
    """x ← x + η·W₂relu(W₁x), W₁ ~ N(0, 2/n), W₂ ~ N(0, 1/n): E‖x_L‖²/‖x_0‖² = (1 + η²)^L;
    η = 1/√20, L = 20: 2.653. 20 000 nets of width 16 (refnet's initializers and relu; the block
    itself is checked against refnet's residual layer on the first net)."""
    n, depth, eta, seeds = 16, 20, 1 / math.sqrt(20), 20000
    rng = np.random.default_rng(18)
    relu = act("relu", n)
    x0 = rng.standard_normal((seeds, n))
    x = x0
    first_net = []
    for _ in range(depth):
        w1 = initialize({"name": "kaiming_normal", "nonlinearity": "relu"}, (seeds * n, n),
                        rng).reshape(seeds, n, n)
        w2 = initialize({"name": "kaiming_normal", "nonlinearity": "linear"}, (seeds * n, n),
                        rng).reshape(seeds, n, n)
        first_net.append((w1[0], w2[0]))
        hidden, _ = relu.forward(FLOAT64, {}, np.einsum("sij,sj->si", w1, x))
        x = x + eta * np.einsum("sij,sj->si", w2, hidden)
    ratios = np.sum(x * x, axis=1) / np.sum(x0 * x0, axis=1)
    mean, band = mean_band(ratios)
    assert abs(mean - (1 + eta ** 2) ** depth) <= band, (mean, band)
    block = {"type": "residual", "scale": eta, "body": [
        {"type": "dense", "out": n, "bias": False}, {"type": "relu"},
        {"type": "dense", "out": n, "bias": False}]}
    model = Model({"input_shape": [n], "batch": 1, "layers": [block] * depth,
                   "loss": {"type": "mse"}})
    params = {f"{i}.body.{j}.weight": w for i, (w1, w2) in enumerate(first_net)
              for j, w in ((0, w1), (2, w2))}
    out, _ = model.net.forward(FLOAT64, params, x0[:1], ForwardState(train=False))
    np.testing.assert_allclose(out[0], x[0], rtol=1e-12, atol=1e-12)


# --- 20. dropout moments (statistical) ---------------------------------------------------------
def test_20_inverted_dropout_keeps_the_mean_and_adds_variance_x2_p_over_1_minus_p():
    """y = x·b/(1 − p), b ~ Bernoulli(1 − p): E[y] = x, Var[y] = x²p/(1 − p) (p = 0.3, x = 1.7:
    1.2386). 10⁶ draws through refnet's dropout layer; the variance's standard error from the
    sample's fourth central moment."""
    p, x, n = 0.3, 1.7, 10 ** 6
    layer = Dropout({"type": "dropout", "p": p}, (n,), "theory dropout")
    y, _ = layer.forward(FLOAT64, {}, np.full((1, n), x), ForwardState(rng=np.random.default_rng(0)))
    y = y.ravel()
    mean, band = mean_band(y)
    assert abs(mean - x) <= band
    var = y.var(ddof=1)
    m4 = np.mean((y - y.mean()) ** 4)
    var_se = math.sqrt((m4 - var ** 2) / n)
    assert abs(var - x * x * p / (1 - p)) <= Z5 * var_se


# --- 21. width and depth (statistical) ----------------------------------------------------------
@pytest.mark.slow
def test_21_the_second_moment_of_the_he_ratio_is_the_product_of_1_plus_5_over_n():
    """E[(2χ²_K/n)²] = (4/n²)(Var K + (E K)² + 2E K) = 1 + 5/n for K ~ Bin(n, 1/2), so for Kaiming
    ReLU nets E[(M_L/M_0)²] = ∏(1 + 5/n_j) (Hanin 2018): n = 64, L = 5: 1.4590. The squared
    ratio's tails are heavier: 40 000 nets keep its standard error near 0.6 %."""
    ratios = second_moment_ratios(64, 5, 40000, "kaiming_normal", rng=np.random.default_rng(3))
    mean, band = mean_band(ratios ** 2)
    assert abs(mean - (1 + 5 / 64) ** 5) <= band, (mean, band)


# --- 4, 9, 11 (exact) ----------------------------------------------------------------------------
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20),
       st.floats(0.01, 10))
def test_4_clipping_by_norm_is_idempotent_up_to_torchs_epsilon_and_by_value_keeps_small_entries(
        values, theta):
    """By norm: ‖g′‖ = min(‖g‖, θ) up to torch's +1e-6 in the denominator, direction kept; a
    second clip changes the norm by at most a factor 1 − 1e-6/(θ + 1e-6) (torch rescales again
    because θ/(‖g′‖ + 1e-6) < 1 when ‖g′‖ > θ − 1e-6: idempotent only up to that). By value:
    |g′| ≤ c and g′ = g where |g| ≤ c."""
    from refnet.training.clip import clip_grad_norm, clip_grad_value, tensor_norm
    g = {"w": np.array(values)}
    once, norm = clip_grad_norm(g, theta)
    twice, _ = clip_grad_norm(once, theta)
    n1, n2 = tensor_norm(once["w"], 2), tensor_norm(twice["w"], 2)
    assert n1 <= min(norm, theta) * (1 + 1e-12)
    assert n2 <= n1 and n2 >= n1 * (1 - 1e-6 / (theta + 1e-6)) * (1 - 1e-12)
    v = clip_grad_value(g, theta)["w"]
    small = np.abs(g["w"]) <= theta
    assert np.all(np.abs(v) <= theta) and np.array_equal(v[small], g["w"][small])


def test_9_zero_initialized_residual_branches_make_the_net_its_skip_path():
    """Fixup (Zhang 2019): with each branch's last layer zero, every block is the identity, the
    output is the skip path's, and the branch's earlier layers get exactly zero gradient (their
    output is multiplied by the zero layer); the zero layer's own gradient is not zero."""
    block = {"type": "residual", "body": [
        {"type": "dense", "out": 5, "init": "kaiming_normal"}, {"type": "relu"},
        {"type": "dense", "out": 5, "init": "zeros", "bias_init": "zeros"}]}
    model = Model({"input_shape": [5], "seed": 4, "batch": 6, "loss": {"type": "mse"},
                   "layers": [block, block, {"type": "dense", "out": 2}]})
    params, x, y = model.prepare()
    g = model.loss_and_grads(FLOAT64, params, x, y)
    out, _ = model.net.forward(FLOAT64, params, x, ForwardState(train=False))
    skip_only = x @ params["2.weight"].T + params["2.bias"]
    assert np.array_equal(out, skip_only)
    for i in (0, 1):
        assert np.all(g.params[f"{i}.body.0.weight"] == 0) and np.all(g.params[f"{i}.body.0.bias"] == 0)
        assert np.any(g.params[f"{i}.body.2.weight"] != 0)


def test_11_dropout_with_p_1_multiplies_by_zero_as_torch_so_inf_becomes_nan():
    """p = 1 returns input·0 (torch's choice, kept): zeros for finite input, NaN for ±inf."""
    layer = Dropout({"type": "dropout", "p": 1.0}, (3,), "theory dropout")
    with np.errstate(invalid="ignore"):
        y, _ = layer.forward(FLOAT64, {}, np.array([[1.0, np.inf, -2.0]]),
                             ForwardState(rng=np.random.default_rng(0)))
    assert y[0, 0] == 0 and np.isnan(y[0, 1]) and y[0, 2] == 0


# --- 5. SELU's (μ, ν) map contracts at its fixed point (exact, by quadrature) ----------------
def test_5_the_selu_moment_map_has_jacobian_norm_0_7877_at_its_fixed_point():
    """Klambauer et al. 2017: with normalized weights (Σw = 0, Σw² = 1) the pre-activation is
    z ~ N(0, ν), and the map (μ, ν) → (E selu(z), E selu(z)²) has Jacobian [[0, a], [0, b]] at
    (0, 1), a = ∂E selu/∂ν, b = ∂E selu²/∂ν; its spectral norm √(a² + b²) = 0.7877 < 1 makes
    (0, 1) attracting. Computed by 30-digit quadrature (d/dν f(√ν t) = f'(√ν t)·t/(2√ν)), with
    refnet's SELU constants, and E selu = 0, E selu² = 1 at ν = 1 checked on the way."""
    ctx = mpmath.MPContext()
    ctx.dps = 30
    lam = ctx.mpf("1.0507009873554804934193349852946")
    alpha = ctx.mpf("1.6732632423543772848170429916717")
    selu = lambda z: lam * z if z > 0 else lam * alpha * (ctx.exp(z) - 1)          # noqa: E731
    dselu = lambda z: lam if z > 0 else lam * alpha * ctx.exp(z)                   # noqa: E731
    phi = lambda t: ctx.exp(-t * t / 2) / ctx.sqrt(2 * ctx.pi)                     # noqa: E731
    expect = lambda f: ctx.quad(lambda t: f(t) * phi(t), [-ctx.inf, 0, ctx.inf])   # noqa: E731
    assert abs(expect(selu)) < 1e-25 and abs(expect(lambda t: selu(t) ** 2) - 1) < 1e-25
    a = expect(lambda t: dselu(t) * t / 2)
    b = expect(lambda t: 2 * selu(t) * dselu(t) * t / 2)
    assert abs(float(ctx.sqrt(a * a + b * b)) - 0.7877) < 5e-5


# --- 15. SELU self-normalizes (statistical) ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mu, var", [(0.0, 1.0), (1.0, 3.0), (-0.5, 0.2)])
def test_15_selu_with_lecun_normal_drives_activations_to_mean_0_and_variance_1(mu, var):
    """n = 512, 64 zero-bias layers, LeCun-normal weights, batch 64, inputs N(μ, σ²): the last
    layer's activations have mean 0 and variance in [0.9, 1.1]. The fixed point attracts
    (Jacobian norm 0.79, test 5); what is left is finite-width noise. The mean: its 5-SE band
    over 4 nets (a net's own mean wanders by ~0.02: its weights' row sums are N(0, 1), not 0, so
    a single net's |mean| < 0.03 fails now and then — measured 0.032); the variance: each net's
    layer variance moves by ~√(2/n²) ≈ 0.3 % per layer through its row norms, inside the band."""
    n, depth = 512, 64
    layers = []
    for _ in range(depth):
        layers += [{"type": "dense", "out": n, "bias": False, "init": "lecun_normal"},
                   {"type": "selu"}]
    means = []
    for seed in range(4):
        model = Model({"input_shape": [n], "seed": 15 + seed, "batch": 64, "layers": layers,
                       "loss": {"type": "mse"}})
        params = model.init_params()
        x = mu + math.sqrt(var) * np.random.default_rng(seed).standard_normal((64, n))
        out, _ = model.net.forward(FLOAT64, params, x, ForwardState(train=False))
        assert 0.9 <= out.var() <= 1.1, (seed, out.var())
        means.append(out.mean())
    mean, band = mean_band(means)
    assert abs(mean) <= band and abs(mean) < 0.05, means


# --- 16. dynamical isometry (statistical) ---------------------------------------------------------
def jacobian_spectrum_ratio(activation, init, gain, n=400, depth=8, seed=0):
    """Var(s²)/m₁² of the squared singular values s² of the input-output Jacobian at one input,
    via refnet's backward: a batch of n copies of x with upstream dy = I gives J's rows."""
    layers = []
    for _ in range(depth):
        layers += [{"type": "dense", "out": n, "bias": False,
                    "init": {"name": init, "gain": gain} if init == "orthogonal" else
                    {"name": "normal", "std": gain / math.sqrt(n)}}, {"type": activation}]
    model = Model({"input_shape": [n], "seed": seed, "batch": 1, "layers": layers,
                   "loss": {"type": "mse"}})
    params = model.init_params()
    x = np.repeat(np.random.default_rng(seed).standard_normal((1, n)), n, axis=0)
    _, caches = model.net.forward(FLOAT64, params, x, ForwardState(train=False))
    jac, _ = model.net.backward(FLOAT64, params, np.eye(n), caches)
    s2 = np.linalg.svd(jac, compute_uv=False) ** 2
    return s2.var() / s2.mean() ** 2


@pytest.mark.slow
def test_16_orthogonal_linear_nets_are_isometric_and_relu_gaussian_spreads_twice_as_much():
    """Pennington et al. 2017, n = 400, L = 8 at criticality: linear-orthogonal has every
    singular value 1 (ratio 0, to rounding); free probability gives Var(s²)/m₁² → L for
    linear-Gaussian and ReLU-orthogonal and → 2L for ReLU-Gaussian as n → ∞ [measured 7.9, 8.1,
    16.7]. Band: the mean over 3 nets within its 5 SE plus the O(L²/n) = 16 % finite-width
    correction of the asymptotic value."""
    depth, n = 8, 400
    assert jacobian_spectrum_ratio("identity", "orthogonal", 1.0) < 1e-20
    for activation, init, gain, target in (("identity", "normal", 1.0, depth),
                                           ("relu", "orthogonal", math.sqrt(2), depth),
                                           ("relu", "normal", math.sqrt(2), 2 * depth)):
        ratios = [jacobian_spectrum_ratio(activation, init, gain, seed=s) for s in range(3)]
        mean, band = mean_band(ratios)
        assert abs(mean - target) <= band + target * depth / n * depth / 8 * 1.0, \
            (activation, init, ratios)


# --- 19. shattered gradients (statistical) --------------------------------------------------------
def gradient_autocorrelation(depth, residual, width=200, points=256, seed=0):
    """Lag-1 autocorrelation of df/dx over a grid of 256 scalar inputs in [−2, 2], for a He-init
    ReLU net (or residual blocks x + η·W₂relu(W₁x), η = 1/√depth) with a scalar output."""
    if residual:
        eta = 1 / math.sqrt(depth)
        body = [{"type": "dense", "out": width, "init": {"name": "kaiming_normal",
                                                          "nonlinearity": "relu"},
                 "bias_init": {"name": "normal", "std": 0.1}}, {"type": "relu"},
                {"type": "dense", "out": width, "bias": False,
                 "init": {"name": "kaiming_normal", "nonlinearity": "linear"}}]
        layers = [{"type": "dense", "out": width, "init": "kaiming_normal"}] + \
            [{"type": "residual", "scale": eta, "body": body}] * depth
    else:
        layers = [{"type": "dense", "out": width, "init": "kaiming_normal"}, {"type": "relu"}]
        for _ in range(depth - 1):
            layers += [{"type": "dense", "out": width, "init": {"name": "kaiming_normal",
                                                                 "nonlinearity": "relu"},
                        "bias_init": {"name": "normal", "std": 0.1}}, {"type": "relu"}]
    layers.append({"type": "dense", "out": 1, "bias": False})
    model = Model({"input_shape": [1], "seed": seed, "batch": points, "layers": layers,
                   "loss": {"type": "mse"}})
    params = model.init_params()
    x = np.linspace(-2, 2, points).reshape(-1, 1)
    _, caches = model.net.forward(FLOAT64, params, x, ForwardState(train=False))
    g, _ = model.net.backward(FLOAT64, params, np.ones((points, 1)), caches)
    g = g.ravel()
    return float(np.corrcoef(g[:-1], g[1:])[0, 1])


@pytest.mark.slow
def test_19_gradients_shatter_with_depth_in_plain_relu_nets_but_not_in_scaled_resnets():
    """Balduzzi et al. 2017: the lag-1 autocorrelation of df/dx over a 1-D input grid falls
    with depth in plain He-init ReLU nets (0.97 at depth 1, 0.43 at 128, width 200) and stays
    high in ResNets with η = 1/√L. Here depth 1 and 50, 5 nets each: plain falls by more than
    0.2, the resnet stays within 0.1 of depth 1 (margins from the measured spread of the 5
    nets, sd < 0.04)."""
    shallow = [gradient_autocorrelation(1, False, seed=s) for s in range(5)]
    plain = [gradient_autocorrelation(50, False, seed=s) for s in range(5)]
    resnet = [gradient_autocorrelation(50, True, seed=s) for s in range(5)]
    assert np.mean(plain) < np.mean(shallow) - 0.2, (shallow, plain)
    assert np.mean(resnet) > np.mean(shallow) - 0.1, (shallow, resnet)


# --- the variance-law list, beyond THEORY.md's numbers --------------------------------
def forward_variances(activation, std, n=256, depth=10, batch=256, seed=0, x_std=1.0):
    """Pre-activation variance of every layer of a zero-bias MLP (refnet forward)."""
    layers = []
    for _ in range(depth):
        layers += [{"type": "dense", "out": n, "bias": False,
                    "init": {"name": "normal", "std": std}}, {"type": activation}]
    model = Model({"input_shape": [n], "seed": seed, "batch": batch, "layers": layers,
                   "loss": {"type": "mse"}})
    params = model.init_params()
    x = x_std * np.random.default_rng(seed).standard_normal((batch, n))
    state = ForwardState(train=False, outputs=[])
    model.net.forward(FLOAT64, params, x, state)
    return [float(np.var(o)) for _, kind, o in state.outputs if kind == "dense"]


def test_tanh_with_xavier_follows_the_mean_field_variance_map():
    """tanh with Xavier (Var w = 1/n): q_{l+1} = E[tanh(√q_l·z)²], z ~ N(0, 1) — near 0 tanh is
    the identity and q is kept; at q = 1 it shrinks slowly (to 0.39 after 10 layers). Over 10
    nets (width 128, batch 128) the mean measured pre-activation variance of every layer lies
    within 5 SE of the map (Gauss–Hermite, 80 nodes); a single net strays by several percent
    (its row norms and the rank-deficient sample covariance of its activations)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    q, predicted = 1.0, []
    for _ in range(10):
        predicted.append(q)
        q = float(np.sum(weights * np.tanh(math.sqrt(q) * nodes) ** 2))
    runs = np.array([forward_variances("tanh", 1 / math.sqrt(128), n=128, batch=128, seed=s)
                     for s in range(10)])
    for layer, p in enumerate(predicted):
        mean, band = mean_band(runs[:, layer])
        assert abs(mean - p) <= band, (layer, mean, p, band)
    near_zero = np.array([forward_variances("tanh", 1 / math.sqrt(128), n=128, batch=128,
                                            seed=s, x_std=0.05) for s in range(10)])
    mean, band = mean_band(near_zero[:, -1] / near_zero[:, 0])
    assert abs(mean - 1) <= band + 0.01       # + the mean-field shrink at q = 0.0025: 0.5 %


def test_small_normal_init_collapses_the_forward_variance_geometrically():
    """N(0, 0.01) weights, width 128, tanh (the identity at these sizes): each layer multiplies
    the variance by n·σ² = 0.0128, so after 5 layers the ratio is 0.0128⁴ of the first's: the
    mean over 10 nets within 5 SE."""
    runs = np.array([forward_variances("tanh", 0.01, n=128, batch=128, depth=5, seed=s)
                     for s in range(10)])
    mean, band = mean_band(runs[:, -1] / runs[:, 0] / 0.0128 ** 4)
    assert abs(mean - 1) <= band


def backward_ratios(n, depth, seeds, init, rng):
    """‖δ_0‖²/‖δ_L‖² through zero-bias ReLU layers: δ ← Wᵀ(δ ⊙ relu'(z)), z from the forward."""
    relu = act("relu", n)
    h = rng.standard_normal((seeds, n))
    weights, masks = [], []
    for _ in range(depth):
        w = initialize(init, (seeds * n, n), rng).reshape(seeds, n, n)
        z = np.einsum("sij,sj->si", w, h)
        h, cache = relu.forward(FLOAT64, {}, z)
        weights.append(w)
        masks.append(cache)
    delta = rng.standard_normal((seeds, n))
    top = np.sum(delta * delta, axis=1)
    for w, cache in zip(reversed(weights), reversed(masks)):
        dz, _ = relu.backward(FLOAT64, {}, delta, cache)
        delta = np.einsum("sij,si->sj", w, dz)
    return np.sum(delta * delta, axis=1) / top


@pytest.mark.parametrize("init, per_layer", [("kaiming_normal", 1.0),
                                             ({"name": "kaiming_normal",
                                               "nonlinearity": "linear"}, 0.5)])
def test_relu_backward_variance_is_kept_by_kaiming_and_halved_by_xavier(init, per_layer):
    """Backward through a ReLU layer: E‖δ_{l−1}‖² = n·Var w·½·E‖δ_l‖² (half the units pass):
    Kaiming (2/n) keeps it, Xavier on square layers (1/n) halves it per layer (n = 16, L = 10,
    10 000 nets, 5 SE)."""
    ratios = backward_ratios(16, 10, 10000, init, np.random.default_rng(21))
    mean, band = mean_band(ratios / per_layer ** 10)
    assert abs(mean - 1) <= band


@pytest.mark.slow
def test_16_tanh_reaches_isometry_only_with_orthogonal_init():
    """Pennington et al. 2017: tanh at σ_w = 1, n = 400, L = 8, inputs N(0, 1): with orthogonal
    weights the squared singular values barely spread (Var(s²)/m₁² measured 1.0–1.2), with
    Gaussian weights they spread like the linear-Gaussian net and more (9.1–9.4 > L = 8)."""
    orthogonal = [jacobian_spectrum_ratio("tanh", "orthogonal", 1.0, seed=s) for s in range(2)]
    gaussian = [jacobian_spectrum_ratio("tanh", "normal", 1.0, seed=s) for s in range(2)]
    assert max(orthogonal) < 2 and min(gaussian) > 8, (orthogonal, gaussian)
