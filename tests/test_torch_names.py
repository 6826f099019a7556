"""A layer's torch_name gives its tensors the names of the torch module it came from: the model
takes parameters under either naming, names each gradient as its parameter was given, runs on
refnet's names inside (so the verifier is unchanged), and refuses names that are not unique."""

import numpy as np
import pytest

from refnet import FLOAT64, Model, verify

SPEC = {"input_shape": [3], "seed": 1, "batch": 4, "loss": {"type": "mse"},
        "layers": [{"type": "dense", "out": 4, "torch_name": "stem.fc"},
                   {"type": "batchnorm", "torch_name": "stem.bn"}, {"type": "tanh"},
                   {"type": "residual", "scale": 0.5,
                    "body": [{"type": "dense", "out": 4, "torch_name": "blocks.0.fc"}]},
                   {"type": "dense", "out": 2, "torch_name": "head"}]}


def test_a_layers_tensors_are_also_named_by_its_torch_name():
    model = Model(SPEC)
    assert model.torch_names["0.weight"] == "stem.fc.weight"
    assert model.torch_names["1.running_var"] == "stem.bn.running_var"
    assert model.torch_names["3.body.0.bias"] == "blocks.0.fc.bias"
    assert list(model.param_shapes())[0] == "0.weight"          # refnet's names inside


def test_gradients_come_back_under_the_names_the_parameters_were_given():
    """torch-named parameters in, torch-named gradients out; refnet's in, refnet's out; the
    values are the same."""
    model = Model(SPEC)
    params, x, y = model.prepare()
    torch_named = model.torch_named(params)
    a = model.loss_and_grads(FLOAT64, torch_named, x, y)
    b = model.loss_and_grads(FLOAT64, params, x, y)
    assert list(a.params) == [model.torch_name(k) for k in b.params]
    assert "head.weight" in a.params and "4.weight" in b.params
    for k, g in b.params.items():
        assert np.array_equal(a.params[model.torch_name(k)], g)


def test_check_params_and_verify_take_torch_names():
    """A torch state_dict's names load (buffers included) and the verifier passes on them; a
    missing tensor is reported under its torch name."""
    model = Model(SPEC)
    params = model.torch_named(model.init_params())
    checked = model.check_params(params)
    assert set(checked) == set(model.param_shapes()) | set(model.buffer_shapes())
    assert verify(model, params).passed
    del params["head.bias"]
    with pytest.raises(ValueError, match=r"missing \['head.bias'\]"):
        model.check_params(params)


def test_a_torch_name_that_overlaps_another_tensors_refnet_name_is_read_by_the_whole_dict():
    """torch's Sequential(Sequential(Linear, Linear), Linear) is refnet's three dense layers:
    torch's "1.weight" is refnet's "2.weight", while refnet's "1.weight" is torch's
    "0.1.weight". A dict all in refnet's names is read as such, any other in torch's."""
    model = Model({"input_shape": [3], "loss": {"type": "mse"},
                   "layers": [{"type": "dense", "out": 3, "torch_name": "0.0"},
                              {"type": "dense", "out": 3, "torch_name": "0.1"},
                              {"type": "dense", "out": 2, "torch_name": "1"}]})
    params = model.init_params()
    for given in (params, model.torch_named(params)):
        checked = model.check_params(given)
        assert all(np.array_equal(checked[k], params[k]) for k in params)


@pytest.mark.parametrize("layers, needle", [
    ([{"type": "dense", "out": 2, "torch_name": "a"}, {"type": "dense", "out": 2,
                                                       "torch_name": "a"}],
     r"has the name of a tensor of layers\[0\]"),
    ([{"type": "dense", "out": 2, "torch_name": "a..b"}], "torch_name must be a torch module path"),
    ([{"type": "dense", "out": 2, "torch_name": 3}], "torch_name must be a torch module path"),
])
def test_torch_names_must_be_module_paths_and_unique(layers, needle):
    with pytest.raises(ValueError, match=needle):
        Model({"input_shape": [2], "layers": layers, "loss": {"type": "mse"}})


def test_the_root_module_is_the_empty_torch_name():
    """An imported nn.Linear itself: its tensors are "weight" and "bias"."""
    model = Model({"input_shape": [3], "loss": {"type": "mse"},
                   "layers": [{"type": "dense", "out": 2, "torch_name": ""}]})
    assert model.torch_names == {"0.weight": "weight", "0.bias": "bias"}
