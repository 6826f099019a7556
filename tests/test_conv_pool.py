"""conv2d and pooling: im2col + GEMM checked against the naive loops that define them."""

import numpy as np
import pytest
from conftest import HAVE_TORCH, reference_rounding
from hypothesis import assume, given
from hypothesis import strategies as st

from refnet import BOUND, FLOAT32, FLOAT64, Model, MPBackend, verify
from refnet.layers.conv import Conv2d
from refnet.layers.pool import AvgPool2d, GlobalAvgPool, MaxPool2d

# --- the readable specification: naive loops ---------------------------------------------------

def naive_conv2d(x, w, b, stride, padding, dilation, groups):
    """y[n,o,p,q] = b[o] + Σ_{c,i,j} w[o,c,i,j]·x[n, g·C/G + c, p·s + i·d − top, q·s + j·d − left].
    Works on float or object (mpf) arrays: a plain sum, in the loop's order."""
    n, c_in, h, wd = x.shape
    c_out, c_per, kh, kw = w.shape
    (sh, sw), (dh, dw), (top, bottom, left, right) = stride, dilation, padding
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + left + right - dw * (kw - 1) - 1) // sw + 1
    y = np.empty((n, c_out, oh, ow), dtype=x.dtype)
    out_per = c_out // groups
    for s in range(n):
        for o in range(c_out):
            g = o // out_per
            for p in range(oh):
                for q in range(ow):
                    acc = b[o] if b is not None else x.dtype.type(0) * 0
                    for c in range(c_per):
                        for i in range(kh):
                            for j in range(kw):
                                r, t = p * sh + i * dh - top, q * sw + j * dw - left
                                if 0 <= r < h and 0 <= t < wd:
                                    acc = acc + w[o, c, i, j] * x[s, g * c_per + c, r, t]
                    y[s, o, p, q] = acc
    return y


def naive_maxpool2d(x, k, s, pad):
    """y = max over the window (padding = −inf); the argmax is the first maximum in row-major
    window order, as torch's CPU kernel."""
    n, c, h, w = x.shape
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    y = np.empty((n, c, oh, ow))
    dx_route = {}
    for a in range(n):
        for ch in range(c):
            for p in range(oh):
                for q in range(ow):
                    best, where = -np.inf, None
                    for i in range(k):
                        for j in range(k):
                            r, t = p * s + i - pad, q * s + j - pad
                            if 0 <= r < h and 0 <= t < w and x[a, ch, r, t] > best:
                                best, where = x[a, ch, r, t], (r, t)
                    y[a, ch, p, q] = best
                    dx_route[(a, ch, p, q)] = where
    return y, dx_route


CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=0, dilation=1, groups=1),
    dict(kernel_size=3, stride=2, padding=1, dilation=1, groups=1),
    dict(kernel_size=[2, 3], stride=[2, 1], padding=[1, 0], dilation=[1, 2], groups=2),
    dict(kernel_size=3, stride=1, padding="same", dilation=2, groups=1),
    dict(kernel_size=2, stride=3, padding="valid", dilation=1, groups=2),   # floor-rounding
]


def _conv(case, in_shape=(4, 7, 6), out_channels=4, seed=0):
    layer = Conv2d({"type": "conv2d", "out_channels": out_channels, **case}, in_shape, "conv")
    params = layer.init_params(np.random.default_rng(seed))
    return layer, params


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_equals_the_naive_loop_exactly_in_mp_and_within_the_bound_in_float64(case):
    """im2col + GEMM computes the naive loop's sum: identical at 50 digits (both are the exact
    sum rounded to 50 digits, up to the loop's own 50-digit roundings), and float64 within its
    error bound of it."""
    from refnet.layers.conv import conv_padding
    from refnet.layers.windows import pair
    layer, params = _conv(case)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 7, 6))
    kernel = pair(case["kernel_size"], "", "", 1)
    stride, dilation = pair(case["stride"], "", "", 1), pair(case["dilation"], "", "", 1)
    padding = conv_padding(case["padding"], kernel, dilation, stride, "")
    mp = MPBackend(50)
    mp_x, mp_w, mp_b = mp.asarray(x), mp.asarray(params["weight"]), mp.asarray(params["bias"])
    ref = naive_conv2d(mp_x, mp_w, mp_b, stride, padding, dilation, case["groups"])
    y_mp, _ = layer.forward(mp, {"weight": mp_w, "bias": mp_b}, mp_x)
    assert y_mp.shape == ref.shape
    assert np.all(mp.to_numpy(mp.abs(y_mp - ref)) <= 1e-45 * (1 + np.abs(mp.to_numpy(ref))))
    yb, _ = layer.forward(BOUND, params, x)
    assert np.all(np.abs(yb.v - mp.to_numpy(ref)) <= yb.e + reference_rounding(mp.to_numpy(ref)))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_is_the_adjoint_of_its_forward(case):
    """⟨conv(x), dy⟩ = ⟨x, dx⟩ + ⟨W, dW⟩ − ... : for a linear map, ⟨y(x), dy⟩ with zero bias
    equals ⟨x, dx(dy)⟩ and ⟨W, dW(dy)⟩ exactly (checked at 60 digits)."""
    layer, params = _conv(case)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 7, 6))
    params["bias"] = np.zeros_like(params["bias"])
    mp = MPBackend(60)
    p = {k: mp.asarray(v) for k, v in params.items()}
    y, cache = layer.forward(mp, p, mp.asarray(x))
    dy = mp.asarray(rng.standard_normal(y.shape))
    dx, grads = layer.backward(mp, p, dy, cache)
    lhs = mp.sum(y * dy)[()]
    for rhs in (mp.sum(mp.asarray(x) * dx)[()], mp.sum(p["weight"] * grads["weight"])[()]):
        assert abs(lhs - rhs) <= 1e-50 * abs(lhs)


def test_maxpool_equals_the_naive_loop_and_sends_a_tie_to_the_first_maximum():
    """Forward = the naive max; backward routes each window's gradient to the first maximum in
    row-major order (torch's CPU convention), also when two elements tie."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 5))
    x[0, 1, 2, 2] = x[0, 1, 2, 3] = 9.0                  # a tie inside one window
    layer = MaxPool2d({"type": "maxpool2d", "kernel_size": 3, "stride": 2, "padding": 1},
                      (3, 6, 5), "pool")
    y, argmax = layer.forward(FLOAT64, {}, x)
    ref, route = naive_maxpool2d(x, 3, 2, 1)
    assert np.array_equal(y, ref)
    dy = rng.standard_normal(y.shape)
    dx, _ = layer.backward(FLOAT64, {}, dy, argmax)
    expected = np.zeros_like(x)
    for (a, c, p, q), (r, t) in route.items():
        expected[a, c, r, t] += dy[a, c, p, q]
    assert np.allclose(dx, expected, rtol=0, atol=4 * np.spacing(np.abs(expected).max()))
    # The window rows 1-3, cols 1-3 holds the tie: its gradient went to (2, 2), the first.
    assert argmax[0, 1, 1 * y.shape[3] + 1] == 1 * 3 + 1


def test_a_maxpool_tie_is_reported_by_the_verifier_as_a_kink():
    spec = {"input_shape": [1, 2, 2], "seed": 0, "batch": 1,
            "layers": [{"type": "maxpool2d", "kernel_size": 2}, {"type": "flatten"}],
            "loss": {"type": "mse"}}
    x = np.array([[[[1.0, 1.0], [0.0, -1.0]]]])
    report = verify(Model(spec), x=x, y=np.array([[0.5]]), mode="element")
    t = {t.name: t for t in report.tensors}["x"]
    assert t.fd_kinks >= 1 and any("layers[0]" in k for k in t.kinks)
    assert report.passed


def naive_avgpool2d(x, k, s, pad, count_include_pad):
    """y = (sum over the window's non-padding positions) / (k·k, or their count)."""
    n, c, h, w = x.shape
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    for a in range(n):
        for ch in range(c):
            for p in range(oh):
                for q in range(ow):
                    cells = [x[a, ch, p * s + i - pad, q * s + j - pad] for i in range(k)
                             for j in range(k) if 0 <= p * s + i - pad < h
                             and 0 <= q * s + j - pad < w]
                    total = cells[0]
                    for v in cells[1:]:
                        total = total + v
                    y[a, ch, p, q] = total / (k * k if count_include_pad else len(cells))
    return y


@pytest.mark.parametrize("k, s, pad, include", [(2, 2, 0, True), (3, 2, 1, True), (3, 2, 1, False),
                                                (3, 1, 1, False)])
def test_avgpool_equals_the_naive_loop_in_mp_and_within_the_bound_in_float64(k, s, pad, include):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 5, 6))
    pool = AvgPool2d({"type": "avgpool2d", "kernel_size": k, "stride": s, "padding": pad,
                      "count_include_pad": include}, (3, 5, 6), "avg")
    mp = MPBackend(50)
    ref = naive_avgpool2d(mp.asarray(x), k, s, pad, include)
    y_mp, _ = pool.forward(mp, {}, mp.asarray(x))
    assert np.all(mp.to_numpy(mp.abs(y_mp - ref)) <= 1e-45)
    yb, _ = pool.forward(BOUND, {}, x)
    assert np.all(np.abs(yb.v - mp.to_numpy(ref)) <= yb.e + reference_rounding(mp.to_numpy(ref)))


def test_global_avgpool_is_the_mean_over_positions_with_shape_n_c_1_1():
    x = np.random.default_rng(4).standard_normal((2, 3, 4, 6))
    gap = GlobalAvgPool({"type": "global_avgpool"}, (3, 4, 6), "gap")
    mp = MPBackend(50)
    g, _ = gap.forward(BOUND, {}, x)
    exact = mp.to_numpy(mp.sum(mp.asarray(x), axis=(2, 3), keepdims=True) / 24)
    assert g.v.shape == (2, 3, 1, 1)
    assert np.all(np.abs(g.v - exact) <= g.e)


# --- the triangle over shapes, strides, paddings, dilations, groups -----------------------------

@pytest.mark.slow
@given(h=st.integers(3, 8), w=st.integers(3, 8), groups=st.sampled_from([1, 2]),
       kernel=st.integers(1, 3), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       padding=st.sampled_from([0, 1, "same", "valid", [1, 0]]),
       pool=st.sampled_from(["maxpool2d", "avgpool2d", "none"]), seed=st.integers(0, 2**16))
def test_conv_and_pool_gradients_pass_the_verification_triangle(h, w, groups, kernel, stride,
                                                                dilation, padding, pool, seed):
    """conv2d (+ relu + pool) in every configuration torch accepts, including output sizes that
    floor-round: every gradient within its float64 bound and matched by mp FD to 20 digits."""
    if padding == "same":
        stride = 1
    layers = [{"type": "conv2d", "out_channels": 2 * groups, "kernel_size": kernel,
               "stride": stride, "padding": padding, "dilation": dilation, "groups": groups},
              {"type": "tanh"}]
    spec = {"input_shape": [2, h, w], "seed": seed, "batch": 2, "layers": layers,
            "loss": {"type": "mse"}}
    try:
        model = Model(spec)
    except ValueError as e:                  # a kernel larger than the padded input
        assert "larger than the padded input" in str(e)
        assume(False)
    oh, ow = model.layers[0].out_shape[1:]
    if pool != "none" and oh >= 2 and ow >= 2:
        spec["layers"].append({"type": pool, "kernel_size": 2, "stride": 1})
    spec["layers"].append({"type": "flatten"})
    report = verify(Model(spec), directions=1)
    assert report.passed, [(t.name, t.fd_digits, t.ulp_passed) for t in report.tensors]


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("config, in_shape, match", [
    ({"out_channels": 4, "kernel_size": 5}, (2, 3, 3), r"kernel \(5x5.*larger than the padded input \(3x3\)"),
    ({"out_channels": 4, "kernel_size": 3, "groups": 2}, (3, 5, 5),
     r"groups = 2 must divide both in_channels \(3\)"),
    ({"out_channels": 3, "kernel_size": 3, "groups": 2}, (4, 5, 5), r"out_channels \(3\)"),
    ({"out_channels": 4, "kernel_size": 3, "padding": "same", "stride": 2}, (2, 5, 5),
     "'same' needs stride 1"),
    ({"out_channels": 4}, (2, 5, 5), "needs 'kernel_size'"),
    ({"out_channels": 4, "kernel_size": 3}, (5, 5), r"expects input \(N, C, H, W\)"),
])
def test_bad_conv_configs_raise_value_errors_naming_the_layer_and_shapes(config, in_shape, match):
    with pytest.raises(ValueError, match=match):
        Conv2d({"type": "conv2d", **config}, in_shape, "layers[0] (conv2d)")


def test_pool_padding_above_half_the_kernel_is_rejected():
    with pytest.raises(ValueError, match="at most half the kernel"):
        MaxPool2d({"type": "maxpool2d", "kernel_size": 2, "padding": 2}, (1, 5, 5), "pool")


# --- torch --------------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_torch_float64(case):
    """Output and every gradient within refnet's float64 error bound of torch's conv2d."""
    import torch
    import torch.nn.functional as F
    layer, params = _conv(case)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 7, 6))
    to_t = lambda v: tuple(v) if isinstance(v, list) else v      # noqa: E731
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(params["weight"], requires_grad=True)
    tb = torch.tensor(params["bias"], requires_grad=True)
    ty = F.conv2d(tx, tw, tb, stride=to_t(case["stride"]), padding=to_t(case["padding"]),
                  dilation=to_t(case["dilation"]), groups=case["groups"])
    dy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(dy))
    yb, cache = layer.forward(BOUND, params, x)
    dxb, gb = layer.backward(BOUND, params, BOUND.asarray(dy), cache)
    mp = MPBackend(50)
    p = {k: mp.asarray(v) for k, v in params.items()}
    ym, cm = layer.forward(mp, p, mp.asarray(x))
    dxm, gm = layer.backward(mp, p, mp.asarray(dy), cm)
    pairs = [(ty.detach().numpy(), yb, ym), (tx.grad.numpy(), dxb, dxm),
             (tw.grad.numpy(), gb["weight"], gm["weight"]), (tb.grad.numpy(), gb["bias"], gm["bias"])]
    for ref_torch, bound, exact in pairs:
        allowed = np.minimum(bound.e, bound.probabilistic_bound(8.0))
        assert np.all(np.abs(ref_torch - mp.to_numpy(exact)) <= allowed)


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("kind, options", [
    ("maxpool2d", {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("maxpool2d", {"kernel_size": 2}),
    ("avgpool2d", {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("avgpool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False}),
])
def test_pooling_matches_torch_float64_ties_included(kind, options):
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(6)
    x = np.round(rng.standard_normal((2, 3, 7, 6)), 1)          # rounding makes ties
    cls = {"maxpool2d": MaxPool2d, "avgpool2d": AvgPool2d}[kind]
    layer = cls({"type": kind, **options}, (3, 7, 6), kind)
    y, cache = layer.forward(FLOAT64, {}, x)
    dy = rng.standard_normal(y.shape)
    dx, _ = layer.backward(FLOAT64, {}, dy, cache)
    tx = torch.tensor(x, requires_grad=True)
    f = F.max_pool2d if kind == "maxpool2d" else F.avg_pool2d
    ty = f(tx, **options)
    ty.backward(torch.tensor(dy))
    # Each dx element sums at most K = 9 window contributions: both sides round at most 9 times.
    tol = 9 * np.spacing(np.maximum(np.abs(dx), 1e-300)) + 9 * np.spacing(np.abs(dy).max())
    assert np.allclose(y, ty.detach().numpy(), rtol=2 * 2.0**-53 * 9, atol=0)
    assert np.all(np.abs(dx - tx.grad.numpy()) <= tol)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
       st.integers(0, 2), st.integers(0, 2), st.integers(4, 20))
def test_the_strided_float_col2im_equals_the_generic_gather_and_sum(kh, kw, sh, dh, pad_top,
                                                                   pad_left, size):
    """col2im for float arrays (strided adds into the padded input) equals the generic
    gather-and-sum path the other backends use, bit for bit (same order of additions) — in
    both of its layouts: output widths below SCATTER_CHANNELS_LAST_BELOW add channels-last,
    wider ones row by row (widths 2 to 23 here)."""
    from refnet.layers.windows import Windows
    w = Windows((size, size + 1), (kh, kw), (sh, 1), (dh, 1),
                (pad_top, 1, pad_left, 0), "test")
    v = np.random.default_rng(size).standard_normal((2, 3, w.K, w.L))
    fast = w.scatter(FLOAT64, v)
    generic = w.scatter(FLOAT64, v.astype(object)).astype(np.float64)
    assert np.array_equal(fast, generic)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
       st.integers(0, 2), st.integers(0, 2), st.integers(4, 7),
       st.sampled_from([0.0, -np.inf]))
def test_the_strided_float_im2col_equals_the_generic_indexed_gather(kh, kw, sh, dh, pad_top,
                                                                   pad_left, size, fill):
    """im2col for float arrays (strided copies of the padded input) equals the generic indexed
    gather with its padding mask, for conv's fill 0 and max-pool's −inf."""
    from refnet.layers.windows import Windows
    w = Windows((size, size + 1), (kh, kw), (sh, 1), (dh, 1),
                (pad_top, 1, pad_left, 0), "test")
    x = np.random.default_rng(size).standard_normal((2, 3, size, size + 1))
    fast = w.gather(FLOAT64, x, fill=fill)
    generic = w.gather(FLOAT64, x.astype(object), fill=fill).astype(np.float64)
    assert np.array_equal(fast, generic)


@pytest.mark.parametrize("width", [6, 30])
def test_both_layouts_of_the_float_col2im_run_and_agree(width, monkeypatch):
    """The two layouts of the strided col2im (channels-last below SCATTER_CHANNELS_LAST_BELOW
    output columns, rows above) are both exercised, a ceil-mode overhang included: in float64
    each equals the generic gather-and-sum bit for bit, and in float32 and float64 the layout
    not chosen gives the same bits as the one chosen (the same additions in the same order)."""
    from refnet.layers import windows
    assert (width < windows.SCATTER_CHANNELS_LAST_BELOW) == (width == 6)
    w = windows.Windows((5, width), (3, 3), (2, 1), (1, 1), (1, 1, 1, 1), "test", ceil_mode=True)
    for dtype in (np.float64, np.float32):
        v = np.random.default_rng(width).standard_normal((3, 2, w.K, w.L)).astype(dtype)
        chosen = w.scatter(FLOAT64, v)
        with monkeypatch.context() as m:
            m.setattr(windows, "SCATTER_CHANNELS_LAST_BELOW", 0 if width == 6 else 10**6)
            other = w.scatter(FLOAT64, v)
        assert chosen.dtype == other.dtype == dtype
        assert np.array_equal(chosen, other)
        if dtype == np.float64:
            assert np.array_equal(chosen, w.scatter(FLOAT64, v.astype(object)).astype(dtype))


class _NotPlain(np.ndarray):
    """A float array that is not a plain ndarray: the windows take their generic paths on it."""


class _CountingFloat64(type(FLOAT64)):
    """The float64 backend, counting its matmul calls and the largest product made."""

    def __init__(self):
        super().__init__(np.float64)
        self.products = []

    def matmul(self, a, b):
        out = super().matmul(a, b)
        self.products.append(out.shape)
        return out


@pytest.mark.parametrize("case, runs", [(case, case["padding"] == "same") for case in CONV_CASES]
                         + [(dict(kernel_size=3, stride=1, padding=[2, 1], dilation=[2, 1],
                                  groups=1), True),
                            (dict(kernel_size=[3, 2], stride=[1, 2], padding=1, dilation=1,
                                  groups=4), False)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_conv2d_backward_made_a_few_samples_at_a_time_gives_the_bits_of_the_whole_product(
        case, runs, dtype, monkeypatch):
    """The float col2im of W_gᵀ·dY_g (``Windows.scatter_product``) makes the product a chunk of
    samples at a time, never whole, and gives the bits of the whole product scattered at once —
    the same per-sample GEMMs, the same additions in the same order — for chunks of 1, 2 (not
    dividing the batch of 5) and all samples, added row by row or, for stride 1 and as many
    output columns as input ones, as one run an offset; in float64 also the bound backend's
    values, which
    run the generic gather-and-sum (verify holds float64's gradient to the bound computed at
    those values). The data make the order matter: the offsets added in reverse order change
    some element's bits, so the equality is no accident. Also the generic gather-and-sum in the
    same dtype (on a float array that is no plain ndarray)."""
    from refnet.layers import windows
    layer, params = _conv(case, in_shape=(4, 9, 40))
    params = {k: v.astype(dtype) for k, v in params.items()}
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 9, 40)).astype(dtype)
    win = layer.windows
    assert win.out_hw[1] >= windows.SCATTER_CHANNELS_LAST_BELOW      # not channels-last
    assert (win.runs is not None) == runs               # stride 1, OW = W: one run an offset
    _, cache = layer.forward(FLOAT64, params, x)
    dy = rng.standard_normal((5,) + layer.out_shape).astype(dtype)
    w_t = layer._grouped_weight(params["weight"]).transpose(0, 2, 1)
    dy_g = dy.reshape(5, layer.groups, -1, win.L)
    product = np.matmul(w_t, dy_g).reshape(5, 4, win.K, win.L)
    whole = win.scatter(FLOAT64, product)
    per_sample = product[0].nbytes
    for chunk in (1, 2, 5):
        monkeypatch.setattr(windows, "SCATTER_CHUNK_BYTES", chunk * per_sample)
        bk = _CountingFloat64()
        dx, grads = layer.backward(bk, params, dy, cache)
        made = [s for s in bk.products if s[-1] == win.L]                 # the products dcols
        assert [s[0] for s in made] == ([1] * 5 if chunk == 1 else [2, 2, 1] if chunk == 2
                                        else [5])
        assert dx.dtype == dtype and dx.flags.c_contiguous
        assert np.array_equal(dx.view(np.uint8), whole.view(np.uint8)), chunk
    bk = FLOAT64 if dtype == np.float64 else FLOAT32
    generic = win.scatter(bk, product.view(_NotPlain))                   # take, where, bk.sum
    assert np.array_equal(dx, generic)
    if dtype == np.float64:
        dxb, _ = layer.backward(BOUND, params, dy, cache)
        assert np.array_equal(dx, dxb.v)
    # Teeth: where a position sums three or more terms, the order of the additions shows in
    # the bits (two terms commute; case 4's windows do not overlap at all).
    reverse = np.zeros_like(whole)
    for k in reversed(range(win.K)):
        one = np.zeros_like(product)
        one[:, :, k] = product[:, :, k]
        reverse += win.scatter(FLOAT64, one)
    if win.back_valid.sum(axis=0).max() >= 3:
        assert not np.array_equal(reverse, whole)


def _same_width_windows(kh, kw, dh, dw, top, bottom, left, h, w):
    """Stride-1 windows with as many output columns as input ones (left + right = dw·(kw − 1)),
    which take the run layout; hypothesis skips geometries whose kernel outgrows the input."""
    from refnet.layers import windows
    left = min(left, dw * (kw - 1))
    try:
        win = windows.Windows((h, w), (kh, kw), (1, 1), (dh, dw),
                              (top, bottom, left, dw * (kw - 1) - left), "test")
    except ValueError:
        assume(False)
    assert win.out_hw[1] == w and win.runs is not None
    return win


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 2), st.integers(1, 2),
       st.integers(0, 2), st.integers(0, 2), st.integers(0, 4), st.integers(1, 6),
       st.integers(13, 16))
def test_the_run_layout_of_the_float_col2im_drops_what_read_padding_inf_and_nan_included(
        kh, kw, dh, dw, top, bottom, left, h, w):
    """Stride 1 with as many output columns as input ones (left + right = dw·(kw − 1)): the
    float col2im of a product adds each offset as one run, its columns that read padding
    zeroed, which would otherwise wrap into the next or previous row. Equal to the generic
    gather-and-sum, bit for bit, with chunks of 2 samples and with ±inf and NaN in the product
    (a NaN in a column that read padding must not reach dx)."""
    from refnet.layers import windows
    win = _same_width_windows(kh, kw, dh, dw, top, bottom, left, h, w)
    rng = np.random.default_rng(h * 100 + w)
    a = rng.standard_normal((1, 3 * win.K, 2))
    b = rng.standard_normal((5, 1, 2, win.L))
    b[1, 0, 0, rng.integers(win.L, size=3)] = np.inf                # ±inf, and 0·inf = NaN
    a[0, rng.integers(3 * win.K, size=2), 0] = 0.0
    old = windows.SCATTER_CHUNK_BYTES
    with np.errstate(invalid="ignore"):
        product = np.matmul(a, b).reshape(5, 3, win.K, win.L)
        assert np.isnan(product).any() and np.isinf(product).any()
        generic = win.scatter(FLOAT64, product.view(_NotPlain))
        try:
            windows.SCATTER_CHUNK_BYTES = 2 * product[0].nbytes
            fast = win.scatter_product(FLOAT64, a, b)
        finally:
            windows.SCATTER_CHUNK_BYTES = old
    assert np.array_equal(fast, generic, equal_nan=True)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 2), st.integers(1, 2),
       st.integers(0, 2), st.integers(0, 2), st.integers(0, 4), st.integers(1, 6),
       st.integers(3, 16), st.sampled_from([0.0, -np.inf]))
def test_the_run_layout_of_the_float_im2col_equals_the_generic_indexed_gather(
        kh, kw, dh, dw, top, bottom, left, h, w, fill):
    """Stride 1 with as many output columns as input ones: the float im2col copies each
    offset's windows as one run of the flattened input, then sets what read padding (rows
    before and after, the columns that wrapped into the next or previous row) to ``fill`` —
    the generic indexed gather's values exactly, for conv's 0 and max-pool's −inf, a few
    samples at a time (chunks of 2 of 5) or all at once."""
    from refnet.layers import windows
    win = _same_width_windows(kh, kw, dh, dw, top, bottom, left, h, w)
    x = np.random.default_rng(h * 100 + w).standard_normal((5, 3, h, w))
    generic = win.gather(FLOAT64, x.view(_NotPlain), fill=fill)
    old = windows.GATHER_CHUNK_BYTES
    try:
        for chunk in (2, 5):
            windows.GATHER_CHUNK_BYTES = chunk * 3 * win.K * win.L * 8
            assert np.array_equal(win.gather(FLOAT64, x, fill=fill), generic)
    finally:
        windows.GATHER_CHUNK_BYTES = old


def test_the_float_col2im_leaves_numpys_buffer_size_as_it_found_it():
    """The run layout's adds run with numpy's ufunc buffer at its smallest (``_unbuffered``:
    faster for long runs, the same bits): afterwards the caller's buffer size is back, also
    when the adds raise — no state leaks out of a layer."""
    from refnet.layers import windows
    win = windows.Windows((16, 16), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "test")
    assert win.runs is not None
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((1, 2 * win.K, 3)), rng.standard_normal((2, 1, 3, win.L))
    previous = np.setbufsize(4096)
    try:
        seen = []
        original = windows.Windows._add_runs

        def spy(self, out, v):
            seen.append(v.shape)
            original(self, out, v)
        windows.Windows._add_runs = spy
        try:
            win.scatter_product(FLOAT64, a, b)
        finally:
            windows.Windows._add_runs = original
        assert seen and np.getbufsize() == 4096                 # the runs were added
        with pytest.raises(ZeroDivisionError):
            with windows._unbuffered():
                assert np.getbufsize() == 16
                1 / 0
        assert np.getbufsize() == 4096
    finally:
        np.setbufsize(previous)
