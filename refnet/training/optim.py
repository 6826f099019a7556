"""Optimizers with PyTorch's update rules and defaults (torch.optim, single-tensor path).

All are functional: ``opt.step(params, grads)`` returns new parameters and keeps its own state
(momentum buffers, moment estimates, step count) per parameter name. The arithmetic goes through
a numeric backend (float64 by default), so the same code runs at high precision for checking.

SGD(lr, momentum=0, dampening=0, nesterov=False, weight_decay=0)
    g ← g + wd·θ                       (coupled weight decay, if wd ≠ 0)
    b ← g (first step), else b ← μ·b + (1 − dampening)·g
    g ← g + μ·b (nesterov), else g ← b (if μ ≠ 0)
    θ ← θ − lr·g
Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    t ← t + 1;  g ← g + wd·θ (coupled)
    m ← m + (1 − β1)(g − m)            (torch's lerp)
    v ← β2·v + (1 − β2)·g²
    θ ← θ − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)
AdamW(lr=1e-3, betas, eps, weight_decay=1e-2): θ ← θ·(1 − lr·wd) first (decoupled), then Adam
    without weight decay.

Bias corrections (1 − βᵗ) and the step size are Python floats, as in torch.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

from ..numerics.backend import FLOAT64

Params = Dict[str, np.ndarray]


def _positive(name, value, *, allow_zero=False):
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.floating))
          and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
    if not ok:
        kind = "a finite number >= 0" if allow_zero else "a positive finite number"
        raise ValueError(f"optimizer: {name} must be {kind}, got {value!r}")
    return float(value)


def _fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"optimizer: {name} must lie in [0, 1), got {value!r}")
    return float(value)


class Optimizer:
    def __init__(self, lr, weight_decay=0.0, bk=None):
        self.lr = _positive("lr", lr)
        self.weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        self.bk = FLOAT64 if bk is None else bk
        self.state: Dict[str, dict] = {}

    def step(self, params: Params, grads: Dict[str, object],
             only: Optional[Sequence[str]] = None) -> Params:
        """New parameters after one step; names not in ``grads`` (buffers) pass unchanged."""
        bk = self.bk
        new = dict(params)
        for name, g in grads.items():
            if only is not None and name not in only:
                continue
            new[name] = self._update(name, bk.asarray(params[name]), bk.asarray(g),
                                     self.state.setdefault(name, {}))
        return new


class SGD(Optimizer):
    def __init__(self, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 bk=None):
        super().__init__(lr, weight_decay, bk)
        self.momentum = _positive("momentum", momentum, allow_zero=True)
        self.dampening = _positive("dampening", dampening, allow_zero=True)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("optimizer: nesterov needs momentum > 0 and dampening 0 (as torch)")

    def _update(self, name, theta, g, state):
        if self.weight_decay:
            g = g + self.weight_decay * theta
        if self.momentum:
            if "momentum_buffer" not in state:
                buf = g
            else:
                buf = state["momentum_buffer"] * self.momentum + (1 - self.dampening) * g
            state["momentum_buffer"] = buf
            g = g + self.momentum * buf if self.nesterov else buf
        return theta - self.lr * g


class Adam(Optimizer):
    decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bk=None):
        super().__init__(lr, weight_decay, bk)
        self.beta1, self.beta2 = (_fraction("beta1", betas[0]), _fraction("beta2", betas[1]))
        self.eps = _positive("eps", eps, allow_zero=True)

    def _update(self, name, theta, g, state):
        bk = self.bk
        if self.weight_decay:
            if self.decoupled:
                theta = theta * (1 - self.lr * self.weight_decay)
            else:
                g = g + self.weight_decay * theta
        t = state.get("step", 0) + 1
        m = state.get("exp_avg", theta * 0)
        v = state.get("exp_avg_sq", theta * 0)
        m = m + (1 - self.beta1) * (g - m)
        v = v * self.beta2 + (1 - self.beta2) * g * g          # torch's addcmul order
        state.update(step=t, exp_avg=m, exp_avg_sq=v)
        step_size = self.lr / (1 - self.beta1 ** t)
        correction2_sqrt = (1 - self.beta2 ** t) ** 0.5
        denom = bk.sqrt(v) / correction2_sqrt + self.eps
        return theta + (-step_size * m) / denom                  # torch's addcdiv order


class AdamW(Adam):
    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, bk=None):
        super().__init__(lr, betas, eps, weight_decay, bk)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, lr, **options) -> Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown optimizer {name!r}; expected one of "
                         f"{sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](lr=lr, **options)
