"""Model as data: the JSON spec, torch parameter names and layout, and clear errors on bad input."""

import numpy as np
import pytest
from conftest import small_spec

from refnet import FLOAT64, Model

SPEC = {"input_shape": [6], "seed": 0,
        "layers": [{"type": "dense", "out": 5, "init": "kaiming_normal", "bias_init": "zeros"},
                   {"type": "relu"},
                   {"type": "dense", "out": 4, "init": {"name": "normal", "std": 0.01}},
                   {"type": "leaky_relu", "slope": 0.02},
                   {"type": "dense", "out": 3, "bias": False},
                   {"type": "prelu"}],
        "loss": {"type": "softmax_cross_entropy", "reduction": "mean"}}


def test_parameter_names_and_shapes_follow_torch_sequential():
    """Linear weight (out, in) and bias (out,), named "<i>.weight" like nn.Sequential; PReLU's
    slope is "<i>.weight" of shape (num_parameters,)."""
    assert Model(SPEC).param_shapes() == {
        "0.weight": (5, 6), "0.bias": (5,), "2.weight": (4, 5), "2.bias": (4,),
        "4.weight": (3, 4), "5.weight": (1,)}


def test_spec_seed_gives_reproducible_params_and_data():
    a, b = Model(SPEC), Model(SPEC)
    pa, xa, ya = a.prepare()
    pb, xb, yb = b.prepare()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    other = Model({**SPEC, "seed": 1}).prepare()[0]
    assert not np.array_equal(pa["0.weight"], other["0.weight"])


def test_bias_init_and_zero_init_are_applied():
    params = Model(SPEC).init_params()
    assert np.all(params["0.bias"] == 0)
    assert np.all(params["5.weight"] == 0.25)          # PReLU's torch default


def test_backward_returns_every_parameter_gradient_and_the_input_gradient():
    model = Model(SPEC)
    params, x, y = model.prepare()
    g = model.loss_and_grads(FLOAT64, params, x, y)
    assert list(g.params) == list(model.param_shapes())
    assert all(g.params[k].shape == params[k].shape for k in params)
    assert g.x.shape == x.shape


def test_inputs_are_not_mutated():
    model = Model(small_spec("selu", loss="bce_with_logits"))
    params, x, y = model.prepare()
    copies = ({k: v.copy() for k, v in params.items()}, x.copy(), y.copy())
    model.loss_and_grads(FLOAT64, params, x, y)
    assert all(np.array_equal(params[k], copies[0][k]) for k in params)
    assert np.array_equal(x, copies[1]) and np.array_equal(y, copies[2])


# --- bad input: ValueError naming the layer or key, the expected and the actual ----------------

def _with(**changes):
    spec = {**SPEC, "layers": [dict(layer) for layer in SPEC["layers"]]}
    spec.update(changes)
    return spec


@pytest.mark.parametrize("spec, match", [
    (_with(layers=[{"type": "dense", "out": 3}, {"type": "swish"}]),
     r"layers\[1\]: unknown layer type 'swish'"),
    (_with(layers=[{"type": "dense", "out": 3, "init": "glorot"}]),
     r"layers\[0\] \(dense\) init: unknown init 'glorot'"),
    (_with(layers=[{"type": "dense", "out": 3, "bias_init": {"name": "xavier_uniform"}}]),
     None),   # valid spec, fails at init time (fan of a 1-D tensor): tested below
    (_with(loss={"type": "hinge"}), "loss: unknown type 'hinge'"),
    (_with(layers=[{"type": "dense"}]), r"layers\[0\] \(dense\): dense needs 'out'"),
    (_with(layers=[{"type": "dense", "out": 0}]), r"layers\[0\] \(dense\): out must be >= 1"),
    (_with(layers=[{"type": "dense", "out": 3, "units": 4}]), r"unknown key\(s\) \['units'\]"),
    (_with(layers=[{"type": "leaky_relu", "slope": "x"}]), r"layers\[0\] \(leaky_relu\): slope"),
    (_with(input_shape=[0]), "input_shape"),
    (_with(layers=[]), "layers must be a non-empty list"),
    ({**SPEC, "optimizer": "sgd"}, r"spec: unknown key\(s\) \['optimizer'\]"),
])
def test_bad_specs_raise_value_errors_naming_layer_expected_and_actual(spec, match):
    if match is None:
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            Model(spec).init_params()
        return
    with pytest.raises(ValueError, match=match):
        Model(spec)


def test_wrong_input_shape_empty_batch_and_non_finite_x_are_rejected():
    model = Model(SPEC)
    params = model.init_params()
    with pytest.raises(ValueError, match=r"input x: expected shape \(N, 6\), got \(2, 5\)"):
        model.prepare(params, np.zeros((2, 5)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="empty"):
        model.prepare(params, np.zeros((0, 6)), np.zeros(0, dtype=int))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((2, 6))
        x[1, 3] = bad
        with pytest.raises(ValueError, match=r"must be finite, got .* at index \(1, 3\)"):
            model.prepare(params, x, np.zeros(2, dtype=int))


def test_params_with_wrong_shape_missing_or_extra_names_are_rejected():
    model = Model(SPEC)
    params = model.init_params()
    bad = dict(params, **{"0.weight": np.zeros((6, 5))})
    with pytest.raises(ValueError, match=r"0\.weight \(layers\[0\] \(dense\)\) must have shape "
                                         r"\(5, 6\), got \(6, 5\)"):
        model.check_params(bad)
    missing = {k: v for k, v in params.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"missing \['2\.bias'\]"):
        model.check_params(missing)
    with pytest.raises(ValueError, match=r"unexpected \['9\.weight'\]"):
        model.check_params({**params, "9.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="0.bias must be finite"):
        model.check_params({**params, "0.bias": np.full(5, np.nan)})


def test_labels_out_of_range_are_rejected():
    model = Model(SPEC)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\], got \[7\]"):
        model.prepare(None, np.zeros((2, 6)), np.array([0, 7]))
