"""BatchNorm and LayerNorm: the exact identities, torch's running statistics, eval as an affine map.

Every test uses off-centre inputs (5·randn + 12), random weight and bias, and a random upstream
gradient: a constant upstream gradient makes BatchNorm's input gradient vanish and such a test
could not fail.
"""

import numpy as np
import pytest
from conftest import HAVE_TORCH, reference_rounding
from hypothesis import given
from hypothesis import strategies as st

from refnet import BOUND, FLOAT32, FLOAT64, Model, MPBackend, verify
from refnet.layers.base import ForwardState
from refnet.layers.norm import BatchNorm, LayerNorm

MP = MPBackend(60)
TINY = 1e-50      # what "zero" means at 60 digits, relative to the terms (>= 5 digits of margin)


def bn(shape_or_channels=(4, 3, 2), **options):
    layer = BatchNorm({"type": "batchnorm", **options}, shape_or_channels, "layers[1] (batchnorm)")
    layer.name = "1"
    return layer


def random_case(shape=(5, 4, 3, 2), seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = 5 * rng.standard_normal(shape) + 12
    params = {"weight": rng.standard_normal(c), "bias": rng.standard_normal(c),
              "running_mean": rng.standard_normal(c), "running_var": rng.random(c) + 0.5,
              "num_batches_tracked": np.zeros(())}
    return x, params, rng.standard_normal(shape)


def run(layer, bk, params, x, dy, train=True):
    p = {k: bk.asarray(v) for k, v in params.items()}
    state = ForwardState(train=train)
    y, cache = layer.forward(bk, p, bk.asarray(x), state)
    dx, grads = layer.backward(bk, p, bk.asarray(dy), cache)
    return y, dx, grads, state


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 3, 2)])
def test_batchnorm_input_gradient_sums_to_zero_over_the_batch_per_channel(shape):
    """Σ_{n,h,w} dx = 0 for every channel (exactly; here to 1e-50 of Σ|dx| at 60 digits), so a
    bias right before BatchNorm gets zero gradient."""
    x, params, dy = random_case(shape)
    layer = bn(shape[1:])
    _, dx, _, _ = run(layer, MP, params, x, dy)
    axes = (0,) + tuple(range(2, len(shape)))
    total = MP.to_numpy(MP.sum(dx, axis=axes))
    magnitude = MP.to_numpy(MP.sum(MP.abs(dx), axis=axes))
    assert np.all(np.abs(total) <= TINY * magnitude)


def test_a_bias_before_batchnorm_gets_zero_gradient_and_verify_proves_it():
    """dense (with bias) -> batchnorm: the bias gradient is 0 in exact arithmetic; float64 gives
    rounding noise within its error bound, and verify passes."""
    spec = {"input_shape": [3], "seed": 0, "batch": 6,
            "layers": [{"type": "dense", "out": 4}, {"type": "batchnorm"}, {"type": "tanh"},
                       {"type": "dense", "out": 2}], "loss": {"type": "mse"}}
    model = Model(spec)
    params, x, y = model.prepare()
    g = model.loss_and_grads(MP, params, x, y)
    weight_scale = np.abs(MP.to_numpy(g.params["0.weight"])).max()
    assert np.abs(MP.to_numpy(g.params["0.bias"])).max() <= TINY * weight_scale
    report = verify(model)
    assert report.passed


@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_batchnorm_gradient_along_xhat_is_the_eps_term(eps):
    """Σ dx·x̂ = (γ/√(σ²+ε))·Σ(dy·x̂)·ε/(σ²+ε) per channel — nonzero for ε > 0: the
    orthogonality of dx and x̂ is an ε = 0 fact."""
    x, params, dy = random_case()
    layer = bn((4, 3, 2), eps=eps)
    y, dx, _, _ = run(layer, MP, params, x, dy)
    axes = (0, 2, 3)
    p = {k: MP.asarray(v) for k, v in params.items()}
    _, cache = layer.forward(MP, p, MP.asarray(x), ForwardState(train=True))
    xhat, std = layer.normalized(cache), cache[2].reshape(-1)     # cache (x, μ, s, m, axes)
    var = std * std - eps
    lhs = MP.sum(dx * xhat, axis=axes)
    rhs = p["weight"] / std * MP.sum(MP.asarray(dy) * xhat, axis=axes) * (eps / (var + eps))
    assert np.all(np.abs(MP.to_numpy(lhs - rhs)) <= TINY * np.abs(MP.to_numpy(lhs)))
    assert np.all(np.abs(MP.to_numpy(lhs)) > 0)


@given(a=st.floats(0.01, 100), seed=st.integers(0, 1000))
def test_at_eps_zero_batchnorm_is_invariant_to_scaling_the_previous_layers_weights(a, seed):
    """ε = 0: BN(a·Wu) = BN(Wu) and the input gradient is unchanged for a > 0, and the gradient
    with respect to the scaled weights is 1/a times the original (checked at 60 digits)."""
    spec = {"input_shape": [3], "seed": seed, "batch": 5,
            "layers": [{"type": "dense", "out": 4, "bias": False}, {"type": "batchnorm", "eps": 0},
                       {"type": "tanh"}, {"type": "dense", "out": 2}], "loss": {"type": "mse"}}
    model = Model(spec)
    params, x, y = model.prepare()
    params["1.weight"] = np.random.default_rng(seed).standard_normal(4)
    x = 5 * x + 12
    # a·W formed at 60 digits, where the product of two doubles is exact.
    scaled = dict(params, **{"0.weight": MP.asarray(params["0.weight"]) * MP.ctx.mpf(a)})
    g1 = model.loss_and_grads(MP, params, x, y)
    g2 = model.loss_and_grads(MP, scaled, x, y)
    rel = lambda u, v: np.max(np.abs(MP.to_numpy(u - v))) / np.max(np.abs(MP.to_numpy(v)))  # noqa
    assert rel(g2.forward.output, g1.forward.output) <= TINY
    assert rel(g2.x, g1.x) <= TINY
    assert rel(g2.params["0.weight"] * MP.ctx.mpf(a), g1.params["0.weight"]) <= TINY


def test_with_eps_1e5_and_a_small_scale_the_invariance_is_visibly_off():
    """With ε = 1e-5 and a = 0.01, σ² of the scaled pre-activations is comparable to ε, so the
    outputs differ by percent, not rounding: the invariance is an ε = 0 (or a >= 1) fact."""
    spec = {"input_shape": [3], "seed": 0, "batch": 5,
            "layers": [{"type": "dense", "out": 4, "bias": False,
                        "init": {"name": "normal", "std": 0.01}}, {"type": "batchnorm"}],
            "loss": {"type": "mse"}}
    model = Model(spec)
    params, x, y = model.prepare()
    scaled = dict(params, **{"0.weight": 0.01 * params["0.weight"]})
    out1 = model.forward(FLOAT64, params, x, y).output
    out2 = model.forward(FLOAT64, scaled, x, y).output
    assert np.max(np.abs(out1 - out2)) > 1e-3


def test_eval_mode_is_the_affine_map_from_running_statistics():
    """eval: y = γ(x − running_mean)/√(running_var + ε) + β, and dx = dy·γ/√(running_var + ε)."""
    x, params, dy = random_case()
    layer = bn()
    yb, dxb, _, state = run(layer, BOUND, params, x, dy, train=False)
    shape = (1, -1, 1, 1)
    scale = params["weight"] / np.sqrt(params["running_var"] + 1e-5)
    expected_y = (x - params["running_mean"].reshape(shape)) * scale.reshape(shape) \
        + params["bias"].reshape(shape)
    # Both sides are float64 evaluations of the same affine map: a few roundings each.
    assert np.allclose(yb.v, expected_y, rtol=0, atol=8 * np.spacing(np.abs(expected_y).max()))
    assert np.allclose(dxb.v, dy * scale.reshape(shape), rtol=8 * 2.0**-53, atol=0)
    assert state.updates == {}, "eval mode never touches the running statistics"


def test_running_statistics_after_k_steps_follow_torchs_formulas():
    """new = (1 − m)·old + m·batch, the batch variance unbiased (·n/(n − 1)), num_batches_tracked
    counting steps — applied over k = 5 train steps on different batches."""
    layer = bn((3,), momentum=0.2)
    rng = np.random.default_rng(7)
    params = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3),
              "running_var": np.ones(3), "num_batches_tracked": np.zeros(())}
    mean_ref, var_ref = np.zeros(3), np.ones(3)
    for step in range(5):
        x = 3 * rng.standard_normal((8, 3)) + step
        state = ForwardState(train=True)
        layer.forward(FLOAT64, params, x, state)
        mean_ref = 0.8 * mean_ref + 0.2 * x.mean(axis=0)
        var_ref = 0.8 * var_ref + 0.2 * x.var(axis=0, ddof=1)
        params.update({k.split(".", 1)[1]: v for k, v in state.updates.items()})
        assert params["num_batches_tracked"] == step + 1
    assert np.allclose(params["running_mean"], mean_ref, rtol=1e-14, atol=1e-15)
    assert np.allclose(params["running_var"], var_ref, rtol=1e-14)


def test_batchnorm_in_train_mode_with_one_value_per_channel_raises_like_torch():
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        run(bn((3,)), FLOAT64, random_case((1, 3))[1], np.ones((1, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run(bn((3, 1, 1)), FLOAT64, random_case((1, 3, 1, 1))[1], np.ones((1, 3, 1, 1)),
            np.ones((1, 3, 1, 1)))


def test_batchnorm_fused_backward_equals_the_composition_of_primitives():
    """The closed-form dx equals backprop through μ, σ², s, x̂ step by step (CS231n's graph),
    written here independently with mp scalars per channel."""
    x, params, dy = random_case((6, 2))
    layer = bn((2,))
    _, dx, _, _ = run(layer, MP, params, x, dy)
    ctx = MP.ctx
    for c in range(2):
        xs = [ctx.mpf(v) for v in x[:, c]]
        g, m = ctx.mpf(params["weight"][c]), len(xs)
        mu = ctx.fsum(xs) / m
        var = ctx.fsum((v - mu) ** 2 for v in xs) / m
        s = ctx.sqrt(var + ctx.mpf(1e-5))
        dxh = [g * ctx.mpf(d) for d in dy[:, c]]
        dvar = ctx.fsum(d * (v - mu) for d, v in zip(dxh, xs)) * (-ctx.mpf(1) / 2) * s ** -3
        dmu = ctx.fsum(-d / s for d in dxh) + dvar * ctx.fsum(-2 * (v - mu) for v in xs) / m
        for n in range(m):
            ref = dxh[n] / s + dvar * 2 * (xs[n] - mu) / m + dmu / m
            assert abs(dx[n, c] - ref) <= ctx.mpf(TINY) * abs(ref)


def _backward_errors(bk, cases, plant=0.0):
    """The median, over every element of every case, of the error of BatchNorm's train backward
    and of the textbook form normalize_backward(γ·dy, ...) (γ inside the sums), both from the
    same ``bk`` forward cache, against the exact backward of that cache (60 digits) — the error
    of the backward formula alone — in units u of ``bk`` times the size of the bracket's terms
    (what their roundings are relative to). ``plant``: that many such units added to BatchNorm's
    dx (a test of the comparison itself)."""
    from refnet.layers.norm import normalize_backward
    u = np.finfo(bk.dtype).eps / 2
    ours, textbook = [], []
    for shape, seed in cases:
        rng = np.random.default_rng(seed)
        axes = (0,) + tuple(range(2, len(shape)))
        x = 10 ** rng.uniform(-3, 3) * rng.standard_normal(shape) + rng.uniform(-20, 20)
        # dy correlated with x̂: the bracket m·dy − Σdy − x̂·Σ(dy·x̂) cancels.
        dy = rng.standard_normal(shape) + rng.uniform(0, 30) * (x - x.mean(axis=axes, keepdims=True))
        params = {**random_case(shape, seed)[1],
                  "weight": 10 ** rng.uniform(-2, 2) * rng.standard_normal(shape[1])}
        layer = bn(shape[1:])
        p = {k: bk.asarray(v) for k, v in params.items()}
        dyb = bk.asarray(dy)
        _, cache = layer.forward(bk, p, bk.asarray(x), ForwardState(train=True))
        x_in, mean, std, m, _ = cache                          # (x, μ, s, m, axes)
        xhat = layer.normalized(cache)                          # x̂ in bk, for the textbook form
        as_mp = lambda a: MP.asarray(np.asarray(a, dtype=np.float64))   # noqa: E731  (exact)
        exact = MP.to_numpy(layer.backward(MP, {k: as_mp(v) for k, v in p.items()}, as_mp(dyb),
                                           (as_mp(x_in), as_mp(mean), as_mp(std), m, axes))[0])
        gamma = layer._per_channel(p["weight"], len(shape))
        # The size of the bracket's terms, times |γ|/(m·s): what a rounding of them is relative to.
        terms = (np.abs(gamma / (m * std)) * (m * np.abs(dyb) + np.abs(dyb.sum(axis=axes, keepdims=True))
                 + np.abs(xhat) * np.abs((dyb * xhat).sum(axis=axes, keepdims=True))))
        ours_dx = layer.backward(bk, p, dyb, cache)[0]
        for out, dx in ((ours, ours_dx + bk.dtype.type(plant * u) * terms),
                        (textbook, normalize_backward(bk, dyb * gamma, xhat, std, axes, m))):
            out.extend((np.abs(dx - exact) / (u * terms)).ravel())
    return np.median(ours), np.median(textbook)


NORM_CASES = [(shape, seed) for seed in range(50)
              for shape in [(8, 3, 4, 4), (4, 2, 3, 3), (16, 4), (3, 5, 2, 2)]]


@pytest.mark.parametrize("bk", [FLOAT64, FLOAT32], ids=["float64", "float32"])
def test_batchnorm_backward_with_gamma_outside_the_sums_is_as_accurate_as_the_textbook_form(bk):
    """BatchNorm's backward forms dx = (γ/s)·(dy − Σdy/m − x̂·Σ(dy·x̂)/m), reusing dβ and dγ as
    its sums (5 passes over the batch fewer), as two muladds (t = dy − x̂·Σ(dy·x̂)/m, then
    t·k − (Σdy/m)·k, k = γ/s); the textbook form puts dx̂ = γ·dy inside them. Over 200 seeded
    cases (offsets to ±20, scales 1e-3 to 1e3, γ 1e-2 to 1e2, dy correlated with x̂ so that
    the bracket cancels) its median error is no larger than the textbook form's, both formed
    from the same forward cache (x, μ, s), x̂ or x − μ rounded in the backend (measured: 0.98×
    in float64, 0.96× in float32; both about 0.45 u of the terms). The comparison can fail:
    0.3 u of the terms added to each element (less than half a rounding) makes it (1.08×,
    1.04×); the test plants 0.4 u (1.18×, 1.11×)."""
    ours, textbook = _backward_errors(bk, NORM_CASES)
    assert ours <= textbook, (ours, textbook)
    planted, textbook = _backward_errors(bk, NORM_CASES, plant=0.4)
    assert planted > textbook, (planted, textbook)


def test_inputs_are_not_mutated_by_batchnorm():
    x, params, dy = random_case()
    copies = (x.copy(), {k: v.copy() for k, v in params.items()}, dy.copy())
    run(bn(), FLOAT64, params, x, dy)
    assert np.array_equal(x, copies[0]) and np.array_equal(dy, copies[2])
    assert all(np.array_equal(params[k], copies[1][k]) for k in params)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("affine", [True, False])
def test_norm_layers_pass_the_verification_triangle(mode, affine):
    spec = {"input_shape": [2, 3, 3], "seed": 1, "batch": 3, "mode": mode,
            "layers": [{"type": "conv2d", "out_channels": 3, "kernel_size": 2},
                       {"type": "batchnorm", "affine": affine}, {"type": "elu"},
                       {"type": "flatten"},
                       {"type": "layernorm", "elementwise_affine": affine},
                       {"type": "dense", "out": 2}],
            "loss": {"type": "softmax_cross_entropy"}}
    assert verify(Model(spec)).passed


def test_layernorm_normalizes_each_sample_over_its_trailing_dims():
    layer = LayerNorm({"type": "layernorm", "normalized_shape": [3, 2]}, (4, 3, 2), "ln")
    x = 5 * np.random.default_rng(0).standard_normal((2, 4, 3, 2)) + 12
    y, _ = layer.forward(FLOAT64, layer.init_params(None), x)
    assert np.allclose(y.mean(axis=(2, 3)), 0, atol=1e-14)
    assert np.allclose(y.var(axis=(2, 3)), 1 / (1 + 1e-5 / x.var(axis=(2, 3))), rtol=1e-12)
    with pytest.raises(ValueError, match="trailing dimensions"):
        LayerNorm({"type": "layernorm", "normalized_shape": [4]}, (4, 3, 2), "ln")


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 3, 2)])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_matches_torch_float64_with_running_statistics(shape, train):
    """Output, input/weight/bias gradients within refnet's float64 bound of the exact values, as
    torch's are; the running statistics after the step equal torch's to rounding. (In eval mode
    torch computes y = x·scale + shift, shift = β − running_mean·scale: its output error is
    bounded by a few u·(|x·scale| + |shift|) instead, which this test allows for.)"""
    import torch
    import torch.nn.functional as F
    x, params, dy = random_case(shape)
    layer = bn(shape[1:], momentum=0.3)
    yb, dxb, gb, state = run(layer, BOUND, params, x, dy, train)
    ym, dxm, gm, _ = run(layer, MP, params, x, dy, train)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(params["weight"], requires_grad=True)
    tb = torch.tensor(params["bias"], requires_grad=True)
    rm, rv = torch.tensor(params["running_mean"]), torch.tensor(params["running_var"])
    ty = F.batch_norm(tx, rm, rv, tw, tb, training=train, momentum=0.3, eps=1e-5)
    ty.backward(torch.tensor(dy))
    fused = 0.0
    if not train:
        c = (1, -1) + (1,) * (len(shape) - 2)
        scale = params["weight"] / np.sqrt(params["running_var"] + 1e-5)
        shift = params["bias"] - params["running_mean"] * scale
        fused = 4 * 2.0**-53 * (np.abs(x * scale.reshape(c)) + np.abs(shift.reshape(c)))
    for got, bound, exact, extra in [(ty.detach().numpy(), yb, ym, fused),
                                     (tx.grad.numpy(), dxb, dxm, 0.0),
                                     (tw.grad.numpy(), gb["weight"], gm["weight"], 0.0),
                                     (tb.grad.numpy(), gb["bias"], gm["bias"], 0.0)]:
        allowed = np.minimum(bound.e, bound.probabilistic_bound(8.0)) + extra
        assert np.all(np.abs(got - MP.to_numpy(exact)) <= allowed + reference_rounding(MP.to_numpy(exact)))
    if train:
        assert np.allclose(state.updates["1.running_mean"], rm.numpy(), rtol=4e-16, atol=1e-300)
        assert np.allclose(state.updates["1.running_var"], rv.numpy(), rtol=4e-16)
