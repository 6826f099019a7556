"""float64 central differences of every parameter and input element, batched.

``fd_sweep(model, params, x, y)`` returns (L(θ + h eᵢ) − L(θ − h eᵢ)) / 2h for every element
of every parameter and of x — the classic gradcheck's numerical gradient, the weak witness of
``refnet verify`` (it shares no code with the backward pass and cannot resolve tiny gradients).
Step: h = u^(1/3)·max(1, max|θ|) per tensor (u = 2⁻⁵³), the error-balancing step of a central
difference. The mode (train/eval) and dropout masks are the spec's, drawn once.

Batching. All 2P perturbed forward passes run as one stacked batch per chunk: the layers below
the perturbed one run once; the perturbed layer's output is its base output plus ±h times its
response to the one parameter — exact linear algebra for dense and conv2d weights and biases
and batchnorm's, groupnorm's and instancenorm2d's γ and β, whose outputs are linear in them (the
dense response to W[o, j] is column j of its input, written into output o; conv's is one row of
its im2col matrix) — and
the layers above run once on all copies, batchnorm taking its statistics per copy
(``ForwardState.groups``). Perturbed inputs x ± h eᵢ run the whole network stacked the same
way. Parameters of other layers (prelu, layernorm, anything inside a residual block) are
perturbed one at a time. The results equal one-at-a-time differences up to rounding: z + h·r
is rounded once where the perturbed layer would have rounded inside its GEMM.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..layers.base import ForwardState
from ..layers.sequential import split
from ..model import Model
from ..numerics.backend import FLOAT64

U64 = 2.0 ** -53
CHUNK = 256                     # perturbed copies per stacked batch
LINEAR_IN_PARAMS = ("dense", "conv2d", "batchnorm")
# γ x̂ + β per channel with x̂ (N, C, ...) first in the cache, as batchnorm's: the same response.
LINEAR_IN_PARAMS += ("groupnorm", "instancenorm2d")


def _step(base: np.ndarray) -> float:
    return U64 ** (1 / 3) * max(1.0, float(np.max(np.abs(base))) if base.size else 1.0)


class _Sweep:
    def __init__(self, model: Model, params, x, y, state: ForwardState):
        self.model, self.params, self.x, self.y = model, params, x, y
        self.train, self.masks = state.train, state.masks
        self.n = x.shape[0]

    def _state(self, groups: int) -> ForwardState:
        masks = {k: np.concatenate([m] * groups, axis=0) if m.shape and m.shape[0] == self.n
                 else m for k, m in self.masks.items()}
        return ForwardState(train=self.train, rng=None, masks=masks, groups=groups)

    def _losses(self, out: np.ndarray, groups: int) -> np.ndarray:
        return np.asarray(self.model.loss.group_losses(FLOAT64, out, self.y, groups))

    def run_from(self, start: int, h_stacked: np.ndarray, groups: int) -> np.ndarray:
        """Layers start.. on a stacked batch; the loss of each group."""
        state = self._state(groups)
        h = h_stacked
        for j in range(start, len(self.model.layers)):
            h, _ = self.model.layers[j].forward(FLOAT64, split(self.params, j), h, state)
        return self._losses(h, groups)


def _response(layer, name: str, index, h_in, cache, out_shape):
    """∂(layer output)/∂(param element) for a layer linear in its parameters, (N, *out)."""
    n = h_in.shape[0]
    r = np.zeros((n,) + tuple(out_shape))
    if layer.type == "dense":                                        # on the last axis (N, *, ·)
        if name == "weight":
            o, j = index
            r[..., o] = h_in[..., j]
        else:
            r[..., index[0]] = 1.0
    elif layer.type == "conv2d":
        if name == "weight":
            o, c, p, q = index
            g_size = layer.out_channels // layer.groups
            g = o // g_size
            f = (c * layer.kernel[0] + p) * layer.kernel[1] + q      # row within the group
            cols = cache                                             # (N, G, C/G·K, L)
            r[:, o] = cols[:, g, f, :].reshape((n,) + tuple(out_shape[1:]))
        else:
            r[:, index[0]] = 1.0
    else:                                          # batchnorm, groupnorm, instancenorm2d: γ x̂ + β
        c = index[0]
        if name == "weight":
            xhat = cache[0]
            r[:, c] = xhat[:, c]
        else:
            r[:, c] = 1.0
    return r


def fd_sweep(model: Model, params=None, x=None, y=None,
             train=None) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """(FD gradient of every parameter by name, FD gradient of x); see the module docstring."""
    params, x, y = model.prepare(params, x, y)
    first = model.default_state(train)
    model.forward(FLOAT64, params, x, y, first)                      # draws dropout masks
    sweep = _Sweep(model, params, x, y, first)
    replay = ForwardState(train=first.train, rng=None, masks=first.masks)
    # the base pass, layer by layer: inputs and caches of the top-level layers
    inputs, caches, h = [], [], x
    for j, layer in enumerate(model.layers):
        inputs.append(h)
        h, cache = layer.forward(FLOAT64, split(params, j), h, replay)
        caches.append(cache)
    grads = {}
    for name, value in params.items():
        if name not in model.param_shapes():
            continue                                                   # buffers: no gradient
        j = int(name.split(".")[0])
        layer, local = model.layers[j], name[len(f"{j}."):]
        step = _step(value)
        fd = np.zeros(value.shape)
        elements = list(np.ndindex(value.shape))
        if layer.type in LINEAR_IN_PARAMS and "." not in local:
            z = layer.forward(FLOAT64, split(params, j), inputs[j], replay)[0]
            cache = caches[j]
            for lo in range(0, len(elements), CHUNK // 2):
                chunk = elements[lo:lo + CHUNK // 2]
                stacked = []
                for index in chunk:
                    r = _response(layer, local, index, inputs[j], cache, layer.out_shape)
                    stacked += [z + step * r, z - step * r]
                losses = sweep.run_from(j + 1, np.concatenate(stacked, axis=0), 2 * len(chunk))
                for k, index in enumerate(chunk):
                    fd[index] = (losses[2 * k] - losses[2 * k + 1]) / (2 * step)
        else:
            for index in elements:
                plus, minus = dict(params), dict(params)
                plus[name], minus[name] = value.copy(), value.copy()
                plus[name][index] += step
                minus[name][index] -= step
                lp = model.forward(FLOAT64, plus, x, y, ForwardState(
                    train=first.train, masks=first.masks)).loss
                lm = model.forward(FLOAT64, minus, x, y, ForwardState(
                    train=first.train, masks=first.masks)).loss
                fd[index] = (float(lp) - float(lm)) / (2 * step)
        grads[name] = fd
    step = _step(x)
    fd_x = np.zeros(x.shape)
    elements = list(np.ndindex(x.shape))
    for lo in range(0, len(elements), CHUNK // 2):
        chunk = elements[lo:lo + CHUNK // 2]
        stacked = []
        for index in chunk:
            for sign in (1.0, -1.0):
                xp = x.copy()
                xp[index] += sign * step
                stacked.append(xp)
        losses = sweep.run_from(0, np.concatenate(stacked, axis=0), 2 * len(chunk))
        for k, index in enumerate(chunk):
            fd_x[index] = (losses[2 * k] - losses[2 * k + 1]) / (2 * step)
    return grads, fd_x
