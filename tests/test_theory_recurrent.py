"""Theory of gradients through time (Pascanu, Mikolov and Bengio 2013, "On the difficulty of
training recurrent neural networks", section 2.1), checked on refnet's own rnn and lstm layers
and their backpropagation through time. spec/theory.md states what is tested and which matrix
quantity each statement needs:

- rigorous, for every RNN and input: ‖∂L/∂h_t‖ ≤ (γ‖W_hh‖₂)^(T−1−t)·‖∂L/∂h_{T−1}‖ (γ = sup|f′|):
  the largest *singular value* below 1/γ is sufficient for vanishing, above 1/γ necessary for
  explosion — the paper's final version; its first arXiv version said "largest eigenvalue";
- asymptotic, for a linear RNN (here a relu RNN held in its linear region): the per-step factor
  tends to the *spectral radius* ρ(W_hh); ρ < 1 vanishes eventually, even where ‖W_hh‖₂ > 1
  lets the gradient grow first;
- outside the linear case the eigenvalue condition is neither: a relu RNN with ρ(W_hh) = 0
  explodes;
- the LSTM's cell path: ∂c_T/∂c_t = Π f_k (``tests/test_recurrent.py`` checks it bit for bit);
  with a constant forget gate σ(b) that is σ(b)^(T−t), the decay the LSTM keeps through time.

Every check reads the per-step gradients the layer's own backward hands to each step
(``StepRecorder``), never a re-derivation of them."""

import math

import mpmath
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refnet import Model
from refnet.lowp.steps import StepRecorder

U = 2.0 ** -53


def rnn_spec(T, H, F, nonlinearity="tanh", bias=True, batch=3, seed=0):
    return {"input_shape": [T, F], "seed": seed, "batch": batch, "loss": {"type": "mse"},
            "layers": [{"type": "rnn", "hidden_size": H, "nonlinearity": nonlinearity,
                        "bias": bias, "output": "last"}]}


def recorded(model, params, x, y, kind="dh"):
    """{t: ∂L/∂h_t (N, H)} as the backward pass handed it to step t."""
    recorder = StepRecorder()
    model.loss_and_grads(recorder, params, x, y)
    return {t: v for _, _, k, _, t, v in recorder.steps if k == kind}


# --- rigorous: the spectral norm --------------------------------------------------------------
@given(st.integers(0, 10 ** 6), st.sampled_from(["tanh", "relu"]), st.integers(2, 8),
       st.integers(2, 30), st.floats(0.3, 3.0))
def test_pascanu_the_gradient_through_time_is_at_most_gamma_norm_w_to_the_steps(
        seed, nonlinearity, H, T, scale):
    """‖∂L/∂h_t‖₂ ≤ (γ‖W_hh‖₂)^(T−1−t)·‖∂L/∂h_{T−1}‖₂ for every sample, step and draw: each
    backward step multiplies by diag(f′(a_t)) and W_hh, ‖diag f′‖₂ ≤ γ = 1 (tanh′ ≤ 1,
    relu′ ∈ {0, 1}). W_hh is scaled by 0.3–3, so draws both vanish and explode. Tolerance: the
    float64 step fl((δ ⊙ f′) W) = (δ ⊙ f′(1 + 10u)) (W + ΔW) with |ΔW| ≤ H·u·|W|, so
    ‖ΔW‖₂ ≤ H^1.5·u·‖W‖₂: per step a factor 1 + (H^1.5 + 11)u, over ≤ 29 steps ≤ 1 + 1.1e-13
    for H ≤ 8; the test allows 1e-12."""
    model = Model(rnn_spec(T, H, 3, nonlinearity, seed=seed))
    params, x, y = model.prepare()
    params["0.weight_hh_l0"] = params["0.weight_hh_l0"] * scale
    norm_w = np.linalg.norm(params["0.weight_hh_l0"], 2)
    dh = recorded(model, params, x, y)
    last = np.linalg.norm(dh[T - 1], axis=1)
    for t in range(T - 1):
        bound = norm_w ** (T - 1 - t) * last * (1 + 1e-12)
        assert np.all(np.linalg.norm(dh[t], axis=1) <= bound), t


def test_the_norm_bound_is_attained_so_a_bound_1e_10_tighter_fails():
    """The check above has teeth: W_hh = 1.1·P (P a cyclic permutation: orthogonal and ≥ 0)
    in the linear regime gives ‖∂L/∂h_t‖ = 1.1^(T−1−t)·‖∂L/∂h_{T−1}‖ to rounding — the bound
    holds with equality, so the same check with ‖W‖₂ lowered by 1e-10 (relative) fails, while
    the 1e-12 allowance passes (the products of powers of 1.1 stay within 30·2Hu ≈ 5e-14)."""
    H, T = 5, 30
    w = 1.1 * np.roll(np.eye(H), 1, axis=1)
    model, params, x, y = linear_relu_rnn(w, T)
    dh = recorded(model, params, x, y)
    last = np.linalg.norm(dh[T - 1], axis=1)
    norm_w = np.linalg.norm(w, 2)

    def holds(norm):
        return all(np.all(np.linalg.norm(dh[t], axis=1) <= norm ** (T - 1 - t) * last
                          * (1 + 1e-12)) for t in range(T - 1))
    assert holds(norm_w) and not holds(norm_w * (1 - 1e-10))


# --- asymptotic: the spectral radius, in the linear regime ------------------------------------
def linear_relu_rnn(w_hh, T, batch=2, seed=0):
    """A relu RNN that is linear along the whole sequence: W_hh ≥ 0 and W_ih ≥ 0 entrywise,
    no bias, inputs x_t ≥ 0 with x_t,0 > 0 — every pre-activation stays > 0, so f′ = 1 and
    ∂h_{T−1}/∂h_t = W_hh^(T−1−t) exactly."""
    H = w_hh.shape[0]
    model = Model(rnn_spec(T, H, H, "relu", bias=False, batch=batch, seed=seed))
    params, x, y = model.prepare()
    params = {"0.weight_ih_l0": np.eye(H), "0.weight_hh_l0": w_hh}
    x = np.abs(x) + 0.5
    return model, params, x, y


def test_pascanu_in_the_linear_regime_the_per_step_factor_tends_to_the_spectral_radius():
    """Positive 8×8 W_hh (entries U(0, 1), scaled to ρ = 0.8 and 1.25): Perron–Frobenius gives
    a simple dominant eigenvalue ρ with |λ₂|/ρ < 1, so ‖δ W^(k+1)‖/‖δ W^k‖ → ρ with an error
    ~ (|λ₂|/ρ)^k (measured |λ₂|/ρ = 0.24: 0.24^79 ≈ 1e-49 at the latest step checked).
    Checked at the earliest 20 steps of T = 100 (k = 79 … 98): each factor within 1e-12 of ρ
    (rounding: a nonnegative product has relative error ≤ H·u per component, ~2e-15 on the
    ratio; numpy's ρ of a simple Perron root is as accurate). The rigorous rate ‖W‖₂ = 1.05ρ
    here (a positive matrix is nearly normal) would predict a faster growth than happens.
    ρ < 1 vanishes, > 1 explodes: ‖∂L/∂h_0‖/‖∂L/∂h_99‖ ≈ ρ^99 up to the constant of the
    first steps."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, (8, 8))
    eig = np.sort(np.abs(np.linalg.eigvals(base)))
    assert eig[-2] / eig[-1] < 0.4
    for rho in (0.8, 1.25):
        w = base * (rho / eig[-1])
        model, params, x, y = linear_relu_rnn(w, 100)
        dh = recorded(model, params, x, y)
        factors = [np.linalg.norm(dh[t - 1]) / np.linalg.norm(dh[t]) for t in range(1, 21)]
        assert max(abs(f / rho - 1) for f in factors) < 1e-12, (rho, factors[:3])
        ratio = np.linalg.norm(dh[0]) / np.linalg.norm(dh[99])
        assert 0.1 < ratio / rho ** 99 < 10
        assert (ratio < 1e-8) if rho < 1 else (ratio > 1e8)


def test_pascanu_rho_below_one_vanishes_only_asymptotically_when_the_norm_exceeds_one():
    """W_hh = 0.9·I + N on 4 units (N the ones above the diagonal): ρ = 0.9 < 1 but
    ‖W_hh‖₂ = 1.78 > 1 — the rigorous bound (γ‖W‖₂)^k allows growth and says nothing. In the
    linear regime ∂L/∂h_t = δ·W^(T−1−t) with W^k = Σ_j C(k, j) 0.9^(k−j) N^j: the gradient first
    grows (by 238× at k = 29 for this loss's δ: a transient explosion — ρ^k is no bound,
    the largest eigenvalue in place of the singular value would not hold), then the spectral
    radius wins and it vanishes.
    refnet's per-step norms equal ‖δ W^k‖ of the exact powers (30-digit mpmath) within 1e-11
    relative (k ≤ 399 products, each ≤ 2Hu)."""
    H, T = 4, 400
    w = 0.9 * np.eye(H) + np.eye(H, k=1)
    rho, norm = max(abs(np.linalg.eigvals(w))), np.linalg.norm(w, 2)
    assert abs(rho - 0.9) < 1e-15 and norm > 1.7
    model, params, x, y = linear_relu_rnn(w, T, batch=1)
    dh = recorded(model, params, x, y)
    ctx = mpmath.MPContext()
    ctx.dps = 30
    row, W = ctx.matrix([dh[T - 1][0].tolist()]), ctx.matrix(w.tolist())
    growth = []
    for k in range(T):
        t = T - 1 - k
        exact = float(ctx.norm(row, 2))
        got = float(np.linalg.norm(dh[t][0]))
        assert abs(got - exact) <= 1e-11 * exact, k
        growth.append(got / np.linalg.norm(dh[T - 1][0]))
        row = row * W
    assert 30 < max(growth) < 1000           # the transient (C(k, 3)·0.9^(k−3) peaks near k ≈ 28)
    assert growth[-1] < 1e-6                   # then vanishing: 7.9e-12 at k = 399


# --- outside the linear case the eigenvalue condition is neither ------------------------------
def test_pascanu_a_relu_rnn_with_spectral_radius_zero_explodes_through_time():
    """W_hh = 2·[[1, 1], [−1, −1]] is nilpotent (W² = 0: ρ = 0 < 1/γ), yet a relu RNN whose
    second unit is held off by its input (x_t = (1, −1000)) has per-step Jacobian
    diag(1, 0)·W_hh, with eigenvalue 2: ∂L/∂h_t = δ_0·2^(T−1−t)·(1, 1) for t < T−1, exactly
    (powers of two) — an exploding gradient from a matrix whose eigenvalues are all 0. So the
    eigenvalue version of the condition is neither sufficient for vanishing nor necessary for
    explosion; the singular-value one holds: ‖W_hh‖₂ = 4 > 1/γ."""
    T = 30
    model = Model(rnn_spec(T, 2, 2, "relu", bias=False, batch=1))
    _, _, y = model.prepare()
    w = 2.0 * np.array([[1.0, 1.0], [-1.0, -1.0]])
    assert np.array_equal(w @ w, np.zeros((2, 2))) and np.linalg.norm(w, 2) == 4.0
    params = {"0.weight_ih_l0": np.eye(2), "0.weight_hh_l0": w}
    x = np.tile(np.array([1.0, -1000.0]), (1, T, 1))
    dh = recorded(model, params, x, y)
    delta = dh[T - 1][0, 0]
    assert delta != 0
    for t in range(T - 1):
        assert np.array_equal(dh[t][0], delta * 2.0 ** (T - 1 - t) * np.ones(2)), t


# --- the LSTM's cell path ---------------------------------------------------------------------
def test_lstm_with_a_constant_forget_gate_keeps_sigma_b_to_the_steps_of_its_cell_gradient():
    """The cell path ∂c_T/∂c_t = Π_{k=t+1..T} f_k (bit for bit:
    ``tests/test_recurrent.py::test_the_lstm_cell_path_derivative_is_the_product_of_the_forget_gates_bit_for_bit``).
    With W_hh = 0 and the forget gate's input weights 0, every f_k is σ(b) for the forget bias
    b, so ∂L/∂c_t = ∂L/∂c_{T−1}·σ(b)^(T−1−t): a sum in the forward pass (c_t = f c_{t−1} + i g),
    but a product of gates backward — ResNet's factor is exactly 1, the LSTM's is f. Checked
    against σ(b)^k at 50 digits within 4ku (fl(σ(b)) ≤ 3u off, k products of u each; k ≤ 99):
    b = 0 gives 2^−99 = 1.6e-30 at T = 100, b = 3 gives 8.1e-3, b = 5 gives 0.51."""
    T, H = 100, 4
    ctx = mpmath.MPContext()
    ctx.dps = 50
    expected = {0.0: 1.6e-30, 3.0: 8.1e-3, 5.0: 0.51}
    for b, quoted in expected.items():
        spec = {"input_shape": [T, 3], "seed": 1, "batch": 2, "loss": {"type": "mse"},
                "layers": [{"type": "lstm", "hidden_size": H, "output": "last",
                            "forget_bias": b}]}
        model = Model(spec)
        params, x, y = model.prepare()
        params["0.weight_hh_l0"] = np.zeros((4 * H, H))
        params["0.weight_ih_l0"][H:2 * H] = 0.0
        dc = recorded(model, params, x, y, kind="dc")
        sigma = 1 / (1 + ctx.exp(-b))
        for t in range(T - 1):
            k = T - 1 - t
            exact = np.array([[float(v * sigma ** k) for v in row] for row in dc[T - 1].tolist()])
            assert np.all(np.abs(dc[t] - exact) <= 4 * k * U * np.abs(exact)), (b, t)
        assert f"{float(sigma ** (T - 1)):.2g}" == f"{quoted:.2g}"
    assert math.isclose(float((1 / (1 + ctx.exp(0))) ** 99), 2.0 ** -99)
