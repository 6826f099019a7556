"""float64 central differences of every parameter and input element, batched.

``fd_sweep(model, params, x, y)`` returns (L(θ + h eᵢ) − L(θ − h eᵢ)) / 2h for every element
of every parameter and of x — the classic gradcheck's numerical gradient, the weak witness of
``refnet verify`` (it shares no code with the backward pass and cannot resolve tiny gradients).
Step: h = u^(1/3)·max(1, max|θ|) per tensor (u = 2⁻⁵³), the error-balancing step of a central
difference. The mode (train/eval) and dropout masks are the spec's, drawn once.

Batching. All 2P perturbed forward passes run as stacked batches, a chunk of copies each:
the layers below the perturbed one run once; the perturbed layer's output is its base output z
plus ±h times its response r to the one element — exact linear algebra where the output is
linear in that element — and the layers above run once on all copies, as a forward-only
batch of groups (``ForwardState.groups``): batchnorm takes its statistics per copy, max
pooling forms no argmax. The responses:

- parameters of dense and conv2d (weights and biases) and the γ and β of batchnorm, groupnorm
  and instancenorm2d (γ x̂ + β): the dense response to W[o, j] is column j of its input, written
  into output o; conv's is one row of its im2col matrix; a bias's and β's is 1, γ's is x̂;
- input elements, when the first layer is dense or conv2d (linear in its input): the response
  to x[n, …] is the layer's output, bias zeroed, for the one-hot sample e_… — W's column j
  (dense); W[o, c, i, j] at each output (o, oh, ow) whose window reads the position through
  offset (i, j) (conv) — exact, each output summing one product W·1 and zeros; it lands in
  sample n of its copy, the other samples keep z;
- input elements otherwise: x ± h eᵢ, the whole network run on the stacked copies.

Each chunk's copies are written straight into one preallocated stacked array: z broadcast,
then z ± h·r over the part of a copy r occupies (output o, channel c, or sample n).
Parameters of other layers (prelu, layernorm, anything inside a residual block) are
perturbed in their layer only: its own forward on its base input with θᵢ ± h, one copy at a
time (the layers below are not rerun: their output is the base pass's, bit for bit), the
copies then stacked for the layers above (``_own_copies``).
The stacked copies run the layers and the loss only: for an L1/L2-regularized tensor the
penalty's own central difference is added, element by element (``_penalty_difference``; the
penalty is a sum over elements, so only element i's terms differ). The results equal
one-at-a-time differences up to rounding: z + h·r is rounded once where the perturbed layer
would have rounded inside its GEMM, and the step taken is h itself where a one-at-a-time
difference takes fl(θᵢ + h) − θᵢ (the input x included, when its first layer is linear: no
longer x ± h eᵢ). tests/test_fdsweep.py holds every element of small models to that, within
a bound from the error analysis.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..layers.base import ForwardState
from ..layers.sequential import split_all
from ..model import Model
from ..numerics.backend import FLOAT64

U64 = 2.0 ** -53
# A stacked batch holds CHUNK copies, or fewer where they would take more than CHUNK_BYTES at
# the layer they start at (its input; at least one element's two copies): the layers above
# then work on arrays that stay in a core's cache (the small CNN's input sweep: 128 copies a
# batch, 1.1x faster than 256, measured); tiny copies (a small MLP's) run 256 at a time
# (2048 at a time: 1.2x slower, measured).
CHUNK = 256
CHUNK_BYTES = 1 << 20
LINEAR_IN_PARAMS = ("dense", "conv2d", "batchnorm")
# γ x̂ + β per channel, x̂ (N, C, ...) from the layer's ``normalized(cache)``: the same response.
LINEAR_IN_PARAMS += ("groupnorm", "instancenorm2d")
# First layers whose output is linear in their input: the input sweep starts above them.
LINEAR_IN_INPUT = ("dense", "conv2d")


def _step(base: np.ndarray) -> float:
    return U64 ** (1 / 3) * max(1.0, float(np.max(np.abs(base))) if base.size else 1.0)


class _Sweep:
    def __init__(self, model: Model, params, x, y, state: ForwardState):
        self.model, self.params, self.x, self.y = model, params, x, y
        self.train, self.masks = state.train, state.masks
        self.n = x.shape[0]
        self.per_layer = split_all(params, len(model.layers))   # each layer's tensors, once

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
            h, _ = self.model.layers[j].forward(FLOAT64, self.per_layer[j], h, state)
        return self._losses(h, groups)


def _copies(z: np.ndarray, k: int) -> np.ndarray:
    """2k copies of z, (2k, *z.shape), in one preallocated array: copy 2i is to hold z + h·rᵢ,
    copy 2i + 1 z − h·rᵢ (written again only over the part rᵢ occupies)."""
    stacked = np.empty((2 * k,) + z.shape)
    stacked[...] = z
    return stacked


def _add_response(stacked, select, base, step, r):
    """stacked[2i][select] = base + h·rᵢ, stacked[2i + 1][select] = base − h·rᵢ, for the k
    responses r (k, ...); ``select`` indexes a copy (a tuple whose first advanced index runs
    over the k elements), ``base`` is z at those places, (k, ...) as r."""
    k = r.shape[0]
    plus, minus = np.arange(0, 2 * k, 2), np.arange(1, 2 * k, 2)
    hr = step * r
    stacked[(plus,) + select] = base + hr
    stacked[(minus,) + select] = base - hr


def _param_copies(layer, name: str, index, h_in, cache, z, step):
    """The 2k copies of z ± h·(response to parameter element index[:, i]), (2k, N, *out), for a
    layer linear in its parameters; index is (ndim, k), one row per axis of the parameter."""
    k = index.shape[1]
    stacked = _copies(z, k)
    moved = lambda a, axis: np.moveaxis(a, axis, 0)                  # noqa: E731  (k first)
    if layer.type == "dense":                                        # on the last axis (N, *, ·)
        o = index[0]
        r = moved(h_in[..., index[1]], -1) if name == "weight" else np.ones((k,) + z.shape[:-1])
        _add_response(stacked, (Ellipsis, o), moved(z[..., o], -1), step, r)
    elif layer.type == "conv2d":
        o = index[0]
        if name == "weight":
            _, c, p, q = index
            g = o // (layer.out_channels // layer.groups)
            f = (c * layer.kernel[0] + p) * layer.kernel[1] + q      # row within the group
            cols = cache                                             # (N, G, C/G·K, L)
            r = moved(cols[:, g, f, :], 1).reshape((k, z.shape[0]) + z.shape[2:])
        else:
            r = np.ones((k, z.shape[0]) + z.shape[2:])
        _add_response(stacked, (slice(None), o), moved(z[:, o], 1), step, r)
    else:                                          # batchnorm, groupnorm, instancenorm2d: γ x̂ + β
        c = index[0]
        r = (moved(layer.normalized(cache)[:, c], 1) if name == "weight"
             else np.ones((k, z.shape[0]) + z.shape[2:]))
        _add_response(stacked, (slice(None), c), moved(z[:, c], 1), step, r)
    return stacked


def _input_copies(layer, params, index, z, step, state):
    """The 2k copies of layer-0 output z ± h·(response to x element index[:, i]), for a first
    layer linear in its input: the response is the layer (bias zeroed) on the one-hot sample."""
    k = index.shape[1]
    onehot = np.zeros((k,) + tuple(layer.in_shape))
    onehot[(np.arange(k),) + tuple(index[1:])] = 1.0
    params = {name: np.zeros_like(v) if name == "bias" else v for name, v in params.items()}
    r = layer.forward(FLOAT64, params, onehot, state)[0]            # (k, *out)
    stacked = _copies(z, k)
    _add_response(stacked, (index[0],), z[index[0]], step, r)
    return stacked


def _own_copies(layer, name: str, index, params, h_in, step, state):
    """The 2k copies of layer j's output with its tensor ``name``'s element index[:, i] at
    θᵢ + h (copy 2i) and θᵢ − h (copy 2i + 1), (2k, N, *out): the layer's own forward on its
    base input, one copy at a time — for a layer not linear in the tensor (prelu, layernorm,
    ...) or a container (a residual block's inner tensors). The element is set and restored
    in one working copy of the tensor (restoring assigns the saved value: exact)."""
    k = index.shape[1]
    tensor = params[name].copy()
    params = {**params, name: tensor}
    stacked = None
    for i in range(k):
        element = tuple(index[:, i])
        saved = tensor[element]
        for copy, sign in ((2 * i, 1), (2 * i + 1, -1)):
            tensor[element] = saved + sign * step
            out = layer.forward(FLOAT64, params, h_in, state)[0]
            if stacked is None:
                stacked = np.empty((2 * k,) + out.shape)
            stacked[copy] = out
        tensor[element] = saved
    return stacked


def _shifted_copies(x, index, step):
    """The 2k copies x ± h·e_i of the input, (2k, *x.shape): the whole network runs on them."""
    k = np.arange(index.shape[1])
    stacked = _copies(x, k.size)
    stacked[(2 * k,) + tuple(index)] += step
    stacked[(2 * k + 1,) + tuple(index)] -= step
    return stacked


def _chunks(shape, copy_shape):
    """The elements of an array of ``shape`` in row-major order, CHUNK/2 at a time, or fewer
    where their copies of ``copy_shape`` (float64) would exceed CHUNK_BYTES: (flat slice,
    index (ndim, k))."""
    size = int(np.prod(shape))
    per = max(1, min(CHUNK, CHUNK_BYTES // (8 * int(np.prod(copy_shape)))) // 2)
    for lo in range(0, size, per):
        flat = np.arange(lo, min(lo + per, size))
        yield slice(lo, lo + flat.size), np.array(np.unravel_index(flat, shape)).reshape(
            len(shape), flat.size)


def _penalty_difference(model: Model, value: np.ndarray, step: float) -> np.ndarray:
    """(R(θ + h eᵢ) − R(θ − h eᵢ)) / 2h of the L1/L2 penalty R = α₁Σ|w| + (α₂/2)Σw², every
    element i of a regularized tensor at once: the stacked copies above run the layers and
    the loss only, and R is a sum over elements, so only element i's terms differ —
    α₁(|θᵢ + h| − |θᵢ − h|) + 2α₂θᵢh (the kink of |·| straddled where |θᵢ| < h, as the
    one-at-a-time difference straddles it)."""
    diff = np.zeros(value.shape)
    if model.l1:
        diff += model.l1 * (np.abs(value + step) - np.abs(value - step))
    if model.l2:
        diff += 2 * model.l2 * value * step
    return diff / (2 * step)


def fd_sweep(model: Model, params=None, x=None, y=None,
             train=None) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """(FD gradient of every parameter by name, FD gradient of x); see the module docstring."""
    params, x, y = model.prepare(params, x, y)
    first = model.default_state(train)
    model.forward(FLOAT64, params, x, y, first)                      # draws dropout masks
    sweep = _Sweep(model, params, x, y, first)
    replay = ForwardState(train=first.train, rng=None, masks=first.masks)
    # the base pass, layer by layer: inputs, outputs and caches of the top-level layers
    inputs, outputs, caches, h = [], [], [], x
    for j, layer in enumerate(model.layers):
        inputs.append(h)
        h, cache = layer.forward(FLOAT64, sweep.per_layer[j], h, replay)
        outputs.append(h)
        caches.append(cache)

    def central(fd, step, start, copies):
        """fd's elements, a chunk at a time: (L(+) − L(−)) / 2h of the 2k copies that
        ``copies(index)`` stacks as layer start's input."""
        copy_shape = outputs[start - 1].shape if start else x.shape     # layer start's input
        for where, index in _chunks(fd.shape, copy_shape):
            losses = sweep.run_from(start, copies(index), 2 * index.shape[1])
            fd.reshape(-1)[where] = (losses[0::2] - losses[1::2]) / (2 * step)

    grads = {}
    for name, value in params.items():
        if name not in model.param_shapes():
            continue                                                   # buffers: no gradient
        j = int(name.split(".")[0])
        layer, local = model.layers[j], name[len(f"{j}."):]
        step = _step(value)
        fd = np.zeros(value.shape)
        z = outputs[j]
        if layer.type in LINEAR_IN_PARAMS and "." not in local:
            central(fd, step, j + 1, lambda index: _param_copies(
                layer, local, index, inputs[j], caches[j], z, step).reshape((-1,) + z.shape[1:]))
        else:
            central(fd, step, j + 1, lambda index: _own_copies(
                layer, local, index, sweep.per_layer[j], inputs[j], step, replay).reshape(
                    (-1,) + z.shape[1:]))
        if name in model.regularized:
            fd += _penalty_difference(model, value, step)
        grads[name] = fd
    step = _step(x)
    fd_x = np.zeros(x.shape)
    if model.layers[0].type in LINEAR_IN_INPUT:
        z, first_params = outputs[0], sweep.per_layer[0]
        central(fd_x, step, 1, lambda index: _input_copies(
            model.layers[0], first_params, index, z, step, replay).reshape((-1,) + z.shape[1:]))
    else:
        central(fd_x, step, 0, lambda index: _shifted_copies(x, index, step).reshape(
            (-1,) + x.shape[1:]))
    return grads, fd_x
