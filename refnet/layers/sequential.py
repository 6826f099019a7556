"""Layers in order. Layer j's tensors are named ``"j.<name>"`` — nested containers give
``"3.body.0.weight"`` — exactly as in a torch ``nn.Sequential`` of the same modules.

    forward:   h_0 = x, h_{j+1} = layer_j(h_j)
    backward:  dh_j = layer_j.backward(dh_{j+1}), collecting each layer's parameter gradients
"""

from __future__ import annotations

from typing import Dict, List

from .base import Layer


def split(tensors: Dict[str, object], index: int) -> Dict[str, object]:
    """The entries of child ``index`` ("3.weight" -> "weight" for index 3)."""
    prefix = f"{index}."
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


def split_all(tensors: Dict[str, object], count: int) -> List[Dict[str, object]]:
    """``[split(tensors, j) for j in range(count)]`` in one pass over the names (a pass per
    child made a forward of L layers with T tensors cost L·T string tests)."""
    out: List[Dict[str, object]] = [{} for _ in range(count)]
    index = {str(j): j for j in range(count)}
    for name, value in tensors.items():
        head, dot, rest = name.partition(".")
        if dot and head in index:
            out[index[head]][rest] = value
    return out


def run_forward(bk, layer, params, x, state):
    """``layer.forward`` — unless the backend runs layers itself: the fp16/bf16 emulation
    (``refnet.lowp.emulation``) runs each leaf layer as one kernel, rounding at its boundary."""
    hook = getattr(bk, "forward_layer", None)
    return hook(layer, params, x, state) if hook else layer.forward(bk, params, x, state)


def run_backward(bk, layer, params, dy, cache):
    """``layer.backward``, or the backend's ``backward_layer`` (see ``run_forward``)."""
    hook = getattr(bk, "backward_layer", None)
    return hook(layer, params, dy, cache) if hook else layer.backward(bk, params, dy, cache)


class Container(Layer):
    """A layer made of named children (``children()`` yields (label, layer)): its tensors are
    the children's, each under ``"<label>.<name>"``."""

    def children(self):
        raise NotImplementedError

    def _collect(self, method, *args):
        return {f"{label}.{k}": v for label, child in self.children()
                for k, v in getattr(child, method)(*args).items()}

    def param_shapes(self):
        return self._collect("param_shapes")

    def buffer_shapes(self):
        return self._collect("buffer_shapes")

    def init_params(self, rng):
        return self._collect("init_params", rng)

    def init_buffers(self):
        return self._collect("init_buffers")

    def weight_names(self):
        return [f"{label}.{n}" for label, child in self.children() for n in child.weight_names()]


class Sequential(Container):
    type = "sequential"

    def __init__(self, configs: List[dict], in_shape, where: str, name: str = "", *, build):
        # ``build(config, in_shape, where, name)`` makes one child: the registry's ``build_layer``,
        # passed down so that no layer module imports the registry (which imports every layer).
        if not isinstance(configs, list) or not configs:
            raise ValueError(f"{where}: expected a non-empty list of layers, got {configs!r}")
        self.where, self.name = where, name
        self.config = {}
        self.in_shape = tuple(in_shape)
        self.layers: List[Layer] = []
        shape = self.in_shape
        for j, config in enumerate(configs):
            child_name = f"{name}.{j}" if name else str(j)
            layer = build(config, shape, f"{where}[{j}]" if where else f"layers[{j}]",
                                child_name)
            self.layers.append(layer)
            shape = layer.out_shape
        self.out_shape = shape

    def children(self):
        return ((str(j), layer) for j, layer in enumerate(self.layers))

    def forward(self, bk, params, x, state):
        caches = []
        per_layer = split_all(params, len(self.layers))
        for j, layer in enumerate(self.layers):
            x, cache = run_forward(bk, layer, per_layer[j], x, state)
            caches.append(cache)
            if state.outputs is not None:
                state.outputs.append((layer.name, layer.type, x))
        return x, caches

    def backward(self, bk, params, dy, caches):
        grads = {}
        per_layer = split_all(params, len(self.layers))
        for j in reversed(range(len(self.layers))):
            dy, layer_grads = run_backward(bk, self.layers[j], per_layer[j], dy, caches[j])
            grads.update({f"{j}.{k}": g for k, g in layer_grads.items()})
        return dy, grads

    def kink_signature(self, caches):
        return tuple(sig for layer, cache in zip(self.layers, caches)
                     for sig in layer.kink_signature(cache))

    def layer_signatures(self, caches):
        """One tuple per layer (the verifier names the layer where a kink is crossed)."""
        return [layer.kink_signature(cache) for layer, cache in zip(self.layers, caches)]
