"""Shape layers: no arithmetic, only a view of the same numbers.

flatten (torch ``nn.Flatten()``, start_dim 1):  (N, d1, d2, ...) -> (N, d1·d2·...);
backward reshapes dy back.
"""

from __future__ import annotations

import numpy as np

from .base import Layer


class Flatten(Layer):
    type = "flatten"

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)

    def forward(self, bk, params, x, state=None):
        return x.reshape((x.shape[0],) + self.out_shape), x.shape

    def backward(self, bk, params, dy, shape):
        return dy.reshape(shape), {}
