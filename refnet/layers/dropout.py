"""Inverted dropout; p is the probability of *dropping* (torch's convention).

    train:  y = x · m / (1 − p),  m_i ~ Bernoulli(1 − p)  (dropout: per element;
            dropout2d: one m per (sample, channel), shared over H×W)
            dx = dy · m / (1 − p)
            p = 1: y = 0 and dx = 0 (every unit dropped; never 0/0)
    eval:   y = x, dx = dy

The mask is drawn once per layer from the ``ForwardState``'s generator (``rng.random(shape) >= p``)
and kept there, so every pass of a verification sees the same mask and the gradient is exact
for it. p = 0 and eval mode draw nothing; p = 1 draws (and drops everything). Layers draw in the
order the forward pass runs them (a residual body before its shortcut): ``spec/operations.md``
gives the whole rule, for implementations that must draw the same masks. 1 − p is formed in the
backend (exact in mp, one rounding in float64).
"""

from __future__ import annotations

import numpy as np

from ..validate import require_number
from .base import Layer


class Dropout(Layer):
    type = "dropout"
    defaults = {"p": 0.5}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        p = self.config["p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{where}: p (probability of dropping) must lie in [0, 1], got {p!r}")
        require_number(where, "p", p)

    def mask_shape(self, x_shape):
        return x_shape

    def forward(self, bk, params, x, state):
        if not state.train or self.config["p"] == 0:
            return x, None
        p = float(self.config["p"])
        shape = self.mask_shape(tuple(x.shape))
        keep = state.mask(self.name, lambda rng: rng.random(shape) >= p)
        if keep.shape != shape:
            raise ValueError(f"{self.where}: the stored mask has shape {keep.shape}, the input "
                             f"needs {shape}")
        if p == 1:
            return x * 0, keep            # y = 0, no division by 1 − p = 0
        scale = bk.asarray(keep.astype(np.float64)) / (1 - bk.asarray(np.float64(p)))
        return x * scale, scale

    def backward(self, bk, params, dy, scale):
        if scale is None:
            return dy, {}
        if isinstance(scale, np.ndarray) and scale.dtype == bool:     # p = 1
            return dy * 0, {}
        return dy * scale, {}


class Dropout2d(Dropout):
    """Whole channels: x (N, C, H, W), one keep/drop per (n, c)."""
    type = "dropout2d"

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        if len(in_shape) != 3:
            raise ValueError(f"{where}: dropout2d expects input (N, C, H, W), got a sample shape "
                             f"of {tuple(in_shape)}")

    def mask_shape(self, x_shape):
        return x_shape[:2] + (1, 1)
