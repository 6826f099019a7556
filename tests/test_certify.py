"""Certified mode: interval arithmetic encloses every gradient element; kinks are reported as
not certifiable, not as failures."""

import json

import numpy as np
import pytest

from refnet.numerics.backend import fraction_of
from refnet.verification.certify import certify
from refnet.cli import main
from refnet.numerics.interval import IntervalBackend
from refnet.model import Model

TANH_MLP = {"input_shape": [4], "seed": 0, "batch": 3, "loss": {"type": "softmax_cross_entropy"},
            "layers": [{"type": "dense", "out": 5}, {"type": "tanh"}, {"type": "dense", "out": 5},
                       {"type": "tanh"}, {"type": "dense", "out": 3}]}


def assert_certified(c):
    assert c.certified and not c.failed and not c.straddles, c.status
    for t in c.tensors:
        assert t.reference_outside == 0
        assert t.max_width <= 1e-25, (t.name, t.max_width)
        assert t.float64_within_bound == t.numel           # float64 within its own error bound


def test_a_tanh_mlp_is_certified_with_enclosures_narrower_than_1e_25():
    assert_certified(certify(Model(TANH_MLP)))


@pytest.mark.slow
def test_the_small_cnn_example_is_certified():
    """conv, batchnorm, relu, max-pool (ties among relu's zeros are exact and stable), dense."""
    assert_certified(certify(Model.load("spec/examples/small-cnn.json")))


def test_a_relu_input_exactly_at_a_kink_is_not_certifiable_and_not_a_failure(capsys):
    """x = 0 with zero biases puts every first-layer pre-activation exactly at relu's kink."""
    spec = {"input_shape": [3], "seed": 0, "batch": 2, "loss": {"type": "mse"},
            "layers": [{"type": "dense", "out": 4, "bias_init": "zeros"}, {"type": "relu"},
                       {"type": "dense", "out": 2}]}
    model = Model(spec)
    params, x, y = model.prepare()
    x[0] = 0.0
    c = certify(model, params, x, y)
    assert not c.certified and not c.failed
    assert c.straddles == {"layer 1 (relu)": 4}
    assert "not certifiable" in c.status and "layer 1 (relu)" in c.status


def test_interval_tanh_and_expm1_enclose_the_exact_values():
    """tanh from exp and expm1 from exp: intervals that contain the 60-digit values."""
    import mpmath
    ib = IntervalBackend(120)
    ctx = mpmath.MPContext()
    ctx.dps = 60
    for z in (-30.0, -1.5, -1e-8, 0.0, 2e-5, 0.7, 19.0):
        for got, exact in ((ib.tanh(np.array([z]))[0], ctx.tanh(z)),
                           (ib.expm1(np.array([z]))[0], ctx.expm1(z)),
                           (ib.log1p(np.array([abs(z)]))[0], ctx.log1p(abs(z)))):
            lo, hi = (ib.to_fractions(np.array([e]))[0] for e in ib.bounds(np.array([got])))
            assert lo <= fraction_of(exact) <= hi, (z, got, exact)


def test_gelu_cannot_be_certified_and_says_so():
    spec = {**TANH_MLP, "layers": [{"type": "dense", "out": 3}, {"type": "gelu"}]}
    with pytest.raises(ValueError, match="erf"):
        certify(Model(spec))


def test_verify_certify_cli(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(TANH_MLP))
    assert main(["verify", str(path), "--certify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "certified" and report["certified"]
    assert all(t["max_width"] <= 1e-25 for t in report["tensors"])
    assert main(["verify", str(path), "--certify"]) == 0
    assert "certified" in capsys.readouterr().out
