"""Interval arithmetic backend, for certified gradients (``refnet verify --certify``).

Every value is an interval of mpmath's interval context (a private ``MPIntervalContext``: no
global precision changes) guaranteed to contain the exact value; every operation rounds outward.
The layer code runs unchanged. Elementwise functions come only from those mpmath's interval
context implements rigorously — exp, log, sqrt — and ``mpmath.iv.diff`` (not certified) is
never used:

    expm1(x) = exp(x) − 1            log1p(x) = log(1 + x)
    tanh(x)  = 1 − 2/(exp(2x) + 1)   (x occurs once: no dependency widening)
    erf, erfc: no rigorous interval form here — gelu cannot be certified (a clear error)

Kinks. A comparison whose operands' intervals overlap (z > 0 with z ∋ 0) cannot be decided;
the midpoint's side is taken, so the run completes. Where the comparison is a layer's kink (its
``kink_signature``: relu's z > 0, ...), ``certify`` records it as a *straddle* — the layer and
how many elements — and reports the gradients as not certifiable, because the derivative at a
kink has no single value. A comparison that only picks between equivalent formulas (sigmoid's
two stable forms) is no kink. ``argmax`` (max-pool) records a straddle when the winner's interval
overlaps another candidate's; ``max`` is decided by midpoints (any shift works where it is used).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from mpmath.ctx_iv import MPIntervalContext

from .backend import Constant, LayerScope, constant_value, fraction_of


class IntervalBackend(LayerScope):
    """Object arrays of intervals at ``prec`` bits (default 200: ~60 digits)."""

    exact_max = False        # max() returns an interval, not one element exactly

    def __init__(self, prec: int = 200):
        if not isinstance(prec, int) or isinstance(prec, bool) or prec < 53:
            raise ValueError(f"IntervalBackend: prec must be an integer >= 53, got {prec!r}")
        self.ctx = MPIntervalContext()
        self.ctx.prec = prec
        self.prec = prec
        self.name = f"interval{prec}"
        self.straddles: Dict[str, int] = {}
        # Undecidable comparisons count as kinks only while a layer's kink signature is being
        # evaluated (``certify`` turns this on): elsewhere a comparison picks between equivalent
        # formulas (sigmoid's two stable forms), and the midpoint's side is right at the point.
        self.recording = False
        self._install_comparisons()
        ctx = self.ctx
        self._point = np.frompyfunc(lambda v: v if type(v) is ctx.mpf else ctx.mpf(v), 1, 1)

    def __repr__(self):
        return f"<refnet backend interval, {self.prec} bits>"

    def _install_comparisons(self):
        """Comparisons on this context's intervals: decided when the intervals are apart; else
        a straddle is recorded and the midpoints decide (the class is private to the context)."""
        backend, cls = self, self.ctx.mpf
        base = {name: getattr(cls, name) for name in ("__gt__", "__ge__", "__lt__", "__le__")}

        def decided(name, a, b):
            """True or False where mpmath can decide a <op> b; None where it cannot (the
            intervals overlap); NotImplemented where b is no number mpmath converts.

            mpmath's versions say "cannot decide" differently (libmp.libmpi.mpi_lt/mpi_le, which
            the four operators call): 1.3 returns None, 1.4 raises a bare ValueError. Both
            are read here as the one answer None, so that a straddle is recorded and the
            midpoints decide under either version (tests/test_certify.py checks the operators
            directly). No other ValueError can come out of these operators: converting b is
            done inside a bare ``except`` in mpmath, which turns any failure into
            NotImplemented."""
            try:
                return base[name](a, b)
            except ValueError:            # mpmath >= 1.4: undecidable
                return None               # (mpmath 1.3 returns None itself)

        def make(name):
            def compare(a, b):
                result = decided(name, a, b)
                if result is NotImplemented:
                    return NotImplemented
                if result is None:
                    if backend.recording:
                        backend.straddles[backend.current_layer] = \
                            backend.straddles.get(backend.current_layer, 0) + 1
                    mid_b = b.mid if isinstance(b, cls) else b
                    return bool(getattr(a.mid, name)(mid_b))
                return bool(result)
            return compare
        for name in base:
            setattr(cls, name, make(name))

    # where a straddle happens (the layer hooks: ``LayerScope``) --------------------------------
    outside = "the loss"        # what runs outside every layer

    @property
    def current_layer(self):
        layer = self.layer
        return self.outside if layer is None else f"layer {layer.name} ({layer.type})"

    # conversion ----------------------------------------------------------------------------
    def asarray(self, a):
        return np.asarray(self._point(np.asarray(a, dtype=object if np.asarray(a).dtype == object
                                                 else np.float64)), dtype=object)

    def to_numpy(self, a) -> np.ndarray:
        """Midpoints as float64."""
        return np.asarray(np.frompyfunc(lambda v: float(v.mid), 1, 1)(np.asarray(a, dtype=object)),
                          dtype=np.float64)

    def bounds(self, a) -> Tuple[np.ndarray, np.ndarray]:
        """(lower, upper) endpoints as object arrays of exact mpf-like values."""
        a = np.asarray(a, dtype=object)
        return (np.frompyfunc(lambda v: v.a, 1, 1)(a), np.frompyfunc(lambda v: v.b, 1, 1)(a))

    def to_fractions(self, a) -> np.ndarray:
        """Point intervals (endpoints) as exact Fractions, for exact comparisons."""
        return np.frompyfunc(lambda v: fraction_of(v._mpi_[0]), 1, 1)(np.asarray(a, dtype=object))

    def inflate(self, a, relative: float, absolute: float):
        """Each float x as the interval [x − r, x + r], r = relative·|x| + absolute."""
        ctx = self.ctx

        def one(x):
            x = float(x)
            r = ctx.mpf(relative) * abs(ctx.mpf(x)) + ctx.mpf(absolute)
            return ctx.mpf(x) + ctx.mpf([-r.b, r.b])
        return np.asarray(np.frompyfunc(one, 1, 1)(np.asarray(a, dtype=np.float64)), dtype=object)

    def const(self, value: Constant):
        # A 0-d array, not a bare interval: mpmath's ivmpf raises NotImplementedError (rather
        # than returning NotImplemented) when multiplied by an array, so ``const * x`` (selu's
        # scale) would never reach numpy's elementwise product.
        return np.asarray(constant_value(value, self.ctx), dtype=object)

    def zeros(self, shape):
        return np.full(shape, self.ctx.mpf(0), dtype=object)

    # elementwise ---------------------------------------------------------------------------
    def _apply(self, f, x):
        # Plain floats become exact point intervals first: 1 + x must not round in float64.
        x = self._point(np.asarray(x, dtype=object))
        return np.asarray(np.frompyfunc(f, 1, 1)(x), dtype=object)

    def exp(self, x):
        return self._apply(self.ctx.exp, x)

    def expm1(self, x):
        return self._apply(lambda v: self.ctx.exp(v) - 1, x)

    def log(self, x):
        return self._apply(self.ctx.log, x)

    def log1p(self, x):
        return self._apply(lambda v: self.ctx.log(1 + v), x)

    def tanh(self, x):
        return self._apply(lambda v: 1 - 2 / (self.ctx.exp(2 * v) + 1), x)

    def sqrt(self, x):
        return self._apply(self.ctx.sqrt, x)

    def erf(self, x):
        raise ValueError("certify: erf/erfc have no rigorous interval form in refnet (gelu "
                         "cannot be certified)")

    erfc = erf

    def abs(self, x):
        return self._apply(abs, x)

    def _hull_pick(self, a, b, pick):
        ctx = self.ctx
        a, b = np.broadcast_arrays(np.asarray(a, dtype=object), np.asarray(b, dtype=object))

        def one(u, v):
            u, v = ctx.mpf(u), ctx.mpf(v)
            return ctx.mpf([pick(u.a, v.a), pick(u.b, v.b)])
        return np.asarray(np.frompyfunc(one, 2, 1)(a, b), dtype=object)

    def maximum(self, a, b):
        return self._hull_pick(a, b, max)

    def minimum(self, a, b):
        return self._hull_pick(a, b, min)

    def where(self, cond, a, b):
        a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
        return np.asarray(self._point(np.where(np.asarray(cond, dtype=bool), a, b)), dtype=object)

    # reductions ----------------------------------------------------------------------------
    def matmul(self, a, b):
        return np.asarray(np.matmul(np.asarray(a, dtype=object), np.asarray(b, dtype=object)),
                          dtype=object)

    def sum(self, a, axis=None, keepdims=False):
        return np.asarray(np.sum(np.asarray(a, dtype=object), axis=axis, keepdims=keepdims,
                                 initial=self.ctx.mpf(0)), dtype=object)

    def argmax(self, a, axis):
        """By midpoints; a straddle where the winner's interval overlaps another candidate."""
        a = np.asarray(a, dtype=object)
        mids = self.to_numpy(a)
        winner = np.argmax(mids, axis=axis)
        # Overlap with the winner is a kink — unless the candidates are the very same point
        # (an exact tie, e.g. zeros from relu's flat side: stable under perturbation, and the
        # first-maximum convention decides, as in every other backend).
        lows, highs = (np.asarray(self.to_fractions(e), dtype=object) for e in self.bounds(a))
        w = np.expand_dims(winner, axis)
        best_low = np.take_along_axis(lows, w, axis)
        best_high = np.take_along_axis(highs, w, axis)
        same_point = (lows == highs) & (lows == best_low) & (best_low == best_high)
        positions = np.arange(a.shape[axis]).reshape([-1 if d == axis % a.ndim else 1
                                                      for d in range(a.ndim)])
        is_winner = positions == w
        overlap = np.sum((highs >= best_low) & ~same_point & ~is_winner, axis=axis) > 0
        if np.any(overlap):          # max-pool's kink: recorded whenever it happens
            self.straddles[self.current_layer] = \
                self.straddles.get(self.current_layer, 0) + int(np.sum(overlap))
        return winner

    def max(self, a, axis=None, keepdims=False):
        """The candidate with the largest midpoint (any shift works where ``max`` is used)."""
        a = np.asarray(a, dtype=object)
        if axis is None:
            a, axis = a.reshape(-1), 0
        idx = np.expand_dims(np.argmax(self.to_numpy(a), axis=axis), axis)
        out = np.take_along_axis(a, idx, axis)
        return out if keepdims else np.squeeze(out, axis)
