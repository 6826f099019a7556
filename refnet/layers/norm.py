"""BatchNorm, LayerNorm, GroupNorm, InstanceNorm2d: normalize over some axes, then an optional
affine map.

Over the m values of each normalization group (BatchNorm: one channel over batch and positions;
LayerNorm: one sample over its trailing dims; GroupNorm: one sample's C/G channels over their
positions; InstanceNorm2d: one sample's channel over its H×W positions)::

    forward   μ = Σx/m,  σ² = Σ(x − μ)²/m  (biased),  s = √(σ² + ε),  x̂ = (x − μ)/s,  y = γ x̂ + β
    backward  dx̂ = γ·dy
              dx = (1/(m·s))·(m·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂))      (through μ and σ² too)
              dγ = Σ dy·x̂,   dβ = Σ dy                      (summed over the other axes)

The input gradient sums to zero over each group (Σdx = 0), so a bias right before BatchNorm
gets zero gradient; Σ dx·x̂ = (γ/s)·Σ(dy·x̂)·ε/(σ² + ε), which vanishes only at ε = 0.

The statistics take two passes, μ first, then Σ(x − μ)² over x − μ, which x̂ needs anyway;
torch's one-pass forms are not taken: Σx² − (Σx)²/m cancels catastrophically when |μ| ≫ σ,
and Welford's update is a loop numpy cannot vectorize. The float backends run the sums of
products and the affine maps as their fused forms (``numerics.backend.sum_product``,
``muladd``: one pass each, the same bound; muladd the same bits).

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
groupnorm (torch GroupNorm; input (N, C, ...)), instancenorm2d (torch InstanceNorm2d; input
    (N, C, H, W), running statistics as torch's): see their classes below.
"""

from __future__ import annotations

import math

import numpy as np

from ..numerics.backend import muladd, sample_shaped, sum_product
from ..validate import require_number
from .base import Layer


def centre(bk, x, mean):
    """x − μ, μ broadcast over x (sample_shaped: the same values, repeated for numpy's inner
    loop): a fresh array. One expression wherever x − μ is formed, so that batchnorm's
    backward, forming it again, gets the forward's bits."""
    return x - sample_shaped(bk, mean, x.shape)


def centred_statistics(bk, x, axes, eps):
    """(x − μ, s, m, μ, σ²) over ``axes`` — normalize's order, x − μ for x̂ — biased variance,
    s = √(σ² + ε); μ, s and σ² with the reduced axes kept (size 1). x − μ is a fresh array,
    the caller's to overwrite."""
    m = math.prod(x.shape[a] for a in axes)
    mean = bk.sum(x, axis=axes, keepdims=True) / m
    centred = centre(bk, x, mean)
    kept = tuple(1 if k in axes else n for k, n in enumerate(centred.shape))
    var = sum_product(bk, centred, centred, axes).reshape(kept) / m       # Σ(x − μ)², one pass
    return centred, bk.sqrt(var + eps), m, mean, var


def normalize(bk, x, axes, eps):
    """(x̂, s, m, μ, σ²): x normalized over ``axes`` with biased variance, s = √(σ² + ε)."""
    centred, std, m, mean, var = centred_statistics(bk, x, axes, eps)
    centred /= sample_shaped(bk, std, x.shape)  # x̂, in place: x − μ is this function's own
    return centred, std, m, mean, var


def normalize_backward(bk, dxhat, xhat, std, axes, m):
    """dx from dx̂ through x̂ = (x − μ)/s, μ and s depending on x."""
    sum_d = bk.sum(dxhat, axis=axes, keepdims=True)
    kept = tuple(1 if k in axes else n for k, n in enumerate(xhat.shape))
    sum_dx = sum_product(bk, dxhat, xhat, axes).reshape(kept)
    # (m·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂)) / (m·s), evaluated in that order, updating one fresh array in
    # place (the same values as the expression, without its three other temporaries).
    dx = m * dxhat
    dx -= sum_d
    dx -= xhat * sum_dx
    dx /= m * std
    return dx


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
        """Train (or track_running_stats false): y = (x − μ)·(γ/s) + β with the batch's μ and
        s; eval: the same map with running_mean and s = √(running_var + ε). γ/s is one number
        per channel, so y takes the same three roundings as γ·x̂ + β (x̂ = (x − μ)/s), and is
        written over x − μ, this pass's own fresh array.

        The cache is (x, μ, s, m, axes) — m None in eval — not x̂: backward forms x − μ again
        (the same bits, one pass) instead of this pass keeping x̂ beside y, a third fresh array
        of the batch's size each step. Fresh arrays are what cost here: glibc hands a large one
        back to the kernel when it is freed and maps it anew, page by page, when it is next
        allocated (1000-2000 page faults a step for (32, 64, 16, 16) float64, varying from
        process to process). The benchmark's step: 1.15-1.4x faster in float64, 1.27x in
        float32 (measured, old and new code in one process and in separate ones)."""
        ndim, eps = len(x.shape), self.config["eps"]
        axes = self._axes(ndim)
        batch_stats = state.train or not self.config["track_running_stats"]
        if batch_stats:
            m = math.prod(x.shape[a] for a in axes)
            if m < 2:
                raise ValueError(f"{self.where}: expected more than 1 value per channel when "
                                 f"training, got input of shape {tuple(x.shape)}")
            if state.groups > 1:        # stacked independent batches: statistics per group
                return self._grouped_forward(bk, params, x, state), None
            centred, std, m, mean, var = centred_statistics(bk, x, axes, eps)
            if state.train and self.config["track_running_stats"]:
                self._update_running(bk, params, mean, var, m, state)
        else:
            mean = self._per_channel(params["running_mean"], ndim)
            std = bk.sqrt(self._per_channel(params["running_var"], ndim) + eps)
            centred, m = centre(bk, x, mean), None
        if self.config["affine"]:           # (x − μ)·(γ/s) + β over x − μ (muladd)
            scale = self._per_channel(params["weight"], ndim) / std
            y = muladd(bk, centred, scale, self._per_channel(params["bias"], ndim),
                       reuse=centred)
        else:
            centred /= sample_shaped(bk, std, x.shape)
            y = centred
        return y, (x, mean, std, m, axes)

    def normalized(self, cache):
        """x̂ = (x − μ)/s of a forward pass, from its cache (the FD sweep's response to γ)."""
        x, mean, std = cache[:3]
        return (x - mean) / std

    def _grouped_forward(self, bk, params, x, state):
        """Forward only, for G batches stacked on axis 0 (the FD sweep's perturbed copies; no
        backward, no running updates), each batch with its own statistics: the ungrouped
        forward's two-pass statistics (``centred_statistics``: μ = Σx/m, then σ² = Σ(x − μ)²/m,
        never Σx²/m − μ²) on the (G, N/G, C, *spatial) view over its axes 1, 3, ..., so as
        accurate. Then y = (x − μ)·(γ/s) + β written over x − μ in place: the ungrouped
        forward's two roundings after γ/s, without fresh arrays of the whole stacked batch
        (the small CNN's FD sweep: its two batchnorms 1.2x faster, measured)."""
        g = state.groups
        shape = tuple(x.shape)
        ndim = len(shape)
        grouped = x.reshape((g, shape[0] // g) + shape[1:])
        axes = (1,) + tuple(range(3, ndim + 1))
        centred, std, _, _, _ = centred_statistics(bk, grouped, axes, self.config["eps"])
        if self.config["affine"]:                           # γ, β as (1, 1, C, 1, ...)
            centred *= self._per_channel(params["weight"], ndim)[None] / std
            centred += self._per_channel(params["bias"], ndim)[None]
        else:
            centred /= std
        return centred.reshape(shape)

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
        """Train: dx = (γ/s)·(dy − Σdy/m − x̂·Σ(dy·x̂)/m), the normalize backward with γ —
        one number per channel, constant over the channel's group — taken out of the sums, so
        that its two sums are the parameter gradients dβ = Σdy and dγ = Σdy·x̂, formed once for
        both. As accurate as the form with dx̂ = γ·dy inside (the bracket cancels the same way,
        from dy itself rather than from the rounded γ·dy; tests/test_norm.py holds both to
        the mp result), and 5 passes over the batch fewer. x − μ is formed again from the
        cache (forward's bits), dγ = Σ(dy·(x − μ))/s, and dx is two muladds written over that
        array, t = dy − (x − μ)·(Σ(dy·x̂)/(m·s)) and dx = t·k − (Σdy/m)·k with k = γ/s: the
        bracket's two subtractions in the other order and its scaling distributed over them —
        each term still rounded a bounded number of times (tests/test_norm.py), and each
        muladd one trip through memory. Eval: dx = dy·γ/√(rv + ε)."""
        x, mean, std, m, axes = cache
        ndim, affine = len(dy.shape), self.config["affine"]
        weight = self._per_channel(params["weight"], ndim) if affine else None
        grads = {}
        if affine or m is not None:
            centred = centre(bk, x, mean)                               # x − μ, forward's bits
            sum_dy = bk.sum(dy, axis=axes)                              # (C,): dβ
            sum_dy_xhat = sum_product(bk, dy, centred, axes) / std.reshape(-1)   # (C,): dγ
            if affine:
                grads = {"weight": sum_dy_xhat, "bias": sum_dy}
        if m is None:                                    # eval: a fixed affine map
            return (dy * weight if affine else dy) / std, grads
        k = weight / std if affine else 1 / std                         # (1, C, 1, ...)
        t = muladd(bk, centred, -(self._per_channel(sum_dy_xhat, ndim) / (m * std)), dy,
                   reuse=centred)
        dx = muladd(bk, t, k, -((self._per_channel(sum_dy, ndim) / m) * k), reuse=t)
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


def per_channel(a, ndim):
    """(C,) -> (1, C, 1, ...): a per-channel vector meeting axis 1 of (N, C, ...)."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))


class GroupNorm(Layer):
    """torch.nn.GroupNorm(num_groups, num_channels, eps=1e-5, affine=True).

    Input (N, C) or (N, C, *spatial); the C channels split into G = num_groups groups of C/G
    consecutive channels. Each sample's group — m = (C/G)·Π spatial values — is normalized with
    its own statistics (biased variance), then weight and bias (C) apply per channel::

        x viewed as (N, G, C/G, *spatial);  x̂ = normalize over axes 2.. (the formula above)
        y = γ_c x̂ + β_c;  dx = the normalize backward per (n, g) of dx̂ = γ_c·dy
        dγ_c = Σ_{n, spatial} dy·x̂,  dβ_c = Σ_{n, spatial} dy

    Per-sample statistics: no running buffers, train and eval are the same function, and the
    input gradient sums to zero over every (sample, group). num_channels is optional (it is the
    input's C; given, it must match); G must divide C (torch's error). eps = 0 with m = 1 (one
    value per group) would divide 0 by 0, and is an error.
    """

    type = "groupnorm"
    autocast = "float32"            # torch.autocast's float32 list holds group_norm
    defaults = {"num_groups": None, "num_channels": None, "eps": 1e-5, "affine": True}

    def output_shape(self, in_shape):
        where, c = self.where, self.config
        if len(in_shape) < 1:
            raise ValueError(f"{where}: groupnorm expects input (N, C, ...), got a sample shape "
                             f"of {tuple(in_shape)}")
        if c["num_groups"] is None:
            raise ValueError(f"{where}: num_groups is required (torch's nn.GroupNorm("
                             f"num_groups, num_channels))")
        groups = require_number(where, "num_groups", c["num_groups"], low=1, integer=True)
        channels = in_shape[0]
        if c["num_channels"] is not None:
            require_number(where, "num_channels", c["num_channels"], low=1, integer=True)
            if c["num_channels"] != channels:
                raise ValueError(f"{where}: num_channels is {c['num_channels']}, but the input "
                                 f"has {channels} channels (axis 1)")
        if channels % groups:
            raise ValueError(f"{where}: num_channels ({channels}) must be divisible by "
                             f"num_groups ({groups})")
        require_number(where, "eps", c["eps"], low=0)
        if not isinstance(c["affine"], bool):
            raise ValueError(f"{where}: affine must be true or false, got {c['affine']!r}")
        group_size = channels // groups * int(np.prod(in_shape[1:], dtype=np.int64))
        if c["eps"] == 0 and group_size == 1:
            raise ValueError(f"{where}: eps = 0 with one value per group ((C/G)·H·W = 1) "
                             f"divides 0 by 0; use eps > 0 or fewer groups")
        self.channels, self.groups = channels, int(groups)
        return tuple(in_shape)

    def param_shapes(self):
        return ({"weight": (self.channels,), "bias": (self.channels,)}
                if self.config["affine"] else {})

    def init_params(self, rng):
        if not self.config["affine"]:
            return {}
        return {"weight": np.ones(self.channels), "bias": np.zeros(self.channels)}

    def _grouped(self, a):
        """(N, C, *spatial) -> (N, G, C/G, *spatial), the view the statistics are taken on."""
        shape = tuple(a.shape)
        return a.reshape((shape[0], self.groups, shape[1] // self.groups) + shape[2:])

    def forward(self, bk, params, x, state=None):
        shape, ndim = tuple(x.shape), len(x.shape)
        axes = tuple(range(2, ndim + 1))                       # of the grouped view
        xhat, std, m, _, _ = normalize(bk, self._grouped(x), axes, self.config["eps"])
        xhat = xhat.reshape(shape)
        y = xhat
        if self.config["affine"]:
            y = per_channel(params["weight"], ndim) * xhat + per_channel(params["bias"], ndim)
        return y, (xhat, std, m, axes)

    def backward(self, bk, params, dy, cache):
        xhat, std, m, axes = cache
        shape, ndim = tuple(dy.shape), len(dy.shape)
        affine = self.config["affine"]
        dxhat = dy * per_channel(params["weight"], ndim) if affine else dy
        dx = normalize_backward(bk, self._grouped(dxhat), self._grouped(xhat), std, axes, m)
        grads = {}
        if affine:
            outer = (0,) + tuple(range(2, ndim))
            grads = {"weight": bk.sum(dy * xhat, axis=outer), "bias": bk.sum(dy, axis=outer)}
        return dx.reshape(shape), grads

    def normalized(self, cache):
        """x̂ of a forward pass, (N, C, ...): the first item of its cache."""
        return cache[0]


class InstanceNorm2d(BatchNorm):
    """torch.nn.InstanceNorm2d(num_features, eps=1e-5, momentum=0.1, affine=False,
    track_running_stats=False).

    Input (N, C, H, W). Each (sample, channel) is normalized over its H·W values with its own
    statistics (m = H·W, biased variance) — in train mode, and in eval mode too unless
    track_running_stats; then γ_c x̂ + β_c if affine. The formula and its backward are the
    normalize pair above, per (n, c): the input gradient sums to zero over every (n, c).
    dγ_c = Σ_{n,h,w} dy·x̂, dβ_c = Σ_{n,h,w} dy.

    track_running_stats (torch's conventions, which torch implements by running batch_norm on
    the input viewed as (1, N·C, H, W)): buffers running_mean, running_var (C) and
    num_batches_tracked (); a train pass updates every instance's copy,
    (1 − momentum)·old + momentum·stat with the *unbiased* variance σ²·m/(m − 1), and the new
    buffer is the mean of those over the batch; num_batches_tracked is **not** incremented
    (torch's InstanceNorm never counts). Eval mode then uses the running statistics: the
    affine map y = γ (x − running_mean)/√(running_var + ε) + β, as batchnorm's.
    Instance statistics over one value (H·W = 1) are an error, as torch's ("Expected more than
    1 spatial element"). num_features is optional (the input's C; given, it must match).
    """

    type = "instancenorm2d"
    defaults = {"num_features": None, "eps": 1e-5, "momentum": 0.1, "affine": False,
                "track_running_stats": False}

    def output_shape(self, in_shape):
        where, c = self.where, self.config
        if len(in_shape) != 3:
            raise ValueError(f"{where}: instancenorm2d expects input (N, C, H, W), got a sample "
                             f"shape of {tuple(in_shape)}")
        super().output_shape(in_shape)
        if c["num_features"] is not None:
            require_number(where, "num_features", c["num_features"], low=1, integer=True)
            if c["num_features"] != in_shape[0]:
                raise ValueError(f"{where}: num_features is {c['num_features']}, but the input "
                                 f"has {in_shape[0]} channels (axis 1)")
        return tuple(in_shape)

    def forward(self, bk, params, x, state):
        ndim, eps = len(x.shape), self.config["eps"]
        axes = (2, 3)
        track = self.config["track_running_stats"]
        if state.train or not track:
            if x.shape[2] * x.shape[3] < 2:
                raise ValueError(f"{self.where}: expected more than 1 spatial element when "
                                 f"using instance statistics (train mode, or "
                                 f"track_running_stats false), got input of shape "
                                 f"{tuple(x.shape)}")
            xhat, std, m, mean, var = normalize(bk, x, axes, eps)
            if state.train and track:
                self._update_running(bk, params, mean, var, m, state)
        else:
            mean = per_channel(params["running_mean"], ndim)
            std = bk.sqrt(per_channel(params["running_var"], ndim) + eps)
            xhat, m = (x - mean) / std, None
        y = xhat
        if self.config["affine"]:
            y = per_channel(params["weight"], ndim) * xhat + per_channel(params["bias"], ndim)
        return y, (xhat, std, m, axes)

    def _update_running(self, bk, params, mean, var, m, state):
        """torch's: every instance's copy updated, then the mean over the batch (float64)."""
        momentum = self.config["momentum"]
        n = mean.shape[0]
        means = bk.to_numpy(mean).reshape(n, -1)
        unbiased = bk.to_numpy(var).reshape(n, -1) * m / (m - 1)
        old_mean = bk.to_numpy(params["running_mean"]).reshape(-1)
        old_var = bk.to_numpy(params["running_var"]).reshape(-1)
        state.updates[f"{self.name}.running_mean"] = np.mean(
            momentum * means + (1 - momentum) * old_mean, axis=0)
        state.updates[f"{self.name}.running_var"] = np.mean(
            momentum * unbiased + (1 - momentum) * old_var, axis=0)

    def backward(self, bk, params, dy, cache):
        xhat, std, m, axes = cache
        ndim = len(dy.shape)
        affine = self.config["affine"]
        dxhat = dy * per_channel(params["weight"], ndim) if affine else dy
        dx = dxhat / std if m is None else normalize_backward(bk, dxhat, xhat, std, axes, m)
        grads = {}
        if affine:
            outer = (0, 2, 3)
            grads = {"weight": bk.sum(dy * xhat, axis=outer), "bias": bk.sum(dy, axis=outer)}
        return dx, grads

    def normalized(self, cache):
        """x̂ of a forward pass: the first item of its cache (instancenorm2d keeps x̂, unlike
        batchnorm, whose forward and backward it replaces)."""
        return cache[0]
