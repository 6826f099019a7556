"""Losses: exact where it matters (huge logits), torch's reductions, clear errors on bad targets."""

import numpy as np
import pytest
from conftest import HAVE_TORCH, reference_rounding

from refnet import BOUND, FLOAT64, MPBackend
from refnet.losses import make_loss


def run(loss_type, z, y, bk=FLOAT64, reduction="mean"):
    loss = make_loss({"type": loss_type, "reduction": reduction}, z.shape[1:])
    y = loss.check_target(y, z.shape[0])
    value, cache = loss.forward(bk, bk.asarray(z), y)
    return value, loss.backward(bk, cache)


def test_cross_entropy_of_logits_plus_minus_1e4_is_exact():
    """Log-sum-exp with the max subtracted: logits of ±1e4 give the exact loss, no inf/NaN."""
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    y = np.array([1, 2])
    value, grad = run("softmax_cross_entropy", z, y)
    mp = MPBackend(60)
    exact, exact_grad = run("softmax_cross_entropy", z, y, mp)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # Loss = (2e4 + log 2)/2 exactly (to float64 rounding); sample 2 ties two classes.
    assert abs(float(value) - mp.to_numpy(exact)) <= np.spacing(float(value))
    assert np.allclose(grad, mp.to_numpy(exact_grad), rtol=0, atol=2 * np.spacing(1.0))


@pytest.mark.parametrize("loss_type", ["mse", "softmax_cross_entropy", "bce_with_logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_loss_and_gradient_are_within_their_error_bound_of_the_exact_values(loss_type,
                                                                                  reduction):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 4)) * 3
    y = {"mse": rng.standard_normal((5, 4)), "softmax_cross_entropy": rng.integers(0, 4, 5),
         "bce_with_logits": rng.random((5, 4))}[loss_type]
    mp = MPBackend(60)
    vb, gb = run(loss_type, z, y, BOUND, reduction)
    vm, gm = run(loss_type, z, y, mp, reduction)
    assert abs(vb.v - mp.to_numpy(vm)) <= vb.e + reference_rounding(mp.to_numpy(vm))
    assert np.all(np.abs(gb.v - mp.to_numpy(gm)) <= gb.e + reference_rounding(mp.to_numpy(gm)))


def test_sum_reduction_is_mean_times_count():
    rng = np.random.default_rng(1)
    z, y = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    mean, _ = run("mse", z, y)
    total, _ = run("mse", z, y, reduction="sum")
    assert total == pytest.approx(6 * mean, rel=1e-15)


@pytest.mark.parametrize("loss_type, y, match", [
    ("softmax_cross_entropy", np.array([0, 3]), r"labels must lie in \[0, 2\]"),
    ("softmax_cross_entropy", np.array([0, -1]), r"labels must lie in \[0, 2\]"),
    ("softmax_cross_entropy", np.array([0.5, 1.0]), "must be integers"),
    ("softmax_cross_entropy", np.array([0, 1, 2]), r"shape \(2,\)"),
    ("mse", np.zeros((2, 2)), r"shape \(2, 3\)"),
    ("mse", np.array([[0, 1, np.nan], [0, 0, 0]]), "finite"),
    ("bce_with_logits", np.full((2, 3), 1.5), r"\[0, 1\]"),
])
def test_bad_targets_raise_errors_naming_the_loss_expected_and_actual(loss_type, y, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run(loss_type, np.zeros((2, 3)), y)


def test_unknown_loss_and_reduction_are_rejected():
    with pytest.raises(ValueError, match="unknown type 'hinge'"):
        make_loss({"type": "hinge"}, (3,))
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'sum', 'none'\]"):
        make_loss({"type": "mse", "reduction": "average"}, (3,))


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("loss_type", ["mse", "softmax_cross_entropy", "bce_with_logits"])
def test_losses_and_gradients_equal_torch_float64(loss_type):
    """Same value and gradient as torch's mse_loss / cross_entropy / BCE-with-logits: torch's
    results lie within the error analysis of torch's own formulas of the exact values. Those are
    refnet's bound plus, for cross-entropy, the cancellation in torch's p − onehot: p_y ≈ 1 carries
    a few ulps of error relative to 1, left after subtracting 1 (refnet uses expm1 instead): 4u·p/N."""
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(3)
    z = rng.standard_normal((6, 5)) * 4
    y = {"mse": rng.standard_normal((6, 5)), "softmax_cross_entropy": rng.integers(0, 5, 6),
         "bce_with_logits": rng.random((6, 5))}[loss_type]
    t = torch.tensor(z, requires_grad=True)
    ty = torch.tensor(y)
    f = {"mse": F.mse_loss, "softmax_cross_entropy": F.cross_entropy,
         "bce_with_logits": F.binary_cross_entropy_with_logits}[loss_type]
    out = f(t, ty)
    out.backward()
    vb, gb = run(loss_type, z, y, BOUND)
    mp = MPBackend(60)
    exact_v, exact_g = (mp.to_numpy(a) for a in run(loss_type, z, y, mp))
    extra = 0.0
    if loss_type == "softmax_cross_entropy":
        p = np.exp(z - z.max(1, keepdims=True))
        extra = 4 * 2.0**-53 * p / p.sum(1, keepdims=True) / z.shape[0]
    assert abs(out.item() - exact_v) <= vb.e
    assert np.all(np.abs(t.grad.numpy() - exact_g) <= gb.e + extra)


def test_a_confident_predictions_tiny_loss_and_gradient_keep_full_relative_accuracy():
    """Logits (300, 0, 0) with label 0: L = log(1 + 2e^−300) ≈ 1.03e-130 and ∂L/∂z₀ ≈ −1.03e-130,
    not 0 — log1p of the non-max terms and expm1 on the label keep every digit (float64 within a
    few ulps of the exact values)."""
    z = np.array([[300.0, 0.0, 0.0]])
    value, grad = run("softmax_cross_entropy", z, np.array([0]))
    mp = MPBackend(60)
    exact, exact_grad = (mp.to_numpy(a) for a in run("softmax_cross_entropy", z, np.array([0]), mp))
    assert 1e-131 < exact < 1e-129
    assert abs(float(value) - exact) <= 4 * np.spacing(exact)
    assert np.all(np.abs(grad - exact_grad) <= 4 * np.spacing(np.abs(exact_grad)))
    assert grad[0, 0] < 0


def test_a_confident_bce_predictions_tiny_loss_keeps_full_relative_accuracy():
    """z = −40, y = 0 and z = 40, y = 1: L = log1p(e^−40) = 4.25e-18, not 0. max(z, 0) − z·y is
    exactly 0 for a hard target on the confident side, so the float64 loss is log1p(exp(−40))
    alone: exp and log1p each within an ulp or two of their exact values, 4 ulps in all."""
    mp = MPBackend(60)
    for z, y in ((-40.0, 0.0), (40.0, 1.0)):
        zz, yy = np.array([[z]]), np.array([[y]])
        value, _ = run("bce_with_logits", zz, yy)
        exact = mp.to_numpy(run("bce_with_logits", zz, yy, mp)[0])
        assert 4.2e-18 < exact < 4.3e-18
        assert abs(float(value) - exact) <= 4 * np.spacing(exact), (z, y, float(value), exact)


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_torchs_bce_returns_0_for_the_tiny_loss_refnet_keeps():
    """The documented difference (spec/operations.md, Losses): torch's (1 − y)·z − log_sigmoid(z)
    at z = −40, y = 0 is −40 − (−40) = 0, since log_sigmoid(−40) = −40 − 4.2e-18 rounds to −40;
    refnet's value there is the exact 4.25e-18 (previous test). The gradient σ(z) − y is the same
    form in both, so both give σ(−40) there."""
    import torch
    import torch.nn.functional as F
    t = torch.tensor([[-40.0]], dtype=torch.float64, requires_grad=True)
    loss = F.binary_cross_entropy_with_logits(t, torch.zeros((1, 1), dtype=torch.float64))
    loss.backward()
    value, grad = run("bce_with_logits", np.array([[-40.0]]), np.array([[0.0]]))
    assert loss.item() == 0.0 and float(value) > 4.2e-18
    assert t.grad.item() == grad[0, 0]
