"""Activations, each next to its derivative. Elementwise: the Jacobian is diag(f'(z)).

Every activation is a layer of its own (``{"type": "leaky_relu", "slope": 0.02}``), so parameter
names match a torch ``nn.Sequential`` of the same layers (PReLU's slope is ``"<i>.weight"``).

Formulas are written to be accurate and overflow-free for every finite float64 input whose exact
result is finite in float64 (no warning, no inf, no NaN; selu(1e308) = λ·1e308 is not), using
e = exp(-|z|) ≤ 1 where torch would form exp(z):

==============  ====================================  =========================================
name            f(z)                                  f'(z)
==============  ====================================  =========================================
identity        z                                     1
sigmoid         1/(1+e) if z ≥ 0 else e/(1+e)         e/(1+e)²  (= σ(z)σ(-z))
tanh            tanh z                                4E/(1+E)², E = exp(-2|z|)  (= sech² z)
relu            max(z, 0)                             1 if z > 0 else 0   (0 at z = 0, as torch)
leaky_relu      z if z > 0 else slope·z               1 if z > 0 else slope  (slope at 0)
prelu           z if z > 0 else a_c·z                 1 if z > 0 else a_c;  ∂/∂a_c = Σ z·dy (z ≤ 0)
elu             z if z > 0 else α·expm1(z)            1 if z > 0 else α·exp(z)  (α at 0)
selu            λ·elu_α(z)                            λ·elu_α'(z)
gelu            z/2 · erfc(-z/√2)  (= z·Φ(z))         Φ(z) + z·φ(z)
softplus        log1p(exp(βz))/β; z if βz > threshold  σ(βz); 1 if βz > threshold
                (βz formed and compared in the working precision, as torch)
scaled_sigmoid  4σ(z) - 2 = 2·tanh(z/2)               4σ'(z) = sech²(z/2)
==============  ====================================  =========================================

Where refnet differs from torch, on purpose: torch computes sigmoid' as s(1-s) and tanh' as 1-t²
from the output, which loses all relative accuracy once the unit saturates (σ'(40) is 4e-18, but
1 - s rounds to 0 in float64); gelu as z/2·(1 + erf(z/√2)), which cancels for z ≪ 0. refnet's
forms are equal in exact arithmetic and accurate in every precision, which is what a reference
owes its users. Values agree with torch to rounding where torch's forms are accurate.

SELU's constants are torch's (and the paper's) 32-digit decimals, taken as exact:
λ = 1.0507009873554804934193349852946, α = 1.6732632423543772848170429916717.
"""

from __future__ import annotations

import numpy as np

from .base import Layer, require_number

SELU_SCALE = "1.0507009873554804934193349852946"
SELU_ALPHA = "1.6732632423543772848170429916717"
INV_SQRT2 = lambda ctx: 1 / ctx.sqrt(2)                      # noqa: E731
INV_SQRT_2PI = lambda ctx: 1 / ctx.sqrt(2 * ctx.pi)          # noqa: E731


def stable_sigmoid(bk, z):
    """σ(z) without overflow: e = exp(-|z|) never exceeds 1. Returns (σ(z), e)."""
    e = bk.exp(-bk.abs(z))
    return bk.where(z >= 0, 1 / (1 + e), e / (1 + e)), e


class Activation(Layer):
    """An elementwise f; subclasses give ``f(bk, z) -> (h, saved)`` and ``df(bk, saved)``."""

    def forward(self, bk, params, z, state=None):
        h, saved = self.f(bk, z)
        return h, (z, saved)

    def backward(self, bk, params, dh, cache):
        z, saved = cache
        return dh * self.df(bk, z, saved), {}


class Identity(Activation):
    type = "identity"

    def f(self, bk, z):
        return z, None

    def backward(self, bk, params, dh, cache):
        return dh, {}


class Sigmoid(Activation):
    type = "sigmoid"

    def f(self, bk, z):
        return stable_sigmoid(bk, z)

    def df(self, bk, z, e):
        return e / ((1 + e) * (1 + e))

    def df_from_output(self, bk, s):
        """torch's sigmoid_backward form s(1 − s), from the output: what a GPU computes."""
        return (1 - s) * s


class Tanh(Activation):
    type = "tanh"

    def f(self, bk, z):
        return bk.tanh(z), None

    def df(self, bk, z, saved):
        e = bk.exp(-bk.abs(z))
        e2 = e * e                   # exp(−2|z|), without forming 2|z| (which can overflow)
        return 4 * e2 / ((1 + e2) * (1 + e2))

    def df_from_output(self, bk, t):
        """torch's tanh_backward form 1 − t², from the output: what a GPU computes."""
        return 1 - t * t


class ReLU(Activation):
    type = "relu"

    def f(self, bk, z):
        return bk.maximum(z, 0), None       # propagates NaN, like torch.relu

    def backward(self, bk, params, dh, cache):
        z, _ = cache
        # torch's threshold_backward: where(z <= 0, 0, dh): gradient 0 at z = 0, NaN passes.
        return bk.where(z <= 0, 0, dh), {}

    def kink_signature(self, cache):
        return (np.asarray(cache[0] > 0, dtype=bool),)


class LeakyReLU(Activation):
    type = "leaky_relu"
    defaults = {"slope": 0.01}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        require_number(where, "slope", self.config["slope"])

    def f(self, bk, z):
        return bk.where(z > 0, z, self.config["slope"] * z), None

    def df(self, bk, z, saved):
        return bk.where(z > 0, 1, self.config["slope"])

    def kink_signature(self, cache):
        return (np.asarray(cache[0] > 0, dtype=bool),)


class PReLU(Activation):
    """Learned slope ``weight``: one shared (num_parameters = 1) or one per channel (axis 1)."""

    type = "prelu"
    autocast = "lowp"
    defaults = {"num_parameters": 1, "init": 0.25}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        n = require_number(where, "num_parameters", self.config["num_parameters"], low=1,
                           integer=True)
        require_number(where, "init", self.config["init"])
        if n != 1 and (len(in_shape) == 0 or in_shape[0] != n):
            channels = in_shape[0] if in_shape else None
            raise ValueError(f"{where}: num_parameters must be 1 or the number of channels "
                             f"{channels}, got {n}")

    def param_shapes(self):
        return {"weight": (int(self.config["num_parameters"]),)}

    def init_params(self, rng):
        return {"weight": np.full(self.param_shapes()["weight"], float(self.config["init"]))}

    def _broadcast(self, a, ndim):
        # (C,) -> (1, C, 1, ...) so that a slope per channel meets axis 1 of (N, C, ...).
        if self.config["num_parameters"] == 1:
            return a.reshape((1,) * ndim)
        return a.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bk, params, z, state=None):
        a = self._broadcast(params["weight"], len(z.shape))
        return bk.where(z > 0, z, a * z), (z, None)

    def backward(self, bk, params, dh, cache):
        z, _ = cache
        a = self._broadcast(params["weight"], len(z.shape))
        dz = bk.where(z > 0, dh, a * dh)
        contrib = bk.where(z > 0, 0, z * dh)
        if self.config["num_parameters"] == 1:
            da = bk.sum(contrib).reshape((1,))
        else:
            axes = (0,) + tuple(range(2, len(z.shape)))
            da = bk.sum(contrib, axis=axes)
        return dz, {"weight": da}

    def kink_signature(self, cache):
        return (np.asarray(cache[0] > 0, dtype=bool),)


class ELU(Activation):
    type = "elu"
    defaults = {"alpha": 1.0}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        if "alpha" in self.defaults:
            require_number(where, "alpha", self.config["alpha"])

    def _alpha(self, bk):
        return self.config["alpha"]

    def f(self, bk, z):
        neg = bk.minimum(z, 0)                  # expm1 only ever sees z ≤ 0: no overflow
        return bk.where(z > 0, z, self._alpha(bk) * bk.expm1(neg)), neg

    def df(self, bk, z, neg):
        return bk.where(z > 0, 1, self._alpha(bk) * bk.exp(neg))

    def kink_signature(self, cache):
        return (np.asarray(cache[0] > 0, dtype=bool),)


class SELU(ELU):
    type = "selu"
    defaults = {}

    def _alpha(self, bk):
        return bk.const(SELU_ALPHA)

    def f(self, bk, z):
        h, neg = super().f(bk, z)
        return bk.const(SELU_SCALE) * h, neg

    def df(self, bk, z, neg):
        return bk.const(SELU_SCALE) * super().df(bk, z, neg)


class GELU(Activation):
    type = "gelu"

    def f(self, bk, z):
        return (z * 0.5) * bk.erfc(-z * bk.const(INV_SQRT2)), None

    def df(self, bk, z, saved):
        cdf = 0.5 * bk.erfc(-z * bk.const(INV_SQRT2))
        # z·φ(z) is below 1e-346 for |z| > 40: clamping there keeps z² finite and changes
        # nothing at any precision below 340 digits (Φ(z) is 0 or 1 to that many digits).
        zc = bk.maximum(bk.minimum(z, 40), -40)
        pdf = bk.const(INV_SQRT_2PI) * bk.exp(-0.5 * (zc * zc))
        return cdf + zc * pdf


class Softplus(Activation):
    """torch.nn.Softplus: log1p(exp(βz))/β, and z itself where βz > threshold (a kink).

    The branch test is torch's, evaluated as torch evaluates it: β and threshold rounded to the
    working precision, βz formed by one multiplication in it, then compared (float64: the
    double product; float32, and the fp16/bf16 emulation's float32 kernels: the float32 product;
    mp: the product at its digits). It is not z > threshold/β, which differs from it in float64
    an ulp from the kink (β = 3, threshold = 1, z = 0x1.5555555555556p-2: z > 1/3 but βz rounds
    to 1, and torch takes the smooth branch). β must be positive. For β > 1, z is first clamped
    to ±1e30/β so that βz cannot overflow (float32 included): beyond it softplus is z (kept
    as is) or below exp(−1e30), and the test is unchanged for |threshold| < 1e29; for β ≤ 1,
    |βz| ≤ |z| cannot overflow. The smooth branch's exp sees min(βz, threshold): equal to βz
    wherever that branch is taken, and no overflow where it is not.
    """

    autocast = "float32"

    type = "softplus"
    defaults = {"beta": 1.0, "threshold": 20.0}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        require_number(where, "beta", self.config["beta"])
        if not self.config["beta"] > 0:
            raise ValueError(f"{where}: beta must be positive, got {self.config['beta']}")
        require_number(where, "threshold", self.config["threshold"])

    def _scaled(self, bk, z):
        """(βz, threshold) in the working precision, as torch's kernel forms them."""
        beta = self.config["beta"]
        if beta > 1:
            limit = 1e30 / beta
            z = bk.maximum(bk.minimum(z, limit), -limit)
        return z * bk.const(float(beta)), bk.const(float(self.config["threshold"]))

    def f(self, bk, z):
        scaled, threshold = self._scaled(bk, z)
        linear = np.asarray(scaled > threshold, dtype=bool)
        smooth = bk.log1p(bk.exp(bk.minimum(scaled, threshold))) / bk.const(
            float(self.config["beta"]))
        return bk.where(linear, z, smooth), (scaled, threshold)

    def df(self, bk, z, saved):
        scaled, threshold = saved
        s, _ = stable_sigmoid(bk, scaled)
        return bk.where(np.asarray(scaled > threshold, dtype=bool), 1, s)

    def kink_signature(self, cache):
        # The comparison itself, on the backend's values (the interval certificate records an
        # undecidable one here as a straddled kink).
        scaled, threshold = cache[1]
        return (np.asarray(scaled > threshold, dtype=bool),)


class ScaledSigmoid(Activation):
    """4σ(z) − 2: sigmoid rescaled to pass through 0 with slope 1, like tanh and relu (z ≥ 0)."""

    type = "scaled_sigmoid"

    def f(self, bk, z):
        return 2 * bk.tanh(z * 0.5), None

    def df(self, bk, z, saved):
        e = bk.exp(-bk.abs(z))
        return 4 * e / ((1 + e) * (1 + e))


ACTIVATIONS = {cls.type: cls for cls in (Identity, Sigmoid, Tanh, ReLU, LeakyReLU, PReLU, ELU,
                                          SELU, GELU, Softplus, ScaledSigmoid)}
