"""Dropout (p = probability of dropping, inverted scaling) and residual blocks."""

import json
import math

import numpy as np
import pytest
from conftest import HAVE_TORCH

from refnet import BOUND, FLOAT64, Model, MPBackend, verify
from refnet.layers.base import ForwardState
from refnet.layers.dropout import Dropout, Dropout2d


def dropout(p, shape=(1000,), cls=Dropout):
    layer = cls({"type": cls.type, "p": p}, shape, "layers[0] (dropout)")
    layer.name = "0"
    return layer


def test_dropout_output_is_unbiased_within_five_standard_errors():
    """E[y] = x: with n = 10⁶ units and p = 0.3, mean(y/x) = 1 ± 5·√(p/((1 − p)n)) (the
    standard error of a mean of n i.i.d. m/(1 − p), whose variance is p/(1 − p))."""
    p, n = 0.3, 1_000_000
    x = np.random.default_rng(0).uniform(0.5, 2.0, (1, n))
    y, _ = dropout(p, (n,)).forward(FLOAT64, {}, x, ForwardState(rng=np.random.default_rng(1)))
    ratio = y / x
    assert abs(ratio.mean() - 1) <= 5 * math.sqrt(p / ((1 - p) * n))
    assert abs(np.mean(ratio == 0) - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_dropout_p0_is_the_identity_p1_gives_zeros_and_eval_is_the_identity():
    x = np.random.default_rng(0).standard_normal((3, 10))
    state = ForwardState(rng=np.random.default_rng(0))
    y0, c0 = dropout(0.0, (10,)).forward(FLOAT64, {}, x, state)
    assert np.array_equal(y0, x)
    layer = dropout(1.0, (10,))
    y1, c1 = layer.forward(FLOAT64, {}, x, state)
    dx1, _ = layer.backward(FLOAT64, {}, np.ones_like(x), c1)
    assert np.all(y1 == 0) and np.all(dx1 == 0) and not np.any(np.isnan(y1))
    ye, _ = dropout(0.5, (10,)).forward(FLOAT64, {}, x, ForwardState(train=False))
    assert np.array_equal(ye, x)


def test_the_same_seed_gives_the_same_mask_and_the_mask_is_kept_for_every_pass():
    x = np.ones((4, 20))
    a = dropout(0.5, (20,)).forward(FLOAT64, {}, x, ForwardState(rng=np.random.default_rng(3)))[0]
    b = dropout(0.5, (20,)).forward(FLOAT64, {}, x, ForwardState(rng=np.random.default_rng(3)))[0]
    assert np.array_equal(a, b)
    state = ForwardState(rng=np.random.default_rng(4))
    first = dropout(0.5, (20,)).forward(FLOAT64, {}, x, state)[0]
    again = dropout(0.5, (20,)).forward(FLOAT64, {}, x, state)[0]
    assert np.array_equal(first, again)


def test_dropout2d_drops_whole_channels():
    x = np.ones((8, 6, 3, 3))
    y, _ = dropout(0.5, (6, 3, 3), Dropout2d).forward(FLOAT64, {}, x,
                                                      ForwardState(rng=np.random.default_rng(0)))
    per_channel = y.reshape(8, 6, 9)
    assert np.all((per_channel == 0).all(axis=2) | (per_channel == 2).all(axis=2))
    assert 0 < np.mean(per_channel[:, :, 0] == 0) < 1


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), True, "half"])
def test_dropout_p_outside_0_1_is_rejected(p):
    with pytest.raises(ValueError, match=r"p \(probability of dropping\) must lie in \[0, 1\]"):
        dropout(p)


def test_dropout_gradient_is_verified_exactly_for_its_mask():
    spec = {"input_shape": [4], "seed": 0, "batch": 3,
            "layers": [{"type": "dense", "out": 6}, {"type": "tanh"}, {"type": "dropout", "p": 0.4},
                       {"type": "dense", "out": 2}], "loss": {"type": "mse"}}
    assert verify(Model(spec)).passed


# --- residual ------------------------------------------------------------------------------------

def residual_spec(body_last_init="xavier_normal", scale=1.0, shortcut="identity"):
    return {"input_shape": [5], "seed": 0, "batch": 3,
            "layers": [{"type": "residual", "scale": scale, "shortcut": shortcut,
                        "body": [{"type": "dense", "out": 5}, {"type": "relu"},
                                 {"type": "dense", "out": 5, "init": body_last_init,
                                  "bias_init": "zeros" if body_last_init == "zeros"
                                  else "torch_default"}]}],
            "loss": {"type": "mse"}}


def _upstream_and_dx(spec):
    model = Model(spec)
    params, x, y = model.prepare()
    g = model.loss_and_grads(FLOAT64, params, x, y)
    upstream = model.loss.backward(FLOAT64, g.forward.loss_cache)
    return g, upstream, x


def test_with_the_branch_gradient_zero_the_block_input_gets_the_upstream_gradient_exactly():
    """Body ending in a zero layer: no gradient flows back through the body, and dL/dh equals
    the upstream gradient bit for bit — the shortcut passes it with factor 1."""
    g, upstream, x = _upstream_and_dx(residual_spec(body_last_init="zeros"))
    assert np.array_equal(g.x, upstream)
    # Fixup / zero-init: the earlier branch layers get exactly zero gradient.
    assert np.all(g.params["0.body.0.weight"] == 0) and np.all(g.params["0.body.0.bias"] == 0)
    assert np.any(g.params["0.body.2.weight"] != 0)


def test_with_scale_zero_the_block_is_the_identity():
    g, upstream, x = _upstream_and_dx(residual_spec(scale=0.0))
    assert np.array_equal(g.forward.output, x)
    assert np.array_equal(g.x, upstream)


def test_residual_parameter_names_follow_body_and_shortcut_submodules():
    spec = residual_spec(shortcut=[{"type": "dense", "out": 5, "bias": False}])
    assert list(Model(spec).param_shapes()) == [
        "0.body.0.weight", "0.body.0.bias", "0.body.2.weight", "0.body.2.bias",
        "0.shortcut.0.weight"]
    assert verify(Model(spec)).passed


def test_residual_body_and_shortcut_shapes_must_match():
    spec = residual_spec()
    spec["layers"][0]["body"][-1]["out"] = 4
    with pytest.raises(ValueError, match=r"body's output shape \(4,\) differs from the "
                                         r"shortcut's \(5,\)"):
        Model(spec)


def test_a_deep_residual_mlps_first_layer_gradient_does_not_vanish_like_the_plain_nets():
    """20 blocks of dense-tanh with N(0, 0.01) weights: in the plain net the first layer's
    gradient is orders of magnitude below the last; through the shortcuts it is not."""
    body = lambda: [{"type": "dense", "out": 8, "init": {"name": "normal", "std": 0.01}},  # noqa
                    {"type": "tanh"}]
    plain = {"input_shape": [8], "seed": 0, "batch": 4, "loss": {"type": "mse"},
             "layers": [layer for _ in range(20) for layer in body()]}
    resnet = {**plain, "layers": [{"type": "residual", "body": body()} for _ in range(20)]}
    norms = []
    for spec, first, last in ((plain, "0.weight", "38.weight"),
                              (resnet, "0.body.0.weight", "19.body.0.weight")):
        model = Model(spec)
        params, x, y = model.prepare()
        g = model.loss_and_grads(FLOAT64, params, x, y)
        norms.append(np.linalg.norm(g.params[first]) / np.linalg.norm(g.params[last]))
    assert norms[0] < 1e-20 and norms[1] > 0.1, norms


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_residual_block_matches_a_torch_module_with_body_and_shortcut():
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.ReLU(),
                                            torch.nn.Linear(5, 3))
            self.shortcut = torch.nn.Sequential(torch.nn.Linear(5, 3, bias=False))

        def forward(self, h):
            return self.shortcut(h) + 0.5 * self.body(h)

    torch.manual_seed(0)
    net = torch.nn.Sequential(Block(), torch.nn.Tanh()).double()
    spec = {"input_shape": [5], "layers": [
        {"type": "residual", "scale": 0.5, "shortcut": [{"type": "dense", "out": 3, "bias": False}],
         "body": [{"type": "dense", "out": 5}, {"type": "relu"}, {"type": "dense", "out": 3}]},
        {"type": "tanh"}], "loss": {"type": "mse"}}
    model = Model(spec)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    params, x, y = model.prepare({k: v.detach().numpy() for k, v in net.state_dict().items()}, x, y)
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.mse_loss(net(tx), torch.tensor(y)).backward()
    g = model.loss_and_grads(FLOAT64, params, x, y)
    bounds = model.loss_and_grads(BOUND, params, x, y)
    mp = MPBackend(50)
    exact = model.loss_and_grads(mp, params, x, y)
    for name, p in net.named_parameters():
        ref = mp.to_numpy(exact.params[name])
        b = bounds.params[name]
        allowed = np.minimum(b.e, b.probabilistic_bound(8.0))   # the bound verify uses
        assert np.all(np.abs(p.grad.numpy() - ref) <= allowed), name
        assert np.all(np.abs(g.params[name] - ref) <= allowed), name


# --- the mask draw order, implemented from spec/operations.md's words ----------------------------

def _sample_shape_after(layer, shape):
    """The sample shape after ``layer``, for the layer types the mask tests use (a tiny shape
    rule, independent of refnet's layers: enough to know each dropout layer's input shape)."""
    kind = layer["type"]
    if kind == "dense":                           # on the last axis, as nn.Linear
        return tuple(shape[:-1]) + (layer["out"],)
    if kind == "conv2d":
        assert layer.get("padding") == "same" and layer.get("stride", 1) == 1, layer
        return (layer["out_channels"],) + shape[1:]
    if kind in ("maxpool2d", "avgpool2d"):
        k = layer["kernel_size"]
        s, pad = layer.get("stride", k), layer.get("padding", 0)
        return (shape[0],) + tuple((n + 2 * pad - k) // s + 1 for n in shape[1:])
    if kind == "global_avgpool":
        return (shape[0], 1, 1)
    if kind == "flatten":
        return (int(np.prod(shape)),)
    return shape          # activations, dropout, batchnorm, layernorm


def spec_masks(spec, batch, train=True, *, body_first=True, p0_draws=False, p1_draws=True):
    """The dropout masks spec/operations.md prescribes, {layer name: keep mask}, drawn here from
    its text alone: (1) one Generator, default_rng(SeedSequence(seed).spawn(3)[2]); (2) layers in
    forward order, depth first, a residual body before its shortcut; (3) one call
    rng.random(shape) per dropout layer, kept where u >= p, shape (N, *sample) for dropout and
    (N, C, 1, 1) for dropout2d; (4) p = 0 and eval draw nothing, p = 1 draws. The keywords
    switch single rules off, for the test that shows the comparison can fail."""
    masks = {}
    if not train:
        return masks
    rng = np.random.default_rng(np.random.SeedSequence(spec.get("seed", 0)).spawn(3)[2])

    def walk(layers, prefix, shape):
        for j, layer in enumerate(layers):
            name, kind = f"{prefix}{j}", layer["type"]
            if kind == "residual":
                branches = [("body", layer["body"])]
                if isinstance(layer.get("shortcut", "identity"), list):
                    branches.append(("shortcut", layer["shortcut"]))
                outs = [walk(branch, f"{name}.{label}.", shape)
                        for label, branch in (branches if body_first else branches[::-1])]
                shape = outs[0]                  # the body's and the shortcut's are equal
                continue
            p = layer.get("p", 0.5)
            draws = (p > 0 or p0_draws) and (p < 1 or p1_draws)
            if kind in ("dropout", "dropout2d") and draws:
                draw = (batch,) + shape if kind == "dropout" else (batch, shape[0], 1, 1)
                masks[name] = rng.random(draw) >= p
            shape = _sample_shape_after(layer, shape)
        return shape

    walk(spec["layers"], "", tuple(spec["input_shape"]))
    return masks


NESTED_DROPOUT = {
    "input_shape": [2, 4, 4], "seed": 7, "batch": 3, "loss": {"type": "mse"},
    "layers": [
        {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": "same"},
        {"type": "dropout2d", "p": 0.3},
        {"type": "residual",
         "body": [{"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": "same"},
                  {"type": "dropout", "p": 0.0},
                  {"type": "relu"},
                  {"type": "residual",
                   "body": [{"type": "dropout", "p": 0.5},
                            {"type": "conv2d", "out_channels": 3, "kernel_size": 1,
                             "padding": "same"}],
                   "shortcut": [{"type": "dropout2d", "p": 0.25}]},
                  {"type": "dropout", "p": 0.4}],
         "shortcut": [{"type": "conv2d", "out_channels": 3, "kernel_size": 1, "padding": "same"},
                      {"type": "dropout", "p": 0.2}]},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "residual", "body": [{"type": "dense", "out": 12}, {"type": "dropout", "p": 1.0}]},
        {"type": "dropout", "p": 0.6},
        {"type": "dense", "out": 2}]}


def refnet_masks(spec, train=True):
    model = Model(spec)
    params, x, y = model.prepare()
    state = model.default_state(train)
    model.forward(FLOAT64, params, x, y, state)
    return state


def test_an_implementation_of_the_written_draw_order_draws_refnets_masks():
    """Nested residual blocks (body before shortcut, a projection shortcut with its own dropout,
    a residual inside a body), dropout p = 0 (no draw), p = 1 (a draw), dropout2d ((N, C, 1, 1)):
    the masks drawn from spec/operations.md's text alone equal refnet's, name for name and bit
    for bit."""
    ours = spec_masks(NESTED_DROPOUT, NESTED_DROPOUT["batch"])
    theirs = refnet_masks(NESTED_DROPOUT).masks
    assert list(ours) == ["1", "2.body.3.body.0", "2.body.3.shortcut.0", "2.body.4",
                          "2.shortcut.1", "5.body.1", "6"]
    assert set(theirs) == set(ours)
    for name in ours:
        assert theirs[name].dtype == bool and np.array_equal(theirs[name], ours[name]), name
    assert ours["1"].shape == (3, 3, 1, 1) and ours["2.body.4"].shape == (3, 3, 4, 4)


@pytest.mark.parametrize("rule", [{"body_first": False}, {"p0_draws": True},
                                  {"p1_draws": False}], ids=lambda r: next(iter(r)))
def test_the_draw_order_check_fails_when_one_rule_is_broken(rule):
    """The comparison above can fail: drawing the shortcut before the body, drawing for p = 0,
    or not drawing for p = 1 gives, for some layer both drawers draw for, a different mask."""
    right = spec_masks(NESTED_DROPOUT, 3)
    wrong = spec_masks(NESTED_DROPOUT, 3, **rule)
    common = set(right) & set(wrong)
    assert common and any(not np.array_equal(right[n], wrong[n]) for n in common)


def test_eval_mode_draws_nothing_and_a_second_pass_reuses_the_masks():
    """Eval: no mask at all. Train: a second pass on the same state draws nothing (the
    generator's state is unchanged) and returns the same output."""
    assert refnet_masks(NESTED_DROPOUT, train=False).masks == {}
    model = Model(NESTED_DROPOUT)
    params, x, y = model.prepare()
    state = model.default_state(True)
    first = model.forward(FLOAT64, params, x, y, state).output
    before = json.dumps(state.rng.bit_generator.state)
    again = model.forward(FLOAT64, params, x, y, state).output
    assert json.dumps(state.rng.bit_generator.state) == before
    assert np.array_equal(first, again)
