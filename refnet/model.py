"""Model as data: a JSON spec builds a sequential model; parameters are a dict with torch names.

Spec (see ``spec/model-format.md``)::

    {"input_shape": [64], "seed": 0, "batch": 4,
     "layers": [{"type": "dense", "out": 128, "init": "kaiming_normal", "bias_init": "zeros"},
                {"type": "relu"},
                {"type": "dense", "out": 10, "init": {"name": "normal", "std": 0.01}}],
     "loss": {"type": "softmax_cross_entropy", "reduction": "mean"}}

Layer ``i``'s parameter ``weight`` is named ``"i.weight"``, as in a torch ``nn.Sequential`` of the
same layers. ``seed`` seeds three independent streams (``numpy.random.SeedSequence(seed).spawn(3)``):
the first draws the parameters, layer by layer in order; the second draws the default batch; the
third draws the dropout masks (spec/operations.md gives their exact order).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .io import read_input
from .layers.base import ForwardState
from .layers.registry import build_layer
from .layers.sequential import Sequential, run_forward, split_all
from .losses import Loss, make_loss
from .regularize import l1_kink_signature, parse_regularization, penalty
from .validate import finite_float64

SPEC_KEYS = {"input_shape", "layers", "loss", "seed", "batch", "mode", "regularization", "name",
             "description"}
MODES = ("train", "eval")


@dataclass
class ForwardResult:
    """One forward pass: the output, the loss, each layer's cache (for backward), each layer's
    kink signature and then the loss's, and the state (mode, dropout masks, running-statistics
    updates)."""
    output: object
    loss: object
    caches: List[object]
    loss_cache: object
    kink_signatures: List[tuple] = field(default_factory=list)
    state: Optional[ForwardState] = None
    penalty_grads: Dict[str, object] = field(default_factory=dict)   # ∂(L1/L2 penalty)/∂w
    inputs: List[object] = field(default_factory=list)   # each top-level layer's input, in order


@dataclass
class ForwardPrefix:
    """What a forward that starts at top-level layer ``start`` takes as given
    (``Model.forward_tensors(..., start=k, prefix=...)``): the kink signatures of layers < k, and
    per regularized name its penalty terms (``terms[name]``: α₁·Σ|w| then (α₂/2)·Σw², those
    present, as ``regularize.penalty`` forms them) and its L1 kink signature
    (``regularize.l1_kink_signature(tensors, [name], l1)``). The verifier's finite differences
    keep these from the unperturbed forward and replace the perturbed tensor's entries."""
    signatures: List[tuple]
    terms: Dict[str, list] = field(default_factory=dict)
    l1_signatures: Dict[str, tuple] = field(default_factory=dict)


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


def _leaves(layer):
    """The leaf layers under ``layer`` (containers — sequential, residual — have children)."""
    children = getattr(layer, "children", None)
    if children is None:
        yield layer
        return
    for _, child in children():
        yield from _leaves(child)


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
        self.mode = spec.get("mode", "train")
        if self.mode not in MODES:
            raise ValueError(f"spec: mode must be 'train' or 'eval', got {self.mode!r}")
        if not isinstance(spec["layers"], list) or not spec["layers"]:
            raise ValueError(f"spec: layers must be a non-empty list, got {spec['layers']!r}")
        self.net = Sequential(spec["layers"], self.input_shape, "", build=build_layer)
        self.layers = self.net.layers
        self.output_shape = self.net.out_shape
        self.torch_names = torch_names(self.net)      # refnet name -> torch name (torch_name)
        self.loss: Loss = make_loss(spec["loss"], self.output_shape)
        self.l1, self.l2, self.regularized = parse_regularization(
            spec.get("regularization", {}), self.net.weight_names(), self.net.param_shapes())
        if not self.regularized:
            # A penalty over no parameter is a sum of nothing: exactly 0 whatever α. The
            # coefficients in effect are then 0, so that no backend (the fp16/bf16 emulation,
            # which models no penalty, included) sees a penalty term at all.
            self.l1 = self.l2 = 0.0

    @classmethod
    def load(cls, path) -> "Model":
        """Read a JSON model spec. A file that is not one (binary, a directory, missing) is
        named as the model spec, with what was found."""
        what = f"model spec {path}"
        raw = read_input(path, what, "a JSON file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what}: not a JSON text file (byte {e.object[e.start]:#04x} at "
                             f"offset {e.start} is not UTF-8)") from None
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: not valid JSON: {e}") from None
        return cls(spec)

    # parameters -----------------------------------------------------------------------------
    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Learnable parameters by torch name (these get gradients)."""
        return self.net.param_shapes()

    def weight_names(self):
        """Dense and conv weights: what regularization applies to by default."""
        return self.net.weight_names()

    def buffer_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Buffers by torch name (running statistics; no gradient)."""
        return self.net.buffer_shapes()

    def _rng(self, stream: int) -> np.random.Generator:
        """A fresh generator of the spec's seeded stream ``stream`` (0 parameters, 1 data, 2
        dropout). Every forward asks for the dropout stream: the spawned seed sequences are
        kept (drawing from a generator never changes the sequence it was made from), which
        saves 0.1 ms a pass."""
        return np.random.default_rng(self._streams[stream])

    @functools.cached_property
    def _streams(self):
        return tuple(np.random.SeedSequence(self.seed).spawn(3))

    def init_params(self, rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
        """Draw every parameter (float64, torch layout) from the spec's inits, and add the
        buffers' initial values (running mean 0, running variance 1)."""
        rng = self._rng(0) if rng is None else rng
        return {**self.net.init_params(rng), **self.net.init_buffers()}

    def default_state(self, train: Optional[bool] = None) -> ForwardState:
        """The spec's mode, with dropout masks drawn from the spec's third seeded stream."""
        train = (self.mode == "train") if train is None else train
        return ForwardState(train=train, rng=self._rng(2))

    def check_params(self, params: Dict[str, np.ndarray],
                     source: str = "params") -> Dict[str, np.ndarray]:
        """Exactly the expected names, shapes and finite values; returns float64 copies.

        Every parameter must be present; buffers (a torch state_dict has them) are optional and
        default to their initial values; a given buffer must hold a value its layer can use
        (``check_buffers``: a running variance is >= 0, a batch count a whole number).
        ``source`` begins every message (the CLI passes "params FILE"). Tensors may be named
        by refnet's names or by the layers' torch names (``torch_names``); the copies returned
        carry refnet's."""
        params = self.refnet_named(params, source)
        expected = self.param_shapes()
        buffers = self.buffer_shapes()
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected) - set(buffers))
        if missing or extra:
            shown = lambda names: sorted(self.torch_names.get(n, n) for n in names)  # noqa: E731
            raise ValueError(f"{source}: names do not match the spec: missing {shown(missing)}, "
                             f"unexpected {extra}; expected {shown(expected)}"
                             + (f" (and optionally the buffers {shown(buffers)})" if buffers else ""))
        checked = dict(self.net.init_buffers())
        expected = {**expected, **{k: v for k, v in buffers.items() if k in params}}
        for name, shape in expected.items():
            value = np.asarray(params[name])
            if value.shape != shape:
                raise ValueError(f"{source}: {name} ({self._owner(name)}) must have shape {shape}, "
                                 f"got {value.shape}")
            checked[name] = finite_float64(value, f"{source}: {name}")
        for layer in _leaves(self.net):
            check = getattr(layer, "check_buffers", None)
            prefix = f"{layer.name}."
            given = {k[len(prefix):]: checked[k] for k in buffers
                     if k in params and k.startswith(prefix)}
            if check is not None and given:
                check(given, source)
        return checked

    def _owner(self, name):
        return next((layer.where for layer in _leaves(self.net)
                     if name.startswith(f"{layer.name}.")), name)

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
        rng = self._rng(1)
        batch = self.batch if batch is None else batch
        x = rng.standard_normal((batch,) + self.input_shape)
        return x, self.loss.default_targets(rng, batch)

    # forward and backward ---------------------------------------------------------------------
    def forward(self, bk, params, x, y, state: Optional[ForwardState] = None) -> ForwardResult:
        """Run the layers and the loss in backend ``bk``. Inputs must already be checked.

        ``state`` defaults to the spec's mode with its seeded dropout stream; pass the same state
        to several passes to reuse the dropout masks."""
        params = self.refnet_named(params)
        tensors = {name: bk.asarray(value) for name, value in params.items()}
        return self.forward_tensors(bk, tensors, x, y, state)

    def forward_tensors(self, bk, tensors, x, y, state: Optional[ForwardState] = None, *,
                        start: int = 0, prefix: Optional[ForwardPrefix] = None) -> ForwardResult:
        """``forward`` with the parameters already of ``bk`` (no conversion pass), and optionally
        only its end: the layers from top-level layer ``start`` on, ``x`` being that layer's input
        (already of ``bk`` when start > 0), with ``prefix`` giving what the layers before it and
        the penalty contribute. The loss is assembled here and only here: the full forward and
        every partial one add the same terms in the same order, so their losses and kink
        signatures agree bit for bit (``tests/test_fd_prefix.py``).

        ``caches`` and ``inputs`` hold the layers run (start..); with a ``prefix``,
        ``penalty_grads`` is empty (a partial forward is for the loss, not for backward)."""
        if start and prefix is None:
            raise ValueError(f"forward from layer {start}: the prefix of layers < {start} is needed")
        state = self.default_state() if state is None else state
        h = bk.asarray(x) if start == 0 else x
        caches, inputs = [], []
        signatures = [] if prefix is None else list(prefix.signatures[:start])
        # Sequential.forward's loop, from layer ``start``, keeping every layer's input.
        per_layer = split_all(tensors, len(self.layers))
        for j in range(start, len(self.layers)):
            layer = self.layers[j]
            inputs.append(h)
            h, cache = run_forward(bk, layer, per_layer[j], h, state)
            caches.append(cache)
            signatures.append(layer.kink_signature(cache))
            if state.outputs is not None:
                state.outputs.append((layer.name, layer.type, h))
        loss, loss_cache = self.loss.forward(bk, h, y)
        signatures.append(self.loss.kink_signature(loss_cache))   # l1's d = 0, huber's |d| = δ
        penalty_grads = {}
        if self.l1 or self.l2:
            if prefix is None:
                reg, penalty_grads = penalty(bk, tensors, self.regularized, self.l1, self.l2)
                l1_signature = l1_kink_signature(tensors, self.regularized, self.l1)
            else:
                # The terms summed in penalty()'s order: name by name, each name's in order.
                reg = None
                for name in self.regularized:
                    for t in prefix.terms[name]:
                        reg = t if reg is None else reg + t
                reg = bk.zeros(()) if reg is None else reg
                # l1_kink_signature's layout: every name's sign(w) ≠ 0, then every name's w > 0.
                per_name = [prefix.l1_signatures[name] for name in self.regularized]
                l1_signature = (tuple(s[0] for s in per_name if s)
                                + tuple(s[1] for s in per_name if s))
            loss = loss + reg
            signatures.append(l1_signature)
        return ForwardResult(h, loss, caches, loss_cache, signatures, state, penalty_grads,
                             inputs)

    def loss_and_grads(self, bk, params, x, y, state: Optional[ForwardState] = None) -> Gradients:
        """Loss and the gradient of every parameter and of the input, in backend ``bk``. Each
        gradient is named as its parameter was given: by its torch name or by refnet's."""
        given = {r: k for k, r in self.refnet_keys(params).items()}
        params = self.refnet_named(params)
        tensors = {name: bk.asarray(value) for name, value in params.items()}
        fwd = self.forward_tensors(bk, tensors, x, y, state)
        dh = self.loss.backward(bk, fwd.loss_cache)
        dx, grads = self.net.backward(bk, tensors, dh, fwd.caches)
        grads.update({k: grads[k] + g for k, g in fwd.penalty_grads.items()})
        ordered = {given.get(name, name): grads[name] for name in self.param_shapes()}
        return Gradients(fwd.loss, ordered, dx, fwd)

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

    # torch names --------------------------------------------------------------------------------
    # A layer with "torch_name" (spec/model-format.md) gives its tensors a second name, the one
    # they have in the torch module it came from (refnet.from_torch, refnet import): "3.body.0.
    # weight" is also "layer1.0.conv1.weight". Inside, refnet runs on its own names (the
    # verifier, the FD sweep and the emulation index layers by them); these methods translate
    # at the edges.

    def torch_name(self, name: str) -> str:
        """The torch name of a parameter or buffer (its refnet name if its layer has none)."""
        return self.torch_names.get(name, name)

    def refnet_keys(self, keys) -> Dict[str, str]:
        """key -> refnet name for the keys of one dict. A dict is read in refnet's names when
        every key is one (the names inside, which the verifier uses); otherwise every key is
        read as the name the model answers to — torch's where its layer has torch_name. (The
        two can overlap: a torch "1.weight" can be refnet's name for another tensor, when torch
        nests Sequentials that refnet flattens.)"""
        keys = list(keys)
        if not self.torch_names or all(k in self._refnet_set for k in keys):
            return {k: k for k in keys}
        back = {t: r for r, t in self.torch_names.items()}
        return {k: back.get(k, k) for k in keys}

    def refnet_named(self, tensors: Dict[str, object], source: str = "params") -> Dict[str, object]:
        """``tensors`` keyed by refnet's names, from either naming (``refnet_keys``)."""
        if not self.torch_names:
            return tensors
        out = {}
        for key, name in self.refnet_keys(tensors).items():
            if name in out:
                raise ValueError(f"{source}: {name} is given twice, also as "
                                 f"{self.torch_name(name)!r}")
            out[name] = tensors[key]
        return out

    def torch_named(self, tensors: Dict[str, object]) -> Dict[str, object]:
        """``tensors`` (refnet's names) keyed by their torch names."""
        return {self.torch_name(k): v for k, v in tensors.items()}

    @functools.cached_property
    def _refnet_set(self):
        return set(self.net.param_shapes()) | set(self.net.buffer_shapes())


def torch_names(net) -> Dict[str, str]:
    """refnet name -> torch name of every parameter and buffer of a layer with ``torch_name``:
    ``<torch_name>.<local name>`` (``<local name>`` alone for the root module, ""). The names a
    model answers to — torch's where given, refnet's elsewhere — must be unique."""
    names, owner = {}, {}
    for layer in _leaves(net):
        prefix = getattr(layer, "torch_name", None)
        if prefix is None:
            continue
        for local in {**layer.param_shapes(), **layer.buffer_shapes()}:
            names[f"{layer.name}.{local}"] = f"{prefix}.{local}" if prefix else local
    for layer in _leaves(net):
        for local in {**layer.param_shapes(), **layer.buffer_shapes()}:
            public = names.get(f"{layer.name}.{local}", f"{layer.name}.{local}")
            if public in owner:
                raise ValueError(f"{layer.where}: its tensor {public!r} has the name of a tensor "
                                 f"of {owner[public]} (torch_name must make every name unique)")
            owner[public] = layer.where
    return names
