"""The batched float64 finite-difference sweep equals one-at-a-time differences and agrees with
the analytic gradient to finite-difference accuracy."""

import numpy as np
import pytest

from refnet import FLOAT64
from refnet.layers.base import ForwardState
from refnet.model import Model
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
    """Wrap fdsweep.<function> (the input copies, or the parameter copies of ``layer``'s tensor
    ``name``) to make one element's copies wrong: its response scaled by 1 + eta, or (eta
    None) moved to the next sample."""
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


def test_the_check_catches_an_input_response_written_into_the_wrong_sample(monkeypatch):
    """The response to x[0, 1, 2, 2] written into sample 1 of its copies (an indexing slip): the
    difference is then that of x[1, 1, 2, 2], off by O(|g|)."""
    model = Model(SWEEP_MODELS["conv-strided-grouped-batchnorm-dropout2d"])
    params, x, y = model.prepare()
    _planted(monkeypatch, "_input_copies", (0, 1, 2, 2))
    assert rounding_offenders(model, params, x, y) == [("x", (0, 1, 2, 2))]
