"""refnet.testing: other projects' gradients held to refnet's exact ones within refnet's per-element
error bound for their dtype — passing an honest implementation's float32 and float64 gradients,
failing one element moved past its bound, with a message a pytest user can act on."""

import re

import numpy as np
import pytest
from conftest import HAVE_TORCH

from refnet import FLOAT32, FLOAT64, Model
from refnet.testing import allowances, assert_gradients_match

SPEC = {"input_shape": [2, 6, 6], "seed": 5, "batch": 3, "loss": {"type": "softmax_cross_entropy"},
        "layers": [{"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
                   {"type": "batchnorm"}, {"type": "tanh"},
                   {"type": "maxpool2d", "kernel_size": 2}, {"type": "flatten"},
                   {"type": "dense", "out": 4}]}


def _inputs(dtype):
    """The model, and its parameters and batch as a framework computing in dtype holds them."""
    model = Model(SPEC)
    params, x, y = model.prepare()
    d = np.float32 if dtype == "float32" else np.float64
    return model, {k: v.astype(d) for k, v in params.items()}, x.astype(d), y


def _refnet_grads(model, params, x, y, bk):
    """refnet's own float32 / float64 backend: an implementation of the same network."""
    g = model.loss_and_grads(bk, {k: np.asarray(v, np.float64) for k, v in params.items()},
                             np.asarray(x, np.float64), y)
    return {**{k: np.asarray(v, np.float64) for k, v in g.params.items()},
            "x": np.asarray(g.x, np.float64)}


@pytest.mark.parametrize("dtype, bk", [("float64", FLOAT64), ("float32", FLOAT32)])
def test_an_honest_implementations_gradients_pass_in_their_dtype(dtype, bk):
    """refnet's float32 and float64 backends are two implementations of the network: each
    passes the rule of its dtype, every element within 2 ulps + 8σ·u_d/u_64."""
    model, params, x, y = _inputs(dtype)
    results = assert_gradients_match(_refnet_grads(model, params, x, y, bk), model, params, x, y,
                                     dtype)
    assert len(results) == 7 and max(r.ratio for r in results) < 0.5


def test_float32_gradients_are_not_held_to_float64s_bound():
    """The bound is the dtype's: float32 gradients checked as float64 fail (2²⁹× too tight)."""
    model, params, x, y = _inputs("float32")
    with pytest.raises(AssertionError):
        assert_gradients_match(_refnet_grads(model, params, x, y, FLOAT32), model, params, x, y,
                               "float64")


def _smallest_allowance(table, skip=()):
    """(name, index, allowance in ulps) of the element with the smallest allowance in ulps."""
    best = None
    for name, (exact, allowed) in table.items():
        if name in skip:
            continue
        ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
        ulps = np.where(exact != 0, allowed / ulp, np.inf)
        i = np.unravel_index(int(np.argmin(ulps)), ulps.shape)
        if best is None or ulps[i] < best[2]:
            best = (name, i, float(ulps[i]))
    return best


@pytest.mark.parametrize("factor, passes", [(0.98, True), (1.02, False)])
def test_one_element_planted_just_inside_or_just_outside_its_bound(factor, passes):
    """The checker at its edge: one float32 element set to exact ± 0.98× its allowance passes,
    ± 1.02× fails (with every other element the honest float32 backend's)."""
    model, params, x, y = _inputs("float32")
    grads = _refnet_grads(model, params, x, y, FLOAT32)
    table = allowances(model, params, x, y, "float32")
    name, i, _ = _smallest_allowance(table)
    exact, allowed = table[name]
    grads[name] = grads[name].copy()
    grads[name][i] = exact[i] + factor * allowed[i]
    if passes:
        assert_gradients_match(grads, model, params, x, y, "float32")
    else:
        with pytest.raises(AssertionError, match=re.escape(f"{name}: 1 of")):
            assert_gradients_match(grads, model, params, x, y, "float32")


def test_one_element_off_by_100_ulps_fails_naming_tensor_element_ulps_and_bound():
    """100 ulps at an element whose bound is below 100 ulps: the message names the tensor, the
    worst element, its error in ulps and the bound, in one line per failing tensor."""
    model, params, x, y = _inputs("float32")
    grads = _refnet_grads(model, params, x, y, FLOAT32)
    table = allowances(model, params, x, y, "float32")
    name, i, bound = _smallest_allowance(table)
    assert bound < 100
    exact = table[name][0]
    ulp = float(np.spacing(np.float32(abs(exact[i]))))
    grads[name] = grads[name].copy()
    grads[name][i] = exact[i] + 100 * ulp
    with pytest.raises(AssertionError) as caught:
        assert_gradients_match(grads, model, params, x, y, "float32")
    message = str(caught.value)
    assert f"{name}: 1 of {exact.size} elements; worst {tuple(int(j) for j in i)}" in message
    assert re.search(r"error 10\d(\.\d+)? ulps > bound \d+(\.\d+)? ulps", message), message


def test_names_that_are_not_the_models_are_an_error():
    model, params, x, y = _inputs("float64")
    with pytest.raises(ValueError, match=r"\['nope'\] are not gradients of the model"):
        assert_gradients_match({"nope": np.zeros(3)}, model, params, x, y)


# --- torch -----------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_torchs_own_float32_gradients_pass_and_one_moved_100_ulps_fails():
    """The round trip in one call passes on a float32 torch module; the same gradients with one
    element 100 ulps off (where its bound is below that) fail."""
    import torch

    from refnet.interop.torch_import import from_torch
    from refnet.testing import assert_torch_module_gradients, torch_gradients
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
                              torch.nn.Tanh(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(27, 4))
    x = torch.randn(3, 2, 6, 6)
    y = torch.tensor([0, 3, 1])
    results = assert_torch_module_gradients(net, x, y, loss="softmax_cross_entropy")
    assert {r.name for r in results} == {k for k, _ in net.named_parameters()} | {"x"}
    assert max(r.ratio for r in results) < 0.5

    model, params = from_torch(net, x, loss="softmax_cross_entropy")
    grads, _ = torch_gradients(net, x, y, "softmax_cross_entropy", model)
    x64, y64 = x.double().numpy(), y.numpy()
    table = allowances(model, params, x64, y64, "float32")
    name, i, bound = _smallest_allowance(table)
    assert bound < 100
    exact = table[name][0]
    grads[name] = grads[name].copy()
    grads[name][i] = exact[i] + 100 * float(np.spacing(np.float32(abs(exact[i]))))
    with pytest.raises(AssertionError, match=re.escape(name)):
        assert_gradients_match(grads, model, params, x64, y64, "float32")


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_train_mode_dropout_is_refused_by_the_torch_round_trip():
    """torch and refnet would draw different masks: the call says what to do instead."""
    import torch

    from refnet.testing import assert_torch_module_gradients
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"module.eval\(\) or set p = 0"):
        assert_torch_module_gradients(net, torch.randn(4, 3), torch.randn(4, 2), loss="mse")


def test_an_exact_gradient_of_zero_reports_its_error_in_ulps_as_inf_not_an_overflow(monkeypatch):
    """Where the exact gradient is 0 (a bias right before a batchnorm), its ulp is the least
    subnormal, 4.9e-324: an error of 1e-16 is about 2e307 of them, and its allowance of 1e-15
    past the largest float. The match still passes or fails on error/allowance; a count in ulps
    past the largest float reads inf, where the division used to raise FloatingPointError
    under np.errstate(over="raise") (the suite's, and a strict caller's)."""
    import refnet.testing as testing
    model, params, x, y = _inputs("float64")
    name = "0.bias"
    want = np.zeros(3)
    monkeypatch.setattr(testing, "allowances",
                        lambda *args, **kwargs: {name: (want, np.full(3, 1e-15))})
    with np.errstate(over="raise"):
        (match,) = testing.gradient_matches({name: np.array([0.0, 1e-16, 0.0])}, model,
                                            params, x, y)
        (failing,) = testing.gradient_matches({name: np.array([0.0, 2e-15, 0.0])}, model,
                                              params, x, y)
    assert match.failing == 0 and match.ratio == pytest.approx(0.1)
    assert match.error_ulps == pytest.approx(1e-16 / 2.0 ** -1074)
    assert match.allowed_ulps == np.inf
    assert failing.failing == 1 and failing.worst_index == (1,)
