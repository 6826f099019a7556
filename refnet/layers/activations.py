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
silu            z·σ(z)                                σ(z)·(1 + z·σ(−z))
mish            z·t, t = tanh(softplus z) in e        t + z·σ(z)(1 − t²), in e
hardtanh        clamp(z, min_val, max_val)            1 inside, 0 outside and at both limits
relu6           hardtanh(z, 0, 6)                     1 on (0, 6), 0 elsewhere (0 at 0 and 6)
hardsigmoid     relu6(z + 3)/6                        1/6 on (−3, 3), 0 elsewhere (0 at ±3)
hardswish       z·relu6(z + 3)/6 (z for z ≥ 3)        0 for z ≤ −3, z/3 + 1/2, 1 for z ≥ 3
celu            z if z > 0 else α·expm1(z/α)          1 if z > 0 else exp(z/α)  (1 at 0)
softsign        z/(1 + |z|)                           (1/(1 + |z|))²
logsigmoid      min(z, 0) − log1p(e)                  σ(−z)
gelu "tanh"     z·σ(2√(2/π)(z + 0.044715 z³))         σ(w) + z·σ(w)σ(−w)·w'
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
SQRT_2_OVER_PI = lambda ctx: ctx.sqrt(2 / ctx.pi)            # noqa: E731
GELU_TANH_KAPPA = "0.044715"


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

    def backward_from_output(self, bk, dh, s):
        """torch's sigmoid_backward(grad, output): dh·(1 − s)·s from the stored output s, in
        ATen's order (dh·(1 − s))·s. On CUDA it is written in the storage type's arithmetic, so
        for fp16/bf16 each of its three operations rounds (refnet.lowp.emulation runs it so)."""
        return dh * (1 - s) * s


class Tanh(Activation):
    type = "tanh"

    def f(self, bk, z):
        return bk.tanh(z), None

    def df(self, bk, z, saved):
        e = bk.exp(-bk.abs(z))
        e2 = e * e                   # exp(−2|z|), without forming 2|z| (which can overflow)
        return 4 * e2 / ((1 + e2) * (1 + e2))

    def backward_from_output(self, bk, dh, t):
        """torch's tanh_backward(grad, output): dh·(1 − t·t) from the stored output t, in ATen's
        order; on CUDA in the storage type's arithmetic, a rounding per operation (as sigmoid's)."""
        return dh * (1 - t * t)


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
    """torch.nn.GELU(approximate="none" | "tanh"): the erf form z·Φ(z), or the tanh form
    (z/2)·(1 + tanh(√(2/π)(z + 0.044715 z³))) computed as z·σ(w), w = 2√(2/π)(z + 0.044715 z³)
    (1 + tanh(w/2) = 2σ(w) exactly; the sum cancels for w ≪ 0, the sigmoid does not).
    For |z| > 1e10 the tanh form's w sees z clamped to ±1e10, so z³ cannot overflow (float32
    included): beyond it σ(w) is 1 or below exp(−7e28), and nothing changes at any precision
    below 3e28 digits. 0.044715 is the decimal taken as exact (the mp backend uses it as
    written); √(2/π) is computed at each backend's precision (its float64 rounding is torch's
    kBeta = M_SQRT2·M_2_SQRTPI·0.5, bit for bit)."""

    type = "gelu"
    defaults = {"approximate": "none"}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        if self.config["approximate"] not in ("none", "tanh"):
            raise ValueError(f"{where}: approximate must be 'none' or 'tanh' (torch's choices), "
                             f"got {self.config['approximate']!r}")

    def _tanh_form(self, bk, z):
        """(σ(w), e = exp(−|w|), the clamped z) of the tanh approximation."""
        c = bk.maximum(bk.minimum(z, 1e10), -1e10)
        # Arrays left of constants: mpmath's interval scalar does not defer to a numpy array.
        inner = (c + (c * c * c) * bk.const(GELU_TANH_KAPPA)) * bk.const(SQRT_2_OVER_PI)
        s, e = stable_sigmoid(bk, 2 * inner)
        return s, e, c

    def f(self, bk, z):
        if self.config["approximate"] == "tanh":
            s, e, c = self._tanh_form(bk, z)
            return z * s, (s, e, c)
        return (z * 0.5) * bk.erfc(-z * bk.const(INV_SQRT2)), None

    def df(self, bk, z, saved):
        if self.config["approximate"] == "tanh":
            # f' = σ(w) + z·σ(w)σ(−w)·w',  σ(w)σ(−w) = e/(1 + e)²,  w' = 2√(2/π)(1 + 3κz²);
            # e/(1 + e)² is formed first, so that z·w' (up to 1.8e308·1e20) is never formed.
            s, e, c = saved
            dw = (1 + (c * c) * (3 * bk.const(GELU_TANH_KAPPA))) * (2 * bk.const(SQRT_2_OVER_PI))
            return s + z * (dw * (e / ((1 + e) * (1 + e))))
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


# --- the activations torch users reach for (issue 18): torch's names, defaults and kink values ---
# Each is one elementwise kernel in torch (one in the fp16/bf16 emulation: computed in float32
# from the stored input, rounded once), except softsign, which torch composes from abs, add and
# div (spec/precision.md says what the emulation does there).


def _between(z, lo, hi):
    """lo < z < hi elementwise, as booleans (the open middle piece of a clamp)."""
    return np.asarray(z > lo, dtype=bool) & np.asarray(z < hi, dtype=bool)


def _sigmoid_of_minus(bk, z, e):
    """σ(−z) from e = exp(−|z|), without forming 1 − σ(z) (which loses σ(−z) for z ≫ 0)."""
    return bk.where(z >= 0, e / (1 + e), 1 / (1 + e))


class SiLU(Activation):
    """torch.nn.SiLU (swish): f = z·σ(z);  f' = σ(z)·(1 + z·σ(−z))  (torch: s·(1 + z(1 − s))),
    both sigmoids from e = exp(−|z|): no overflow, and z·σ(−z) is never ∞·0."""

    type = "silu"

    def f(self, bk, z):
        s, e = stable_sigmoid(bk, z)
        return z * s, (s, e)

    def df(self, bk, z, saved):
        s, e = saved
        return s * (1 + z * _sigmoid_of_minus(bk, z, e))


class Mish(Activation):
    """torch.nn.Mish: f = z·tanh(softplus(z));  f' = t + z·σ(z)·(1 − t²),  t = tanh(softplus(z)).

    torch forms tanh(log1p(exp(z))), whose exp overflows for z > 709 (torch's float64 mish
    survives it: log1p(inf) = inf, tanh(inf) = 1). With E = exp(z), t = (E² + 2E)/(E² + 2E + 2)
    exactly; refnet writes it in e = exp(−|z|) ≤ 1, every term positive (no cancellation):

        z ≥ 0:  t = (1 + 2e)/(1 + 2e + 2e²),     σ(z)(1 − t²) = 4e²(1 + e)/D²
        z < 0:  t = e(e + 2)/(e(e + 2) + 2),     σ(z)(1 − t²) = 4e(1 + e)/D²      (D: t's denominator)
    """

    type = "mish"

    def f(self, bk, z):
        e = bk.exp(-bk.abs(z))
        pos = np.asarray(z >= 0, dtype=bool)
        num = bk.where(pos, 1 + 2 * e, e * (e + 2))
        den = bk.where(pos, 1 + 2 * e + 2 * (e * e), e * (e + 2) + 2)
        return z * (num / den), (e, pos, num, den)

    def df(self, bk, z, saved):
        e, pos, num, den = saved
        w = bk.where(pos, 4 * (e * e) * (1 + e), 4 * e * (1 + e))     # ≤ 8, and 0 once e is
        return num / den + z * w / (den * den)


class Hardtanh(Activation):
    """torch.nn.Hardtanh(min_val=-1, max_val=1): f = clamp(z, min_val, max_val);
    f' = 1 for min_val < z < max_val, else 0 — **0 at exactly min_val and max_val** (torch's
    hardtanh_backward: ``z <= min_val || z >= max_val ? 0 : dy``). min_val < max_val, as torch
    asserts. The limits are the float64 numbers written in the config (the mp backend compares
    with the same binary values; float32 rounds them, as torch's float32 kernel does)."""

    type = "hardtanh"
    defaults = {"min_val": -1.0, "max_val": 1.0}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        lo, hi = self._limits_checked(where)
        if not lo < hi:
            raise ValueError(f"{where}: max_val must be greater than min_val, got min_val = "
                             f"{lo!r}, max_val = {hi!r}")

    def _limits_checked(self, where):
        return (float(require_number(where, "min_val", self.config["min_val"])),
                float(require_number(where, "max_val", self.config["max_val"])))

    def _limits(self):
        return float(self.config["min_val"]), float(self.config["max_val"])

    def f(self, bk, z):
        lo, hi = self._limits()
        return bk.minimum(bk.maximum(z, lo), hi), None

    def backward(self, bk, params, dh, cache):
        z, _ = cache
        return bk.where(_between(z, *self._limits()), dh, 0), {}

    def kink_signature(self, cache):
        lo, hi = self._limits()
        return (np.asarray(cache[0] > lo, dtype=bool), np.asarray(cache[0] < hi, dtype=bool))


class ReLU6(Hardtanh):
    """torch.nn.ReLU6 = hardtanh(z, 0, 6) (ATen's relu6 calls hardtanh): f'(0) = f'(6) = 0."""

    type = "relu6"
    defaults = {}

    def _limits_checked(self, where):
        return self._limits()

    def _limits(self):
        return 0.0, 6.0


class Hardsigmoid(Activation):
    """torch.nn.Hardsigmoid: f = relu6(z + 3)/6;  f' = 1/6 for −3 < z < 3, else 0 — **0 at
    exactly ±3** (torch's hardsigmoid_backward). The backward divides dy by 6 (correctly
    rounded); torch's float64 kernel multiplies by float32(1/6) = 0.1666666716337204, a relative
    error of 3.0e-8 (refnet does not copy it; tests pin it)."""

    type = "hardsigmoid"

    def f(self, bk, z):
        return bk.minimum(bk.maximum(z + 3, 0), 6) / 6, None

    def backward(self, bk, params, dh, cache):
        z, _ = cache
        return bk.where(_between(z, -3, 3), dh / 6, 0), {}

    def kink_signature(self, cache):
        return (np.asarray(cache[0] > -3, dtype=bool), np.asarray(cache[0] < 3, dtype=bool))


class Hardswish(Activation):
    """torch.nn.Hardswish: f = z·relu6(z + 3)/6;  f' = 0 for z ≤ −3, z/3 + 1/2 for −3 < z < 3,
    1 for z ≥ 3 — **0 at exactly −3 and 1 at exactly 3** (torch 2.13's CPU kernel: the outer
    pieces' values; the middle formula would give −1/2 and 3/2 there).
    For z ≥ 3 refnet returns z itself: torch forms z·6/6, which overflows for z > 3e307 and may
    differ from z by an ulp; the middle piece is torch's (z·relu6(z + 3))/6, on z clamped to
    ≤ 3 so that the unused branch never overflows either."""

    type = "hardswish"

    def f(self, bk, z):
        zc = bk.minimum(z, 3)
        middle = zc * bk.minimum(bk.maximum(zc + 3, 0), 6) / 6
        return bk.where(np.asarray(z >= 3, dtype=bool), z, middle), None

    def backward(self, bk, params, dh, cache):
        z, _ = cache
        inner = bk.where(_between(z, -3, 3), dh * (z / 3 + 0.5), 0)
        return bk.where(np.asarray(z >= 3, dtype=bool), dh, inner), {}

    def kink_signature(self, cache):
        return (np.asarray(cache[0] > -3, dtype=bool), np.asarray(cache[0] < 3, dtype=bool))


class CELU(Activation):
    """torch.nn.CELU(alpha=1): f = z for z > 0, α·expm1(z/α) for z ≤ 0;  f' = 1, exp(z/α).

    f is C¹ at 0 (f'(0) = 1 from both sides) but f'' jumps there, so 0 is a kink of f' and
    central differences across it converge to first order only: the kink signature (z > 0) lets
    the verifier report such a check instead of comparing it. α > 0 (torch rejects α = 0; a
    negative α makes the negative branch grow without bound). z/α is one correctly rounded
    division (torch multiplies by the double 1/α; its float64 *backward* uses 1/float32(α),
    a float32 leak of up to 3e-8 relative where α is not a float32 number — tests pin it).
    For α < 1, z is first clamped to ≥ −1e30·α so that z/α cannot overflow: beyond it
    expm1(z/α) = −1 and exp(z/α) = 0 at any precision below 4e29 digits."""

    type = "celu"
    defaults = {"alpha": 1.0}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        alpha = require_number(where, "alpha", self.config["alpha"])
        if not alpha > 0:
            raise ValueError(f"{where}: alpha must be positive, got {alpha!r}")

    def f(self, bk, z):
        alpha = float(self.config["alpha"])
        neg = bk.minimum(z, 0)
        if alpha < 1:
            neg = bk.maximum(neg, -1e30 * alpha)
        q = neg / alpha
        return bk.where(np.asarray(z > 0, dtype=bool), z, alpha * bk.expm1(q)), q

    def df(self, bk, z, q):
        return bk.where(np.asarray(z > 0, dtype=bool), 1, bk.exp(q))

    def kink_signature(self, cache):
        return (np.asarray(cache[0] > 0, dtype=bool),)


class Softsign(Activation):
    """torch.nn.Softsign: f = z/(1 + |z|);  f' = (1/(1 + |z|))², the square of a quotient (not
    1/(1 + |z|)², whose denominator overflows for |z| > 1.3e154). torch gets f' by autograd of
    its composition, 1/(1 + |z|) − z·sign(z)/(1 + |z|)², which cancels for large |z| (relative
    error ~u·|z|). f is C¹ at 0 (f'(0) = 1) with a jump of f'' there: a kink of f', as celu's."""

    type = "softsign"
    # torch's F.softsign is input / (input.abs() + 1): three elementwise kernels, not one (the
    # fp16/bf16 emulation rounds after each; refnet.lowp.emulation).
    composite = True

    def f(self, bk, z):
        a = 1 + bk.abs(z)
        return z / a, a

    def torch_backward(self, bk, dh, cache):
        """dz as torch's autograd composes it from its kernels (the emulation's
        derivatives="torch"): div's backward dh/a and −dh·((z/a)/a), abs's ·sgn(z), summed."""
        z, a = cache
        sign = bk.where(np.asarray(z > 0, dtype=bool), 1, bk.where(np.asarray(z < 0, dtype=bool),
                                                                    -1, 0))
        return dh / a + (-dh * ((z / a) / a)) * sign

    def df(self, bk, z, a):
        d = 1 / a
        return d * d

    def kink_signature(self, cache):
        return (np.asarray(cache[0] > 0, dtype=bool),)


class LogSigmoid(Activation):
    """torch.nn.LogSigmoid: f = log σ(z) = min(z, 0) − log1p(e);  f' = σ(−z);  e = exp(−|z|).
    torch's CPU forward is the same form; both terms are ≤ 0, so nothing cancels, and −log1p(e)
    keeps f(40) = −4.2e-18 (log(σ(40)) rounds to 0)."""

    type = "logsigmoid"

    def f(self, bk, z):
        e = bk.exp(-bk.abs(z))
        return bk.minimum(z, 0) - bk.log1p(e), e

    def df(self, bk, z, e):
        return _sigmoid_of_minus(bk, z, e)


ACTIVATIONS = {cls.type: cls for cls in (Identity, Sigmoid, Tanh, ReLU, LeakyReLU, PReLU, ELU,
                                          SELU, GELU, Softplus, ScaledSigmoid)}
ACTIVATIONS.update({cls.type: cls for cls in (SiLU, Mish, Hardtanh, ReLU6, Hardsigmoid,
                                               Hardswish, CELU, Softsign, LogSigmoid)})
