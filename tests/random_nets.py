"""Random networks against torch: a generator of random refnet specs and the comparison of one
net's loss and gradients — refnet float64, the exact (mp) reference, torch float64 — used by
``test_random_nets_torch.py`` and, as a sweep, from the command line::

    PYTHONPATH=. python tests/random_nets.py --count 2000 --seed 0

What one comparison checks (``compare``):

- **masks**: the dropout masks refnet draws equal those drawn from spec/operations.md's text by
  an independent drawer (``test_dropout_residual.spec_masks``); torch runs with the *drawer's*
  masks, so a draw-order difference would also show as a gradient difference;
- **refnet**: the float64 loss and every gradient (parameters and x) lie within refnet's error
  bound, min(rigorous, 8σ) — the bound ``verify`` holds float64 to — of the 50-digit values;
- **torch** (optional): torch's float64 loss (the penalty added in torch, over the parameters the
  spec's ``regularization`` names, chosen here from the torch modules) and gradients lie within
  the same bound of the 50-digit values. torch rounds in another order, which the bound allows
  for; where it does not, the net is run again with torch's sigmoid, tanh and gelu (and the
  issue-18 activations: hardsigmoid's float32 1/6, celu, hardswish, softsign, silu, mish,
  logsigmoid, gelu-tanh) swapped for modules computing refnet's forms (``_accurate_forms``): a
  difference that goes away then is torch's s(1 − s), 1 − t², erf or constant
  ("explained"), one that stays is a semantic difference (a branch, a mask, a penalty term, a
  loss option, a convention) and counts as unexplained. The loss is built by the twin's
  ``torch_objective`` with the spec's options (Σ u·ℓ for reduction "none").
When float64 and mp lie on different sides of a kink (an input placed an ulp from softplus's
switch, where mp decides by its own exact product) the exact values are another branch's: then
torch is compared with refnet's float64 instead, within twice the bound (both err by at most
the bound from the values on float64's branch).

The generator covers dense and conv nets, every activation torch has (softplus with β and
threshold drawn, and inputs placed a few ulps from its switch), batchnorm, layernorm, pools,
dropout and dropout2d with p ∈ {0, ¼, ½, 1}, residual blocks nested two deep with identity or
projection shortcuts (with dropout of their own), the three losses and both reductions, train
and eval mode, and L1/L2 regularization over weights, all, a random list or an empty selection
(nets without any dense layer included). And issue 18's options: the activations silu, mish,
hardtanh (limits drawn), relu6, hardsigmoid, hardswish, celu (α drawn), softsign, logsigmoid and
gelu's tanh form; groupnorm (MLP and CNN) and instancenorm2d (affine, running statistics, eval);
max pooling with dilation and ceil_mode, average pooling with ceil_mode, count_include_pad and
divisor_override, adaptive pools (None in the size included); dense on (N, T, F) sequences;
CNNs that end on (N, C, H, W) (a 1×1 conv: a per-pixel loss); and every loss with its options
(``_loss``): mse, l1, smooth_l1 (β, 0 included), huber (δ), bce_with_logits (weight, pos_weight
broadcast), softmax_cross_entropy (class weights, ignored labels, ignore_index a class,
label smoothing, class probabilities, (N, C, d…)) and nll, reductions mean, sum and "none"
with a drawn upstream vector.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import reference_rounding
from test_dropout_residual import spec_masks  # noqa: E402

from refnet import BOUND, FLOAT64, Model, MPBackend  # noqa: E402
from refnet.losses import Targets  # noqa: E402
from refnet.verification.triangle import LAMBDA  # noqa: E402

ACTS = ["relu", "tanh", "sigmoid", "gelu", "selu", "identity", "leaky_relu", "elu", "prelu",
        "softplus"]
# issue 18's activations, drawn as often as the ones above together
NEW_ACTS = ["silu", "mish", "hardtanh", "relu6", "hardsigmoid", "hardswish", "celu", "softsign",
            "logsigmoid", "gelu-tanh"]


def _new_activation(rng):
    kind = NEW_ACTS[rng.integers(len(NEW_ACTS))]
    if kind == "gelu-tanh":
        return {"type": "gelu", "approximate": "tanh"}
    layer = {"type": kind}
    if kind == "hardtanh" and rng.random() < 0.7:
        low, high = [(-1.0, 1.0), (-0.5, 2.0), (0.0, 6.0), (-2.5, -0.25)][rng.integers(4)]
        layer.update(min_val=low, max_val=high)
    elif kind == "celu":
        layer["alpha"] = float(rng.choice([1.0, 0.5, 1.25, 2.0]))   # float32 numbers: torch's
    return layer                                                  # celu′ uses 1/float32(α)


def _activation(rng, channels=None):
    if rng.random() < 0.5:
        return _new_activation(rng)
    kind = ACTS[rng.integers(len(ACTS))]
    layer = {"type": kind}
    if kind == "leaky_relu":
        layer["slope"] = float(rng.choice([0.01, 0.2, 0.5]))
    elif kind == "elu":
        layer["alpha"] = float(rng.choice([1.0, 0.5, 1.7]))
    elif kind == "prelu" and channels and rng.random() < 0.5:
        layer["num_parameters"] = channels
    elif kind == "softplus":
        layer.update(_softplus_options(rng))
    return layer


def _softplus_options(rng):
    beta = float(rng.choice([1.0, 3.0, 1.7, 0.3, rng.uniform(0.2, 5.0)]))
    return {"beta": beta, "threshold": float(rng.choice([20.0, 1.0, 7.0, rng.uniform(0.5, 20)]))}


def _dropout(rng, kind="dropout"):
    return {"type": kind, "p": float(rng.choice([0.0, 0.25, 0.5, 1.0]))}


def _dense_body(rng, width, depth):
    body = [{"type": "dense", "out": width}, _activation(rng)]
    if rng.random() < 0.5:
        body.insert(int(rng.integers(len(body) + 1)), _dropout(rng))
    if depth < 2 and rng.random() < 0.35:
        body.append(_residual(rng, width, depth + 1, conv=False))
    return body


def _conv_body(rng, channels, depth):
    body = [{"type": "conv2d", "out_channels": channels, "kernel_size": int(rng.choice([1, 3])),
             "padding": "same"}, _activation(rng, channels)]
    if rng.random() < 0.5:
        body.insert(int(rng.integers(len(body) + 1)),
                    _dropout(rng, str(rng.choice(["dropout", "dropout2d"]))))
    if depth < 2 and rng.random() < 0.35:
        body.append(_residual(rng, channels, depth + 1, conv=True))
    return body


def _residual(rng, width, depth, conv):
    body = _conv_body(rng, width, depth) if conv else _dense_body(rng, width, depth)
    block = {"type": "residual", "body": body, "scale": float(rng.choice([1.0, 0.5, 2.0]))}
    if rng.random() < 0.4:
        proj = ({"type": "conv2d", "out_channels": width, "kernel_size": 1, "padding": "same"}
                if conv else {"type": "dense", "out": width, "bias": bool(rng.random() < 0.5)})
        block["shortcut"] = [proj] + ([_dropout(rng, "dropout2d" if conv else "dropout")]
                                      if rng.random() < 0.5 else [])
    return block


def _pool(rng, channels, side):
    """A pooling layer with torch's options drawn (dilation, ceil_mode, count_include_pad,
    divisor_override, adaptive sizes with None); one refnet refuses (a window of padding only,
    an empty output) is replaced by a plain 2×2 max pool."""
    r = rng.random()
    if r < 0.35:
        k = int(rng.choice([2, 3]))
        layer = {"type": "maxpool2d", "kernel_size": k, "stride": int(rng.choice([1, 2, k])),
                 "padding": int(rng.integers(0, k // 2 + 1)),
                 "dilation": int(rng.choice([1, 1, 2])), "ceil_mode": bool(rng.random() < 0.5)}
    elif r < 0.7:
        k = int(rng.choice([2, 3]))
        layer = {"type": "avgpool2d", "kernel_size": k, "stride": int(rng.choice([1, 2, k])),
                 "padding": int(rng.integers(0, k // 2 + 1)),
                 "ceil_mode": bool(rng.random() < 0.5),
                 "count_include_pad": bool(rng.random() < 0.6)}
        if rng.random() < 0.3:
            layer["divisor_override"] = int(rng.choice([1, 3, 5]))
    else:
        size = [int(rng.integers(1, side + 2)), int(rng.integers(1, side + 2))]
        if rng.random() < 0.25:
            size[int(rng.integers(2))] = None
        layer = {"type": str(rng.choice(["adaptive_avgpool2d", "adaptive_maxpool2d"])),
                 "output_size": size if rng.random() < 0.7 else size[0] or 1}
    try:
        Model({"input_shape": [channels, side, side], "layers": [layer], "loss": {"type": "mse"}})
    except ValueError:
        layer = {"type": "maxpool2d", "kernel_size": 2}
    return layer


def _group_norm(rng, channels):
    """groupnorm with groups of at least 2 channels where there are (one value per group
    normalizes to exactly 0: too small for float64, as spec/opinfo.md notes), else one group."""
    groups = [g for g in range(1, channels + 1) if channels % g == 0 and channels // g >= 2]
    layer = {"type": "groupnorm", "num_groups": int(rng.choice(groups or [1]))}
    if rng.random() < 0.3:
        layer["affine"] = False
    return layer


def _instance_norm(rng):
    layer = {"type": "instancenorm2d"}
    if rng.random() < 0.5:
        layer["affine"] = True
    if rng.random() < 0.5:
        layer["track_running_stats"] = True
        layer["momentum"] = float(rng.choice([0.1, 0.3]))
    return layer


def random_spec(rng: np.random.Generator) -> dict:
    """A random model spec (see the module docstring), its seed drawn from ``rng``."""
    batch = int(rng.integers(2, 5))
    shape_kind = rng.random()
    layers = []
    if shape_kind < 0.1:                               # no dense/conv layer at all
        width = int(rng.integers(2, 5))
        input_shape = [width]
        layers = [_activation(rng), _dropout(rng), _activation(rng)]
    elif shape_kind < 0.65:                            # an MLP, on vectors or (T, F) sequences
        width = int(rng.integers(2, 6))
        sequence = rng.random() < 0.25
        input_shape = ([int(rng.integers(2, 4))] if sequence else []) + [int(rng.integers(2, 6))]
        if rng.random() < 0.3:                         # softplus first: its inputs are x
            layers.append({"type": "softplus", **_softplus_options(rng)})
        layers.append({"type": "dense", "out": width})
        for _ in range(int(rng.integers(1, 4))):
            r = rng.random()
            if r < 0.3:
                layers.append(_residual(rng, width, 1, conv=False))
            elif r < 0.45:
                layers.append({"type": str(rng.choice(["batchnorm", "layernorm"]))})
            elif r < 0.5:
                layers.append(_group_norm(rng, input_shape[0] if sequence else width))
            elif r < 0.6:
                layers.append(_dropout(rng))
            else:
                layers += [{"type": "dense", "out": width}, _activation(rng)]
        if sequence and rng.random() < 0.5:
            layers.append({"type": "flatten"})
        layers.append({"type": "dense", "out": int(rng.integers(1, 4))})
    else:                                              # a small CNN
        channels = int(rng.integers(1, 4))
        side = int(rng.integers(3, 6))
        input_shape = [int(rng.integers(1, 3)), side, side]
        layers.append({"type": "conv2d", "out_channels": channels, "kernel_size": 3,
                       "padding": "same"})
        for _ in range(int(rng.integers(1, 3))):
            r = rng.random()
            if r < 0.4:
                layers.append(_residual(rng, channels, 1, conv=True))
            elif r < 0.5:
                layers.append({"type": "batchnorm"})
            elif r < 0.55:
                layers.append(_group_norm(rng, channels))
            elif r < 0.6:
                layers.append(_instance_norm(rng))
            elif r < 0.7:
                layers.append(_dropout(rng, "dropout2d"))
            else:
                layers.append(_activation(rng, channels))
        if side >= 4 and rng.random() < 0.5:
            layers.append({"type": str(rng.choice(["maxpool2d", "avgpool2d"])), "kernel_size": 2})
        elif rng.random() < 0.5:
            layers.append(_pool(rng, channels, side))
        r = rng.random()
        if r < 0.3:                                    # (N, C, H, W) out: a per-pixel loss
            layers.append({"type": "conv2d", "out_channels": int(rng.integers(1, 4)),
                           "kernel_size": 1, "padding": "same"})
        else:
            layers += ([{"type": "global_avgpool"}, {"type": "flatten"}] if r < 0.65
                       else [{"type": "flatten"}])
            layers.append({"type": "dense", "out": int(rng.integers(1, 4))})
    spec = {"input_shape": input_shape, "seed": int(rng.integers(2 ** 31)), "batch": batch,
            "layers": layers, "mode": "train" if rng.random() < 0.75 else "eval"}
    spec["loss"] = _loss(rng, Model({**spec, "loss": {"type": "mse"}}).output_shape)
    if rng.random() < 0.6:
        reg = {}
        for key in ("l1", "l2"):
            if rng.random() < 0.6:
                reg[key] = float(rng.choice([1e-3, 0.05, 0.3]))
        names = list(Model({**spec}).param_shapes())
        choice = rng.random()
        if choice < 0.3:
            reg["params"] = []
        elif choice < 0.5:
            reg["params"] = "all"
        elif choice < 0.7 and names:
            reg["params"] = [str(n) for n in rng.permutation(names)[:int(rng.integers(1, 3))]]
        spec["regularization"] = reg
    return spec


def _sample_weight(rng, out_shape):
    """A BCE weight that broadcasts against one sample: a number, the last axis, or the whole
    sample shape (values in [0.2, 3])."""
    shape = [(), out_shape[-1:], out_shape][rng.integers(3)]
    w = rng.uniform(0.2, 3.0, shape)
    return float(w) if not shape else w.tolist()


def _loss(rng, out_shape):
    """A loss for outputs of ``out_shape`` with its torch options drawn: class losses where
    there is a class axis of at least 2, elementwise ones always."""
    kinds = ["mse", "bce_with_logits", "l1", "smooth_l1", "huber"]
    if out_shape[0] >= 2:
        kinds += ["softmax_cross_entropy"] * 3 + ["nll"]
    loss = {"type": str(rng.choice(kinds)),
            "reduction": str(rng.choice(["mean", "sum", "none"]))}
    kind = loss["type"]
    if kind == "smooth_l1" and rng.random() < 0.7:
        loss["beta"] = float(rng.choice([0.5, 0.0, 2.0, 0.1]))
    elif kind == "huber" and rng.random() < 0.7:
        loss["delta"] = float(rng.choice([0.3, 2.0, 0.05]))
    elif kind == "bce_with_logits":
        for key in ("weight", "pos_weight"):
            if rng.random() < 0.4:
                loss[key] = _sample_weight(rng, out_shape)
    elif kind in ("softmax_cross_entropy", "nll"):
        if rng.random() < 0.4:
            loss["weight"] = rng.uniform(0.2, 3.0, out_shape[0]).tolist()
        if rng.random() < 0.2:
            loss["ignore_index"] = int(rng.integers(out_shape[0]))
        if kind == "softmax_cross_entropy" and rng.random() < 0.35:
            loss["label_smoothing"] = float(rng.choice([0.1, 0.25, 0.5, 1.0]))
    return loss


def random_data(model: Model, rng: np.random.Generator):
    """x ~ N(0, 1)·s for a random scale s, targets to fit the loss; if the first layer is
    softplus, a few inputs sit 0–2 ulps from its switch threshold/β. Class labels have some
    ignored ones (never all under a mean: torch's nan, refnet's error); cross-entropy takes
    class probabilities a third of the time (not with an ignore_index that is a class, which
    torch rejects); a "none" loss gets an N(0, 1) upstream vector (``Targets``)."""
    x = rng.standard_normal((model.batch,) + model.input_shape) * float(rng.choice([0.5, 1, 3]))
    first = model.layers[0]
    if first.type == "softplus":
        edge = first.config["threshold"] / first.config["beta"]
        flat = x.reshape(-1)
        for i in range(min(3, flat.size)):
            z = edge
            for _ in range(int(rng.integers(0, 3))):
                z = float(np.nextafter(z, np.inf if rng.random() < 0.5 else -np.inf))
            flat[i] = z
    loss = model.loss
    out = (model.batch,) + model.output_shape
    if loss.type in ("softmax_cross_entropy", "nll"):
        if (loss.type == "softmax_cross_entropy" and loss.ignore_index < 0
                and rng.random() < 1 / 3):
            t = rng.random(out) + 0.05
            y = t / t.sum(axis=1, keepdims=True)
        else:
            y = rng.integers(0, loss.classes, loss.vector_shape(model.batch))
            if rng.random() < 0.4:
                y.flat[rng.integers(y.size)] = loss.ignore_index
            if loss.reduction == "mean" and np.all(y == loss.ignore_index):
                y.flat[0] = (loss.ignore_index + 1) % loss.classes
    elif loss.type == "bce_with_logits":
        y = (rng.integers(0, 2, out).astype(np.float64) if rng.random() < 0.5
             else rng.random(out))
    else:
        y = rng.standard_normal(out)
    if loss.reduction == "none":
        y = Targets(y, rng.standard_normal(loss.vector_shape(model.batch)))
    return x, y


def _torch_penalty(torch, net, spec):
    """The spec's L1/L2 penalty computed in torch from the torch modules (independent of
    refnet's selection code): Σ over the names, in order, of α₁·Σ|w| + (α₂/2)·Σw²."""
    reg = spec.get("regularization")
    if not reg:
        return None
    l1, l2 = reg.get("l1", 0.0), reg.get("l2", 0.0)
    params = dict(net.named_parameters())
    selection = reg.get("params", "weights")
    if selection == "weights":
        names = [f"{m}.weight" for m, module in net.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    elif selection == "all":
        names = list(params)
    else:
        names = list(selection)
    total = torch.zeros((), dtype=torch.float64)
    for name in names:
        w = params[name]
        if l1:
            total = total + w.abs().sum() * l1
        if l2:
            total = total + (w * w).sum() * (l2 / 2)
    return total


def _accurate_forms(torch, net):
    """Swap the twin's sigmoid, tanh and gelu for torch modules computing refnet's forms (the
    derivatives from z, gelu through erfc): the diagnosis of a torch difference. If torch then
    agrees, the difference was torch's s(1 − s), 1 − t² or erf cancelling, not a semantic one."""
    inv_sqrt2, inv_sqrt_2pi = 0.7071067811865476, 0.3989422804014327

    def function(forward, derivative):
        class Accurate(torch.autograd.Function):
            @staticmethod
            def forward(ctx, z):
                ctx.save_for_backward(z)
                return forward(z)

            @staticmethod
            def backward(ctx, g):
                (z,) = ctx.saved_tensors
                return g * derivative(z)

        class Module(torch.nn.Module):
            def forward(self, z):
                return Accurate.apply(z)
        return Module

    def d_sigmoid(z):
        e = torch.exp(-z.abs())
        return e / ((1 + e) * (1 + e))

    def d_tanh(z):
        e = torch.exp(-z.abs())
        return 4 * (e * e) / ((1 + e * e) * (1 + e * e))

    def d_gelu(z):
        zc = z.clamp(-40, 40)
        return 0.5 * torch.special.erfc(-z * inv_sqrt2) + zc * inv_sqrt_2pi * torch.exp(
            -0.5 * (zc * zc))

    swaps = {torch.nn.Sigmoid: function(torch.sigmoid, d_sigmoid),
             torch.nn.Tanh: function(torch.tanh, d_tanh),
             torch.nn.GELU: function(lambda z: (z * 0.5) * torch.special.erfc(-z * inv_sqrt2),
                                     d_gelu)}
    swaps.update(_accurate_issue18_forms(torch, function))
    for module in list(net.modules()):
        for name, child in module.named_children():
            kind = type(child)
            if kind is torch.nn.GELU and child.approximate == "tanh":
                kind = "gelu-tanh"
            elif kind is torch.nn.CELU:
                setattr(module, name, swaps[kind](child.alpha)())
                continue
            if kind in swaps:
                setattr(module, name, swaps[kind]())
    return net


def _accurate_issue18_forms(torch, function):
    """refnet's forms of the issue-18 activations where torch's lose accuracy or use another
    constant (spec/operations.md, "Where refnet differs from torch"): hardsigmoid′ = 1/6 (torch:
    float32(1/6)), celu′ = exp(z/α) (torch: 1/float32(α)), hardswish = z for z ≥ 3 (torch:
    z·6/6), softsign′ = (1/(1 + |z|))², gelu-tanh as z·σ(w), silu, mish and logsigmoid from
    e = exp(−|z|)."""
    kappa, beta = 0.044715, (2 / np.pi) ** 0.5

    def sigma(z):
        e = torch.exp(-z.abs())
        return torch.where(z >= 0, 1 / (1 + e), e / (1 + e))

    def mish_parts(z):
        e = torch.exp(-z.abs())
        pos = z >= 0
        num = torch.where(pos, 1 + 2 * e, e * (e + 2))
        den = torch.where(pos, 1 + 2 * e + 2 * e * e, e * (e + 2) + 2)
        w = torch.where(pos, 4 * (e * e) * (1 + e), 4 * e * (1 + e))
        return num / den, w / (den * den)

    def gelu_tanh_parts(z):
        zc = z.clamp(-1e10, 1e10)
        w = 2 * beta * (zc + kappa * zc ** 3)
        dw = 2 * beta * (1 + 3 * kappa * zc * zc)
        e = torch.exp(-w.abs())
        return sigma(w), dw * e / ((1 + e) * (1 + e))

    def celu(alpha):
        return function(lambda z: torch.where(z > 0, z, alpha * torch.expm1(z / alpha)),
                        lambda z: torch.where(z > 0, torch.ones_like(z), torch.exp(z / alpha)))

    def hardswish(z):
        zc = torch.minimum(z, torch.full_like(z, 3.0))
        return torch.where(z >= 3, z, zc * (zc + 3).clamp(0, 6) / 6)

    def d_hardswish(z):
        return torch.where(z <= -3, torch.zeros_like(z),
                           torch.where(z >= 3, torch.ones_like(z), z / 3 + 0.5))

    return {
        torch.nn.Hardsigmoid: function(lambda z: (z + 3).clamp(0, 6) / 6,
                                       lambda z: torch.where((z > -3) & (z < 3),
                                                             torch.full_like(z, 1.0) / 6, 0 * z)),
        torch.nn.CELU: celu,
        torch.nn.Hardswish: function(hardswish, d_hardswish),
        torch.nn.Softsign: function(lambda z: z / (1 + z.abs()), lambda z: (1 / (1 + z.abs())) ** 2),
        torch.nn.SiLU: function(lambda z: z * sigma(z), lambda z: sigma(z) * (1 + z * sigma(-z))),
        torch.nn.Mish: function(lambda z: z * mish_parts(z)[0],
                                lambda z: mish_parts(z)[0] + z * mish_parts(z)[1]),
        torch.nn.LogSigmoid: function(lambda z: torch.minimum(z, 0 * z)
                                      - torch.log1p(torch.exp(-z.abs())), lambda z: sigma(-z)),
        "gelu-tanh": function(lambda z: z * gelu_tanh_parts(z)[0],
                              lambda z: gelu_tanh_parts(z)[0] + z * gelu_tanh_parts(z)[1]),
    }


def _bound(b):
    return np.minimum(b.e, b.probabilistic_bound(LAMBDA))


def _signatures_differ(a, b):
    return any(np.any(np.asarray(x) != np.asarray(y)) for sa, sb in zip(a, b)
               for x, y in zip(sa, sb))


def compare(spec: dict, x=None, y=None, dps: int = 50, with_torch: bool = True,
            accurate_forms: bool = False) -> dict:
    """One net checked as the module docstring says; returns {"masks", "refnet", "kink",
    "torch" (None without torch), "details"}. ``x``/``y`` default to the spec's own batch.
    ``accurate_forms``: torch with refnet's sigmoid/tanh/gelu forms, to diagnose a difference."""
    from refnet.layers.base import ForwardState

    model = Model(spec)
    params, x, y = model.prepare(None, x, y)
    state = model.default_state()
    g64 = model.loss_and_grads(FLOAT64, params, x, y, state)       # draws the masks
    drawn = spec_masks(spec, x.shape[0], state.train)
    masks_equal = (set(drawn) == set(state.masks)
                   and all(np.array_equal(drawn[k], state.masks[k]) for k in drawn))
    replay = lambda: ForwardState(train=state.train, rng=None, masks=state.masks)  # noqa: E731
    gb = model.loss_and_grads(BOUND, params, x, y, replay())
    mp = MPBackend(dps)
    gm = model.loss_and_grads(mp, params, x, y, replay())
    kink = _signatures_differ(g64.forward.kink_signatures, gm.forward.kink_signatures)
    names = ["loss", "x"] + list(model.param_shapes())
    pick = lambda g, n: g.loss if n == "loss" else g.x if n == "x" else g.params[n]  # noqa
    ours = {n: np.asarray(pick(g64, n), dtype=np.float64) for n in names}
    bound = {n: _bound(pick(gb, n)) for n in names}
    exact = {n: mp.to_numpy(pick(gm, n)) for n in names}

    details = []
    refnet_ok = True
    if not kink:
        for n in names:
            if not np.all(np.abs(ours[n] - exact[n]) <= bound[n] + reference_rounding(exact[n])):
                refnet_ok = False
                details.append(f"refnet {n}: max |float64 − exact| "
                               f"{np.max(np.abs(ours[n] - exact[n])):.3g} beyond the bound")
    result = {"masks": masks_equal, "refnet": refnet_ok, "kink": kink, "torch": None,
              "details": details}
    if not with_torch:
        return result

    theirs = _torch_run(model, spec, params, x, y, state.train, drawn, accurate_forms)
    if set(theirs) != set(names):
        details.append(f"names differ: torch {sorted(theirs)}, refnet {sorted(names)}")
        result["torch"] = False
        return result
    torch_ok = True
    for n in names:
        t = np.asarray(theirs[n], dtype=np.float64).reshape(ours[n].shape)
        ref, allowed = (ours[n], 2 * bound[n]) if kink else (exact[n], bound[n])
        if not np.all(np.abs(t - ref) <= allowed):
            torch_ok = False
            worst = int(np.argmax(np.abs(t - ref) - allowed))
            details.append(f"torch {n}: |torch − {'float64' if kink else 'exact'}| "
                           f"{np.abs(t - ref).flat[worst]:.3g} > {allowed.flat[worst]:.3g}")
    result["torch"] = torch_ok
    return result


def _torch_run(model, spec, params, x, y, train, masks, accurate_forms):
    """torch's float64 loss (with the spec's penalty) and gradients: {"loss", "x", names...}."""
    import torch

    from refnet.interop.torch_twin import torch_objective, torch_twin

    net = torch_twin(model, params, torch.float64, masks=masks)
    if accurate_forms:
        net = _accurate_forms(torch, net)
    net.train(train)
    tx = torch.tensor(x, requires_grad=True)
    loss, _ = torch_objective(model, net(tx), y)      # the options; Σ u·ℓ for "none"
    reg = _torch_penalty(torch, net, spec)
    if reg is not None:
        loss = loss + reg
    loss.backward()
    theirs = {"loss": np.asarray(loss.item()), "x": tx.grad.numpy()}
    for name, p in net.named_parameters():
        theirs[name] = p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape))
    return theirs


def check_one(seed: int, with_torch: bool = True) -> dict:
    """The net and data drawn from ``seed``, compared; a torch difference is diagnosed (see the
    module docstring) and reported as "torch explained": True/False."""
    rng = np.random.default_rng(seed)
    spec = random_spec(rng)
    x, y = random_data(Model(spec), rng)
    result = compare(spec, x, y, with_torch=with_torch)
    result["spec"] = spec
    result["y"] = y.y if isinstance(y, Targets) else y
    if result["torch"] is False:
        result["torch explained"] = bool(
            compare(spec, x, y, accurate_forms=True)["torch"])
    return result


def sweep(count: int, seed: int, log=print):
    """``count`` random nets, net i from seed ``seed + i``: the tallies, and every net that
    failed a check (with its seed, so that ``check_one(seed)`` reruns it)."""
    keys = ["nets", "mask differences", "refnet errors", "torch differences",
            "torch differences explained by torch's activation forms",
            "torch differences unexplained", "kink cases (compared with float64)", "train mode",
            "train mode with dropout drawing", "dropout p = 0", "dropout p = 1", "dropout2d",
            "residual", "nested residual", "projection shortcut", "conv", "batchnorm",
            "layernorm", "penalty in effect", "regularization selecting nothing",
            "no dense/conv layer", "softplus first (inputs at the switch)",
            "softplus beta != 1", "loss mse", "loss softmax_cross_entropy",
            "loss bce_with_logits", "loss l1", "loss smooth_l1", "loss huber", "loss nll",
            "reduction none", "class weights", "ignored labels", "label smoothing",
            "class probabilities", "class loss over (N, C, d...)", "pos_weight",
            "issue-18 activation", "groupnorm", "instancenorm2d", "pool options",
            "adaptive pool", "dense on (N, T, F)"]
    tally = dict.fromkeys(keys, 0)
    failures = []
    for i in range(count):
        result = check_one(seed + i)
        spec = result["spec"]
        model = Model(spec)
        text = json.dumps(spec)
        drawing = spec["mode"] == "train" and bool(spec_masks(spec, spec["batch"]))
        counts = {
            "nets": True, "mask differences": not result["masks"],
            "refnet errors": not result["refnet"], "torch differences": result["torch"] is False,
            "torch differences explained by torch's activation forms":
                result.get("torch explained") is True,
            "torch differences unexplained": result.get("torch explained") is False,
            "kink cases (compared with float64)": result["kink"],
            "train mode": spec["mode"] == "train", "train mode with dropout drawing": drawing,
            "dropout p = 0": '"p": 0.0' in text, "dropout p = 1": '"p": 1.0' in text,
            "dropout2d": '"dropout2d"' in text, "residual": '"residual"' in text,
            "nested residual": text.count('"residual"') > 1 and any(
                '"residual"' in json.dumps(layer.get("body", [])) for layer in spec["layers"]),
            "projection shortcut": '"shortcut": [' in text, "conv": '"conv2d"' in text,
            "batchnorm": '"batchnorm"' in text, "layernorm": '"layernorm"' in text,
            "penalty in effect": bool(model.l1 or model.l2),
            "regularization selecting nothing": "regularization" in spec
                and not model.regularized,
            "no dense/conv layer": not model.weight_names(),
            "softplus first (inputs at the switch)": model.layers[0].type == "softplus",
            "softplus beta != 1": any(layer.get("beta", 1.0) != 1.0 for layer in
                                      _all_layers(spec["layers"]) if layer["type"] == "softplus"),
            f"loss {model.loss.type}": True,
            **_option_counts(spec, model, result)}
        for key, hit in counts.items():
            tally[key] += bool(hit)
        result.pop("y", None)                       # an array: not part of the JSON report
        bad = (not result["masks"] or not result["refnet"]
               or result.get("torch explained") is False)
        if bad or result["torch"] is False:
            failures.append({"seed": seed + i, **result})
            log(f"net seed {seed + i}: {result['details'] or 'mask difference'}"
                f"{'' if bad else ' (explained by torch forms)'}")
        if (i + 1) % 250 == 0:
            log(f"{i + 1} of {count} nets")
    return tally, failures


def _option_counts(spec, model, result):
    """Which of issue 18's options the net drew (for the sweep's tally)."""
    loss, layers = spec["loss"], list(_all_layers(spec["layers"]))
    kinds = {layer["type"] for layer in layers}
    y = result.get("y")
    labels = y is not None and np.asarray(y).dtype.kind in "iu"
    return {
        "reduction none": loss.get("reduction") == "none",
        "class weights": "weight" in loss and loss["type"] in ("softmax_cross_entropy", "nll"),
        "ignored labels": labels and bool(np.any(np.asarray(y) == model.loss.ignore_index)),
        "label smoothing": bool(loss.get("label_smoothing")),
        "class probabilities": loss["type"] == "softmax_cross_entropy" and not labels,
        "class loss over (N, C, d...)": loss["type"] in ("softmax_cross_entropy", "nll")
            and len(model.output_shape) > 1,
        "pos_weight": "pos_weight" in loss,
        "issue-18 activation": bool(kinds & set(NEW_ACTS)) or any(
            layer.get("approximate") == "tanh" for layer in layers),
        "groupnorm": "groupnorm" in kinds, "instancenorm2d": "instancenorm2d" in kinds,
        "pool options": any(layer.get(k) not in (None, False, 1) for layer in layers
                            for k in ("dilation", "ceil_mode", "divisor_override"))
            or any(layer["type"] == "avgpool2d" and layer.get("count_include_pad") is False
                   for layer in layers),
        "adaptive pool": bool(kinds & {"adaptive_avgpool2d", "adaptive_maxpool2d"}),
        "dense on (N, T, F)": len(spec["input_shape"]) == 2,
    }


def _all_layers(layers):
    for layer in layers:
        yield layer
        if layer["type"] == "residual":
            yield from _all_layers(layer["body"])
            if isinstance(layer.get("shortcut"), list):
                yield from _all_layers(layer["shortcut"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--failures", help="write the failing nets here (JSON)")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    tally, failures = sweep(args.count, args.seed)
    print(json.dumps(tally, indent=1))
    if args.failures:
        Path(args.failures).write_text(json.dumps(failures, indent=1))
    bad = ("mask differences", "refnet errors", "torch differences unexplained")
    return 1 if any(tally[k] for k in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
