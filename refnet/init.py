"""Weight initializers with ``torch.nn.init`` names, defaults and formulas.

Every draw comes from the ``numpy.random.Generator`` passed in, so a seed gives the same weights
bit for bit on every run (the values differ from torch's, whose generator is another one; the
distributions are the same).

Fans follow ``torch.nn.init._calculate_fan_in_and_fan_out``: for a weight of shape
``(out, in, *kernel)``, ``fan_in = in * prod(kernel)`` and ``fan_out = out * prod(kernel)``; a tensor
with fewer than two dimensions has no fan and fan-based inits refuse it, as torch does.

=================  ================================================================  ==========
name               distribution                                                      torch
=================  ================================================================  ==========
zeros, ones        0, 1                                                              same
constant(val)      val                                                               same
normal(mean, std)  N(mean, std²)   (``std`` is a standard deviation: N(0, 0.01) in    same
                   teaching material means std = 0.01 here)
uniform(a, b)      U(a, b), defaults a = 0, b = 1                                    same
xavier_uniform     U(±gain·√(6/(fan_in+fan_out)))                                    same
xavier_normal      N(0, gain²·2/(fan_in+fan_out))                                    same
kaiming_uniform    U(±gain·√(3/fan)), gain = calculate_gain(nonlinearity, a)          same
kaiming_normal     N(0, gain²/fan); defaults a = 0, mode fan_in, nonlinearity         same
                   leaky_relu (so gain √2, as torch)
lecun_uniform      U(±√(3/fan_in))                                                   (none)
lecun_normal       N(0, 1/fan_in), *not* truncated (Klambauer et al. 2017; JAX and     (none)
                   Keras use a truncated normal of the same variance)
orthogonal(gain)   gain·Q from the QR of a standard normal (rows, cols) matrix, signs   same
                   fixed by diag(R), transposed when rows < cols
torch_default      the default of ``nn.Linear``/``nn.Conv2d``: weight                 same
                   kaiming_uniform(a=√5) = U(±1/√fan_in); bias U(±1/√fan_in) of
                   the layer's weight
=================  ================================================================  ==========
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Tuple

import numpy as np

from .numerics.backend import _mp_context

# Gains that torch.nn.init.calculate_gain defines.
_LINEAR_NAMES = ("linear", "identity", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                 "conv_transpose2d", "conv_transpose3d")


@lru_cache(maxsize=None)
def _second_moment_gain(name: str, param: Optional[float]) -> float:
    """1/√E[f(z)²] for z ~ N(0, 1): the gain that keeps E[h²] constant, as √2 does for relu.

    torch's calculate_gain has no entry for elu, gelu, softplus and scaled_sigmoid; refnet uses
    this rule for them (it gives torch's values for relu, leaky_relu and linear exactly).
    Computed by mpmath quadrature in a private 30-digit context.
    """
    ctx = _mp_context(30)
    if name == "elu":
        alpha = ctx.mpf(1.0 if param is None else param)
        f = lambda z: z if z > 0 else alpha * ctx.expm1(z)
    elif name == "gelu":
        f = lambda z: z * ctx.ncdf(z)
    elif name == "softplus":
        beta = ctx.mpf(1.0 if param is None else param)
        f = lambda z: ctx.log1p(ctx.exp(beta * z)) / beta
    elif name == "scaled_sigmoid":
        f = lambda z: 2 * ctx.tanh(z / 2)
    else:
        raise AssertionError(name)
    density = lambda z: ctx.exp(-z * z / 2) / ctx.sqrt(2 * ctx.pi)
    moment = ctx.quad(lambda z: f(z) ** 2 * density(z), [-ctx.inf, 0, ctx.inf])
    return float(1 / ctx.sqrt(moment))


def calculate_gain(nonlinearity: str, param: Optional[float] = None) -> float:
    """The recommended gain for a nonlinearity, as ``torch.nn.init.calculate_gain``.

    linear/identity/conv/sigmoid: 1; tanh: 5/3; relu: √2; leaky_relu and prelu:
    √(2/(1 + slope²)) (slope default 0.01 for leaky_relu, 0.25 for prelu); selu: 3/4 (torch's
    value, chosen by torch for self-normalization; torch advises 'linear' for SELU nets).
    elu, gelu, softplus, scaled_sigmoid: 1/√E[f(z)²] (see ``_second_moment_gain``).
    """
    if nonlinearity in _LINEAR_NAMES or nonlinearity == "sigmoid":
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity in ("leaky_relu", "prelu"):
        if param is None:
            slope = 0.01 if nonlinearity == "leaky_relu" else 0.25
        elif isinstance(param, bool) or not isinstance(param, (int, float)):
            raise ValueError(f"calculate_gain: slope must be a number, got {param!r}")
        else:
            slope = float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    if nonlinearity in ("elu", "gelu", "softplus", "scaled_sigmoid"):
        return _second_moment_gain(nonlinearity, None if param is None else float(param))
    known = _LINEAR_NAMES + ("sigmoid", "tanh", "relu", "leaky_relu", "prelu", "selu", "elu",
                             "gelu", "softplus", "scaled_sigmoid")
    raise ValueError(f"calculate_gain: unknown nonlinearity {nonlinearity!r}; expected one of "
                     f"{sorted(known)}")


def fans(shape: Tuple[int, ...], where: str = "init") -> Tuple[int, int]:
    """(fan_in, fan_out) of a weight of shape (out, in, *kernel), as torch computes them."""
    if len(shape) < 2:
        raise ValueError(f"{where}: fan in and fan out need a tensor of at least 2 dimensions, "
                         f"got shape {tuple(shape)}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _gain(value, where):
    """A gain is a number, or a nonlinearity name meaning calculate_gain(name)."""
    if isinstance(value, str):
        return calculate_gain(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: gain must be a number or a nonlinearity name, got {value!r}")
    return float(value)


def _fan(shape, mode, where):
    fan_in, fan_out = fans(shape, where)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(f"{where}: mode must be 'fan_in' or 'fan_out', got {mode!r}")


def _orthogonal(rng, shape, gain, where):
    if len(shape) < 2:
        raise ValueError(f"{where}: orthogonal init needs at least 2 dimensions, got shape {shape}")
    rows = shape[0]
    cols = int(np.prod(shape)) // rows
    flat = rng.standard_normal((rows, cols))
    if rows < cols:
        flat = flat.T
    q, r = np.linalg.qr(flat)
    q = q * np.sign(np.diag(r))            # make the decomposition unique, as torch does
    if rows < cols:
        q = q.T
    return (gain * q).reshape(shape)


# name -> (allowed keys with defaults)
INITIALIZERS = {
    "zeros": {},
    "ones": {},
    "constant": {"val": None},
    "normal": {"mean": 0.0, "std": 1.0},
    "uniform": {"a": 0.0, "b": 1.0},
    "xavier_uniform": {"gain": 1.0},
    "xavier_normal": {"gain": 1.0},
    "kaiming_uniform": {"a": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu"},
    "kaiming_normal": {"a": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu"},
    "lecun_uniform": {},
    "lecun_normal": {},
    "orthogonal": {"gain": 1.0},
    "torch_default": {},
}


def parse_init(spec, where: str) -> Tuple[str, dict]:
    """An init given as ``"name"`` or ``{"name": ..., **options}`` -> (name, options)."""
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"{where}: an init object needs a 'name' key, got {spec!r}")
        name, options = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise ValueError(f"{where}: init must be a name or an object with 'name', got {spec!r}")
    if name not in INITIALIZERS:
        raise ValueError(f"{where}: unknown init {name!r}; expected one of {sorted(INITIALIZERS)}")
    allowed = INITIALIZERS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: init {name!r} has no option(s) {unknown}; "
                         f"it takes {sorted(allowed) or 'none'}")
    merged = {**allowed, **options}
    if name == "constant" and merged["val"] is None:
        raise ValueError(f"{where}: init 'constant' needs 'val'")
    for key in ("val", "mean", "std", "a", "b"):
        if key in merged and not (isinstance(merged[key], (int, float))
                                  and not isinstance(merged[key], bool)
                                  and math.isfinite(merged[key])):
            raise ValueError(f"{where}: init {name!r} option {key} must be a finite number, "
                             f"got {merged[key]!r}")
    if name == "normal" and merged["std"] < 0:
        raise ValueError(f"{where}: init 'normal' needs std >= 0, got {merged['std']}")
    if name == "uniform" and merged["a"] > merged["b"]:
        raise ValueError(f"{where}: init 'uniform' needs a <= b, got a={merged['a']}, b={merged['b']}")
    return name, merged


def initialize(spec, shape, rng: np.random.Generator, where: str = "init",
               weight_shape: Optional[Tuple[int, ...]] = None) -> np.ndarray:
    """Draw a float64 array of ``shape`` from the init ``spec`` with the generator ``rng``.

    ``weight_shape`` is the shape of the layer's weight, needed by ``torch_default`` for a bias
    (whose bound is 1/√fan_in of the weight).
    """
    name, o = parse_init(spec, where)
    shape = tuple(int(s) for s in shape)
    if name == "zeros":
        return np.zeros(shape)
    if name == "ones":
        return np.ones(shape)
    if name == "constant":
        return np.full(shape, float(o["val"]))
    if name == "normal":
        return o["mean"] + o["std"] * rng.standard_normal(shape)
    if name == "uniform":
        return rng.uniform(o["a"], o["b"], shape)
    if name in ("xavier_uniform", "xavier_normal"):
        fan_in, fan_out = fans(shape, where)
        std = _gain(o["gain"], where) * math.sqrt(2.0 / (fan_in + fan_out))
        if name == "xavier_normal":
            return std * rng.standard_normal(shape)
        bound = math.sqrt(3.0) * std
        return rng.uniform(-bound, bound, shape)
    if name in ("kaiming_uniform", "kaiming_normal"):
        std = calculate_gain(o["nonlinearity"], o["a"]) / math.sqrt(_fan(shape, o["mode"], where))
        if name == "kaiming_normal":
            return std * rng.standard_normal(shape)
        bound = math.sqrt(3.0) * std
        return rng.uniform(-bound, bound, shape)
    if name in ("lecun_uniform", "lecun_normal"):
        std = 1.0 / math.sqrt(fans(shape, where)[0])
        if name == "lecun_normal":
            return std * rng.standard_normal(shape)
        bound = math.sqrt(3.0) * std
        return rng.uniform(-bound, bound, shape)
    if name == "orthogonal":
        return _orthogonal(rng, shape, _gain(o["gain"], where), where)
    if name == "torch_default":
        if len(shape) >= 2:   # kaiming_uniform(a=√5): gain √(2/6), bound √3·gain/√fan_in = 1/√fan_in
            bound = 1.0 / math.sqrt(fans(shape, where)[0])
        else:
            if weight_shape is None:
                raise ValueError(f"{where}: torch_default for a 1-D tensor needs its layer's weight")
            fan_in = fans(weight_shape, where)[0]
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        return rng.uniform(-bound, bound, shape)
    raise AssertionError(name)
