"""The JAX twin of a refnet model, for ``refnet conformance --framework jax`` (CPU). Needs jax
(``pip install 'refnet[jax]'``; imported here, never by refnet itself).

Each layer is written in ``jax.numpy`` with **torch's** conventions, which the golden vectors
pin, where JAX's own differ:

- at kinks, the derivative torch takes: relu′(0) = 0, leaky_relu′(0) = slope (``jax.nn.
  leaky_relu`` gives 1), prelu′(0) = a, elu′(0) = α, hardtanh′ = 0 at both limits, relu6′ = 0 at
  0 and 6, hardsigmoid′ = 0 at ±3, hardswish′ = 0 at −3 and 1 at 3, softplus's smooth branch at
  βz = threshold (torch's test βz > threshold). Every kink is a ``jnp.where`` on torch's
  condition: ``jnp.maximum``/``jnp.clip`` split a tie's gradient in halves (relu′(0) = ½);
- max pooling sends the gradient to the *first* maximum of a window (row-major), by an explicit
  ``argmax`` (``jnp.max`` shares it equally between ties);
- ``where`` never sees an inf on its untaken side (expm1 and exp get z clamped to ≤ 0, βz to
  ≤ threshold): JAX's gradient of ``where`` multiplies the untaken side's derivative by 0, and
  0·inf is NaN. The clamps are ``where``s too — ``jnp.minimum(z, 0)`` has derivative ½ at
  z = 0, which made elu′(0) = α/2.

Recurrent layers (rnn, lstm, gru) are torch's definitions written as a loop over time steps:
gate order (i, f, g, o) and (r, z, n), GRU's n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),
h_{−1} = c_{−1} = 0, relu′(0) = 0 by a ``where``.

Window geometry (padding, ceil mode, dilation, adaptive windows) and average-pool divisors are
taken from the refnet layer (``layer.windows``, ``layer.divisor``): the torch conformance run and
``tests/jax_adapter_independent.py`` (written from ``spec/conformance.md`` alone, with its own
geometry) check those. Dense and conv products run at ``Precision.HIGHEST``.

float64 runs inside a scoped ``jax.enable_x64(True)``: the process-wide ``jax_enable_x64`` flag
is never changed.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..losses import split_targets
from ..model import Model
from .vectors import stored_inputs

SQRT_2_OVER_PI = 0.7978845608028654           # √(2/π), torch's kBeta in float64
GELU_TANH_COEFF = 0.044715
SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


def x64(enabled: bool):
    """A context in which JAX computes in float64 (``enabled``) or as configured: the scoped
    ``jax.enable_x64`` (jax ≥ 0.10, the ``jax`` extra's range), which restores the flag on exit."""
    import jax
    return jax.enable_x64(True) if enabled else contextlib.nullcontext()


def _activation(kind, c, z, params, jnp, jax):
    zero = jnp.zeros_like(z)
    if kind == "identity":
        return z
    if kind == "sigmoid":
        return jax.nn.sigmoid(z)
    if kind == "tanh":
        return jnp.tanh(z)
    if kind == "relu":
        return jnp.where(z > 0, z, zero)
    if kind == "leaky_relu":
        return jnp.where(z > 0, z, c["slope"] * z)
    if kind == "prelu":
        a = params["weight"]
        if a.size > 1:                                   # one slope per channel, axis 1
            a = a.reshape((1, -1) + (1,) * (z.ndim - 2))
        return jnp.where(z > 0, z, a * z)
    if kind in ("elu", "selu"):
        alpha = c["alpha"] if kind == "elu" else SELU_ALPHA
        out = jnp.where(z > 0, z, alpha * jnp.expm1(jnp.where(z > 0, zero, z)))
        return SELU_LAMBDA * out if kind == "selu" else out
    if kind == "gelu":
        if c["approximate"] == "tanh":
            inner = SQRT_2_OVER_PI * (z + GELU_TANH_COEFF * z * z * z)
            return 0.5 * z * (1 + jnp.tanh(inner))
        return 0.5 * z * jax.scipy.special.erfc(-z / np.sqrt(2.0))
    if kind == "softplus":
        beta, threshold = c["beta"], c["threshold"]
        bz = beta * z
        smooth = jnp.log1p(jnp.exp(jnp.where(bz > threshold, threshold, bz))) / beta
        return jnp.where(bz > threshold, z, smooth)
    if kind == "scaled_sigmoid":
        return 2 * jnp.tanh(z / 2)
    if kind == "silu":
        return z * jax.nn.sigmoid(z)
    if kind == "mish":
        return z * jnp.tanh(jax.nn.softplus(z))
    if kind in ("hardtanh", "relu6"):
        lo, hi = (c["min_val"], c["max_val"]) if kind == "hardtanh" else (0.0, 6.0)
        return jnp.where((z > lo) & (z < hi), z, jnp.where(z <= lo, lo + zero, hi + zero))
    if kind == "hardsigmoid":
        return jnp.where((z > -3) & (z < 3), (z + 3) / 6, jnp.where(z <= -3, zero, 1 + zero))
    if kind == "hardswish":
        return jnp.where(z <= -3, zero, jnp.where(z >= 3, z, z * (z + 3) / 6))
    if kind == "celu":
        alpha = c["alpha"]
        return jnp.where(z > 0, z, alpha * jnp.expm1(jnp.where(z > 0, zero, z) / alpha))
    if kind == "softsign":
        return z / (1 + jnp.abs(z))
    if kind == "logsigmoid":
        return jax.nn.log_sigmoid(z)
    return None


def _gather_windows(x, windows, fill, jnp):
    """(N, C, K, L): window position k of output l (``windows.flat``), ``fill`` outside."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)[:, :, windows.flat]
    return jnp.where(windows.valid, flat, fill)


def _norm(x, axes, eps, jnp):
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)         # biased, as torch
    return (x - mean) / jnp.sqrt(var + eps)


def _channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _layer(layer, params, x, train, jnp, jax):
    kind, c = layer.type, layer.config
    sub = lambda prefix: {k[len(prefix):]: v for k, v in params.items()       # noqa: E731
                          if k.startswith(prefix)}
    hi = jax.lax.Precision.HIGHEST
    if kind == "dense":
        y = jnp.matmul(x, params["weight"].T, precision=hi)
        return y + params["bias"] if c["bias"] else y
    if kind == "conv2d":
        win = layer.windows
        top, bottom, left, right = win.padding
        y = jax.lax.conv_general_dilated(
            x, params["weight"], window_strides=win.stride,
            padding=[(top, bottom), (left, right)], rhs_dilation=win.dilation,
            dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=layer.groups,
            precision=hi)
        return y + _channel(params["bias"], 4) if c["bias"] else y
    if kind in ("maxpool2d", "adaptive_maxpool2d"):
        values = _gather_windows(x, layer.windows, -jnp.inf, jnp)             # (N, C, K, L)
        first = jnp.argmax(values, axis=2)                                    # first maximum
        y = jnp.take_along_axis(values, first[:, :, None, :], axis=2)[:, :, 0, :]
        return y.reshape((x.shape[0],) + layer.out_shape)
    if kind in ("avgpool2d", "adaptive_avgpool2d"):
        total = jnp.sum(_gather_windows(x, layer.windows, 0.0, jnp), axis=2)
        y = total / jnp.asarray(layer.divisor, dtype=x.dtype)
        return y.reshape((x.shape[0],) + layer.out_shape)
    if kind == "global_avgpool":
        return jnp.mean(x, axis=(2, 3), keepdims=True)
    if kind == "flatten":
        return x.reshape(x.shape[0], -1)
    if kind in ("batchnorm", "instancenorm2d"):
        batch_axes = (0,) + tuple(range(2, x.ndim)) if kind == "batchnorm" else (2, 3)
        use_batch = train or not c["track_running_stats"]
        if use_batch:
            y = _norm(x, batch_axes, c["eps"], jnp)
        else:
            mean, var = (_channel(params[k], x.ndim) for k in ("running_mean", "running_var"))
            y = (x - mean) / jnp.sqrt(var + c["eps"])
        affine = c["affine"]
        return y * _channel(params["weight"], x.ndim) + _channel(params["bias"], x.ndim) \
            if affine else y
    if kind == "layernorm":
        axes = tuple(range(x.ndim - len(layer.normalized_shape), x.ndim))
        y = _norm(x, axes, c["eps"], jnp)
        if c["elementwise_affine"]:
            y = y * params["weight"]
            if c["bias"]:
                y = y + params["bias"]
        return y
    if kind == "groupnorm":
        n = x.shape[0]
        grouped = x.reshape((n, layer.groups, -1))
        y = _norm(grouped, (2,), c["eps"], jnp).reshape(x.shape)
        if c["affine"]:
            y = y * _channel(params["weight"], x.ndim) + _channel(params["bias"], x.ndim)
        return y
    if kind in ("dropout", "dropout2d"):
        if not train or c["p"] == 0:
            return x
        raise NotImplementedError(f"{layer.where}: the JAX twin has no dropout masks (train "
                                  f"mode with p > 0)")
    if kind in ("rnn", "lstm", "gru"):
        return _recurrent(layer, params, x, jnp, jax, hi)
    if kind == "residual":
        body = _sequence(layer.body.layers, sub("body."), x, train, jnp, jax)
        short = x if layer.shortcut is None else _sequence(layer.shortcut.layers,
                                                           sub("shortcut."), x, train, jnp, jax)
        return short + c["scale"] * body
    y = _activation(kind, c, x, params, jnp, jax)
    if y is None:
        raise NotImplementedError(f"{layer.where}: no JAX twin for layer type {kind!r}")
    return y


def _recurrent(layer, params, x, jnp, jax, hi):
    """torch's nn.RNN / nn.LSTM / nn.GRU (batch first) over x (N, T, F): the top layer's
    output sequence, or its last step."""
    kind, c, hidden = layer.type, layer.config, layer.hidden
    sig = jax.nn.sigmoid
    seq = x
    for k in range(layer.num_layers):
        w_ih, w_hh = params[f"weight_ih_l{k}"], params[f"weight_hh_l{k}"]
        b_ih = params[f"bias_ih_l{k}"] if c["bias"] else 0.0
        b_hh = params[f"bias_hh_l{k}"] if c["bias"] else 0.0
        h = jnp.zeros((x.shape[0], hidden), dtype=x.dtype)
        cell = jnp.zeros_like(h)
        outs = []
        for t in range(seq.shape[1]):
            u = jnp.matmul(seq[:, t], w_ih.T, precision=hi) + b_ih
            v = jnp.matmul(h, w_hh.T, precision=hi) + b_hh
            if kind == "rnn":
                a = u + v
                h = jnp.tanh(a) if c["nonlinearity"] == "tanh" else jnp.where(a > 0, a, 0.0)
            elif kind == "lstm":
                zi, zf, zg, zo = jnp.split(u + v, 4, axis=1)
                cell = sig(zf) * cell + sig(zi) * jnp.tanh(zg)
                h = sig(zo) * jnp.tanh(cell)
            else:
                ur, uz, un = jnp.split(u, 3, axis=1)
                vr, vz, vn = jnp.split(v, 3, axis=1)
                r, z = sig(ur + vr), sig(uz + vz)
                n = jnp.tanh(un + r * vn)
                h = (1 - z) * n + z * h
            outs.append(h)
        seq = jnp.stack(outs, axis=1)
    return seq if c["output"] == "sequence" else seq[:, -1]


def _sequence(layers, params, x, train, jnp, jax):
    for j, layer in enumerate(layers):
        prefix = f"{j}."
        x = _layer(layer, {k[len(prefix):]: v for k, v in params.items()
                           if k.startswith(prefix)}, x, train, jnp, jax)
    return x


def _loss(model: Model, z, y, upstream, jnp, jax):
    """The model's loss in JAX with every option refnet has, by torch's definitions
    (refnet/losses.py): ℓ per element or sample, then the reduction — "mean" over ℓ's elements,
    or over Σ w[y] of the labels not ignored for class labels; "sum"; "none" as Σ u·ℓ with the
    vector's upstream u (what refnet differentiates). Returns (that scalar, the loss output a
    vector stores: ℓ itself for "none", else the scalar)."""
    loss = model.loss
    kind, reduction = loss.type, loss.reduction
    dtype = z.dtype
    count = None
    if kind in ("mse", "l1", "smooth_l1", "huber"):
        d = z - y
        # |d| as d·sign(d): its derivative is sign(d), 0 at d = 0 as torch's (jnp.abs' is 1).
        a = d * jnp.sign(d)
        if kind == "mse":
            ell = d * d
        elif kind == "l1":
            ell = a
        elif kind == "smooth_l1":
            b = loss.beta
            ell = a if b == 0 else jnp.where(a < b, 0.5 * d * d / b, a - 0.5 * b)
        else:
            t = loss.delta
            ell = jnp.where(a < t, 0.5 * d * d, t * (a - 0.5 * t))
    elif kind == "bce_with_logits":
        e = jnp.log1p(jnp.exp(-jnp.abs(z)))
        ell = jnp.maximum(z, 0) - z * y + e
        if loss.pos_weight is not None:
            p = jnp.asarray(loss.pos_weight, dtype=dtype)
            ell = ell + (p - 1) * y * (jnp.maximum(-z, 0) + e)
        if loss.weight is not None:
            ell = ell * jnp.asarray(loss.weight, dtype=dtype)
    elif kind in ("softmax_cross_entropy", "nll"):
        logp = jax.nn.log_softmax(z, axis=1) if kind == "softmax_cross_entropy" else z
        classes = z.shape[1]
        w = (jnp.ones(classes, dtype=dtype) if loss.weight is None
             else jnp.asarray(loss.weight, dtype=dtype)).reshape((1, classes) + (1,) * (z.ndim - 2))
        eps = getattr(loss, "smoothing", 0.0)
        if jnp.issubdtype(y.dtype, jnp.floating):          # class probabilities t
            q = (y * (1 - eps) + eps / classes) * w
        else:
            labels = np.asarray(y)
            kept = labels != loss.ignore_index
            onehot = jax.nn.one_hot(jnp.asarray(np.where(kept, labels, 0)), classes, axis=1,
                                    dtype=dtype)
            q = ((1 - eps) * onehot * w + (eps / classes) * w) * jnp.asarray(
                np.expand_dims(kept, 1), dtype=dtype)
            count = loss._total_weight(labels)[0]          # Σ w[y] of the kept labels
        ell = -jnp.sum(q * logp, axis=1)
    else:
        raise NotImplementedError(f"loss: no JAX twin for loss type {kind!r}")
    if reduction == "none":
        u = jnp.ones_like(ell) if upstream is None else jnp.asarray(upstream, dtype=dtype)
        return jnp.sum(u * ell), ell
    total = jnp.sum(ell) if reduction == "sum" else (
        jnp.sum(ell) / (ell.size if count is None else count))
    return total, total


def run_jax(record: dict, dtype: str):
    """(outputs, grads) of one vector computed by JAX on the CPU, as float64 numpy arrays.
    Inputs and parameters are cast to ``dtype`` first; buffers (running statistics) are inputs,
    never differentiated."""
    import jax
    import jax.numpy as jnp

    model = Model(record["model"])
    params, x, y, dy = stored_inputs(record)
    train = record["mode"] == "train"
    learnable = list(model.param_shapes())
    with x64(dtype == "float64"):
        jdtype = jnp.float64 if dtype == "float64" else jnp.float32
        cast = lambda a: jnp.asarray(np.asarray(a), dtype=jdtype)     # noqa: E731
        buffers = {k: cast(v) for k, v in params.items() if k not in learnable}
        weights = {k: cast(params[k]) for k in learnable}
        forward = lambda w, xx: _sequence(model.layers, {**w, **buffers}, xx, train,  # noqa
                                          jnp, jax)
        jx = cast(x)
        if record["upstream"] == "loss":
            y, upstream = split_targets(y)
            y = np.asarray(y)
            target = jnp.asarray(y) if y.dtype.kind in "iu" else cast(y)
            upstream = None if upstream is None else cast(upstream)

            def objective(w, xx):
                out = forward(w, xx)
                total, stored = _loss(model, out, target, upstream, jnp, jax)
                return total, (out, stored)

            (_, (out, stored)), (gw, gx) = jax.value_and_grad(objective, argnums=(0, 1),
                                                              has_aux=True)(weights, jx)
            outputs = {"output": np.asarray(out, dtype=np.float64),
                       "loss": np.asarray(stored, dtype=np.float64).reshape(-1)}
        else:
            out, vjp = jax.vjp(forward, weights, jx)
            gw, gx = vjp(cast(dy))
            outputs = {"output": np.asarray(out, dtype=np.float64)}
        grads = {k: np.asarray(v, dtype=np.float64) for k, v in gw.items()}
        grads["x"] = np.asarray(gx, dtype=np.float64)
    return outputs, grads
