"""Gradient clipping and optimizers: torch's semantics, and exact where exactness is possible."""

import math

import mpmath
import numpy as np
import pytest
from conftest import HAVE_TORCH, small_spec
from hypothesis import given
from hypothesis import strategies as st

from refnet import BOUND, FLOAT64, Model
from refnet.training.clip import (
    LANE_PROBE,
    TORCH_CPU_ORDERS,
    TorchCpuOrder,
    clip_grad_norm,
    clip_grad_norm_per_tensor,
    clip_grad_value,
    normalize_grads,
    probe_torch_cpu_order,
    scale_by_norm,
    tail_probe,
    torch_cpu_norm,
    total_norm,
)
from refnet.training.optim import SGD, Adam, AdamW, make_optimizer

U = 2.0**-53


def random_grads(seed, scale=1.0, shapes=((3, 4), (4,), (2, 2, 3))):
    rng = np.random.default_rng(seed)
    return {f"{i}.weight": rng.standard_normal(s) * scale * 10.0 ** rng.integers(-3, 3)
            for i, s in enumerate(shapes)}


@pytest.fixture(scope="module")
def torch_order():
    """The order the installed torch sums float64 2-norms in, probed once per module from two
    crafted vectors (refnet.training.clip.probe_torch_cpu_order) instead of read from the CPU's name:
    on x86-64 an AVX-512 CPU runs the same AVX2 kernel as an AVX2 CPU. If torch follows none of
    the modeled orders, the bit-for-bit tests do not apply on this machine, and say why."""
    if not HAVE_TORCH:
        pytest.skip("torch not installed")
    import torch
    try:
        return probe_torch_cpu_order(
            lambda x: torch.linalg.vector_norm(torch.tensor(x, dtype=torch.float64)).item())
    except ValueError as e:
        pytest.skip(f"torch on this machine: {e}")


@given(seed=st.integers(0, 10**6), max_norm=st.floats(1e-3, 1e3),
       p=st.sampled_from([1.0, 2.0, 3.0, math.inf]))
def test_clipped_global_norm_is_at_most_max_norm_and_the_direction_is_unchanged(seed, max_norm, p):
    """‖g'‖ ≤ max_norm·(1 + 1e-12), and g' is a positive multiple of g: every ratio g'ᵢ/gᵢ equals
    one coefficient to 2u (g'ᵢ = fl(c·gᵢ) is one rounding, the ratio a second)."""
    grads = random_grads(seed)
    clipped, norm = clip_grad_norm(grads, max_norm, p)
    assert total_norm(clipped, p) <= max_norm * (1 + 1e-12)
    flat = np.concatenate([g.ravel() for g in grads.values()])
    ratios = np.concatenate([g.ravel() for g in clipped.values()])[flat != 0] / flat[flat != 0]
    coef = min(max_norm / (norm + 1e-6), 1.0)          # torch's coefficient, as a float
    assert 0 < coef <= 1
    assert np.all(np.abs(ratios - coef) <= 2 * U * coef * (1 + 4 * U))
    if norm <= max_norm / 2:
        assert all(np.array_equal(clipped[k], grads[k]) for k in grads)   # coefficient is 1.0


def test_total_norm_is_the_correctly_rounded_norm():
    """Squares rounded once, summed exactly, one square root: within an ulp of the exact norm
    (checked at 50 digits), also for values near the float64 limits (1e200, 1e-200)."""
    ctx = mpmath.MPContext()
    ctx.dps = 50
    for grads in (random_grads(0), random_grads(1, 1e200), random_grads(2, 1e-200)):
        exact = ctx.sqrt(ctx.fsum(ctx.mpf(v) ** 2 for g in grads.values() for v in g.ravel()))
        got = total_norm(grads)
        assert abs(ctx.mpf(got) - exact) <= ctx.mpf(np.spacing(got))


def test_clip_by_value_clamps_and_leaves_small_entries_alone():
    grads = {"w": np.array([-3.0, -0.5, 0.0, 0.5, 3.0])}
    out = clip_grad_value(grads, 1.0)["w"]
    assert np.array_equal(out, [-1.0, -0.5, 0.0, 0.5, 1.0])


def test_per_tensor_clipping_and_normalization():
    grads = {"a": np.array([3.0, 4.0]), "b": np.array([0.3, 0.4])}
    clipped, norms = clip_grad_norm_per_tensor(grads, 1.0)
    assert norms == {"a": 5.0, "b": pytest.approx(0.5, rel=U)}
    assert np.linalg.norm(clipped["a"]) <= 1.0 and np.array_equal(clipped["b"], grads["b"])
    unit, norm = normalize_grads(grads)
    assert total_norm(unit) == pytest.approx(1.0, abs=4 * U)
    zero, _ = normalize_grads({"a": np.zeros(3)})
    assert np.all(zero["a"] == 0)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True])
def test_non_positive_or_non_finite_thresholds_are_rejected(bad):
    with pytest.raises(ValueError, match="max_norm must be a positive finite number"):
        clip_grad_norm(random_grads(0), bad)
    with pytest.raises(ValueError, match="clip_value"):
        clip_grad_value(random_grads(0), bad)


@pytest.mark.parametrize("p", [0.5, -1, float("nan")])
def test_norm_type_below_1_is_rejected(p):
    with pytest.raises(ValueError, match="norm_type must be >= 1"):
        clip_grad_norm(random_grads(0), 1.0, p)


def test_error_if_nonfinite_raises_on_an_infinite_norm():
    grads = {"w": np.array([1.0, np.inf])}
    with pytest.raises(ValueError, match="error_if_nonfinite"):
        clip_grad_norm(grads, 1.0, error_if_nonfinite=True)
    _, norm = clip_grad_norm(grads, 1.0)
    assert norm == math.inf


# --- optimizers -----------------------------------------------------------------------------

def test_bad_optimizer_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", 0.1)
    for lr in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            make_optimizer("sgd", lr)
    with pytest.raises(ValueError, match="nesterov"):
        SGD(0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta1"):
        Adam(betas=(1.0, 0.999))


OPTIMIZER_CASES = {
    "sgd": lambda bk=None: SGD(0.1, bk=bk),
    "momentum": lambda bk=None: SGD(0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, bk=bk),
    "nesterov": lambda bk=None: SGD(0.05, momentum=0.9, nesterov=True, bk=bk),
    "adam": lambda bk=None: Adam(0.01, weight_decay=0.01, bk=bk),
    "adamw": lambda bk=None: AdamW(0.01, weight_decay=0.1, bk=bk),
}


def _mp_reference(case, theta, grads_seq):
    """The same update rules written again, independently, with mpmath scalars at 40 digits."""
    ctx = mpmath.MPContext()
    ctx.dps = 40
    th = [ctx.mpf(v) for v in theta.ravel()]
    m = [ctx.mpf(0)] * len(th)
    v = [ctx.mpf(0)] * len(th)
    buf = None
    for t, grads in enumerate(grads_seq, start=1):
        g = [ctx.mpf(x) for x in grads.ravel()]
        if case in ("sgd", "momentum", "nesterov"):
            lr = {"sgd": 0.1, "momentum": 0.1, "nesterov": 0.05}[case]
            if case == "momentum":
                g = [gi + ctx.mpf(0.01) * ti for gi, ti in zip(g, th)]
            if case != "sgd":
                damp = ctx.mpf(0.1) if case == "momentum" else 0
                buf = list(g) if buf is None else [ctx.mpf(0.9) * b + (1 - damp) * gi
                                                   for b, gi in zip(buf, g)]
                g = ([gi + ctx.mpf(0.9) * b for gi, b in zip(g, buf)] if case == "nesterov"
                     else list(buf))
            th = [ti - ctx.mpf(lr) * gi for ti, gi in zip(th, g)]
        else:
            lr, b1, b2, eps = ctx.mpf(0.01), ctx.mpf(0.9), ctx.mpf(0.999), ctx.mpf(1e-8)
            if case == "adam":
                g = [gi + ctx.mpf(0.01) * ti for gi, ti in zip(g, th)]
            else:
                th = [ti * (1 - lr * ctx.mpf(0.1)) for ti in th]
            m = [mi + (1 - b1) * (gi - mi) for mi, gi in zip(m, g)]
            v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
            c1, c2 = 1 - b1 ** t, 1 - b2 ** t
            th = [ti - lr / c1 * mi / (ctx.sqrt(vi) / ctx.sqrt(c2) + eps)
                  for ti, mi, vi in zip(th, m, v)]
    return np.array([float(x) for x in th]).reshape(theta.shape), th


@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_ten_optimizer_steps_match_an_independent_high_precision_computation(case):
    """10 steps in float64 agree with the update rules evaluated at 40 digits, within the float64
    error bound of the same 10 steps (the optimizer run in the bound backend). The constants
    (0.1, 0.9, 1e-8, ...) are the float64 numbers on both sides."""
    rng = np.random.default_rng(0)
    theta = rng.standard_normal((4, 3))
    grads_seq = [rng.standard_normal((4, 3)) for _ in range(10)]
    opt, bound_opt = OPTIMIZER_CASES[case](), OPTIMIZER_CASES[case](BOUND)
    p, pb = {"w": theta}, {"w": theta}
    for g in grads_seq:
        p = opt.step(p, {"w": g})
        pb = bound_opt.step(pb, {"w": g})
    assert np.array_equal(p["w"], pb["w"].v)
    _, exact = _mp_reference(case, theta, grads_seq)
    ctx = mpmath.MPContext()
    ctx.dps = 40
    # The bound backend treats the constants 0.1, 0.9, 1 − β (formed in float64) as exact
    # inputs, as does the reference, which receives the same float64 numbers — except the
    # Python-float bias corrections and step size (1 − βᵗ, lr/(1 − β1ᵗ), (1 − β2ᵗ)^0.5), each
    # rounded once or twice in float64: allow 4u relative per step for them.
    slack = 4 * U * 10 * np.abs(p["w"] - theta) if case in ("adam", "adamw") else 0.0
    err = np.array([float(abs(ctx.mpf(a) - b)) for a, b in zip(p["w"].ravel(), exact)])
    assert np.all(err.reshape(theta.shape) <= pb["w"].e + slack)


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_ten_steps_on_a_small_model_match_torch_optim_float64(case):
    """The same model, gradients from refnet at each step, 10 steps: parameters agree with
    torch.optim to a few ulps of the operands (torch's CPU kernels fuse θ + α·g into one
    rounding where refnet rounds twice: the difference is at most an ulp of |α·g| ≤ |θ| + |θ'|
    per operation, 4 allowed)."""
    import torch
    model = Model(small_spec("tanh", loss="mse", widths=(4,)))
    params, x, y = model.prepare()
    torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    settings = {"sgd": (torch.optim.SGD, dict(lr=0.1)),
                "momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1,
                                                   weight_decay=0.01)),
                "nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
                "adam": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
                "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1))}[case]
    torch_opt = settings[0](list(torch_params.values()), **settings[1])
    opt = OPTIMIZER_CASES[case]()
    for _ in range(10):
        before = dict(params)
        g = model.loss_and_grads(FLOAT64, params, x, y).params
        for k, tp in torch_params.items():
            tp.grad = torch.tensor(g[k])
        torch_opt.step()
        params = opt.step(params, g)
        # Keep both on the same trajectory: a few-ulp difference must not compound.
        for k, tp in torch_params.items():
            ours, theirs = params[k], tp.detach().numpy()
            tol = 4 * (np.spacing(np.abs(theirs)) + np.spacing(np.abs(before[k])))
            assert np.all(np.abs(ours - theirs) <= tol), (case, k)
            with torch.no_grad():
                tp.copy_(torch.tensor(ours))


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_clipping_matches_torch_bit_for_bit_given_the_same_norm(p, torch_order):
    """clip_grad_value_ bit for bit; clip_grad_norm_: torch's norm is within a few ulps of the
    correctly rounded one refnet computes by default, given torch's norm the scaling is bit for
    bit, and with reduction="torch_cpu" norm and clipped gradients are bit for bit."""
    import torch
    grads = random_grads(5)
    tensors = [torch.tensor(g.copy()) for g in grads.values()]
    for t in tensors:
        t.grad = t.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors, 0.5, norm_type=p).item()
    clipped, norm = clip_grad_norm(grads, 0.5, p)
    assert abs(norm - torch_norm) <= 4 * np.spacing(norm)
    same = scale_by_norm(grads, torch_norm, 0.5)
    for g, t in zip(same.values(), tensors):
        assert np.array_equal(g, t.grad.numpy())
    # and with torch's own summation order, everything bit for bit
    exact_clipped, exact_norm = clip_grad_norm(grads, 0.5, p, reduction="torch_cpu",
                                               order=torch_order)
    assert exact_norm == torch_norm
    for g, t in zip(exact_clipped.values(), tensors):
        assert np.array_equal(g, t.grad.numpy())
    for t in tensors:
        t.grad = t.detach().clone()
    torch.nn.utils.clip_grad_value_(tensors, 0.3)
    for g, t in zip(clip_grad_value(grads, 0.3).values(), tensors):
        assert np.array_equal(g, t.grad.numpy())


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@given(st.integers(1, 5000), st.floats(-30, 30), st.sampled_from([2.0, 1.0, math.inf]),
       st.integers(0, 2 ** 32 - 1))
def test_torch_cpu_norm_is_torchs_vector_norm_bit_for_bit(torch_order, n, log_scale, p, seed):
    """In the order the probe finds (4 lanes, fused tail on x86-64 with AVX2 or AVX-512 alike):
    bit for bit on any length up to 5000 and scales e^±30. Every CPU-dependent choice comes from
    the probe, none from the CPU's name."""
    import torch
    x = np.random.default_rng(seed).standard_normal(n) * math.exp(log_scale)
    assert torch_cpu_norm(x, p, torch_order) == torch.linalg.vector_norm(torch.tensor(x), p).item()


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_torch_cpu_two_norm_is_bit_for_bit_on_long_vectors_with_one_or_two_threads(torch_order):
    """p = 2 is one kernel call per vector whatever its length (ATen parallelizes this kernel
    over output elements only), so 100 000 elements agree with 1 and with 2 torch threads; p = 1
    is only promised up to 32768 elements and is not checked here beyond that."""
    import torch
    x = np.random.default_rng(5).standard_normal(100_000)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch_cpu_norm(x, 2.0, torch_order) == \
                torch.linalg.vector_norm(torch.tensor(x), 2.0).item(), threads
    finally:
        torch.set_num_threads(before)


def test_the_probe_names_every_modeled_order_from_that_orders_own_results():
    """The probe vectors tell all six modeled orders apart: fed refnet's own model of each order
    as the norm, the probe names that order (no torch needed: this is the probe's correctness)."""
    for order in TORCH_CPU_ORDERS:
        assert probe_torch_cpu_order(lambda x: torch_cpu_norm(x, 2.0, order)) == order
    results = {(torch_cpu_norm(LANE_PROBE, 2.0, o), torch_cpu_norm(tail_probe(o.lanes), 2.0, o))
               for o in TORCH_CPU_ORDERS}
    assert len(results) == len(TORCH_CPU_ORDERS)


@pytest.mark.parametrize("probe_name, fused, ulps", [
    ("lanes", True, 1), ("lanes", True, -1), ("lanes", False, 1), ("lanes", False, -1),
    ("tail", True, 1), ("tail", False, -1)])
def test_the_probe_rejects_a_norm_one_ulp_off_any_modeled_order(probe_name, fused, ulps):
    """A norm that follows a 4-lane order except for one ulp on one probe vector matches no
    modeled order, and the probe says so (ValueError) instead of naming the nearest: one ulp is
    the smallest error there is. (On the tail probe the fused and unfused results are one ulp
    apart, so fused − 1 ulp *is* the unfused order: the probe names it, checked below.)"""
    order = TorchCpuOrder(4, fused)
    off = LANE_PROBE if probe_name == "lanes" else tail_probe(4)

    def norm2(x, ulps=ulps):
        value = torch_cpu_norm(x, 2.0, order)
        return np.nextafter(value, ulps * np.inf) if np.array_equal(x, off) else value
    with pytest.raises(ValueError, match="order refnet does not model|neither"):
        probe_torch_cpu_order(norm2)
    if probe_name == "tail":
        assert probe_torch_cpu_order(lambda x: norm2(x, -ulps)) == TorchCpuOrder(4, not fused)


@pytest.mark.parametrize("order", [(3, True), (4, 1), (True, True), 4, "x86-64"])
def test_an_unmodeled_torch_cpu_order_is_a_clear_error(order):
    with pytest.raises(ValueError, match=r"order must be a TorchCpuOrder\(lanes, fused_tail\)"):
        clip_grad_norm(random_grads(0), 1.0, reduction="torch_cpu", order=order)


def test_the_fused_tail_rounds_once_where_the_unfused_one_rounds_twice():
    """The tail probe by hand: t = 1 + 2^-52 and x = 1 + 2^-27 sum to 2 + 2^-26 + 2^-51 fused
    and to the tie-to-even 2 + 2^-26 unfused (both sums exact in float64 as written; their
    square roots one ulp apart), and an FMA past the largest double is inf, as in hardware (the
    model's exact FMA must not raise)."""
    x = tail_probe(4)
    fused, unfused = math.sqrt(2 + 2.0 ** -26 + 2.0 ** -51), math.sqrt(2 + 2.0 ** -26)
    assert fused == np.nextafter(unfused, np.inf)
    assert torch_cpu_norm(x, 2.0, TorchCpuOrder(4, True)) == fused
    assert torch_cpu_norm(x, 2.0, TorchCpuOrder(4, False)) == unfused
    # 4 lanes hold 1, 0, 0, 0; the tail's 1.5e154² = 2.25e308 overflows only inside the FMA
    assert torch_cpu_norm(np.array([1.0, 0.0, 0.0, 0.0, 1.5e154]), 2.0) == math.inf


def test_clipping_thresholds_are_kinks_the_verifier_can_compare():
    """Scaling a gradient set across max_norm (or an element across c) changes the signature;
    staying on one side does not (refnet.verification.triangle treats differing signatures as a kink)."""
    from refnet.training.clip import kink_signature
    g = {"w": np.array([3.0, 4.0])}                        # N = 5
    side = lambda s, **kw: kink_signature({"w": s * g["w"]}, **kw)   # noqa: E731
    assert side(0.9, max_norm=5.0)[0].tolist() == [False]
    assert side(1.1, max_norm=5.0)[0].tolist() == [True]
    assert all(np.array_equal(a, b) for a, b in zip(side(1.1, max_norm=5.0),
                                                    side(1.2, max_norm=5.0)))
    assert side(1.0, clip_value=3.5)[0].tolist() == [False, True]
    with pytest.raises(ValueError, match="max_norm"):
        kink_signature(g, max_norm=0.0)
