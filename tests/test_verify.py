"""The verification triangle proves gradients right, and fails when they are wrong."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import small_spec
from hypothesis import given
from hypothesis import strategies as st

from refnet import FLOAT64, Model, verify
from refnet.layers.activations import ACTIVATIONS
from refnet.losses import LOSSES
from refnet.numerics.backend import NumpyBackend

EXAMPLES = Path(__file__).resolve().parent.parent / "spec" / "examples"
REQUIRED_DIGITS = 20
# Random inits only: zeros/ones/constant put every unit of a layer at the same point, and a ReLU
# net with zero weights sits exactly on its kinks (tested separately below).
RANDOM_INITS = ["normal", "uniform", "xavier_uniform", "xavier_normal", "kaiming_uniform",
                "kaiming_normal", "lecun_uniform", "lecun_normal", "orthogonal", "torch_default"]


@pytest.mark.slow
@given(activation=st.sampled_from(sorted(ACTIVATIONS)),
       init=st.sampled_from(RANDOM_INITS),
       loss=st.sampled_from(sorted(LOSSES)),
       depth=st.integers(1, 6),
       width=st.integers(1, 32),
       batch=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1))
def test_float64_gradients_are_within_their_error_bound_and_mp_matches_fd_to_20_digits(
        activation, init, loss, depth, width, batch, seed):
    """Over activation × init × loss × depth × width × batch × seed: every float64 gradient
    element is within its error bound of the exact (mp) one, and mp analytic gradients agree
    with mp central finite differences to >= 20 significant digits away from kinks."""
    spec = small_spec(activation, loss=loss, widths=[width] * depth, in_dim=3, out_dim=3,
                      seed=seed, batch=batch, init=init)
    report = verify(Model(spec), directions=1)
    assert not report.kinks, f"float64 and exact runs took different branches: {report.kinks}"
    for t in report.tensors:
        assert t.ulp_passed, (f"{t.name}: a float64 element exceeds its error bound "
                              f"(max error/bound {t.bound_use:.3g})")
        if t.fd_checks > t.fd_kinks:
            assert t.fd_digits >= REQUIRED_DIGITS, (
                f"{t.name}: mp analytic and mp FD agree to only {t.fd_digits:.1f} digits")
    assert report.passed


# --- the checker catches planted errors ---------------------------------------------------------

def _negate(grad):
    return -grad


def _perturb(grad):
    return grad * (1 + 1e-6)


PLANTS = {
    "wrong sign": lambda orig: (lambda self, bk, params, dh, cache:
                                _mutate(orig(self, bk, params, dh, cache), _negate)),
    "1e-6 relative": lambda orig: (lambda self, bk, params, dh, cache:
                                   _mutate(orig(self, bk, params, dh, cache), _perturb)),
    # f'(z) returned without the upstream factor dh: the chain rule's dropped factor.
    "dropped factor": lambda orig: (lambda self, bk, params, dh, cache:
                                    orig(self, bk, params, dh * 0 + 1, cache)),
}


def _mutate(result, f):
    dz, grads = result
    return f(dz), grads


@pytest.mark.parametrize("plant", sorted(PLANTS))
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_verify_fails_on_a_planted_error_in_each_activation_derivative(activation, plant,
                                                                        monkeypatch):
    """A wrong sign, a 1e-6 relative error or a dropped factor in any activation's backward
    makes verify fail: the FD witness disagrees with the (consistently wrong) analytic code."""
    spec = small_spec(activation, loss="softmax_cross_entropy", widths=(4,), seed=1)
    assert verify(Model(spec)).passed, "the unplanted model must pass first"
    cls = ACTIVATIONS[activation]
    monkeypatch.setattr(cls, "backward", PLANTS[plant](cls.backward))
    report = verify(Model(spec))
    assert not report.passed
    # Every backend runs the same (wrong) code, so float64 still matches mp: it is the finite
    # differences, which use no backward code, that catch the error.
    worst = min(t.fd_digits for t in report.tensors)
    assert worst < 8, f"planted '{plant}' in {activation}: FD still agreed to {worst:.1f} digits"


def test_verify_catches_a_float32_leak_in_the_float64_path(monkeypatch):
    """If float64 exp silently computed in float32, the float64-vs-exact ulp check fails
    (FD, which is exact, would not notice): the ulp check has teeth."""
    spec = small_spec("sigmoid", loss="softmax_cross_entropy", widths=(6, 6), seed=2)
    model = Model(spec)
    assert verify(model).passed
    original = NumpyBackend.exp

    def leaky_exp(self, x):
        out = original(self, x)
        return out.astype(np.float32).astype(self.dtype) if self.dtype == np.float64 else out

    monkeypatch.setattr(NumpyBackend, "exp", leaky_exp)
    report = verify(model)
    assert not report.passed
    assert any(t.ulp_passed is False for t in report.tensors)
    assert all(t.fd_digits >= REQUIRED_DIGITS for t in report.tensors)


# --- kinks --------------------------------------------------------------------------------------

def test_a_relu_input_exactly_at_the_kink_is_reported_as_a_kink_not_a_failure():
    """x = 0 with zero biases puts every ReLU pre-activation at exactly 0: finite differences in
    the bias or in x straddle the kink, and verify reports kinks instead of comparing blindly.
    (A first-layer weight does not move z = Wx at x = 0: its checks are ordinary ones.)"""
    spec = {"input_shape": [3], "seed": 0, "batch": 2,
            "layers": [{"type": "dense", "out": 4, "init": "xavier_normal", "bias_init": "zeros"},
                       {"type": "relu"},
                       {"type": "dense", "out": 2, "init": "xavier_normal"}],
            "loss": {"type": "mse"}}
    model = Model(spec)
    x = np.zeros((2, 3))
    y = np.ones((2, 2))
    report = verify(model, x=x, y=y, mode="element")
    by_name = {t.name: t for t in report.tensors}
    assert by_name["0.bias"].fd_kinks == 4
    assert by_name["x"].fd_kinks > 0
    assert by_name["0.weight"].fd_kinks == 0 and by_name["0.weight"].grad_max_abs == 0
    assert any("kink" in k for k in by_name["0.bias"].kinks)
    assert report.passed, "kinks are reported, not failures"


def test_kink_checks_do_not_hide_real_errors_away_from_the_kink(monkeypatch):
    """With one kink present, a planted error elsewhere still fails (kinks exclude only the
    straddling checks)."""
    spec = small_spec("relu", loss="mse", widths=(4,), seed=3)
    model = Model(spec)
    monkeypatch.setattr(ACTIVATIONS["relu"], "backward",
                        PLANTS["1e-6 relative"](ACTIVATIONS["relu"].backward))
    assert not verify(model, mode="element").passed


# --- vanishing gradients are verified, not mistaken for errors ----------------------------------

@pytest.mark.slow
def test_20_layer_sigmoid_with_tiny_init_passes_with_first_layer_gradient_orders_below_last():
    """A 20-layer sigmoid MLP with N(0, 0.01) weights: the first layer's gradient is many orders
    of magnitude below the last (each layer multiplies by ~0.25·0.01·√16 = 0.01), yet every
    gradient is right — float64 within its error bound at 1e-39, FD at ~94 digits."""
    model = Model.load(EXAMPLES / "sigmoid-deep-20.json")
    report = verify(model)
    assert report.passed
    by_name = {t.name: t for t in report.tensors}
    first, last = by_name["0.weight"], by_name["38.weight"]
    orders = math.log10(last.grad_max_abs / first.grad_max_abs)
    # 19 layers of the factor 0.25·0.01·√16 ≈ 1e-2 predict ~38 orders.
    assert orders > 30, f"only {orders:.1f} orders of magnitude between last and first layer"
    assert first.ulp_passed and first.max_ulp <= first.ulp_bound
    assert first.fd_digits >= REQUIRED_DIGITS
    assert first.fd_dps > 50, "the FD precision must grow to resolve a 1e-39 gradient"
    # float64 FD cannot see these gradients at all: its noise level is astronomically above them.
    assert first.fd64_noise > 1e10


def test_report_json_has_the_documented_fields():
    """verify's JSON: top-level passed and tensors, each with name, max_ulp, max_rel_err,
    fd_digits (and is plain JSON)."""
    report = verify(Model(small_spec("tanh")))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is True
    for t in d["tensors"]:
        for key in ("name", "max_ulp", "max_rel_err", "fd_digits", "ulp_bound", "worst_index"):
            assert key in t
    assert [t["name"] for t in d["tensors"]][-1] == "x"


def test_direction_and_element_modes_both_pass_and_count_checks():
    """Element mode checks every element; direction mode a fixed number of directions."""
    model = Model(small_spec("elu", widths=(3,)))
    by_element = verify(model, mode="element")
    by_direction = verify(model, mode="direction", directions=3)
    assert by_element.passed and by_direction.passed
    for te, td in zip(by_element.tensors, by_direction.tensors):
        assert te.fd_checks == te.numel
        assert td.fd_checks == 3


def test_verify_result_is_reproducible():
    """Same model, same seed: the same report, number for number."""
    model = Model(small_spec("gelu", widths=(5,)))
    a = verify(model, mode="direction", seed=7).to_dict()
    b = verify(model, mode="direction", seed=7).to_dict()
    assert a == b


def test_float64_backend_result_is_the_one_checked():
    """The gradients verify compares are the float64 backend's, bit for bit."""
    model = Model(small_spec("softplus"))
    params, x, y = model.prepare()
    g = model.loss_and_grads(FLOAT64, params, x, y)
    report = verify(model)
    assert report.loss == float(g.loss)


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.json")
                                            if p.name != "sigmoid-deep-20.json"))
def test_every_example_spec_passes_verification(example):
    """The shipped examples (ReLU MLP, residual MLP, small CNN with BatchNorm, ResNet-style CNN
    with a projection shortcut) each pass the whole triangle (sigmoid-deep-20: its own test)."""
    report = verify(Model.load(EXAMPLES / example))
    assert report.passed, [t.name for t in report.tensors if not t.passed]


def test_a_gradient_that_is_exactly_zero_reports_an_infinite_ulp_bound_instead_of_overflowing():
    """Found by hypothesis: an exactly-zero gradient (the bias of a conv feeding a LayerNorm
    without affine) has a subnormal ulp, so its bound counted in ulps exceeds float64's range.
    verify reports that bound as inf (the element is held to the absolute bound) and passes;
    before, the division raised an overflow error."""
    spec = {"input_shape": [1, 2, 3], "seed": 0, "batch": 2, "mode": "eval",
            "layers": [{"type": "residual", "shortcut": "identity", "scale": 1.0, "body": [
                {"type": "conv2d", "out_channels": 2, "kernel_size": 1, "padding": "same"},
                {"type": "batchnorm", "affine": False}, {"type": "elu"},
                {"type": "dropout", "p": 0.0},
                {"type": "conv2d", "out_channels": 1, "kernel_size": 1}]},
                {"type": "flatten"}, {"type": "layernorm", "elementwise_affine": False},
                {"type": "dense", "out": 3}],
            "loss": {"type": "bce_with_logits"}}
    report = verify(Model(spec), directions=1)
    by_name = {t.name: t for t in report.tensors}
    assert by_name["0.body.4.bias"].grad_max_abs == 0.0
    assert by_name["0.body.4.bias"].ulp_bound == float("inf")
    assert report.passed
