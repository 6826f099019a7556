"""A JAX adapter for refnet's golden vectors written from spec/conformance.md alone (and the
formulas it points to in spec/operations.md and spec/model-format.md): it imports numpy and jax,
never refnet — a third party's adapter, as the guide asks one to be written.

``check(directory, dtype, strict_kinks, mutations)`` runs every vector and compares as the
guide's snippet does; it returns the (vector, group/tensor) pairs that fail. ``mutations``
changes one pinned convention each (``MUTATIONS``), so that tests can show that every such
change fails some vector. Run directly: ``python tests/jax_adapter_independent.py [DIR]``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

# One convention of spec/operations.md each, changed (the acceptance list of issue 15).
MUTATIONS = {
    "gelu_tanh_form": "gelu (approximate 'none') computed with the tanh approximation",
    "relu_grad_one_at_zero": "relu'(0) = 1 (z >= 0 takes the linear piece)",
    "leaky_relu_grad_one_at_zero": "leaky_relu'(0) = 1 (jax.nn.leaky_relu's convention)",
    "unbiased_batchnorm_variance": "batchnorm normalizes with the unbiased variance m/(m-1)",
    "layernorm_eps_outside_root": "layernorm divides by sqrt(var) + eps",
    "last_maximum_ties": "max pooling sends the gradient to the last maximum of a window",
    "avgpool_exclude_padding": "average pooling never counts padding in its divisor",
    "avgpool_count_padding_always": "average pooling counts padding even with count_include_pad false",
    "softplus_no_threshold": "softplus always takes its smooth branch",
    "flipped_conv_kernel": "conv2d flips its kernel (a true convolution)",
    # and the other conventions the issue-15 vectors pin
    "prelu_grad_one_at_zero": "prelu'(0) = 1",
    "elu_grad_one_at_zero": "elu'(0) = 1 (the linear piece at 0)",
    "softplus_linear_at_threshold": "softplus takes the linear branch at beta*z = threshold",
    "sigmoid_naive_form": "sigmoid as 1/(1 + exp(-z)), differentiated by JAX",
    "tanh_naive_form": "tanh as (exp(2z) - 1)/(exp(2z) + 1), differentiated by JAX",
    # the recurrent layers' conventions (issue 16)
    "lstm_gate_order_icfo": "lstm's gate rows read as (i, g, f, o), TensorFlow's order",
    "gru_reset_before_matmul": "gru's n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)",
}

SQRT_2_OVER_PI = 0.7978845608028654
SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717

# Layer options and their defaults (spec/model-format.md, "Layer types").
DEFAULTS = {
    "dense": {"bias": True}, "conv2d": {"stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                                        "bias": True},
    "maxpool2d": {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False},
    "avgpool2d": {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                  "divisor_override": None},
    "batchnorm": {"eps": 1e-5, "affine": True, "track_running_stats": True},
    "layernorm": {"eps": 1e-5, "elementwise_affine": True, "bias": True},
    "groupnorm": {"eps": 1e-5, "affine": True},
    "instancenorm2d": {"eps": 1e-5, "affine": False, "track_running_stats": False},
    "leaky_relu": {"slope": 0.01}, "elu": {"alpha": 1.0}, "celu": {"alpha": 1.0},
    "softplus": {"beta": 1.0, "threshold": 20.0}, "gelu": {"approximate": "none"},
    "hardtanh": {"min_val": -1.0, "max_val": 1.0}, "residual": {"shortcut": "identity",
                                                                "scale": 1.0},
    "rnn": {"num_layers": 1, "bias": True, "output": "sequence", "nonlinearity": "tanh"},
    "lstm": {"num_layers": 1, "bias": True, "output": "sequence"},
    "gru": {"num_layers": 1, "bias": True, "output": "sequence"},
}


def tensor(t):
    """An exact input: hex floats, row-major; labels are integers."""
    if "labels" in t:
        return np.array(t["labels"], dtype=np.int64).reshape(t["shape"])
    return np.array([float.fromhex(h) for h in t["hex"]]).reshape(t["shape"])


def pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


# --- window geometry (spec/operations.md, "Pooling") -------------------------------------------

def pool_out(length, k, s, p, d, ceil):
    span = length + 2 * p - d * (k - 1) - 1
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    return out - 1 if (out - 1) * s >= length + p else out


def axis_windows(length, k, s, p, d, ceil):
    """Per output: the input positions its window reads, and (h0, h1) of the clipped window."""
    out = pool_out(length, k, s, p, d, ceil)
    positions, bounds = [], []
    for o in range(out):
        start = o * s - p
        positions.append([start + i * d for i in range(k) if 0 <= start + i * d < length])
        bounds.append((start, min(start + k, length + p)))
    return positions, bounds


def adaptive_windows(length, n):
    n = length if n is None else n
    return [list(range(i * length // n, -(-(i + 1) * length // n))) for i in range(n)], None


def gather_plan(rows, cols, width):
    """(K, L) flat indices and validity for windows given per axis, output row-major."""
    pairs = [[r * width + c for r in rr for c in cc] for rr in rows for cc in cols]
    k = max(len(p) for p in pairs)
    index = np.zeros((k, len(pairs)), dtype=np.int64)
    valid = np.zeros((k, len(pairs)), dtype=bool)
    for out, p in enumerate(pairs):
        index[: len(p), out], valid[: len(p), out] = p, True
    return index, valid


def pool(x, index, valid, out_hw, kind, divisor=None, last=False):
    n, c, h, w = x.shape
    values = x.reshape(n, c, h * w)[:, :, index]                      # (N, C, K, L)
    if kind == "max":
        values = jnp.where(valid, values, -jnp.inf)
        if last:                                                      # mutation: last maximum
            flipped = values[:, :, ::-1, :]
            pick = values.shape[2] - 1 - jnp.argmax(flipped, axis=2)
        else:
            pick = jnp.argmax(values, axis=2)                         # the first maximum
        y = jnp.take_along_axis(values, pick[:, :, None, :], axis=2)[:, :, 0, :]
    else:
        y = jnp.sum(jnp.where(valid, values, 0.0), axis=2) / divisor
    return y.reshape(n, c, *out_hw)


# --- the model builder: (config, input shape) -> (function, output shape) ----------------------

def build(layers, shape, mutations):
    """A list of layer configs as one function f(params, x, train) and its output shape;
    parameters are looked up by torch name ("3.weight", "1.body.0.bias")."""
    steps = []
    for j, config in enumerate(layers):
        fn, shape = build_layer(config, shape, mutations)
        steps.append((f"{j}.", fn))

    def run(params, x, train):
        for prefix, fn in steps:
            x = fn({k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}, x,
                   train)
        return x
    return run, shape


def channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def normalize(x, axes, eps, unbiased=False, eps_outside=False):
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)
    if unbiased:
        m = math.prod(x.shape[a] for a in axes)
        var = var * m / (m - 1)
    if eps_outside:
        return (x - mean) / (jnp.sqrt(var) + eps)
    return (x - mean) / jnp.sqrt(var + eps)


def build_layer(config, shape, mutations):      # noqa: C901 (one branch per layer type)
    kind = config["type"]
    c = {**DEFAULTS.get(kind, {}), **config}
    ndim = len(shape) + 1
    if kind == "dense":
        def f(p, x, train):
            y = jnp.matmul(x, p["weight"].T, precision=jax.lax.Precision.HIGHEST)
            return y + p["bias"] if c["bias"] else y
        return f, shape[:-1] + (c["out"],)
    if kind == "conv2d":
        (kh, kw), (sh, sw), (dh, dw) = pair(c["kernel_size"]), pair(c["stride"]), pair(c["dilation"])
        if c["padding"] == "valid":
            pads = [(0, 0), (0, 0)]
        elif c["padding"] == "same":
            pads = [(t // 2, t - t // 2) for t in (dh * (kh - 1), dw * (kw - 1))]
        else:
            pads = [(p, p) for p in pair(c["padding"])]
        out_h = (shape[1] + sum(pads[0]) - dh * (kh - 1) - 1) // sh + 1
        out_w = (shape[2] + sum(pads[1]) - dw * (kw - 1) - 1) // sw + 1

        def f(p, x, train):
            w = p["weight"][:, :, ::-1, ::-1] if "flipped_conv_kernel" in mutations else p["weight"]
            y = jax.lax.conv_general_dilated(x, w, (sh, sw), pads, rhs_dilation=(dh, dw),
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                             feature_group_count=c["groups"],
                                             precision=jax.lax.Precision.HIGHEST)
            return y + channel(p["bias"], 4) if c["bias"] else y
        return f, (c["out_channels"], out_h, out_w)
    if kind in ("maxpool2d", "avgpool2d"):
        k = pair(c["kernel_size"])
        s = k if c["stride"] is None else pair(c["stride"])
        pad, dil = pair(c["padding"]), pair(c.get("dilation", 1))
        (rows, rb), (cols, cb) = (axis_windows(shape[1 + a], k[a], s[a], pad[a], dil[a],
                                               c["ceil_mode"]) for a in (0, 1))
        index, valid = gather_plan(rows, cols, shape[2])
        out_hw = (len(rows), len(cols))
        if kind == "maxpool2d":
            last = "last_maximum_ties" in mutations
            return (lambda p, x, train: pool(x, index, valid, out_hw, "max", last=last),
                    (shape[0],) + out_hw)
        include = (c["count_include_pad"] or "avgpool_count_padding_always" in mutations) and \
            "avgpool_exclude_padding" not in mutations
        if c["divisor_override"] is not None:
            divisor = np.full(index.shape[1], float(c["divisor_override"]))
        elif include:
            divisor = np.array([(h1 - h0) * (w1 - w0) for h0, h1 in rb for w0, w1 in cb], float)
        else:
            divisor = valid.sum(axis=0).astype(float)
        return (lambda p, x, train: pool(x, index, valid, out_hw, "avg", divisor),
                (shape[0],) + out_hw)
    if kind in ("adaptive_maxpool2d", "adaptive_avgpool2d"):
        oh, ow = pair(c["output_size"])
        rows, _ = adaptive_windows(shape[1], oh)
        cols, _ = adaptive_windows(shape[2], ow)
        index, valid = gather_plan(rows, cols, shape[2])
        out_hw = (len(rows), len(cols))
        if kind == "adaptive_maxpool2d":
            return lambda p, x, train: pool(x, index, valid, out_hw, "max"), (shape[0],) + out_hw
        divisor = valid.sum(axis=0).astype(float)
        return (lambda p, x, train: pool(x, index, valid, out_hw, "avg", divisor),
                (shape[0],) + out_hw)
    if kind == "global_avgpool":
        return lambda p, x, train: jnp.mean(x, axis=(2, 3), keepdims=True), (shape[0], 1, 1)
    if kind == "flatten":
        return lambda p, x, train: x.reshape(x.shape[0], -1), (math.prod(shape),)
    if kind in ("batchnorm", "instancenorm2d"):
        axes = (0,) + tuple(range(2, ndim)) if kind == "batchnorm" else (2, 3)

        def f(p, x, train):
            if train or not c["track_running_stats"]:
                y = normalize(x, axes, c["eps"], unbiased="unbiased_batchnorm_variance" in
                              mutations and kind == "batchnorm")
            else:        # eval: the running statistics, which sit in params (not differentiated)
                y = (x - channel(p["running_mean"], ndim)) / jnp.sqrt(
                    channel(p["running_var"], ndim) + c["eps"])
            return y * channel(p["weight"], ndim) + channel(p["bias"], ndim) if c["affine"] else y
        return f, shape
    if kind == "layernorm":
        normalized = tuple(c.get("normalized_shape", shape))
        axes = tuple(range(ndim - len(normalized), ndim))

        def f(p, x, train):
            y = normalize(x, axes, c["eps"], eps_outside="layernorm_eps_outside_root" in mutations)
            if c["elementwise_affine"]:
                y = y * p["weight"] + (p["bias"] if c["bias"] else 0)
            return y
        return f, shape
    if kind == "groupnorm":
        def f(p, x, train):
            y = normalize(x.reshape(x.shape[0], c["num_groups"], -1), (2,), c["eps"])
            y = y.reshape(x.shape)
            return y * channel(p["weight"], ndim) + channel(p["bias"], ndim) if c["affine"] else y
        return f, shape
    if kind in ("rnn", "lstm", "gru"):
        return (lambda p, x, train: recurrent(kind, c, p, x, mutations),
                (shape[0], c["hidden_size"]) if c["output"] == "sequence" else (c["hidden_size"],))
    if kind == "residual":
        body, out = build(c["body"], shape, mutations)
        short = None if c["shortcut"] == "identity" else build(c["shortcut"], shape, mutations)[0]

        def f(p, x, train):
            sub = lambda pre: {k[len(pre):]: v for k, v in p.items() if k.startswith(pre)}  # noqa
            s = x if short is None else short(sub("shortcut."), x, train)
            return s + c["scale"] * body(sub("body."), x, train)
        return f, out
    return (lambda p, x, train: activation(kind, c, p, x, mutations)), shape


def recurrent(kind, c, p, x, mutations):
    """torch's nn.RNN / nn.LSTM / nn.GRU, batch first, h_{-1} = c_{-1} = 0 (spec/operations.md,
    "Recurrent layers"): x (N, T, F) -> the top layer's h_t for every t, or the last one."""
    hi, sig = jax.lax.Precision.HIGHEST, jax.nn.sigmoid
    seq = x
    for k in range(c["num_layers"]):
        w_ih, w_hh = p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"]
        b_ih = p[f"bias_ih_l{k}"] if c["bias"] else 0.0
        b_hh = p[f"bias_hh_l{k}"] if c["bias"] else 0.0
        h = jnp.zeros((x.shape[0], c["hidden_size"]), dtype=x.dtype)
        cell, outs = jnp.zeros_like(h), []
        for t in range(seq.shape[1]):
            u = jnp.matmul(seq[:, t], w_ih.T, precision=hi) + b_ih
            if kind == "rnn":
                a = u + jnp.matmul(h, w_hh.T, precision=hi) + b_hh
                h = jnp.tanh(a) if c["nonlinearity"] == "tanh" else jnp.where(a > 0, a, 0.0)
            elif kind == "lstm":
                gates = jnp.split(u + jnp.matmul(h, w_hh.T, precision=hi) + b_hh, 4, axis=1)
                i, f, g, o = ((gates[0], gates[2], gates[1], gates[3])
                              if "lstm_gate_order_icfo" in mutations else gates)
                cell = sig(f) * cell + sig(i) * jnp.tanh(g)
                h = sig(o) * jnp.tanh(cell)
            else:
                ur, uz, un = jnp.split(u, 3, axis=1)
                wr, wz, wn = jnp.split(w_hh, 3, axis=0)
                br, bz, bn = jnp.split(b_hh, 3) if c["bias"] else (0.0, 0.0, 0.0)
                r = sig(ur + jnp.matmul(h, wr.T, precision=hi) + br)
                z = sig(uz + jnp.matmul(h, wz.T, precision=hi) + bz)
                if "gru_reset_before_matmul" in mutations:
                    n = jnp.tanh(un + jnp.matmul(r * h, wn.T, precision=hi) + bn)
                else:
                    n = jnp.tanh(un + r * (jnp.matmul(h, wn.T, precision=hi) + bn))
                h = (1 - z) * n + z * h
            outs.append(h)
        seq = jnp.stack(outs, axis=1)
    return seq if c["output"] == "sequence" else seq[:, -1]


def activation(kind, c, p, z, mutations):       # noqa: C901
    zero = jnp.zeros_like(z)
    neg = jnp.where(z > 0, zero, z)             # z clamped to <= 0 by where: derivative 1 or 0
    if kind == "identity":
        return z
    if kind == "sigmoid":
        return 1 / (1 + jnp.exp(-z)) if "sigmoid_naive_form" in mutations else jax.nn.sigmoid(z)
    if kind == "tanh":
        if "tanh_naive_form" in mutations:
            return (jnp.exp(2 * z) - 1) / (jnp.exp(2 * z) + 1)
        return jnp.tanh(z)
    if kind == "relu":
        return jnp.where(z >= 0 if "relu_grad_one_at_zero" in mutations else z > 0, z, zero)
    if kind == "leaky_relu":
        if "leaky_relu_grad_one_at_zero" in mutations:
            return jax.nn.leaky_relu(z, c["slope"])
        return jnp.where(z > 0, z, c["slope"] * z)
    if kind == "prelu":
        a = p["weight"]
        a = channel(a, z.ndim) if a.size > 1 else a
        return jnp.where(z >= 0 if "prelu_grad_one_at_zero" in mutations else z > 0, z, a * z)
    if kind in ("elu", "selu"):
        alpha = c["alpha"] if kind == "elu" else SELU_ALPHA
        linear = z >= 0 if "elu_grad_one_at_zero" in mutations else z > 0
        y = jnp.where(linear, z, alpha * jnp.expm1(neg))
        return SELU_LAMBDA * y if kind == "selu" else y
    if kind == "celu":
        return jnp.where(z > 0, z, c["alpha"] * jnp.expm1(neg / c["alpha"]))
    if kind == "gelu":
        if c["approximate"] == "tanh" or "gelu_tanh_form" in mutations:
            return 0.5 * z * (1 + jnp.tanh(SQRT_2_OVER_PI * (z + 0.044715 * z ** 3)))
        return 0.5 * z * jax.scipy.special.erfc(-z / np.sqrt(2.0))
    if kind == "softplus":
        bz = c["beta"] * z
        if "softplus_no_threshold" in mutations:
            return jax.nn.softplus(bz) / c["beta"]
        linear = (bz >= c["threshold"] if "softplus_linear_at_threshold" in mutations
                  else bz > c["threshold"])
        capped = jnp.where(linear, c["threshold"], bz)
        return jnp.where(linear, z, jnp.log1p(jnp.exp(capped)) / c["beta"])
    if kind == "silu":
        return z * jax.nn.sigmoid(z)
    if kind == "mish":
        return z * jnp.tanh(jax.nn.softplus(z))
    if kind in ("hardtanh", "relu6"):
        lo, hi = (c["min_val"], c["max_val"]) if kind == "hardtanh" else (0.0, 6.0)
        return jnp.where((z > lo) & (z < hi), z, jnp.where(z <= lo, zero + lo, zero + hi))
    if kind == "hardsigmoid":
        return jnp.where((z > -3) & (z < 3), (z + 3) / 6, jnp.where(z <= -3, zero, zero + 1))
    if kind == "hardswish":
        return jnp.where(z <= -3, zero, jnp.where(z >= 3, z, z * (z + 3) / 6))
    if kind == "softsign":
        return z / (1 + jnp.abs(z))
    if kind == "logsigmoid":
        return jax.nn.log_sigmoid(z)
    raise NotImplementedError(f"layer type {kind!r}")


def loss_fn(spec, z, y, u=None):
    """The loss by the guide (spec/model-format.md "Losses", spec/conformance.md): torch's
    functions with their options; returns (the scalar to differentiate, the stored loss output:
    ℓ for reduction "none", whose gradient is that of Σ u·ℓ)."""
    kind, reduction = spec["type"], spec.get("reduction", "mean")
    divisor = None
    if kind in ("mse", "l1", "smooth_l1", "huber"):
        d = z - y
        a = d * jnp.sign(d)                  # |d| with torch's derivative 0 at d = 0
        if kind == "mse":
            terms = d * d
        elif kind == "l1":
            terms = a
        elif kind == "smooth_l1":
            beta = spec.get("beta", 1.0)
            terms = a if beta == 0 else jnp.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta)
        else:
            delta = spec.get("delta", 1.0)
            terms = jnp.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))
    elif kind == "bce_with_logits":
        softplus_neg = jnp.maximum(-z, 0) + jnp.log1p(jnp.exp(-jnp.abs(z)))   # −log σ(z)
        p = 1.0 if spec.get("pos_weight") is None else jnp.asarray(spec["pos_weight"], z.dtype)
        terms = (1 - y) * z + (1 + (p - 1) * y) * softplus_neg
        if spec.get("weight") is not None:
            terms = terms * jnp.asarray(spec["weight"], z.dtype)
    elif kind in ("softmax_cross_entropy", "nll"):
        logp = jax.nn.log_softmax(z, axis=1) if kind == "softmax_cross_entropy" else z
        c = z.shape[1]
        w = (np.ones(c) if spec.get("weight") is None else np.asarray(spec["weight"], float))
        wz = jnp.asarray(w, z.dtype).reshape((1, c) + (1,) * (z.ndim - 2))
        eps = spec.get("label_smoothing", 0.0)
        if jnp.issubdtype(y.dtype, jnp.floating):       # class probabilities
            q = (y * (1 - eps) + eps / c) * wz
        else:
            labels = np.asarray(y)
            kept = labels != spec.get("ignore_index", -100)
            safe = np.where(kept, labels, 0)
            onehot = jax.nn.one_hot(jnp.asarray(safe), c, axis=1, dtype=z.dtype)
            q = ((1 - eps) * onehot + eps / c) * wz * jnp.asarray(np.expand_dims(kept, 1),
                                                                  z.dtype)
            divisor = float(np.sum(w[safe[kept]]))    # the weighted mean's Σ w[y], kept only
        terms = -jnp.sum(q * logp, axis=1)
    else:
        raise NotImplementedError(f"loss {kind!r}")
    if reduction == "none":
        return jnp.sum((jnp.ones_like(terms) if u is None else u) * terms), terms
    total = jnp.sum(terms) if reduction == "sum" else jnp.sum(terms) / (
        terms.size if divisor is None else divisor)
    return total, total


# --- one vector, and the comparison of the guide ----------------------------------------------

def forward_backward(v, dtype, mutations=frozenset()):
    spec = v["model"]
    run, _ = build(spec["layers"], tuple(spec["input_shape"]), mutations)
    jd = jnp.float64 if dtype == "float64" else jnp.float32
    cast = lambda a: jnp.asarray(a, dtype=jd)                         # noqa: E731
    params = {k: cast(tensor(t)) for k, t in v["params"].items()}
    # Buffers (running statistics, batch counts) sit in params but get no gradient: the
    # differentiated names are those of v["grads"] other than "x".
    learn = [k for k in v["grads"] if k != "x"]
    fixed = {k: t for k, t in params.items() if k not in learn}
    train = v["mode"] == "train"
    x = cast(tensor(v["inputs"]["x"]))
    f = lambda w, xx: run({**w, **fixed}, xx, train)                  # noqa: E731
    w = {k: params[k] for k in learn}
    if v["upstream"] == "loss":
        y_in = v["inputs"]["y"]
        y = jnp.asarray(tensor(y_in)) if "labels" in y_in else cast(tensor(y_in))
        u = cast(tensor(v["inputs"]["upstream"])) if "upstream" in v["inputs"] else None

        def objective(w, xx):
            o = f(w, xx)
            total, stored = loss_fn(spec["loss"], o, y, u)
            return total, (o, stored)
        (_, (out, stored)), (gw, gx) = jax.value_and_grad(objective, argnums=(0, 1),
                                                          has_aux=True)(w, x)
        outputs = {"output": out, "loss": jnp.reshape(stored, (-1,))}
    else:
        out, vjp = jax.vjp(f, w, x)
        gw, gx = vjp(cast(tensor(v["inputs"]["dy"])))
        outputs = {"output": out}
    return ({k: np.asarray(a, dtype=np.float64) for k, a in outputs.items()},
            {**{k: np.asarray(a, dtype=np.float64) for k, a in gw.items()},
             "x": np.asarray(gx, dtype=np.float64)})


def compare(ref, got, dtype, strict_kinks):
    """The guide's rule: |got − want| ≤ ulps·ulp_d(want) + abs, ulp in the checked dtype."""
    want = np.array([float.fromhex(h) for h in ref[dtype]])
    tol = ref["tolerance"][dtype]
    d = np.float64 if dtype == "float64" else np.float32
    ulp = np.spacing(np.abs(want).astype(d)).astype(np.float64)
    err = np.abs(np.ravel(got) - want)
    ok = err <= tol["ulps"] * ulp + tol["abs"]
    if not strict_kinks:
        ok |= np.array(ref.get("kink", [False] * err.size))
    return bool(ok.all() and np.isfinite(got).all())


def check(directory, dtype="float64", strict_kinks=True, mutations=frozenset(), names=None):
    """The (vector, tensor) pairs that fail, of every vector (or of those ``names``); every
    vector runs in one float64 or float32 scope."""
    failures = []
    paths = sorted(glob.glob(os.path.join(directory, "*.json")))
    if names is not None:
        paths = [os.path.join(directory, f"{n}.json") for n in names]
    with jax.enable_x64(dtype == "float64"):
        for path in paths:
            v = json.load(open(path))
            out, grads = forward_backward(v, dtype, mutations)
            for group, got in (("outputs", out), ("grads", grads)):
                for name, ref in v[group].items():
                    if not compare(ref, got[name], dtype, strict_kinks):
                        failures.append((v["name"], f"{group}/{name}"))
    return failures


if __name__ == "__main__":
    where = sys.argv[1] if len(sys.argv) > 1 else "spec/vectors"
    for dt in ("float64", "float32"):
        print(dt, check(where, dt) or "every vector passes (kinks compared strictly)")
