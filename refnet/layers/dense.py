"""Dense (fully connected) layer in PyTorch layout.

    forward:   y = x Wᵀ + b            x: (N, *, in)   W: (out, in)   b: (out,)   y: (N, *, out)
    backward:  dx = dy W               dy: (N, *, out) dx: (N, *, in)
               dW = dyᵀ x              dW: (out, in)   with every leading axis folded into the
               db = Σ dy               db: (out,)      rows: dy (M, out), x (M, in), M = N·Π*

As ``nn.Linear``, the layer acts on the last axis; the leading axes (the batch and any others,
e.g. a sequence's time steps) are rows, so dW and db sum over all of them.

Parameters ``weight`` and ``bias`` as ``torch.nn.Linear``; config::

    {"type": "dense", "out": 128, "bias": true,
     "init": "torch_default" | name | {"name": ..., options},      (weight)
     "bias_init": "torch_default" | name | {"name": ..., options}}

Without ``init``/``bias_init`` the layer is initialized as ``nn.Linear`` is by default.
"""

from __future__ import annotations

from ..init import parse_init
from .base import WeightedLayer, require_number


class Dense(WeightedLayer):
    type = "dense"
    autocast = "lowp"
    defaults = {"out": None, "bias": True, "init": "torch_default", "bias_init": "torch_default"}

    def __init__(self, config, in_shape, where):
        if "out" not in config:
            raise ValueError(f"{where}: dense needs 'out' (the number of output features)")
        super().__init__(config, in_shape, where)
        if len(self.in_shape) < 1:
            raise ValueError(f"{where}: dense expects input of shape (N, *, features), got a "
                             f"sample shape of {self.in_shape}")
        require_number(where, "out", self.config["out"], low=1, integer=True)
        if not isinstance(self.config["bias"], bool):
            raise ValueError(f"{where}: bias must be true or false, got {self.config['bias']!r}")
        parse_init(self.config["init"], f"{where} init")
        parse_init(self.config["bias_init"], f"{where} bias_init")

    def output_shape(self, in_shape):
        return tuple(in_shape[:-1]) + (int(self.config["out"]),)

    def weight_shape(self):
        return (int(self.config["out"]), self.in_shape[-1])

    def forward(self, bk, params, x, state=None):
        y = bk.matmul(x, params["weight"].T)
        if self.config["bias"]:
            y += params["bias"]          # in place: y is the product's fresh array, no one else's
        return y, x

    def backward(self, bk, params, dy, x):
        rows_dy, rows_x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])   # (M, ·)
        grads = {"weight": bk.matmul(rows_dy.T, rows_x)}
        if self.config["bias"]:
            grads["bias"] = bk.sum(rows_dy, axis=0)
        return bk.matmul(dy, params["weight"]), grads
