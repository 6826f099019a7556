"""Dense (fully connected) layer in PyTorch layout.

    forward:   y = x Wᵀ + b            x: (N, in)   W: (out, in)   b: (out,)   y: (N, out)
    backward:  dx = dy W               dy: (N, out) dx: (N, in)
               dW = dyᵀ x              dW: (out, in)
               db = Σ_n dy             db: (out,)

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
        if len(self.in_shape) != 1:
            raise ValueError(f"{where}: dense expects input of shape (N, features), got a sample "
                             f"shape of {self.in_shape}; flatten first")
        require_number(where, "out", self.config["out"], low=1, integer=True)
        if not isinstance(self.config["bias"], bool):
            raise ValueError(f"{where}: bias must be true or false, got {self.config['bias']!r}")
        parse_init(self.config["init"], f"{where} init")
        parse_init(self.config["bias_init"], f"{where} bias_init")

    def output_shape(self, in_shape):
        return (int(self.config["out"]),)

    def weight_shape(self):
        return (int(self.config["out"]), self.in_shape[0])

    def forward(self, bk, params, x, state=None):
        y = bk.matmul(x, params["weight"].T)
        if self.config["bias"]:
            y = y + params["bias"]
        return y, x

    def backward(self, bk, params, dy, x):
        grads = {"weight": bk.matmul(dy.T, x)}
        if self.config["bias"]:
            grads["bias"] = bk.sum(dy, axis=0)
        return bk.matmul(dy, params["weight"]), grads
