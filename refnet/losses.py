"""Losses: forward gives a scalar, backward the gradient w.r.t. the network output (dL = 1).

==========================  ==============================================  =====================
type                        L (reduction "mean"; "sum" drops the 1/M)        ∂L/∂z
==========================  ==============================================  =====================
mse                         (1/M) Σ (z − y)²,  M = number of elements         2(z − y)/M
softmax_cross_entropy       (1/N) Σ_n −log softmax(z_n)[y_n],                (softmax(z) − onehot(y))/N
                            labels y_n ∈ {0..C−1}; log-sum-exp with the row  (expm1 on the label)
                            max subtracted and log1p of the non-max terms,
                            so logits of ±1e4 are exact and a loss of 1e-107
                            is 1e-107, not 0
bce_with_logits             (1/M) Σ max(z, 0) − z·y + log1p(exp(−|z|))      (σ(z) − y)/M
                            (overflow-free, and a tiny loss keeps its        (torch's form)
                            digits: z = −40, y = 0 gives 4.25e-18; torch's
                            (1 − y)·z − log_sigmoid(z) cancels to 0 there);
                            y ∈ [0, 1]
==========================  ==============================================  =====================

Targets are validated here: shapes, integer labels in range, finite values.
"""

from __future__ import annotations

import numpy as np

from .layers.activations import stable_sigmoid
from .numerics.backend import scalar_like
from .validate import finite_float64

REDUCTIONS = ("mean", "sum")


class Loss:
    type = ""

    def __init__(self, config: dict, out_shape, where: str = "loss"):
        self.where = f"{where} ({self.type})"
        unknown = sorted(set(config) - {"type", "reduction"})
        if unknown:
            raise ValueError(f"{self.where}: unknown key(s) {unknown}; expected 'reduction'")
        self.reduction = config.get("reduction", "mean")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{self.where}: reduction must be one of {list(REDUCTIONS)}, "
                             f"got {self.reduction!r}")
        self.out_shape = tuple(out_shape)

    def _reduce(self, total, count):
        # Divide by the count (not multiply by a rounded 1/count): exact in every backend's sense.
        # scalar_like: a float32 loss stays float32 under numpy 1.x too (see its docstring).
        return total / scalar_like(total, count) if self.reduction == "mean" else total

    def _divisor(self, count):
        return count if self.reduction == "mean" else 1

    def group_losses(self, bk, z, y, groups: int):
        """The loss of each of ``groups`` batches stacked on axis 0 of ``z``, all with targets
        ``y`` (the finite-difference sweep's perturbed copies): ``terms`` summed per group."""
        y_all = np.concatenate([np.asarray(y)] * groups, axis=0)
        terms, _ = self.terms(bk, z, y_all)
        per_group = terms.reshape(groups, -1)
        return bk.sum(per_group, axis=1) / self._divisor(per_group.shape[1])

    def check_target(self, y, batch: int) -> np.ndarray:
        """Validate targets for a batch of ``batch`` outputs; returns them as a numpy array."""
        y = np.asarray(y)
        expected = (batch,) + self.out_shape
        if y.shape != expected:
            raise ValueError(f"{self.where}: targets y must have shape {expected}, got {y.shape}")
        return finite_float64(y, f"{self.where}: targets y")

    def default_targets(self, rng, batch: int) -> np.ndarray:
        return rng.standard_normal((batch,) + self.out_shape)


class MSE(Loss):
    type = "mse"

    def terms(self, bk, z, y):
        d = z - bk.asarray(y)
        return d * d, d

    def forward(self, bk, z, y):
        squares, d = self.terms(bk, z, y)
        count = int(np.prod(z.shape))
        return self._reduce(bk.sum(squares), count), (d, self._divisor(count))

    def backward(self, bk, cache):
        d, divisor = cache
        return (2 * d) / divisor


class SoftmaxCrossEntropy(Loss):
    type = "softmax_cross_entropy"

    def __init__(self, config, out_shape, where="loss"):
        super().__init__(config, out_shape, where)
        if len(self.out_shape) != 1:
            raise ValueError(f"{self.where}: needs logits of shape (N, classes), got a sample "
                             f"shape of {self.out_shape}")

    def check_target(self, y, batch):
        y = np.asarray(y)
        if y.shape != (batch,):
            raise ValueError(f"{self.where}: labels y must have shape ({batch},), got {y.shape}")
        if y.dtype.kind == "f":
            if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise TypeError(f"{self.where}: labels y must be integers, got floats such as "
                                f"{y[~np.isfinite(y) | (y != np.round(y))][:3]}")
        elif y.dtype.kind not in "iu":
            raise TypeError(f"{self.where}: labels y must be integers, got dtype {y.dtype}")
        classes = self.out_shape[0]
        bad = (y < 0) | (y >= classes)
        if np.any(bad):
            raise ValueError(f"{self.where}: labels must lie in [0, {classes - 1}], got "
                             f"{y[bad][:5].tolist()} at index {np.flatnonzero(bad)[:5].tolist()}")
        return y.astype(np.int64)

    def default_targets(self, rng, batch):
        return rng.integers(0, self.out_shape[0], size=batch)

    def terms(self, bk, z, y):
        """−log softmax(z_n)[y_n] per sample, and log softmax(z)."""
        logp = self._log_softmax(bk, z)
        return -logp[np.arange(z.shape[0]), y], logp

    def forward(self, bk, z, y):
        n = z.shape[0]
        nll, logp = self.terms(bk, z, y)
        return self._reduce(bk.sum(nll), n), (logp, y, self._divisor(n))

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

    def backward(self, bk, cache):
        # softmax − onehot, with p_y − 1 = expm1(log p_y) on the label (no cancellation).
        logp, y, divisor = cache
        onehot = np.zeros(logp.shape, dtype=bool)
        onehot[np.arange(logp.shape[0]), y] = True
        return bk.where(onehot, bk.expm1(logp), bk.exp(logp)) / divisor


def _first_argmax_mask(shifted) -> np.ndarray:
    """True at the first position of each row's maximum (where shifted == 0)."""
    is_zero = np.asarray(shifted == 0, dtype=bool)
    first = np.zeros_like(is_zero)
    first[np.arange(is_zero.shape[0]), np.argmax(is_zero, axis=1)] = True
    return first


class BCEWithLogits(Loss):
    type = "bce_with_logits"

    def check_target(self, y, batch):
        y = super().check_target(y, batch)
        if np.any((y < 0) | (y > 1)):
            raise ValueError(f"{self.where}: targets must lie in [0, 1], got "
                             f"{y[(y < 0) | (y > 1)][:5].tolist()}")
        return y

    def default_targets(self, rng, batch):
        return rng.integers(0, 2, size=(batch,) + self.out_shape).astype(np.float64)

    def terms(self, bk, z, y):
        y = bk.asarray(y)
        return bk.maximum(z, 0) - z * y + bk.log1p(bk.exp(-bk.abs(z))), y

    def forward(self, bk, z, y):
        terms, y = self.terms(bk, z, y)
        count = int(np.prod(z.shape))
        return self._reduce(bk.sum(terms), count), (z, y, self._divisor(count))

    def backward(self, bk, cache):
        z, y, divisor = cache
        s, _ = stable_sigmoid(bk, z)
        return (s - y) / divisor


LOSSES = {cls.type: cls for cls in (MSE, SoftmaxCrossEntropy, BCEWithLogits)}


def make_loss(config, out_shape) -> Loss:
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"loss: expected an object with 'type', got {config!r}")
    if config["type"] not in LOSSES:
        raise ValueError(f"loss: unknown type {config['type']!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[config["type"]](config, out_shape)
