"""Regularization that selects no parameter: the penalty is a sum of nothing, exactly 0."""

import numpy as np
import pytest

from refnet import BOUND, FLOAT32, FLOAT64, Model, MPBackend, verify
from refnet.lowp.emulation import Precision, run
from refnet.numerics.interval import IntervalBackend
from refnet.regularize import penalty

# A net with a parameter (PReLU's slope) but no dense/conv weight: "weights" selects nothing.
NO_WEIGHTS = {"input_shape": [4], "seed": 3, "batch": 3, "loss": {"type": "mse"},
              "layers": [{"type": "prelu", "init": 0.2}, {"type": "tanh"}]}
DENSE = {"input_shape": [3], "seed": 1, "batch": 3, "loss": {"type": "bce_with_logits"},
         "layers": [{"type": "dense", "out": 4}, {"type": "softplus"},
                    {"type": "dense", "out": 2}]}


def with_regularization(spec, **reg):
    return {**spec, "regularization": {"l1": 0.03, "l2": 0.2, **reg}}


def interval_endpoints(ib, a):
    lo, hi = ib.bounds(np.asarray(a, dtype=object))
    return [float(v) for v in np.ravel(lo)] + [float(v) for v in np.ravel(hi)]


@pytest.mark.parametrize("bk", [FLOAT64, FLOAT32, MPBackend(30), BOUND, IntervalBackend(80)],
                         ids=lambda bk: bk.name)
def test_a_penalty_over_no_parameter_is_exactly_zero_with_no_gradient_in_every_backend(bk):
    """penalty(bk, ..., names=[]) is the backend's exact 0 (its error bound 0, its interval
    [0, 0]), not None: ``loss + R`` then works and changes nothing."""
    total, grads = penalty(bk, {"0.weight": bk.asarray(np.ones((2, 2)))}, [], 0.5, 0.25)
    assert grads == {}
    if bk is BOUND:
        assert float(total.v) == 0.0 and float(total.e) == 0.0
    elif isinstance(bk, IntervalBackend):
        assert interval_endpoints(bk, total) == [0.0, 0.0]
    else:
        assert float(bk.to_numpy(total)) == 0.0


@pytest.mark.parametrize("spec, reg", [(NO_WEIGHTS, {}), (DENSE, {"params": []})],
                         ids=["no-dense-layer", "empty-list"])
def test_a_regularization_selecting_nothing_leaves_loss_and_gradients_bit_for_bit_unchanged(spec,
                                                                                           reg):
    """In float64, float32, mp, the error bound (values and bounds), the interval certificate
    (endpoints) and the fp16 emulation, the model with the empty penalty gives exactly the loss
    and gradients of the model without ``regularization`` (torch adds 0; refnet used to crash
    with a TypeError at ``loss + reg``)."""
    plain, regularized = Model(spec), Model(with_regularization(spec, **reg))
    assert regularized.regularized == []
    params, x, y = plain.prepare()

    def flat(bk, model):
        g = model.loss_and_grads(bk, params, x, y)
        tensors = [g.loss, g.x] + [g.params[k] for k in model.param_shapes()]
        if bk is BOUND:
            return [np.asarray(a.v).tolist() for a in tensors] + \
                   [np.asarray(a.e).tolist() for a in tensors]
        if isinstance(bk, IntervalBackend):
            return [interval_endpoints(bk, a) for a in tensors]
        return [bk.to_numpy(a).tolist() for a in tensors]

    for bk in (FLOAT64, FLOAT32, MPBackend(30), BOUND, IntervalBackend(80)):
        assert flat(bk, regularized) == flat(bk, plain), bk.name
    fp16 = Precision("fp16")
    a, b = run(plain, fp16, params, x, y), run(regularized, fp16, params, x, y)
    assert a.loss == b.loss
    assert all(np.array_equal(a.grads[k], b.grads[k]) for k in a.grads)


@pytest.mark.parametrize("spec, reg", [(NO_WEIGHTS, {}), (DENSE, {"params": []})],
                         ids=["no-dense-layer", "empty-list"])
def test_verify_passes_on_a_model_whose_regularization_selects_nothing(spec, reg):
    """The triangle (float64 within its bound of mp, mp analytic against mp finite differences)
    holds for such a model, for the input gradient and for every parameter."""
    report = verify(Model(with_regularization(spec, **reg)))
    assert report.passed, [(t.name, t.result) for t in report.tensors if not t.passed]
    assert {t.name for t in report.tensors} == set(Model(spec).param_shapes()) | {"x"}


def test_a_nonempty_selection_still_adds_its_penalty():
    """The control: the same coefficients over "all" parameters change the loss by exactly the
    penalty computed here in float64 (one slope, α₁|a| + α₂/2·a², a = 0.2)."""
    plain, regularized = Model(NO_WEIGHTS), Model(with_regularization(NO_WEIGHTS, params="all"))
    params, x, y = plain.prepare()
    base = plain.loss_and_grads(FLOAT64, params, x, y).loss
    loss = regularized.loss_and_grads(FLOAT64, params, x, y).loss
    assert loss == base + (0.03 * 0.2 + 0.1 * (0.2 * 0.2))


@pytest.mark.parametrize("params, match", [
    (["0.weight", "0.weight"], r"params lists \['0.weight'\] more than once"),
    ([["0.weight"]], r"params must list parameter names \(strings\), got \[\['0.weight'\]\]"),
    (["0.running_mean"], r"params \['0.running_mean'\] are not parameters of the model"),
])
def test_a_selection_list_names_each_parameter_once_as_a_string(params, match):
    """A repeated name (it would be penalized twice) or a non-string is an error naming the
    field, not a crash or a silent double weight."""
    spec = with_regularization(DENSE, params=params)
    with pytest.raises(ValueError, match=r"regularization: " + match):
        Model(spec)
