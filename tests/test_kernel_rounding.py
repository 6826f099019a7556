"""Each emulated kernel rounds where ATen's CUDA kernel rounds (spec/precision.md, the kernel
audit): a kernel written in ``opmath_t`` computes in float32 and rounds once; one written in the
storage type's own arithmetic (``scalar_t`` on ``c10::Half``/``c10::BFloat16``: every operator
computes in float and converts back) rounds after every operation. Each test below takes an
input where the two differ and pins the value the audited form gives: for the storage-type
kernels computed by hand, one numpy float16 operation at a time; for the opmath kernels the
float32 evaluation rounded once, on a grid of inputs where per-operation rounding would give
something else.

Also: the float32 loss on a half model (``loss_dtype="float32"``), whose scaled logits
gradient overflows only at the final cast."""

import math

import numpy as np
import pytest

from refnet.lowp.emulation import (
    EmulatedBackend,
    Precision,
    StorageArithmetic,
    cast_params,
    plain,
    run,
    store,
)
from refnet.model import Model
from refnet.numerics.backend import FLOAT32, FLOAT64
from refnet.numerics.formats import round_to
from refnet.study.presets import preset

f16, f32 = np.float16, np.float32


def one_kernel(layer, z, dy, storage="fp16", params=None, loss="mse"):
    """(stored output, stored input gradient, stored parameter gradients) of one layer run as
    the emulation runs it under model.half(): ``z`` and ``dy`` (float64) are stored in the
    format first, so every value below is one the GPU kernel could see."""
    z = np.asarray(z, dtype=np.float64)
    model = Model({"input_shape": list(z.shape[1:]), "batch": z.shape[0], "layers": [layer],
                   "loss": {"type": loss}})
    bk = EmulatedBackend(Precision(storage, "half"))
    given = model.init_params() if params is None else params
    held = {k.split(".", 1)[1]: v for k, v in cast_params(given, bk.precision).items()}
    state = model.default_state()
    y, cache = bk.forward_layer(model.layers[0], held, store(z, storage), state)
    dx, grads = bk.backward_layer(model.layers[0], held, store(np.asarray(dy, dtype=np.float64),
                                                               storage), cache)
    value = lambda a: np.asarray(plain(a), dtype=np.float64)          # noqa: E731
    return value(y), value(dx), {k: value(g) for k, g in grads.items()}


# --- the kernels ATen writes in the storage type ---------------------------------------------
def test_sigmoid_backward_rounds_after_each_of_its_three_operations():
    """torch's CUDA sigmoid_backward is ``a * (scalar_t(1.) - b) * b`` on Half operands
    (BinaryMiscBackwardOpsKernels.cu): 1 − b, then a·(1 − b), then ·b, each rounded to fp16.
    With a = dy = 3 and b = σ(−2.197) stored = 0.0999755859375 the three roundings give
    0.269775390625; the float32 product rounded once (refnet's form before this audit) gives
    0.27001953125, one fp16 step (2⁻¹²) above."""
    y, dx, _ = one_kernel({"type": "sigmoid"}, [[-2.197265625]], [[3.0]])
    b, a = f16(y[0, 0]), f16(3.0)
    assert b == f16(0.0999755859375)
    t1 = f16(f16(1) - b)             # 0.900024414… rounds to 0.900390625
    t2 = f16(a * t1)                 # 2.701171875 rounds to 2.701171875 (exact)
    per_operation = f16(t2 * b)      # 0.27005… rounds to 0.269775390625
    single = f16(f32(a) * (f32(1) - f32(b)) * f32(b))
    assert float(per_operation) == 0.269775390625 and float(single) == 0.27001953125
    assert dx[0, 0] == float(per_operation)


def test_sigmoid_backward_keeps_a_subnormal_gradient_that_one_rounding_loses():
    """At fp16's subnormals the extra roundings decide zero or not (the loss-scale-2⁸ case of
    issue 19): a = 3·2⁻²⁴, b = 0.7998046875. Per operation: 1 − b = 0.2001953125 (exact),
    a·(1 − b) = 0.6·2⁻²⁴ rounds up to 2⁻²⁴, ·b = 0.8·2⁻²⁴ rounds up to 2⁻²⁴ again. One
    rounding of a(1 − b)b = 0.48·2⁻²⁴ gives 0."""
    y, dx, _ = one_kernel({"type": "sigmoid"}, [[1.3837890625]], [[3 * 2.0 ** -24]])
    b, a = f16(y[0, 0]), f16(3 * 2.0 ** -24)
    assert b == f16(0.7998046875)
    per_operation = f16(f16(a * f16(f16(1) - b)) * b)
    assert float(per_operation) == 2.0 ** -24
    assert float(f16(f32(a) * (f32(1) - f32(b)) * f32(b))) == 0.0
    assert dx[0, 0] == 2.0 ** -24


def test_sigmoid_backward_in_bf16_rounds_per_operation_too():
    """The same kernel on BFloat16 operands: a = 3, b = σ(−1.383) stored = 0.2001953125.
    Per operation (bf16 has 8 significant bits): 1 − b = 0.80078125 (0.7998046875 rounded),
    a·(1 − b) = 2.40234375 rounds to 2.40625, ·b = 0.48171… rounds to 0.482421875; one
    rounding of a(1 − b)b = 0.48024… gives 0.48046875."""
    y, dx, _ = one_kernel({"type": "sigmoid"}, [[-1.3828125]], [[3.0]], storage="bf16")
    b = y[0, 0]
    assert b == 0.2001953125
    bf = lambda v: float(round_to(v, "bf16"))          # noqa: E731  (exact float64 products)
    per_operation = bf(bf(3.0 * bf(1 - b)) * b)
    assert per_operation == 0.482421875 and bf(3.0 * (1 - b) * b) == 0.48046875
    assert dx[0, 0] == per_operation


def test_tanh_backward_rounds_t_squared_then_one_minus_it_then_the_product():
    """torch's CUDA tanh_backward is ``a * (scalar_t{1.} - b * b)`` on Half operands: with
    a = 3 and b = tanh(2.646) stored = 0.990234375, b·b = 0.98056… rounds to 0.98046875,
    1 − that = 0.01953125 (exact), ·3 = 0.05859375 (exact). One rounding of 3(1 − b²) gives
    0.058319091796875: the rounded square has lost a third of the difference from 1."""
    y, dx, _ = one_kernel({"type": "tanh"}, [[2.646484375]], [[3.0]])
    b, a = f16(y[0, 0]), f16(3.0)
    assert b == f16(0.990234375)
    t1 = f16(b * b)
    t2 = f16(f16(1) - t1)
    per_operation = f16(a * t2)
    assert float(t1) == 0.98046875 and float(per_operation) == 0.05859375
    assert float(f16(f32(a) * (f32(1) - f32(b) * f32(b)))) == 0.058319091796875
    assert dx[0, 0] == float(per_operation)


def test_accurate_derivatives_keep_one_rounding_of_refnets_form():
    """``derivatives="accurate"`` is refnet's own σ'(z) = e/(1 + e)² from the input, in float32,
    rounded once: not the stored-output, per-operation form (so a change of the torch form
    cannot leak into it)."""
    model = Model({"input_shape": [1], "batch": 1, "layers": [{"type": "sigmoid"}],
                   "loss": {"type": "mse"}})
    bk = EmulatedBackend(Precision("fp16", "half", derivatives="accurate"))
    z = store(np.array([[-2.197265625]]), "fp16")
    _, cache = bk.forward_layer(model.layers[0], {}, z, model.default_state())
    dx, _ = bk.backward_layer(model.layers[0], {}, store(np.array([[3.0]]), "fp16"), cache)
    e = np.exp(-np.abs(np.float32(-2.197265625)))
    assert float(plain(dx)[0, 0]) == float(f16(f32(3.0) * (e / ((1 + e) * (1 + e)))))


def test_prelu_weight_gradient_rounds_each_product_before_the_float32_sum():
    """PReLU's CUDA backward (ActivationPreluKernel.cu) forms the weight gradient's elements
    ``input * grad`` in scalar_t — each rounded to fp16 — and autograd sums them in float. z =
    (−0.1, −0.1), dy = (0.1, 1.3) in fp16: the products round to −0.0099945068359375 and
    −0.1300048828125, their sum −0.1399993896484375 rounds to −0.1400146484375; the exact sum
    rounded once is −0.139892578125. The input gradient weight·dy is one operation: no
    difference there."""
    z, dy = [[-0.1], [-0.1]], [[0.1], [1.3]]
    _, dx, grads = one_kernel({"type": "prelu"}, z, dy, params={"0.weight": np.array([0.25])})
    zs, ds = f16(np.array(z)).ravel(), f16(np.array(dy)).ravel()
    products = [f16(zs[0] * ds[0]), f16(zs[1] * ds[1])]
    per_element = f16(f32(products[0]) + f32(products[1]))
    single = f16(f32(zs[0]) * f32(ds[0]) + f32(zs[1]) * f32(ds[1]))
    assert float(per_element) == -0.1400146484375 and float(single) == -0.139892578125
    assert grads["weight"][0] == float(per_element)
    np.testing.assert_array_equal(dx.ravel(), f16(f16(0.25) * ds).astype(np.float64))


def test_avgpool_backward_rounds_each_windows_share_before_the_float32_sum():
    """AvgPool2d's CUDA backward (AveragePool2d.cu) adds ``top_diff / divide_factor`` — a
    Half divided by an int is a Half — into a float accumulator: each window's share rounds
    first. A (1, 4) row pooled by (1, 3) windows at stride 1 sends both windows' shares to
    the two middle inputs: dy = (0.1, 1.3) in fp16 gives 0.0333251953125 and 0.433349609375,
    whose sum 0.4666748046875 rounds to 0.466796875; one rounding of (0.1 + 1.3)/3 gives
    0.466552734375. The outer inputs get one share each: the same either way."""
    layer = {"type": "avgpool2d", "kernel_size": [1, 3], "stride": 1}
    z = np.arange(4.0).reshape(1, 1, 1, 4)
    dy = np.array([0.1, 1.3]).reshape(1, 1, 1, 2)
    _, dx, _ = one_kernel(layer, z, dy, loss="mse")
    d0, d1 = f16(0.1), f16(1.3)
    share0, share1 = f16(f32(d0) / 3), f16(f32(d1) / 3)
    middle = f16(f32(share0) + f32(share1))
    assert float(middle) == 0.466796875 and float(f16((f32(d0) + f32(d1)) / 3)) == 0.466552734375
    np.testing.assert_array_equal(dx.ravel(), [float(share0), float(middle), float(middle),
                                               float(share1)])


def test_half_cross_entropy_exponentiates_the_stored_log_probabilities():
    """torch's half cross-entropy is log_softmax — its output *stored* in fp16 — then
    nll_loss; log_softmax's backward is grad − exp(output)·Σgrad from that stored output
    (SoftMax.cu). Logits (0, 0.25), label 0, one sample: log p₀ = −0.825939 is stored as
    −0.826171875, exp of that is 0.437722, and the label's gradient p₀ − 1 = −0.562278 rounds
    to −0.5625 (fp16's step there is 2⁻¹¹). From the float32 log-probability (exp = 0.437823,
    p₀ − 1 = −0.562177) it rounds to −0.56201171875. The loss is the stored −log p₀ itself."""
    model = Model({"input_shape": [2], "batch": 1, "layers": [{"type": "identity"}],
                   "loss": {"type": "softmax_cross_entropy"}})
    x, y = np.array([[0.0, 0.25]]), np.array([0])
    half = run(model, Precision("fp16", "half"), {}, x, y)
    float32_loss = run(model, Precision("fp16", "half", loss_dtype="float32"), {}, x, y)
    others = f32(np.exp(f32(-0.25)))                    # the non-max term, exp(0 − 0.25)
    logp0 = f32(f32(-0.25) - np.log1p(others))           # refnet's float32 log-softmax
    stored = f16(logp0)
    label_grad = f16(np.exp(f32(stored)) - f32(1))       # p·g − g with g = 1/N = 1
    assert float(stored) == -0.826171875 and float(label_grad) == -0.5625
    assert float(f16(np.exp(logp0) - f32(1))) == -0.56201171875
    assert float(half.loss_grad[0, 0]) == -0.5625 and half.loss == 0.826171875
    assert float(float32_loss.loss_grad[0, 0]) == -0.56201171875


# --- the kernels ATen writes in opmath_t: one rounding ---------------------------------------
GRID = np.round(np.linspace(-6.0, 6.0, 601), 6)          # fp16 inputs around every kink
UPSTREAM = 0.3 + 2.7 * np.abs(np.sin(np.arange(GRID.size)))   # dy in (0.3, 3), no pattern
# (layer, direction): every kernel of more than one operation (with one operation — relu,
# hardtanh, relu6, leaky_relu, prelu forward, tanh forward, hardsigmoid backward, dropout, the
# residual add — per-operation and single rounding coincide).
OPMATH = [({"type": "sigmoid"}, "forward"), ({"type": "elu", "alpha": 1.3}, "forward"),
          ({"type": "elu", "alpha": 1.3}, "backward"), ({"type": "selu"}, "forward"),
          ({"type": "selu"}, "backward"), ({"type": "gelu"}, "forward"),
          ({"type": "gelu"}, "backward"), ({"type": "gelu", "approximate": "tanh"}, "forward"),
          ({"type": "gelu", "approximate": "tanh"}, "backward"),
          ({"type": "softplus"}, "forward"), ({"type": "softplus"}, "backward"),
          ({"type": "silu"}, "forward"), ({"type": "silu"}, "backward"),
          ({"type": "mish"}, "forward"), ({"type": "mish"}, "backward"),
          ({"type": "hardsigmoid"}, "forward"), ({"type": "hardswish"}, "forward"),
          ({"type": "hardswish"}, "backward"), ({"type": "celu", "alpha": 0.7}, "forward"),
          ({"type": "celu", "alpha": 0.7}, "backward"), ({"type": "logsigmoid"}, "forward"),
          ({"type": "logsigmoid"}, "backward")]


@pytest.mark.parametrize("layer,direction", OPMATH,
                         ids=[f"{c['type']}{'-' + c['approximate'] if 'approximate' in c else ''}"
                              f"-{d}" for c, d in OPMATH])
def test_opmath_kernels_round_once(layer, direction):
    """The activation's CUDA kernel (Activation*Kernel.cu, UnarySpecialOpsKernel.cu) casts its
    operands to opmath_t (float32), computes, and rounds the result once: the emulation's value
    is the float32 evaluation rounded once to fp16 on every input of the grid, and evaluating
    the same formula with a rounding after every operation would differ on some of them (so
    the grid tells the two apart). refnet's float32 formula stands in for ATen's (same function,
    other float32 roundings: spec/precision.md)."""
    z = GRID.reshape(-1, 1)
    dy = UPSTREAM.reshape(-1, 1)
    y, dx, _ = one_kernel(layer, z, dy)
    model = Model({"input_shape": [1], "batch": z.shape[0], "layers": [layer],
                   "loss": {"type": "mse"}})
    lay = model.layers[0]
    zs, ds = round_to(z, "fp16"), round_to(dy, "fp16")
    per_op = StorageArithmetic("fp16")
    state = model.default_state()
    with np.errstate(all="ignore"):
        y32, cache32 = lay.forward(FLOAT32, {}, FLOAT32.asarray(zs), state)
        yop, cacheop = lay.forward(per_op, {}, per_op.asarray(zs), state)
        if direction == "forward":
            single, per_operation, got = round_to(np.asarray(y32, np.float64), "fp16"), \
                np.asarray(plain(yop), np.float64), y
        else:
            single = round_to(np.asarray(lay.backward(FLOAT32, {}, FLOAT32.asarray(ds),
                                                      cache32)[0], np.float64), "fp16")
            per_operation = np.asarray(plain(lay.backward(per_op, {}, per_op.asarray(ds),
                                                          cacheop)[0]), np.float64)
            got = dx
    assert np.sum(single != per_operation) > 0, "the grid does not tell the forms apart"
    np.testing.assert_array_equal(got, single)


NORM_AND_POOL = [
    ({"type": "batchnorm"}, [8, 3], "forward"), ({"type": "batchnorm"}, [8, 3], "backward"),
    ({"type": "layernorm"}, [4, 6], "forward"), ({"type": "layernorm"}, [4, 6], "backward"),
    ({"type": "avgpool2d", "kernel_size": 3, "stride": 1, "padding": 1}, [2, 2, 5, 5],
     "forward"),
    ({"type": "maxpool2d", "kernel_size": 3, "stride": 1, "padding": 1}, [2, 2, 5, 5],
     "backward")]


@pytest.mark.parametrize("layer,shape,direction", NORM_AND_POOL,
                         ids=[f"{c['type']}-{d}" for c, _, d in NORM_AND_POOL])
def test_statistics_and_pooling_kernels_accumulate_in_float32_and_round_once(layer, shape,
                                                                            direction):
    """BatchNorm's and LayerNorm's CUDA kernels (Normalization.cuh/.cu, layer_norm_kernel.cu)
    take their statistics and their whole output or input gradient in float (acc_type) and
    round once; avg-pool's forward sums a window in float and divides once (AveragePool2d.cu);
    max-pool's backward adds the gradients of overlapping windows in float
    (DilatedMaxPool2d.cu). The emulation's values are the float32 evaluation rounded once; the
    per-operation evaluation differs somewhere on this seeded input."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal(shape) * 3 + 1
    model = Model({"input_shape": shape[1:], "batch": shape[0], "layers": [layer],
                   "loss": {"type": "mse"}})
    lay = model.layers[0]
    params = {k.split(".", 1)[1]: v for k, v in model.init_params().items()}
    y, _, _ = one_kernel(layer, z, np.ones(shape))
    dy = rng.standard_normal(y.shape)
    y, dx, _ = one_kernel(layer, z, dy)
    zs, ds = round_to(z, "fp16"), round_to(dy, "fp16")
    per_op = StorageArithmetic("fp16")
    p32 = {k: FLOAT32.asarray(round_to(v, "fp16")) for k, v in params.items()}
    pop = {k: per_op.asarray(v) for k, v in params.items()}
    with np.errstate(all="ignore"):
        y32, c32 = lay.forward(FLOAT32, p32, FLOAT32.asarray(zs), model.default_state())
        yop, cop = lay.forward(per_op, pop, per_op.asarray(zs), model.default_state())
        if direction == "forward":
            single, per_operation, got = y32, plain(yop), y
        else:
            single = lay.backward(FLOAT32, p32, FLOAT32.asarray(ds), c32)[0]
            per_operation, got = plain(lay.backward(per_op, pop, per_op.asarray(ds), cop)[0]), dx
    single = round_to(np.asarray(single, np.float64), "fp16")
    assert np.sum(single != np.asarray(per_operation, np.float64)) > 0
    np.testing.assert_array_equal(got, single)


# --- a float32 loss on a half model ----------------------------------------------------------
@pytest.mark.parametrize("policy", ["half", "autocast"])
def test_a_float32_loss_overflows_only_the_label_entries_at_scale_2_24(policy):
    """``loss = cross_entropy(out.float(), y) * S`` (``loss_dtype="float32"``): the whole loss
    backward is float32 and only the ``.float()`` cast's backward rounds to fp16. The logits
    gradient is S/N·(p − onehot): with S = 2²⁴ and N = 64, −2¹⁸(1 − p) on the label and 2¹⁸·p
    off it. Predicted from the float64 probabilities of the 12-layer sigmoid net (every
    p < 0.24): every label entry is ≤ −65520, so −inf, and every other entry < 65504, finite —
    what the H100 gave (shared/PRECISION.md, issue 19: −inf on the labels, finite elsewhere),
    where autocast's own loss gives +inf off the label and NaN on it."""
    model = Model(preset("sigmoid-deep"))
    params, x, y = model.prepare()
    fwd = model.forward(FLOAT64, params, x, y)
    p = np.exp(fwd.loss_cache[0].rows)
    onehot = np.zeros(p.shape, dtype=bool)
    onehot[np.arange(len(y)), y] = True
    scaled = 2.0 ** 24 / len(y)
    assert np.all(scaled * (1 - p[onehot]) >= 65520) and np.all(scaled * p[~onehot] < 65504)
    r = run(model, Precision("fp16", policy, loss_dtype="float32"), params, x, y,
            loss_scale=2.0 ** 24)
    g = np.asarray(r.loss_grad, dtype=np.float64)
    assert np.all(g[onehot] == -math.inf) and np.all(np.isfinite(g[~onehot]))
    assert r.first_nonfinite() == ("backward: the loss gradient (w.r.t. the network output) "
                                   "holds inf")
    own = run(model, Precision("fp16", policy), params, x, y, loss_scale=2.0 ** 24)
    assert np.any(np.isnan(np.asarray(own.loss_grad, dtype=np.float64)))


def test_a_float32_loss_lets_a_half_model_scale_by_2_16():
    """Under model.half() the policy's own loss is fp16 and S = 2¹⁶ is itself inf (every
    gradient inf or NaN); with the loss in float32, S = 2¹⁶ is finite and the scaled
    gradients of a small tanh net (|∂L/∂z| ≤ 2/N·… ≪ 1) stay finite: the GradScaler pattern
    works on a half model."""
    model = Model({"input_shape": [16], "seed": 0, "batch": 8, "loss": {"type":
                                                                      "softmax_cross_entropy"},
                   "layers": [{"type": "dense", "out": 32, "init": {"name": "normal",
                                                                   "std": 0.3}},
                              {"type": "tanh"}, {"type": "dense", "out": 10}]})
    params, x, y = model.prepare()
    own = run(model, Precision("fp16", "half"), params, x, y, loss_scale=2.0 ** 16)
    f32loss = run(model, Precision("fp16", "half", loss_dtype="float32"), params, x, y,
                  loss_scale=2.0 ** 16)
    assert not any(np.any(np.isfinite(g)) for g in own.grads.values())
    assert all(np.all(np.isfinite(g)) for g in f32loss.grads.values())
    assert f32loss.first_nonfinite() is None


def test_loss_dtype_is_checked():
    with pytest.raises(ValueError, match="loss_dtype"):
        Precision("fp16", "half", loss_dtype="float16")


def test_adaptive_avgpool_backward_divides_by_kw_then_kh_and_adds_each_share_in_half():
    """AdaptiveAvgPool2d's CUDA backward (AdaptiveAveragePooling.cu,
    atomic_adaptive_average_gradinput) forms each window's share ``gradOutput / kW / kH`` —
    Half / int is a Half, two roundings — and atomically adds it into the Half gradient: a
    rounding per addition where windows overlap. (5, 5) pooled to (1, 3): windows of 5 rows
    and columns [0, 2), [1, 4), [3, 5), so kW = 2, 3, 2, kH = 5, and columns 1 and 3 get two
    shares (with two, the atomics' order cannot matter). dy = (0.1, 0.7, 0.3) in fp16: the
    shares are 0.0099945068359375, 0.04669189453125, …; column 1 gets their sum rounded,
    0.05670166015625, where one rounding of 0.1/10 + 0.7/15 gives 0.056671142578125."""
    layer = {"type": "adaptive_avgpool2d", "output_size": [1, 3]}
    z = np.arange(25.0).reshape(1, 1, 5, 5)
    dy = np.array([0.1, 0.7, 0.3]).reshape(1, 1, 1, 3)
    _, dx, _ = one_kernel(layer, z, dy)
    d = f16(dy.ravel())
    share = [f16(f16(d[0] / f16(2)) / f16(5)), f16(f16(d[1] / f16(3)) / f16(5)),
             f16(f16(d[2] / f16(2)) / f16(5))]
    per_operation = [share[0], f16(share[0] + share[1]), share[1], f16(share[1] + share[2]),
                     share[2]]
    single = f16(f32(d[0]) / 10 + f32(d[1]) / 15)
    assert float(share[0]) == 0.0099945068359375 and float(share[1]) == 0.04669189453125
    assert float(per_operation[1]) == 0.05670166015625 and float(single) == 0.056671142578125
    for row in dx[0, 0]:                                  # every row of a column: one window
        np.testing.assert_array_equal(row, np.array(per_operation, dtype=np.float64))


def test_adaptive_avgpool_to_one_by_one_is_the_mean_divided_once():
    """AdaptiveAvgPool2d to 1×1 is torch's ``mean((-1, -2))`` (AdaptiveAveragePooling.cpp),
    whose backward divides by H·W once (a float reciprocal, BinaryDivTrueKernel.cu), not the
    pooling kernel's /kW/kH: dy = 1.1 over a 3×3 input gives 1.1/9 rounded once,
    0.1221923828125, where dividing by 3 twice in fp16 gives 0.12213134765625."""
    layer = {"type": "adaptive_avgpool2d", "output_size": 1}
    _, dx, _ = one_kernel(layer, np.zeros((1, 1, 3, 3)), np.full((1, 1, 1, 1), 1.1))
    d = f16(1.1)
    assert float(f16(f32(d) / 9)) == 0.1221923828125
    assert float(f16(f16(d / f16(3)) / f16(3))) == 0.12213134765625
    np.testing.assert_array_equal(dx.ravel(), np.full(9, float(f16(f32(d) / 9))))


# --- the half losses other than cross-entropy: ATen's scalar_t kernels and compositions -----
def half_loss_grad(loss, z, y, scale):
    """(stored loss, stored S·∂L/∂z) of ``loss`` on an identity model under model.half(): the
    outputs z and the targets y (one per sample) are fp16 values, so every value below is one
    the GPU kernel could see."""
    z = np.asarray(z, dtype=np.float64).reshape(-1, 1)
    model = Model({"input_shape": [1], "batch": z.shape[0], "layers": [{"type": "identity"}],
                   "loss": loss})
    r = run(model, Precision("fp16", "half"), {}, z,
            np.asarray(y, dtype=np.float64).reshape(-1, 1), loss_scale=scale)
    return float(plain(r.loss_grad)[0, 0]), r.loss


def test_half_mse_backward_rounds_alpha_the_difference_and_both_products():
    """torch's CUDA mse_loss backward is ``alpha * (a - b) * c`` in scalar_t
    (PointwiseOpsKernel.cu, mse_backward_cuda_kernel), alpha = scalar_t(2/N): z = 0.330322265625,
    y = 0.4462890625, N = 3, S = 3. Per operation: alpha = 0.66650390625 (2/3 rounded), a − b
    = −0.115966796875, alpha·(a − b) = −0.0772705078125, ·3 = −0.2318115234375. One rounding
    of 2·3·(z − y)/3 gives −0.23193359375."""
    z, y = [0.330322265625] * 3, [0.4462890625] * 3
    got, _ = half_loss_grad({"type": "mse"}, z, y, 3.0)
    alpha, d = f16(f32(2 / 3)), f16(z[0]) - f16(y[0])
    per_operation = f16(f16(alpha * d) * f16(3))
    single = f16(2 * (np.float64(z[0]) - y[0]))
    assert float(alpha) == 0.66650390625 and float(per_operation) == -0.2318115234375
    assert float(single) == -0.23193359375
    assert got == float(per_operation)


def test_half_l1_backward_is_the_scale_times_a_float_reciprocal_rounded_once():
    """l1_loss is ``(input − target).abs().mean()`` (Loss.cpp): autograd's mean backward
    multiplies gO by the float reciprocal 1/N (BinaryDivTrueKernel.cu) and rounds once, abs's
    backward multiplies by sgn(z − y) (exact). N = 3, S = 5: 5·float32(1/3) rounds to
    1.6669921875; a norm held in scalar_t, as mse's kernel holds it, would give
    0.333251953125·5 = 1.666015625."""
    got, _ = half_loss_grad({"type": "l1"}, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 5.0)
    once = f16(f32(5) * (f32(1) / f32(3)))
    assert float(once) == 1.6669921875 and float(f16(f16(f32(1 / 3)) * f16(5))) == 1.666015625
    assert got == float(once)


def test_half_smooth_l1_backward_rounds_norm_x_grad_and_the_division_by_beta():
    """SmoothL1BackwardFunctor (PointwiseOpsKernel.cu), |x| ≤ β: ``norm_val * x * grad_output
    / beta_val`` in scalar_t. z = −0.51904296875, y = −0.10577392578125, β = 0.5, N = 3, S = 3:
    x = −0.413330078125, ·norm (1/3 rounded: 0.333251953125) = −0.1376953125, ·3 =
    −0.4130859375, /0.5 = −0.826171875. One rounding of (z − y)/β·S/N gives −0.82666015625."""
    z, y = [-0.51904296875] * 3, [-0.10577392578125] * 3
    got, _ = half_loss_grad({"type": "smooth_l1", "beta": 0.5}, z, y, 3.0)
    x, norm = f16(z[0]) - f16(y[0]), f16(f32(1 / 3))
    per_operation = f16(f16(f16(norm * x) * f16(3)) / f16(0.5))
    single = f16((np.float64(z[0]) - y[0]) / 0.5)
    assert float(per_operation) == -0.826171875 and float(single) == -0.82666015625
    assert got == float(per_operation)


def test_half_huber_backward_rounds_norm_x_then_the_grad_product():
    """HuberBackwardFunctor (PointwiseOpsKernel.cu), |x| ≤ δ: ``norm_val * x * grad_output``
    in scalar_t. z = −0.1688232421875, y = −0.11724853515625, δ = 0.7, N = 3, S = 3:
    x = −0.05157470703125, ·norm = −0.017181396484375, ·3 = −0.051544189453125; one rounding
    of x·S/N gives x itself, −0.05157470703125."""
    z, y = [-0.1688232421875] * 3, [-0.11724853515625] * 3
    got, _ = half_loss_grad({"type": "huber", "delta": 0.7}, z, y, 3.0)
    x, norm = f16(z[0]) - f16(y[0]), f16(f32(1 / 3))
    per_operation = f16(f16(norm * x) * f16(3))
    assert float(per_operation) == -0.051544189453125 and float(x) == -0.05157470703125
    assert got == float(per_operation)


def test_half_bce_with_logits_backward_rounds_each_of_its_four_kernels():
    """binary_cross_entropy_with_logits_backward (FunctionsManual.cpp) on Half tensors is four
    kernels, each rounding once: σ(z), − y, ·gO, then the mean's ·float(1/N). z =
    −0.119873046875, y = 1, N = 3, S = 3: σ = 0.469970703125, − 1 = −0.5302734375 (exact),
    ·3 = −1.5908203125, ·(1/3) = −0.5302734375. One rounding of S·(σ(z) − y)/N gives
    −0.52978515625: the rounded σ carries its error through."""
    z = [-0.119873046875] * 3
    got, _ = half_loss_grad({"type": "bce_with_logits"}, z, [1.0] * 3, 3.0)
    e = np.exp(-np.abs(f32(z[0])))
    s = f16(e / (f32(1) + e))                  # refnet's float32 σ for z < 0, rounded once
    per_operation = f16(f32(f16(f16(s - f16(1)) * f16(3))) * (f32(1) / f32(3)))
    single = f16(1 / (1 + np.exp(-np.float64(z[0]))) - 1)
    assert float(s) == 0.469970703125 and float(per_operation) == -0.5302734375
    assert float(single) == -0.52978515625
    assert got == float(per_operation)


def test_half_mse_loss_value_is_the_stored_squares_summed_in_float():
    """mse_loss's forward on Half tensors: ``diff * diff`` in scalar_t (BinaryMiscOpsKernels.cu)
    stored, then the mean sums in float and multiplies by float(1/N) (ReduceMomentKernel.cu),
    one rounding. z = (−0.267822265625, 0.1807861328125), y = 0: the squares are stored as
    0.07171630859375 and 0.032684326171875, and their mean rounds to 0.05218505859375; the
    exact mean of the squares rounded once is 0.052215576171875."""
    z, y = [-0.267822265625, 0.1807861328125], [0.0, 0.0]
    _, loss = half_loss_grad({"type": "mse"}, z, y, 1.0)
    squares = f16(np.array(z)) * f16(np.array(z))
    per_operation = f16(np.sum(squares.astype(f32), dtype=f32) * (f32(1) / f32(2)))
    assert squares.astype(float).tolist() == [0.07171630859375, 0.032684326171875]
    assert float(per_operation) == 0.05218505859375
    assert float(f16(np.sum(np.array(z) ** 2) / 2)) == 0.052215576171875
    assert loss == float(per_operation)
