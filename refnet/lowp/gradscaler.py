"""Loss scaling: static, and dynamic as an exact port of ``torch.amp.GradScaler``.

torch's rules (``torch/amp/grad_scaler.py`` and the ``_amp_update_scale_`` kernel):

- the scale is a **float32** value, initially ``init_scale`` = 2¹⁶;
- ``scale(loss)`` multiplies the loss by it; the backward pass then carries S·∂L/∂θ;
- ``unscale_``: ``inv_scale = float32(1 / float64(scale))`` (the reciprocal in double, then
  cast), every gradient multiplied by it **in float32**; ``found_inf`` is set if any gradient
  holds inf or NaN. It happens once per step, before clipping (clip the unscaled gradients);
- ``step``: skipped entirely when ``found_inf``; otherwise the optimizer steps on the float32
  master weights;
- ``update``: on ``found_inf``: scale ← scale·backoff_factor (0.5), growth tracker ← 0;
  otherwise the tracker counts the clean step, and when it reaches ``growth_interval`` (2000):
  scale ← scale·growth_factor (2), but only if that is finite in float32, and the tracker ← 0.

Static scaling is the same object with ``dynamic=False``: the scale never changes (steps with
inf/NaN are still skipped, which is what ``GradScaler`` with a huge growth interval does).
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np

from .emulation import check_loss_scale


class GradScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 dynamic: bool = True):
        check_loss_scale(init_scale)
        if not (isinstance(growth_factor, (int, float)) and growth_factor > 1.0):
            raise ValueError(f"GradScaler: growth_factor must be > 1, got {growth_factor!r}")
        if not (isinstance(backoff_factor, (int, float)) and 0.0 < backoff_factor < 1.0):
            raise ValueError(f"GradScaler: backoff_factor must lie in (0, 1), got "
                             f"{backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) \
                or growth_interval < 1:
            raise ValueError(f"GradScaler: growth_interval must be a positive integer, got "
                             f"{growth_interval!r}")
        self._scale = np.float32(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.dynamic = dynamic
        self.growth_tracker = 0
        self.found_inf = False

    @property
    def scale(self) -> float:
        return float(self._scale)

    def inv_scale(self) -> np.float32:
        return np.float32(1.0 / np.float64(self._scale))

    def unscale(self, grads: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Gradients times the float32 inverse scale (in float32); sets ``found_inf``."""
        inv = self.inv_scale()
        out = {}
        found = False
        with np.errstate(all="ignore"):
            for name, g in grads.items():
                g = np.asarray(g, dtype=np.float32) * inv
                found = found or not bool(np.all(np.isfinite(g)))
                out[name] = g
        self.found_inf = found
        return out

    def update(self, found_inf: bool = None) -> None:
        """The scale after a step (``found_inf`` defaults to what ``unscale`` found)."""
        found_inf = self.found_inf if found_inf is None else bool(found_inf)
        if not self.dynamic:
            return
        if found_inf:
            self._scale = np.float32(self._scale * np.float32(self.backoff_factor))
            self.growth_tracker = 0
            return
        successful = self.growth_tracker + 1
        if successful == self.growth_interval:
            with np.errstate(over="ignore"):
                grown = np.float32(self._scale * np.float32(self.growth_factor))
            if math.isfinite(grown):       # never grow past float32's range to inf
                self._scale = grown
            self.growth_tracker = 0
        else:
            self.growth_tracker = successful
