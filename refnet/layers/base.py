"""What every layer provides; the model composes layers through this interface alone.

A layer is built from its JSON description (``config``) and the shape of one input sample. It
owns no tensors: parameters and buffers live in the model's dict under PyTorch names, and the
layer receives its own (``{"weight": W, "bias": b, "running_mean": ...}``), already converted to
the backend in use.

    forward(bk, params, x, state)   -> (y, cache)     x: (N, *in_shape), y: (N, *out_shape)
    backward(bk, params, dy, cache) -> (dx, grads)    grads: {local name: dL/dparam}
    kink_signature(cache)           -> tuple of arrays, one per place where the layer's
                                       derivative jumps (ReLU: z > 0; max-pool: the argmax). Two
                                       points with equal signatures lie on the same smooth piece;
                                       the verifier compares them to find finite differences that
                                       straddle a kink.

``state`` (:class:`ForwardState`) carries what is not a function of the inputs: train or eval
mode, the generator dropout draws its masks from (and the masks once drawn, so that every pass
of a verification uses the same ones), and the buffer updates (running statistics) a
training-mode pass produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..init import initialize
from ..validate import require_number  # noqa: F401  (re-exported for the layers)


@dataclass
class ForwardState:
    train: bool = True
    rng: Optional[np.random.Generator] = None
    masks: Dict[str, np.ndarray] = field(default_factory=dict)    # layer name -> dropout mask
    updates: Dict[str, np.ndarray] = field(default_factory=dict)  # buffer name -> new value
    outputs: Optional[list] = None     # if a list: (layer name, layer type, output) per layer
    # The batch holds this many independent batches stacked along axis 0 (a finite-difference
    # sweep runs all its perturbed copies as one batch): batch statistics are per group.
    groups: int = 1

    def mask(self, layer_name: str, draw):
        """The layer's mask: drawn once with ``draw(rng)``, then the same on every pass."""
        if layer_name not in self.masks:
            if self.rng is None:
                raise ValueError(f"{layer_name}: dropout in train mode needs a random generator")
            self.masks[layer_name] = draw(self.rng)
        return self.masks[layer_name]


class Layer:
    type: str = ""
    # Config keys the layer accepts besides "type", with their defaults.
    defaults: Dict[str, Any] = {}
    # How torch.autocast treats the layer's kernel (refnet.lowp.emulation): "lowp" casts its input
    # and parameters to fp16/bf16 and returns that (torch's lower-precision list: linear, conv,
    # prelu); "float32" computes and returns float32 (softplus, layer_norm); "promote" returns
    # its input's dtype, parameters uncast (everything else: relu, sigmoid, batch_norm, ...).
    autocast: str = "promote"

    def __init__(self, config: dict, in_shape: Tuple[int, ...], where: str):
        self.where = where                  # e.g. "layers[3] (dense)": used in every message
        self.name = ""                      # torch prefix, e.g. "3" or "3.body.0"; set by owner
        unknown = sorted(set(config) - set(self.defaults) - {"type", "torch_name"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected a subset of "
                             f"{sorted(self.defaults)}")
        # The torch module path of the layer (spec/model-format.md, "torch names"): its tensors
        # are then also known as "<torch_name>.weight", ...; None keeps refnet's names only.
        self.torch_name = _torch_name(config.get("torch_name"), where)
        self.config = {**self.defaults, **{k: v for k, v in config.items()
                                           if k not in ("type", "torch_name")}}
        self.in_shape = tuple(in_shape)
        self.out_shape = self.output_shape(self.in_shape)

    def output_shape(self, in_shape):
        return in_shape

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Learnable tensors (they get gradients)."""
        return {}

    def buffer_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """State that is not learned (running statistics): no gradient, updated by train passes."""
        return {}

    def init_params(self, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        return {}

    def weight_names(self):
        """The parameters weight regularization applies to by default (dense/conv weights)."""
        return []

    def init_buffers(self) -> Dict[str, np.ndarray]:
        return {}

    def forward(self, bk, params, x, state: ForwardState):
        raise NotImplementedError

    def backward(self, bk, params, dy, cache):
        raise NotImplementedError

    def kink_signature(self, cache) -> tuple:
        return ()

    def __repr__(self):
        return f"<{self.where} {self.in_shape} -> {self.out_shape}>"


def _torch_name(value, where):
    """A torch module path ("layer1.0.conv1"; "" for the root module), or None."""
    if value is None:
        return None
    # torch's module names are any non-empty strings without "." (ModuleDict keys included)
    parts = value.split(".") if isinstance(value, str) else None
    if parts is None or (value and not all(p and not any(c.isspace() for c in p)
                                           for p in parts)):
        raise ValueError(f"{where}: torch_name must be a torch module path such as "
                         f"'layer1.0.conv1' (or '' for the root module), got {value!r}")
    return value


class WeightedLayer(Layer):
    """A layer with ``weight`` (shape from ``weight_shape()``) and an optional ``bias`` (out,),
    initialized from the config's ``init`` and ``bias_init`` (torch_default: as torch's layers)."""

    def weight_shape(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def weight_names(self):
        return ["weight"]

    def param_shapes(self):
        shapes = {"weight": self.weight_shape()}
        if self.config["bias"]:
            shapes["bias"] = (self.weight_shape()[0],)
        return shapes

    def init_params(self, rng):
        shapes = self.param_shapes()
        params = {"weight": initialize(self.config["init"], shapes["weight"], rng,
                                       f"{self.where} init")}
        if self.config["bias"]:
            params["bias"] = initialize(self.config["bias_init"], shapes["bias"], rng,
                                        f"{self.where} bias_init", weight_shape=shapes["weight"])
        return params
