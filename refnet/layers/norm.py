"""BatchNorm and LayerNorm: normalize over some axes, then an optional affine map.

Over the m values of each normalization group (BatchNorm: one channel over batch and positions;
LayerNorm: one sample over its trailing dims)::

    forward   μ = Σx/m,  σ² = Σ(x − μ)²/m  (biased),  s = √(σ² + ε),  x̂ = (x − μ)/s,  y = γ x̂ + β
    backward  dx̂ = γ·dy
              dx = (1/(m·s))·(m·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂))      (through μ and σ² too)
              dγ = Σ dy·x̂,   dβ = Σ dy                      (summed over the other axes)

The input gradient sums to zero over each group (Σdx = 0), so a bias right before BatchNorm
gets zero gradient; Σ dx·x̂ = (γ/s)·Σ(dy·x̂)·ε/(σ² + ε), which vanishes only at ε = 0.

batchnorm (torch BatchNorm1d/2d; input (N, C) or (N, C, *spatial), channels on axis 1)
    config: eps 1e-5, momentum 0.1, affine true, track_running_stats true
    parameters weight (C) = 1, bias (C) = 0; buffers running_mean (C) = 0, running_var (C) = 1,
    num_batches_tracked () = 0
    train: batch statistics; the running statistics are updated as torch does,
           new = (1 − momentum)·old + momentum·batch, with the *unbiased* variance σ²·m/(m − 1),
           and num_batches_tracked += 1 (returned in ``state.updates``; the forward pass itself
           never mutates its inputs). One value per channel (m = 1) is an error, as in torch.
    eval:  y = γ (x − running_mean)/√(running_var + ε) + β, an affine map; dx = dy·γ/√(rv + ε).
           (track_running_stats false: batch statistics in both modes, as torch.)
layernorm (torch LayerNorm; normalizes each sample over its last len(normalized_shape) dims)
    config: normalized_shape (default: the whole sample shape), eps 1e-5,
    elementwise_affine true, bias true; parameters weight, bias of normalized_shape
"""

from __future__ import annotations

import numpy as np

from ..validate import require_number
from .base import Layer


def normalize(bk, x, axes, eps):
    """(x̂, s, m): x normalized over ``axes`` with biased variance, s = √(σ² + ε)."""
    m = int(np.prod([x.shape[a] for a in axes]))
    mean = bk.sum(x, axis=axes, keepdims=True) / m
    centred = x - mean
    var = bk.sum(centred * centred, axis=axes, keepdims=True) / m
    std = bk.sqrt(var + eps)
    return centred / std, std, m, mean, var


def normalize_backward(bk, dxhat, xhat, std, axes, m):
    """dx from dx̂ through x̂ = (x − μ)/s, μ and s depending on x."""
    sum_d = bk.sum(dxhat, axis=axes, keepdims=True)
    sum_dx = bk.sum(dxhat * xhat, axis=axes, keepdims=True)
    return (m * dxhat - sum_d - xhat * sum_dx) / (m * std)


class BatchNorm(Layer):
    type = "batchnorm"
    defaults = {"eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True}

    def output_shape(self, in_shape):
        where, c = self.where, self.config
        if len(in_shape) < 1:
            raise ValueError(f"{where}: batchnorm expects input (N, C, ...), got a sample shape "
                             f"of {tuple(in_shape)}")
        require_number(where, "eps", c["eps"], low=0)
        require_number(where, "momentum", c["momentum"], low=0, high=1)
        for key in ("affine", "track_running_stats"):
            if not isinstance(c[key], bool):
                raise ValueError(f"{where}: {key} must be true or false, got {c[key]!r}")
        self.channels = in_shape[0]
        return tuple(in_shape)

    def _axes(self, ndim):
        return (0,) + tuple(range(2, ndim))

    def _per_channel(self, a, ndim):
        return a.reshape((1, -1) + (1,) * (ndim - 2))

    def param_shapes(self):
        return ({"weight": (self.channels,), "bias": (self.channels,)}
                if self.config["affine"] else {})

    def buffer_shapes(self):
        if not self.config["track_running_stats"]:
            return {}
        return {"running_mean": (self.channels,), "running_var": (self.channels,),
                "num_batches_tracked": ()}

    def init_params(self, rng):
        if not self.config["affine"]:
            return {}
        return {"weight": np.ones(self.channels), "bias": np.zeros(self.channels)}

    def init_buffers(self):
        if not self.config["track_running_stats"]:
            return {}
        return {"running_mean": np.zeros(self.channels), "running_var": np.ones(self.channels),
                "num_batches_tracked": np.zeros(())}

    def check_buffers(self, buffers, source):
        """Loaded buffers (float64, finite, shapes checked) hold values this layer can use: a
        running variance is >= 0 (> 0 when eps = 0: eval divides by √(running_var + ε)), and
        num_batches_tracked counts batches, a whole number >= 0 (torch stores it as int64)."""
        var = buffers.get("running_var")
        if var is not None:
            bad = (var <= 0) if self.config["eps"] == 0 else (var < 0)
            if np.any(bad):
                i = tuple(int(j) for j in np.argwhere(bad)[0])
                need = "> 0 (a variance; eps is 0)" if self.config["eps"] == 0 else ">= 0 (a variance)"
                raise ValueError(f"{source}: {self.name}.running_var ({self.where}) must be "
                                 f"{need}, got {float(var[i])!r} at index {i}")
        count = buffers.get("num_batches_tracked")
        if count is not None and not (count >= 0 and count == np.floor(count)):
            raise ValueError(f"{source}: {self.name}.num_batches_tracked ({self.where}) must be "
                             f"a whole number >= 0 (a count of batches), got {float(count)!r}")

    def forward(self, bk, params, x, state):
        ndim, eps = len(x.shape), self.config["eps"]
        axes = self._axes(ndim)
        batch_stats = state.train or not self.config["track_running_stats"]
        if batch_stats:
            m = int(np.prod([x.shape[a] for a in axes]))
            if m < 2:
                raise ValueError(f"{self.where}: expected more than 1 value per channel when "
                                 f"training, got input of shape {tuple(x.shape)}")
            if state.groups > 1:        # stacked independent batches: statistics per group
                return self._grouped_forward(bk, params, x, state), None
            xhat, std, m, mean, var = normalize(bk, x, axes, eps)
            if state.train and self.config["track_running_stats"]:
                self._update_running(bk, params, mean, var, m, state)
        else:
            mean = self._per_channel(params["running_mean"], ndim)
            std = bk.sqrt(self._per_channel(params["running_var"], ndim) + eps)
            xhat, m = (x - mean) / std, None
        y = xhat
        if self.config["affine"]:
            y = self._per_channel(params["weight"], ndim) * xhat + self._per_channel(
                params["bias"], ndim)
        return y, (xhat, std, m, axes)

    def _grouped_forward(self, bk, params, x, state):
        """Forward only, for G batches stacked on axis 0 (no backward, no running updates)."""
        g = state.groups
        shape = tuple(x.shape)
        grouped = x.reshape((g, shape[0] // g) + shape[1:])
        axes = (1,) + tuple(range(3, len(shape) + 1))
        xhat = normalize(bk, grouped, axes, self.config["eps"])[0].reshape(shape)
        if not self.config["affine"]:
            return xhat
        ndim = len(shape)
        return self._per_channel(params["weight"], ndim) * xhat + self._per_channel(
            params["bias"], ndim)

    def _update_running(self, bk, params, mean, var, m, state):
        momentum = self.config["momentum"]
        flat = lambda a: bk.to_numpy(a).reshape(-1)            # noqa: E731
        old_mean = flat(params["running_mean"])
        old_var = flat(params["running_var"])
        unbiased = flat(var) * m / (m - 1)
        state.updates[f"{self.name}.running_mean"] = (1 - momentum) * old_mean + momentum * flat(mean)
        state.updates[f"{self.name}.running_var"] = (1 - momentum) * old_var + momentum * unbiased
        state.updates[f"{self.name}.num_batches_tracked"] = (
            bk.to_numpy(params["num_batches_tracked"]) + 1)

    def backward(self, bk, params, dy, cache):
        xhat, std, m, axes = cache
        ndim = len(dy.shape)
        dxhat = dy * self._per_channel(params["weight"], ndim) if self.config["affine"] else dy
        if m is None:                                    # eval: a fixed affine map
            dx = dxhat / std
        else:
            dx = normalize_backward(bk, dxhat, xhat, std, axes, m)
        grads = {}
        if self.config["affine"]:
            grads = {"weight": bk.sum(dy * xhat, axis=axes), "bias": bk.sum(dy, axis=axes)}
        return dx, grads


class LayerNorm(Layer):
    type = "layernorm"
    autocast = "float32"
    defaults = {"normalized_shape": None, "eps": 1e-5, "elementwise_affine": True, "bias": True}

    def output_shape(self, in_shape):
        where, c = self.where, self.config
        shape = tuple(in_shape) if c["normalized_shape"] is None else c["normalized_shape"]
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(shape)
        if not shape or len(shape) > len(in_shape) or tuple(in_shape[-len(shape):]) != shape:
            raise ValueError(f"{where}: normalized_shape {list(shape)} must be the trailing "
                             f"dimensions of the sample shape {list(in_shape)}")
        require_number(where, "eps", c["eps"], low=0)
        self.normalized_shape = shape
        return tuple(in_shape)

    def param_shapes(self):
        if not self.config["elementwise_affine"]:
            return {}
        shapes = {"weight": self.normalized_shape}
        if self.config["bias"]:
            shapes["bias"] = self.normalized_shape
        return shapes

    def init_params(self, rng):
        return {name: (np.ones if name == "weight" else np.zeros)(shape)
                for name, shape in self.param_shapes().items()}

    def forward(self, bk, params, x, state=None):
        ndim = len(x.shape)
        axes = tuple(range(ndim - len(self.normalized_shape), ndim))
        xhat, std, m, _, _ = normalize(bk, x, axes, self.config["eps"])
        y = xhat
        if self.config["elementwise_affine"]:
            y = xhat * params["weight"]
            if self.config["bias"]:
                y = y + params["bias"]
        return y, (xhat, std, m, axes)

    def backward(self, bk, params, dy, cache):
        xhat, std, m, axes = cache
        affine = self.config["elementwise_affine"]
        dxhat = dy * params["weight"] if affine else dy
        dx = normalize_backward(bk, dxhat, xhat, std, axes, m)
        grads = {}
        if affine:
            batch_axes = tuple(range(len(dy.shape) - len(self.normalized_shape)))
            grads["weight"] = bk.sum(dy * xhat, axis=batch_axes)
            if self.config["bias"]:
                grads["bias"] = bk.sum(dy, axis=batch_axes)
        return dx, grads
