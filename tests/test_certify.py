"""Certified mode: interval arithmetic encloses every gradient element; kinks are reported as
not certifiable, not as failures."""

import json

import numpy as np
import pytest

from refnet.cli import main
from refnet.model import Model
from refnet.numerics.backend import fraction_of
from refnet.numerics.interval import IntervalBackend
from refnet.verification.certify import certify

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


@pytest.mark.parametrize("activation", ["selu", "elu", "celu", "softplus", "mish", "silu"])
def test_every_smooth_activation_with_an_interval_form_is_certified(activation):
    """Each activation whose functions have interval forms certifies (selu once crashed:
    its constant times an array never reached numpy's elementwise product)."""
    spec = {**TANH_MLP, "layers": [{"type": "dense", "out": 5}, {"type": activation},
                                   {"type": "dense", "out": 3}]}
    assert_certified(certify(Model(spec)))


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


def test_verify_certify_cli_on_a_kink_reports_not_certifiable_and_exits_0(tmp_path, capsys):
    """The same kink through the CLI (--data with x = 0): the report, not an error, under any
    mpmath version (1.4 raises where 1.3 returned None; this once printed an empty error)."""
    spec = {"input_shape": [3], "seed": 0, "batch": 2, "loss": {"type": "mse"},
            "layers": [{"type": "dense", "out": 4, "bias_init": "zeros"}, {"type": "relu"},
                       {"type": "dense", "out": 2}]}
    path, data = tmp_path / "m.json", tmp_path / "d.npz"
    path.write_text(json.dumps(spec))
    np.savez(data, x=np.zeros((2, 3)), y=np.ones((2, 2)))
    assert main(["verify", str(path), "--certify", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert "not certifiable" in captured.out and "layer 1 (relu)" in captured.out
    assert captured.err == ""


# Intervals z against 0 and what each operator must answer: (answer, undecidable). Decidable
# means one answer for every point of z (touching counts: [0, 1] >= 0 holds everywhere, [0, 1] > 0
# does not); undecidable ones answer the midpoint's side. ±t, t = 2^-100 at 100 bits, puts an
# endpoint as close to 0 as an endpoint other than 0 itself gets in these tests: apart from 0
# by t the comparison is decided, across 0 by t it is not.
T = 2.0 ** -100
COMPARISONS = [
    ((-1, 1), {"gt": (False, True), "ge": (True, True), "lt": (False, True), "le": (True, True)}),
    ((-1, 3), {"gt": (True, True), "ge": (True, True), "lt": (False, True), "le": (False, True)}),
    ((0, 1), {"gt": (True, True), "ge": (True, False), "lt": (False, False), "le": (False, True)}),
    ((-1, 0), {"gt": (False, False), "ge": (False, True), "lt": (True, True), "le": (True, False)}),
    ((T, 1), {"gt": (True, False), "ge": (True, False), "lt": (False, False), "le": (False, False)}),
    ((-T, 1), {"gt": (True, True), "ge": (True, True), "lt": (False, True), "le": (False, True)}),
    ((-1, -T), {"gt": (False, False), "ge": (False, False), "lt": (True, False),
                "le": (True, False)}),
    ((-1, T), {"gt": (False, True), "ge": (False, True), "lt": (True, True), "le": (True, True)}),
]
REFLECTED = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}


@pytest.mark.parametrize("op", ["gt", "ge", "lt", "le"])
def test_interval_comparisons_are_decided_exactly_or_take_the_midpoints_side_and_record_it(op):
    """Every ordering operator, both operand orders (0 < z is z > 0 reflected), against a plain
    0 and a point interval 0, with straddle recording on and off: decided comparisons answer
    exactly and record nothing; undecidable ones answer the midpoint's side and record one
    straddle each, while recording. mpmath 1.3 reports an undecidable comparison as None and
    1.4 raises ValueError: the backend gives the same answers under both (CI runs this under
    each)."""
    import operator
    ib = IntervalBackend(100)
    ctx, cmp, reflected = ib.ctx, getattr(operator, op), getattr(operator, REFLECTED[op])
    for (lo, hi), answers in COMPARISONS:
        z = ctx.mpf([lo, hi])                          # exact: both endpoints are floats
        expected, undecidable = answers[op]
        for recording in (False, True):
            ib.recording, ib.straddles = recording, {}
            assert cmp(z, 0) is expected, (op, lo, hi)
            assert reflected(0, z) is expected, (op, lo, hi)
            assert cmp(z, ctx.mpf(0)) is expected, (op, lo, hi)
            counted = 3 if recording and undecidable else 0
            assert ib.straddles == ({"the loss": counted} if counted else {}), (op, lo, hi)


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
