"""The activations torch users reach for (silu, mish, hardtanh, relu6, hardsigmoid, hardswish,
celu, softsign, logsigmoid, gelu "tanh"): torch's value at every kink, in every backend; the
accurate forms equal the defining formulas; accurate and finite in the tails; the fp16/bf16
emulation rounds where torch's kernels do; verify, certify, diagnose and the study take them;
float64 gradients agree with torch's autograd. (The generic claims — derivative = FD of the
forward, within the error bound, finite for every finite input, float32 stays float32, the
planted errors verify catches — run on them through tests that iterate over every activation.)
"""

import json

import numpy as np
import pytest
from conftest import HAVE_TORCH
from hypothesis import given
from hypothesis import strategies as st

from refnet import (
    BOUND,
    FLOAT32,
    FLOAT64,
    IntervalBackend,
    Model,
    MPBackend,
    Precision,
    certify,
    diagnose,
    verify,
)
from refnet.cli import main
from refnet.layers.activations import ACTIVATIONS
from refnet.layers.base import ForwardState
from refnet.lowp.emulation import EmulatedBackend, StorageArithmetic, plain, store
from refnet.numerics.formats import round_to

NEW = ["silu", "mish", "hardtanh", "relu6", "hardsigmoid", "hardswish", "celu", "softsign",
       "logsigmoid"]
# Each new activation with the options the tests use (gelu "tanh" is gelu with an option).
CONFIGS = {"silu": {}, "mish": {}, "hardtanh": {"min_val": -0.5, "max_val": 1.5}, "relu6": {},
           "hardsigmoid": {}, "hardswish": {}, "celu": {"alpha": 1.25}, "softsign": {},
           "logsigmoid": {}, "gelu-tanh": {"approximate": "tanh"}}


def layer_of(key, shape=(1,), **options):
    kind = "gelu" if key == "gelu-tanh" else key
    layer = ACTIVATIONS[kind]({"type": kind, **CONFIGS[key], **options}, shape, f"test ({key})")
    layer.name = "0"
    return layer


def value_and_derivative(layer, bk, z, dh=None):
    z = bk.asarray(np.asarray(z, dtype=np.float64))
    h, cache = layer.forward(bk, {}, z)
    dz, _ = layer.backward(bk, {}, bk.asarray(np.ones(z.shape) if dh is None else dh), cache)
    return bk.to_numpy(h), bk.to_numpy(dz)


# --- torch's values at the kinks ----------------------------------------------------------------
# (type, options, z, f(z), f'(z)): f' at the kink as torch 2.13 computes it (CPU, float64/32).
KINKS = [
    ("hardtanh", {}, -1.0, -1.0, 0.0), ("hardtanh", {}, 1.0, 1.0, 0.0),
    ("hardtanh", {"min_val": -0.5, "max_val": 1.5}, -0.5, -0.5, 0.0),
    ("hardtanh", {"min_val": -0.5, "max_val": 1.5}, 1.5, 1.5, 0.0),
    ("relu6", {}, 0.0, 0.0, 0.0), ("relu6", {}, 6.0, 6.0, 0.0),
    ("hardsigmoid", {}, -3.0, 0.0, 0.0), ("hardsigmoid", {}, 3.0, 1.0, 0.0),
    ("hardswish", {}, -3.0, 0.0, 0.0), ("hardswish", {}, 3.0, 3.0, 1.0),
    ("celu", {"alpha": 1.25}, 0.0, 0.0, 1.0), ("softsign", {}, 0.0, 0.0, 1.0),
]


def kink_layer(kind, options):
    layer = ACTIVATIONS[kind]({"type": kind, **options}, (1,), f"kink ({kind})")
    layer.name = "0"
    return layer


def emulated(layer, z, storage):
    bk = EmulatedBackend(Precision(storage, "half"))
    x = store(np.array([[z]]), storage)
    h, ecache = bk.forward_layer(layer, {}, x, ForwardState())
    dz, _ = bk.backward_layer(layer, {}, store(np.ones((1, 1)), storage), ecache)
    return np.asarray(plain(h), dtype=np.float64), np.asarray(plain(dz), dtype=np.float64)


@pytest.mark.parametrize("kind, options, z, value, slope", KINKS)
def test_at_each_kink_every_backend_takes_torchs_value_and_derivative(kind, options, z, value,
                                                                      slope):
    """hardtanh' = 0 at both limits, relu6' = 0 at 0 and 6, hardsigmoid' = 0 at ±3, hardswish' = 0
    at −3 and 1 at 3, celu' = softsign' = 1 at 0 — exactly, in float64, float32, mp, the error
    bound, intervals and the fp16/bf16 emulation (each kink point is a number of every format, and
    every backend decides the same comparison there)."""
    layer = kink_layer(kind, options)
    backends = [FLOAT64, FLOAT32, MPBackend(40), BOUND, IntervalBackend(100)]
    results = [value_and_derivative(layer, bk, [[z]]) for bk in backends]
    results += [emulated(layer, z, storage) for storage in ("fp16", "bf16")]
    for h, d in results:
        assert float(h.ravel()[0]) == value and float(d.ravel()[0]) == slope


@pytest.mark.parametrize("kind", ["hardtanh", "relu6", "hardsigmoid", "hardswish", "celu",
                                  "softsign"])
def test_a_kink_point_has_the_signature_of_the_piece_whose_derivative_it_takes(kind):
    """The signature changes exactly at each kink: the point itself has its outer neighbour's
    signature (the piece torch takes f' from), the next float inside has the inner piece's; so
    a finite difference from the kink point into the middle piece is reported as a straddle."""
    layer = kink_layer(kind, {})
    points = {"hardtanh": [(-1.0, -1), (1.0, 1)], "relu6": [(0.0, -1), (6.0, 1)],
              "hardsigmoid": [(-3.0, -1), (3.0, 1)], "hardswish": [(-3.0, -1), (3.0, 1)],
              "celu": [(0.0, -1)], "softsign": [(0.0, -1)]}[kind]
    sig = lambda z: tuple(bool(s[0, 0]) for s in layer.kink_signature(          # noqa: E731
        layer.forward(FLOAT64, {}, np.array([[z]]))[1]))
    for z, outward in points:
        outer = np.nextafter(z, outward * np.inf)
        inner = np.nextafter(z, -outward * np.inf)
        assert sig(z) == sig(outer) != sig(inner), (kind, z)


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind, options, z, value, slope", KINKS)
def test_torchs_autograd_takes_the_same_value_and_derivative_at_each_kink(kind, options, z, value,
                                                                          slope, dtype):
    """The pinned kink values are torch's own (torch 2.13, CPU), in float64 and float32, alone and
    inside a 64-element tensor (vectorized and scalar loops agree there)."""
    import torch
    f = getattr(torch.nn, TORCH_MODULES[kind])(**options)
    for n, pos in ((1, 0), (64, 37)):
        t = torch.zeros(n, dtype=getattr(torch, dtype))
        t[pos] = z
        t.requires_grad_(True)
        out = f(t)
        out.sum().backward()
        assert out[pos].item() == value and t.grad[pos].item() == slope


TORCH_MODULES = {"silu": "SiLU", "mish": "Mish", "hardtanh": "Hardtanh", "relu6": "ReLU6",
                 "hardsigmoid": "Hardsigmoid", "hardswish": "Hardswish", "celu": "CELU",
                 "softsign": "Softsign", "logsigmoid": "LogSigmoid", "gelu": "GELU"}


# --- the accurate forms are the defining formulas -----------------------------------------------

def definition(key, ctx, z):
    """torch's documented formula, evaluated at the context's precision (no cancellation there)."""
    relu6 = lambda v: min(max(v, 0), 6)                                         # noqa: E731
    sig = lambda v: 1 / (1 + ctx.exp(-v))                                       # noqa: E731
    if key == "silu":
        return z * sig(z)
    if key == "mish":
        return z * ctx.tanh(ctx.log1p(ctx.exp(z)))
    if key == "hardtanh":
        return min(max(z, ctx.mpf(-0.5)), ctx.mpf(1.5))
    if key == "relu6":
        return relu6(z)
    if key == "hardsigmoid":
        return relu6(z + 3) / 6
    if key == "hardswish":
        return z * relu6(z + 3) / 6
    if key == "celu":
        a = ctx.mpf(1.25)
        return max(0, z) + min(0, a * ctx.expm1(z / a))
    if key == "softsign":
        return z / (1 + abs(z))
    if key == "logsigmoid":
        return -ctx.log1p(ctx.exp(-z))
    k = ctx.sqrt(2 / ctx.pi)
    return z / 2 * (1 + ctx.tanh(k * (z + ctx.mpf("0.044715") * z ** 3)))


GRID = np.concatenate([np.linspace(-12, 12, 97), [-300.0, -40.0, -3.0, -1.2, 0.0, 3.0, 6.0,
                                                  40.0, 300.0]])


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_each_accurate_form_equals_torchs_defining_formula_to_50_digits(key):
    """refnet's overflow-free forms (mish's t in e = exp(−|z|), gelu-tanh as z·σ(2u), logsigmoid
    as min(z, 0) − log1p(e), ...) are the formulas torch documents: refnet's at 80 digits and the
    definition at 400 (where torch's 1 + tanh(u), which cancels 61 digits at z = −12, still
    keeps 300) agree to 1e-50 of max(|f|, 1e-300) on a grid
    over [−12, 12] and ±3, ±40, ±300; and their derivatives agree with the derivative of the
    definition (a 1e-150 central difference at 400 digits, accurate to ~1e-290 where f is smooth
    — enough to resolve celu'(−300) = 6e-105 beside celu(−300) ≈ −1.25; kink points excluded)."""
    mp = MPBackend(80)
    ctx = mp.ctx
    layer = layer_of(key, (GRID.size,))
    z = mp.asarray(GRID[None, :])
    h, cache = layer.forward(mp, {}, z)
    d, _ = layer.backward(mp, {}, mp.asarray(np.ones((1, GRID.size))), cache)
    kinks = {"hardtanh": (-0.5, 1.5), "relu6": (0.0, 6.0), "hardsigmoid": (-3.0, 3.0),
             "hardswish": (-3.0, 3.0), "celu": (0.0,), "softsign": (0.0,)}.get(key, ())
    fine = MPBackend(400).ctx
    step = fine.mpf("1e-150")
    for i, v in enumerate(GRID):
        ref = ctx.mpf(definition(key, fine, fine.mpf(v)))
        assert abs(h[0, i] - ref) <= ctx.mpf("1e-50") * max(abs(ref), ctx.mpf("1e-300")), (key, v)
        if any(abs(v - k) < 1e-3 for k in kinks):
            continue
        zf = fine.mpf(v)
        fd = ctx.mpf((definition(key, fine, zf + step) - definition(key, fine, zf - step))
                     / (2 * step))
        assert abs(d[0, i] - fd) <= ctx.mpf("1e-45") * max(abs(fd), ctx.mpf("1e-300")), (key, v)


# --- accurate and finite in the tails --------------------------------------------------------

EXTREMES = np.array([-1.7976931348623157e308, -1e300, -1e154, -1e20, -746.0, -40.0, -8.0,
                     -1e-300, -5e-324, 0.0, 5e-324, 1e-300, 8.0, 40.0, 746.0, 1e20, 1e154,
                     1e300, 1.7976931348623157e308])


@pytest.mark.parametrize("key, options", [("gelu-tanh", {}), ("celu", {"alpha": 0.01}),
                                          ("celu", {"alpha": 1e-300}), ("celu", {"alpha": 1e300}),
                                          ("hardtanh", {})])
def test_options_keep_every_finite_input_finite_without_warnings(key, options):
    """The option-dependent paths (gelu-tanh's clamp of z³, celu's clamp before z/α for α < 1)
    give finite values and derivatives without any warning at ±max float, ±1e300, ±1e154 (where
    z² overflows), the exp edges and subnormals. (Options at their defaults run in
    test_activations.py's test over every activation.)"""
    layer = layer_of(key, (EXTREMES.size,), **options)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        h, d = value_and_derivative(layer, FLOAT64, EXTREMES[None, :])
    assert np.all(np.isfinite(h)) and np.all(np.isfinite(d))


TAILS = [("logsigmoid", 40.0), ("silu", -40.0), ("mish", -40.0), ("gelu-tanh", -8.0),
         ("softsign", 1e10), ("hardswish", 1e308), ("mish", 800.0), ("silu", 800.0)]


@pytest.mark.parametrize("key, z", TAILS)
def test_tails_keep_full_relative_accuracy_in_float64(key, z):
    """Where torch's forms lose the value (logsigmoid(40) and gelu-tanh(−8) by cancellation,
    softsign'(1e10) by autograd's 1/(1+|z|) − |z|/(1+|z|)², hardswish(1e308) by overflow of
    z·6), refnet's float64 value and derivative lie within their rigorous error bound of the
    exact ones, and that bound is at most 16 ulps of the exact value: the relative accuracy is
    kept (measured errors: 0 ulps; bounds 1.4–8.9). gelu-tanh(−8) is −8·σ(w), w ≈ −47.5 formed
    by a few roundings, and exp amplifies w's relative error by |w|: its bound may be
    16 + 8·|w| ulps (measured error 6 ulps, bound 217; torch's value is −0.0)."""
    layer = layer_of(key)
    hb, cb = layer.forward(BOUND, {}, BOUND.asarray(np.array([[z]])))
    db, _ = layer.backward(BOUND, {}, BOUND.asarray(np.ones((1, 1))), cb)
    mp = MPBackend(60)
    w = 2 * np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3) if key == "gelu-tanh" else 0.0
    for b, exact in zip((hb, db), (mp.to_numpy(v)[0, 0] for v in _mp_pair(layer, mp, z))):
        assert exact != 0 and np.isfinite(b.v[0, 0])
        limit = (16 + 8 * abs(w)) * np.spacing(abs(exact))
        assert abs(b.v[0, 0] - exact) <= b.e[0, 0] <= limit, (key, z)


def _mp_pair(layer, mp, z):
    h, cache = layer.forward(mp, {}, mp.asarray(np.array([[z]])))
    d, _ = layer.backward(mp, {}, mp.asarray(np.ones((1, 1))), cache)
    return h, d


@given(z=st.floats(-60, 60, allow_nan=False))
def test_gelu_tanh_derivative_equals_high_precision_central_difference(z):
    """gelu "tanh"'s backward agrees with a central difference of its forward at 130 digits to
    1e-25 (it is smooth: no kink to exclude)."""
    layer = layer_of("gelu-tanh")
    mp = MPBackend(130)
    _, d = _mp_pair(layer, mp, z)
    h = mp.ctx.mpf("1e-20")
    f = lambda v: layer.forward(mp, {}, np.array([[v]], dtype=object))[0][0, 0]   # noqa: E731
    fd = (f(mp.ctx.mpf(z) + h) - f(mp.ctx.mpf(z) - h)) / (2 * h)
    assert abs(fd - d[0, 0]) <= max(abs(d[0, 0]), mp.ctx.mpf("1e-100")) * mp.ctx.mpf("1e-25")


@given(z=st.floats(-700, 700, allow_nan=False))
def test_gelu_tanh_float64_is_within_its_error_bound(z):
    """float64 gelu-tanh value and derivative lie within the running error bound of the exact
    ones (the bound backend computes the same float64 values)."""
    layer = layer_of("gelu-tanh")
    mp = MPBackend(60)
    hb, cb = layer.forward(BOUND, {}, BOUND.asarray(np.array([[z]])))
    db, _ = layer.backward(BOUND, {}, BOUND.asarray(np.ones((1, 1))), cb)
    hm, dm = _mp_pair(layer, mp, z)
    for b, exact in ((hb, hm), (db, dm)):
        assert abs(mp.ctx.mpf(b.v[0, 0]) - exact[0, 0]) <= mp.ctx.mpf(b.e[0, 0]), z


def test_options_are_validated_with_a_clear_message():
    for kind, options, match in [("hardtanh", {"min_val": 1.0, "max_val": 1.0}, "max_val"),
                                 ("hardtanh", {"min_val": "low"}, "min_val"),
                                 ("celu", {"alpha": 0.0}, "alpha must be positive"),
                                 ("celu", {"alpha": -1.0}, "alpha must be positive"),
                                 ("gelu", {"approximate": "erf"}, "approximate"),
                                 ("relu6", {"max_val": 7.0}, "unknown key")]:
        with pytest.raises(ValueError, match=match):
            ACTIVATIONS[kind]({"type": kind, **options}, (1,), f"layers[0] ({kind})")


# --- the fp16/bf16 emulation's kernel boundaries ---------------------------------------------

@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_a_fused_activation_is_one_kernel_rounded_once(storage):
    """silu, mish, hardswish, gelu-tanh, ... under the emulation: the stored output is the float32
    kernel's result rounded once to the storage format — not each operation rounded (which
    ``StorageArithmetic`` does, and which changes some outputs of 2000: shown, so that the test
    can tell the two apart)."""
    rng = np.random.default_rng(3)
    z = plain(store(4 * rng.standard_normal((1, 2000)), storage))
    for key in ("silu", "mish", "hardswish", "gelu-tanh", "logsigmoid", "celu"):
        layer = layer_of(key, (2000,))
        bk = EmulatedBackend(Precision(storage, "half"))
        y, _ = bk.forward_layer(layer, {}, store(z, storage), ForwardState())
        once = store(layer.forward(FLOAT32, {}, np.asarray(z, dtype=np.float32))[0], storage)
        each = layer.forward(StorageArithmetic(storage), {}, store(z, storage))[0]
        assert np.array_equal(plain(y), plain(once)), key
        assert not np.array_equal(plain(once), plain(store(each, storage))), key


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_softsign_rounds_abs_plus_one_before_it_divides_as_torchs_three_kernels(storage):
    """torch's softsign is input / (input.abs() + 1): the add's result is stored in the storage
    format before the division. The emulation's output is exactly round(z / round(|z| + 1)),
    computed here with refnet.numerics.formats (exact roundings of float64 values), and differs
    from the fused round(z/(|z| + 1)) on some of the inputs."""
    rng = np.random.default_rng(4)
    z = np.asarray(plain(store(rng.standard_normal(4000) * np.exp(rng.uniform(-3, 6, 4000)),
                               storage)), dtype=np.float64)
    layer = layer_of("softsign", (z.size,))
    y, _ = EmulatedBackend(Precision(storage, "half")).forward_layer(
        layer, {}, store(z[None, :], storage), ForwardState())
    two_roundings = round_to(z / round_to(np.abs(z) + 1, storage), storage)
    fused = round_to(z / (np.abs(z) + 1), storage)
    assert np.array_equal(np.asarray(plain(y), dtype=np.float64)[0], two_roundings)
    assert not np.array_equal(two_roundings, fused)


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("storage, dtype", [("float32", "float32"), ("fp16", "float16"),
                                            ("bf16", "bfloat16")])
def test_softsign_forward_and_torch_backward_are_torchs_bit_for_bit(storage, dtype):
    """Run as torch's kernels (abs, add, div; autograd's dy/b − dy·((z/b)/b)·sgn z), refnet's
    emulated softsign gives torch's CPU results bit for bit in float32, float16 and bfloat16 on
    4000 inputs spanning 1e-4 .. 1e4 (torch's CPU half kernels, like CUDA's, compute each
    operation in float and round once)."""
    import torch
    rng = np.random.default_rng(5)
    z = rng.standard_normal(4000) * np.exp(rng.uniform(-8, 8, 4000))
    dy = rng.standard_normal(4000)
    if storage == "float32":
        bk, zs, ds = FLOAT32, z.astype(np.float32), dy.astype(np.float32)
    else:
        bk, zs, ds = StorageArithmetic(storage), store(z, storage), store(dy, storage)
    layer = layer_of("softsign", (z.size,))
    h, cache = layer.forward(bk, {}, zs)
    g = layer.torch_backward(bk, ds, cache)
    t = torch.tensor(np.asarray(plain(zs), dtype=np.float32)).to(getattr(torch, dtype))
    t.requires_grad_(True)
    out = torch.nn.functional.softsign(t)
    out.backward(torch.tensor(np.asarray(plain(ds), dtype=np.float32)).to(getattr(torch, dtype)))
    assert np.array_equal(np.asarray(plain(h), dtype=np.float32), out.detach().float().numpy())
    assert np.array_equal(np.asarray(plain(g), dtype=np.float32), t.grad.float().numpy())


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("storage, dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_fused_activations_in_half_agree_with_torchs_half_kernels_to_one_ulp(storage, dtype):
    """torch's CPU half kernels compute in float and round once, as the emulation: on 20000
    N(0, 16) inputs the stored values and input gradients agree to one ulp of the storage format
    (measured: identical for hardtanh, relu6, hardsigmoid, hardswish, celu; ≤ 0.05 % differ by an
    ulp for silu and mish; 13 % for logsigmoid's backward, which on the CPU reads a half-rounded
    exp(−|z|) saved by the forward). gelu "tanh" is not held to this (spec/precision.md)."""
    import torch
    rng = np.random.default_rng(0)
    z = plain(store(4 * rng.standard_normal((1, 20000)), storage))
    dy = plain(store(rng.standard_normal((1, 20000)), storage))
    tiny, eps = {"fp16": (2.0 ** -24, 2.0 ** -11), "bf16": (2.0 ** -133, 2.0 ** -8)}[storage]
    for key in ("silu", "mish", "hardtanh", "relu6", "hardsigmoid", "hardswish", "celu",
                "logsigmoid"):
        layer = layer_of(key, (20000,))
        kind = "gelu" if key == "gelu-tanh" else key
        module = getattr(torch.nn, TORCH_MODULES[kind])(**CONFIGS[key])
        bk = EmulatedBackend(Precision(storage, "half"))
        y, ecache = bk.forward_layer(layer, {}, store(z, storage), ForwardState())
        dx, _ = bk.backward_layer(layer, {}, store(dy, storage), ecache)
        t = torch.tensor(np.asarray(z, dtype=np.float32)).to(getattr(torch, dtype))
        t.requires_grad_(True)
        out = module(t)
        out.backward(torch.tensor(np.asarray(dy, dtype=np.float32)).to(getattr(torch, dtype)))
        for ours, theirs in ((y, out.detach()), (dx, t.grad)):
            ours = np.asarray(plain(ours), dtype=np.float64)
            theirs = theirs.double().numpy()
            ulp = 2 * eps * np.maximum(np.abs(theirs), tiny / eps)      # an ulp is ≤ 2u·|v|
            assert np.all(np.abs(ours - theirs) <= ulp), key


# --- the whole pipeline: verify, certify, diagnose, study, torch's gradients ---------------------

def net(key, seed=1):
    """dense 3 → 6 (biases N(0, 4): pre-activations spread over every piece) → act → dense 2."""
    kind = "gelu" if key == "gelu-tanh" else key
    return {"input_shape": [3], "seed": seed, "batch": 5, "loss": {"type": "mse"},
            "layers": [{"type": "dense", "out": 6, "init": "xavier_normal",
                        "bias_init": {"name": "normal", "std": 2.0}},
                       {"type": kind, **CONFIGS[key]}, {"type": "dense", "out": 2}]}


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_verify_proves_a_small_net_with_each_new_activation(key):
    """Every gradient within its float64 error bound, mp analytic = mp FD to ≥ 20 digits
    (measured 29–41), and the interval certificate encloses the exact gradient."""
    model = Model(net(key))
    report = verify(model)
    assert report.passed and not report.kinks
    assert min(t.fd_digits for t in report.tensors) >= 20
    assert certify(model).certified


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_float64_gradients_agree_with_torch_autograd_to_1e_11_normwise(key):
    """refnet float64 and torch float64 (the twin, same parameters and batch) give the same loss
    and gradients: ‖g_refnet − g_torch‖/‖g_refnet‖ ≤ 1e-11 for every tensor (measured ≤ 4e-16) —
    except where torch's float64 kernels hold a float32 constant: hardsigmoid's 1/6 and celu's
    1/α for α not a float32 number, where the difference is that constant's error, 3e-8 (both
    pinned in test_torchs_float32_constants_are_pinned)."""
    import torch

    from refnet.interop.torch_twin import torch_loss, torch_twin
    model = Model(net(key))
    params, x, y = model.prepare()
    g = model.loss_and_grads(FLOAT64, params, x, y)
    twin = torch_twin(model, params)
    tx = torch.tensor(x, requires_grad=True)
    loss = torch_loss(model)(twin(tx), torch.tensor(y))
    loss.backward()
    bound = 3.1e-8 if key == "hardsigmoid" else 1e-11
    assert abs(loss.item() - float(g.loss)) <= 1e-14 * abs(float(g.loss))
    for name, p in list(twin.named_parameters()) + [("x", tx)]:
        ours = g.x if name == "x" else g.params[name]
        assert np.linalg.norm(p.grad.numpy() - ours) <= bound * np.linalg.norm(ours), name


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_torchs_float32_constants_are_pinned():
    """torch 2.13's float64 hardsigmoid' is dy·float32(1/6) (refnet: dy/6, correctly rounded) and
    its float64 celu' uses 1/float32(α) (celu'(0) with α = 1.3 is 1.3/float32(1.3) =
    1.0000000366797828; refnet's is 1); with α = 1.25, a float32 number, torch's celu' is exact."""
    import torch
    import torch.nn.functional as F
    z = np.linspace(-2.9, 2.9, 59)
    t = torch.tensor(z, requires_grad=True)
    F.hardsigmoid(t).sum().backward()
    assert np.all(t.grad.numpy() == float(np.float32(1 / 6)))
    assert np.all(value_and_derivative(layer_of("hardsigmoid", (59,)), FLOAT64, z[None])[1]
                  == 1 / 6)
    for alpha, torch_slope in ((1.3, 1.3 / float(np.float32(1.3))), (1.25, 1.0)):
        t = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
        F.celu(t, alpha).sum().backward()
        assert t.grad.item() == torch_slope
        assert value_and_derivative(layer_of("celu", alpha=alpha), FLOAT64, [[0.0]])[1][0, 0] == 1


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_where_torchs_forms_lose_the_tail_the_numbers_are_these():
    """Pins what torch 2.13 float64 returns where refnet's forms differ (spec/operations.md):
    gelu-tanh(−8) = −0.0 (exact −3.1e-21), hardswish(1e308) = inf, softsign'(1e10) off by 6.8e-8
    relative, gelu-tanh'(1e155) NaN — and refnet's values there are finite and accurate."""
    import torch
    import torch.nn.functional as F

    def torch_pair(f, z):
        t = torch.tensor([z], dtype=torch.float64, requires_grad=True)
        out = f(t)
        out.backward()
        return out.item(), t.grad.item()
    gelu_tanh = lambda t: F.gelu(t, approximate="tanh")                          # noqa: E731
    assert torch_pair(gelu_tanh, -8.0)[0] == 0.0
    assert np.isnan(torch_pair(gelu_tanh, 1e155)[1])
    assert torch_pair(F.hardswish, 1e308)[0] == np.inf
    exact = 1 / (1 + 1e10) ** 2
    assert abs(torch_pair(F.softsign, 1e10)[1] - exact) > 1e-8 * exact
    assert value_and_derivative(layer_of("gelu-tanh"), FLOAT64, [[1e155]])[1][0, 0] == 1.0
    assert value_and_derivative(layer_of("hardswish"), FLOAT64, [[1e308]])[0][0, 0] == 1e308
    assert abs(value_and_derivative(layer_of("softsign"), FLOAT64, [[1e10]])[1][0, 0]
               - exact) <= 2 * np.spacing(exact)


ALL_NEW = [{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
           {"type": "groupnorm", "num_groups": 2}, {"type": "silu"},
           {"type": "instancenorm2d", "affine": True, "track_running_stats": True},
           {"type": "mish"}, {"type": "hardswish"}, {"type": "hardsigmoid"}, {"type": "flatten"},
           {"type": "dense", "out": 8}, {"type": "hardtanh"}, {"type": "relu6"}, {"type": "celu"},
           {"type": "dense", "out": 8}, {"type": "softsign"}, {"type": "logsigmoid"},
           {"type": "gelu", "approximate": "tanh"}, {"type": "dense", "out": 3}]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_diagnose_runs_a_net_of_every_new_layer_from_the_cli(tmp_path, capsys, precision):
    """`refnet diagnose` reads the JSON spec with every new type and accounts every tensor: no
    inf/NaN for this small net (exit 0), groupnorm's output float32 under autocast (autocast's
    float32 list), every other new layer's in its input's format."""
    spec = {"input_shape": [2, 4, 4], "seed": 0, "batch": 4, "layers": ALL_NEW,
            "loss": {"type": "softmax_cross_entropy"}}
    path = tmp_path / "all.json"
    path.write_text(json.dumps(spec))
    assert main(["diagnose", str(path), "--precision", precision, "--json"]) == 0
    tensors = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    half = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    assert tensors["0.out"]["dtype"] == half and tensors["1.out"]["dtype"] == "float32"
    assert tensors["9.out"]["dtype"] == half           # hardtanh after a Linear: storage format
    report = diagnose(Model(spec), Precision(precision, "half"))
    assert report.first_nonfinite is None


@pytest.mark.parametrize("activation", ["silu", "hardswish"])
def test_the_study_measures_a_configuration_with_a_new_activation(activation):
    """`refnet.study.grid.measure` runs a new activation like the study's own: float64 and fp16
    results with a verdict, a finite loss and a passing spot check."""
    from refnet.study.grid import VERDICTS, Config, measure
    results = measure(Config(activation, "kaiming", 3, "batchnorm"))
    assert [r.precision for r in results] == ["float64", "fp16"]
    assert all(r.verdict in VERDICTS and r.loss is not None for r in results)
    assert results[0].spot_checked is True
