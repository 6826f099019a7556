"""The PyTorch twin of a refnet model (float64 or float32, CPU): for peer timings in
``benchmarks/`` and for ``refnet conformance``. Needs torch (imported here, not by refnet).

Same layers, same parameter names (``state_dict`` keys equal refnet's), same parameter values.
Covers dense, conv2d, pools, flatten, batchnorm, layernorm, dropout, dropout2d, residual and the
activations torch has (sigmoid, tanh, relu, leaky_relu, prelu, elu, selu, gelu, softplus).
Also groupnorm, instancenorm2d, gelu with ``approximate``, silu, mish, hardtanh, relu6,
hardsigmoid, hardswish, celu, softsign and logsigmoid (``_OPTION_MODULES``).

Dropout: with ``masks`` (layer name -> boolean keep mask, as a refnet ``ForwardState`` holds them
after a train-mode pass, or as ``spec/operations.md`` says to draw them) every dropout layer uses
its given mask in torch's own arithmetic, so the twin computes the same function as refnet.
Without, they are ``nn.Dropout``/``nn.Dropout2d`` drawing torch's masks (for timings only).

Pools carry every option refnet has, by torch's name (dilation, ceil_mode, count_include_pad,
divisor_override); adaptive_avgpool2d and adaptive_maxpool2d are nn.AdaptiveAvgPool2d and
nn.AdaptiveMaxPool2d; dense on (N, *, in) is nn.Linear on the last axis.

Recurrent layers (rnn, lstm, gru) are ``nn.RNN``/``nn.LSTM``/``nn.GRU`` with ``batch_first=True``
(subclassed only to return torch's ``output``, or its last step for ``"output": "last"``), so
their parameters keep torch's own names (``"0.weight_ih_l0"``, ...).

Losses (``torch_loss``, ``torch_objective``): torch's functional of each loss with its options
by torch's name; a reduction "none" loss is differentiated as Σ upstream·ℓ.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..losses import split_targets
from ..model import Model

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
                "selu": nn.SELU, "identity": nn.Identity}

# The issue-18 layers: torch's module for each refnet type, with the layer's options.
_OPTION_MODULES = {
    "gelu": lambda layer, c: nn.GELU(approximate=c["approximate"]),
    "silu": lambda layer, c: nn.SiLU(),
    "mish": lambda layer, c: nn.Mish(),
    "hardtanh": lambda layer, c: nn.Hardtanh(c["min_val"], c["max_val"]),
    "relu6": lambda layer, c: nn.ReLU6(),
    "hardsigmoid": lambda layer, c: nn.Hardsigmoid(),
    "hardswish": lambda layer, c: nn.Hardswish(),
    "celu": lambda layer, c: nn.CELU(c["alpha"]),
    "softsign": lambda layer, c: nn.Softsign(),
    "logsigmoid": lambda layer, c: nn.LogSigmoid(),
    "groupnorm": lambda layer, c: nn.GroupNorm(layer.groups, layer.channels, c["eps"],
                                               c["affine"]),
    "instancenorm2d": lambda layer, c: nn.InstanceNorm2d(layer.channels, c["eps"], c["momentum"],
                                                         c["affine"], c["track_running_stats"]),
}


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


class FixedMaskDropout(nn.Module):
    """torch's dropout (``torch.nn.functional.dropout``'s CPU path, ``at::native::_dropout``) with
    its Bernoulli draw replaced by a given keep mask: train: noise = mask in the input's dtype,
    ``noise.div_(1 − p)``, ``input * noise``; p = 1: ``input * 0``; p = 0 or eval: the input.
    A dropout2d mask has shape (N, C, 1, 1) and broadcasts over H×W, as torch's feature noise."""

    def __init__(self, p, mask, where):
        super().__init__()
        self.p, self.where = p, where
        self.mask = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=bool))

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * torch.zeros((), dtype=x.dtype)
        if self.mask is None:
            raise ValueError(f"{self.where}: no dropout mask was given for this layer")
        noise = self.mask.to(x.dtype)
        noise.div_(1 - self.p)
        return x * noise


class _LastOrSequence:
    """torch's recurrent module returning ``output`` (N, T, H), or ``output[:, -1]`` (N, H)."""

    def forward(self, x):
        out, _ = super().forward(x)
        return out[:, -1] if self.refnet_last else out


_RECURRENT = {kind: type(f"Refnet{cls.__name__}", (_LastOrSequence, cls), {})
              for kind, cls in (("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU))}


def _recurrent(layer, c):
    options = {"nonlinearity": c["nonlinearity"]} if layer.type == "rnn" else {}
    module = _RECURRENT[layer.type](layer.in_shape[-1], layer.hidden, layer.num_layers,
                                    bias=c["bias"], batch_first=True, **options)
    module.refnet_last = c["output"] == "last"
    return module


def _tup(value):
    """A JSON pair as torch's tuple (an int, or null, as it is)."""
    return tuple(value) if isinstance(value, list) else value


def _module(layer, masks=None):
    kind, c = layer.type, layer.config
    if kind == "dense":
        return nn.Linear(layer.in_shape[-1], c["out"], bias=c["bias"])
    if kind == "conv2d":
        padding = c["padding"] if isinstance(c["padding"], (int, str)) else tuple(c["padding"])
        tup = lambda v: tuple(v) if isinstance(v, list) else v     # noqa: E731
        return nn.Conv2d(layer.in_channels, c["out_channels"], tup(c["kernel_size"]),
                         tup(c["stride"]), padding, tup(c["dilation"]), c["groups"], c["bias"])
    if kind == "maxpool2d":
        return nn.MaxPool2d(_tup(c["kernel_size"]), _tup(c["stride"]), _tup(c["padding"]),
                            _tup(c["dilation"]), ceil_mode=c["ceil_mode"])
    if kind == "avgpool2d":
        return nn.AvgPool2d(_tup(c["kernel_size"]), _tup(c["stride"]), _tup(c["padding"]),
                            ceil_mode=c["ceil_mode"], count_include_pad=c["count_include_pad"],
                            divisor_override=c["divisor_override"])
    if kind == "adaptive_avgpool2d":
        return nn.AdaptiveAvgPool2d(_tup(c["output_size"]))
    if kind == "adaptive_maxpool2d":
        return nn.AdaptiveMaxPool2d(_tup(c["output_size"]))
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
    if kind in ("dropout", "dropout2d"):
        if masks is not None:
            return FixedMaskDropout(float(c["p"]), masks.get(layer.name), layer.where)
        return nn.Dropout(c["p"]) if kind == "dropout" else nn.Dropout2d(c["p"])
    if kind == "residual":
        shortcut = None if layer.shortcut is None else _sequential(layer.shortcut.layers, masks)
        return Residual(_sequential(layer.body.layers, masks), shortcut, c["scale"])
    if kind in _RECURRENT:
        return _recurrent(layer, c)
    if kind in _OPTION_MODULES:
        return _OPTION_MODULES[kind](layer, c)
    if kind in _ACTIVATIONS:
        return _ACTIVATIONS[kind]()
    raise NotImplementedError(f"no torch twin for layer type {kind!r}")


def _sequential(layers, masks=None):
    return nn.Sequential(*[_module(layer, masks) for layer in layers])


def torch_twin(model: Model, params, dtype=torch.float64, masks=None):
    """The torch module of ``model`` holding ``params``; ``masks``: see the module docstring."""
    net = _sequential(model.layers, masks).to(dtype)
    state = {k: torch.tensor(np.asarray(v)) for k, v in params.items()}
    net.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v.long()
                         for k, v in state.items()}, strict=False)
    return net


_LOSS_FUNCTIONS = {"mse": "mse_loss", "softmax_cross_entropy": "cross_entropy",
                   "bce_with_logits": "binary_cross_entropy_with_logits", "l1": "l1_loss",
                   "smooth_l1": "smooth_l1_loss", "huber": "huber_loss", "nll": "nll_loss"}


def torch_loss(model: Model):
    """torch's functional loss of ``model`` with the model's options by torch's name (weight,
    ignore_index, label_smoothing, pos_weight, beta, delta) and its reduction:
    ``f(output, target, reduction=...)`` (a reduction given overrides the model's)."""
    loss = model.loss
    function = getattr(nn.functional, _LOSS_FUNCTIONS[loss.type])
    options = {k: v for k, v in loss.config.items() if v is not None}

    def f(output, target, reduction=None):
        kw = {k: (torch.tensor(np.asarray(v, dtype=np.float64), dtype=output.dtype,
                               device=output.device)
                  if k in ("weight", "pos_weight") else v) for k, v in options.items()}
        return function(output, target, reduction=reduction or loss.reduction, **kw)
    return f


def torch_objective(model: Model, output, y, target_dtype=None):
    """(the scalar torch differentiates, torch's loss output) for refnet targets ``y`` (as
    ``Model.prepare`` returns them): labels as int64, everything else in ``target_dtype``
    (default: the output's dtype); for reduction "none" the scalar is Σ upstream·ℓ — what
    ``ℓ.backward(upstream)`` differentiates — and the output ℓ itself."""
    target, upstream = split_targets(y)
    target = np.asarray(target)
    dtype = output.dtype if target_dtype is None else target_dtype
    t = (torch.tensor(target, dtype=torch.long, device=output.device)
         if target.dtype.kind in "iu"
         else torch.tensor(target, dtype=dtype, device=output.device))
    out = torch_loss(model)(output, t)
    if model.loss.reduction != "none":
        return out, out
    return (out * torch.tensor(np.asarray(upstream), dtype=dtype,
                               device=output.device)).sum(), out


# --- a twin under torch names (refnet.to_torch of a model from refnet.from_torch) ------------

class NamedTwin(nn.Module):
    """The twin of a model whose layers carry ``torch_name``: it runs the refnet-ordered twin
    (held, not registered) and registers that twin's very parameter and buffer objects under
    their torch names, so ``named_parameters()``, ``state_dict()`` and every ``.grad`` use the
    names of the module the model came from. ``.to()``/``.double()`` and ``.train()`` act on the
    held twin and then share its tensors again."""

    def __init__(self, run: nn.Module, model: Model):
        super().__init__()
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "_model", model)
        self._share()

    def _share(self):
        self._parameters.clear()
        self._buffers.clear()
        self._modules.clear()
        tensors = dict(self._run.named_parameters())
        tensors.update(self._run.named_buffers())
        for refnet_name, value in tensors.items():
            path = self._model.torch_name(refnet_name).split(".")
            owner = self
            for part in path[:-1]:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            if isinstance(value, nn.Parameter):
                owner.register_parameter(path[-1], value)
            else:
                owner.register_buffer(path[-1], value)

    def _apply(self, fn, recurse=True):
        self._run._apply(fn, recurse)
        self._share()
        return self

    def train(self, mode: bool = True):
        self._run.train(mode)
        return super().train(mode)

    def forward(self, x):
        return self._run(x)


def named_twin(model: Model, params, dtype=torch.float64, masks=None) -> NamedTwin:
    """``torch_twin`` of a model with torch names (``params`` in refnet's names)."""
    return NamedTwin(torch_twin(model, params, dtype, masks), model)
