"""Pooling's torch options — dilation, ceil_mode, count_include_pad with ceil_mode,
divisor_override, adaptive max and average pooling — checked against loops written from torch's
CPU kernels (``aten/src/ATen/native/cpu/MaxPoolKernel.cpp``, ``AvgPoolKernel.cpp``,
``AdaptiveAvgPoolKernel.cpp``, ``AdaptiveMaxPoolKernel.cpp``), against torch itself, in every
backend, and through the golden vectors, which fail when one of these formulas is changed."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import HAVE_TORCH, reference_rounding
from hypothesis import assume, given
from hypothesis import strategies as st

from refnet import BOUND, FLOAT64, Model, MPBackend, Precision, certify, verify
from refnet.layers import pool, windows
from refnet.layers.pool import AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool2d, MaxPool2d
from refnet.lowp.emulation import run
from refnet.numerics.formats import round_to

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"


# --- the readable specification: torch's kernels as plain loops -------------------------------

def torch_output_size(size, k, s, p, d, ceil_mode):
    """pooling_output_shape: ⌊span/s⌋ + 1 (⌈span/s⌉ + 1 in ceil mode, less a last window that
    starts past the input and the left padding)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def naive_maxpool2d(x, k, s, p, d, ceil_mode):
    """torch's loop: the window's rows ih0 + i·d (and columns) that lie inside the input, scanned
    row-major, a later value kept only if strictly larger: y and the (row, column) it came from."""
    n, c, h, w = x.shape
    oh, ow = (torch_output_size(size, k[a], s[a], p[a], d[a], ceil_mode)
              for a, size in enumerate((h, w)))
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    route = {}
    for a in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    best, where = None, None
                    for r in range(i * s[0] - p[0], i * s[0] - p[0] + d[0] * (k[0] - 1) + 1, d[0]):
                        for t in range(j * s[1] - p[1], j * s[1] - p[1] + d[1] * (k[1] - 1) + 1,
                                       d[1]):
                            if 0 <= r < h and 0 <= t < w and (best is None or x[a, ch, r, t] > best):
                                best, where = x[a, ch, r, t], (r, t)
                    y[a, ch, i, j] = best
                    route[(a, ch, i, j)] = where
    return y, route


def naive_avgpool2d(x, k, s, p, ceil_mode, count_include_pad, divisor_override):
    """torch's loop: ih1 = min(ih0 + k, H + p), pool_size = (ih1 − ih0)(iw1 − iw0) counts the
    padding inside the (clipped) window; the sum runs over the part inside the input."""
    n, c, h, w = x.shape
    oh, ow = (torch_output_size(size, k[a], s[a], p[a], 1, ceil_mode)
              for a, size in enumerate((h, w)))
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    for a in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    h0, w0 = i * s[0] - p[0], j * s[1] - p[1]
                    h1, w1 = min(h0 + k[0], h + p[0]), min(w0 + k[1], w + p[1])
                    pool_size = (h1 - h0) * (w1 - w0)
                    h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, h), min(w1, w)
                    total = x.dtype.type(0) if x.dtype != object else x[a, ch, h0, w0] * 0
                    for r in range(h0, h1):
                        for t in range(w0, w1):
                            total = total + x[a, ch, r, t]
                    if divisor_override is not None:
                        divisor = divisor_override
                    elif count_include_pad:
                        divisor = pool_size
                    else:
                        divisor = (h1 - h0) * (w1 - w0)
                    y[a, ch, i, j] = total / divisor
    return y


def naive_adaptive(x, out_hw, kind):
    """Window i of n over L: [start, end) with start = ⌊i·L/n⌋, end = ⌈(i+1)·L/n⌉ (ATen's
    start_index/end_index); max: first maximum row-major; avg: sum / window size."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    route = {}
    for a in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    r0, r1 = (i * h) // oh, ((i + 1) * h + oh - 1) // oh
                    t0, t1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
                    cells = [(r, t) for r in range(r0, r1) for t in range(t0, t1)]
                    if kind == "max":
                        best = cells[0]
                        for cell in cells[1:]:
                            if x[(a, ch) + cell] > x[(a, ch) + best]:
                                best = cell
                        y[a, ch, i, j], route[(a, ch, i, j)] = x[(a, ch) + best], best
                    else:
                        total = x[(a, ch) + cells[0]]
                        for cell in cells[1:]:
                            total = total + x[(a, ch) + cell]
                        y[a, ch, i, j] = total / len(cells)
    return y, route


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _routed(x_shape, route, dy):
    dx = np.zeros(x_shape, dtype=dy.dtype)
    if dy.dtype == object:
        dx = dx * 0
    for (a, c, i, j), (r, t) in route.items():
        dx[a, c, r, t] = dx[a, c, r, t] + dy[a, c, i, j]
    return dx


def _mp_close(mp, a, b, tol=1e-45):
    """Equal at 50 digits up to the loops' own 50-digit roundings (a few per element)."""
    a, b = mp.to_numpy(np.asarray(a, dtype=object)), mp.to_numpy(np.asarray(b, dtype=object))
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= tol * (1 + np.abs(b))))


# --- refnet equals the loops ------------------------------------------------------------------

max_configs = st.fixed_dictionaries({
    "h": st.integers(1, 7), "w": st.integers(1, 7),
    "k": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "s": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "d": st.tuples(st.integers(1, 3), st.integers(1, 2)),
    "p": st.tuples(st.integers(0, 1), st.integers(0, 1)), "ceil": st.booleans(),
    "seed": st.integers(0, 2**16)})


def _max_layer(cfg):
    k, p = cfg["k"], tuple(min(pp, kk // 2) for pp, kk in zip(cfg["p"], cfg["k"]))
    config = {"type": "maxpool2d", "kernel_size": list(k), "stride": list(cfg["s"]),
              "padding": list(p), "dilation": list(cfg["d"]), "ceil_mode": cfg["ceil"]}
    try:
        return MaxPool2d(config, (2, cfg["h"], cfg["w"]), "pool"), p
    except ValueError as e:
        assert "larger than the padded input" in str(e) or "reads only padding" in str(e)
        assume(False)


@given(max_configs)
def test_maxpool_with_dilation_and_ceil_mode_is_torchs_clipped_window_loop(cfg):
    """Forward: the same values (a max is a selection: bit for bit in float64 and mp); the
    gradient goes to the element torch's loop picks (the first maximum of the clipped window),
    summed over windows: equal at 50 digits. Rounding x to one decimal makes ties."""
    layer, p = _max_layer(cfg)
    x = np.round(np.random.default_rng(cfg["seed"]).standard_normal((2, 2, cfg["h"], cfg["w"])), 1)
    ref, route = naive_maxpool2d(x, cfg["k"], cfg["s"], p, cfg["d"], cfg["ceil"])
    y, argmax = layer.forward(FLOAT64, {}, x)
    assert y.shape == ref.shape and np.array_equal(y, ref)
    mp = MPBackend(50)
    y_mp, cache = layer.forward(mp, {}, mp.asarray(x))
    assert np.array_equal(mp.to_numpy(y_mp), ref)
    dy = mp.asarray(np.random.default_rng(cfg["seed"] + 1).standard_normal(ref.shape))
    dx, _ = layer.backward(mp, {}, dy, cache)
    assert _mp_close(mp, dx, _routed(x.shape, route, dy))


avg_configs = st.fixed_dictionaries({
    "h": st.integers(1, 7), "w": st.integers(1, 7),
    "k": st.tuples(st.integers(1, 4), st.integers(1, 3)),
    "s": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "p": st.tuples(st.integers(0, 2), st.integers(0, 1)),
    "ceil": st.booleans(), "include": st.booleans(), "divisor": st.sampled_from([None, 3, -2]),
    "seed": st.integers(0, 2**16)})


@given(avg_configs)
def test_avgpool_with_ceil_mode_and_divisor_override_is_torchs_loop(cfg):
    """Forward at 50 digits equals torch's loop (clipped ceil-mode windows, their padding
    counted with count_include_pad, divisor_override replacing the count), float64 within its
    error bound of it; the backward is the forward's adjoint: ⟨y, dy⟩ = ⟨x, dx⟩ at 60 digits."""
    p = tuple(min(pp, kk // 2) for pp, kk in zip(cfg["p"], cfg["k"]))
    config = {"type": "avgpool2d", "kernel_size": list(cfg["k"]), "stride": list(cfg["s"]),
              "padding": list(p), "ceil_mode": cfg["ceil"], "count_include_pad": cfg["include"],
              "divisor_override": cfg["divisor"]}
    try:
        layer = AvgPool2d(config, (2, cfg["h"], cfg["w"]), "avg")
    except ValueError as e:
        assert "larger than the padded input" in str(e)
        assume(False)
    x = np.random.default_rng(cfg["seed"]).standard_normal((2, 2, cfg["h"], cfg["w"]))
    mp = MPBackend(50)
    ref = naive_avgpool2d(mp.asarray(x), cfg["k"], cfg["s"], p, cfg["ceil"], cfg["include"],
                          cfg["divisor"])
    y_mp, _ = layer.forward(mp, {}, mp.asarray(x))
    assert _mp_close(mp, y_mp, ref)
    yb, _ = layer.forward(BOUND, {}, x)
    assert np.all(np.abs(yb.v - mp.to_numpy(ref)) <= yb.e + reference_rounding(mp.to_numpy(ref)))
    _assert_adjoint(layer, x, cfg["seed"])


def _assert_adjoint(layer, x, seed):
    mp = MPBackend(60)
    y, cache = layer.forward(mp, {}, mp.asarray(x))
    dy = mp.asarray(np.random.default_rng(seed + 2).standard_normal(y.shape))
    dx, _ = layer.backward(mp, {}, dy, cache)
    lhs, rhs = mp.sum(y * dy)[()], mp.sum(mp.asarray(x) * dx)[()]
    assert abs(lhs - rhs) <= 1e-50 * (abs(lhs) + mp.sum(mp.abs(y * dy))[()])


@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 9), st.integers(1, 9),
       st.integers(0, 2**16))
def test_adaptive_pools_are_torchs_uneven_window_loops(h, w, oh, ow, seed):
    """Any output size, more outputs than inputs included (windows then repeat): max — the
    same values bit for bit, the gradient to the first maximum of each uneven window (ties from
    rounding to one decimal); avg — 50-digit agreement, float64 within its bound, and the
    backward the forward's adjoint."""
    x = np.round(np.random.default_rng(seed).standard_normal((2, 2, h, w)), 1)
    ref, route = naive_adaptive(x, (oh, ow), "max")
    layer = AdaptiveMaxPool2d({"type": "adaptive_maxpool2d", "output_size": [oh, ow]}, (2, h, w),
                              "amax")
    y, _ = layer.forward(FLOAT64, {}, x)
    assert np.array_equal(y, ref)
    mp = MPBackend(50)
    y_mp, cache = layer.forward(mp, {}, mp.asarray(x))
    dy = mp.asarray(np.random.default_rng(seed + 1).standard_normal(ref.shape))
    dx, _ = layer.backward(mp, {}, dy, cache)
    assert _mp_close(mp, dx, _routed(x.shape, route, dy))

    avg = AdaptiveAvgPool2d({"type": "adaptive_avgpool2d", "output_size": [oh, ow]}, (2, h, w),
                            "aavg")
    ref_avg, _ = naive_adaptive(mp.asarray(x), (oh, ow), "avg")
    y_avg, _ = avg.forward(mp, {}, mp.asarray(x))
    assert _mp_close(mp, y_avg, ref_avg)
    yb, _ = avg.forward(BOUND, {}, x)
    assert np.all(np.abs(yb.v - mp.to_numpy(ref_avg))
                  <= yb.e + reference_rounding(mp.to_numpy(ref_avg)))
    _assert_adjoint(avg, x, seed)


def test_adaptive_windows_are_floor_starts_and_ceil_ends():
    """By hand: 5 → 3 gives [0,2) [1,4) [3,5) (overlapping), 3 → 4 gives [0,1) [0,2) [1,3)
    [2,3) (more outputs than inputs), 13 → 6 (AlexNet's 6×6 after 13×13) [0,3) [2,5) [4,7)
    [6,9) [8,11) [10,13), and 14 → 7 (VGG's (7, 7) on 14×14) the 2-wide tiling."""
    for size, out, expected in [
            (5, 3, [(0, 2), (1, 4), (3, 5)]), (3, 4, [(0, 1), (0, 2), (1, 3), (2, 3)]),
            (13, 6, [(0, 3), (2, 5), (4, 7), (6, 9), (8, 11), (10, 13)]),
            (14, 7, [(2 * i, 2 * i + 2) for i in range(7)])]:
        start, end = windows.adaptive_bounds(size, out)
        assert list(zip(start.tolist(), end.tolist())) == expected


def test_output_size_null_keeps_that_input_size():
    layer = AdaptiveAvgPool2d({"type": "adaptive_avgpool2d", "output_size": [None, 3]},
                              (2, 5, 7), "aavg")
    assert layer.out_shape == (2, 5, 3)
    assert AdaptiveMaxPool2d({"type": "adaptive_maxpool2d", "output_size": 4}, (1, 9, 9),
                             "amax").out_shape == (1, 4, 4)


# --- every backend ---------------------------------------------------------------------------

OPTION_SPECS = {
    "maxpool2d dilation": ({"type": "maxpool2d", "kernel_size": 3, "stride": 1, "padding": 1,
                            "dilation": 2}, [2, 6, 6]),
    "maxpool2d ceil_mode": ({"type": "maxpool2d", "kernel_size": 2, "stride": 2,
                             "padding": [1, 0], "ceil_mode": True}, [2, 5, 5]),
    "avgpool2d ceil_mode": ({"type": "avgpool2d", "kernel_size": 3, "stride": 2, "padding": 1,
                             "ceil_mode": True}, [2, 6, 6]),
    "avgpool2d divisor_override": ({"type": "avgpool2d", "kernel_size": 2, "stride": 1,
                                    "padding": 1, "divisor_override": 3}, [2, 4, 4]),
    "adaptive_avgpool2d": ({"type": "adaptive_avgpool2d", "output_size": [3, 2]}, [2, 5, 7]),
    "adaptive_maxpool2d": ({"type": "adaptive_maxpool2d", "output_size": [3, 4]}, [2, 5, 3]),
}


def _option_model(name, batch=2):
    layer, shape = OPTION_SPECS[name]
    return Model({"input_shape": shape, "seed": 3, "batch": batch, "loss": {"type": "mse"},
                  "layers": [{"type": "conv2d", "out_channels": 2, "kernel_size": 1},
                             {"type": "tanh"}, layer, {"type": "flatten"},
                             {"type": "dense", "out": 2}]})


@pytest.mark.parametrize("name", list(OPTION_SPECS))
def test_each_option_passes_the_triangle_and_is_certified(name):
    """conv 1×1 → tanh → the pool → dense, mse: every float64 gradient within its error bound
    of the 50-digit one, which mp central differences match to >= 20 digits; and the interval
    run encloses every gradient (max pooling compares only positions inside the input, so no
    −inf reaches the intervals)."""
    model = _option_model(name)
    report = verify(model, directions=1)
    assert report.passed, [(t.name, t.fd_digits, t.ulp_passed) for t in report.tensors]
    c = certify(model)
    assert c.certified and not c.straddles, (c.failed, c.straddles)


@pytest.mark.slow
@given(h=st.integers(2, 7), w=st.integers(2, 7), k=st.integers(1, 3), s=st.integers(1, 3),
       p=st.integers(0, 1), d=st.integers(1, 2), ceil_mode=st.booleans(),
       divisor=st.sampled_from([None, 2, -3]), oh=st.integers(1, 8), ow=st.integers(1, 8),
       kind=st.sampled_from(["maxpool2d", "avgpool2d", "adaptive_maxpool2d",
                             "adaptive_avgpool2d"]), seed=st.integers(0, 2**16))
def test_pool_options_pass_the_triangle_in_any_geometry(h, w, k, s, p, d, ceil_mode, divisor,
                                                        oh, ow, kind, seed):
    """conv 1×1 → tanh → the pool in a random geometry torch accepts → flatten, mse: every
    gradient within its float64 bound, mp FD agreeing to >= 20 digits."""
    if kind.startswith("adaptive"):
        layer = {"type": kind, "output_size": [oh, ow]}
    else:
        layer = {"type": kind, "kernel_size": k, "stride": s, "padding": min(p, k // 2),
                 "ceil_mode": ceil_mode}
        layer.update({"dilation": d} if kind == "maxpool2d" else {"divisor_override": divisor})
    spec = {"input_shape": [2, h, w], "seed": seed, "batch": 2, "loss": {"type": "mse"},
            "layers": [{"type": "conv2d", "out_channels": 2, "kernel_size": 1},
                       {"type": "tanh"}, layer, {"type": "flatten"}]}
    try:
        model = Model(spec)
    except ValueError as e:
        assert "larger than the padded input" in str(e) or "reads only padding" in str(e)
        assume(False)
    report = verify(model, directions=1)
    assert report.passed, [(t.name, t.fd_digits, t.ulp_passed) for t in report.tensors]


def test_a_tie_in_an_adaptive_window_is_a_kink_the_certificate_names():
    """Two equal maxima in one uneven window: the derivative has no single value there; the
    interval run records the straddle at the pool, and the certificate says not certifiable."""
    model = Model({"input_shape": [1, 3, 2], "seed": 0, "batch": 1, "loss": {"type": "mse"},
                   "layers": [{"type": "adaptive_maxpool2d", "output_size": [2, 1]},
                              {"type": "flatten"}]})
    x = np.array([[[[1.0, 2.0], [2.0, 0.5], [0.0, 0.0]]]])    # rows [0,2) hold the tie
    c = certify(model, x=x, y=np.zeros((1, 2)))
    assert not c.certified and any("adaptive_maxpool2d" in k for k in c.straddles)


@pytest.mark.parametrize("name", list(OPTION_SPECS))
def test_each_option_runs_in_fp16_and_max_pooling_stays_exact_selection(name):
    """Under fp16 (model.half(), float32 accumulation) every output and gradient is finite,
    and the pool's stored output is the float64 pool of its stored input: bit for bit for max
    pooling (a selection), and for average pooling within one fp16 ulp of the result plus the
    float32 sum's error K·2⁻²⁴·mean|x| (the kernel sums in float32, then rounds once)."""
    model = _option_model(name)
    params, x, y = model.prepare()
    r = run(model, Precision("fp16", policy="half"), params, x, y)
    assert r.first_nonfinite() is None
    stored_in, stored_out = (np.asarray(out, dtype=np.float64) for _, _, out in r.outputs[1:3])
    layer = model.layers[2]
    expected, _ = layer.forward(FLOAT64, {}, stored_in)
    if "max" in name:
        assert np.array_equal(stored_out, round_to(expected, "fp16"))
    else:
        k = layer.windows.K
        mean_abs, _ = layer.forward(FLOAT64, {}, np.abs(stored_in))
        allowed = (np.spacing(np.abs(expected).astype(np.float16)).astype(np.float64)
                   + k * 2.0 ** -24 * np.abs(mean_abs))
        assert np.all(np.abs(stored_out - expected) <= allowed)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, config, in_shape, match", [
    (MaxPool2d, {"kernel_size": 2, "ceil_mode": 1}, (1, 4, 4), "ceil_mode must be true or false"),
    (MaxPool2d, {"kernel_size": 2, "dilation": 0}, (1, 4, 4), "dilation must be an integer >= 1"),
    (MaxPool2d, {"kernel_size": [2, 1], "padding": [1, 0], "dilation": [2, 1]}, (1, 1, 3),
     r"a window reads only padding \(kernel \(2, 1\), dilation \(2, 1\)"),
    (AvgPool2d, {"kernel_size": 2, "divisor_override": 0}, (1, 4, 4),
     "divisor_override must be null or a nonzero integer"),
    (AvgPool2d, {"kernel_size": 2, "divisor_override": 1.5}, (1, 4, 4),
     "divisor_override must be null or a nonzero integer"),
    (AvgPool2d, {"kernel_size": 2, "divisor_override": True}, (1, 4, 4),
     "divisor_override must be null or a nonzero integer"),
    (AvgPool2d, {"kernel_size": 2, "dilation": 2}, (1, 4, 4), r"unknown key\(s\) \['dilation'\]"),
    (AdaptiveAvgPool2d, {}, (1, 4, 4), "needs 'output_size'"),
    (AdaptiveAvgPool2d, {"output_size": 0}, (1, 4, 4), "output_size must be an integer >= 1"),
    (AdaptiveMaxPool2d, {"output_size": [2, "a"]}, (1, 4, 4), "output_size must be an integer"),
    (AdaptiveMaxPool2d, {"output_size": 2}, (4, 4), r"expects input \(N, C, H, W\)"),
])
def test_bad_pool_options_raise_value_errors_naming_the_layer(cls, config, in_shape, match):
    with pytest.raises(ValueError, match=match):
        cls({"type": cls.type, **config}, in_shape, f"layers[0] ({cls.type})")


# --- torch ------------------------------------------------------------------------------------

TORCH_CASES = [
    ("maxpool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2}),
    ("maxpool2d", {"kernel_size": [2, 3], "stride": [1, 2], "padding": [1, 1], "dilation": [3, 1]}),
    ("maxpool2d", {"kernel_size": 2, "stride": 2, "padding": [1, 0], "ceil_mode": True}),
    ("maxpool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2, "ceil_mode": True}),
    ("maxpool2d", {"kernel_size": 4, "stride": 3, "ceil_mode": True}),
    ("avgpool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("avgpool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
                   "count_include_pad": False}),
    ("avgpool2d", {"kernel_size": [4, 2], "stride": [3, 1], "padding": [2, 1], "ceil_mode": True}),
    ("avgpool2d", {"kernel_size": 2, "stride": 1, "padding": 1, "divisor_override": 3}),
    ("avgpool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
                   "divisor_override": -2}),
    ("adaptive_avgpool2d", {"output_size": [3, 4]}),
    ("adaptive_avgpool2d", {"output_size": [None, 9]}),
    ("adaptive_avgpool2d", {"output_size": 1}),
    ("adaptive_maxpool2d", {"output_size": [3, 4]}),
    ("adaptive_maxpool2d", {"output_size": [9, None]}),
    ("adaptive_maxpool2d", {"output_size": 2}),
]


def torch_pool(kind, options):
    import torch.nn.functional as F
    tup = lambda v: tuple(v) if isinstance(v, list) else v      # noqa: E731
    o = {k: tup(v) for k, v in options.items()}
    if kind == "maxpool2d":
        return lambda t: F.max_pool2d(t, o["kernel_size"], o.get("stride"), o.get("padding", 0),
                                      o.get("dilation", 1), o.get("ceil_mode", False))
    if kind == "avgpool2d":
        return lambda t: F.avg_pool2d(t, o["kernel_size"], o.get("stride"), o.get("padding", 0),
                                      o.get("ceil_mode", False), o.get("count_include_pad", True),
                                      o.get("divisor_override"))
    f = F.adaptive_avg_pool2d if kind == "adaptive_avgpool2d" else F.adaptive_max_pool2d
    return lambda t: f(t, o["output_size"])


LAYERS = {"maxpool2d": MaxPool2d, "avgpool2d": AvgPool2d, "adaptive_avgpool2d": AdaptiveAvgPool2d,
          "adaptive_maxpool2d": AdaptiveMaxPool2d}


def compare_with_torch(kind, options, x, dy_seed=0):
    """torch's output and dx against the exact (50-digit) values of refnet's formula, within
    refnet's rigorous float64 bound. Why that bound holds torch too: max pooling's forward is a
    selection (exact: compared bit for bit) and each dx element a sum of the same ≤ R routed dy
    values, whose error in any order is ≤ γ_(R−1)·Σ|terms| — the term the bound adds for
    refnet's own sum of R candidates; average pooling sums the same window values (any order:
    ≤ γ_(K−1)·Σ|x|) and divides by the same integer D, which the bound also holds. A different
    window, divisor or route is off by a whole term, far outside. Returns the failures."""
    import torch
    layer = LAYERS[kind]({"type": kind, **options}, x.shape[1:], kind)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch_pool(kind, options)(tx)
    if tuple(ty.shape) != (x.shape[0],) + layer.out_shape:
        return [f"shape: torch {tuple(ty.shape)}, refnet {(x.shape[0],) + layer.out_shape}"]
    dy = np.random.default_rng(dy_seed).standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(dy))
    mp = MPBackend(50)
    ym, cm = layer.forward(mp, {}, mp.asarray(x))
    dxm, _ = layer.backward(mp, {}, mp.asarray(dy), cm)
    yb, cb = layer.forward(BOUND, {}, x)
    dxb, _ = layer.backward(BOUND, {}, BOUND.asarray(dy), cb)
    failures = []
    for what, got, exact, bound in (("y", ty.detach().numpy(), ym, yb), ("dx", tx.grad.numpy(),
                                                                       dxm, dxb)):
        if not np.all(np.abs(got - mp.to_numpy(exact))
                      <= bound.e + reference_rounding(mp.to_numpy(exact))):
            failures.append(what)
    if "max" in kind and not np.array_equal(ty.detach().numpy(), mp.to_numpy(ym)):
        failures.append("y not bit for bit")
    return failures


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("kind, options", TORCH_CASES)
def test_pool_options_match_torch_float64_ties_included(kind, options):
    """Output shape, output and input gradient match torch's F.max_pool2d / avg_pool2d /
    adaptive_*_pool2d on a 7×9 input rounded to one decimal (ties: the first maximum)."""
    x = np.round(np.random.default_rng(6).standard_normal((2, 3, 7, 9)), 1)
    assert compare_with_torch(kind, options, x) == []


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 4), st.integers(1, 3),
       st.integers(0, 2), st.integers(1, 3), st.booleans(), st.sampled_from(["max", "avg"]),
       st.booleans())
def test_refnet_accepts_exactly_the_pools_torch_accepts_and_agrees_on_them(h, w, k, s, p, d,
                                                                          ceil_mode, kind, include):
    """Random geometry: refnet raises ValueError exactly where torch raises (padding above half
    the kernel, an output smaller than 1) — except a dilated window that reads only padding,
    which torch returns as −inf (with indices outside the input) and refnet rejects — and where
    both accept, the shapes, values and gradients agree (as above)."""
    import torch
    options = {"kernel_size": k, "stride": s, "padding": p, "ceil_mode": ceil_mode}
    if kind == "max":
        options["dilation"] = d
    else:
        options["count_include_pad"] = include
    name = "maxpool2d" if kind == "max" else "avgpool2d"
    x = np.round(np.random.default_rng(h * 7 + w).standard_normal((1, 2, h, w)), 1)
    try:
        with torch.no_grad():
            out = torch_pool(name, options)(torch.tensor(x))
        torch_error = None
    except RuntimeError as e:
        torch_error = str(e)
    try:
        LAYERS[name]({"type": name, **options}, x.shape[1:], name)
    except ValueError as e:
        if "reads only padding" in str(e):
            assert torch_error is None and torch.isinf(out).any()
        else:
            assert torch_error is not None, (str(e), options)
        return
    assert torch_error is None, (torch_error, options)
    assert compare_with_torch(name, options, x) == []


# --- golden vectors: each option's formula, planted wrong, makes a vector fail ----------------

class _LastMaximum:
    """A backend whose argmax picks the *last* maximum (the planted tie convention)."""

    def __init__(self, bk):
        self.bk = bk

    def __getattr__(self, name):
        return getattr(self.bk, name)

    def argmax(self, a, axis):
        reverse = (slice(None),) * (axis % len(a.shape)) + (slice(None, None, -1),)
        return a.shape[axis] - 1 - self.bk.argmax(a[reverse], axis)


_ADAPTIVE_BOUNDS = windows.adaptive_bounds
_DIVISORS = AvgPool2d.divisors


def _floor_pool_output_size(size, kernel, stride, dilation, pad_l, pad_r, ceil_mode):
    return windows.output_size(size, kernel, stride, dilation, pad_l + pad_r)


def _ceil_without_the_last_window_rule(size, kernel, stride, dilation, pad_l, pad_r, ceil_mode):
    if not ceil_mode:
        return windows.output_size(size, kernel, stride, dilation, pad_l + pad_r)
    return (size + pad_l + pad_r - dilation * (kernel - 1) - 1 + stride - 1) // stride + 1


def _floor_ends(size, out):
    start, end = _ADAPTIVE_BOUNDS(size, out)
    return start, ((np.arange(out) + 1) * size) // out


def _plant(monkeypatch, plant):
    """Apply one planted change of a formula (see PLANTS)."""
    kind, *args = plant
    if kind == "setattr":
        monkeypatch.setattr(*args)
    elif kind == "dilation ignored":
        real = pool.Windows
        monkeypatch.setattr(pool, "Windows", lambda in_hw, k, s, d, p, where, ceil_mode=False:
                            real(in_hw, k, s, (1, 1), p, where, ceil_mode=ceil_mode))
    elif kind == "last maximum":
        real_forward = MaxPool2d.forward

        def last_maximum(self, bk, params, x, state=None):
            return real_forward(self, _LastMaximum(bk), params, x, state)
        monkeypatch.setattr(MaxPool2d, "forward", last_maximum)
    elif kind == "dense rows dropped":
        from refnet.layers.dense import Dense
        real_backward = Dense.backward

        def batch_axis_only(self, bk, params, dy, x):
            dx, grads = real_backward(self, bk, params, dy, x)
            if dy.ndim > 2:                              # only the last row of each sample
                grads["weight"] = bk.matmul(dy[:, -1].T, x[:, -1])
                grads["bias"] = bk.sum(dy[:, -1], axis=0)
            return dx, grads
        monkeypatch.setattr(Dense, "backward", batch_axis_only)


def _count_include_pad_ignoring_the_clip(win):
    return np.full(win.L, win.K)


def _divisor_override_ignored(self):
    win = self.windows
    return pool.padded_window_sizes(win) if self.config["count_include_pad"] \
        else win.valid.sum(axis=0)


def _exclude_pad_counting_padding(self):
    if self.config["divisor_override"] is None and not self.config["count_include_pad"]:
        return pool.padded_window_sizes(self.windows)
    return _DIVISORS(self)


# The options table of spec/operations.md, row by row: (layer, torch option) -> the planted
# change and the vectors that must fail under it.
PLANTS = {
    ("maxpool2d", "dilation"): (("dilation ignored",), ["maxpool2d-dilation"]),
    ("maxpool2d", "ceil_mode"): (("setattr", windows, "pool_output_size", _floor_pool_output_size),
                                 ["maxpool2d-ceil"]),
    ("maxpool2d", "ceil_mode: last window starts inside"): (
        ("setattr", windows, "pool_output_size", _ceil_without_the_last_window_rule),
        ["maxpool2d-ceil"]),
    ("avgpool2d", "ceil_mode"): (("setattr", windows, "pool_output_size", _floor_pool_output_size),
                                 ["avgpool2d-ceil", "avgpool2d-ceil-exclude-pad"]),
    ("avgpool2d", "count_include_pad with ceil_mode"): (
        ("setattr", pool, "padded_window_sizes", _count_include_pad_ignoring_the_clip),
        ["avgpool2d-ceil"]),
    ("avgpool2d", "count_include_pad=False with ceil_mode"): (
        ("setattr", AvgPool2d, "divisors", _exclude_pad_counting_padding),
        ["avgpool2d-ceil-exclude-pad"]),
    ("avgpool2d", "divisor_override"): (("setattr", AvgPool2d, "divisors",
                                         _divisor_override_ignored),
                                        ["avgpool2d-divisor-override"]),
    ("adaptive_avgpool2d", "output_size"): (("setattr", windows, "adaptive_bounds", _floor_ends),
                                            ["adaptive_avgpool2d", "adaptive_avgpool2d-none"]),
    ("adaptive_maxpool2d", "output_size"): (("setattr", windows, "adaptive_bounds", _floor_ends),
                                            ["adaptive_maxpool2d"]),
    ("adaptive_maxpool2d", "ties: first maximum"): (("last maximum",),
                                                    ["adaptive_maxpool2d", "maxpool2d-dilation"]),
    ("dense", "input (N, *, in_features)"): (("dense rows dropped",),
                                             ["dense-3d", "net-sequence-mlp"]),
}


def _options_table():
    """(layer, option) of every row of the options table in spec/operations.md."""
    text = (ROOT / "spec" / "operations.md").read_text()
    section = text.split("### Options by torch name")[1].split("\n#")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 4 and cells[0] not in ("layer", "---"):
            rows.append((cells[0].strip("`"), cells[1].strip("`")))
    return rows


def test_every_row_of_the_options_table_has_a_planted_change_and_names_its_vectors():
    rows = _options_table()
    assert sorted(rows) == sorted(PLANTS)
    text = (ROOT / "spec" / "operations.md").read_text().split("### Options by torch name")[1]
    for (layer, option), (_, names) in PLANTS.items():
        for name in names:
            assert (VECTORS / f"{name}.json").exists() and f"`{name}`" in text, name


@pytest.mark.parametrize("row", list(PLANTS), ids=lambda r: f"{r[0]}-{r[1]}")
def test_each_options_formula_changed_makes_its_golden_vector_fail(row, monkeypatch, tmp_path):
    """The committed vectors recompute without drift (test_vectors.py); with the formula of
    this option changed — ceil_mode without torch's last-window rule, adaptive windows ending
    at the floor instead of the ceiling, divisor_override ignored, ... — each vector the table
    names no longer checks: a value, a shape or the computation itself differs."""
    from refnet.interop.vectors import check
    plant, names = PLANTS[row]
    for name in names:
        shutil.copy(VECTORS / f"{name}.json", tmp_path / f"{name}.json")
    assert check(tmp_path) == []                           # unchanged: it passes
    _plant(monkeypatch, plant)
    for name in names:
        single = tmp_path / name
        single.mkdir()
        shutil.copy(VECTORS / f"{name}.json", single / f"{name}.json")
        try:
            problems = check(single)
        except (ValueError, IndexError) as e:              # a shape no longer fits the file
            problems = [f"{name}: {e}"]
        assert problems, (row, name)


def test_the_planted_floor_ends_differ_from_torchs_windows():
    """The plant is a real change: floor ends drop the last position of the uneven windows."""
    assert _floor_ends(5, 3)[1].tolist() == [1, 3, 5] != windows.adaptive_bounds(5, 3)[1].tolist()


def test_the_new_vectors_hold_kinks_at_the_planted_ties():
    """The planted ties (a dilated window, an overlap of adaptive windows) are flagged: two
    elements each, where a framework with another tie convention may differ."""
    for name in ("maxpool2d-dilation", "adaptive_maxpool2d"):
        record = json.loads((VECTORS / f"{name}.json").read_text())
        assert sum(record["grads"]["x"]["kink"]) == 2, name


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("row, kind, options, hw", [
    (("avgpool2d", "count_include_pad with ceil_mode"), "avgpool2d",
     {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}, (6, 8)),  # clipped last
    (("avgpool2d", "divisor_override"), "avgpool2d",
     {"kernel_size": 2, "stride": 1, "padding": 1, "divisor_override": 3}, (7, 9)),
    (("adaptive_avgpool2d", "output_size"), "adaptive_avgpool2d", {"output_size": [3, 4]},
     (7, 9)),
    (("adaptive_maxpool2d", "ties: first maximum"), "adaptive_maxpool2d",
     {"output_size": [3, 4]}, (7, 9)),
    (("maxpool2d", "ceil_mode: last window starts inside"), "maxpool2d",
     {"kernel_size": 2, "stride": 2, "padding": 1, "ceil_mode": True}, (5, 7)),  # rule drops one
])
def test_the_torch_comparison_fails_too_when_an_options_formula_is_changed(row, kind, options,
                                                                          hw, monkeypatch):
    """The same plants against torch: the comparison that passes above reports a mismatch (a
    value outside the bound, or a shape, or the layer can no longer be built)."""
    x = np.round(np.random.default_rng(6).standard_normal((2, 3) + hw), 1)
    assert compare_with_torch(kind, options, x) == []
    _plant(monkeypatch, PLANTS[row][0])
    try:
        failures = compare_with_torch(kind, options, x)
    except ValueError as e:
        failures = [str(e)]
    assert failures


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2),
       st.integers(0, 1), st.integers(3, 7), st.sampled_from([0.0, -np.inf]))
def test_the_strided_float_paths_pad_a_ceil_mode_overhang_like_the_generic_ones(kh, kw, sh, dh,
                                                                                pad, size, fill):
    """In ceil mode the last window may run past the padded input: the float gather pads that
    far more (``overhang``), the float scatter clips the window to the input, and both give the
    generic indexed gather and its adjoint bit for bit (the same values, the same order of
    additions)."""
    try:
        w = windows.Windows((size, size + 1), (kh, kw), (sh, 2), (dh, 1),
                            (min(pad, kh // 2), min(pad, kh // 2), 0, 0), "test", ceil_mode=True)
    except ValueError:
        assume(False)
    x = np.random.default_rng(size).standard_normal((2, 3, size, size + 1))
    assert np.array_equal(w.gather(FLOAT64, x, fill=fill),
                          w.gather(FLOAT64, x.astype(object), fill=fill).astype(np.float64))
    v = np.random.default_rng(size + 1).standard_normal((2, 3, w.K, w.L))
    assert np.array_equal(w.scatter(FLOAT64, v),
                          w.scatter(FLOAT64, v.astype(object)).astype(np.float64))
