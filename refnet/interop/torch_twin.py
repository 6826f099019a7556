"""The PyTorch twin of a refnet model (float64 or float32, CPU): for peer timings in
``benchmarks/`` and for ``refnet conformance``. Needs torch (imported here, not by refnet).

Same layers, same parameter names (``state_dict`` keys equal refnet's), same parameter values.
Covers dense, conv2d, pools, flatten, batchnorm, layernorm, dropout, residual and the activations
torch has (sigmoid, tanh, relu, leaky_relu, prelu, elu, selu, gelu, softplus).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..model import Model

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
                "selu": nn.SELU, "identity": nn.Identity}


class Residual(nn.Module):
    def __init__(self, body, shortcut, scale):
        super().__init__()
        self.body = body
        if shortcut is not None:
            self.shortcut = shortcut
        self.scale = scale

    def forward(self, h):
        s = self.shortcut(h) if hasattr(self, "shortcut") else h
        return s + self.scale * self.body(h)


def _module(layer):
    kind, c = layer.type, layer.config
    if kind == "dense":
        return nn.Linear(layer.in_shape[0], c["out"], bias=c["bias"])
    if kind == "conv2d":
        padding = c["padding"] if isinstance(c["padding"], (int, str)) else tuple(c["padding"])
        tup = lambda v: tuple(v) if isinstance(v, list) else v     # noqa: E731
        return nn.Conv2d(layer.in_channels, c["out_channels"], tup(c["kernel_size"]),
                         tup(c["stride"]), padding, tup(c["dilation"]), c["groups"], c["bias"])
    if kind == "maxpool2d":
        return nn.MaxPool2d(c["kernel_size"], c["stride"], c["padding"])
    if kind == "avgpool2d":
        return nn.AvgPool2d(c["kernel_size"], c["stride"], c["padding"],
                            count_include_pad=c["count_include_pad"])
    if kind == "global_avgpool":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "flatten":
        return nn.Flatten()
    if kind == "batchnorm":
        cls = nn.BatchNorm1d if len(layer.in_shape) < 3 else nn.BatchNorm2d
        return cls(layer.channels, c["eps"], c["momentum"], c["affine"], c["track_running_stats"])
    if kind == "layernorm":
        return nn.LayerNorm(list(layer.normalized_shape), c["eps"], c["elementwise_affine"],
                            bias=c["bias"])
    if kind == "leaky_relu":
        return nn.LeakyReLU(c["slope"])
    if kind == "elu":
        return nn.ELU(c["alpha"])
    if kind == "softplus":
        return nn.Softplus(c["beta"], c["threshold"])
    if kind == "prelu":
        return nn.PReLU(c["num_parameters"])
    if kind == "dropout":
        return nn.Dropout(c["p"])
    if kind == "residual":
        shortcut = None if layer.shortcut is None else _sequential(layer.shortcut.layers)
        return Residual(_sequential(layer.body.layers), shortcut, c["scale"])
    if kind in _ACTIVATIONS:
        return _ACTIVATIONS[kind]()
    raise NotImplementedError(f"no torch twin for layer type {kind!r}")


def _sequential(layers):
    return nn.Sequential(*[_module(layer) for layer in layers])


def torch_twin(model: Model, params, dtype=torch.float64):
    net = _sequential(model.layers).to(dtype)
    state = {k: torch.tensor(np.asarray(v)) for k, v in params.items()}
    net.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v.long()
                         for k, v in state.items()}, strict=False)
    return net


def torch_loss(model: Model):
    kind = model.loss.type
    return {"mse": nn.functional.mse_loss, "softmax_cross_entropy": nn.functional.cross_entropy,
            "bce_with_logits": nn.functional.binary_cross_entropy_with_logits}[kind]
