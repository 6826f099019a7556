"""Model as data: a JSON spec builds a sequential model; parameters are a dict with torch names.

Spec (see ``spec/model-format.md``)::

    {"input_shape": [64], "seed": 0, "batch": 4,
     "layers": [{"type": "dense", "out": 128, "init": "kaiming_normal", "bias_init": "zeros"},
                {"type": "relu"},
                {"type": "dense", "out": 10, "init": {"name": "normal", "std": 0.01}}],
     "loss": {"type": "softmax_cross_entropy", "reduction": "mean"}}

Layer ``i``'s parameter ``weight`` is named ``"i.weight"``, as in a torch ``nn.Sequential`` of the
same layers. ``seed`` seeds two independent streams (``numpy.random.SeedSequence(seed).spawn(2)``):
the first draws the parameters, layer by layer in order; the second draws the default batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .activations import ACTIVATIONS
from .layers.dense import Dense
from .losses import Loss, make_loss
from .validate import finite_float64

LAYERS = {Dense.type: Dense, **ACTIVATIONS}
SPEC_KEYS = {"input_shape", "layers", "loss", "seed", "batch", "name", "description"}


@dataclass
class ForwardResult:
    """One forward pass: the output, the loss, and each layer's cache (for backward)."""
    output: object
    loss: object
    caches: List[object]
    loss_cache: object
    kink_signatures: List[tuple] = field(default_factory=list)


@dataclass
class Gradients:
    """Loss, dL/dparam for every parameter (torch names) and dL/dx, in the backend's arrays."""
    loss: object
    params: Dict[str, object]
    x: object
    forward: ForwardResult


def _shape_of(value, key):
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in value):
        raise ValueError(f"spec: {key} must be a non-empty list of positive integers, got {value!r}")
    return tuple(value)


class Model:
    """A sequential model built from a spec dict (``Model(spec)``) or file (``Model.load``)."""

    def __init__(self, spec: dict):
        if not isinstance(spec, dict):
            raise ValueError(f"spec: expected a JSON object, got {type(spec).__name__}")
        unknown = sorted(set(spec) - SPEC_KEYS)
        if unknown:
            raise ValueError(f"spec: unknown key(s) {unknown}; expected a subset of {sorted(SPEC_KEYS)}")
        for key in ("input_shape", "layers", "loss"):
            if key not in spec:
                raise ValueError(f"spec: missing key {key!r}")
        self.spec = spec
        self.input_shape = _shape_of(spec["input_shape"], "input_shape")
        self.seed = spec.get("seed", 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"spec: seed must be a non-negative integer, got {self.seed!r}")
        self.batch = spec.get("batch", 4)
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"spec: batch must be a positive integer, got {self.batch!r}")
        if not isinstance(spec["layers"], list) or not spec["layers"]:
            raise ValueError(f"spec: layers must be a non-empty list, got {spec['layers']!r}")

        self.layers = []
        shape = self.input_shape
        for i, config in enumerate(spec["layers"]):
            if not isinstance(config, dict) or "type" not in config:
                raise ValueError(f"layers[{i}]: expected an object with 'type', got {config!r}")
            kind = config["type"]
            if kind not in LAYERS:
                raise ValueError(f"layers[{i}]: unknown layer type {kind!r}; expected one of "
                                 f"{sorted(LAYERS)}")
            layer = LAYERS[kind](config, shape, f"layers[{i}] ({kind})")
            self.layers.append(layer)
            shape = layer.out_shape
        self.output_shape = shape
        self.loss: Loss = make_loss(spec["loss"], shape)

    @classmethod
    def load(cls, path) -> "Model":
        try:
            with open(path) as f:
                spec = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"spec {path}: not valid JSON: {e}") from None
        return cls(spec)

    # parameters -----------------------------------------------------------------------------
    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {f"{i}.{name}": shape for i, layer in enumerate(self.layers)
                for name, shape in layer.param_shapes().items()}

    def _rngs(self):
        params_seq, data_seq = np.random.SeedSequence(self.seed).spawn(2)
        return np.random.default_rng(params_seq), np.random.default_rng(data_seq)

    def init_params(self, rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
        """Draw every parameter (float64, torch layout) from the spec's inits."""
        rng = self._rngs()[0] if rng is None else rng
        return {f"{i}.{name}": value for i, layer in enumerate(self.layers)
                for name, value in layer.init_params(rng).items()}

    def check_params(self, params: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Exactly the expected names, shapes and finite values; returns float64 copies."""
        expected = self.param_shapes()
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected))
        if missing or extra:
            raise ValueError(f"params: names do not match the spec: missing {missing}, "
                             f"unexpected {extra}; expected {sorted(expected)}")
        checked = {}
        for name, shape in expected.items():
            value = np.asarray(params[name])
            if value.shape != shape:
                raise ValueError(f"params: {name} ({self._owner(name)}) must have shape {shape}, "
                                 f"got {value.shape}")
            checked[name] = finite_float64(value, f"params: {name}")
        return checked

    def _owner(self, name):
        return self.layers[int(name.split(".")[0])].where

    # data ---------------------------------------------------------------------------------------
    def check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            raise ValueError(f"input x: expected shape (N, {', '.join(map(str, self.input_shape))})"
                             f", got {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("input x: the batch is empty (N = 0)")
        return finite_float64(x, "input x:")

    def default_data(self, batch: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """A seeded batch: x ~ N(0, 1), targets drawn to fit the loss."""
        rng = self._rngs()[1]
        batch = self.batch if batch is None else batch
        x = rng.standard_normal((batch,) + self.input_shape)
        return x, self.loss.default_targets(rng, batch)

    # forward and backward ---------------------------------------------------------------------
    def _layer_params(self, bk, params, i):
        prefix = f"{i}."
        return {name[len(prefix):]: bk.asarray(value) for name, value in params.items()
                if name.startswith(prefix)}

    def forward(self, bk, params, x, y) -> ForwardResult:
        """Run the layers and the loss in backend ``bk``. Inputs must already be checked."""
        h = bk.asarray(x)
        caches, signatures = [], []
        for i, layer in enumerate(self.layers):
            h, cache = layer.forward(bk, self._layer_params(bk, params, i), h)
            caches.append(cache)
            signatures.append(layer.kink_signature(cache))
        loss, loss_cache = self.loss.forward(bk, h, y)
        return ForwardResult(h, loss, caches, loss_cache, signatures)

    def loss_and_grads(self, bk, params, x, y) -> Gradients:
        """Loss and the gradient of every parameter and of the input, in backend ``bk``."""
        fwd = self.forward(bk, params, x, y)
        grads: Dict[str, object] = {}
        dh = self.loss.backward(bk, fwd.loss_cache)
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            dh, layer_grads = layer.backward(bk, self._layer_params(bk, params, i), dh, fwd.caches[i])
            for name, g in layer_grads.items():
                grads[f"{i}.{name}"] = g
        ordered = {name: grads[name] for name in self.param_shapes()}
        return Gradients(fwd.loss, ordered, dh, fwd)

    def prepare(self, params=None, x=None, y=None):
        """Fill in defaults from the spec and validate: -> (params, x, y) ready for any backend."""
        params = self.init_params() if params is None else params
        params = self.check_params(params)
        if x is None:
            x_default, y_default = self.default_data()
            x = x_default
            y = y_default if y is None else y
        x = self.check_input(x)
        if y is None:
            raise ValueError("data: x was given without targets y")
        y = self.loss.check_target(y, x.shape[0])
        return params, x, y
