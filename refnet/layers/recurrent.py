"""Recurrent layers as torch's ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` (``batch_first=True``),
with backpropagation through time written out step by step.

    x: (N, T, F)   "output": "sequence" -> y (N, T, H), the top layer's h_t for every t
                              (torch's ``output``); "last" -> y (N, H), the top layer's h_{T−1}
    layer k (0 ≤ k < num_layers) reads the sequence below it (x for k = 0), starts from
    h_{−1} = 0 (and c_{−1} = 0), and has, G gates stacked on the rows (G = 1, 4, 3):
        weight_ih_l<k> (G·H, F or H)   weight_hh_l<k> (G·H, H)   bias_ih_l<k>, bias_hh_l<k> (G·H)

Forward, per step t = 0 … T−1 (u_t = W_ih x_t + b_ih for every t at once, one GEMM; then per
step the recurrent term W_hh h_{t−1} + b_hh; σ the logistic sigmoid, ⊙ elementwise)::

    rnn    a_t = u_t + W_hh h_{t−1} + b_hh                    h_t = f(a_t),  f = tanh | relu
    lstm   z_t = u_t + W_hh h_{t−1} + b_hh = [z_i; z_f; z_g; z_o]         (torch's gate order)
           i = σ(z_i), f = σ(z_f), g = tanh(z_g), o = σ(z_o)
           c_t = f ⊙ c_{t−1} + i ⊙ g                          h_t = o ⊙ tanh(c_t)
    gru    v_t = W_hh h_{t−1} + b_hh = [v_r; v_z; v_n],  u_t = [u_r; u_z; u_n]
           r = σ(u_r + v_r), z = σ(u_z + v_z), n = tanh(u_n + r ⊙ v_n)   (torch's n: r gates
           the recurrent term *with* its bias b_hn)               h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}

Backward through time, per layer, t = T−1 … 0. δh_t = ∂L/∂h_t is the gradient arriving from
above (the layer's output gradient at t; for "last" only at t = T−1) plus the gradient from step
t + 1 through the recurrence; δh_T = 0 (and δc_T = 0)::

    rnn    δa_t = δh_t ⊙ f′(a_t)
           δh_{t−1} += W_hhᵀ δa_t                   per-step Jacobian ∂h_t/∂h_{t−1} = diag(f′(a_t)) W_hh
    lstm   δc_t  = δc_t(from t + 1) + δh_t ⊙ o ⊙ tanh′(c_t)        the total ∂L/∂c_t
           δo = δh_t ⊙ tanh(c_t),  δi = δc_t ⊙ g,  δg = δc_t ⊙ i,  δf = δc_t ⊙ c_{t−1}
           δz = [δi ⊙ σ′(z_i); δf ⊙ σ′(z_f); δg ⊙ tanh′(z_g); δo ⊙ σ′(z_o)]
           δc_{t−1}(from t) = δc_t ⊙ f              the cell path: ∂c_t/∂c_{t−1} = diag(f) along
                                                     it, so ∂c_T/∂c_t = Π_{k=t+1..T} diag(f_k):
                                                     a product of gates, never of W_hh
           δh_{t−1} += W_hhᵀ δz
    gru    δn = δh_t ⊙ (1 − z),  δζ = δh_t ⊙ (h_{t−1} − n) (ζ: the gate z),  δh_{t−1} += δh_t ⊙ z
           δa_n = δn ⊙ tanh′(u_n + r ⊙ v_n),  δr = δa_n ⊙ v_n
           δu = [δr ⊙ σ′(u_r + v_r); δζ ⊙ σ′(u_z + v_z); δa_n]   (the input side, ∂L/∂u_t)
           δv = [δr ⊙ σ′(u_r + v_r); δζ ⊙ σ′(u_z + v_z); δa_n ⊙ r]   (the recurrent side)
           δh_{t−1} += W_hhᵀ δv
    then, over every step at once (rows n, t):
           ∂L/∂W_ih = Σ_{n,t} δu_t x_tᵀ    ∂L/∂b_ih = Σ δu_t    ∂L/∂x_t = W_ihᵀ δu_t
           ∂L/∂W_hh = Σ_{n,t} δv_t h_{t−1}ᵀ  ∂L/∂b_hh = Σ δv_t
    (rnn, lstm: δu = δv = δa or δz.) ∂L/∂x_t is layer k−1's output gradient at t.

σ′(z) = e/(1 + e)² with e = exp(−|z|), tanh′(z) = 4E/(1 + E)² with E = e²: the sigmoid and tanh
layers' own forms (``activations.py``), accurate where the gate saturates. relu′(a) = 0 at
a = 0 (torch's); the relu RNN's kink signature is a_t > 0 for every step and layer.

Config (torch's names)::

    {"type": "rnn" | "lstm" | "gru", "hidden_size": H, "num_layers": 1, "bias": true,
     "output": "sequence" | "last",
     "nonlinearity": "tanh" | "relu",                          (rnn only)
     "init": "torch_default" | name | {"name": ..., options},  (weight_ih and weight_hh)
     "init_hh": null | an init,                                (weight_hh, if not as "init")
     "bias_init": "torch_default" | an init,                   (bias_ih and bias_hh)
     "forget_bias": null | a number}                           (lstm only)

``torch_default`` is torch's ``RNNBase.reset_parameters``: every tensor U(−1/√H, 1/√H). A named
init is applied to each whole tensor as ``torch.nn.init`` would be (fans from (G·H, in): all
gates together). ``forget_bias`` sets the forget gate's slice [H, 2H) of every ``bias_ih_l<k>``
to the value and of every ``bias_hh_l<k>`` to 0 (so the forget gate's effective bias is the
value; Jozefowicz et al. 2015 use 1), after the draw, so no other tensor changes.

Stacking the per-step values into (N, T, ·) and the gates into (·, G·H) is selection only
(``take`` and ``bk.where``, :func:`concat`): exact in every backend, no arithmetic.

Each per-step state (h_t, c_t) and each per-step gradient (∂L/∂h_t, ∂L/∂c_t, the gate
gradients) passes :func:`at_step`: nothing happens unless the backend asks to see it
(``store_step``): the fp16/bf16 emulation rounds it to its kernel's format there (fp16 under
autocast), as cuDNN stores it between steps (spec/precision.md), and a recording backend keeps it for per-step
accounting (``refnet.lowp.steps``).
"""

from __future__ import annotations

import math

import numpy as np

from ..init import initialize, parse_init
from .activations import ReLU, Sigmoid, Tanh
from .base import Layer, require_number

OUTPUTS = ("sequence", "last")
NONLINEARITIES = ("tanh", "relu")

# The activation layers whose f and f′ the cells use (one implementation of each form).
_SIGMOID = Sigmoid({}, (1,), "sigmoid")
_TANH = Tanh({}, (1,), "tanh")
_RELU = ReLU({}, (1,), "relu")


def concat(bk, parts, axis):
    """The arrays of ``parts`` joined along ``axis`` (every other axis equal), by selection:
    each merge takes from both halves with ``take`` (indices clamped into range) and picks with
    ``bk.where``, so it is exact in every backend. Merged pairwise: about log₂(len) passes."""
    parts = list(parts)
    while len(parts) > 1:
        merged = [_join(bk, parts[i], parts[i + 1], axis) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return parts[0]


def _join(bk, a, b, axis):
    ndim = len(a.shape)
    axis %= ndim
    na, nb = a.shape[axis], b.shape[axis]
    j = np.arange(na + nb)
    first = (j < na).reshape([-1 if d == axis else 1 for d in range(ndim)])
    return bk.where(first, a.take(np.minimum(j, na - 1), axis=axis),
                    b.take(np.maximum(j - na, 0), axis=axis))


def stack_steps(bk, steps):
    """[(N, D)] × T -> (N, T, D)."""
    return concat(bk, [s.reshape(s.shape[0], 1, s.shape[1]) for s in steps], axis=1)


def at_step(bk, a, kind, layer, t):
    """A per-step value ``a`` at the step boundary: what the backend's ``store_step`` makes of
    it (the fp16/bf16 emulation: the stored value), or ``a`` itself. ``kind``: "h", "c" (the
    state after step t), "dh", "dc" (the total ∂L/∂h_t, ∂L/∂c_t), "dz" (the gate gradients on
    the input side, ∂L/∂u_t), "dz_hh" (GRU's on the recurrent side, ∂L/∂v_t); ``layer``: k."""
    hook = getattr(bk, "store_step", None)
    return a if hook is None else hook(a, kind, layer, t)


class _Recurrent(Layer):
    """What rnn, lstm and gru share: config, shapes, parameters, the loop over layers and
    steps, and the parameter gradients from the per-step gate gradients."""

    gates = 1
    # torch.autocast casts the input, weights and initial state of cuDNN's RNN to fp16
    # (AutocastRNN.cpp) and cuDNN computes in float32 (promote_rnn_math_type): a lowp kernel.
    autocast = "lowp"
    autocast_format = "fp16"      # AutocastRNN.cpp casts to at::kHalf whatever autocast's dtype
    stores_steps = True           # the emulation runs it as a kernel that stores every step
    defaults = {"hidden_size": None, "num_layers": 1, "bias": True, "output": "sequence",
                "init": "torch_default", "init_hh": None, "bias_init": "torch_default"}

    def __init__(self, config, in_shape, where):
        if "hidden_size" not in config:
            raise ValueError(f"{where}: {self.type} needs 'hidden_size' (the number of features "
                             f"of h)")
        super().__init__(config, in_shape, where)

    def output_shape(self, in_shape):
        """(T, H) or (H,); the config is checked here, before anything is built from it."""
        where, c = self.where, self.config
        if len(in_shape) != 2:
            raise ValueError(f"{where}: {self.type} expects input of shape (N, T, features) "
                             f"(batch first), got a sample shape of {tuple(in_shape)}")
        self.hidden = int(require_number(where, "hidden_size", c["hidden_size"], low=1,
                                         integer=True))
        self.num_layers = int(require_number(where, "num_layers", c["num_layers"], low=1,
                                             integer=True))
        if not isinstance(c["bias"], bool):
            raise ValueError(f"{where}: bias must be true or false, got {c['bias']!r}")
        if c["output"] not in OUTPUTS:
            raise ValueError(f"{where}: output must be 'sequence' or 'last', got {c['output']!r}")
        parse_init(c["init"], f"{where} init")
        if c["init_hh"] is not None:
            parse_init(c["init_hh"], f"{where} init_hh")
        parse_init(c["bias_init"], f"{where} bias_init")
        steps = in_shape[0]
        return (steps, self.hidden) if c["output"] == "sequence" else (self.hidden,)

    # parameters ----------------------------------------------------------------------------
    def _names(self, k):
        return (f"weight_ih_l{k}", f"weight_hh_l{k}") + (
            (f"bias_ih_l{k}", f"bias_hh_l{k}") if self.config["bias"] else ())

    def param_shapes(self):
        gh, h = self.gates * self.hidden, self.hidden
        shapes = {}
        for k in range(self.num_layers):
            shapes[f"weight_ih_l{k}"] = (gh, self.in_shape[1] if k == 0 else h)
            shapes[f"weight_hh_l{k}"] = (gh, h)
            if self.config["bias"]:
                shapes[f"bias_ih_l{k}"] = (gh,)
                shapes[f"bias_hh_l{k}"] = (gh,)
        return shapes

    def weight_names(self):
        return [n for k in range(self.num_layers) for n in self._names(k)[:2]]

    def init_params(self, rng):
        """In torch's parameter order (weight_ih, weight_hh, bias_ih, bias_hh per layer), each
        from its init; torch_default: U(−1/√H, 1/√H), as ``RNNBase.reset_parameters``."""
        c, shapes = self.config, self.param_shapes()
        bound = 1.0 / math.sqrt(self.hidden)
        params = {}
        for k in range(self.num_layers):
            names = self._names(k)
            inits = [c["init"], c["init"] if c["init_hh"] is None else c["init_hh"]]
            inits += [c["bias_init"]] * (len(names) - 2)
            keys = ["init", "init" if c["init_hh"] is None else "init_hh"] + ["bias_init"] * 2
            for name, spec, key in zip(names, inits, keys):
                if parse_init(spec, f"{self.where} {key}")[0] == "torch_default":
                    params[name] = rng.uniform(-bound, bound, shapes[name])
                else:
                    params[name] = initialize(spec, shapes[name], rng, f"{self.where} {key}",
                                              weight_shape=shapes[f"weight_hh_l{k}"])
        return params

    # forward and backward ------------------------------------------------------------------
    def _layer(self, params, k):
        """(W_ih, W_hh, b_ih, b_hh) of layer k (the biases None without bias)."""
        names = self._names(k)
        w_ih, w_hh = params[names[0]], params[names[1]]
        if not self.config["bias"]:
            return w_ih, w_hh, None, None
        return w_ih, w_hh, params[names[2]], params[names[3]]

    def forward(self, bk, params, x, state=None):
        """x (N, T, F) -> y (N, T, H) or (N, H); the cache holds every layer's steps."""
        n, steps = x.shape[0], x.shape[1]
        seq, caches = x, []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._layer(params, k)
            u = bk.matmul(seq, w_ih.T)                         # (N, T, G·H): every step's W_ih x_t
            if b_ih is not None:
                u = u + b_ih
            carry = self.initial_state(bk, n)
            saved, outputs = [], []
            for t in range(steps):
                carry, keep = self.cell(bk, u[:, t], carry, w_hh, b_hh, k, t)
                saved.append(keep)
                outputs.append(carry[0])
            out = stack_steps(bk, outputs)                      # (N, T, H): h_0 … h_{T−1}
            caches.append((seq, out, saved))
            seq = out
        y = seq if self.config["output"] == "sequence" else seq[:, steps - 1]
        return y, caches

    def initial_state(self, bk, n):
        """(h_{−1},): zeros, as torch without hx."""
        return (bk.zeros((n, self.hidden)),)

    def backward(self, bk, params, dy, caches):
        steps = caches[0][0].shape[1]
        grads = {}
        upstream = dy                          # (N, T, H), or (N, H): the last step's only
        for k in reversed(range(self.num_layers)):
            w_ih, w_hh, b_ih, b_hh = self._layer(params, k)
            seq, out, saved = caches[k]
            n = seq.shape[0]
            last_only = k == self.num_layers - 1 and self.config["output"] == "last"
            d_carry = self.initial_state(bk, n)               # δh_T = 0 (δc_T = 0)
            du, dv = [None] * steps, [None] * steps
            for t in reversed(range(steps)):
                if last_only:
                    up = upstream if t == steps - 1 else None
                else:
                    up = upstream[:, t]
                dh = d_carry[0] if up is None else d_carry[0] + up
                dh = at_step(bk, dh, "dh", k, t)
                d_carry, du[t], dv[t] = self.cell_backward(bk, (dh,) + d_carry[1:], saved[t],
                                                           w_hh, k, t)
            du, dv = stack_steps(bk, du), stack_steps(bk, dv)  # (N, T, G·H)
            gh = du.shape[-1]
            rows_du, rows_dv = du.reshape(-1, gh), dv.reshape(-1, gh)
            names = self._names(k)
            grads[names[0]] = bk.matmul(rows_du.T, seq.reshape(-1, seq.shape[-1]))
            grads[names[1]] = bk.matmul(rows_dv.T, _previous(bk, out).reshape(-1, self.hidden))
            if b_ih is not None:
                grads[names[2]] = bk.sum(rows_du, axis=0)
                grads[names[3]] = bk.sum(rows_dv, axis=0)
            upstream = bk.matmul(du, w_ih)                   # ∂L/∂x_t: layer k−1's δ output
        return upstream, {name: grads[name] for name in self.param_shapes()}

    def _recurrent(self, bk, h, w_hh, b_hh):
        """W_hh h_{t−1} + b_hh: (N, G·H)."""
        v = bk.matmul(h, w_hh.T)
        return v if b_hh is None else v + b_hh


def _previous(bk, out):
    """(N, T, H) of h_{t−1}: h_{−1} = 0, then h_0 … h_{T−2} (selection: exact)."""
    steps = out.shape[1]
    t = np.arange(steps)
    shifted = out.take(np.maximum(t - 1, 0), axis=1)
    return bk.where((t > 0).reshape(1, -1, 1), shifted, 0)


def _gates(z, hidden, count):
    return [z[:, g * hidden:(g + 1) * hidden] for g in range(count)]


class RNN(_Recurrent):
    """``nn.RNN``: h_t = f(W_ih x_t + b_ih + W_hh h_{t−1} + b_hh), f = tanh or relu."""

    type = "rnn"
    gates = 1
    defaults = {**_Recurrent.defaults, "nonlinearity": "tanh"}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        if self.config["nonlinearity"] not in NONLINEARITIES:
            raise ValueError(f"{where}: nonlinearity must be 'tanh' or 'relu', got "
                             f"{self.config['nonlinearity']!r}")
        self.activation = _TANH if self.config["nonlinearity"] == "tanh" else _RELU

    def cell(self, bk, u, carry, w_hh, b_hh, k, t):
        (h,) = carry
        a = u + self._recurrent(bk, h, w_hh, b_hh)
        h_new, _ = self.activation.f(bk, a)
        return (at_step(bk, h_new, "h", k, t),), a

    def cell_backward(self, bk, d_carry, a, w_hh, k, t):
        (dh,) = d_carry
        if self.activation is _RELU:            # relu's own backward: 0 at a = 0, as torch
            da, _ = _RELU.backward(bk, None, dh, (a, None))
        else:
            da = dh * self.activation.df(bk, a, None)
        da = at_step(bk, da, "dz", k, t)
        return (bk.matmul(da, w_hh),), da, da

    def kink_signature(self, caches):
        """relu: a_t > 0 for every layer and step (tanh has no kink)."""
        if self.activation is not _RELU:
            return ()
        return tuple(np.asarray(a > 0, dtype=bool) for _, _, saved in caches for a in saved)


class LSTM(_Recurrent):
    """``nn.LSTM``: gates i, f, g, o; c_t = f ⊙ c_{t−1} + i ⊙ g, h_t = o ⊙ tanh(c_t)."""

    type = "lstm"
    gates = 4
    defaults = {**_Recurrent.defaults, "forget_bias": None}

    def __init__(self, config, in_shape, where):
        super().__init__(config, in_shape, where)
        fb = self.config["forget_bias"]
        if fb is not None:
            require_number(where, "forget_bias", fb)
            if not self.config["bias"]:
                raise ValueError(f"{where}: forget_bias needs bias true (it sets the forget "
                                 f"gate's bias)")

    def init_params(self, rng):
        params = super().init_params(rng)
        fb, h = self.config["forget_bias"], self.hidden
        if fb is not None:
            for k in range(self.num_layers):
                params[f"bias_ih_l{k}"][h:2 * h] = float(fb)
                params[f"bias_hh_l{k}"][h:2 * h] = 0.0
        return params

    def initial_state(self, bk, n):
        """(h_{−1}, c_{−1}): zeros, as torch without (h_0, c_0)."""
        return (bk.zeros((n, self.hidden)), bk.zeros((n, self.hidden)))

    def cell(self, bk, u, carry, w_hh, b_hh, k, t):
        h, c = carry
        z = u + self._recurrent(bk, h, w_hh, b_hh)
        zi, zf, zg, zo = _gates(z, self.hidden, 4)
        (i, ei), (f, ef), (o, eo) = (_SIGMOID.f(bk, zi), _SIGMOID.f(bk, zf), _SIGMOID.f(bk, zo))
        g = bk.tanh(zg)
        c_new = at_step(bk, f * c + i * g, "c", k, t)
        tanh_c = bk.tanh(c_new)
        h_new = at_step(bk, o * tanh_c, "h", k, t)
        return (h_new, c_new), (zi, zf, zg, zo, ei, ef, eo, i, f, g, o, c, c_new, tanh_c)

    def cell_backward(self, bk, d_carry, keep, w_hh, k, t):
        dh, dc_next = d_carry
        zi, zf, zg, zo, ei, ef, eo, i, f, g, o, c_prev, c, tanh_c = keep
        dc = at_step(bk, dc_next + dh * o * _TANH.df(bk, c, None), "dc", k, t)
        do = dh * tanh_c
        dz = concat(bk, [(dc * g) * _SIGMOID.df(bk, zi, ei), (dc * c_prev) * _SIGMOID.df(bk, zf, ef),
                         (dc * i) * _TANH.df(bk, zg, None), do * _SIGMOID.df(bk, zo, eo)], axis=1)
        dz = at_step(bk, dz, "dz", k, t)
        return (bk.matmul(dz, w_hh), dc * f), dz, dz


class GRU(_Recurrent):
    """``nn.GRU``: gates r, z, n; n = tanh(u_n + r ⊙ (W_hn h + b_hn)), h_t = (1 − z) ⊙ n + z ⊙ h."""

    type = "gru"
    gates = 3

    def cell(self, bk, u, carry, w_hh, b_hh, k, t):
        (h,) = carry
        v = self._recurrent(bk, h, w_hh, b_hh)
        ur, uz, un = _gates(u, self.hidden, 3)
        vr, vz, vn = _gates(v, self.hidden, 3)
        ar, az = ur + vr, uz + vz
        (r, er), (z, ez) = _SIGMOID.f(bk, ar), _SIGMOID.f(bk, az)
        an = un + r * vn
        n = bk.tanh(an)
        h_new = at_step(bk, (1 - z) * n + z * h, "h", k, t)
        return (h_new,), (ar, az, an, er, ez, r, z, n, vn, h)

    def cell_backward(self, bk, d_carry, keep, w_hh, k, t):
        (dh,) = d_carry
        ar, az, an, er, ez, r, z, n, vn, h_prev = keep
        dan = (dh * (1 - z)) * _TANH.df(bk, an, None)
        dar = (dan * vn) * _SIGMOID.df(bk, ar, er)
        daz = (dh * (h_prev - n)) * _SIGMOID.df(bk, az, ez)
        du = at_step(bk, concat(bk, [dar, daz, dan], axis=1), "dz", k, t)
        dv = at_step(bk, concat(bk, [dar, daz, dan * r], axis=1), "dz_hh", k, t)
        return (dh * z + bk.matmul(dv, w_hh),), du, dv


RECURRENT = {cls.type: cls for cls in (RNN, LSTM, GRU)}
