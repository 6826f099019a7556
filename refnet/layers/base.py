"""What every layer provides; the model composes layers through this interface alone.

A layer is built from its JSON description (``config``) and the shape of one input sample. It
owns no parameters: they live in the model's dict under PyTorch names, and the layer receives its
own (``{"weight": W, "bias": b}``) already converted to the backend in use.

    forward(bk, params, x)       -> (y, cache)     x: (N, *in_shape), y: (N, *out_shape)
    backward(bk, params, dy, cache) -> (dx, grads)  grads: {local name: dL/dparam}
    kink_signature(cache)        -> tuple of bool arrays, one per place where the layer's
                                    derivative jumps (ReLU: z > 0). Two points with the same
                                    signature lie on the same smooth piece; the verifier compares
                                    signatures to find finite differences that straddle a kink.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from ..validate import require_number  # noqa: F401  (re-exported for the layers)


class Layer:
    type: str = ""
    # Config keys the layer accepts besides "type", with their defaults.
    defaults: Dict[str, Any] = {}

    def __init__(self, config: dict, in_shape: Tuple[int, ...], where: str):
        self.where = where                  # e.g. "layers[3] (dense)": used in every message
        unknown = sorted(set(config) - set(self.defaults) - {"type"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected a subset of "
                             f"{sorted(self.defaults)}")
        self.config = {**self.defaults, **{k: v for k, v in config.items() if k != "type"}}
        self.in_shape = tuple(in_shape)
        self.out_shape = self.output_shape(self.in_shape)

    def output_shape(self, in_shape):
        return in_shape

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {}

    def init_params(self, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        return {}

    def forward(self, bk, params, x):
        raise NotImplementedError

    def backward(self, bk, params, dy, cache):
        raise NotImplementedError

    def kink_signature(self, cache) -> tuple:
        return ()

    def __repr__(self):
        return f"<{self.where} {self.in_shape} -> {self.out_shape}>"
