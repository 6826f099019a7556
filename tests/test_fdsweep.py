"""The batched float64 finite-difference sweep equals one-at-a-time differences and agrees with
the analytic gradient to finite-difference accuracy."""

import numpy as np
import pytest

from refnet import FLOAT64
from refnet.layers.base import ForwardState
from refnet.model import Model
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
