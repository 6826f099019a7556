"""``verify`` with the expansion engine keeps every tooth the mp engine has.

The fast engine replaces mpmath in the two high-precision legs (the exact gradient of the ulp
leg, every finite difference of the FD leg). A wrong backward is the error only the FD leg can
see — float64 and the exact run share the backward code, so both are wrong the same way — and
its finite differences run no backward code. So a backward that is wrong by a relative 1e-8 in
one element, in any layer type, must fail ``verify`` with the expansion engine (20 digits are
required; such an error leaves ~8), and the clean model must pass it: a checker tested by an
error just above what it can resolve, not only by a gross one.
"""

import numpy as np
import pytest
from conftest import small_spec

from refnet import Model, verify
from refnet.layers.registry import layer_types

RELATIVE = 1e-8         # the planted error: 12 orders above the 20 digits verify requires


def _cnn(layers, input_shape=(2, 6, 6), **extra):
    return {"input_shape": list(input_shape), "seed": 0, "batch": 2, "layers": layers,
            "loss": {"type": "mse"}, **extra}


CONV = {"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": 1}
NETS = {
    "dense": small_spec("tanh", widths=(3,)),
    "conv2d": _cnn([CONV, {"type": "tanh"}, {"type": "flatten"}, {"type": "dense", "out": 2}]),
    "maxpool2d": _cnn([CONV, {"type": "maxpool2d", "kernel_size": 2}, {"type": "flatten"},
                       {"type": "dense", "out": 2}]),
    "avgpool2d": _cnn([CONV, {"type": "avgpool2d", "kernel_size": 2}, {"type": "flatten"},
                       {"type": "dense", "out": 2}]),
    "global_avgpool": _cnn([CONV, {"type": "global_avgpool"}, {"type": "flatten"},
                            {"type": "dense", "out": 2}]),
    "flatten": _cnn([CONV, {"type": "flatten"}, {"type": "dense", "out": 2}]),
    "batchnorm": _cnn([CONV, {"type": "batchnorm"}, {"type": "tanh"}, {"type": "flatten"},
                       {"type": "dense", "out": 2}]),
    "layernorm": {**small_spec("tanh", widths=(4,)),
                  "layers": [{"type": "dense", "out": 4}, {"type": "layernorm"},
                             {"type": "tanh"}, {"type": "dense", "out": 2}]},
    "dropout": {**small_spec("tanh", widths=(4,)), "mode": "train",
                "layers": [{"type": "dense", "out": 4}, {"type": "tanh"},
                           {"type": "dropout", "p": 0.25}, {"type": "dense", "out": 2}]},
    "residual": {**small_spec("tanh", widths=(3,)),
                 "layers": [{"type": "dense", "out": 3},
                            {"type": "residual", "body": [{"type": "dense", "out": 3},
                                                          {"type": "tanh"}]},
                            {"type": "dense", "out": 2}]},
}
ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "selu", "gelu",
               "softplus", "scaled_sigmoid", "identity"]
for _act in ACTIVATIONS:
    NETS[_act] = small_spec(_act, widths=(3,))


def _plant(monkeypatch, kind):
    """The layer class's backward returns its input gradient with element 0 off by RELATIVE
    times the largest element."""
    cls = layer_types()[kind]
    original = cls.backward

    def wrong(self, bk, params, dy, cache):
        dx, grads = original(self, bk, params, dy, cache)
        first = np.zeros(dx.shape, dtype=bool)
        first.flat[0] = True
        # RELATIVE of the largest element, added to the first (which may be 0: max-pool).
        size = float(np.max(np.abs(bk.to_numpy(dx))))
        return dx + bk.where(first, bk.asarray(np.float64(RELATIVE * size)), 0), grads
    monkeypatch.setattr(cls, "backward", wrong)


@pytest.mark.parametrize("kind", sorted(NETS))
def test_the_expansion_engine_fails_a_wrong_backward_in_every_layer_type(kind, monkeypatch):
    model = Model(NETS[kind])
    clean = verify(model, engine="expansion", directions=2)
    assert clean.passed, [t.name for t in clean.tensors if not t.passed]
    assert "expansion" in clean.engine
    _plant(monkeypatch, kind)
    planted = verify(model, engine="expansion", directions=2)
    assert not planted.passed
    worst = min(t.fd_digits for t in planted.tensors if not t.passed)
    assert worst < 12          # the FD leg sees the 1e-8 (not a lucky flake elsewhere)


@pytest.mark.parametrize("example", ["small-cnn.json", "residual-mlp.json", "relu-mlp-kaiming.json"])
def test_both_engines_reach_the_same_verdict_and_the_same_float64_comparison(example):
    """The ulp leg compares float64 with the exact gradient: the two engines give exact
    gradients within 2^-169 of each other, so every reported float64 error agrees to ~1e-30
    relative; the FD leg's digits agree to their own noise (both exceed 30)."""
    from pathlib import Path
    model = Model.load(Path(__file__).resolve().parent.parent / "spec" / "examples" / example)
    fast = verify(model, engine="expansion")
    slow = verify(model, engine="mpmath")
    assert fast.passed and slow.passed
    for a, b in zip(fast.tensors, slow.tensors):
        assert a.name == b.name
        assert a.max_abs_err == pytest.approx(b.max_abs_err, rel=1e-12, abs=0)
        assert a.grad_norm == b.grad_norm
        assert a.ulp_passed == b.ulp_passed
        assert (a.fd_digits >= 30) == (b.fd_digits >= 30)


def _tiny_input_model():
    """Large enough for "auto" to pick the expansion engine (a 2x4096 weight), with an input
    of 1e-300: below the engine's exact range (2^(-1074 + prec + 24) ≈ 1e-265 at 50 digits)."""
    model = Model({"input_shape": [4096], "seed": 0, "batch": 2, "loss": {"type": "mse"},
                   "layers": [{"type": "dense", "out": 2}]})
    params, x, y = model.prepare()
    return model, params, x * 1e-300, y


def test_auto_runs_mpmath_where_the_expansion_engine_refuses_and_says_so():
    model, params, x, y = _tiny_input_model()
    report = verify(model, params, x, y, engine="auto", directions=1)
    assert report.passed
    assert report.engine.startswith("<refnet backend mp, 50 digits>")
    assert "the expansion engine refused" in report.engine


def test_an_explicit_expansion_engine_that_cannot_run_is_a_one_line_error():
    from refnet.numerics.expansion import ExpansionRangeError
    model, params, x, y = _tiny_input_model()
    with pytest.raises(ExpansionRangeError, match="^engine expansion: .*engine auto runs mpmath"):
        verify(model, params, x, y, engine="expansion", directions=1)
