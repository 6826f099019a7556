"""fp16/bf16 emulation: kernels round once at their boundary, as a GPU does; accounting against a
float64 shadow; loss scaling; claims 13 and 14 with numbers predicted before they are measured."""

import json
import math

import numpy as np
import pytest
from conftest import HAVE_TORCH
from hypothesis import given
from hypothesis import strategies as st

from refnet.cli import main
from refnet.lowp.diagnose import diagnose
from refnet.lowp.emulation import Precision, StoredArray, plain, round_float32, run, store
from refnet.lowp.gradscaler import GradScaler
from refnet.model import Model
from refnet.numerics.backend import FLOAT64
from refnet.numerics.formats import round_to

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

FP16_MAX_ROUNDING_TO_FINITE = 65520.0        # |z| ≥ 65520 rounds to inf in fp16
FP16_HALF_SMALLEST_SUBNORMAL = 2.0 ** -25    # |g| ≤ 2⁻²⁵ rounds to 0 in fp16
U_FP16 = 2.0 ** -11                          # fp16 unit roundoff


def mlp(widths, in_dim, activation, std, out_dim=10, batch=64, seed=0, loss="softmax_cross_entropy"):
    layers = []
    for w in widths:
        layers += [{"type": "dense", "out": w, "init": {"name": "normal", "std": std},
                    "bias_init": "zeros"}, {"type": activation}]
    layers.append({"type": "dense", "out": out_dim, "init": {"name": "normal", "std": std},
                   "bias_init": "zeros"})
    return Model({"input_shape": [in_dim], "seed": seed, "batch": batch, "layers": layers,
                  "loss": {"type": loss}})


def one_layer(x_row, w_row, kind="dense"):
    """A model whose single output is Σ_k x_k·w_k: a dense layer, or a 1×1 conv over K channels."""
    k = len(x_row)
    if kind == "dense":
        model = Model({"input_shape": [k], "batch": 1, "loss": {"type": "mse"},
                       "layers": [{"type": "dense", "out": 1, "bias": False}]})
        x = np.array([x_row], dtype=np.float64)
        params = {"0.weight": np.array([w_row], dtype=np.float64)}
    else:
        model = Model({"input_shape": [k, 1, 1], "batch": 1, "loss": {"type": "mse"},
                       "layers": [{"type": "conv2d", "out_channels": 1, "kernel_size": 1,
                                   "bias": False}, {"type": "flatten"}]})
        x = np.array(x_row, dtype=np.float64).reshape(1, k, 1, 1)
        params = {"0.weight": np.array(w_row, dtype=np.float64).reshape(1, k, 1, 1)}
    return model, params, x


def emulated_output(kind, x_row, w_row, accumulate):
    model, params, x = one_layer(x_row, w_row, kind)
    y = np.zeros((1, 1))
    r = run(model, Precision("fp16", "half", accumulate), params, x, y)
    return float(np.asarray(plain(r.outputs[0][2]), dtype=np.float64).reshape(-1)[0])


# --- the GPU's GEMM semantics ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "conv2d"])
def test_float32_accumulation_keeps_small_addends_like_a_tensor_core(kind):
    """2048 + 1000·1 = 3048 with float32 accumulation; rounding each partial sum to fp16 gives
    2048, since 2049 is a tie between 2048 and 2050 and goes to the even 2048 every time."""
    x, w = [2048.0] + [1.0] * 1000, [1.0] * 1001
    assert emulated_output(kind, x, w, "float32") == 3048.0
    assert emulated_output(kind, x, w, "storage") == 2048.0


@pytest.mark.parametrize("kind", ["dense", "conv2d"])
def test_tiny_products_add_up_in_float32_and_are_rounded_once(kind):
    """1000 products 1e-4·1e-4: fp16(1e-4)² = 1.00033e-8 each, summed exactly in float32 to
    1.00033e-5, rounded once to the fp16 subnormal grid (2⁻²⁴): 168·2⁻²⁴ = 1.0014e-5. Each
    product alone is below 2⁻²⁵, so rounding every product (storage accumulation) gives 0."""
    x, w = [1e-4] * 1000, [1e-4] * 1000
    exact = 1000 * float(np.float16(1e-4)) ** 2
    assert emulated_output(kind, x, w, "float32") == round_to(exact, "fp16") == 168 * 2.0 ** -24
    assert abs(emulated_output(kind, x, w, "float32") - 1.0014e-5) < 1e-9
    assert emulated_output(kind, x, w, "storage") == 0.0


@pytest.mark.parametrize("kind", ["dense", "conv2d"])
def test_no_intermediate_overflow_in_the_float32_accumulator(kind):
    """6e4 + 6e4 − 6e4 = 6e4: the partial sum 1.2e5 overflows fp16 but not float32."""
    x, w = [6e4, 6e4, 6e4], [1.0, 1.0, -1.0]
    assert emulated_output(kind, x, w, "float32") == 6e4
    assert emulated_output(kind, x, w, "storage") == math.inf


def test_dense_output_is_the_exact_dot_product_plus_bias_rounded_once():
    """The GPU's fp16 Linear output is the exact Σ x·w + b rounded once to fp16 in all but 0–2 of
    4096 elements (shared/PRECISION.md). Emulated with float32 accumulation it can differ only
    where the float32 sum's error (≤ K·2⁻²⁴ relative, K = 129 terms) moves it across an fp16
    rounding boundary (spacing 2⁻¹⁰ relative): a probability below 2·129·2⁻²⁴/2⁻¹⁰ ≈ 1.6 %
    per element, far less in practice (the error is ~√K, not K, units)."""
    model = mlp([128], 128, "relu", 0.1, batch=32)
    params, x, y = model.prepare()
    r = run(model, Precision("fp16", "half"), params, x, y)
    x16 = round_to(x, "fp16")
    w16, b16 = round_to(params["0.weight"], "fp16"), round_to(params["0.bias"], "fp16")
    exact = np.array([[math.fsum([*(x16[n] * w16[o]), b16[o]]) for o in range(128)]
                      for n in range(32)])
    mismatches = np.sum(np.asarray(r.outputs[0][2], dtype=np.float64) != round_to(exact, "fp16"))
    assert mismatches <= 0.016 * exact.size
    assert mismatches <= 8       # measured: 0 to a few of 4096


def float32_edge_cases():
    """Every fp16 value, the midpoint (a tie) above each, and their neighbours one float32 ulp
    away; bf16 the same: the values where round-to-nearest-even is decided."""
    with np.errstate(invalid="ignore"):                # signalling-NaN patterns warn on the cast
        fp16 = np.arange(2 ** 16, dtype=np.uint16).view(np.float16).astype(np.float64)
        bf16 = (np.arange(2 ** 16, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)
    out = []
    for values in (fp16, bf16):
        v = np.sort(values[np.isfinite(values)])
        mid = (v[:-1] + v[1:]) / 2                                   # exact in float64
        mid32 = mid.astype(np.float32)
        out += [v.astype(np.float32), mid32, np.nextafter(mid32, np.float32(np.inf)),
                np.nextafter(mid32, np.float32(-np.inf))]
    extra = np.array([np.inf, -np.inf, np.nan, 65519.99, 65520, -65520, 3e38, -0.0, 1e-45],
                     dtype=np.float32)
    return np.concatenate(out + [extra])


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_float32_rounding_to_the_storage_grid_is_rne_at_every_tie_and_edge(fmt):
    """round_float32 (the fast, value-independent rounding the emulation stores with) equals
    refnet.numerics.formats.round_to — one rounding, ties to even, subnormals kept, overflow to inf — on
    every value of the format, every tie between two of them, and the floats just beside."""
    x = float32_edge_cases()
    with np.errstate(all="ignore"):
        got = round_float32(x, fmt).astype(np.float64)
        want = round_to(x.astype(np.float64), fmt)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize("largest, want", [(65519.99, 65504.0), (65520.0, np.inf),
                                            (-65520.0, -np.inf), (32767.99, 32768.0),
                                            (np.nan, np.nan), (-np.inf, -np.inf)])
def test_fp16_rounding_finds_an_overflow_that_is_the_arrays_only_large_value(largest, want):
    """round_float32 looks for values that may overflow only when the array's largest exponent
    reaches 2¹⁵ (one reduction, not a mask of the array): an array of small values and one
    edge — 65520, the least float32 that rounds to inf, with exponent 2¹⁵ exactly; 65519.99,
    the largest that stays finite — rounds that edge as round_to does, and the rest too."""
    x = np.array([1.0, -3e-8, largest, 0.1], dtype=np.float32)
    got = round_float32(x, "fp16").astype(np.float64)
    np.testing.assert_array_equal(got, round_to(x.astype(np.float64), "fp16"))
    np.testing.assert_array_equal(got[2], want)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_rounding_an_empty_array_gives_an_empty_array(fmt):
    """A tensor with no elements (a zero-size batch, an empty slice) rounds to itself, shape
    kept: round_float32's overflow check reduces over the array, and a maximum of nothing has
    no value."""
    got = round_float32(np.zeros((0, 3), dtype=np.float32), fmt)
    assert got.shape == (0, 3) and got.dtype == np.float32


@given(st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=200))
def test_float32_rounding_agrees_with_round_to_on_random_bit_patterns(bits):
    x = np.array(bits, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(all="ignore"):
        for fmt in ("fp16", "bf16"):
            np.testing.assert_array_equal(round_float32(x, fmt).astype(np.float64),
                                          round_to(x.astype(np.float64), fmt))


@given(st.lists(st.floats(-7e4, 7e4) | st.floats(-1e-7, 1e-7) | st.sampled_from(
    [65504.0, 65519.99, 65520.0, -0.0, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -24]),
    min_size=1, max_size=40))
def test_float64_stores_round_once(values):
    """float64 → fp16/bf16 stores round once (not via float32, which would round twice), and
    agree with numpy's astype(float16) and ml_dtypes' bfloat16 where those round once."""
    a = np.array(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(plain(store(a, "fp16")).astype(np.float64),
                                      round_to(a, "fp16"))
        np.testing.assert_array_equal(plain(store(a, "fp16")).astype(np.float64),
                                      a.astype(np.float16).astype(np.float64))
        np.testing.assert_array_equal(plain(store(a, "bf16")).astype(np.float64),
                                      round_to(a, "bf16"))
        if ml_dtypes is not None:
            a32 = a.astype(np.float32)
            np.testing.assert_array_equal(
                plain(store(a32, "bf16")).astype(np.float64),
                a32.astype(ml_dtypes.bfloat16).astype(np.float64))


def test_stored_arrays_round_every_elementwise_operation_like_torch_half_tensors():
    """fp16 + fp16 rounds to fp16 (2048 + 1 = 2048: a tie, to even); fp16 + float32 array is
    float32 (torch promotes); a Python scalar does not promote (2048·1.0004 stays fp16)."""
    a = store(np.array([2048.0]), "fp16")
    one = store(np.array([1.0]), "fp16")
    assert isinstance(a + one, StoredArray) and float((a + one)[0]) == 2048.0
    wide = a + np.array([1.0], dtype=np.float32)
    assert not isinstance(wide, StoredArray) and float(wide[0]) == 2049.0
    assert float((a * 1.0004)[0]) == 2048.0


# --- the policy adds nothing of its own -----------------------------------------------------
@pytest.mark.parametrize("spec_name", ["relu-mlp-kaiming", "small-cnn", "small-resnet"])
def test_float64_policy_reproduces_the_float64_backend_bit_for_bit(spec_name):
    """Precision("float64") runs the float64 backend itself: loss, every gradient, dL/dx and
    every layer output are bitwise equal to ``loss_and_grads`` in float64."""
    model = Model.load(f"spec/examples/{spec_name}.json")
    params, x, y = model.prepare()
    ref = model.loss_and_grads(FLOAT64, params, x, y)
    r = run(model, Precision("float64"), params, x, y)
    assert r.loss == float(ref.loss)
    for name, g in ref.params.items():
        assert np.array_equal(r.grads[name], g, equal_nan=True) and r.grads[name].dtype == np.float64
    assert np.array_equal(r.x_grad, ref.x)
    assert r.first_nonfinite() is None
    assert diagnose(model, Precision("float64")).first_nonfinite is None


def test_fp16_and_bf16_runs_stay_close_to_float64_when_nothing_overflows():
    """A healthy net (relu, kaiming-like std) in fp16 and bf16: every gradient agrees with
    float64 to a median relative error of a few units roundoff of the format. Each value passes
    about 4 roundings per layer (z, h forward; dh, dz backward) over 3 layers: ≤ 12u is the
    first-order bound on a median (which ignores the cancellation tail)."""
    model = mlp([64, 64], 32, "relu", math.sqrt(2 / 64), batch=16)
    for storage, u in (("fp16", U_FP16), ("bf16", 2.0 ** -8)):
        if storage == "bf16" and ml_dtypes is None:
            continue
        d = diagnose(model, Precision(storage))
        assert d.first_nonfinite is None
        for t in d.tensors:
            if t.kind == "param_grad":
                assert t.underflow == 0 and t.rel_err["p50"] <= 12 * u, (storage, t)


# --- claim 13 -------------------------------------------------------------------------------
def test_claim13a_fp16_relu_net_overflows_at_the_layer_the_variance_law_predicts():
    """Claim 13: activations overflow to inf in fp16. A ReLU MLP (input 64, width 128, N(0, 1)
    weights, x ~ N(0, 1), batch 64). The variance law: Var z₁ = 64·1·1 = 64 (std 8); each further
    layer multiplies Var by n·Var[w]·½ = 64 (std ×8), so std z_k = 8^k. The predicted first
    overflowing Linear is the first k where the expected count of |z| ≥ 65520 among 64·128
    entries, numel·erfc(65520/(std·√2)), reaches 1: k = 5 (≈ 370 expected; k = 4: ≈ 1e-52).
    refnet names that layer (the 5th Linear is layer index 8) as the first inf/NaN, with inf
    (not NaN), and float64 stays finite there."""
    numel = 64 * 128
    expected = [numel * math.erfc(FP16_MAX_ROUNDING_TO_FINITE / (8.0 ** k * math.sqrt(2)))
                for k in range(1, 9)]
    predicted = next(k for k, e in enumerate(expected, start=1) if e >= 1)
    assert predicted == 5
    model = mlp([128] * 8, 64, "relu", 1.0)
    d = diagnose(model, Precision("fp16", "autocast"))
    dense_index = 2 * (predicted - 1)
    assert d.first_nonfinite == f"forward: layer {dense_index} (dense) output holds inf"
    out = {t.name: t for t in d.tensors}
    assert out[f"{dense_index}.out"].overflow > 0
    assert out[f"{dense_index}.out"].max_abs_float64 < 1e7           # finite in float64
    assert all(out[f"{2 * j}.out"].overflow == 0 for j in range(predicted - 1))
    # the observed overflow count is of the predicted order (same law, one sample)
    assert 0.2 * expected[predicted - 1] <= out[f"{dense_index}.out"].overflow \
        <= 5 * expected[predicted - 1]


def sigmoid12():
    """Claim 13(b)'s net: 12 sigmoid layers of width 128, N(0, 0.01) weights, cross-entropy."""
    return mlp([128] * 12, 128, "sigmoid", 0.01)


def weight_rows(d):
    return [t for t in d.tensors if t.kind == "param_grad" and t.name.endswith("weight")]


def test_claim13b_fp16_gradients_of_a_12_layer_sigmoid_net_underflow_without_loss_scaling():
    """Claim 13: small gradients flush to 0 in fp16. Backward, each layer multiplies the gradient
    by about σ'·std·√n = 0.25·0.01·√128 ≈ 0.028, so after 12 layers it is ~1e-20, far below
    fp16's smallest subnormal (6e-8). Predicted: a layer whose float64 gradients all lie below
    2⁻²⁵ (half the smallest subnormal) comes out entirely 0 — the early layers, 9 of 13 here —
    while float64 has every entry nonzero; a layer whose entries are all fp16 normal numbers
    (≥ 2⁻¹⁴) loses none."""
    model = sigmoid12()
    params, x, y = model.prepare()
    f64 = model.loss_and_grads(FLOAT64, params, x, y)
    d = diagnose(model, Precision("fp16", "autocast"))
    rows = weight_rows(d)
    predicted = [float(np.mean(np.abs(f64.params[t.name]) <= FP16_HALF_SMALLEST_SUBNORMAL))
                 for t in rows]
    measured = [t.underflow / t.numel for t in rows]
    assert all(np.all(f64.params[t.name] != 0) for t in rows)
    early = [i for i, p in enumerate(predicted) if p == 1.0]
    assert len(early) >= 8                                     # layers 0..7 at least
    assert all(measured[i] == 1.0 for i in early)
    # and the layers whose every float64 entry is an fp16 normal number lose none
    normal = [i for i, t in enumerate(rows) if np.abs(f64.params[t.name]).min() >= 2.0 ** -14]
    assert normal and all(measured[i] == 0.0 for i in normal)
    # In between the prediction is not elementwise: δ, from which dW = δᵀh is built, is itself a
    # coarse fp16 subnormal there (measured: layer 18 has 19 % zeros where 25 % of the float64
    # entries lie below 2⁻²⁵).
    # ratio of consecutive layers' float64 gradient RMS: the predicted ≈ 0.028 per layer
    rms = [float(np.sqrt(np.mean(f64.params[t.name] ** 2))) for t in rows]
    ratios = [a / b for a, b in zip(rms[:-2], rms[1:-1])]
    assert all(0.01 < r < 0.06 for r in ratios), ratios


# --- claim 14 -------------------------------------------------------------------------------
def test_claim14_a_loss_scale_of_2_16_recovers_the_layers_the_scale_predicts():
    """Claim 14: loss scaling brings small gradients back above the underflow threshold.
    With S = 2¹⁶ the scaled gradient S·g is stored. Predicted from the float64 gradients: a layer
    with every S·|g| ≥ 2⁻²⁴ (fp16's smallest subnormal) recovers fully — 5 of 13 layers here,
    of which 3 lose entries without scaling; a layer with every S·|g| ≤ 2⁻²⁵ stays entirely
    underflowed — the first 6 (their gradients are ~1e-20: no scale that keeps the last layer
    finite can save them). Measured: exactly so."""
    model = sigmoid12()
    params, x, y = model.prepare()
    f64 = model.loss_and_grads(FLOAT64, params, x, y)
    scale = 2.0 ** 16
    plain = weight_rows(diagnose(model, Precision("fp16")))
    scaled = weight_rows(diagnose(model, Precision("fp16"), loss_scale=scale))
    recovered = under = 0
    for t in scaled:
        g = np.abs(f64.params[t.name]) * scale
        if g.min() >= 2.0 ** -24:
            assert t.underflow == 0, t
            recovered += 1
        if g.max() <= FP16_HALF_SMALLEST_SUBNORMAL:
            assert t.underflow == t.numel, t
            under += 1
    assert (recovered, under) == (5, 6)
    brought_back = [a.name for a, b in zip(plain, scaled) if a.underflow > 0 and b.underflow == 0]
    assert brought_back == ["16.weight", "18.weight", "20.weight"]
    # Dynamic scaling starts at 2¹⁶, finds that pass clean and keeps it: the same counts.
    dynamic = diagnose(model, Precision("fp16"), loss_scale="dynamic")
    assert dynamic.loss_scale == scale and dynamic.skipped_steps == 0
    assert [t.underflow for t in weight_rows(dynamic)] == [t.underflow for t in scaled]


def test_claim14_unscaled_gradients_agree_with_float64_to_fp16_precision_where_representable():
    """Where S·g lies in fp16's normal range, the unscaled gradients agree with float64 to a median
    relative error of at most n_r·u (u = 2⁻¹¹, n_r = 4 roundings per layer on the path from the
    loss: first-order error analysis of a median; the cancellation tail is not bounded)."""
    model = sigmoid12()
    params, x, y = model.prepare()
    f64 = model.loss_and_grads(FLOAT64, params, x, y)
    scale = 2.0 ** 16
    rows = weight_rows(diagnose(model, Precision("fp16"), loss_scale=scale))
    checked = 0
    for depth_from_top, t in enumerate(reversed(rows), start=1):
        if (np.abs(f64.params[t.name]) * scale).min() >= 2.0 ** -14:
            assert t.rel_err["p50"] <= 4 * depth_from_top * U_FP16, t
            checked += 1
    assert checked >= 3


def test_dynamic_loss_scaling_backs_off_from_an_overflowing_scale():
    """A net whose S·g overflows at 2¹⁶ (logits gradient 2¹⁶·O(1)/N in a 2-sample batch):
    dynamic scaling halves until a pass is clean, counts the skipped passes, and ends finite."""
    model = mlp([16], 8, "tanh", 1.0, batch=2, out_dim=3, loss="mse")
    params, x, y = model.prepare()
    y = y * 1e4                                     # large targets: dL/dz ~ 1e4
    d = diagnose(model, Precision("fp16"), params, x, y, loss_scale="dynamic")
    assert d.skipped_steps >= 1 and d.loss_scale == 2.0 ** 16 / 2 ** d.skipped_steps
    assert all(t.overflow == 0 and t.nan == 0 for t in d.tensors if t.kind == "param_grad")
    static = diagnose(model, Precision("fp16"), params, x, y, loss_scale=2.0 ** 16)
    assert static.first_nonfinite is not None


def test_an_overflowing_loss_scale_gives_inf_off_the_label_and_nan_on_it():
    """S = 2²⁴, N = 64: nll's upstream −S/N = −2¹⁸ overflows fp16, and log-softmax's backward then
    gives +inf off the label and NaN on it — the GPU's pattern under autocast."""
    model = sigmoid12()
    params, x, y = model.prepare()
    r = run(model, Precision("fp16"), params, x, y, loss_scale=2.0 ** 24)
    g = np.asarray(r.loss_grad, dtype=np.float64)
    on_label = np.zeros(g.shape, dtype=bool)
    on_label[np.arange(len(y)), y.astype(int)] = True
    assert np.all(np.isnan(g[on_label])) and np.all(g[~on_label] == math.inf)
    assert r.first_nonfinite().startswith("backward: the loss gradient")


def test_half_policy_cannot_scale_by_2_16_because_the_scale_itself_overflows():
    """Under model.half() the loss and its upstream gradient are fp16; 2¹⁶ > 65504 is inf, so every
    gradient is inf or NaN — NaN wherever a label's on-label NaN reaches it (shared/PRECISION.md:
    loss scaling needs a float32 loss)."""
    model = mlp([32], 16, "tanh", 0.3, batch=8)
    params, x, y = model.prepare()
    r = run(model, Precision("fp16", "half"), params, x, y, loss_scale=2.0 ** 16)
    assert not any(np.any(np.isfinite(g)) for g in r.grads.values())
    assert all(np.any(np.isnan(g)) for g in r.grads.values())


# --- sigmoid' from the output ---------------------------------------------------------------
def test_torch_form_sigmoid_derivative_vanishes_in_fp16_where_the_accurate_form_does_not():
    """σ(10) = 0.99995 rounds to 1.0 in fp16, so torch's s(1 − s) gives 0; refnet's accurate
    e/(1+e)² gives σ'(10) = 4.54e-5 (an fp16 subnormal). The emulation follows torch by default."""
    model = Model({"input_shape": [1], "batch": 1, "loss": {"type": "mse"},
                   "layers": [{"type": "sigmoid"}]})
    x, y = np.array([[10.0]]), np.array([[0.0]])
    torch_form = run(model, Precision("fp16", "half"), {}, x, y)
    accurate = run(model, Precision("fp16", "half", derivatives="accurate"), {}, x, y)
    assert float(torch_form.x_grad[0, 0]) == 0.0
    exact = 2 * 1.0 * math.exp(-10) / (1 + math.exp(-10)) ** 2     # dL/dh = 2(h − 0), h = 1
    assert abs(float(accurate.x_grad[0, 0]) - exact) <= 2.0 ** -24


# --- BatchNorm statistics -------------------------------------------------------------------
def test_batchnorm_on_inputs_near_1e3_overflows_only_with_storage_format_statistics():
    """Inputs 1e3 ± 300: the squares (x − μ)² reach ~1e6 > 65504. With float32 statistics (the
    GPU's) BatchNorm's output is finite and matches float64 to fp16 precision; with every
    operation in fp16 the variance overflows to inf, x̂ = (x − μ)/inf = 0, and the output
    collapses to β = 0 in every element."""
    model = Model({"input_shape": [4], "batch": 16, "loss": {"type": "mse"},
                   "layers": [{"type": "batchnorm"}]})
    rng = np.random.default_rng(0)
    x = 1e3 + 300 * rng.standard_normal((16, 4))
    y = np.zeros((16, 4))
    params = model.init_params()
    good = run(model, Precision("fp16", "half"), params, x, y)
    out = np.asarray(good.outputs[0][2], dtype=np.float64)
    ref_state = model.default_state()
    ref_state.outputs = []
    model.forward(FLOAT64, params, x, y, ref_state)
    ref = ref_state.outputs[0][2]
    assert np.all(np.isfinite(out))
    assert np.max(np.abs(out - ref) / np.abs(ref)) <= 8 * U_FP16 * np.max(np.abs(ref)) / np.min(
        np.abs(ref))
    bad = run(model, Precision("fp16", "half", "storage"), params, x, y)
    assert np.all(np.asarray(bad.outputs[0][2], dtype=np.float64) == 0)
    # and the running variance, stored in fp16 under half, overflows: inputs of std 3000 (fine
    # in fp16) have variance 9e6, and 0.9·1 + 0.1·9e6·16/15 ≈ 1e6 > 65504 (shared/PRECISION.md)
    big = 3000 * rng.standard_normal((16, 4))
    r = run(model, Precision("fp16", "half"), params, big, y)
    assert np.all(np.isinf(np.asarray(r.updates["0.running_var"], dtype=np.float64)))


# --- GradScaler -----------------------------------------------------------------------------
SCRIPT = [0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1]
# torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=3) on that script, measured with
# torch 2.13 (get_scale() after each update); the same rules give it by hand.
TORCH_TRAJECTORY = [4.0, 4.0, 8.0, 4.0, 4.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0, 2.0]


def scripted(scaler, script):
    trajectory = []
    for bad in script:
        scaler.unscale({"w": np.array([math.inf if bad else 1.0, 0.0])})
        scaler.update()
        trajectory.append(scaler.scale)
    return trajectory


def test_gradscaler_follows_torchs_scale_trajectory_on_a_scripted_sequence():
    assert scripted(GradScaler(init_scale=4.0, growth_interval=3), SCRIPT) == TORCH_TRAJECTORY


def test_gradscaler_defaults_and_float32_limits():
    """init 2¹⁶, growth ×2 after 2000 clean steps, backoff ×0.5; never grows to inf in float32;
    the inverse scale is float32(1/float64(scale)); a static scaler never changes."""
    s = GradScaler()
    assert s.scale == 65536.0 and s.growth_interval == 2000
    scripted(s, [0] * 1999)
    assert s.scale == 65536.0
    scripted(s, [0])
    assert s.scale == 131072.0
    top = GradScaler(init_scale=2.0 ** 127, growth_interval=1)
    scripted(top, [0, 0])
    assert top.scale == 2.0 ** 127
    assert GradScaler(init_scale=3.0).inv_scale() == np.float32(1 / 3)
    static = GradScaler(init_scale=8.0, dynamic=False)
    assert scripted(static, [1, 0, 1]) == [8.0, 8.0, 8.0]


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_gradscaler_matches_torch_gradscaler_live():
    import torch
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    ts = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=3)
    trajectory = []
    for bad in SCRIPT:
        opt.zero_grad()
        ts.scale((p * torch.tensor([math.inf if bad else 1.0, 0.0])).sum()).backward()
        ts.step(opt)
        ts.update()
        trajectory.append(ts.get_scale())
    assert trajectory == scripted(GradScaler(init_scale=4.0, growth_interval=3), SCRIPT)


def test_training_loop_with_dynamic_loss_scaling_skips_overflowing_steps():
    """GradScaler in the training loop: an overflowing start (2³⁰ on a net whose logits gradient
    is ~0.1/64·S, > 65504 for S ≳ 2²⁵) is skipped and halved, then training proceeds on the
    float32 master weights."""
    from refnet.training.loop import train
    from refnet.training.optim import make_optimizer
    model = mlp([32, 32], 32, "tanh", 0.3)
    result = train(model, None, None, None, make_optimizer("sgd", 0.1), 16,
                   precision=Precision("fp16"), scaler=GradScaler(init_scale=2.0 ** 30))
    assert result.stopped is None
    skipped = [h["skipped"] for h in result.history]
    assert skipped[0] and not skipped[-1]
    scales = [h["loss_scale"] for h in result.history]
    assert all(b == a / 2 for a, b, s in zip(scales, scales[1:], skipped) if s)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


# --- bad input and the CLI ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"storage": "fp12"}, {"policy": "o2"},
                                    {"accumulate": "fp8"}, {"derivatives": "exact"}])
def test_unknown_precision_or_policy_is_a_clear_error(kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
        Precision(**kwargs)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan, "big", True])
def test_non_positive_or_non_finite_loss_scale_is_a_clear_error(scale):
    model = mlp([4], 3, "tanh", 0.3, batch=2)
    params, x, y = model.prepare()
    with pytest.raises(ValueError, match="loss scale"):
        diagnose(model, Precision("fp16"), params, x, y, loss_scale=scale)


def test_diagnose_cli_json_lists_every_tensor(tmp_path, capsys):
    rc = main(["diagnose", "spec/examples/small-cnn.json", "--precision", "fp16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["first_nonfinite"] is None
    names = {t["name"]: t for t in report["tensors"]}
    model = Model.load("spec/examples/small-cnn.json")
    assert set(model.param_shapes()) <= set(names)
    assert "x.grad" in names and "0.out" in names
    for t in report["tensors"]:
        assert {"name", "kind", "overflow", "underflow", "nan", "subnormal", "max_abs",
                "numel"} <= set(t)
        assert t["kind"] in ("activation", "param_grad", "input_grad", "update")


def test_diagnose_cli_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "spec/examples/sigmoid-deep-20.json", "--loss-scale", "-3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "spec/examples/sigmoid-deep-20.json", "--precision", "fp12"])
    assert e.value.code == 2
    assert main(["diagnose", "spec/examples/sigmoid-deep-20.json", "--policy", "half",
                 "--loss-scale", "65536"]) == 1                 # NaN gradients: exit 1
    assert "first inf/NaN: backward" in capsys.readouterr().out


def test_train_cli_runs_under_fp16_with_dynamic_loss_scaling(capsys):
    assert main(["train", "spec/examples/relu-mlp-kaiming.json", "--steps", "4", "--lr", "0.1",
                 "--precision", "fp16", "--loss-scale", "dynamic", "--json"]) == 0
    history = json.loads(capsys.readouterr().out)["history"]
    assert [h["loss_scale"] for h in history] == [65536.0] * 4
    assert main(["train", "spec/examples/relu-mlp-kaiming.json", "--steps", "2", "--lr", "0.1",
                 "--loss-scale", "8"]) == 2                     # float64 needs no scaler
