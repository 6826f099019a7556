"""GroupNorm and InstanceNorm2d: the identities BatchNorm has, per sample; torch's statistics,
running buffers and errors; the verification triangle, the FD sweep and torch agreement.

Inputs are off-centre (5·randn + 12) with random weight, bias and upstream gradient, as in
test_norm.py: a constant upstream gradient would make the input gradient vanish.
"""

import numpy as np
import pytest
from conftest import HAVE_TORCH, reference_rounding

from refnet import BOUND, FLOAT32, FLOAT64, Model, MPBackend, Precision, certify, verify
from refnet.layers.base import ForwardState
from refnet.layers.norm import GroupNorm, InstanceNorm2d, LayerNorm
from refnet.lowp.emulation import EmulatedBackend, format_of, store
from refnet.verification.fdsweep import fd_sweep

MP = MPBackend(60)
TINY = 1e-50      # "zero" at 60 digits, relative to the terms (>= 5 digits of margin)


def gn(sample_shape=(4, 3, 2), **options):
    layer = GroupNorm({"type": "groupnorm", "num_groups": 2, **options}, sample_shape,
                      "layers[1] (groupnorm)")
    layer.name = "1"
    return layer


def inorm(sample_shape=(4, 3, 2), **options):
    layer = InstanceNorm2d({"type": "instancenorm2d", "affine": True, **options}, sample_shape,
                           "layers[1] (instancenorm2d)")
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
    names = set(layer.param_shapes()) | set(layer.buffer_shapes())
    p = {k: bk.asarray(v) for k, v in params.items() if k in names}
    state = ForwardState(train=train)
    y, cache = layer.forward(bk, p, bk.asarray(x), state)
    dx, grads = layer.backward(bk, p, bk.asarray(dy), cache)
    return y, dx, grads, state


def grouped_sums(bk, dx, groups):
    """Σ dx and Σ|dx| over each (sample, group): dx (N, C, ...) viewed as (N, G, rest)."""
    n = dx.shape[0]
    flat = dx.reshape((n, groups, -1))
    return bk.to_numpy(bk.sum(flat, axis=2)), bk.to_numpy(bk.sum(bk.abs(flat), axis=2))


@pytest.mark.parametrize("groups, shape", [(2, (5, 4, 3, 2)), (1, (5, 4, 3, 2)),
                                           (4, (5, 4, 3, 2)), (3, (4, 6))])
def test_groupnorm_input_gradient_sums_to_zero_over_every_sample_and_group(groups, shape):
    """Σ dx = 0 over the (C/G)·H·W values of every (n, g) — exactly; here to 1e-50 of Σ|dx| at
    60 digits — for G = 1, 2, C and a (N, C) input; so a bias before groupnorm gets no gradient."""
    x, params, dy = random_case(shape)
    layer = gn(shape[1:], num_groups=groups)
    _, dx, _, _ = run(layer, MP, params, x, dy)
    total, magnitude = grouped_sums(MP, dx, groups)
    assert np.all(np.abs(total) <= TINY * magnitude) and np.all(magnitude > 0)


@pytest.mark.parametrize("train, track", [(True, False), (True, True), (False, False)])
def test_instancenorm_input_gradient_sums_to_zero_over_every_sample_and_channel(train, track):
    """With instance statistics (train mode, or no running statistics) Σ_{h,w} dx = 0 for every
    (n, c), to 1e-50 of Σ|dx| at 60 digits."""
    x, params, dy = random_case()
    layer = inorm(track_running_stats=track)
    _, dx, _, _ = run(layer, MP, params, x, dy, train)
    total, magnitude = grouped_sums(MP, dx, 4)              # (N, C, H·W): a group per channel
    assert np.all(np.abs(total) <= TINY * magnitude) and np.all(magnitude > 0)


@pytest.mark.parametrize("norm, per_group", [({"type": "groupnorm", "num_groups": 2}, 2),
                                             ({"type": "groupnorm", "num_groups": 4}, 1),
                                             ({"type": "instancenorm2d", "affine": True}, 1)])
def test_a_bias_before_a_per_sample_norm_gets_zero_gradient_per_group(norm, per_group):
    """conv (with bias) → groupnorm/instancenorm2d: a shift common to a whole group changes
    nothing, so the conv bias gradients sum to 0 over each group of channels, exactly (here to
    1e-50 at 60 digits) — each one is 0 for instancenorm2d and groupnorm with G = C, but not with
    2 channels a group (a shift of one channel moves its group's mean and variance: shown);
    float64 gives rounding noise within its error bound, and verify passes."""
    spec = {"input_shape": [2, 3, 3], "seed": 0, "batch": 3,
            "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 2}, norm,
                       {"type": "tanh"}, {"type": "flatten"}, {"type": "dense", "out": 2}],
            "loss": {"type": "mse"}}
    model = Model(spec)
    params, x, y = model.prepare()
    g = model.loss_and_grads(MP, params, x, y)
    scale = np.abs(MP.to_numpy(g.params["0.weight"])).max()
    bias = MP.to_numpy(g.params["0.bias"])
    assert np.all(np.abs(bias.reshape(-1, per_group).sum(axis=1)) <= 1e-45 * scale)
    assert (np.abs(bias).max() > 1e-3 * scale) == (per_group > 1)
    assert verify(model).passed


def test_groupnorm_fused_backward_equals_the_composition_of_primitives():
    """The closed-form dx equals backprop through μ, σ², s, x̂ of each group, written here with
    mp scalars (the per-channel γ inside the group)."""
    x, params, dy = random_case((3, 4, 2, 1))
    layer = gn((4, 2, 1))
    _, dx, _, _ = run(layer, MP, params, x, dy)
    ctx = MP.ctx
    for n in range(3):
        for g in range(2):
            idx = [(c, h) for c in (2 * g, 2 * g + 1) for h in range(2)]
            xs = [ctx.mpf(x[n, c, h, 0]) for c, h in idx]
            m = len(xs)
            mu = ctx.fsum(xs) / m
            var = ctx.fsum((v - mu) ** 2 for v in xs) / m
            s = ctx.sqrt(var + ctx.mpf(1e-5))
            dxh = [ctx.mpf(params["weight"][c]) * ctx.mpf(dy[n, c, h, 0]) for c, h in idx]
            dvar = ctx.fsum(d * (v - mu) for d, v in zip(dxh, xs)) * (-ctx.mpf(1) / 2) * s ** -3
            dmu = ctx.fsum(-d / s for d in dxh) + dvar * ctx.fsum(-2 * (v - mu) for v in xs) / m
            for k, (c, h) in enumerate(idx):
                ref = dxh[k] / s + dvar * 2 * (xs[k] - mu) / m + dmu / m
                assert abs(dx[n, c, h, 0] - ref) <= ctx.mpf(TINY) * abs(ref)


def test_groupnorm_with_one_group_is_layernorm_and_with_c_groups_is_instance_statistics():
    """G = 1 normalizes each sample over (C, H, W): layernorm's x̂ (then a per-channel affine
    map); G = C normalizes each channel over (H, W): instancenorm2d's x̂. Equal at 60 digits
    (the same sums in the same backend; checked to 1e-50)."""
    x, _, _ = random_case()
    ones = {"weight": np.ones(4), "bias": np.zeros(4)}
    one = gn(num_groups=1).forward(MP, ones, MP.asarray(x))[0]
    ln = LayerNorm({"type": "layernorm", "elementwise_affine": False}, (4, 3, 2), "ln")
    assert np.all(np.abs(MP.to_numpy(one - ln.forward(MP, {}, MP.asarray(x))[0])) <= TINY)
    per_channel = gn(num_groups=4).forward(MP, ones, MP.asarray(x))[0]
    inst = inorm(affine=False).forward(MP, {}, MP.asarray(x), ForwardState())[0]
    assert np.all(np.abs(MP.to_numpy(per_channel - inst)) <= TINY)


def test_the_statistics_are_per_group_with_the_biased_variance():
    """Each (n, g) of the output has mean 0 and variance σ²/(σ² + ε) with σ² the biased group
    variance (numpy's var, ddof = 0): an unbiased variance would show as a factor m/(m − 1)."""
    x, params, _ = random_case((2, 4, 3, 2))
    y = gn().forward(FLOAT64, {"weight": np.ones(4), "bias": np.zeros(4)}, x)[0]
    groups = x.reshape(2, 2, -1)
    yg = y.reshape(2, 2, -1)
    var = groups.var(axis=2)
    assert np.allclose(yg.mean(axis=2), 0, atol=1e-14)
    assert np.allclose(yg.var(axis=2), var / (var + 1e-5), rtol=1e-13)


def running_stats_reference(x, old_mean, old_var, momentum):
    """torch's InstanceNorm update, from its description: every instance's copy updated with the
    instance mean and unbiased (ddof = 1) variance, then the mean over the batch."""
    mean = x.mean(axis=(2, 3))
    var = x.var(axis=(2, 3), ddof=1)
    return (((1 - momentum) * old_mean + momentum * mean).mean(axis=0),
            ((1 - momentum) * old_var + momentum * var).mean(axis=0))


def test_instancenorm_running_statistics_follow_torchs_formulas():
    """k = 4 train steps with momentum 0.3 on different batches: running_mean and running_var as
    running_stats_reference computes them (unbiased per-instance variance, averaged over the
    batch), num_batches_tracked never incremented (torch's InstanceNorm does not count), and the
    eval pass then is the affine map of those statistics."""
    layer = inorm((3, 2, 5), momentum=0.3, track_running_stats=True)
    rng = np.random.default_rng(7)
    params = {"weight": rng.standard_normal(3), "bias": rng.standard_normal(3),
              "running_mean": np.zeros(3), "running_var": np.ones(3),
              "num_batches_tracked": np.zeros(())}
    mean_ref, var_ref = np.zeros(3), np.ones(3)
    for step in range(4):
        x = 3 * rng.standard_normal((4, 3, 2, 5)) + step
        state = ForwardState(train=True)
        layer.forward(FLOAT64, params, x, state)
        mean_ref, var_ref = running_stats_reference(x, mean_ref, var_ref, 0.3)
        assert "1.num_batches_tracked" not in state.updates
        params.update({k.split(".", 1)[1]: v for k, v in state.updates.items()})
    assert np.allclose(params["running_mean"], mean_ref, rtol=1e-14, atol=1e-15)
    assert np.allclose(params["running_var"], var_ref, rtol=1e-14)
    assert params["num_batches_tracked"] == 0
    x = rng.standard_normal((2, 3, 2, 5))
    y = layer.forward(FLOAT64, params, x, ForwardState(train=False))[0]
    c = (1, -1, 1, 1)
    expected = ((x - mean_ref.reshape(c)) / np.sqrt(var_ref.reshape(c) + 1e-5)
                * params["weight"].reshape(c) + params["bias"].reshape(c))
    assert np.allclose(y, expected, rtol=1e-13, atol=1e-14)


def test_channel_counts_and_groups_are_checked_against_the_input():
    """num_channels / num_features, when given, must be the input's C; G must divide C; and
    num_groups is required — each a clear error naming the layer."""
    for build, options, match in [
            (gn, {"num_channels": 5}, "num_channels is 5, but the input has 4"),
            (gn, {"num_groups": 3}, r"num_channels \(4\) must be divisible by num_groups \(3\)"),
            (gn, {"num_groups": None}, "num_groups is required"),
            (gn, {"num_groups": 0}, "num_groups must be >= 1"),
            (gn, {"affine": 1}, "affine must be true or false"),
            (inorm, {"num_features": 3}, "num_features is 3, but the input has 4"),
            (inorm, {"momentum": 2}, "momentum must be <= 1")]:
        with pytest.raises(ValueError, match=match):
            build(**options)
    assert gn(num_channels=4).channels == 4 and inorm(num_features=4).channels == 4
    with pytest.raises(ValueError, match=r"instancenorm2d expects input \(N, C, H, W\)"):
        inorm((4, 6))
    with pytest.raises(ValueError, match="eps = 0 with one value per group"):
        gn((4,), num_groups=4, eps=0)


@pytest.mark.parametrize("train, track", [(True, True), (True, False), (False, False)])
def test_instance_statistics_over_one_value_are_an_error_as_in_torch(train, track):
    x = np.ones((2, 4, 1, 1))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        run(inorm((4, 1, 1), track_running_stats=track), FLOAT64, random_case()[1], x, x, train)


def test_eval_with_running_statistics_accepts_one_value_per_channel():
    """eval with track_running_stats uses the buffers, not the instance: 1×1 inputs are fine."""
    x = np.ones((2, 4, 1, 1))
    y, _, _, _ = run(inorm((4, 1, 1), track_running_stats=True), FLOAT64, random_case()[1], x,
                     x, train=False)
    assert np.all(np.isfinite(y))


def test_loaded_running_statistics_are_checked_like_batchnorms():
    spec = {"input_shape": [2, 2, 2], "layers": [{"type": "instancenorm2d",
                                                  "track_running_stats": True}],
            "loss": {"type": "mse"}}
    model = Model(spec)
    params = model.init_params()
    params["0.running_var"] = np.array([1.0, -1.0])
    with pytest.raises(ValueError, match="running_var"):
        model.check_params(params)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("norm", [{"type": "groupnorm", "num_groups": 2},
                                  {"type": "groupnorm", "num_groups": 4, "affine": False},
                                  {"type": "instancenorm2d", "affine": True},
                                  {"type": "instancenorm2d", "affine": True,
                                   "track_running_stats": True}])
def test_per_sample_norms_pass_the_verification_triangle(norm, mode):
    """Inside conv → norm → elu → dense, in train and eval mode: every float64 gradient within its
    error bound, mp analytic = mp FD to >= 20 digits (measured >= 27); and the interval
    certificate encloses every exact gradient."""
    spec = {"input_shape": [2, 3, 3], "seed": 1, "batch": 3, "mode": mode,
            "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 2, "bias": False},
                       norm, {"type": "elu"}, {"type": "flatten"}, {"type": "dense", "out": 2}],
            "loss": {"type": "softmax_cross_entropy"}}
    report = verify(Model(spec))
    assert report.passed and min(t.fd_digits for t in report.tensors) >= 20
    assert certify(Model(spec)).certified


def test_the_fd_sweep_batches_norm_parameters_and_agrees_with_the_analytic_gradient():
    """groupnorm's and instancenorm2d's γ, β are perturbed as batchnorm's (γ x̂ + β is linear in
    them): the batched sweep agrees with the analytic float64 gradient to FD accuracy
    (u^(2/3)-level: held to 1e-7 of each tensor's largest entry)."""
    spec = {"input_shape": [2, 4, 4], "seed": 3, "batch": 3,
            "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "bias": False},
                       {"type": "groupnorm", "num_groups": 2}, {"type": "tanh"},
                       {"type": "instancenorm2d", "affine": True, "track_running_stats": True},
                       {"type": "flatten"}, {"type": "dense", "out": 3}],
            "loss": {"type": "softmax_cross_entropy"}}
    model = Model(spec)
    params, x, y = model.prepare()
    params["1.weight"] = np.array([0.5, -1.5, 2.0, 1.25])
    params["3.bias"] = np.array([0.25, -0.75, 1.0, 0.0])
    grads, gx = fd_sweep(model, params, x, y)
    exact = model.loss_and_grads(FLOAT64, params, x, y)
    for name, fd in list(grads.items()) + [("x", gx)]:
        ref = exact.x if name == "x" else exact.params[name]
        assert np.max(np.abs(fd - ref)) <= 1e-7 * np.max(np.abs(ref)), name


def test_float32_and_the_bound_backend_compute_the_same_function():
    """float32 stays float32 through both layers; the bound backend's values are float64's bit
    for bit."""
    x, params, dy = random_case()
    for layer in (gn(), inorm(track_running_stats=True)):
        y32, dx32, g32, _ = run(layer, FLOAT32, params, x, dy)
        assert y32.dtype == dx32.dtype == np.float32
        assert all(v.dtype == np.float32 for v in g32.values())
        y64, dx64, g64, _ = run(layer, FLOAT64, params, x, dy)
        yb, dxb, gb, _ = run(layer, BOUND, params, x, dy)
        assert np.array_equal(y64, yb.v) and np.array_equal(dx64, dxb.v)
        assert all(np.array_equal(g64[k], gb[k].v) for k in g64)


def test_under_autocast_groupnorm_returns_float32_and_instancenorm_its_inputs_format():
    """torch.autocast puts group_norm on its float32 list (input cast up, float32 output);
    instance_norm is on no list (batch_norm's rule: the input's format, float32 statistics)."""
    x, params, _ = random_case((2, 4, 3, 2))
    bk = EmulatedBackend(Precision("fp16", "autocast"))
    x16 = store(x, "fp16")
    for layer, expected in ((gn(), "float32"), (inorm(), "fp16")):
        p = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()
             if k in layer.param_shapes()}
        y, _ = bk.forward_layer(layer, p, x16, ForwardState())
        assert format_of(y) == expected


def torch_fused_magnitude(layer, params, x, train):
    """|x·scale| + |μ·scale| + |β| per element, scale = γ/s: the terms of torch's fused forward
    y = x·scale + (β − μ·scale), whose rounding errors are a few u of this (not of |y|)."""
    c = layer.config
    n = x.shape[0]
    channel = lambda a: np.asarray(a).reshape(1, -1, 1, 1)               # noqa: E731
    if layer.type == "groupnorm":
        g = x.reshape(n, layer.groups, -1)
        mu = np.repeat(g.mean(axis=2), x.shape[1] // layer.groups, axis=1)[:, :, None, None]
        sd = np.repeat(np.sqrt(g.var(axis=2) + c["eps"]), x.shape[1] // layer.groups,
                       axis=1)[:, :, None, None]
    elif train or not c["track_running_stats"]:
        mu = x.mean(axis=(2, 3), keepdims=True)
        sd = np.sqrt(x.var(axis=(2, 3), keepdims=True) + c["eps"])
    else:
        mu, sd = channel(params["running_mean"]), np.sqrt(channel(params["running_var"]) + c["eps"])
    gamma = channel(params["weight"]) if c["affine"] else 1.0
    beta = channel(params["bias"]) if c["affine"] else 0.0
    return (np.abs(x) + np.abs(mu)) * np.abs(gamma) / sd + np.abs(beta)


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("case", [
    ("groupnorm", {"num_groups": 2}, True), ("groupnorm", {"num_groups": 1}, True),
    ("groupnorm", {"num_groups": 4, "affine": False, "eps": 0.1}, True),
    ("instancenorm2d", {"affine": True}, True),
    ("instancenorm2d", {"affine": True, "track_running_stats": True, "momentum": 0.3}, True),
    ("instancenorm2d", {"affine": True, "track_running_stats": True, "momentum": 0.3}, False),
    ("instancenorm2d", {"affine": False, "eps": 0.1}, False)], ids=str)
def test_group_and_instance_norm_match_torch_float64(case):
    """Output and input/weight/bias gradients within refnet's float64 bound of the exact values
    (plus, for the output, torch's fused y = x·scale + shift form: a few u·(|x·scale| + |shift|)),
    as torch's are; the running statistics after a train step equal torch's to rounding."""
    import torch
    kind, options, train = case
    x, params, dy = random_case((5, 4, 3, 2))
    layer = gn(**options) if kind == "groupnorm" else inorm(**options)
    yb, dxb, gb, state = run(layer, BOUND, params, x, dy, train)
    ym, dxm, gm, _ = run(layer, MP, params, x, dy, train)
    if kind == "groupnorm":
        module = torch.nn.GroupNorm(layer.groups, 4, layer.config["eps"], layer.config["affine"])
    else:
        c = layer.config
        module = torch.nn.InstanceNorm2d(4, c["eps"], c["momentum"], c["affine"],
                                         c["track_running_stats"])
    module = module.double()
    module.load_state_dict({k: torch.tensor(v) for k, v in params.items()
                            if k in module.state_dict()}, strict=False)
    module.train(train)
    tx = torch.tensor(x, requires_grad=True)
    ty = module(tx)
    ty.backward(torch.tensor(dy))
    fused = 4 * 2.0 ** -53 * torch_fused_magnitude(layer, params, x, train)
    checks = [(ty.detach().numpy(), yb, ym, fused), (tx.grad.numpy(), dxb, dxm, 0.0)]
    if layer.config["affine"]:
        checks += [(module.weight.grad.numpy(), gb["weight"], gm["weight"], 0.0),
                   (module.bias.grad.numpy(), gb["bias"], gm["bias"], 0.0)]
    for got, bound, exact, extra in checks:
        allowed = np.minimum(bound.e, bound.probabilistic_bound(8.0)) + extra
        assert np.all(np.abs(got - MP.to_numpy(exact)) <= allowed + reference_rounding(MP.to_numpy(exact)))
    if train and layer.config.get("track_running_stats"):
        assert np.allclose(state.updates["1.running_mean"], module.running_mean.numpy(),
                           rtol=4e-16, atol=1e-300)
        assert np.allclose(state.updates["1.running_var"], module.running_var.numpy(), rtol=4e-16)
        assert module.num_batches_tracked.item() == 0 and "1.num_batches_tracked" not in \
            state.updates
