"""Weight regularization: penalties added to the loss, and the max-norm constraint.

    L1:  R = α·Σ|w|       ∂R/∂w = α·sign(w)   (sign(0) = 0, torch's sign: the subgradient 0 at
                                              the kink w = 0, which the verifier reports)
    L2:  R = (α/2)·Σw²    ∂R/∂w = α·w         (the α/2 convention, so that L2 with α is exactly
                                              SGD's coupled weight_decay = α)

Which parameters: by default the *weights* of dense and conv2d layers — not biases, not
normalization parameters, not PReLU slopes (the usual practice; torch applies weight_decay to
whatever it is given). In a model spec::

    "regularization": {"l1": 0.0, "l2": 1e-4, "params": "weights" | "all" | [names]}

The penalty is added to the reduced data loss, once (it is not divided by the batch size):
L = L_data + R, R = Σ over the selected names, in order, of α₁·Σ|w| then (α₂/2)·Σw². A
selection of no parameter (a model without dense/conv layers, or ``"params": []``) makes R a sum
of nothing: exactly 0 in every backend, whatever α (torch adds 0 too).

Decoupled weight decay (AdamW) and coupled weight decay (SGD/Adam ``weight_decay``) live in the
optimizers (:mod:`refnet.training.optim`). The max-norm constraint (Srivastava et al. 2014) is applied
after a step: each output unit's incoming weight vector w_o (a row of a dense weight, or the
(in, kh, kw) block of a conv filter) is rescaled to norm ≤ c: w_o ← w_o·min(1, c/‖w_o‖).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable

import numpy as np

from .numerics.backend import scalar_like

KEYS = {"l1", "l2", "params"}


def parse_regularization(config, weight_names, all_names, where="regularization"):
    """-> (l1, l2, selected names)."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected an object with l1/l2/params, got {config!r}")
    unknown = sorted(set(config) - KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected a subset of {sorted(KEYS)}")
    coefficients = []
    for key in ("l1", "l2"):
        value = config.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: {key} must be a finite number >= 0, got {value!r}")
        coefficients.append(float(value))
    selection = config.get("params", "weights")
    if selection == "weights":
        names = list(weight_names)
    elif selection == "all":
        names = list(all_names)
    elif isinstance(selection, list):
        odd = [n for n in selection if not isinstance(n, str)]
        if odd:
            raise ValueError(f"{where}: params must list parameter names (strings), got "
                             f"{odd[:3]!r}")
        missing = sorted(set(selection) - set(all_names))
        if missing:
            raise ValueError(f"{where}: params {missing} are not parameters of the model")
        repeated = sorted({n for n in selection if selection.count(n) > 1})
        if repeated:       # a repeated name would be penalized twice: a typo, not a weighting
            raise ValueError(f"{where}: params lists {repeated} more than once")
        names = list(selection)
    else:
        raise ValueError(f"{where}: params must be 'weights', 'all' or a list of names, "
                         f"got {selection!r}")
    return coefficients[0], coefficients[1], names


def penalty(bk, tensors: Dict[str, object], names: Iterable[str], l1: float, l2: float):
    """(R, {name: ∂R/∂w}) in backend ``bk``. With no term (no name, or α₁ = α₂ = 0) R is the
    backend's exact 0, so that ``loss + R`` is the loss unchanged."""
    total, grads = None, {}
    for name in names:
        w = tensors[name]
        terms = []
        grad = None
        if l1:
            s = bk.sum(bk.abs(w))                   # scalar_like: float32 stays float32
            terms.append(s * scalar_like(s, l1))    # under numpy 1.x too
            grad = bk.where(w > 0, l1, bk.where(w < 0, -l1, 0))
        if l2:
            s = bk.sum(w * w)
            terms.append(s * scalar_like(s, l2 / 2))        # l2/2 is exact in binary
            grad = w * l2 if grad is None else grad + w * l2
        for t in terms:
            total = t if total is None else total + t
        if grad is not None:
            grads[name] = grad
    if total is None:
        total = bk.zeros(())
    return total, grads


def l1_kink_signature(tensors, names, l1):
    """sign(w) for every L1-penalized weight: an FD step that changes it straddles |w|'s kink."""
    if not l1:
        return ()
    return tuple(np.asarray(tensors[n] > 0, dtype=bool) ^ np.asarray(tensors[n] < 0, dtype=bool)
                 for n in names) + tuple(np.asarray(tensors[n] > 0, dtype=bool) for n in names)


def max_norm_constraint(params: Dict[str, np.ndarray], names: Iterable[str], c: float):
    """Each output unit's incoming weights rescaled to norm at most c (float64)."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"max_norm constraint: c must be a positive finite number, got {c!r}")
    out = dict(params)
    for name in names:
        w = np.asarray(params[name], dtype=np.float64)
        rows = w.reshape(w.shape[0], -1)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            factor = np.where(norms > c, c / norms, 1.0)
        out[name] = (rows * factor).reshape(w.shape)
    return out
