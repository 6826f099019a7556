"""The batched float64 finite-difference sweep equals one-at-a-time differences and agrees with
the analytic gradient to finite-difference accuracy."""

import numpy as np
import pytest

from refnet import BOUND, FLOAT32, FLOAT64, IntervalBackend, MPBackend, Precision
from refnet.layers.base import ForwardState
from refnet.layers.norm import BatchNorm
from refnet.layers.registry import build_layer
from refnet.lowp.emulation import EmulatedBackend, format_of, plain, store
from refnet.model import Model
from refnet.numerics.backend import fraction_of
from refnet.verification import fdsweep
from refnet.verification.fdsweep import U64, _step, fd_sweep


def one_at_a_time(model, params, x, y, name, index):
    state = model.default_state()
    model.forward(FLOAT64, params, x, y, state)
    base = x if name == "x" else params[name]
    step = _step(base)
    losses = []
    for sign in (1, -1):
        p, xx = dict(params), x.copy()
        if name == "x":
            xx[index] += sign * step
        else:
            p[name] = params[name].copy()
            p[name][index] += sign * step
        losses.append(float(model.forward(FLOAT64, p, xx, y, ForwardState(
            train=state.train, masks=state.masks)).loss))
    return (losses[0] - losses[1]) / (2 * step)


@pytest.mark.parametrize("example", ["small-cnn", "small-resnet", "relu-mlp-kaiming"])
def test_the_batched_sweep_equals_one_at_a_time_differences(example):
    """Same function, same steps; the batched one forms z ± h·r instead of rounding inside the
    perturbed GEMM, so the losses differ by a few ulps of L and the differences by about
    u·|L|/h (≈ 1e-11 relative to O(1) gradients): held to 1e-8 absolute, checked on 3 elements
    of every tensor."""
    model = Model.load(f"spec/examples/{example}.json")
    params, x, y = model.prepare()
    grads, gx = fd_sweep(model, params, x, y)
    rng = np.random.default_rng(0)
    for name, fd in list(grads.items()) + [("x", gx)]:
        for _ in range(3):
            index = tuple(int(rng.integers(0, s)) for s in fd.shape)
            expected = one_at_a_time(model, params, x, y, name, index)
            assert abs(fd[index] - expected) <= 1e-8, (name, index, fd[index], expected)


def test_the_sweep_agrees_with_the_analytic_gradient_to_fd_accuracy():
    """Central differences with h = u^(1/3) err by ~u^(2/3)·(|L| + |f'''|): 1e-9 relative here
    (measured 6e-11 .. 4e-9 on the small CNN); held to 1e-7 of each tensor's largest entry."""
    model = Model.load("spec/examples/small-cnn.json")
    params, x, y = model.prepare()
    grads, gx = fd_sweep(model, params, x, y)
    exact = model.loss_and_grads(FLOAT64, params, x, y)
    for name, fd in list(grads.items()) + [("x", gx)]:
        ref = exact.x if name == "x" else exact.params[name]
        assert np.max(np.abs(fd - ref)) <= 1e-7 * np.max(np.abs(ref)), name
    assert U64 == 2.0 ** -53


# --- every element, against its one-at-a-time difference, to a bound from the error analysis ---

# Small models whose first layer is linear in its input (the input sweep starts above it, from
# z ± h·r), with batch statistics and dropout masks above it (train mode), and dense acting on
# the last axis of (N, T, F): every element of every tensor is checked.
SWEEP_MODELS = {
    "dense-batchnorm-dropout": {
        "input_shape": [5], "seed": 1, "batch": 3, "loss": {"type": "softmax_cross_entropy"},
        "layers": [{"type": "dense", "out": 6}, {"type": "batchnorm"}, {"type": "tanh"},
                   {"type": "dropout", "p": 0.3}, {"type": "dense", "out": 3}]},
    "conv-strided-grouped-batchnorm-dropout2d": {
        "input_shape": [2, 5, 5], "seed": 2, "batch": 2, "loss": {"type": "softmax_cross_entropy"},
        "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "stride": 2,
                    "padding": 1, "groups": 2}, {"type": "batchnorm"}, {"type": "relu"},
                   {"type": "dropout2d", "p": 0.25}, {"type": "flatten"},
                   {"type": "dense", "out": 3}]},
    # L1 and L2 on the dense weights: the stacked copies run the layers and the loss only, so
    # the sweep adds each weight element's penalty difference itself.
    "dense-regularized": {
        "input_shape": [4], "seed": 4, "batch": 3, "loss": {"type": "softmax_cross_entropy"},
        "regularization": {"l1": 0.05, "l2": 0.2},
        "layers": [{"type": "dense", "out": 5}, {"type": "tanh"}, {"type": "dense", "out": 3}]},
    # A residual block (its inner tensors: the block's own forward on its base input, one copy
    # at a time, the layers above stacked), prelu (not linear in its slope: the same), and L1/L2
    # on every conv/dense weight, those inside the block included.
    "residual-prelu-regularized": {
        "input_shape": [2, 4, 4], "seed": 5, "batch": 3, "loss": {"type": "softmax_cross_entropy"},
        "regularization": {"l1": 0.05, "l2": 0.2},
        "layers": [{"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
                   {"type": "residual", "shortcut": "identity", "body": [
                       {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1,
                        "bias": False}, {"type": "batchnorm"}, {"type": "relu"},
                       {"type": "conv2d", "out_channels": 3, "kernel_size": 1}]},
                   {"type": "prelu"}, {"type": "flatten"}, {"type": "dense", "out": 2}]},
    "dense-on-a-sequence": {
        "input_shape": [3, 4], "seed": 3, "batch": 2, "loss": {"type": "mse"},
        "layers": [{"type": "dense", "out": 5}, {"type": "tanh"}, {"type": "dense", "out": 2}]},
}


def rounding_bound(model, params, x, y):
    """Per tensor, the most a batched difference may differ from its one-at-a-time difference
    by rounding alone, elementwise:

        2λσ/h + |g|·u·(|θ| + h)/h

    Both are (L₊ − L₋)/2h of the same function with the same h. The four losses (two each) are
    float64 evaluations of the same formula — the sweep's reorder it (a stacked batch with
    per-copy statistics, z + h·r instead of the perturbed GEMM) — so each lies within λσ of its
    exact value, σ the probabilistic error scale of the base loss (errorbound.py, λ = LAMBDA; the
    copies are O(h) from the base, which moves σ by a relative O(h)): 4λσ/2h. And a
    one-at-a-time difference steps by fl(θᵢ ± h) − θᵢ, within u·(|θᵢ| + h) of ±h, where the
    linear responses step by h exactly: |g|·2u(|θ| + h)/2h more, g the float64 gradient."""
    from refnet import BOUND
    from refnet.numerics.errorbound import LAMBDA
    state = model.default_state()
    model.forward(FLOAT64, params, x, y, state)
    loss = model.forward(BOUND, params, x, y, ForwardState(train=state.train, masks=state.masks))
    sigma = float(loss.loss.sigma)
    exact = model.loss_and_grads(FLOAT64, params, x, y)
    bounds = {}
    for name, g in list(exact.params.items()) + [("x", exact.x)]:
        theta = x if name == "x" else params[name]
        h = _step(theta)
        bounds[name] = 2 * LAMBDA * sigma / h + np.abs(g) * U64 * (np.abs(theta) + h) / h
    return bounds


def rounding_offenders(model, params, x, y):
    """Every (tensor, element) whose batched difference is farther than rounding_bound from its
    one-at-a-time difference."""
    grads, gx = fd_sweep(model, params, x, y)
    bounds = rounding_bound(model, params, x, y)
    offenders = []
    for name, fd in list(grads.items()) + [("x", gx)]:
        for index in np.ndindex(fd.shape):
            expected = one_at_a_time(model, params, x, y, name, index)
            if not abs(fd[index] - expected) <= bounds[name][index]:
                offenders.append((name, index))
    return offenders


@pytest.mark.parametrize("example", sorted(SWEEP_MODELS))
def test_every_batched_difference_equals_its_one_at_a_time_difference_up_to_rounding(example):
    """Every parameter and input element's batched difference — the input ones from the first
    layer's response to a one-hot sample, written into its sample of the copy — lies within
    rounding_bound of the one-at-a-time difference (measured: 0 to 3e-2 of the bound, here and on
    small-cnn and relu-mlp-kaiming)."""
    model = Model(SWEEP_MODELS[example])
    assert model.layers[0].type in fdsweep.LINEAR_IN_INPUT
    params, x, y = model.prepare()
    assert rounding_offenders(model, params, x, y) == []


def _planted(monkeypatch, function, target, eta=None, layer=None, name=None):
    """Wrap fdsweep.<function> (the input copies, or the parameter copies — linear responses
    or the layer's own forward — of ``layer``'s tensor ``name``) to make one element's copies
    wrong: its response scaled by 1 + eta, or (eta None) moved to the next sample."""
    original = getattr(fdsweep, function)

    def wrapper(*args):
        stacked = original(*args)
        index = args[2]                                 # (ndim, k): the chunk's elements
        if layer is not None and (args[0] is not layer or args[1] != name):
            return stacked
        for i in np.flatnonzero((index.T == np.array(target)).all(axis=1)):
            plus, minus = stacked[2 * i], stacked[2 * i + 1]
            if eta is not None:
                hr = (plus - minus) / 2                 # h·r, up to rounding
                plus += eta * hr
                minus -= eta * hr
            else:
                n, z = target[0], args[3]
                for copy in (plus, minus):
                    copy[(n + 1) % copy.shape[0]] += copy[n] - z[n]
                    copy[n] = z[n]
        return stacked
    monkeypatch.setattr(fdsweep, function, wrapper)


def _largest_gradient(model, params, x, y, name):
    exact = model.loss_and_grads(FLOAT64, params, x, y)
    g = exact.x if name == "x" else exact.params[name]
    index = np.unravel_index(int(np.argmax(np.abs(g))), g.shape)
    return tuple(int(i) for i in index), float(abs(g[index]))


@pytest.mark.parametrize("example", ["dense-batchnorm-dropout",
                                     "conv-strided-grouped-batchnorm-dropout2d"])
def test_the_check_catches_an_input_response_off_by_twice_the_rounding_bound(example,
                                                                               monkeypatch):
    """The input element with the largest gradient g has its response scaled by 1 + η, η =
    2·bound/|g|: its difference moves by η·g, twice its rounding bound (η below 1e-7), and
    the check names exactly that element."""
    model = Model(SWEEP_MODELS[example])
    params, x, y = model.prepare()
    target, g = _largest_gradient(model, params, x, y, "x")
    eta = 2 * rounding_bound(model, params, x, y)["x"][target] / g
    assert eta < 1e-7
    _planted(monkeypatch, "_input_copies", target, eta=eta)
    assert rounding_offenders(model, params, x, y) == [("x", target)]


def test_the_check_catches_a_parameter_response_off_by_twice_the_rounding_bound(monkeypatch):
    """As for the input: the conv weight element with the largest gradient, its response scaled
    so that its difference moves by twice its bound; exactly it is named."""
    model = Model(SWEEP_MODELS["conv-strided-grouped-batchnorm-dropout2d"])
    params, x, y = model.prepare()
    target, g = _largest_gradient(model, params, x, y, "0.weight")
    eta = 2 * rounding_bound(model, params, x, y)["0.weight"][target] / g
    _planted(monkeypatch, "_param_copies", target, eta=eta, layer=model.layers[0], name="weight")
    assert rounding_offenders(model, params, x, y) == [("0.weight", target)]


def test_the_check_catches_a_residual_blocks_inner_copy_off_by_twice_the_rounding_bound(
        monkeypatch):
    """The copies of a tensor inside a residual block (the block's own forward with θᵢ ± h):
    the batchnorm γ element inside it with the largest gradient has its copies' change
    h·r scaled so that its difference moves by twice its bound; exactly it is named."""
    model = Model(SWEEP_MODELS["residual-prelu-regularized"])
    params, x, y = model.prepare()
    name = "1.body.1.weight"
    assert name not in model.regularized                  # its gradient is the data loss's alone
    target, g = _largest_gradient(model, params, x, y, name)
    eta = 2 * rounding_bound(model, params, x, y)[name][target] / g
    _planted(monkeypatch, "_own_copies", target, eta=eta, layer=model.layers[1],
             name="body.1.weight")
    assert rounding_offenders(model, params, x, y) == [(name, target)]


def test_the_check_catches_an_input_response_written_into_the_wrong_sample(monkeypatch):
    """The response to x[0, 1, 2, 2] written into sample 1 of its copies (an indexing slip): the
    difference is then that of x[1, 1, 2, 2], off by O(|g|)."""
    model = Model(SWEEP_MODELS["conv-strided-grouped-batchnorm-dropout2d"])
    params, x, y = model.prepare()
    _planted(monkeypatch, "_input_copies", (0, 1, 2, 2))
    assert rounding_offenders(model, params, x, y) == [("x", (0, 1, 2, 2))]


# --- the forward-only stacked batch (ForwardState.groups > 1), in every backend ---------------
# The sweep runs its perturbed copies as G batches stacked on axis 0: batchnorm takes each
# batch's own statistics (_grouped_forward) and max pooling skips the argmax only backward
# reads. These hold the two paths, in every backend, to the layers' ordinary forward.

STACK_G, STACK_N, STACK_SAMPLE = 3, 4, (3, 2, 2)
MP60 = MPBackend(60)


def _stacked_batchnorm_case():
    """G = 3 batches of 4 off-centre samples (3, 2, 2), x exactly representable in fp16 and
    γ, β in float32, so that every backend starts from the same numbers; the layer."""
    rng = np.random.default_rng(7)
    x = 5 * rng.standard_normal((STACK_G * STACK_N,) + STACK_SAMPLE) + 12
    x = np.asarray(plain(store(x, "fp16")), dtype=np.float64)
    c = STACK_SAMPLE[0]
    params = {"weight": rng.standard_normal(c).astype(np.float32).astype(np.float64),
              "bias": rng.standard_normal(c).astype(np.float32).astype(np.float64),
              "running_mean": np.zeros(c), "running_var": np.ones(c),
              "num_batches_tracked": np.zeros(())}
    layer = BatchNorm({"type": "batchnorm"}, STACK_SAMPLE, "layers[1] (batchnorm)")
    layer.name = "1"
    return layer, params, x


def _forward(layer, bk, params, x, groups):
    p = {k: bk.asarray(v) if v.shape else v for k, v in params.items()}
    return layer.forward(bk, p, bk.asarray(x), ForwardState(train=True, groups=groups))


def test_a_stacked_batchnorm_normalizes_each_batch_with_its_own_statistics_exactly_in_mp():
    """At 60 digits the stacked forward (G = 3) equals the three batches' own forwards element
    for element: both form the same correctly rounded operations, each sum exact and rounded
    once. Statistics pooled over the stack, or an affine map applied to the wrong channel,
    differ at the first digit."""
    layer, params, x = _stacked_batchnorm_case()
    stacked = np.asarray(_forward(layer, MP60, params, x, STACK_G)[0], dtype=object)
    own = np.concatenate([np.asarray(_forward(layer, MP60, params, x[g * STACK_N:(g + 1) * STACK_N],
                                              1)[0], dtype=object) for g in range(STACK_G)])
    assert stacked.shape == x.shape and np.all(stacked == own)


def test_a_stacked_batchnorm_is_as_accurate_as_its_error_analysis_in_every_float_backend():
    """Against the 60-digit result (its own error ~1e-60, negligible):

    - float64 within e, the rigorous running error bound of this very computation (the bound
      backend's values are float64's bit for bit): the two-pass statistics of the ordinary
      forward, in the stacked layout;
    - float32 (float32 out) within 2·(u32/u64)·e: the same analysis in float32's unit (first
      order; the factor 2 covers the second-order terms, < 1e-6 of the first at u32; x, γ, β
      are float32 numbers, and ε's own rounding to float32, ≤ u32·1e-5 against σ² ≈ 25,
      moves x̂ by ~1e-14);
    - the fp16 emulation (autocast: batch_norm keeps its input's format, float32 statistics)
      within that float32 error plus the one rounding of its stored output, u16·|y| + 2⁻²⁵
      (half fp16's subnormal spacing, for outputs near 0), u16 = 2⁻¹¹;
    - intervals at 100 bits enclose it."""
    layer, params, x = _stacked_batchnorm_case()
    exact_mp = _forward(layer, MP60, params, x, STACK_G)[0]
    exact = MP60.to_numpy(exact_mp)
    y64 = _forward(layer, FLOAT64, params, x, STACK_G)[0]
    yb = _forward(layer, BOUND, params, x, STACK_G)[0]
    assert np.array_equal(yb.v, y64)
    assert np.all(np.abs(y64 - exact) <= yb.e)
    e32 = 2 * (2.0 ** -24 / U64) * yb.e
    y32 = _forward(layer, FLOAT32, params, x, STACK_G)[0]
    assert y32.dtype == np.float32 and np.all(np.abs(y32 - exact) <= e32)
    emulated = EmulatedBackend(Precision("fp16", "autocast"))
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    y16, _ = emulated.forward_layer(layer, p32, store(x, "fp16"),
                                    ForwardState(train=True, groups=STACK_G))
    assert format_of(y16) == "fp16"
    y16 = np.asarray(plain(y16), dtype=np.float64)
    assert np.all(np.abs(y16 - exact) <= e32 + 2.0 ** -11 * (np.abs(exact) + e32) + 2.0 ** -25)
    ib = IntervalBackend(100)
    lo, hi = (ib.to_fractions(b) for b in ib.bounds(_forward(layer, ib, params, x, STACK_G)[0]))
    rational = np.frompyfunc(fraction_of, 1, 1)(np.asarray(exact_mp, dtype=object))
    assert np.all((lo <= rational) & (rational <= hi))


def test_a_stacked_batchnorm_takes_two_pass_statistics_accurate_far_off_centre():
    """Data 1e4 off centre with unit spread (|μ|/s = 1e4, affine false): the two-pass variance
    Σ(x − μ)²/m errs only through μ's rounding, ~m·u·|μ|/s ≈ 2e-11 in x̂, and the rigorous
    bound e of the computation says so (1.2e-10); a one-pass Σx²/m − μ² cancels (μ/s)² = 1e8
    (6e-8 measured, and its bound as large). Held: float64 within e of the 60-digit result,
    and e below 1e-9."""
    layer = BatchNorm({"type": "batchnorm", "affine": False}, STACK_SAMPLE,
                      "layers[1] (batchnorm)")
    layer.name = "1"
    x = np.random.default_rng(7).standard_normal((STACK_G * STACK_N,) + STACK_SAMPLE) + 1e4
    buffers = {"running_mean": np.zeros(3), "running_var": np.ones(3),
               "num_batches_tracked": np.zeros(())}
    exact = MP60.to_numpy(_forward(layer, MP60, buffers, x, STACK_G)[0])
    y64 = _forward(layer, FLOAT64, buffers, x, STACK_G)[0]
    bound = _forward(layer, BOUND, buffers, x, STACK_G)[0].e
    assert np.all(np.abs(y64 - exact) <= bound) and np.max(bound) < 1e-9


@pytest.mark.parametrize("config", [
    {"type": "maxpool2d", "kernel_size": 2},                                    # strided views
    {"type": "maxpool2d", "kernel_size": [2, 3], "stride": [1, 2], "dilation": [3, 1]},
    {"type": "maxpool2d", "kernel_size": 3, "stride": 2, "padding": 1},         # padded groups
    {"type": "adaptive_maxpool2d", "output_size": [2, 3]}], ids=str)
def test_a_stacked_maxpool_gives_the_ordinary_output_without_the_argmax_in_every_backend(config):
    """Max pooling rounds nothing, so with groups > 1 its output is the ordinary forward's
    value for value in every backend — from the strided views of unpadded windows (also
    dilated and strided, per axis), the groups of windows that reach padding, adaptive
    windows; the cache, the argmax only backward and kink_signature read, is
    None (the inputs hold a 4-way tie: the value is the same whichever maximum wins)."""
    layer = build_layer(config, (2, 5, 5), "layers[0]", "0")
    x = np.random.default_rng(3).standard_normal((6, 2, 5, 5))
    x[0, 0, :2, :2] = 1.5
    emulated = EmulatedBackend(Precision("fp16", "autocast"))

    def run(bk, state):
        if bk is emulated:                      # the layer's own cache comes first in its
            y, ecache = emulated.forward_layer(layer, {}, store(x, "fp16"), state)
            return y, ecache[0]
        return layer.forward(bk, {}, bk.asarray(x), state)

    for bk in (FLOAT64, FLOAT32, MP60, BOUND, IntervalBackend(100), emulated):
        ordinary, argmax = run(bk, ForwardState())
        stacked, cache = run(bk, ForwardState(groups=3))
        assert argmax is not None and cache is None, bk
        values = (lambda a: a.v) if bk is BOUND else np.asarray                 # noqa: E731
        assert np.array_equal(values(stacked), values(ordinary)), bk
        if bk is BOUND:
            assert np.array_equal(stacked.e, ordinary.e)
        if bk is emulated:
            assert format_of(stacked) == format_of(ordinary) == "fp16"
