"""Golden gradient vectors: language-agnostic JSON that any framework can check itself against.

``refnet vectors write DIR`` writes one file per case; ``refnet vectors check DIR`` recomputes
every case from the inputs stored in its file and fails on any drift of any field. Files are
read with plain ``json`` (never pickle). The format (``spec/vectors.md``)::

    {"format": "refnet-vectors/2", "name": "...", "description": "...",
     "model": {...a refnet model spec...}, "mode": "train" | "eval",
     "upstream": "loss" | "given",          # the gradient of the loss, or Jᵀ·dy for a given dy
     "inputs": {"x": T, "y": T | labels, "dy": T (upstream "given"),
                "upstream": T (a loss with reduction "none": the gradient of its vector)},
     "params": {"0.weight": T, ...},        # torch names and layouts
     "outputs": {"output": R, "loss": R (upstream "loss"; reduction "none": the vector)},
     "grads": {"0.weight": R, ..., "x": R}}

    T = {"shape": [...], "hex": ["0x1.8p-1", ...]}                  exact float64 inputs
    R = {"shape": [...], "value": ["1.23...e-5", ...],               30 significant digits
                                                                     (more at a rounding tie;
                                                                     "0": exactly zero)
         "float64": [hex], "float32": [hex], "fp16": [hex],          each rounded once from
                                                                     the exact value, to nearest
         "tolerance": {"float64": {"ulps": 2, "abs": a}, "float32": ...,
                       "rule": "..."},                               which rule gave them
         "kink": [bool, ...]}                                        only where a kink applies

The reference values are the analytic gradients at ``DPS`` = 50 digits (refnet's mp backend), so
their first 30 digits are settled; a value within that run's own error bound of 0 is stored as
exactly 0 (``_reference_zeros``), and a value 30 digits would round to another float64, float32
or fp16 number gets more (``_decimal``). Losses are held to their error analysis like every
other tensor, and each tolerance names its rule (``RULE_ANALYSIS``, ``RULE_EXACT``).

Tolerances: an implementation computing in dtype d passes an element if
|got − ref_d| ≤ ulps·ulp_d(ref) + abs. ``abs`` is the float64 error analysis of the same
computation (``refnet.numerics.errorbound``: 8σ, the verifier's probabilistic bound, taken at the
tensor's worst element) scaled by u_d/u_64: an algorithm with the same structure in dtype d
makes rounding errors of that size; ``ulps`` = 2 leaves room for the final rounding of each side.
``abs`` is stored rounded up to ``TOLERANCE_DIGITS`` significant digits (``round_up`` says why:
the same files on every machine).
A ``kink`` element is one where the derivative is taken exactly at a kink (relu at 0, a tie in a
max-pool window): its value follows torch's convention, and a framework may differ there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..layers.base import ForwardState
from ..losses import Targets, split_targets
from ..model import Model
from ..numerics.backend import MPBackend, fraction_of
from ..numerics.errorbound import BOUND, LAMBDA, BoundArray

# Version 2 (spec/vectors.md, "Format 2"): a value that 30 digits would round to another float64,
# float32 or fp16 than the exact one gets the digits it needs; a value within the reference's own
# error bound of 0 is stored as exactly 0; losses carry an error-analysis tolerance; every
# tolerance names its rule.
FORMAT = "refnet-vectors/2"
DPS = 50
DIGITS = 30
ULPS = 2
TOLERANCE_DIGITS = 2      # significant digits of a tolerance's "abs", rounded up (round_up)
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "fp16": 2.0 ** -11}
ROUNDED = ("float64", "float32", "fp16")
# (precision bits, exponent of the smallest normal, largest finite) of each rounded format
GRIDS = {"float64": (53, -1022, float(np.finfo(np.float64).max)),
         "float32": (24, -126, float(np.finfo(np.float32).max)),
         "fp16": (11, -14, 65504.0)}


@dataclass
class Case:
    name: str
    description: str
    spec: dict
    upstream: str = "given"             # "given" dy, or "loss"
    mode: str = "train"
    x_special: Dict[int, float] = field(default_factory=dict)   # flat index -> exact value
    # parameter or buffer name -> its exact values (row-major), replacing the initial ones
    params_special: Dict[str, List[float]] = field(default_factory=dict)
    # the targets (row-major; ints for class labels), replacing the seeded ones
    y_values: Optional[list] = None


def _op(layer: dict, shape, loss="mse"):
    return {"input_shape": list(shape), "seed": 7, "batch": 2, "layers": [layer],
            "loss": {"type": loss}}


def cases() -> List[Case]:
    """The committed set: every layer type once (op vectors, with a given upstream dy), each
    loss once, and three whole networks with their loss."""
    act = lambda t, **o: Case(t, f"{t} activation, elementwise", _op({"type": t, **o}, [5]))  # noqa
    ops = [
        Case("dense", "Linear 4 → 3 (weight (out, in), bias)", _op({"type": "dense", "out": 3},
                                                                  [4])),
        Case("conv2d", "Conv2d 2 → 3 channels, 3×3, stride 2, padding 1, on 5×5",
             _op({"type": "conv2d", "out_channels": 3, "kernel_size": 3, "stride": 2,
                  "padding": 1}, [2, 5, 5])),
        Case("maxpool2d", "MaxPool2d 2×2 on 4×4; a tie in the first window (kink)",
             _op({"type": "maxpool2d", "kernel_size": 2}, [1, 4, 4]),
             x_special={0: 0.5, 1: 0.5, 4: 0.5, 5: 0.5}),
        Case("avgpool2d", "AvgPool2d 2×2, stride 1, on 3×3",
             _op({"type": "avgpool2d", "kernel_size": 2, "stride": 1}, [2, 3, 3])),
        Case("global_avgpool", "global average pool to (N, C, 1, 1)",
             _op({"type": "global_avgpool"}, [2, 3, 3])),
        Case("batchnorm-train", "BatchNorm2d in train mode (batch statistics), 3 channels",
             _op({"type": "batchnorm"}, [3, 2, 2])),
        Case("batchnorm-eval", "BatchNorm1d in eval mode (running statistics 0 and 1)",
             _op({"type": "batchnorm"}, [4]), mode="eval"),
        Case("layernorm", "LayerNorm over the last dimension (6)", _op({"type": "layernorm"},
                                                                       [6])),
        act("sigmoid"), act("tanh"), act("leaky_relu", slope=0.02), act("elu", alpha=1.3),
        act("selu"), act("gelu"), act("softplus", beta=2.0, threshold=10.0), act("prelu"),
        Case("relu", "relu activation; three inputs exactly 0 (kinks: relu'(0) = 0, as torch)",
             _op({"type": "relu"}, [5]), x_special={0: 0.0, 3: 0.0, 7: 0.0}),
    ]
    losses = [Case(f"loss-{t}", f"{t} loss (mean) of a Linear 4 → 3",
                   _op({"type": "dense", "out": 3}, [4], loss=t), upstream="loss")
              for t in ("mse", "softmax_cross_entropy", "bce_with_logits")]
    nets = [
        Case("net-mlp", "MLP 6-8-8-4: tanh, relu, cross-entropy",
             {"input_shape": [6], "seed": 11, "batch": 3, "loss": {"type": "softmax_cross_entropy"},
              "layers": [{"type": "dense", "out": 8}, {"type": "tanh"},
                         {"type": "dense", "out": 8}, {"type": "relu"},
                         {"type": "dense", "out": 4}]}, upstream="loss"),
        Case("net-cnn-batchnorm", "CNN: conv 3×3 → batchnorm → relu → maxpool → dense, "
             "cross-entropy", {"input_shape": [2, 6, 6], "seed": 12, "batch": 2,
                               "loss": {"type": "softmax_cross_entropy"},
                               "layers": [{"type": "conv2d", "out_channels": 3,
                                           "kernel_size": 3, "padding": 1},
                                          {"type": "batchnorm"}, {"type": "relu"},
                                          {"type": "maxpool2d", "kernel_size": 2},
                                          {"type": "flatten"}, {"type": "dense", "out": 3}]},
             upstream="loss"),
        Case("net-residual", "residual MLP: two blocks [dense → tanh] (scale 0.5), mse",
             {"input_shape": [5], "seed": 13, "batch": 3, "loss": {"type": "mse"},
              "layers": [{"type": "residual", "scale": 0.5,
                          "body": [{"type": "dense", "out": 5}, {"type": "tanh"}]},
                         {"type": "residual", "scale": 0.5,
                          "body": [{"type": "dense", "out": 5}, {"type": "tanh"}]},
                         {"type": "dense", "out": 2}]}, upstream="loss"),
    ]
    return (ops + losses + nets + _pool_and_shape_cases() + option_cases()
            + loss_option_cases() + convention_cases() + recurrent_cases())


def _pool_and_shape_cases() -> List[Case]:
    """Pooling's torch options (dilation, ceil_mode, divisor_override, adaptive windows) and
    dense on (N, *, in): each chosen so that its formula changes the numbers (a ceil-mode
    window clipped at the padded input, a last window the start rule drops, overlapping
    uneven adaptive windows, more outputs than inputs), and max-pool ties in a dilated and in
    an adaptive window (kinks: the first maximum gets the gradient)."""
    pool = lambda name, description, layer, shape, **kw: Case(   # noqa: E731
        name, description, _op(layer, shape), **kw)
    return [
        pool("maxpool2d-dilation", "MaxPool2d 3×3, stride 2, padding 1, dilation 2, on 7×7; a "
             "tie in the first window (kink)",
             {"type": "maxpool2d", "kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2},
             [2, 7, 7], x_special={8: 3.0, 10: 3.0}),
        pool("maxpool2d-ceil", "MaxPool2d 2×2, stride 2, padding (1, 0), ceil_mode, on 5×5: "
             "rows keep 3 windows (a 4th would start in the right padding), columns get 3",
             {"type": "maxpool2d", "kernel_size": 2, "stride": 2, "padding": [1, 0],
              "ceil_mode": True}, [1, 5, 5]),
        pool("avgpool2d-ceil", "AvgPool2d 3×3, stride 2, padding 1, ceil_mode, on 6×6: the "
             "last window clipped at the padded input, its padding counted (divisor 6, 4)",
             {"type": "avgpool2d", "kernel_size": 3, "stride": 2, "padding": 1,
              "ceil_mode": True}, [2, 6, 6]),
        pool("avgpool2d-ceil-exclude-pad", "AvgPool2d 3×3, stride 2, padding 1, ceil_mode, "
             "count_include_pad false, on 5×6",
             {"type": "avgpool2d", "kernel_size": 3, "stride": 2, "padding": 1,
              "ceil_mode": True, "count_include_pad": False}, [1, 5, 6]),
        pool("avgpool2d-divisor-override", "AvgPool2d 2×2, stride 1, padding 1, "
             "divisor_override 3, on 3×3",
             {"type": "avgpool2d", "kernel_size": 2, "stride": 1, "padding": 1,
              "divisor_override": 3}, [2, 3, 3]),
        pool("adaptive_avgpool2d", "AdaptiveAvgPool2d((3, 2)) on 5×7: overlapping uneven "
             "windows rows [0,2) [1,4) [3,5), columns [0,4) [3,7)",
             {"type": "adaptive_avgpool2d", "output_size": [3, 2]}, [2, 5, 7]),
        pool("adaptive_avgpool2d-none", "AdaptiveAvgPool2d((None, 3)) on 2×4: rows kept, "
             "columns [0,2) [1,3) [2,4)",
             {"type": "adaptive_avgpool2d", "output_size": [None, 3]}, [1, 2, 4]),
        pool("adaptive_maxpool2d", "AdaptiveMaxPool2d((3, 4)) on 5×3: more outputs than "
             "columns ([0,1) [0,2) [1,3) [2,3)); a tie in an overlap (kink)",
             {"type": "adaptive_maxpool2d", "output_size": [3, 4]}, [1, 5, 3],
             x_special={3: 3.0, 4: 3.0}),
        pool("dense-3d", "Linear 4 → 3 on (N, 3, 4), as nn.Linear on the last axis: dW and "
             "db sum over the batch and the 3 rows",
             {"type": "dense", "out": 3}, [3, 4]),
        Case("net-sequence-mlp", "dense 3 → 5 → tanh → dense 2 on (N, T = 4, F = 3), mse",
             {"input_shape": [4, 3], "seed": 14, "batch": 2, "loss": {"type": "mse"},
              "layers": [{"type": "dense", "out": 5}, {"type": "tanh"},
                         {"type": "dense", "out": 2}]}, upstream="loss"),
    ]



def option_cases() -> List[Case]:
    """The issue-18 layers: torch's activations refnet lacked (inputs placed on their kinks and
    deep in their tails), gelu's tanh form, groupnorm and instancenorm2d (weights, biases and
    running statistics set away from 1 and 0, so that a misplaced γ, β, mean or variance shows)."""
    act = lambda name, layer, description, special: Case(          # noqa: E731
        name, description, _op(layer, [5]), x_special=special)
    return [
        act("silu", {"type": "silu"}, "silu (swish) z·σ(z); inputs −30, 0, 20",
            {0: -30.0, 1: 0.0, 2: 20.0}),
        act("mish", {"type": "mish"}, "mish z·tanh(softplus(z)); inputs −30, 0, 20, −1.2",
            {0: -30.0, 1: 0.0, 2: 20.0, 3: -1.2}),
        act("hardtanh", {"type": "hardtanh", "min_val": -0.5, "max_val": 1.5},
            "hardtanh(min_val −0.5, max_val 1.5); inputs exactly at both limits (kinks: "
            "hardtanh' = 0 there, as torch)", {0: -0.5, 1: 1.5, 2: -2.0, 3: 3.0}),
        act("relu6", {"type": "relu6"}, "relu6; inputs exactly 0 and 6 (kinks: relu6' = 0 "
            "there, as torch)", {0: 0.0, 1: 6.0, 2: 7.5, 3: -1.0, 4: 5.5}),
        act("hardsigmoid", {"type": "hardsigmoid"}, "hardsigmoid relu6(z + 3)/6; inputs exactly "
            "−3 and 3 (kinks: hardsigmoid' = 0 there, as torch)",
            {0: -3.0, 1: 3.0, 2: -4.0, 3: 4.5, 4: 2.5}),
        act("hardswish", {"type": "hardswish"}, "hardswish z·relu6(z + 3)/6; inputs exactly −3 "
            "and 3 (kinks: hardswish' = 0 at −3 and 1 at 3, as torch)",
            {0: -3.0, 1: 3.0, 2: -4.0, 3: 4.5, 4: 2.5, 5: -2.0}),
        act("celu", {"type": "celu", "alpha": 1.25}, "celu(alpha 1.25); inputs 0 and −3",
            {0: 0.0, 1: -3.0}),
        act("softsign", {"type": "softsign"}, "softsign z/(1 + |z|); inputs 0, 50, −50",
            {0: 0.0, 1: 50.0, 2: -50.0}),
        act("logsigmoid", {"type": "logsigmoid"}, "logsigmoid log σ(z); inputs −40, 40, 0",
            {0: -40.0, 1: 40.0, 2: 0.0}),
        act("gelu-tanh", {"type": "gelu", "approximate": "tanh"},
            "gelu(approximate tanh); inputs −8, 8, 0", {0: -8.0, 1: 8.0, 2: 0.0}),
        Case("groupnorm", "GroupNorm 2 groups of 2 channels on (4, 2, 2), weight and bias set",
             _op({"type": "groupnorm", "num_groups": 2}, [4, 2, 2]),
             params_special={"0.weight": [0.5, -1.5, 2.0, 1.25],
                             "0.bias": [0.25, -0.75, 1.0, 0.0]}),
        Case("groupnorm-no-affine", "GroupNorm 2 groups of 3 on (N, C) = (2, 6), affine false",
             _op({"type": "groupnorm", "num_groups": 2, "affine": False}, [6])),
        Case("instancenorm2d-train", "InstanceNorm2d in train mode (instance statistics), affine, "
             "tracking running statistics, 3 channels of 2×3",
             _op({"type": "instancenorm2d", "affine": True, "track_running_stats": True},
                 [3, 2, 3]),
             params_special={"0.weight": [1.5, -0.5, 0.75], "0.bias": [0.5, 0.25, -1.0]}),
        Case("instancenorm2d-eval", "InstanceNorm2d in eval mode with running statistics "
             "(an affine map), 3 channels of 2×2",
             _op({"type": "instancenorm2d", "affine": True, "track_running_stats": True},
                 [3, 2, 2]), mode="eval",
             params_special={"0.weight": [1.5, -0.5, 0.75], "0.bias": [0.5, 0.25, -1.0],
                             "0.running_mean": [0.3, -0.2, 0.1],
                             "0.running_var": [0.5, 2.0, 1.5]}),
    ]


def loss_option_cases() -> List[Case]:
    """The issue-18 losses and their options, by torch's names: reduction "none" with a seeded
    upstream vector, l1, smooth_l1 and huber with differences placed on their kinks (d = 0,
    |d| = β, δ), BCE's weight and pos_weight, cross-entropy's class weights, ignored labels,
    label smoothing, class probabilities and (N, C, d…) logits, nll. The loss takes x itself
    (one identity layer), so grads/x is ∂L/∂z; one CNN takes cross-entropy over (N, C, H, W)."""
    def loss(name, description, input_shape, config, batch=3, **kw):
        spec = {"input_shape": input_shape, "seed": 21, "batch": batch,
                "layers": [{"type": "identity"}], "loss": config}
        return Case(name, description, spec, upstream="loss", **kw)
    weight3 = [0.5, 2.0, 1.25]
    weight4 = [0.5, 2.0, 1.25, 0.75]
    return [
        loss("loss-mse-none", "mse, reduction none: the gradient of Σ upstream·ℓ, upstream "
             "seeded", [4], {"type": "mse", "reduction": "none"}),
        loss("loss-l1", "l1 (mean); d = 0 at two elements (kinks: l1' = sign(0) = 0, as torch)",
             [3], {"type": "l1"}, batch=2, x_special={0: 0.5, 4: -1.25},
             y_values=[0.5, 0.25, -0.5, 1.0, -1.25, 0.75]),
        loss("loss-smooth_l1", "smooth_l1, beta 0.5, reduction sum; d = 0.5, −0.5 (the pieces "
             "meet: ∂ = ±1) and both sides", [3], {"type": "smooth_l1", "beta": 0.5,
                                                    "reduction": "sum"}, batch=2,
             x_special={0: 1.0, 1: 0.0, 2: 0.25, 3: 2.0, 4: -1.0, 5: 0.125},
             y_values=[0.5, 0.5, 0.0, 0.0, -2.0, 0.0]),
        loss("loss-smooth_l1-beta0", "smooth_l1, beta 0 (torch: l1_loss); d = 0 at one element "
             "(kink: sign(0) = 0)", [3], {"type": "smooth_l1", "beta": 0.0}, batch=2,
             x_special={2: 0.75}, y_values=[0.0, 1.0, 0.75, -0.5, 0.25, 2.0]),
        loss("loss-huber", "huber, delta 0.75; d = 0.75, −0.75 (the pieces meet: ∂ = ±δ) and "
             "both sides", [3], {"type": "huber", "delta": 0.75}, batch=2,
             x_special={0: 1.0, 1: 0.0, 2: 3.0, 3: -0.5, 4: 0.5, 5: 0.0},
             y_values=[0.25, 0.75, 0.0, 0.0, 0.0, 0.0]),
        loss("loss-bce-weight-pos_weight", "bce_with_logits, weight (4,) and pos_weight (4,), "
             "soft targets", [4], {"type": "bce_with_logits", "weight": weight4,
                                   "pos_weight": [3.0, 0.5, 1.0, 2.5]},
             y_values=[0.0, 1.0, 0.25, 0.75, 1.0, 0.0, 0.5, 1.0, 0.125, 0.0, 1.0, 0.625]),
        loss("loss-bce-none", "bce_with_logits, pos_weight 2.5 (a scalar), reduction none",
             [4], {"type": "bce_with_logits", "pos_weight": 2.5, "reduction": "none"}),
        loss("loss-cross_entropy-weight-ignore", "cross_entropy, class weights, one label "
             "ignore_index −100: the mean divides by Σ w[y] of the others", [3],
             {"type": "softmax_cross_entropy", "weight": weight3}, batch=4,
             y_values=[2, -100, 0, 1]),
        loss("loss-cross_entropy-label_smoothing", "cross_entropy, label_smoothing 0.2 with "
             "class weights (torch weighs the smoothing term too)", [3],
             {"type": "softmax_cross_entropy", "weight": weight3, "label_smoothing": 0.2},
             batch=4, y_values=[2, 1, 0, 1]),
        loss("loss-cross_entropy-probabilities", "cross_entropy on class probabilities, class "
             "weights, label_smoothing 0.1: the mean divides by N", [3],
             {"type": "softmax_cross_entropy", "weight": weight3, "label_smoothing": 0.1},
             y_values=[0.25, 0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 0.375, 0.625]),
        loss("loss-cross_entropy-spatial", "cross_entropy over (N, C, d1, d2) = (2, 3, 2, 2) "
             "logits, labels (N, d1, d2) with one ignored: the mean divides by the 7 others",
             [3, 2, 2], {"type": "softmax_cross_entropy"}, batch=2,
             y_values=[0, 2, 1, 1, 2, -100, 0, 1]),
        loss("loss-cross_entropy-spatial-none", "cross_entropy over (N, C, d) = (3, 3, 2), "
             "class weights, reduction none: ℓ (N, d), its upstream seeded", [3, 2],
             {"type": "softmax_cross_entropy", "weight": weight3, "reduction": "none"}),
        loss("loss-nll", "nll on log-probabilities, class weights, ignore_index 1, reduction "
             "sum", [3], {"type": "nll", "weight": weight3, "ignore_index": 1,
                          "reduction": "sum"}, batch=4, y_values=[2, 1, 0, 2]),
        loss("loss-nll-spatial", "nll over (N, C, d) = (2, 3, 4), mean with one label ignored",
             [3, 4], {"type": "nll"}, batch=2, y_values=[0, 1, 2, -100, 2, 2, 1, 0]),
        Case("net-cnn-segmentation", "conv 3×3 (padding 1) → tanh → conv 1×1 to 3 classes, "
             "cross_entropy per pixel with class weights",
             {"input_shape": [2, 3, 3], "seed": 22, "batch": 2,
              "loss": {"type": "softmax_cross_entropy", "weight": weight3},
              "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
                         {"type": "tanh"},
                         {"type": "conv2d", "out_channels": 3, "kernel_size": 1}]},
             upstream="loss"),
    ]


def convention_cases() -> List[Case]:
    """Issue 15: inputs placed where a pinned convention of spec/operations.md decides the
    numbers, so that each convention, changed, fails some vector (spec/vectors.md lists which):
    leaky_relu, prelu and elu exactly at 0 (kinks: f′(0) = slope, a, α, torch's — JAX's
    leaky_relu takes 1 there), average pooling with padding counted and not counted
    (count_include_pad, without ceil mode), softplus exactly at its threshold (βz = threshold:
    torch's test βz > threshold keeps the smooth branch there; a kink) and above it (the linear
    branch: σ(βz) ≠ 1 visibly in float32 for βz = 12), and sigmoid and tanh saturated (±40,
    ±800: exp(800) overflows float64, so a form that forms exp(−z) for z < 0 returns inf/inf)."""
    at_zero = lambda name, layer, description: Case(                   # noqa: E731
        name, description, _op(layer, [5]), x_special={0: 0.0, 3: 0.0, 6: 0.0})
    saturated = {0: 40.0, 1: -40.0, 2: 800.0, 3: -800.0, 5: 20.0, 6: -20.0}
    return [
        at_zero("leaky_relu-zero", {"type": "leaky_relu", "slope": 0.02},
                "leaky_relu(slope 0.02); three inputs exactly 0 (kinks: f′(0) = slope, as torch)"),
        Case("prelu-zero", "prelu, one slope per channel, on (N, 3, 2); three inputs exactly "
             "0 (kinks: f′(0) = a, and ∂L/∂a gets 0·dy there, as torch)",
             _op({"type": "prelu", "num_parameters": 3}, [3, 2]),
             x_special={0: 0.0, 3: 0.0, 6: 0.0}, params_special={"0.weight": [0.25, -0.5, 1.5]}),
        at_zero("elu-zero", {"type": "elu", "alpha": 1.3},
                "elu(alpha 1.3); three inputs exactly 0 (kinks: f′(0) = α, as torch)"),
        Case("avgpool2d-pad", "AvgPool2d 3×3, stride 2, padding 1 on 5×5, count_include_pad "
             "true: every border window divides by 9, padding counted",
             _op({"type": "avgpool2d", "kernel_size": 3, "stride": 2, "padding": 1}, [2, 5, 5])),
        Case("avgpool2d-pad-exclude", "AvgPool2d 3×3, stride 2, padding 1 on 5×5, "
             "count_include_pad false: a corner window divides by 4, an edge one by 6",
             _op({"type": "avgpool2d", "kernel_size": 3, "stride": 2, "padding": 1,
                  "count_include_pad": False}, [2, 5, 5])),
        Case("softplus-threshold", "softplus(beta 2, threshold 10); inputs 5 (βz = threshold "
             "exactly: the smooth branch, torch's βz > threshold; kink), 6 and 40 (linear "
             "branch), −40, 4.75",
             _op({"type": "softplus", "beta": 2.0, "threshold": 10.0}, [5]),
             x_special={0: 5.0, 1: 6.0, 2: 40.0, 3: -40.0, 4: 4.75}),
        Case("sigmoid-saturated", "sigmoid saturated: inputs ±40, ±800, ±20",
             _op({"type": "sigmoid"}, [5]), x_special=saturated),
        Case("tanh-saturated", "tanh saturated: inputs ±40, ±800, ±20",
             _op({"type": "tanh"}, [5]), x_special=saturated),
    ]


def recurrent_cases() -> List[Case]:
    """Issue 16: the three recurrent cells as torch's nn.RNN/LSTM/GRU (batch first), each with
    its options changing the numbers — two layers (layer 1 reads layer 0's sequence), relu and
    no bias, the last step only — and a whole net, an LSTM feeding a GRU."""
    seq = lambda layer, seed: {"input_shape": [4, 2], "seed": seed, "batch": 2,   # noqa: E731
                               "layers": [layer], "loss": {"type": "mse"}}
    return [
        Case("rnn", "RNN (tanh), 2 layers, hidden 3, on (N, T = 4, F = 2); the output sequence",
             seq({"type": "rnn", "hidden_size": 3, "num_layers": 2}, 21)),
        Case("rnn-relu-last", "RNN (relu), hidden 3, no bias, on (N, 4, 2); the last step's "
             "output (N, H)", seq({"type": "rnn", "hidden_size": 3, "nonlinearity": "relu",
                                   "bias": False, "output": "last"}, 22)),
        Case("lstm", "LSTM, 2 layers, hidden 3, on (N, 4, 2): gates i, f, g, o; the output "
             "sequence", seq({"type": "lstm", "hidden_size": 3, "num_layers": 2}, 23)),
        Case("gru", "GRU, hidden 3, on (N, 4, 2): gates r, z, n, torch's n = tanh(W_in x + b_in "
             "+ r ⊙ (W_hn h + b_hn)); the output sequence",
             seq({"type": "gru", "hidden_size": 3}, 24)),
        Case("net-lstm-gru", "LSTM 2 → 4 (sequence) feeding a GRU 4 → 3 (last step), then "
             "Linear 3 → 2, mse",
             {"input_shape": [5, 2], "seed": 25, "batch": 2, "loss": {"type": "mse"},
              "layers": [{"type": "lstm", "hidden_size": 4},
                         {"type": "gru", "hidden_size": 3, "output": "last"},
                         {"type": "dense", "out": 2}]}, upstream="loss"),
    ]


# --- exact values -------------------------------------------------------------------------

def round_exact(value: Fraction, fmt: str) -> float:
    """``value`` rounded once to ``fmt`` (float64/float32/fp16), to nearest, ties to even."""
    precision, emin, largest = GRIDS[fmt]
    if value == 0:
        return 0.0
    e = abs(value).numerator.bit_length() - abs(value).denominator.bit_length()
    while Fraction(2) ** e > abs(value):           # e = floor(log2 |value|)
        e -= 1
    while Fraction(2) ** (e + 1) <= abs(value):
        e += 1
    quantum = Fraction(2) ** (max(e, emin) - (precision - 1))
    rounded = round(value / quantum) * quantum       # Python's round: half to even
    if abs(rounded) > largest:
        return math.copysign(math.inf, value)
    return float(rounded)


def round_up(value: float, digits: int = TOLERANCE_DIGITS) -> float:
    """``value`` rounded up to ``digits`` significant decimal digits (exactly, in rationals).

    The error analysis behind a tolerance runs in float64 through numpy's matmul, whose order of
    summation is the BLAS kernel's (OpenBLAS picks one per CPU): its last bits differ between
    machines (measured: ``OPENBLAS_CORETYPE=Prescott`` against SkylakeX changes two of the
    23 files). Two digits, rounded up, keep a tolerance a bound (loosened by at most 10 %) and make
    it the same number on every machine, but for a value within ~1e-15 of a two-digit boundary.
    """
    if not math.isfinite(value) or value <= 0:
        return value
    exact = Fraction(value)
    exponent = math.floor(math.log10(value)) - (digits - 1)
    while exact >= Fraction(10) ** (exponent + digits):      # log10 rounded across a power of 10
        exponent += 1
    while exact < Fraction(10) ** (exponent + digits - 1):
        exponent -= 1
    quantum = Fraction(10) ** exponent
    return float(math.ceil(exact / quantum) * quantum)


def _decimal(v, ctx) -> str:
    """``v`` to ``DIGITS`` significant digits — or more, where that many would round to another
    float64, float32 or fp16 number than ``v`` itself: a value at (or within 10⁻³⁰ of) a rounding
    tie, such as an average of two float64 numbers that needs 54 bits. Its digits then run on
    until the decimal rounds as the exact value does in every format (a dyadic tie has a finite
    decimal expansion, so this ends)."""
    if v == 0:
        return "0"
    text = ctx.nstr(v, DIGITS, min_fixed=1, max_fixed=0, strip_zeros=False)
    exact = fraction_of(v)
    digits = DIGITS
    while not _rounds_alike(Fraction(text), exact):
        digits += 1
        text = _scientific(exact, digits)
    return text


def _rounds_alike(a: Fraction, b: Fraction) -> bool:
    return all(round_exact(a, fmt) == round_exact(b, fmt) for fmt in ROUNDED)


def _scientific(value: Fraction, digits: int) -> str:
    """``value`` rounded (half even) to ``digits`` significant digits, written as mpmath's nstr
    writes them (``-1.2345e-5``; no exponent for 1 ≤ |value| < 10), computed exactly."""
    sign = "-" if value < 0 else ""
    value = abs(value)
    exponent = len(str(value.numerator // value.denominator)) - 1 if value >= 1 else \
        -len(str(value.denominator // value.numerator))
    while Fraction(10) ** exponent > value:
        exponent -= 1
    while Fraction(10) ** (exponent + 1) <= value:
        exponent += 1
    mantissa = round(value / Fraction(10) ** (exponent - digits + 1))      # half to even
    if mantissa >= 10 ** digits:                                            # 9.99… rounded up
        mantissa //= 10
        exponent += 1
    body = str(mantissa)
    text = f"{sign}{body[0]}.{body[1:]}"
    return text if exponent == 0 else f"{text}e{'+' if exponent > 0 else '-'}{abs(exponent)}"


def _tensor_in(a) -> dict:
    a = np.asarray(a, dtype=np.float64)
    return {"shape": list(a.shape), "hex": [float(v).hex() for v in a.ravel()]}


def _tensor_from(t) -> np.ndarray:
    return np.array([float.fromhex(h) for h in t["hex"]], dtype=np.float64).reshape(t["shape"])


# Which rule produced a tensor's tolerance (stored beside it as "rule"; spec/vectors.md).
RULE_ANALYSIS = (f"ulps {ULPS}: the final rounding of each side; abs: {LAMBDA:g}σ of the float64 "
                 f"error analysis of the same computation at the tensor's worst element, scaled "
                 f"by u_d/u_64, rounded up to {TOLERANCE_DIGITS} digits")
RULE_EXACT = (f"ulps {ULPS}: the final rounding of each side; abs 0: the error analysis finds no "
              f"rounding error that is not the result's own (σ = 0)")


def _reference_zeros(exact, bound, ctx) -> np.ndarray:
    """The elements that are 0 to the reference's own accuracy: |v| at most the rigorous error
    bound of the float64 run (``BOUND``'s e) scaled from u_64 to the mp run's unit roundoff
    2^−prec — the same computation, run with that unit roundoff, can err that much, so such a v
    cannot be told from 0 (the gradient of a bias before a BatchNorm: exactly 0 in exact
    arithmetic, a ±2e-52 residue at 50 digits). They are stored as exactly 0."""
    flat = np.asarray(exact, dtype=object).ravel()
    if bound is None:
        return np.zeros(flat.size, dtype=bool)
    scale = 2.0 ** -ctx.prec / UNIT_ROUNDOFF["float64"]
    e = np.broadcast_to(np.asarray(bound.e, dtype=np.float64), np.asarray(exact).shape).ravel()
    return np.array([v != 0 and bool(abs(v) <= ctx.mpf(float(b)) * scale)
                     for v, b in zip(flat, e)], dtype=bool)


def _reference(exact, bound, ctx, kink=None) -> dict:
    zeros = _reference_zeros(exact, bound, ctx)
    flat = [ctx.zero if z else v for v, z in zip(np.asarray(exact, dtype=object).ravel(), zeros)]
    fractions = [fraction_of(v) for v in flat]
    record = {"shape": list(np.asarray(exact, dtype=object).shape),
              "value": [_decimal(v, ctx) for v in flat]}
    for fmt in ROUNDED:
        record[fmt] = [round_exact(f, fmt).hex() for f in fractions]
    sigma = float(np.max(bound.sigma)) if bound is not None and np.asarray(bound.v).size else 0.0
    record["tolerance"] = {fmt: {"ulps": ULPS, "abs": round_up(LAMBDA * sigma * UNIT_ROUNDOFF[fmt]
                                                               / UNIT_ROUNDOFF["float64"])}
                           for fmt in ROUNDED}
    record["tolerance"]["rule"] = RULE_ANALYSIS if sigma > 0 else RULE_EXACT
    if kink is not None and np.any(kink):
        record["kink"] = [bool(k) for k in np.asarray(kink).ravel()]
    return record


def _inputs(case: Case, model: Model):
    params = model.init_params()
    x, y = model.default_data()
    for index, value in case.x_special.items():
        x.flat[index] = value
    for name, values in case.params_special.items():
        params[name] = np.array(values, dtype=np.float64).reshape(params[name].shape)
    if case.y_values is not None:
        values = np.array(case.y_values)
        labels = model.loss.vector_shape(x.shape[0])      # class labels, or one per element
        y = values.reshape(labels if values.size == int(np.prod(labels))
                           else (x.shape[0],) + model.output_shape)
    if model.loss.reduction == "none":
        # The upstream gradient of the loss vector: seeded, as dy is for op vectors.
        shape = model.loss.vector_shape(x.shape[0])
        upstream = np.random.default_rng(case.spec.get("seed", 0) + 2000).standard_normal(shape)
        y = Targets(y, upstream)
    return params, x, y


# Where the issue-18 activations' pieces meet (their values there are torch's conventions).
KINK_POINTS = {"hardtanh": lambda c: (c["min_val"], c["max_val"]),
               "relu6": lambda c: (0.0, 6.0),
               "hardsigmoid": lambda c: (-3.0, 3.0), "hardswish": lambda c: (-3.0, 3.0)}


# Where a loss's derivative is a convention: |d|'s at d = 0 (sign(0) = 0, torch's). smooth_l1
# and huber are C¹ at |d| = β, δ: both pieces give the same derivative there, no convention.
LOSS_KINK_POINTS = {"l1": lambda c: (0.0,),
                    "smooth_l1": lambda c: (0.0,) if c["beta"] == 0 else None}


def _kinks(case: Case, model: Model, x, y=None) -> Optional[np.ndarray]:
    """Elements of x where the op's derivative sits exactly on a kink (a loss's: where the
    loss takes x itself, through one identity layer)."""
    if case.upstream == "loss" and [layer.type for layer in model.layers] == ["identity"]:
        at = LOSS_KINK_POINTS.get(model.loss.type, lambda c: None)(model.loss.config)
        return None if at is None else np.isin(x - np.asarray(split_targets(y)[0]), at)
    kind = model.layers[0].type if case.upstream == "given" else None
    if kind in KINK_POINTS:
        return np.isin(x, KINK_POINTS[kind](model.layers[0].config))
    if kind in ("relu", "leaky_relu", "prelu", "elu", "selu"):
        return x == 0
    if kind == "softplus":
        # torch's branch test βz > threshold, at equality (decided exactly: both are float64).
        c = model.layers[0].config
        at = [Fraction(float(c["beta"])) * Fraction(float(v)) == Fraction(float(c["threshold"]))
              for v in np.ravel(x)]
        return np.array(at, dtype=bool).reshape(x.shape)
    if kind in ("maxpool2d", "adaptive_maxpool2d"):
        return _window_ties(model.layers[0].windows, x)
    return None


def _window_ties(windows, x) -> np.ndarray:
    """The inputs tied for the maximum of some max-pool window (any geometry: padding, dilation,
    ceil mode, adaptive windows): there the gradient's route is a convention (the first)."""
    n, c, hgt, wid = x.shape
    flat = x.reshape(n, c, hgt * wid)
    values = np.where(windows.valid, flat[:, :, windows.flat], -np.inf)        # (N, C, K, L)
    top = (values == values.max(axis=2, keepdims=True)) & windows.valid
    tied = top & (top.sum(axis=2, keepdims=True) > 1)
    out = np.zeros((n, c, hgt * wid), dtype=bool)
    for a, ch, k, pos in zip(*np.nonzero(tied)):
        out[a, ch, windows.flat[k, pos]] = True
    return out.reshape(x.shape)


def compute(case: Case, params=None, x=None, y=None, dy=None) -> dict:
    """The vector of one case: from the case's seeded inputs, or from the given ones (check)."""
    model = Model(case.spec)
    if params is None:
        params, x, y = _inputs(case, model)
    train = case.mode == "train"
    mp = MPBackend(DPS)
    record = {"format": FORMAT, "name": case.name, "description": case.description,
              "model": case.spec, "mode": case.mode, "upstream": case.upstream}
    learnable = list(model.param_shapes())
    if case.upstream == "loss":
        exact = model.loss_and_grads(mp, params, x, y, ForwardState(train=train))
        bound = model.loss_and_grads(BOUND, params, x, y, ForwardState(train=train))
        outputs = {"output": _reference(exact.forward.output, bound.forward.output, mp.ctx),
                   "loss": _reference(np.asarray(exact.loss, dtype=object).reshape(1),
                                      _as_vector(bound.loss), mp.ctx)}
        grads_mp, grads_b = exact.params, bound.params
        dx_mp, dx_b = exact.x, bound.x
        target, upstream = split_targets(y)
        inputs = {"x": _tensor_in(x), "y": _labels_or_tensor(target)}
        if upstream is not None:                 # reduction "none": ℓ itself, and its upstream
            inputs["upstream"] = _tensor_in(upstream)
            outputs["loss"] = _reference(model.loss.unreduced(mp, exact.forward.output, y),
                                         model.loss.unreduced(BOUND, bound.forward.output, y),
                                         mp.ctx)
    else:
        if dy is None:
            dy = np.random.default_rng(case.spec.get("seed", 0) + 1000).standard_normal(
                (x.shape[0],) + model.output_shape)
        results = {}
        for bk in (mp, BOUND):
            tensors = {k: bk.asarray(v) for k, v in params.items()}
            out, caches = model.net.forward(bk, tensors, bk.asarray(x), ForwardState(train=train))
            dx, grads = model.net.backward(bk, tensors, bk.asarray(dy), caches)
            results[bk.name] = (out, dx, grads)
        out_mp, dx_mp, grads_mp = results[mp.name]
        out_b, dx_b, grads_b = results[BOUND.name]
        outputs = {"output": _reference(out_mp, out_b, mp.ctx)}
        inputs = {"x": _tensor_in(x), "dy": _tensor_in(dy)}
    record["inputs"] = inputs
    record["params"] = {k: _tensor_in(v) for k, v in params.items()}
    record["outputs"] = outputs
    grads = {k: _reference(grads_mp[k], grads_b[k], mp.ctx) for k in learnable}
    grads["x"] = _reference(dx_mp, dx_b, mp.ctx, _kinks(case, model, x, y))
    record["grads"] = grads
    return record


def _as_vector(b: BoundArray) -> BoundArray:
    """A 0-d bound (the loss) as one element, like the loss's stored reference."""
    return BoundArray(np.reshape(b.v, (1,)), np.reshape(b.e, (1,)), np.reshape(b.s2, (1,)))


def _labels_or_tensor(y):
    y = np.asarray(y)
    if y.dtype.kind in "iu":
        return {"shape": list(y.shape), "labels": [int(v) for v in y.ravel()]}
    return _tensor_in(y)


def _labels_or_tensor_from(t):
    if "labels" in t:
        return np.array(t["labels"], dtype=np.int64).reshape(t["shape"])
    return _tensor_from(t)


def write(directory) -> List[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for case in cases():
        path = out / f"{case.name}.json"
        path.write_text(json.dumps(compute(case), indent=1) + "\n")
        written.append(path)
    return written


def load(path) -> dict:
    """A vector file, with plain json (no pickle, no code)."""
    with open(path) as f:
        record = json.load(f)
    if record.get("format") != FORMAT:
        raise ValueError(f"vectors: {path} is not a {FORMAT} file (format "
                         f"{record.get('format')!r})")
    return record


def case_of(record: dict) -> Case:
    return Case(record["name"], record["description"], record["model"], record["upstream"],
                record["mode"])


def stored_inputs(record: dict):
    params = {k: _tensor_from(v) for k, v in record["params"].items()}
    x = _tensor_from(record["inputs"]["x"])
    y = _labels_or_tensor_from(record["inputs"]["y"]) if "y" in record["inputs"] else None
    if "upstream" in record["inputs"]:
        y = Targets(y, _tensor_from(record["inputs"]["upstream"]))
    dy = _tensor_from(record["inputs"]["dy"]) if "dy" in record["inputs"] else None
    return params, x, y, dy


def records(directory):
    """(path, record) of every vector file in ``directory``, in name order."""
    files = sorted(Path(directory).glob("*.json"))
    if not files:
        raise ValueError(f"vectors: no *.json vector files in {directory}")
    return [(path, load(path)) for path in files]


def check(directory) -> List[str]:
    """Recompute every vector in ``directory`` from its stored inputs and compare the whole
    record, field by field: the list of drifts (empty: every stored field — digits, rounded
    values, tolerances, kink flags, shapes, the model, the inputs as hex — is what ``compute``
    gives now). One line per drifted leaf, naming the file, the field and both values."""
    generator = {c.name: c for c in cases()}
    problems = []
    for path, record in records(directory):
        try:
            params, x, y, dy = stored_inputs(record)
            again = compute(case_of(record), params, x, y, dy)
        except KeyError as e:
            raise ValueError(f"vectors: {path}: the field {e} is missing") from None
        case = generator.get(record["name"])
        if case is not None:
            # A committed case: its description, model, mode and upstream are the generator's
            # (recomputing from the file alone would take an edited model as given).
            for key, value in (("description", case.description), ("model", case.spec),
                               ("mode", case.mode), ("upstream", case.upstream)):
                again[key] = value
        problems += [f"{path.name}: {where} {what}" for where, what in _drifts(record, again)]
    return problems


def _drifts(stored, again, where=()):
    """(field, description) of every leaf where ``stored`` and ``again`` differ; a list is one
    leaf (its first differing element is named), so a drifted tensor is one line."""
    if isinstance(stored, dict) and isinstance(again, dict):
        out = []
        for key in list(stored) + [k for k in again if k not in stored]:
            if key not in again:
                out.append((_field(where + (key,)), "is stored but no longer computed"))
            elif key not in stored:
                out.append((_field(where + (key,)), f"is computed ({_short(again[key])}) but "
                                                    f"not stored"))
            else:
                out += _drifts(stored[key], again[key], where + (key,))
        return out
    if isinstance(stored, list) and isinstance(again, list) and len(stored) == len(again):
        for i, (a, b) in enumerate(zip(stored, again)):
            if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
                inner = _drifts(a, b, where + (i,))
                if inner:
                    return inner
            elif not _same(a, b):
                return [(f"{_field(where)}[{i}]", f"stored {a!r} recomputed {b!r}")]
        return []
    if _same(stored, again):
        return []
    return [(_field(where), f"stored {_short(stored)} recomputed {_short(again)}")]


def _same(a, b) -> bool:
    """Equal as JSON values: 2 == 2.0 (json writes an integral float back as it was given), but
    True is not 1 and "1" is not 1."""
    number = lambda v: type(v) in (int, float)          # noqa: E731 (bool excluded)
    if number(a) and number(b):
        return a == b
    return type(a) is type(b) and a == b


def _field(where) -> str:
    """``grads/0.weight tolerance/fp16/abs``: the tensor, then the field inside it."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in where]
    if len(parts) >= 2 and where[0] in ("inputs", "params", "outputs", "grads"):
        head, rest = f"{parts[0]}/{parts[1]}", parts[2:]
        return head + (" " + "/".join(rest).replace("/[", "[") if rest else "")
    return "/".join(parts).replace("/[", "[")


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."
