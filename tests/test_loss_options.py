"""The losses' torch options (issue 18, item 2): every reduction ("none" with an upstream vector),
cross-entropy's class weights, ignore_index, label smoothing, class probabilities and (N, C, d…)
logits, BCE's weight and pos_weight, l1, smooth_l1, huber and nll — against torch's float64
autograd, in every backend within its own error analysis, in ``verify``, the FD sweep, the
certificate, the fp16 emulation and the CLI; bad options and targets are clear errors."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HAVE_TORCH

from refnet import BOUND, FLOAT32, FLOAT64, Model, MPBackend, certify, verify
from refnet.cli import main
from refnet.losses import Targets, make_loss
from refnet.numerics.backend import fraction_of
from refnet.numerics.expansion import ExpansionBackend
from refnet.numerics.interval import IntervalBackend
from refnet.verification.fdsweep import fd_sweep

sys.path.insert(0, str(Path(__file__).resolve().parent))

W5 = [0.5, 2.0, 1.25, 0.75, 1.5]
W3 = [0.25, 1.75, 1.0]

# name -> (loss config without reduction, one sample's shape, the kind of targets)
CASES = {
    "mse": ({"type": "mse"}, (4,), "normal"),
    "l1": ({"type": "l1"}, (4,), "normal"),
    "smooth_l1": ({"type": "smooth_l1"}, (4,), "normal"),
    "smooth_l1-beta0.3": ({"type": "smooth_l1", "beta": 0.3}, (2, 3), "normal"),
    "smooth_l1-beta0": ({"type": "smooth_l1", "beta": 0.0}, (4,), "normal"),
    "huber": ({"type": "huber"}, (4,), "normal"),
    "huber-delta2.5": ({"type": "huber", "delta": 2.5}, (2, 3), "normal"),
    "bce": ({"type": "bce_with_logits"}, (4,), "soft01"),
    "bce-weight-pos_weight": ({"type": "bce_with_logits", "weight": [0.5, 2.0, 1.0, 3.0],
                               "pos_weight": [3.0, 0.25, 1.0, 2.0]}, (4,), "soft01"),
    "bce-broadcast-weights": ({"type": "bce_with_logits", "weight": [[0.5], [2.0]],
                               "pos_weight": 2.5}, (2, 3), "hard01"),
    "ce": ({"type": "softmax_cross_entropy"}, (5,), "labels"),
    "ce-weight-ignored": ({"type": "softmax_cross_entropy", "weight": W5}, (5,), "ignored"),
    "ce-smoothing": ({"type": "softmax_cross_entropy", "label_smoothing": 0.25}, (5,),
                     "ignored"),
    "ce-weight-smoothing": ({"type": "softmax_cross_entropy", "weight": W5,
                             "label_smoothing": 0.1}, (5,), "ignored"),
    "ce-ignore_index-2": ({"type": "softmax_cross_entropy", "ignore_index": 2}, (5,), "labels"),
    "ce-probabilities": ({"type": "softmax_cross_entropy", "weight": W5,
                          "label_smoothing": 0.1}, (5,), "probabilities"),
    "ce-spatial": ({"type": "softmax_cross_entropy", "weight": W3}, (3, 2, 2), "ignored"),
    "ce-spatial-smoothing": ({"type": "softmax_cross_entropy", "label_smoothing": 0.3},
                             (3, 4), "ignored"),
    "ce-spatial-probabilities": ({"type": "softmax_cross_entropy", "weight": W3}, (3, 2, 2),
                                 "probabilities"),
    "nll": ({"type": "nll"}, (5,), "ignored"),
    "nll-weight-ignore_index-1": ({"type": "nll", "weight": W5, "ignore_index": 1}, (5,),
                                  "labels"),
    "nll-spatial": ({"type": "nll", "weight": W3}, (3, 2, 3), "ignored"),
}
REDUCTIONS = ("mean", "sum", "none")
BATCH = 4


def targets(kind, loss, rng):
    """Targets of ``kind`` for a batch of BATCH; "ignored": labels with one ignore_index."""
    n = BATCH
    if kind == "normal":
        return rng.standard_normal((n,) + loss.out_shape) * 1.5
    if kind == "soft01":
        return rng.random((n,) + loss.out_shape)
    if kind == "hard01":
        return rng.integers(0, 2, (n,) + loss.out_shape).astype(np.float64)
    if kind == "probabilities":
        t = rng.random((n,) + loss.out_shape)
        return t / t.sum(axis=1, keepdims=True)
    y = rng.integers(0, loss.classes, loss.vector_shape(n))
    if kind == "ignored":
        y.flat[1] = loss.ignore_index
    return y


def setup(name, reduction, seed=0):
    """(loss, logits z, checked targets) of a case: z ~ 2·N(0, 1); for "none" an N(0, 1)
    upstream vector."""
    config, shape, kind = CASES[name]
    rng = np.random.default_rng(seed)
    loss = make_loss({**config, "reduction": reduction}, shape)
    z = rng.standard_normal((BATCH,) + shape) * 2
    y = targets(kind, loss, rng)
    if reduction == "none":
        y = Targets(y, rng.standard_normal(loss.vector_shape(BATCH)))
    return loss, z, loss.check_target(y, BATCH)


def run(loss, z, y, bk):
    value, cache = loss.forward(bk, bk.asarray(z), y)
    return value, loss.backward(bk, cache)


ALL = [(name, r) for name in CASES for r in REDUCTIONS]
IDS = [f"{n}-{r}" for n, r in ALL]


# --- torch ------------------------------------------------------------------------------------

TORCH_NAMES = {"mse": "mse_loss", "l1": "l1_loss", "smooth_l1": "smooth_l1_loss",
               "huber": "huber_loss", "bce_with_logits": "binary_cross_entropy_with_logits",
               "softmax_cross_entropy": "cross_entropy", "nll": "nll_loss"}


def torch_result(loss, z, y):
    """torch's F.<loss> with the options written out here (not through refnet's twin): the
    differentiated scalar (Σ u·ℓ for "none") and the gradient w.r.t. z."""
    import torch
    import torch.nn.functional as F
    target, upstream = (y.y, y.upstream) if isinstance(y, Targets) else (y, None)
    tz = torch.tensor(z, requires_grad=True)
    tt = (torch.tensor(target) if target.dtype.kind in "iu"
          else torch.tensor(target, dtype=torch.float64))
    kw = {k: (torch.tensor(np.asarray(v, dtype=np.float64)) if k in ("weight", "pos_weight")
              else v) for k, v in loss.config.items() if v is not None}
    out = getattr(F, TORCH_NAMES[loss.type])(tz, tt, reduction=loss.reduction, **kw)
    objective = out if upstream is None else (out * torch.tensor(upstream)).sum()
    objective.backward()
    return objective.item(), tz.grad.numpy(), out.detach().numpy()


def normwise(a, b):
    a, b = np.ravel(np.asarray(a, dtype=np.float64)), np.ravel(np.asarray(b, dtype=np.float64))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.any(b) else float(
        np.linalg.norm(a))


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("name, reduction", ALL, ids=IDS)
def test_each_loss_option_matches_torchs_float64_autograd(name, reduction):
    """Loss (Σ u·ℓ for "none", and ℓ itself) and gradient within 1e-12 normwise of torch's
    float64: both compute the same function, whose float64 rounding here is a few ulps of the
    terms (refnet's rigorous bound is below 2e-14 of the gradient's norm for every case, checked
    by the bound test), so 1e-12 leaves 50× for torch's other order of operations and catches
    any difference of formula (the planted ones in test_option_witnesses.py are ≥ 1e-3)."""
    loss, z, y = setup(name, reduction)
    value, grad = run(loss, z, y, FLOAT64)
    t_value, t_grad, t_out = torch_result(loss, z, y)
    assert normwise(value, t_value) <= 1e-12
    assert normwise(grad, t_grad) <= 1e-12
    assert normwise(loss.unreduced(FLOAT64, z, y) if reduction == "none" else value,
                    t_out) <= 1e-12


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("name, reduction", ALL[::3] + ALL[2::3], ids=IDS[::3] + IDS[2::3])
def test_the_torch_twins_loss_is_torchs_with_the_models_options(name, reduction):
    """``torch_objective`` (conformance, the random nets) builds the loss with every option of
    the model: the same scalar and gradient as torch called with them written out."""
    import torch

    from refnet.interop.torch_twin import torch_objective
    config, shape, _ = CASES[name]
    loss, z, y = setup(name, reduction)
    model = Model({"input_shape": list(shape), "batch": BATCH, "layers": [{"type": "identity"}],
                   "loss": {**config, "reduction": reduction}})
    tz = torch.tensor(z, requires_grad=True)
    objective, _ = torch_objective(model, tz, y)
    objective.backward()
    t_value, t_grad, _ = torch_result(loss, z, y)
    assert objective.item() == t_value and np.array_equal(tz.grad.numpy(), t_grad)


# --- every backend ----------------------------------------------------------------------------

MP = MPBackend(50)
REF = MPBackend(100)
E = ExpansionBackend(50)
EPS = 2.0 ** (1 - E.prec)


@pytest.mark.parametrize("name, reduction", ALL, ids=IDS)
def test_float64_lies_within_its_rigorous_bound_and_the_engine_within_its_own(name, reduction):
    """float64 within the running error bound e of the 100-digit values; the expansion engine
    within 2·(2^(1−prec)/u)·e of them (spec/operations.md: every engine operation is within
    2^(1−prec), so the float64 analysis scaled to that unit bounds it), plus the reference's own
    rounding (1e-95 relative); and the bound stays below 2e-14 of the gradient's norm (the
    torch test's premise)."""
    loss, z, y = setup(name, reduction)
    v64, g64 = run(loss, z, y, FLOAT64)
    vb, gb = run(loss, z, y, BOUND)
    vr, gr = run(loss, z, y, REF)
    ve, ge = run(loss, z, y, E)
    exact_g = REF.to_numpy(gr)
    error = lambda got, exact: REF.to_numpy(REF.abs(REF.asarray(got) - exact))   # noqa: E731
    assert error(np.asarray(v64), vr) <= vb.e
    assert np.all(error(g64, gr) <= gb.e)
    assert np.array_equal(gb.v, g64)
    assert np.linalg.norm(gb.e) <= 2e-14 * np.linalg.norm(exact_g) + 1e-300
    scale = 2 * EPS / 2.0 ** -53
    for got, want, e in ((ve, vr, vb.e), (ge, gr, gb.e)):
        diff = REF.to_numpy(REF.abs(REF.asarray(E.to_mpf(got)) - want))
        allowed = scale * np.asarray(e) + 1e-95 * np.abs(REF.to_numpy(want))
        assert np.all(diff <= allowed)


@pytest.mark.parametrize("name, reduction", ALL[::2], ids=IDS[::2])
def test_the_interval_backend_encloses_the_exact_loss_and_gradient(name, reduction):
    """Intervals at 200 bits contain the 100-digit values (whose own error, 1e-100 relative,
    is far inside an interval's width of ≥ 2^-200 relative unless both are exact)."""
    loss, z, y = setup(name, reduction)
    ib = IntervalBackend(200)
    vi, gi = run(loss, z, y, ib)
    vr, gr = run(loss, z, y, REF)
    for got, want in ((np.asarray(vi, dtype=object), vr), (gi, gr)):
        lo, hi = (ib.to_fractions(b) for b in ib.bounds(got))
        exact = np.frompyfunc(fraction_of, 1, 1)(np.asarray(want, dtype=object))
        assert np.all((lo <= exact) & (exact <= hi))


@pytest.mark.parametrize("name, reduction", ALL, ids=IDS)
def test_float32_stays_float32_and_within_float32s_accuracy(name, reduction):
    """The float32 backend returns float32 (no promotion) within 3e-5 of the exact values,
    normwise. The float64 bound is ≤ 2e-14 ≈ 180 u64 of the norm here (the bound test), so the
    same computation in float32 errs by ≤ 180 u32 ≈ 1.1e-5; rounding z, y, u and the options to
    float32 adds u32 each, through a loss whose condition is below 10 here: 3e-5 covers both."""
    loss, z, y = setup(name, reduction)
    v32, g32 = run(loss, z, y, FLOAT32)
    assert np.asarray(v32).dtype == np.float32 and g32.dtype == np.float32
    vr, gr = run(loss, z, y, REF)
    assert normwise(v32, REF.to_numpy(vr)) <= 3e-5
    assert normwise(g32, REF.to_numpy(gr)) <= 3e-5


# --- what the options mean ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_reduction_none_with_upstream_ones_is_the_sum_bit_for_bit(name):
    """Σ 1·ℓ is Σℓ and 1·∂ℓ/∂z is ∂ℓ/∂z exactly, in float64 and at 50 digits: "none" is the
    upstream-weighted sum, nothing else."""
    for bk in (FLOAT64, MP):
        loss_sum, z, y = setup(name, "sum")
        loss_none = make_loss({**CASES[name][0], "reduction": "none"}, CASES[name][1])
        y_none = loss_none.check_target(y, BATCH)            # upstream: ones by default
        assert np.array_equal(y_none.upstream, np.ones(loss_none.vector_shape(BATCH)))
        vs, gs = run(loss_sum, z, y, bk)
        vn, gn = run(loss_none, z, y_none, bk)
        assert bk.to_numpy(vs) == bk.to_numpy(vn)
        assert np.array_equal(np.asarray(gs), np.asarray(gn))


@pytest.mark.parametrize("name", ["ce-weight-ignored", "ce-weight-smoothing", "ce-spatial",
                                  "nll", "nll-spatial"])
def test_an_ignored_label_adds_nothing_and_leaves_the_mean_of_the_others(name):
    """At 50 digits (sums exact, then rounded once): the mean with one label ignore_index is
    the loss of the other samples alone, whose gradient rows it equals; the ignored sample's
    gradient is 0."""
    loss, z, y = setup(name, "mean")
    value, grad = run(loss, z, y, MP)
    keep = np.arange(BATCH) != 1                              # sample 1 holds the ignored label
    if len(loss.out_shape) == 1:
        value_kept, grad_kept = run(loss, z[keep], y[keep], MP)
        assert value == value_kept
        assert np.array_equal(grad[keep], grad_kept)
        assert all(g == 0 for g in grad[1])
    else:
        # one position of a sample: ℓ there is 0 and its gradient column 0; the mean's
        # divisor is the weight of the other positions
        index = np.unravel_index(1, y.shape)
        column = (index[0], slice(None)) + tuple(index[1:])
        assert all(g == 0 for g in np.asarray(grad)[column])
        total = sum(fraction_of(v) for v in np.asarray(loss.unreduced(MP, MP.asarray(z), y)).ravel())
        labels = y.ravel()[np.arange(y.size) != 1]
        weights = (np.asarray(loss.weight)[labels] if loss.weight is not None
                   else np.ones(labels.size))
        divisor = sum(fraction_of(MP.ctx.mpf(float(w))) for w in weights)
        assert abs(fraction_of(value) - total / divisor) <= abs(total / divisor) * 1e-48


def test_a_one_hot_probability_target_is_its_label_bit_for_bit():
    """Class probabilities that are one-hot give the loss and gradient of the labels, exactly
    (float64 and 50 digits): q·(p − 1) + (Q − q)·p is (p − 1) on the label and p elsewhere. With
    class weights too, under "sum" (the mean divides by N for probabilities but by Σ w[y] for
    labels: torch's two definitions)."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((4, 5)) * 3
    labels = np.array([0, 3, 4, 3])
    onehot = np.eye(5)[labels]
    for config, reduction in (({}, "mean"), ({"weight": W5}, "sum")):
        loss = make_loss({"type": "softmax_cross_entropy", "reduction": reduction, **config},
                         (5,))
        for bk in (FLOAT64, MP):
            vl, gl = run(loss, z, loss.check_target(labels, 4), bk)
            vp, gp = run(loss, z, loss.check_target(onehot, 4), bk)
            assert bk.to_numpy(vl) == bk.to_numpy(vp)
            assert np.array_equal(np.asarray(gl), np.asarray(gp))


def test_smooth_l1_with_beta_0_is_l1_and_huber_is_delta_times_smooth_l1_with_beta_delta():
    """β = 0 is l1 bit for bit (torch calls l1_loss); huber(δ) = δ·smooth_l1(β = δ) in exact
    arithmetic, held at 50 digits to 1e-48 relative (a few roundings of each side)."""
    rng = np.random.default_rng(6)
    z, y = rng.standard_normal((3, 4)) * 2, rng.standard_normal((3, 4))
    z[0, 0] = y[0, 0]                                           # d = 0 exactly: l1's kink
    for bk in (FLOAT64, MP):
        a = run(make_loss({"type": "smooth_l1", "beta": 0.0}, (4,)), z, y, bk)
        b = run(make_loss({"type": "l1"}, (4,)), z, y, bk)
        assert bk.to_numpy(a[0]) == bk.to_numpy(b[0]) and np.array_equal(a[1], b[1])
    for delta in (0.5, 1.0, 2.5):
        h = run(make_loss({"type": "huber", "delta": delta}, (4,)), z, y, MP)
        s = run(make_loss({"type": "smooth_l1", "beta": delta}, (4,)), z, y, MP)
        for hv, sv in ((h[0], s[0]), *zip(np.ravel(h[1]), np.ravel(s[1]))):
            assert abs(hv - delta * sv) <= 1e-48 * max(abs(hv), 1e-300)


def test_l1s_gradient_at_d_0_is_0_in_every_backend():
    """sign(0) = 0 — torch's abs′ — in float64, float32, the bound, mp, intervals and the
    expansion engine; either side is ±1/M."""
    z = np.array([[0.5, -1.0, 2.0]])
    y = np.array([[0.5, 0.0, 3.0]])
    loss = make_loss({"type": "l1"}, (3,))
    for bk in (FLOAT64, FLOAT32, BOUND, MP, IntervalBackend(100), E):
        _, g = run(loss, z, y, bk)
        values = bk.to_numpy(g).ravel()
        assert values[0] == 0.0, bk
        assert values[1:] == pytest.approx([-1 / 3, -1 / 3], rel=2 ** -23), bk   # float32's


def test_torchs_all_ignored_mean_is_an_error_here_and_sum_and_none_are_zero():
    """torch returns nan (or ±inf) for a mean over no weight (every label ignored, or their
    weights summing to 0 exactly, negative ones included); refnet refuses it with one message
    naming the loss. Where every term is 0 (all ignored, all weights 0), "sum" and "none" give
    0 and a zero gradient, as torch; weights that only sum to 0 leave "sum" a real loss."""
    z = np.random.default_rng(7).standard_normal((3, 4))
    for config, y, why, zero in (
            ({}, [-100, -100, -100], "every label is ignore_index -100", True),
            ({"weight": [0.0, 1.0, 1.0, 0.0]}, [0, 3, -100],
             "the class weights of the 2 labels not ignored sum to 0", True),
            ({"weight": [0.5, 1.0, 1.0, -0.5]}, [0, 3, -100],
             "the class weights of the 2 labels not ignored sum to 0", False)):
        for kind in ("softmax_cross_entropy", "nll"):
            loss = make_loss({"type": kind, **config}, (4,))
            with pytest.raises(ValueError, match=f"{kind}.*reduction 'mean'.*0 here.*{why}.*nan"):
                loss.check_target(np.array(y), 3)
            for reduction in ("sum", "none"):
                other = make_loss({"type": kind, "reduction": reduction, **config}, (4,))
                value, grad = run(other, z, other.check_target(np.array(y), 3), FLOAT64)
                assert (float(value) == 0.0 and not np.any(grad)) is zero


# --- the verifier, the FD sweep, the certificate -------------------------------------------------

def model_of(config, in_shape, out, seed=3, reduction="mean"):
    return Model({"input_shape": list(in_shape), "seed": seed, "batch": 3,
                  "layers": [{"type": "dense", "out": out}, {"type": "tanh"},
                             {"type": "dense", "out": out}],
                  "loss": {**config, "reduction": reduction}})


VERIFY = {
    "smooth_l1-none": ({"type": "smooth_l1", "beta": 0.4}, (3,), 2, "none"),
    "huber-sum": ({"type": "huber", "delta": 0.3}, (3,), 2, "sum"),
    "bce-weights-none": ({"type": "bce_with_logits", "weight": [0.5, 2.0],
                          "pos_weight": [3.0, 0.5]}, (3,), 2, "none"),
    "ce-weight-smoothing": ({"type": "softmax_cross_entropy", "weight": [0.5, 2.0, 1.5],
                             "label_smoothing": 0.2}, (3,), 3, "mean"),
    "ce-spatial-none": ({"type": "softmax_cross_entropy", "weight": [0.5, 2.0, 1.5]},
                        (3, 2), 2, "none"),
    "nll-spatial": ({"type": "nll", "weight": [0.5, 2.0, 1.5]}, (3, 2), 2, "mean"),
}


def _data(model, rng, ignored=True):
    x = rng.standard_normal((3,) + model.input_shape)
    y = model.loss.default_targets(rng, 3)
    if ignored and hasattr(model.loss, "ignore_index"):
        y.flat[1] = model.loss.ignore_index
    if model.loss.reduction == "none":
        y = Targets(y, rng.standard_normal(model.loss.vector_shape(3)))
    return x, y


@pytest.mark.parametrize("name", sorted(VERIFY))
def test_verify_passes_the_loss_options_on_all_three_legs(name):
    """float64 within its bound of 50 digits, and the 50-digit gradient agreeing with
    high-precision finite differences of Σ u·ℓ (for "none") to ≥ 20 digits, every element."""
    config, in_shape, out, reduction = VERIFY[name]
    model = model_of(config, in_shape, out, reduction=reduction)
    x, y = _data(model, np.random.default_rng(8))
    report = verify(model, None, x, y, mode="element")
    assert report.passed, [(t.name, t.max_ulp, t.ulp_bound, t.fd_digits) for t in report.tensors]
    assert all(t.fd_kinks == 0 and t.fd_digits >= 20 for t in report.tensors)


def test_verify_fails_a_backward_that_ignores_the_upstream_vector(monkeypatch):
    """A "none" loss whose backward drops u (the gradient of Σℓ, not of Σ u·ℓ): the finite
    differences of Σ u·ℓ disagree in the first digit, and verify fails."""
    import refnet.losses as losses
    model = model_of({"type": "mse"}, (3,), 2, reduction="none")
    x, y = _data(model, np.random.default_rng(9))
    original = losses.Loss.backward

    def without_upstream(self, bk, cache):
        inner, scale = cache
        return original(self, bk, (inner, np.ones(np.shape(scale))))
    monkeypatch.setattr(losses.Loss, "backward", without_upstream)
    report = verify(model, None, x, y, mode="element")
    assert not report.passed and min(t.fd_digits for t in report.tensors) < 2


def test_verify_reports_an_fd_step_across_l1s_kink_instead_of_comparing_it():
    """An output exactly on its target (d = 0) under l1: the finite difference of x there
    straddles |d|'s kink and is reported as one; everything else passes."""
    model = Model({"input_shape": [3], "batch": 2, "layers": [{"type": "identity"}],
                   "loss": {"type": "l1"}})
    x = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    y = np.array([[0.5, 0.0, 3.0], [1.0, 0.25, 0.0]])
    report = verify(model, None, x, y, mode="element")
    t = report.tensors[-1]
    assert t.name == "x" and t.fd_kinks == 2 and "the loss (l1)" in t.kinks[0]
    assert report.passed


@pytest.mark.parametrize("name", sorted(VERIFY))
def test_a_network_with_each_loss_option_runs_in_the_expansion_engine_within_its_bound(name):
    """``model.loss_and_grads(ExpansionBackend(50), …)`` against 100 digits: every parameter
    and input gradient within 2·(2^(1−prec)/u)·e of the exact one (e: the float64 running
    bound of the same network), as tests/test_expansion.py holds the layers."""
    config, in_shape, out, reduction = VERIFY[name]
    model = model_of(config, in_shape, out, reduction=reduction)
    params, x, y = model.prepare(None, *_data(model, np.random.default_rng(13)))
    got = model.loss_and_grads(E, params, x, y)
    want = model.loss_and_grads(REF, params, x, y)
    bound = model.loss_and_grads(BOUND, params, x, y)
    scale = 2 * EPS / 2.0 ** -53
    for key in list(want.params) + ["x"]:
        pick = (lambda g: g.x) if key == "x" else (lambda g: g.params[key])
        diff = REF.to_numpy(REF.abs(REF.asarray(E.to_mpf(pick(got))) - pick(want)))
        allowed = scale * pick(bound).e + 1e-95 * np.abs(REF.to_numpy(pick(want)))
        assert np.all(diff <= allowed), key


@pytest.mark.parametrize("name", ["smooth_l1-none", "ce-spatial-none", "bce-weights-none",
                                  "nll-spatial"])
def test_the_fd_sweep_differentiates_the_upstream_weighted_loss(name):
    """The batched float64 sweep's groups carry the weights, the labels and the upstream: it
    agrees with the analytic gradient to FD accuracy, an absolute error of u^(2/3)·(|L| + |L‴|)
    ≈ 1e-10 here: held to 1e-7 of the largest gradient entry (a tensor whose exact gradient is
    0 — the last bias under cross-entropy over its class axis — is held to the same)."""
    config, in_shape, out, reduction = VERIFY[name]
    model = model_of(config, in_shape, out, reduction=reduction)
    x, y = _data(model, np.random.default_rng(10))
    params, x, y = model.prepare(None, x, y)
    grads, gx = fd_sweep(model, params, x, y)
    exact = model.loss_and_grads(FLOAT64, params, x, y)
    pairs = [(fd, exact.params[k]) for k, fd in grads.items()] + [(gx, exact.x)]
    largest = max(float(np.max(np.abs(ref))) for _, ref in pairs)
    for fd, ref in pairs:
        assert np.max(np.abs(fd - ref)) <= 1e-7 * largest


def test_certify_encloses_a_loss_with_options_and_names_a_loss_kink_it_straddles():
    """Weighted, smoothed cross-entropy over (N, C, d) is certified; l1 with an output exactly
    on its target is not certifiable, and the certificate names the loss."""
    config, in_shape, out, reduction = VERIFY["ce-spatial-none"]
    model = model_of(config, in_shape, out, reduction=reduction)
    x, y = _data(model, np.random.default_rng(11))
    assert certify(model, None, x, y, prec=120).status == "certified"
    kinked = Model({"input_shape": [3], "batch": 1, "layers": [{"type": "identity"}],
                    "loss": {"type": "l1"}})
    c = certify(kinked, None, np.array([[0.5, 1.0, 2.0]]), np.array([[0.5, 0.0, 0.0]]), prec=120)
    assert not c.failed and "the loss (l1): 2 undecidable" in c.status   # d > 0 and d < 0


# --- the fp16/bf16 emulation ------------------------------------------------------------------------

def test_the_emulated_cross_entropy_with_unit_weights_is_the_measured_composition_bit_for_bit():
    """Class weights all 1 (the option path: nll's gradient −S·q/D on log p held in fp16, then
    log_softmax's backward) give the plain path's gradient — the composition measured on the
    GPU — bit for bit, loss scale 2^10 included."""
    from refnet.lowp.emulation import Precision
    from refnet.lowp.emulation import run as emulate
    spec = {"input_shape": [4], "seed": 4, "batch": 6,
            "layers": [{"type": "dense", "out": 5}],
            "loss": {"type": "softmax_cross_entropy"}}
    plain = Model(spec)
    weighted = Model({**spec, "loss": {"type": "softmax_cross_entropy", "weight": [1.0] * 5}})
    params, x, y = plain.prepare()
    for storage in ("fp16", "bf16"):
        a = emulate(plain, Precision(storage), params, x, y, loss_scale=1024.0)
        b = emulate(weighted, Precision(storage), params, x, y, loss_scale=1024.0)
        assert np.array_equal(np.asarray(a.loss_grad.v if hasattr(a.loss_grad, "v")
                                         else a.loss_grad),
                              np.asarray(b.loss_grad.v if hasattr(b.loss_grad, "v")
                                         else b.loss_grad))
        assert all(np.array_equal(a.grads[k], b.grads[k]) for k in a.grads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_loss_option_runs_in_fp16_with_the_gradient_rounded_at_the_logits(name):
    """Under fp16 autocast the loss is float32 and its gradient the exact gradient at the stored
    logits, rounded once to fp16 (half an fp16 ulp, u16 = 2^-11 relative) — plus, for
    cross-entropy, the fp16 rounding of the gradient on log p before log_softmax's backward
    (u16 of S·|q|/D per row, carried through g − p·Σg: ≤ 2·u16·max|q|·S/D) — plus float32's
    own error, far below both (held to 4u32 of the largest entry)."""
    from refnet.lowp.emulation import Precision
    from refnet.lowp.emulation import run as emulate
    from refnet.numerics.formats import round_to
    config, shape, kind = CASES[name]
    for reduction in REDUCTIONS:
        model = Model({"input_shape": list(shape), "batch": BATCH, "seed": 1,
                       "layers": [{"type": "identity"}],
                       "loss": {**config, "reduction": reduction}})
        _, z, y = setup(name, reduction)
        z16 = round_to(z, "fp16")                           # what the identity layer stores
        params, _, y = model.prepare({}, z16, y)
        low = emulate(model, Precision("fp16"), params, z16, y, loss_scale=8.0)
        dh = np.asarray(low.loss_grad.v if hasattr(low.loss_grad, "v") else low.loss_grad,
                        dtype=np.float64)
        assert np.all(np.isfinite(dh)) and np.isfinite(low.loss)
        _, g = run(model.loss, z16, y, REF)
        exact = 8.0 * REF.to_numpy(g)
        allowed = 2.0 ** -11 * np.abs(exact) + 4 * 2.0 ** -24 * np.max(np.abs(exact))
        if kind in ("labels", "ignored", "probabilities"):
            allowed = allowed + 2 * 2.0 ** -11 * np.max(np.abs(exact))
        assert np.all(np.abs(dh - exact) <= allowed), (reduction, np.max(np.abs(dh - exact)))


# --- bad options, targets and upstreams ---------------------------------------------------------

@pytest.mark.parametrize("config, shape, match", [
    ({"type": "softmax_cross_entropy", "weight": [1.0, 2.0]}, (3,),
     r"weight must be a list of 3 class weights"),
    ({"type": "nll", "weight": [1.0, float("nan"), 1.0]}, (3,), r"weight must be a list"),
    ({"type": "nll", "weight": "heavy"}, (3,), r"weight must be a list"),
    ({"type": "nll", "weight": [True, False, True]}, (3,), r"weight must be a list"),
    ({"type": "bce_with_logits", "pos_weight": True}, (3,),
     r"pos_weight must be a number or a nested list of numbers, got True"),
    ({"type": "softmax_cross_entropy", "ignore_index": 1.5}, (3,),
     r"ignore_index must be an integer"),
    ({"type": "nll", "ignore_index": True}, (3,), r"ignore_index must be an integer"),
    ({"type": "softmax_cross_entropy", "label_smoothing": 1.5}, (3,),
     r"label_smoothing must be <= 1"),
    ({"type": "softmax_cross_entropy", "label_smoothing": -0.1}, (3,),
     r"label_smoothing must be >= 0"),
    ({"type": "smooth_l1", "beta": -1.0}, (3,), r"beta must be >= 0"),
    ({"type": "huber", "delta": 0.0}, (3,), r"delta must be > 0.*non-positive"),
    ({"type": "bce_with_logits", "pos_weight": [1.0, 2.0, 3.0]}, (4,),
     r"pos_weight of shape \(3,\) does not broadcast to one sample's shape \(4,\)"),
    ({"type": "bce_with_logits", "weight": [[1.0, 2.0]] * 5}, (2,),
     r"weight of shape \(5, 2\) does not broadcast.*batch axis"),
    ({"type": "bce_with_logits", "weight": float("inf")}, (2,), r"weight must be finite"),
    ({"type": "mse", "beta": 1.0}, (3,), r"unknown key\(s\) \['beta'\]; expected 'reduction'"),
    ({"type": "huber", "beta": 1.0}, (3,),
     r"unknown key\(s\) \['beta'\]; expected a subset of \['reduction', 'delta'\]"),
])
def test_bad_loss_options_are_errors_naming_the_loss_and_the_option(config, shape, match):
    with pytest.raises(ValueError, match=rf"loss \({config['type']}\): .*{match}"):
        make_loss(config, shape)


@pytest.mark.parametrize("config, shape, y, upstream, match", [
    ({"type": "mse", "reduction": "none"}, (3,), np.zeros((2, 3)), np.ones((2,)),
     r"upstream must have the loss vector's shape \(2, 3\).*got \(2,\)"),
    ({"type": "softmax_cross_entropy", "reduction": "none"}, (3, 4), np.zeros((2, 4), int),
     np.ones((2, 3, 4)), r"upstream must have the loss vector's shape \(2, 4\)"),
    ({"type": "mse", "reduction": "none"}, (3,), np.zeros((2, 3)),
     np.array([[1.0, np.inf, 0.0]] * 2), r"upstream must be finite"),
    ({"type": "mse"}, (3,), np.zeros((2, 3)), np.ones((2, 3)),
     r"upstream gradient is given, but reduction 'mean'.*'none' only"),
    ({"type": "softmax_cross_entropy", "ignore_index": 0}, (3,), np.full((2, 3), 1 / 3), None,
     r"ignore_index 0 applies to class labels only.*not supported for floating point"),
    ({"type": "softmax_cross_entropy"}, (3,), np.zeros((2, 3), int), None,
     r"class probabilities and must be floats"),
    ({"type": "softmax_cross_entropy"}, (3, 2), np.zeros((2, 3)), None,
     r"labels y must have shape \(2, 2\) \(or \(2, 3, 2\) for class probabilities\)"),
    ({"type": "nll"}, (3, 2), np.array([[0, 3], [1, -100]]), None,
     r"labels must lie in \[0, 2\], got \[3\] at index \[\(0, 1\)\]"),
])
def test_bad_targets_and_upstreams_are_errors_naming_what_was_expected(config, shape, y,
                                                                        upstream, match):
    loss = make_loss(config, shape)
    with pytest.raises((ValueError, TypeError), match=rf"loss \({config['type']}\): .*{match}"):
        loss.check_target(y if upstream is None else Targets(y, upstream), 2)


# --- the command line ----------------------------------------------------------------------------

@pytest.fixture
def none_model(tmp_path, monkeypatch):
    """A spec with a "none" cross-entropy over (N, C, d), and a data file with its upstream."""
    monkeypatch.chdir(tmp_path)
    config, in_shape, out, reduction = VERIFY["ce-spatial-none"]
    model = model_of(config, in_shape, out, reduction=reduction)
    (tmp_path / "m.json").write_text(json.dumps(model.spec))
    x, y = _data(model, np.random.default_rng(12))
    np.savez(tmp_path / "d.npz", x=x, y=y.y, upstream=y.upstream)
    return model, x, y


def test_grads_writes_the_loss_vector_and_the_gradients_of_the_upstream_weighted_sum(none_model,
                                                                                   capsys):
    """``refnet grads --data`` with an upstream: ``losses`` is ℓ, ``loss`` Σ u·ℓ, and the
    gradients those of the Python API with the same Targets, bit for bit."""
    model, x, y = none_model
    assert main(["grads", "m.json", "--data", "d.npz", "--out", "g.npz"]) == 0
    assert "losses (the loss vector" in capsys.readouterr().out
    with np.load("g.npz") as g:
        out = {k: g[k] for k in g.files}
    params, xx, yy = model.prepare(None, x, y)
    ref = model.loss_and_grads(FLOAT64, params, xx, yy)
    assert out["loss"] == float(ref.loss) and out["losses"].shape == (3, 2)
    assert np.array_equal(out["losses"], model.loss.unreduced(FLOAT64, ref.forward.output, yy))
    assert np.array_equal(out["grad/x"], ref.x)
    assert all(np.array_equal(out[f"grad/{k}"], v) for k, v in ref.params.items())


def test_verify_reads_the_upstream_from_the_data_file(none_model, capsys):
    """``refnet verify`` differentiates Σ u·ℓ with the file's u: it passes, and its report
    names the reduction as that sum."""
    assert main(["verify", "m.json", "--data", "d.npz"]) == 0
    out = capsys.readouterr().out
    assert "none: the loss is the sum of upstream · the loss vector" in out and "PASSED" in out


@pytest.mark.parametrize("upstream, needles", [
    (np.ones((3, 3)), ["data d.npz", "upstream must have the loss vector's shape (3, 2)",
                       "got (3, 3)"]),
    (np.full((3, 2), np.nan), ["data d.npz", "upstream must be finite"]),
])
def test_a_bad_upstream_in_the_data_file_is_one_line_exit_2(none_model, capsys, upstream,
                                                            needles):
    from test_cli_errors import assert_bad_input
    _, x, y = none_model
    np.savez("d.npz", x=x, y=y.y, upstream=upstream)
    for command in (["verify", "m.json", "--data", "d.npz"],
                    ["grads", "m.json", "--data", "d.npz", "--out", "g.npz"]):
        assert_bad_input(command, capsys, Path.cwd(), *needles)


def test_an_upstream_for_a_mean_loss_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from test_cli_errors import assert_bad_input
    monkeypatch.chdir(tmp_path)
    model = model_of({"type": "mse"}, (3,), 2)
    (tmp_path / "m.json").write_text(json.dumps(model.spec))
    np.savez("d.npz", x=np.zeros((3, 3)), y=np.zeros((3, 2)), upstream=np.ones((3, 2)))
    assert_bad_input(["verify", "m.json", "--data", "d.npz"], capsys, tmp_path, "data d.npz",
                     "reduction 'mean'", "'none' only")


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("row, name", [
    (("mse", "reduction"), "mse"),
    (("huber", "delta"), "huber-delta2.5"),
    (("bce_with_logits", "pos_weight"), "bce-weight-pos_weight"),
    (("softmax_cross_entropy", "weight"), "ce-weight-ignored"),
    (("softmax_cross_entropy", "ignore_index"), "ce-spatial"),
    (("softmax_cross_entropy", "label_smoothing"), "ce-weight-smoothing"),
    (("softmax_cross_entropy", "input (N, C, d1, ...)"), "ce-spatial-probabilities"),
    (("nll", "ignore_index"), "nll"),
], ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_the_torch_comparison_fails_when_a_loss_options_formula_is_changed(row, name,
                                                                          monkeypatch):
    """The planted changes of the options table (test_option_witnesses.py) against torch: the
    comparison that passes above fails under each."""
    from test_option_witnesses import LOSS_PLANTS
    reduction = "none" if row[1] == "reduction" else "mean"
    test_each_loss_option_matches_torchs_float64_autograd(name, reduction)
    LOSS_PLANTS[row](monkeypatch)
    with pytest.raises(AssertionError):
        test_each_loss_option_matches_torchs_float64_autograd(name, reduction)
