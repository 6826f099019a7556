"""How many of PyTorch's own OpInfo sample inputs refnet expresses, and whether it matches them.

    python benchmarks/opinfo_coverage.py [--json out.json] [--ops linear,max_pool2d] [-v]

Needs torch and ``expecttest`` (which ``torch.testing._internal`` imports); a measurement, not a
test of the suite. For every OpInfo of ``op_db`` named in ``OPS`` it takes the float64
``sample_inputs(device="cpu", dtype=torch.float64, requires_grad=True)`` and maps each sample to
a refnet model spec where it can (the layer and its options, the input shape, the batch):

- a layer op (linear, conv2d, the pools, the norms, the activations, dropout) becomes the model
  [that layer] with loss mse, reduction sum, against a seeded target t: L = Σ (op(x) − t)², in
  torch as ``((out − t) ** 2).sum()``;
- a loss op becomes the model [identity] with that loss, its options by torch's name (weight,
  pos_weight, ignore_index, label_smoothing, beta, delta), its reduction and the sample's target;
  for reduction 'none' a seeded upstream vector u, torch's L then (ℓ·u).sum().

refnet computes L and its gradients in float64 (``Model.loss_and_grads``), torch with autograd
on the sample's own tensors, and each gradient torch has of a tensor refnet differentiates (the
input, weight, bias) must agree normwise: ‖g_refnet − g_torch‖ ≤ 1e-12·‖g_torch‖, and the loss
to 1e-12 relative. Both compute the same float64 function with different orders of rounding;
1e-12 leaves room for ~10⁴ u of condition, and a wrong formula is off by far more.

Mapping rules (``spec/operations.md`` "Shapes torch accepts"): refnet's input always has a batch
axis, so an unbatched torch input (conv/pool (C, H, W), linear (in,), layer_norm without leading
axes) is x[None], an elementwise op's 0-d or 1-D input is (1, numel), and refnet's output y[0]
(its gradient dx[0]) is torch's. A train-mode dropout sample uses torch's own mask, read from
its output (kept where out ≠ 0), as refnet's ``ForwardState`` mask. Everything a sample asks that
refnet lacks is *inexpressible*, with the reason: an option or layer refnet does not have
(refnet's own error message when the spec is built), an empty tensor, ...
Target gradients (mse_loss's target requires grad) are not compared: refnet differentiates the
prediction only. Every leaf's ``grad`` is cleared before torch's backward: OpInfo samples may
share tensors, and a gradient accumulated from another sample would read as a mismatch.

Prints per op: samples, expressible, matched, the worst normwise error, and the reasons for the
inexpressible samples, grouped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import date

import numpy as np

from refnet import BOUND, FLOAT64, Model, MPBackend
from refnet.layers.base import ForwardState
from refnet.layers.registry import layer_types
from refnet.losses import LOSSES, Targets
from refnet.numerics.errorbound import LAMBDA

TOLERANCE = 1e-12

# torch's functional signatures: positional arguments after the input, in order.
POSITIONAL = {
    "linear": ["weight", "bias"],
    "conv2d": ["weight", "bias", "stride", "padding", "dilation", "groups"],
    "max_pool2d": ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
    "avg_pool2d": ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"],
    "adaptive_avg_pool2d": ["output_size"],
    "adaptive_max_pool2d": ["output_size", "return_indices"],
    "batch_norm": ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
    "layer_norm": ["normalized_shape", "weight", "bias", "eps"],
    "group_norm": ["num_groups", "weight", "bias", "eps"],
    "instance_norm": ["running_mean", "running_var", "weight", "bias", "use_input_stats",
                      "momentum", "eps"],
    "prelu": ["weight"],
    "leaky_relu": ["negative_slope", "inplace"],
    "elu": ["alpha", "inplace"], "celu": ["alpha", "inplace"],
    "hardtanh": ["min_val", "max_val", "inplace"],
    "softplus": ["beta", "threshold"],
    "dropout": ["p", "training", "inplace"],
    "cross_entropy": ["target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                      "label_smoothing"],
    "nll_loss": ["target", "weight", "size_average", "ignore_index", "reduce", "reduction"],
    "binary_cross_entropy": ["target", "weight", "size_average", "reduce", "reduction"],
    "binary_cross_entropy_with_logits": ["target", "weight", "size_average", "reduce",
                                         "reduction", "pos_weight"],
    "mse_loss": ["target", "size_average", "reduce", "reduction"],
    "l1_loss": ["target", "size_average", "reduce", "reduction"],
    "smooth_l1_loss": ["target", "size_average", "reduce", "reduction", "beta"],
    "huber_loss": ["target", "reduction", "delta"],
}
ACTIVATIONS = ["relu", "leaky_relu", "prelu", "elu", "selu", "celu", "gelu", "silu", "mish",
               "hardtanh", "relu6", "hardsigmoid", "hardswish", "softplus", "softsign",
               "logsigmoid", "sigmoid", "tanh"]
# torch's loss name -> refnet's loss type (the ones refnet lacks are named as they would be)
LOSS_TYPES = {"mse_loss": "mse", "cross_entropy": "softmax_cross_entropy",
              "binary_cross_entropy_with_logits": "bce_with_logits",
              "binary_cross_entropy": "bce", "l1_loss": "l1", "smooth_l1_loss": "smooth_l1",
              "huber_loss": "huber", "nll_loss": "nll"}
# torch's option name -> refnet's, where they differ
RENAMED = {"leaky_relu": {"negative_slope": "slope"}}
OPS = (["linear", "conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
        "adaptive_max_pool2d", "batch_norm", "layer_norm", "group_norm", "instance_norm"]
       + ACTIVATIONS + list(LOSS_TYPES) + ["dropout"])


class Inexpressible(Exception):
    """The sample asks for something refnet does not have; the message is the reason."""


@dataclass
class Mapped:
    spec: dict
    x: np.ndarray                         # refnet's (batched) input
    y: np.ndarray                         # refnet's target
    params: dict = field(default_factory=dict)      # refnet name -> value
    leaves: dict = field(default_factory=dict)      # refnet name -> the torch tensor it is
    masks: dict = field(default_factory=dict)
    train: bool = True


def short_name(opinfo_name: str) -> str:
    return opinfo_name.replace("nn.functional.", "")


def arguments(name, sample):
    """The sample's arguments by torch's parameter names."""
    given = dict(zip(POSITIONAL.get(name, []), sample.args))
    if len(sample.args) > len(POSITIONAL.get(name, [])):
        raise Inexpressible(f"{len(sample.args)} positional arguments (harness knows "
                            f"{len(POSITIONAL.get(name, []))})")
    return {**given, **sample.kwargs}


def numpy_of(t):
    return None if t is None else t.detach().cpu().numpy().astype(np.float64, copy=True)


def pair_of(v):
    """torch's int-or-tuple argument as refnet's JSON (int or [a, b]); () and None: None."""
    import torch
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return None
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return int(v[0]) if v[0] is not None else None
        if len(v) != 2:
            raise Inexpressible(f"a {len(v)}-element size {tuple(v)}")
        return [None if a is None else int(a) for a in v]
    return v if isinstance(v, str) else int(v)


def batched(x, sample_ndim):
    """(x with a batch axis, whether one was added): x[None] for an unbatched input."""
    return (x[None], True) if x.ndim == sample_ndim else (x, False)


def _require_nonempty(x):
    if x.size == 0:
        raise Inexpressible("an empty tensor (refnet's tensors have no zero-size axis)")


def _target_like(out_shape, rng):
    return rng.standard_normal(out_shape)


def _layer_model(layer, x, rng, params=None, leaves=None, masks=None, train=True):
    # out shape from the model itself: build it, then draw the target
    spec = {"input_shape": list(x.shape[1:]), "batch": x.shape[0], "seed": 0,
            "layers": [layer], "loss": {"type": "mse", "reduction": "sum"},
            "mode": "train" if train else "eval"}
    model = Model(spec)
    y = _target_like((x.shape[0],) + model.output_shape, rng)
    return Mapped(spec, x, y, params or {}, leaves or {}, masks or {}, train)


def map_sample(name, sample, rng):
    """The refnet model of one sample (raises Inexpressible with the reason)."""
    import torch
    a = arguments(name, sample)
    x_t = sample.input
    if not isinstance(x_t, torch.Tensor):
        raise Inexpressible("the input is not a tensor")
    x = numpy_of(x_t)
    _require_nonempty(x)
    leaves = {"x": x_t}

    if name == "linear":
        w, b = a.get("weight"), a.get("bias")
        xb, _ = batched(x, 1)
        layer = {"type": "dense", "out": int(w.shape[0]), "bias": b is not None}
        params = {"0.weight": numpy_of(w)}
        leaves["0.weight"] = w
        if b is not None:
            params["0.bias"], leaves["0.bias"] = numpy_of(b), b
        return _layer_model(layer, xb, rng, params, leaves)

    if name == "conv2d":
        w, b = a["weight"], a.get("bias")
        xb, _ = batched(x, 3)
        if xb.ndim != 4:
            raise Inexpressible(f"conv2d input of {x.ndim} dims")
        padding = a.get("padding", 0)
        layer = {"type": "conv2d", "out_channels": int(w.shape[0]),
                 "kernel_size": [int(w.shape[2]), int(w.shape[3])],
                 "stride": pair_of(a.get("stride", 1)), "padding": pair_of(padding),
                 "dilation": pair_of(a.get("dilation", 1)), "groups": int(a.get("groups", 1)),
                 "bias": b is not None}
        params, leaves["0.weight"] = {"0.weight": numpy_of(w)}, w
        if b is not None:
            params["0.bias"], leaves["0.bias"] = numpy_of(b), b
        return _layer_model(layer, xb, rng, params, leaves)

    if name in ("max_pool2d", "avg_pool2d"):
        xb, _ = batched(x, 3)
        layer = {"type": "maxpool2d" if name == "max_pool2d" else "avgpool2d",
                 "kernel_size": pair_of(a["kernel_size"]), "stride": pair_of(a.get("stride")),
                 "padding": pair_of(a.get("padding", 0)) or 0,
                 "ceil_mode": bool(a.get("ceil_mode", False))}
        if name == "max_pool2d":
            layer["dilation"] = pair_of(a.get("dilation", 1))
        else:
            layer["count_include_pad"] = bool(a.get("count_include_pad", True))
            layer["divisor_override"] = a.get("divisor_override")
        return _layer_model(layer, xb, rng, leaves=leaves)

    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        xb, _ = batched(x, 3)
        layer = {"type": {"adaptive_avg_pool2d": "adaptive_avgpool2d",
                          "adaptive_max_pool2d": "adaptive_maxpool2d"}[name],
                 "output_size": pair_of(a["output_size"])}
        return _layer_model(layer, xb, rng, leaves=leaves)

    if name == "batch_norm":
        w, b = a.get("weight"), a.get("bias")
        mean, var = a.get("running_mean"), a.get("running_var")
        training = bool(a.get("training", False))
        if (w is None) != (b is None):
            raise Inexpressible("a weight without a bias or a bias without a weight")
        if (mean is None) != (var is None):
            raise Inexpressible("a running mean without a running variance")
        if x.ndim < 2:
            raise Inexpressible(f"a {x.ndim}-D input (batch_norm needs (N, C, ...))")
        layer = {"type": "batchnorm", "eps": float(a.get("eps", 1e-5)),
                 "momentum": float(a.get("momentum", 0.1)), "affine": w is not None,
                 "track_running_stats": mean is not None}
        params = {}
        if w is not None:
            params.update({"0.weight": numpy_of(w), "0.bias": numpy_of(b)})
            leaves.update({"0.weight": w, "0.bias": b})
        if mean is not None:
            params.update({"0.running_mean": numpy_of(mean), "0.running_var": numpy_of(var),
                           "0.num_batches_tracked": np.array(0.0)})
        return _layer_model(layer, x, rng, params, leaves, train=training)

    if name == "layer_norm":
        shape = [int(s) for s in a["normalized_shape"]]
        w, b = a.get("weight"), a.get("bias")
        if w is None and b is not None:
            raise Inexpressible("a bias without a weight")
        xb, _ = batched(x, len(shape))
        layer = {"type": "layernorm", "normalized_shape": shape, "eps": float(a.get("eps", 1e-5)),
                 "elementwise_affine": w is not None, "bias": b is not None}
        params = {}
        if w is not None:
            params["0.weight"], leaves["0.weight"] = numpy_of(w), w
        if b is not None:
            params["0.bias"], leaves["0.bias"] = numpy_of(b), b
        return _layer_model(layer, xb, rng, params, leaves)

    if name == "instance_norm":
        return _map_instance_norm(a, x, leaves, rng)

    if name in ("group_norm", "instance_norm"):
        kind = {"group_norm": "groupnorm", "instance_norm": "instancenorm2d"}[name]
        if kind not in layer_types():
            raise Inexpressible(f"refnet has no layer type {kind!r} (yet)")
        options = {k: v for k, v in a.items() if not hasattr(v, "shape") and v is not None}
        w, b = a.get("weight"), a.get("bias")
        params = {}
        if w is not None:
            params["0.weight"], leaves["0.weight"] = numpy_of(w), w
        if b is not None:
            params["0.bias"], leaves["0.bias"] = numpy_of(b), b
        options["affine"] = w is not None
        return _layer_model({"type": kind, **options}, x, rng, params, leaves)

    if name in ACTIVATIONS:
        if name not in layer_types():
            raise Inexpressible(f"refnet has no layer type {name!r} (yet)")
        options = {RENAMED.get(name, {}).get(k, k): v for k, v in a.items()
                   if k not in ("inplace", "weight")
                   and not (name == "gelu" and k == "approximate" and v == "none")}
        params = {}
        if name == "prelu":
            w = a["weight"]
            channels = 1 if w.ndim == 0 else int(w.shape[0])
            options["num_parameters"] = channels
            params["0.weight"], leaves["0.weight"] = numpy_of(w).reshape(channels), w
            xb = x.reshape(1, -1) if x.ndim < 2 else x
        else:
            xb = x.reshape(1, -1) if x.ndim < 2 else x
        return _layer_model({"type": name, **options}, xb, rng, params, leaves)

    if name == "dropout":
        p, training = float(a.get("p", 0.5)), bool(a.get("training", True))
        xb = x.reshape(1, -1) if x.ndim < 2 else x
        # torch's mask, read off its output (computed below with the same call): kept = out ≠ 0
        return _layer_model({"type": "dropout", "p": p}, xb, rng, leaves=leaves, train=training)

    if name in LOSS_TYPES:
        return _map_loss(name, a, x, leaves, rng)

    raise Inexpressible(f"no mapping for {name}")


def _map_instance_norm(a, x, leaves, rng):
    """F.instance_norm as instancenorm2d: running statistics given make it track them;
    use_input_stats=False is eval mode (the running statistics normalize), as torch's module."""
    if x.ndim != 4:
        raise Inexpressible(f"instance_norm on a {x.ndim}-D input (refnet has instancenorm2d: "
                            f"(N, C, H, W))")
    w, b = a.get("weight"), a.get("bias")
    mean, var = a.get("running_mean"), a.get("running_var")
    if (mean is None) != (var is None):
        raise Inexpressible("a running mean without a running variance")
    affine = w is not None or b is not None
    layer = {"type": "instancenorm2d", "eps": float(a.get("eps", 1e-5)),
             "momentum": float(a.get("momentum", 0.1)), "affine": affine,
             "track_running_stats": mean is not None}
    params = {}
    channels = x.shape[1]
    if affine:           # a weight alone is affine with bias 0; a bias alone with weight 1
        params["0.weight"] = numpy_of(w) if w is not None else np.ones(channels)
        params["0.bias"] = numpy_of(b) if b is not None else np.zeros(channels)
        leaves.update({k: t for k, t in (("0.weight", w), ("0.bias", b)) if t is not None})
    if mean is not None:
        params.update({"0.running_mean": numpy_of(mean), "0.running_var": numpy_of(var),
                       "0.num_batches_tracked": np.array(0.0)})
    return _layer_model(layer, x, rng, params, leaves,
                        train=bool(a.get("use_input_stats", True)))


def _loss_weight(key, value, x, batched_input):
    """A weight tensor as refnet's option: class weights (C,) as they are; BCE's weight and
    pos_weight broadcast against the input, and refnet takes them over one sample's shape (a
    leading axis of 1 dropped; one of N > 1 is per-sample data: inexpressible)."""
    w = numpy_of(value)
    if batched_input and w.ndim == x.ndim:
        if w.shape[0] != 1:
            raise Inexpressible(f"a {key} with a batch axis {w.shape} (refnet's is a model "
                                f"option over one sample's shape)")
        w = w[0]
    return w.tolist() if w.ndim else float(w)


def _map_loss(name, a, x, leaves, rng):
    """A loss op: the model [identity] with that loss, its options by torch's name (weight,
    pos_weight, ignore_index, label_smoothing, beta, delta) and reduction; for reduction "none"
    a seeded upstream vector u (torch: (ℓ·u).sum())."""
    kind = LOSS_TYPES[name]
    if kind not in LOSSES:
        raise Inexpressible(f"refnet has no loss {kind!r} (torch {name})")
    if a.get("size_average") is not None or a.get("reduce") is not None:
        raise Inexpressible("the deprecated size_average/reduce arguments")
    reduction = a.get("reduction", "mean")
    target = a["target"]
    y = numpy_of(target)
    classes = kind in ("softmax_cross_entropy", "nll")
    options = {k: a[k] for k in ("beta", "delta") if a.get(k) is not None}
    if classes:
        if target.dtype.is_floating_point and kind == "nll":
            raise Inexpressible("nll_loss with floating-point targets")
        xb, y = (x[None], y[None]) if x.ndim == 1 else (x, y)       # unbatched (C,): x[None]
        y = y if target.dtype.is_floating_point else y.astype(np.int64)
        if a.get("ignore_index") is not None:
            options["ignore_index"] = int(a["ignore_index"])
        if a.get("label_smoothing"):
            options["label_smoothing"] = float(a["label_smoothing"])
        if a.get("weight") is not None:
            options["weight"] = numpy_of(a["weight"]).tolist()
    else:
        if y.shape != x.shape:
            raise Inexpressible(f"a target of shape {y.shape} broadcast to {x.shape}")
        xb = x.reshape(1, -1) if x.ndim < 2 else x
        y = y.reshape(xb.shape)
        for key in ("weight", "pos_weight"):
            if a.get(key) is not None:
                options[key] = _loss_weight(key, a[key], x, x.ndim >= 2)
    spec = {"input_shape": list(xb.shape[1:]), "batch": xb.shape[0], "seed": 0,
            "layers": [{"type": "identity"}],
            "loss": {"type": kind, "reduction": reduction, **options}}
    if reduction == "none":
        loss = Model(spec).loss
        y = Targets(y, rng.standard_normal(loss.vector_shape(xb.shape[0])))
    return Mapped(spec, xb, y, {}, leaves)


def torch_loss(name, sample, mapped):
    """torch's L on the sample's own tensors (and, for dropout, the mask it drew)."""
    import torch
    out = sample.output_process_fn_grad(OPINFO[name](sample.input, *sample.args, **sample.kwargs))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if name in LOSS_TYPES:
        if isinstance(mapped.y, Targets):                 # reduction "none": ℓ.backward(u)
            return (out * torch.tensor(mapped.y.upstream).reshape(out.shape)).sum()
        return out
    if name == "dropout" and mapped.train and mapped.spec["layers"][0]["p"] > 0:
        keep = (out.detach().numpy() != 0).reshape(mapped.x.shape)
        mapped.masks["0"] = keep
    target = torch.tensor(mapped.y.reshape(out.shape), dtype=torch.float64)
    return ((out - target) ** 2).sum()


def refnet_result(mapped, bk=FLOAT64):
    model = Model(mapped.spec)
    params = model.init_params()
    params.update(mapped.params)
    params, x, y = model.prepare(params, mapped.x, mapped.y)
    state = ForwardState(train=mapped.train, rng=np.random.default_rng(0), masks=mapped.masks)
    with np.errstate(all="ignore"):
        return model.loss_and_grads(bk, params, x, y, state)


def within_the_error_bound(mapped, torch_grads, ours):
    """Where the normwise test fails: do torch's and refnet's gradients both lie within refnet's
    float64 error bound, min(rigorous, 8σ), of the exact (50-digit) gradient, element by
    element? That is the case of an exact gradient that cancels (a norm over 1 or 2 values:
    x̂ = 0 exactly, or dx a difference of nearly equal terms): both sides are right to their
    rounding, and 1e-12 of a cancelled result is below it."""
    mp = MPBackend(50)
    exact, bound = refnet_result(mapped, mp), refnet_result(mapped, BOUND)
    for key, g_t in torch_grads.items():
        pick = (lambda g: g.x) if key == "x" else (lambda g: g.params[key])
        b = pick(bound)
        allowed = np.minimum(b.e, b.probabilistic_bound(LAMBDA)).reshape(g_t.shape)
        ref = mp.to_numpy(pick(exact)).reshape(g_t.shape)
        ours_g = np.asarray(pick(ours)).reshape(g_t.shape)
        if not (np.all(np.abs(g_t - ref) <= allowed) and np.all(np.abs(ours_g - ref) <= allowed)):
            return False
    return True


def relative(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    scale = np.linalg.norm(ref.ravel())
    diff = np.linalg.norm((got - ref).ravel())
    if scale == 0:
        return 0.0 if diff == 0 else np.inf
    return float(diff / scale)


def reason_key(message: str) -> str:
    """Group reasons: drop the layer prefix and numbers that vary from sample to sample."""
    message = re.sub(r"^layers\[0\] \([a-z_0-9]+\): ", "", message.strip().splitlines()[0])
    message = re.sub(r"(?<![A-Za-z_])-?\d+(\.\d+)?(e-?\d+)?", "#", message)
    return message[:140]


def measure(ops, verbose=False):
    import torch
    from torch.testing._internal.common_methods_invocations import op_db
    results = {}
    for op in op_db:
        name = short_name(op.name)
        if name not in ops or op.variant_test_name not in ("", "without_cudnn"):
            continue
        if torch.float64 not in op.supported_dtypes("cpu"):
            continue
        label = name if not op.variant_test_name else f"{name} ({op.variant_test_name})"
        OPINFO[name] = op.op
        r = results.setdefault(label, {"samples": 0, "expressible": 0, "matched": 0,
                                       "worst": 0.0, "inexpressible": Counter(),
                                       "mismatched": Counter(), "torch_errors": 0,
                                       "within_bound": 0})
        rng = np.random.default_rng(0)
        for sample in op.sample_inputs("cpu", torch.float64, requires_grad=True):
            r["samples"] += 1
            try:
                mapped = map_sample(name, sample, rng)
                Model(mapped.spec)
            except Inexpressible as e:
                r["inexpressible"][reason_key(str(e))] += 1
                continue
            except ValueError as e:                 # refnet's own check of the spec
                r["inexpressible"][reason_key(str(e))] += 1
                continue
            try:
                for leaf in mapped.leaves.values():     # samples may share tensors: no
                    if isinstance(leaf, torch.Tensor):  # gradient carried over from another
                        leaf.grad = None
                loss_t = torch_loss(name, sample, mapped)
                loss_t.backward()
            except RuntimeError as e:
                r["torch_errors"] += 1
                if verbose:
                    print(f"  torch raises on a {label} sample: {str(e).splitlines()[0]}")
                continue
            try:
                ours = refnet_result(mapped)
            except ValueError as e:                 # refnet's run-time checks (batch stats, ...)
                r["inexpressible"][reason_key(str(e))] += 1
                continue
            r["expressible"] += 1
            errors = {"loss": relative(float(ours.loss), loss_t.item())}
            torch_grads = {}
            for key, leaf in mapped.leaves.items():
                if not isinstance(leaf, torch.Tensor) or not leaf.requires_grad:
                    continue
                g_t = leaf.grad.numpy() if leaf.grad is not None else np.zeros(leaf.shape)
                torch_grads[key] = g_t
                g_r = ours.x if key == "x" else ours.params[key]
                errors[key] = relative(np.asarray(g_r).reshape(g_t.shape), g_t)
            worst = max(errors.values())
            if worst <= TOLERANCE:
                r["matched"] += 1
                r["worst"] = max(r["worst"], worst)
            elif errors["loss"] <= TOLERANCE and within_the_error_bound(mapped, torch_grads,
                                                                         ours):
                r["matched"] += 1
                r["within_bound"] += 1
            else:
                bad = ", ".join(f"{k} {v:.1e}" for k, v in errors.items() if v > TOLERANCE)
                r["mismatched"][bad] += 1
                if verbose:
                    print(f"  mismatch {label}: {bad}; spec {json.dumps(mapped.spec)}")
    return results


OPINFO = {}


def report(results):
    lines = [f"{'op':<36} {'samples':>7} {'express.':>8} {'matched':>7} {'worst':>9}"]
    total = Counter()
    for label, r in results.items():
        lines.append(f"{label:<36} {r['samples']:>7} {r['expressible']:>8} {r['matched']:>7} "
                     f"{r['worst']:>9.1e}")
        for reason, count in r["inexpressible"].most_common():
            lines.append(f"    {count:>5} inexpressible: {reason}")
        if r["within_bound"]:
            lines.append(f"    {r['within_bound']:>5} matched within the error bound, not to "
                         f"1e-12: the exact gradient cancels (ill-conditioned)")
        for reason, count in r["mismatched"].most_common():
            lines.append(f"    {count:>5} MISMATCH: {reason}")
        if r["torch_errors"]:
            lines.append(f"    {r['torch_errors']:>5} torch itself raises (not counted as "
                         f"expressible)")
        for key in ("samples", "expressible", "matched"):
            total[key] += r[key]
    lines.append(f"{'all':<36} {total['samples']:>7} {total['expressible']:>8} "
                 f"{total['matched']:>7}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", help="comma-separated torch names (default: all of OPS)")
    parser.add_argument("--json", help="write the per-op results to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        import torch
        import torch.testing._internal.common_methods_invocations  # noqa: F401
    except ImportError as e:
        print(f"opinfo_coverage: needs torch and expecttest ({e})", file=sys.stderr)
        return 2
    ops = OPS if not args.ops else args.ops.split(",")
    results = measure(set(ops), args.verbose)
    print(f"refnet vs torch {torch.__version__} OpInfo float64 samples, {date.today()}")
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "date": str(date.today()),
                       "results": {k: {**v, "inexpressible": dict(v["inexpressible"]),
                                       "mismatched": dict(v["mismatched"])}
                                   for k, v in results.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
