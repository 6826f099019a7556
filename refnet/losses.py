"""Losses: torch's loss functions with their options, by torch's names; forward gives the loss,
backward its gradient w.r.t. the network output z.

Every loss is an elementwise (or per-sample) loss vector ℓ — torch's ``reduction="none"``
output — and a reduction of it:

=====================  =====================================================  ===============
type (torch)           ℓ (d = z − y)                                          options
=====================  =====================================================  ===============
mse (mse_loss)         d²                                                     (none)
l1 (l1_loss)           |d|; ∂ = sign(d), 0 at d = 0 (a kink)                  (none)
smooth_l1              0.5·d²/β for |d| < β, else |d| − 0.5·β (β = 0: l1)     ``beta`` (1.0)
huber (huber_loss)     0.5·d² for |d| < δ, else δ·(|d| − 0.5·δ)               ``delta`` (1.0)
bce_with_logits        w·[max(z, 0) − z·y + log1p(e) + (p − 1)·y·sp(−z)],      ``weight``,
                       e = exp(−|z|), sp(−z) = max(−z, 0) + log1p(e)           ``pos_weight``
softmax_cross_entropy  −Σ_k q_k·log softmax(z)_k over the class axis 1 of       ``weight``,
(cross_entropy)        (N, C, d…); q = (1 − ε)·w[y]·onehot(y) + (ε/C)·w for a   ``ignore_index``
                       label y, w·((1 − ε)·t + ε/C) for class probabilities t   (−100),
                                                                               ``label_smoothing``
nll (nll_loss)         −w[y]·z[y], z log-probabilities (N, C, d…)             ``weight``,
                                                                               ``ignore_index``
=====================  =====================================================  ===============

Reductions, torch's: ``"mean"`` divides Σℓ by the number of elements of ℓ — for class labels by
Σ w[y_n] over the labels that are not ``ignore_index`` (their count without a weight), as
torch's weighted mean does; ``"sum"`` is Σℓ; ``"none"`` is ℓ itself, and its gradient needs an
upstream vector u of ℓ's shape (torch's ``ℓ.backward(u)``). refnet then differentiates the
scalar Σ u·ℓ: that is the loss every backend, ``verify`` and the finite differences see
(``forward`` returns it; ``unreduced`` gives ℓ). u travels with the targets as a
:class:`Targets` (a data file's ``upstream``), ones by default.

The division of a mean is by the count (or the weight sum) itself, never a multiplication by a
rounded reciprocal. Targets are validated here: shapes, labels in range, finite values, and a
mean over no weight at all (every label ignored: torch returns nan) is an error.

Accuracy (spec/operations.md, Losses): cross-entropy's log-sum-exp takes log1p of the non-max
terms and p − 1 as expm1(log p), so logits of ±1e4 are exact and a loss of 1e-107 is 1e-107;
BCE's form is overflow-free and keeps a confident prediction's tiny loss (z = −40, y = 0 gives
4.25e-18; torch's (1 − y)·z − log_sigmoid(z) cancels to 0 there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .layers.activations import stable_sigmoid
from .numerics.backend import scalar_like
from .validate import finite_float64, require_number

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class Targets:
    """The targets of a loss with reduction ``"none"``: ``y`` and the upstream gradient
    ``upstream`` of the loss vector (its shape; ``None``: ones). The loss differentiated is then
    Σ upstream·ℓ, whose gradient is torch's ``ℓ.backward(upstream)``."""
    y: object
    upstream: Optional[np.ndarray] = None


def split_targets(y):
    """(y, upstream or None) of a target array or a :class:`Targets`."""
    return (y.y, y.upstream) if isinstance(y, Targets) else (y, None)


def _scalar_of(bk, value):
    """A float option (β, ε, …) as a 0-d array of ``bk``: arithmetic on it is the backend's
    own (exact in mp, rounded once in float64, bounded by the error-bound backend). Kept on the
    right of an array operand: arithmetic on a 0-d object array returns a bare scalar, and an
    mpmath interval scalar cannot multiply a numpy array from the left."""
    return bk.asarray(np.float64(value))


class Loss:
    """ℓ = ``elementwise`` (with its derivative ``d_elementwise``) and the reduction."""

    type = ""
    defaults: dict = {}              # the options, by torch's names, and their defaults

    def __init__(self, config: dict, out_shape, where: str = "loss"):
        self.where = f"{where} ({self.type})"
        allowed = ["reduction"] + sorted(self.defaults)
        unknown = sorted(set(config) - {"type"} - set(allowed))
        if unknown:
            expected = repr(allowed[0]) if len(allowed) == 1 else f"a subset of {allowed}"
            raise ValueError(f"{self.where}: unknown key(s) {unknown}; expected {expected}")
        self.reduction = config.get("reduction", "mean")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{self.where}: reduction must be one of {list(REDUCTIONS)}, "
                             f"got {self.reduction!r}")
        self.out_shape = tuple(out_shape)
        self.config = {**self.defaults, **{k: config[k] for k in self.defaults if k in config}}

    # shapes and targets -------------------------------------------------------------------
    def vector_shape(self, batch: int):
        """The shape of ℓ (torch's reduction="none" output) for a batch of ``batch``."""
        return (batch,) + self.out_shape

    def check_target(self, y, batch: int):
        """Validate targets for a batch of ``batch`` outputs: a numpy array, or for reduction
        "none" a :class:`Targets` with the upstream vector checked (ones if not given)."""
        y, upstream = split_targets(y)
        y = self._check_y(y, batch)
        if self.reduction != "none":
            if upstream is not None:
                raise ValueError(f"{self.where}: an upstream gradient is given, but reduction "
                                 f"{self.reduction!r} makes the loss a scalar (upstream applies "
                                 f"to reduction 'none' only)")
            if self.reduction == "mean":
                self._check_mean(y)
            return y
        shape = self.vector_shape(batch)
        if upstream is None:
            return Targets(y, np.ones(shape))
        u = np.asarray(upstream)
        if u.shape != shape:
            raise ValueError(f"{self.where}: upstream must have the loss vector's shape {shape} "
                             f"(reduction 'none'), got {u.shape}")
        return Targets(y, finite_float64(u, f"{self.where}: upstream"))

    def _check_y(self, y, batch):
        y = np.asarray(y)
        expected = (batch,) + self.out_shape
        if y.shape != expected:
            raise ValueError(f"{self.where}: targets y must have shape {expected}, got {y.shape}")
        return finite_float64(y, f"{self.where}: targets y")

    def _check_mean(self, y):
        """A mean over no weight at all is an error (only losses with ignore_index have one)."""

    def default_targets(self, rng, batch: int) -> np.ndarray:
        return rng.standard_normal((batch,) + self.out_shape)

    # the loss ---------------------------------------------------------------------------------
    def _mean_divisor(self, bk, y, z):
        """What the mean divides Σℓ by: the number of elements of ℓ."""
        return int(np.prod(self.vector_shape(z.shape[0])))

    def _spread(self, u):
        """The upstream vector u, shaped to multiply ∂ℓ/∂z (shape of z)."""
        return u

    def unreduced(self, bk, z, y):
        """ℓ, torch's reduction="none" output."""
        return self.elementwise(bk, z, split_targets(y)[0])[0]

    def forward(self, bk, z, y):
        """The loss (a scalar: Σ u·ℓ for reduction "none") and the cache for ``backward``."""
        y, u = split_targets(y)
        ell, inner = self.elementwise(bk, z, y)
        if self.reduction == "none":
            u = np.ones(ell.shape) if u is None else u           # targets not checked: ones
            return bk.sum(ell * bk.asarray(u)), (inner, u)
        total = bk.sum(ell)
        if self.reduction == "sum":
            return total, (inner, 1)
        divisor = self._mean_divisor(bk, y, z)
        # Divide by the count (not multiply by a rounded 1/count): exact in every backend's
        # sense. scalar_like: a float32 loss stays float32 under numpy 1.x too (its docstring).
        if isinstance(divisor, int):
            return total / scalar_like(total, divisor), (inner, divisor)
        return total / divisor, (inner, divisor)

    def backward(self, bk, cache):
        inner, scale = cache
        g = self.d_elementwise(bk, inner)
        if self.reduction == "none":
            return g * bk.asarray(self._spread(scale))
        return g / scale

    def group_losses(self, bk, z, y, groups: int):
        """The loss of each of ``groups`` batches stacked on axis 0 of ``z``, all with targets
        ``y`` (the finite-difference sweep's perturbed copies)."""
        y, u = split_targets(y)
        tile = lambda a: np.concatenate([np.asarray(a)] * groups, axis=0)   # noqa: E731
        ell, _ = self.elementwise(bk, z, tile(y))
        if self.reduction == "none":
            u = np.ones(self.vector_shape(np.shape(y)[0])) if u is None else u
            ell = ell * bk.asarray(tile(u))
        per_group = ell.reshape(groups, -1)
        divisor = (self._mean_divisor(bk, y, z[:z.shape[0] // groups])
                   if self.reduction == "mean" else 1)
        return bk.sum(per_group, axis=1) / divisor

    def kink_signature(self, cache) -> tuple:
        """Which piece of ℓ each element is on (empty for a smooth loss); see the layers'."""
        return ()

    def summary(self) -> str:
        """The reduction, as the verifier's report names it."""
        if self.reduction == "none":
            return "none: the loss is the sum of upstream · the loss vector"
        return self.reduction


# --- regression losses ------------------------------------------------------------------------

class MSE(Loss):
    """torch's mse_loss: ℓ = d², d = z − y; ∂ℓ/∂z = 2d."""
    type = "mse"

    def elementwise(self, bk, z, y):
        d = z - bk.asarray(y)
        return d * d, d

    def d_elementwise(self, bk, d):
        return 2 * d


def _sign(bk, d):
    """sign(d) with sign(0) = 0: torch's abs backward (the subgradient 0 at the kink)."""
    return bk.where(np.asarray(d > 0, dtype=bool), 1.0,
                    bk.where(np.asarray(d < 0, dtype=bool), -1.0, 0.0))


class L1(Loss):
    """torch's l1_loss: ℓ = |d|; ∂ℓ/∂z = sign(d), 0 at d = 0 (torch's, and a kink)."""
    type = "l1"

    def elementwise(self, bk, z, y):
        d = z - bk.asarray(y)
        return bk.abs(d), d

    def d_elementwise(self, bk, d):
        return _sign(bk, d)

    def kink_signature(self, cache):
        d = cache[0]
        return (np.asarray(d > 0, dtype=bool), np.asarray(d < 0, dtype=bool))


class SmoothL1(Loss):
    """torch's smooth_l1_loss: ℓ = 0.5·d²/β for |d| < β, else |d| − 0.5·β; ∂ℓ/∂z = d/β inside,
    sign(d) outside (torch: −1 for d ≤ −β, 1 for d ≥ β). β = 0 is l1 (torch's functional then
    calls l1_loss: sign(0) = 0). ℓ is C¹ at |d| = β, where ℓ″ jumps: reported as a kink, the
    outer piece owning the point (torch's forward takes it there), as hardtanh's limits."""
    type = "smooth_l1"
    defaults = {"beta": 1.0}

    def __init__(self, config, out_shape, where="loss"):
        super().__init__(config, out_shape, where)
        self.beta = float(require_number(self.where, "beta", self.config["beta"], low=0))

    def elementwise(self, bk, z, y):
        d = z - bk.asarray(y)
        a, beta = bk.abs(d), self.beta
        if beta == 0:
            return a, d
        inside = np.asarray(a < beta, dtype=bool)
        return bk.where(inside, 0.5 * a * a / beta, a - 0.5 * beta), d

    def d_elementwise(self, bk, d):
        beta = self.beta
        if beta == 0:
            return _sign(bk, d)
        return bk.where(np.asarray(d <= -beta, dtype=bool), -1.0,
                        bk.where(np.asarray(d >= beta, dtype=bool), 1.0, d / beta))

    def kink_signature(self, cache):
        d, beta = cache[0], self.beta
        return (np.asarray(d > -beta, dtype=bool), np.asarray(d < beta, dtype=bool))


class Huber(Loss):
    """torch's huber_loss: ℓ = 0.5·d² for |d| < δ, else δ·(|d| − 0.5·δ); ∂ℓ/∂z = d inside, ±δ
    outside. C¹ at |d| = δ (a kink of ℓ″, reported; the outer piece owns it). δ > 0 (torch)."""
    type = "huber"
    defaults = {"delta": 1.0}

    def __init__(self, config, out_shape, where="loss"):
        super().__init__(config, out_shape, where)
        self.delta = float(require_number(self.where, "delta", self.config["delta"]))
        if self.delta <= 0:
            raise ValueError(f"{self.where}: delta must be > 0 (torch: huber_loss does not "
                             f"support non-positive values for delta), got {self.delta!r}")

    def elementwise(self, bk, z, y):
        d = z - bk.asarray(y)
        a, delta = bk.abs(d), self.delta
        inside = np.asarray(a < delta, dtype=bool)
        return bk.where(inside, 0.5 * a * a, delta * (a - 0.5 * delta)), d

    def d_elementwise(self, bk, d):
        delta = self.delta
        return bk.where(np.asarray(d < -delta, dtype=bool), -delta,
                        bk.where(np.asarray(d > delta, dtype=bool), delta, d))

    def kink_signature(self, cache):
        d, delta = cache[0], self.delta
        return (np.asarray(d > -delta, dtype=bool), np.asarray(d < delta, dtype=bool))


# --- binary cross-entropy -----------------------------------------------------------------------

def _sample_weight(where, key, value, out_shape):
    """A BCE weight as a float64 array broadcasting against one sample's shape (torch multiplies
    the loss by it in place, so its shape must broadcast to the input's without growing it; a
    weight with a batch axis is data, not part of a model, and is not taken)."""
    if value is None:
        return None
    try:
        w = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        w = None
    if w is None or np.asarray(value).dtype == bool:
        raise ValueError(f"{where}: {key} must be a number or a nested list of numbers, got "
                         f"{value!r}")
    fits = w.ndim <= len(out_shape) and all(
        a in (1, b) for a, b in zip(w.shape[::-1], out_shape[::-1]))
    if not fits:
        raise ValueError(f"{where}: {key} of shape {w.shape} does not broadcast to one sample's "
                         f"shape {tuple(out_shape)} (torch's (C,), (C, 1, 1), ...; a per-sample "
                         f"weight with a batch axis is not part of a model)")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{where}: {key} must be finite, got {w.ravel()[:5].tolist()}")
    return w


class BCEWithLogits(Loss):
    """torch's binary_cross_entropy_with_logits, y ∈ [0, 1]:

    ℓ = w·[max(z, 0) − z·y + log1p(e) + (p − 1)·y·(max(−z, 0) + log1p(e))],  e = exp(−|z|)
    ∂ℓ/∂z = w·[(1 + (p − 1)·y)·σ(z) − p·y]  (torch's form; σ(z) − y without pos_weight)

    The last term is torch's (1 + (p − 1)y)·(−log σ(z)) less the unweighted one, −log σ(z) =
    max(−z, 0) + log1p(e) ≥ 0; it is formed only when ``pos_weight`` is given. ``weight`` w and
    ``pos_weight`` p broadcast against one sample (torch broadcasts pos_weight with the target,
    so a (C,) one weighs the last axis)."""
    type = "bce_with_logits"
    defaults = {"weight": None, "pos_weight": None}

    def __init__(self, config, out_shape, where="loss"):
        super().__init__(config, out_shape, where)
        self.weight = _sample_weight(self.where, "weight", self.config["weight"], self.out_shape)
        self.pos_weight = _sample_weight(self.where, "pos_weight", self.config["pos_weight"],
                                         self.out_shape)

    def _check_y(self, y, batch):
        y = super()._check_y(y, batch)
        if np.any((y < 0) | (y > 1)):
            raise ValueError(f"{self.where}: targets must lie in [0, 1], got "
                             f"{y[(y < 0) | (y > 1)][:5].tolist()}")
        return y

    def default_targets(self, rng, batch):
        return rng.integers(0, 2, size=(batch,) + self.out_shape).astype(np.float64)

    def elementwise(self, bk, z, y):
        y = bk.asarray(y)
        e = bk.exp(-bk.abs(z))
        ell = bk.maximum(z, 0) - z * y + bk.log1p(e)
        p = w = None
        if self.pos_weight is not None:
            p = bk.asarray(self.pos_weight)
            ell = ell + y * (p - 1) * (bk.maximum(-z, 0) + bk.log1p(e))
        if self.weight is not None:
            w = bk.asarray(self.weight)
            ell = ell * w
        return ell, (z, y, p, w)

    def d_elementwise(self, bk, cache):
        z, y, p, w = cache
        s, _ = stable_sigmoid(bk, z)
        g = s - y if p is None else (y * (p - 1) + 1) * s - y * p
        return g if w is None else g * w


# --- losses over a class axis ---------------------------------------------------------------------

@dataclass
class _ClassCache:
    """What backward needs of a loss over the class axis; rows are (N·Πd, C), class axis last."""
    shape: tuple                    # z's shape (N, C, d…)
    rows: object                    # log-probabilities: nll's input, cross-entropy's log softmax
    labels: Optional[np.ndarray]    # (M,) labels, ignored ones replaced by 0; None: probabilities
    kept: Optional[np.ndarray]      # (M,) bool: not ignore_index (None: all kept)
    q: object = None                # probabilities: the target weights w·t′ (M, C)

    @property
    def plain(self) -> bool:
        """Hard labels, none ignored (the caller knows whether there is a weight, ε)."""
        return self.labels is not None and self.kept is None


class _ClassLoss(Loss):
    """Losses over the class axis 1 of (N, C, d…) with class labels (N, d…): class ``weight``
    (C,) and ``ignore_index``, torch's."""

    defaults = {"weight": None, "ignore_index": -100}

    def __init__(self, config, out_shape, where="loss"):
        super().__init__(config, out_shape, where)
        self.classes = self.out_shape[0]
        self.weight = self._class_weight(self.config["weight"])
        self.ignore_index = int(require_number(self.where, "ignore_index",
                                               self.config["ignore_index"], integer=True))

    def _class_weight(self, value):
        if value is None:
            return None
        try:
            w = None if np.asarray(value).dtype == bool else np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            w = None
        if w is None or w.shape != (self.classes,) or not np.all(np.isfinite(w)):
            raise ValueError(f"{self.where}: weight must be a list of {self.classes} class "
                             f"weights (finite numbers, one per class), got {value!r}")
        return w

    def vector_shape(self, batch):
        return (batch,) + self.out_shape[1:]

    def _spread(self, u):
        return np.expand_dims(u, 1)          # (N, d…) → (N, 1, d…): the same for every class

    def default_targets(self, rng, batch):
        return rng.integers(0, self.classes, size=(batch,) + self.out_shape[1:])

    def _check_labels(self, y, batch, also=""):
        expected = self.vector_shape(batch)
        if y.shape != expected:
            raise ValueError(f"{self.where}: labels y must have shape {expected}{also}, got "
                             f"{y.shape}")
        if y.dtype.kind == "f":
            if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise TypeError(f"{self.where}: labels y must be integers, got floats such as "
                                f"{y[~np.isfinite(y) | (y != np.round(y))][:3]}")
        elif y.dtype.kind not in "iu":
            raise TypeError(f"{self.where}: labels y must be integers, got dtype {y.dtype}")
        bad = ((y < 0) | (y >= self.classes)) & (y != self.ignore_index)
        if np.any(bad):
            where = (np.flatnonzero(bad)[:5].tolist() if y.ndim == 1
                     else [tuple(int(i) for i in at) for at in np.argwhere(bad)[:5]])
            raise ValueError(f"{self.where}: labels must lie in [0, {self.classes - 1}], got "
                             f"{y[bad][:5].tolist()} at index {where} (a label equal to "
                             f"ignore_index, {self.ignore_index}, is ignored)")
        return y.astype(np.int64)

    def _check_y(self, y, batch):
        return self._check_labels(np.asarray(y), batch)

    def _labels(self, y):
        """(labels with ignored ones replaced by 0, kept mask or None if all kept)."""
        labels = np.asarray(y).reshape(-1)
        kept = labels != self.ignore_index
        if kept.all():
            return labels, None
        return np.where(kept, labels, 0), kept

    def _total_weight(self, y):
        """Σ w[y_n] over the kept labels, correctly rounded (math.fsum: 0 exactly when the
        exact sum is 0, whatever the signs of the weights), and their count."""
        labels, kept = self._labels(y)
        kept = np.ones(labels.shape, dtype=bool) if kept is None else kept
        if self.weight is None:
            return float(np.sum(kept)), int(np.sum(kept))
        return math.fsum(self.weight[labels[kept]].tolist()), int(np.sum(kept))

    def _check_mean(self, y):
        total, count = self._total_weight(y)
        if total == 0:
            why = (f"every label is ignore_index {self.ignore_index}" if count == 0 else
                   f"the class weights of the {count} labels not ignored sum to 0")
            raise ValueError(f"{self.where}: reduction 'mean' divides by the total weight of the "
                             f"labels, which is 0 here ({why}); torch returns nan. Use "
                             f"reduction 'sum' or 'none'")

    def _mean_divisor(self, bk, y, z):
        labels, kept = self._labels(y)
        if self.weight is not None:
            picked = self.weight[labels] if kept is None else self.weight[labels[kept]]
            return bk.sum(bk.asarray(picked))               # Σ w[y_n], in the backend
        return labels.size if kept is None else int(np.sum(kept))

    def _rows(self, a):
        """(N, C, d…) → (N·Πd, C), the class axis last; (N, C) as it is."""
        if len(a.shape) == 2:
            return a
        axes = (0,) + tuple(range(2, len(a.shape))) + (1,)
        return a.transpose(axes).reshape(-1, self.classes)

    def _unrows(self, g, shape):
        """The inverse of ``_rows``: (N·Πd, C) → (N, C, d…)."""
        if len(shape) == 2:
            return g
        ndim = len(shape)
        lead = (shape[0],) + tuple(shape[2:]) + (shape[1],)
        return g.reshape(lead).transpose((0, ndim - 1) + tuple(range(1, ndim - 1)))

    def _onehot(self, cache):
        onehot = np.zeros((cache.labels.size, self.classes), dtype=bool)
        onehot[np.arange(cache.labels.size), cache.labels] = True
        return onehot

    def _per_row(self, bk, cache, values):
        """ℓ of the rows (M,), zero where ignored, in the shape of the loss vector."""
        if cache.kept is not None:
            values = bk.where(cache.kept, values, 0.0)
        return values.reshape(self.vector_shape(cache.shape[0]))


class NLL(_ClassLoss):
    """torch's nll_loss on log-probabilities z (N, C, d…): ℓ = −w[y]·z[y] (0 where y is
    ignore_index); ∂ℓ/∂z = −w[y] on the label, 0 elsewhere (linear: no kinks)."""
    type = "nll"

    def elementwise(self, bk, z, y):
        labels, kept = self._labels(y)
        rows = self._rows(z)
        cache = _ClassCache(tuple(z.shape), rows, labels, kept)
        picked = -rows[np.arange(labels.size), labels]
        if self.weight is not None:
            picked = bk.asarray(self.weight[labels]) * picked
        return self._per_row(bk, cache, picked), cache

    def d_elementwise(self, bk, cache):
        g = np.where(self._onehot(cache), -1.0, 0.0)
        if self.weight is not None:
            g = g * self.weight[cache.labels][:, None]
        if cache.kept is not None:
            g = np.where(cache.kept[:, None], g, 0.0)
        return bk.asarray(self._unrows(g, cache.shape))      # data: exact in every backend


class SoftmaxCrossEntropy(_ClassLoss):
    """torch's cross_entropy: log softmax over the class axis, then −Σ_k q_k·log p_k per sample.

    Class labels y (N, d…): q = (1 − ε)·w[y]·onehot(y) + (ε/C)·w (w = 1 without a weight), as
    torch's ``(1 − ε)·nll_loss + (ε/C)·(−Σ_k w_k log p_k)``; ignored labels give ℓ = 0 and leave
    the mean's divisor Σ w[y_n]. Probabilities t (N, C, d…, float, z's shape): q = w·((1 − ε)t +
    ε/C), and the mean divides by N·Πd (torch: weights do not enter it); torch rejects an
    ignore_index >= 0 with them, and so does refnet.

    ∂ℓ/∂z = Q·p − q with Q = Σ_k q_k, formed as q·(p − 1) + (Q − q)·p with p − 1 = expm1(log p):
    for labels (1 − ε)·w[y]·(p − onehot) + (ε/C)·(Σw·p − w); a one-hot probability target gives
    its label's loss and gradient bit for bit."""
    type = "softmax_cross_entropy"
    defaults = {"weight": None, "ignore_index": -100, "label_smoothing": 0.0}

    def __init__(self, config, out_shape, where="loss"):
        super().__init__(config, out_shape, where)
        self.smoothing = float(require_number(self.where, "label_smoothing",
                                              self.config["label_smoothing"], low=0, high=1))

    def _share(self, eps):
        """ε/C: the smoothing mass each class gets (torch's; every class, the label's included)."""
        return eps / self.classes

    def _probabilities(self, y):
        y = np.asarray(y)
        return y.dtype.kind == "f" and y.ndim == 1 + len(self.out_shape)

    def _check_y(self, y, batch):
        y = np.asarray(y)
        soft = (batch,) + self.out_shape
        if y.shape != soft:
            return self._check_labels(y, batch, f" (or {soft} for class probabilities)")
        if y.dtype.kind != "f":
            raise TypeError(f"{self.where}: targets of the logits' shape {soft} are class "
                            f"probabilities and must be floats, got dtype {y.dtype}")
        if self.ignore_index >= 0:
            raise ValueError(f"{self.where}: ignore_index {self.ignore_index} applies to class "
                             f"labels only; these targets are class probabilities (torch: "
                             f"ignore_index is not supported for floating point target)")
        return finite_float64(y, f"{self.where}: class probabilities y")

    def _check_mean(self, y):
        if not self._probabilities(y):          # probabilities: the mean divides by N·Πd
            super()._check_mean(y)

    def _mean_divisor(self, bk, y, z):
        if self._probabilities(y):
            return int(np.prod(self.vector_shape(z.shape[0])))
        return super()._mean_divisor(bk, y, z)

    def elementwise(self, bk, z, y):
        logp = self._log_softmax(bk, self._rows(z))
        eps = self.smoothing
        if self._probabilities(y):
            q = bk.asarray(self._rows(np.asarray(y, dtype=np.float64)))
            if eps:
                e = _scalar_of(bk, eps)
                q = q * (1 - e) + self._share(e)
            if self.weight is not None:
                q = q * bk.asarray(self.weight)
            cache = _ClassCache(tuple(z.shape), logp, None, None, q)
            return self._per_row(bk, cache, -bk.sum(q * logp, axis=1)), cache
        labels, kept = self._labels(y)
        cache = _ClassCache(tuple(z.shape), logp, labels, kept)
        nll = -logp[np.arange(labels.size), labels]
        if self.weight is not None:
            nll = bk.asarray(self.weight[labels]) * nll
        if eps:
            e = _scalar_of(bk, eps)
            weighted = logp if self.weight is None else logp * bk.asarray(self.weight)
            nll = nll * (1 - e) - bk.sum(weighted, axis=1) * self._share(e)
        return self._per_row(bk, cache, nll), cache

    def _log_softmax(self, bk, z):
        # log softmax = (z − m) − log Σ exp(z − m), m the row max. The max's own term is exactly
        # 1, so the log is taken as log1p of the *other* terms: a confident prediction's loss of
        # 1e-107 comes out as 1e-107, not log(1 + 1e-107) = 0 (in every precision).
        shifted = z - bk.max(z, axis=1, keepdims=True)
        if getattr(bk, "exact_max", True):
            is_max = _first_argmax_mask(shifted)
            others = bk.sum(bk.where(is_max, 0, bk.exp(shifted)), axis=1, keepdims=True)
            logp = shifted - bk.log1p(others)
        else:
            # Interval arithmetic cannot subtract the row max exactly (the max term is then not
            # exactly 1): the plain log-sum-exp, an identity for any shift.
            logp = shifted - bk.log(bk.sum(bk.exp(shifted), axis=1, keepdims=True))
        return logp

    def d_elementwise(self, bk, cache):
        logp = cache.rows
        if cache.labels is None:                                   # probabilities
            q = cache.q
            total = bk.sum(q, axis=1, keepdims=True)
            g = q * bk.expm1(logp) + (total - q) * bk.exp(logp)
            return self._unrows(g, cache.shape)
        # softmax − onehot, with p_y − 1 = expm1(log p_y) on the label (no cancellation).
        g = bk.where(self._onehot(cache), bk.expm1(logp), bk.exp(logp))
        coefficient = None
        if self.weight is not None:
            coefficient = bk.asarray(self.weight[cache.labels][:, None])
        if self.smoothing:
            e = _scalar_of(bk, self.smoothing)
            coefficient = (1 - e) if coefficient is None else coefficient * (1 - e)
        if coefficient is not None:
            g = g * coefficient
        if self.smoothing:
            w_all = self.classes if self.weight is None else bk.sum(bk.asarray(self.weight))
            w_row = 1.0 if self.weight is None else bk.asarray(self.weight)
            g = g + (bk.exp(logp) * w_all - w_row) * self._share(e)
        if cache.kept is not None:
            g = bk.where(cache.kept[:, None], g, 0.0)
        return self._unrows(g, cache.shape)

    def is_plain(self, cache) -> bool:
        """Hard labels, none ignored, no weight, no smoothing, a reduction to a scalar: torch's
        plain composition (the fp16/bf16 emulation models its backward as measured)."""
        inner = cache[0]
        return (inner.plain and self.weight is None and not self.smoothing
                and self.reduction != "none")

    def logp_weights(self, cache) -> np.ndarray:
        """q of every row (M, C), float64: ℓ_n = −Σ_k q_nk·log p_nk, so −q times the reduction's
        scale is the gradient torch's nll_loss (or its probability-target sum) hands to
        log_softmax's backward (the fp16/bf16 emulation's model of that composition)."""
        inner = cache[0]
        if inner.labels is None:
            return np.asarray(inner.q, dtype=np.float64)
        q = self._onehot(inner).astype(np.float64)
        if self.weight is not None:
            q = q * self.weight[inner.labels][:, None]
        if self.smoothing:
            eps = self.smoothing
            q = (1 - eps) * q + self._share(eps) * (
                1.0 if self.weight is None else self.weight)
        if inner.kept is not None:
            q = np.where(inner.kept[:, None], q, 0.0)
        return q


def _first_argmax_mask(shifted) -> np.ndarray:
    """True at the first position of each row's maximum (where shifted == 0)."""
    is_zero = np.asarray(shifted == 0, dtype=bool)
    first = np.zeros_like(is_zero)
    first[np.arange(is_zero.shape[0]), np.argmax(is_zero, axis=1)] = True
    return first


LOSSES = {cls.type: cls for cls in (MSE, SoftmaxCrossEntropy, BCEWithLogits, L1, SmoothL1, Huber,
                                    NLL)}


def make_loss(config, out_shape) -> Loss:
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"loss: expected an object with 'type', got {config!r}")
    if config["type"] not in LOSSES:
        raise ValueError(f"loss: unknown type {config['type']!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[config["type"]](config, out_shape)
