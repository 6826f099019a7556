"""Every layer type, in every mode, inside the verification triangle (hypothesis over shapes)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnet import Model, verify


@st.composite
def cnn_specs(draw):
    """A small CNN drawn over channels, image size, mode, affine, dropout rate and shortcut."""
    c = draw(st.integers(1, 3))
    h, w = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    affine = draw(st.booleans())
    projection = draw(st.booleans())
    p = draw(st.sampled_from([0.0, 0.3, 1.0]))
    out = draw(st.integers(1, 3)) if projection else c
    body = [{"type": "conv2d", "out_channels": 2, "kernel_size": draw(st.sampled_from([1, 3])),
             "padding": "same"},
            {"type": "batchnorm", "affine": affine},
            {"type": draw(st.sampled_from(["relu", "tanh", "gelu", "elu"]))},
            {"type": draw(st.sampled_from(["dropout", "dropout2d"])), "p": p},
            {"type": "conv2d", "out_channels": out, "kernel_size": 1}]
    shortcut = ([{"type": "conv2d", "out_channels": out, "kernel_size": 1, "bias": False},
                 {"type": "batchnorm", "affine": affine}] if projection else "identity")
    layers = [{"type": "residual", "body": body, "shortcut": shortcut,
               "scale": draw(st.sampled_from([1.0, 0.5]))},
              {"type": "flatten"},
              {"type": "layernorm", "elementwise_affine": affine},
              {"type": "dense", "out": 3}]
    return {"input_shape": [c, h, w], "seed": draw(st.integers(0, 2**16)),
            "batch": draw(st.integers(2, 3)), "mode": draw(st.sampled_from(["train", "eval"])),
            "layers": layers, "loss": {"type": draw(st.sampled_from(
                ["softmax_cross_entropy", "mse", "bce_with_logits"]))}}


@pytest.mark.slow
@given(spec=cnn_specs())
def test_cnn_with_batchnorm_dropout_layernorm_and_residual_passes_the_triangle(spec):
    """conv2d, batchnorm (train/eval, affine on/off), dropout/dropout2d (p = 0, 0.3, 1), residual
    (identity or projection shortcut, scale 1 or 0.5), flatten, layernorm, dense: every gradient
    within its float64 bound, and mp analytic = mp FD to >= 20 digits."""
    report = verify(Model(spec), directions=1)
    assert report.passed, [(t.name, t.fd_digits, t.ulp_passed) for t in report.tensors
                           if not t.passed]
