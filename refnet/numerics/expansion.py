"""The fast exact engine: every element an unevaluated sum of float64 numbers (an *expansion*).

The mp backend holds one Python ``mpf`` object per element, and ~1 µs of interpreter work per
element and operation is its floor: a 50-digit gradient of a 784-256-256-10 MLP cost ~800x its
float64 gradient, most of it creating and converting objects. This backend holds an array of
shape S as a float64 array of shape (m, *S), m ≤ K: element x is x₀ + x₁ + … + x_{m−1}, the
components decreasing in magnitude. Every operation is numpy on whole arrays:

============  ===================================================================================
``+ −``       the components of both operands are the *exact* terms of the result
``*``         Dekker's TwoProd gives each product of two components exactly as two floats
``@``, sum    the Ozaki scheme, error-free on float64 BLAS (slices whose products and sums stay
              below 2⁵³), recombined exactly in int64 limbs
``/``         by a small divisor (a mean, a count, softmax's sum): the reciprocal to K·53 bits
              in mpmath, then a product; elementwise otherwise: mpmath per element
exp, log, …   mpmath per element at K·53 + 64 bits (a private context, never ``mpmath.mp``)
============  ===================================================================================

**Rounding (``_round_terms``).** The exact terms of a result are turned into at most K
components by repeated error-free summation (VecSum: a chain of TwoSums moves the rounded sum to
the top and leaves the rounding errors as new terms; the top becomes a component, the errors are
summed again). Then an a-posteriori check, per element, with the leftover terms R (the result's
exact value is Σ components + Σ R, always):

- *precision*: Σ|R| ≤ 2^−prec · |x₀|  (``prec`` = ``PRECISION_BITS`` of the backend)
- *dominance*: Σ_{i≥1}|x_i| + Σ|R| ≤ 2^−40 · |x₀|, or the element is exactly zero

Elements failing it are summed again from their components and leftovers (a second round
converges: the inputs are then nearly non-overlapping); after ``_ROUNDS`` rounds any element
still failing is rounded exactly, greedily, by ``math.fsum`` (exact, then correctly rounded).
So **every operation's result is within relative 2^−prec of the exact result of that operation
on the operands** (divisions and functions: 2^(1−prec), a reciprocal or an mpmath value rounded,
then a product), the standard model of floating-point error with unit roundoff 2^(1−prec) — the
error analysis of :mod:`refnet.numerics.errorbound` holds with u replaced by that, which is how
the engine's own bound is stated and tested (tests/test_expansion.py). Dominance makes the sign
of x₀ the sign of x, so comparisons (relu, max-pool, the kink signatures) are exact.

**Range.** Expansions live in float64's exponent range. Where a low component, a TwoProd error
term or a low limb of a product falls into float64's subnormal range it may lose what lies below
2^−1074 — at most 2^−1075 a term. A result is only accepted where such losses cannot matter: a
nonzero |x₀| must lie in [``tiny``, ``HUGE``] with ``tiny`` = 2^(−1074 + prec + 24), so that
even 2^16 lossy terms stay below 2^−(prec+2)·|x₀| (inside the stated 2^(1−prec)); HUGE = 2^960
keeps Dekker's 2^27·x finite. Outside, ``ExpansionRangeError`` is raised (as for an overflow or
a row spanning more than 960 bits); the caller (``refnet.verification``) then uses the mp
backend.
Infinities and NaNs pass through as float64 does them (max-pool's −inf padding), in x₀ alone.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
from mpmath.libmp import from_man_exp, round_nearest

from .backend import Constant, constant_value

_DOUBLE_BITS = 53
_SPLITTER = 2.0 ** 27 + 1                  # Veltkamp/Dekker: 53 = 26 + 27 bits
_ROUNDS = 3
DOMINANCE = 2.0 ** -40
# |x₀| ≤ HUGE for every result: 2^27·x (Dekker's split) never overflows. The lower end is the
# backend's ``tiny`` (it depends on the precision; see the module docstring).
HUGE = 2.0 ** 960


class ExpansionRangeError(ValueError, ArithmeticError):
    """A value left the exponent range in which the expansion engine is exact (a ValueError,
    so that the command line reports it as one line and exit status 2)."""


def _two_sum(a, b):
    """s + e = a + b exactly, s = fl(a + b) (Knuth; no condition on the magnitudes)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _split(a):
    """a = hi + lo exactly, hi and lo of at most 26 bits each (Veltkamp)."""
    t = _SPLITTER * a
    hi = t - (t - a)
    return hi, a - hi


def _two_prod(a, b):
    """p + e = a·b exactly, p = fl(a·b) (Dekker; exact unless a·b underflows or the split
    overflows, which the range check excludes)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def components_for(prec: int) -> int:
    """K for a precision: K·53 bits must exceed ``prec`` by what the VecSum extraction
    typically loses (a few bits a pass). Any slack is correct — an element the extraction
    leaves short of ``prec`` fails the check and is summed again — so this one is a cost
    choice: 12 bits, measured to need no more second rounds than 24 on the LeNet and MLP
    verifies while keeping dps 51–59 (the FD checks) at 4 components instead of 5."""
    return -(-(prec + 12) // _DOUBLE_BITS)


class Expansion:
    """An array whose elements are float64 expansions: ``c`` has shape (m, *shape)."""

    __array_ufunc__ = None          # numpy defers to our reflected operators (ndarray * x)

    def __init__(self, c, bk: "ExpansionBackend"):
        self.c = c
        self.bk = bk

    # array protocol used by the layers ---------------------------------------------------
    shape = property(lambda self: self.c.shape[1:])
    ndim = property(lambda self: self.c.ndim - 1)
    size = property(lambda self: int(np.prod(self.c.shape[1:], dtype=np.int64)))
    dtype = np.dtype(object)        # what a caller asking "is this a float array?" must hear

    @property
    def T(self):
        return self.transpose()

    def __len__(self):
        return self.c.shape[1]

    def __repr__(self):
        return f"Expansion(m={self.c.shape[0]}, shape={self.shape}, x0={self.c[0]!r})"

    def _new(self, c):
        return Expansion(c, self.bk)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        return self._new(self.c[(slice(None),) + idx])

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self._new(self.c.reshape((self.c.shape[0],) + tuple(shape)))

    def take(self, indices, axis=None):
        if axis is None:
            return self._new(self.c.reshape(self.c.shape[0], -1).take(indices, axis=1))
        axis = axis % self.ndim
        return self._new(self.c.take(indices, axis=axis + 1))

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        axes = tuple(reversed(range(self.ndim))) if not axes else tuple(a % self.ndim for a in axes)
        return self._new(self.c.transpose((0,) + tuple(a + 1 for a in axes)))

    def swapaxes(self, a, b):
        return self._new(self.c.swapaxes(a % self.ndim + 1, b % self.ndim + 1))

    # arithmetic ------------------------------------------------------------------------------
    def __add__(self, other):
        return self.bk.add(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        return self.bk.add(self, -self.bk.asarray(other))

    def __rsub__(self, other):
        return self.bk.add(-self, other)

    def __mul__(self, other):
        return self.bk.multiply(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self.bk.divide(self, other)

    def __rtruediv__(self, other):
        return self.bk.divide(other, self)

    def __neg__(self):
        return self._new(-self.c)

    def __pos__(self):
        return self

    def __abs__(self):
        return self.bk.abs(self)

    def __float__(self):
        return float(self.bk.to_numpy(self))

    @property
    def _mpf_(self):
        """A 0-d expansion is a number to mpmath: its exact value (mpmath reads ``_mpf_``)."""
        if self.ndim:
            raise AttributeError("_mpf_: only a 0-d expansion is a number")
        return self.bk.to_mpf(self)._mpf_

    # comparisons: exact, from the sign of the difference's leading component ----------------
    def __gt__(self, other):
        return self.bk.compare(self, other) > 0

    def __ge__(self, other):
        return self.bk.compare(self, other) >= 0

    def __lt__(self, other):
        return self.bk.compare(self, other) < 0

    def __le__(self, other):
        return self.bk.compare(self, other) <= 0

    def __eq__(self, other):
        return self.bk.compare(self, other) == 0

    def __ne__(self, other):
        return ~(self.bk.compare(self, other) == 0)

    __hash__ = None


def _lift(c, ndim):
    """Components (m, *s) with leading unit axes so that they broadcast against ndim axes."""
    missing = ndim - (c.ndim - 1)
    return c.reshape((c.shape[0],) + (1,) * missing + c.shape[1:]) if missing > 0 else c


class ExpansionBackend:
    """Expansions of at most K float64 components, every operation within 2^(1−prec)."""

    def __init__(self, dps: int = 50):
        if not isinstance(dps, (int, np.integer)) or isinstance(dps, bool) or dps < 16:
            raise ValueError(f"ExpansionBackend: dps must be an integer >= 16, got {dps!r}")
        self.dps = int(dps)
        probe = mpmath.MPContext()
        probe.dps = self.dps
        # At least the precision the mp backend rounds every operation to at this dps.
        self.prec = int(probe.prec) + 1
        self.K = components_for(self.prec)
        # The context of the per-element functions and of scalars handed to mpmath callers:
        # 64 bits beyond the K components, so its own rounding is far below 2^-prec.
        self.ctx = mpmath.MPContext()
        self.ctx.prec = self.K * _DOUBLE_BITS + 64
        self.name = f"expansion{self.dps}"
        self.description = (f"float64 expansions, {self.K} components (every operation within "
                            f"2^-{self.prec - 1} relative; Ozaki GEMMs)")
        self._limit = 2.0 ** -self.prec
        # The smallest nonzero |x0| accepted: below it, subnormal losses of 2^-1075 a term could
        # reach 2^-(prec+2) relative (module docstring, "Range").
        self.tiny = 2.0 ** (-1074 + self.prec + 24)

    def __repr__(self):
        return f"<refnet backend expansion, {self.dps} digits, {self.K} float64 components>"

    # conversion -------------------------------------------------------------------------------
    def asarray(self, a) -> Expansion:
        """Floats exactly (one component); mpf (and other exact numbers) rounded to K
        components; an Expansion of this backend as it is."""
        if isinstance(a, Expansion):
            if a.bk is self or a.c.shape[0] <= self.K:
                return a if a.bk is self else Expansion(a.c, self)
            return Expansion(np.stack(_round_terms(list(a.c[::-1]), self)), self)
        arr = np.asarray(a)
        if arr.dtype.kind == "f" or arr.dtype.kind == "b" or (
                arr.dtype.kind in "iu" and (arr.size == 0 or np.max(np.abs(arr)) <= 2 ** 53)):
            c = arr.astype(np.float64)[None]
            self._check_range(c[0])
            return Expansion(c, self)
        return self._from_mpf(arr)

    def _from_mpf(self, arr):
        """Object arrays of mpf (or numbers): each element's exact value rounded greedily to
        K components, c_i = fl(x − Σ_{j<i} c_j) (Python's int → float conversion rounds
        correctly; the remainder is exact integer arithmetic)."""
        K = self.K
        flat = np.asarray(arr, dtype=object).ravel()
        out = np.zeros((K, flat.size))
        for j, v in enumerate(flat):
            t = v._mpf_ if hasattr(v, "_mpf_") else self.ctx.mpf(v)._mpf_
            sign, man, exp, _ = t
            if not man:
                out[0, j] = 0.0 if not exp else float(self.ctx.make_mpf(t))   # 0, ±inf, nan
                continue
            r = -int(man) if sign else int(man)
            for i in range(K):
                if not r:
                    break
                shift = max(0, r.bit_length() - 1000)
                if shift:                        # float() needs r < 2^1024: keep a sticky bit
                    top = r >> shift
                    top |= 1 if r - (top << shift) else 0
                    f = float(top)
                    r -= int(f) << shift
                else:
                    f = float(r)
                    r -= int(f)
                try:
                    out[i, j] = math.ldexp(f, exp + shift)
                except OverflowError:
                    out[i, j] = math.copysign(math.inf, f)
        self._check_range(out[0])
        return Expansion(_trim(out.reshape((K,) + np.shape(arr))), self)

    def to_numpy(self, a) -> np.ndarray:
        """The correctly rounded float64 of every element."""
        a = self.asarray(a)
        c = a.c
        if c.shape[0] == 1:
            return c[0].copy()
        s, e = _two_sum(c[0], c[1])
        tail = e
        for ci in c[2:]:
            tail = tail + ci
        with np.errstate(over="ignore", invalid="ignore"):
            out = s + tail
            half = 0.5 * np.spacing(np.abs(s))
            # Within reach of a rounding midpoint the float sum may round the wrong way: exact.
            # (tail = 0: s is exact.)
            near = (np.isfinite(s) & (tail != 0)
                    & (np.abs(np.abs(tail) - half) <= 2.0 ** -40 * half))
        if np.any(near):
            for idx in zip(*np.nonzero(near)):
                out[idx] = math.fsum(float(ci[idx]) for ci in c)
        return out

    def to_mpf(self, a):
        """Every element as an mpf of ``self.ctx`` (object array, or a scalar for 0-d): exact
        whenever its components span at most K·53 + 64 bits (always, for the results of
        this backend's operations), else rounded once to that precision."""
        a = self.asarray(a)
        ctx = self.ctx
        prec, make = ctx.prec, ctx.make_mpf
        c = a.c.reshape(a.c.shape[0], -1)
        with np.errstate(invalid="ignore"):
            mant, expo = np.frexp(c)
        mans = np.ldexp(mant, _DOUBLE_BITS).astype(np.int64).tolist()
        exps = (expo.astype(np.int64) - _DOUBLE_BITS).tolist()
        finite = np.isfinite(c[0]).tolist()
        values = []
        for j in range(c.shape[1]):
            if not finite[j]:
                values.append(ctx.mpf(float(c[0, j])))
                continue
            parts = [(m[j], e[j]) for m, e in zip(mans, exps) if m[j]]
            if not parts:
                values.append(ctx.zero)
                continue
            low = min(e for _, e in parts)
            total = sum(m << (e - low) for m, e in parts)
            values.append(make(from_man_exp(total, low, prec, round_nearest)))
        out = np.empty(len(values), dtype=object)
        out[:] = values
        out = out.reshape(a.shape)
        return out[()] if out.ndim == 0 else out

    def const(self, value: Constant) -> Expansion:
        return self._from_mpf(np.asarray(constant_value(value, self.ctx), dtype=object))

    def zeros(self, shape) -> Expansion:
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        return Expansion(np.zeros((1,) + shape), self)

    # the core: exact terms → at most K components ------------------------------------------
    def _check_range(self, x0):
        with np.errstate(invalid="ignore"):
            mag = np.abs(x0)
            bad = np.isfinite(mag) & (mag != 0) & ((mag < self.tiny) | (mag > HUGE))
        if np.any(bad):
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ExpansionRangeError(
                f"expansion backend: |value| {float(mag[where]):.3g} at {where} is outside "
                f"[{self.tiny:.3g}, {HUGE:.3g}], where the float64 expansions stay exact")

    def _finish(self, terms, shape, special=None, ordered=False):
        """Round exact terms to an Expansion; ``special``: (mask, float64 values) of elements
        whose operands were not finite, set to the float64 result there. A result that is not
        finite from finite operands overflowed float64's range: refused."""
        comps = _round_terms(terms, self, ordered) if terms else [np.zeros(shape)]
        c = np.stack([np.broadcast_to(ci, shape) for ci in comps])
        overflow = ~np.isfinite(c[0])
        if special is not None:
            overflow &= ~np.broadcast_to(special[0], overflow.shape)
        if np.any(overflow):
            raise ExpansionRangeError("expansion backend: a result overflowed float64's range")
        if special is not None:
            mask, values = special
            c = c.copy()
            c[:, mask] = 0.0
            c[0, mask] = values[mask]
        self._check_range(c[0])
        return Expansion(_trim(c), self)

    def _pair(self, a, b):
        a, b = self.asarray(a), self.asarray(b)
        ndim = max(a.ndim, b.ndim)
        ca, cb = _lift(a.c, ndim), _lift(b.c, ndim)
        shape = np.broadcast_shapes(ca.shape[1:], cb.shape[1:])
        return ca, cb, shape

    @staticmethod
    def _specials(ca, cb, op):
        """Elements with a non-finite operand: their float64 result, and operands zeroed there
        so that the exact path sees finite numbers only."""
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            finite = np.isfinite(ca[0]) & np.isfinite(cb[0])
            if np.all(finite):
                return ca, cb, None
            values = op(ca[0], cb[0])
            mask = ~finite
            ca = np.where(np.broadcast_to(mask, finite.shape)[None], 0.0, ca)
            cb = np.where(np.broadcast_to(mask, finite.shape)[None], 0.0, cb)
        return ca, cb, (mask, np.broadcast_to(values, mask.shape))

    def add(self, a, b) -> Expansion:
        ca, cb, shape = self._pair(a, b)
        ca, cb, special = self._specials(ca, cb, np.add)
        # Leading components first: where a ≈ −b, a₀ + b₀ cancels exactly (Sterbenz) before
        # anything is rounded, and the chain's top is then accurate at the first pass.
        terms = _interleave(ca, cb)
        return self._finish(terms, shape, special)

    def multiply(self, a, b) -> Expansion:
        ca, cb, shape = self._pair(a, b)
        ca, cb, special = self._specials(ca, cb, np.multiply)
        for x in (ca[0], cb[0]):
            with np.errstate(invalid="ignore"):
                if np.any(np.abs(x) > HUGE):
                    self._check_range(x)
        K = self.K
        terms, bounds = [], []
        # Products of components i, j weigh about 2^(−53(i+j)) of the result: those with
        # i + j < K exactly (TwoProd), i + j = K rounded (their error is below 2^-53K
        # relative), and those beyond only bound the error (they are added as terms, too
        # small to matter, so that nothing is dropped silently).
        pairs = sorted(((i, j) for i in range(ca.shape[0]) for j in range(cb.shape[0])),
                       key=lambda p: -(p[0] + p[1]))
        for i, j in pairs:
            if i + j < K:
                p, e = _two_prod(ca[i], cb[j])
                terms += [e, p]
            else:
                terms.append(ca[i] * cb[j])
                bounds.append((i, j))
        return self._finish(terms, shape, special)

    def divide(self, a, b) -> Expansion:
        a, b = self.asarray(a), self.asarray(b)
        if b.size * 8 <= max(a.size, 1) or b.size <= 64:
            return self.multiply(a, self.reciprocal(b))
        return self._elementwise(lambda ctx, x, y: x / y, a, b)

    def reciprocal(self, b) -> Expansion:
        return self._elementwise(lambda ctx, y: 1 / y, b)

    def _elementwise(self, f, *args) -> Expansion:
        """f(ctx, *mpf) per element in this backend's context, then rounded to K components:
        within 2^-(53K) + 2^-(53K+63) relative, below 2^-prec."""
        args = [self.asarray(x) for x in args]
        shape = np.broadcast_shapes(*[x.shape for x in args])
        mps = [np.broadcast_to(np.asarray(self.to_mpf(x), dtype=object), shape).ravel()
               for x in args]
        ctx = self.ctx
        values = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=object)
        values[:] = [f(ctx, *vals) for vals in zip(*mps)]
        return self._from_mpf(values.reshape(shape))

    # comparisons -------------------------------------------------------------------------------
    def compare(self, a, b) -> np.ndarray:
        """sign(a − b) per element as int8 (exact; NaN compares as neither: 2)."""
        ca, cb, shape = self._pair(a, b)
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(ca[0]) & np.isfinite(cb[0])
        if np.all(finite):
            if cb.shape[0] == 1 and not np.any(cb[0]):
                x0 = ca[0]                               # a against 0: a's own sign
            else:
                x0 = self.add(Expansion(ca, self), Expansion(-cb, self)).c[0]
            x0 = np.broadcast_to(x0, shape)
            return np.sign(x0).astype(np.int8)
        with np.errstate(invalid="ignore"):
            rough = np.where(ca[0] > cb[0], 1, np.where(ca[0] < cb[0], -1,
                                                        np.where(ca[0] == cb[0], 0, 2)))
        za = np.where(finite, ca, 0.0)
        zb = np.where(finite, cb, 0.0)
        exact = self.compare(Expansion(za, self), Expansion(zb, self))
        return np.where(finite, exact, rough).astype(np.int8)

    # elementwise functions ------------------------------------------------------------------
    def _function(self, name, x):
        f = getattr(self.ctx, name)
        return self._elementwise(lambda ctx, v: f(v), x)

    def exp(self, x):
        return self._function("exp", x)

    def expm1(self, x):
        return self._function("expm1", x)

    def log(self, x):
        return self._function("log", x)

    def log1p(self, x):
        return self._function("log1p", x)

    def tanh(self, x):
        return self._function("tanh", x)

    def sqrt(self, x):
        return self._function("sqrt", x)

    def erf(self, x):
        return self._function("erf", x)

    def erfc(self, x):
        return self._function("erfc", x)

    def abs(self, x):
        x = self.asarray(x)
        negative = np.signbit(x.c[0])
        return Expansion(np.where(negative[None], -x.c, x.c), self)

    def where(self, cond, a, b) -> Expansion:
        a, b = self.asarray(a), self.asarray(b)
        cond = np.asarray(cond, dtype=bool)
        m = max(a.c.shape[0], b.c.shape[0])
        ndim = max(a.ndim, b.ndim, cond.ndim)
        ca, cb = _pad(_lift(a.c, ndim), m), _pad(_lift(b.c, ndim), m)
        return Expansion(_trim(np.where(cond[None], ca, cb)), self)

    def maximum(self, a, b):
        return self.where(np.asarray(self.compare(a, b) >= 0), a, b)

    def minimum(self, a, b):
        return self.where(np.asarray(self.compare(a, b) <= 0), a, b)

    # reductions and products ------------------------------------------------------------------
    def matmul(self, a, b) -> Expansion:
        a, b = self.asarray(a), self.asarray(b)
        ca, cb = a.c, b.c
        vec_a, vec_b = a.ndim == 1, b.ndim == 1
        if vec_a:
            ca = ca[:, None, :]
        if vec_b:
            cb = cb[..., None]
        if ca.shape[-1] != cb.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not contract")
        for x in (ca[0], cb[0]):
            if not np.all(np.isfinite(x)):
                raise ValueError("expansion backend: a non-finite value reached a matmul")
        terms, shape = _matmul_terms(ca, cb)
        out = self._finish(terms, shape, ordered=True)
        if vec_a:
            out = out[..., 0, :]
        if vec_b:
            out = out[..., 0]
        return out

    def sum(self, a, axis=None, keepdims=False) -> Expansion:
        a = self.asarray(a)
        ndim = a.ndim
        axes = tuple(range(ndim)) if axis is None else tuple(
            ax % ndim for ax in ((axis,) if isinstance(axis, (int, np.integer)) else axis))
        rest = [d for d in range(ndim) if d not in axes]
        count = int(np.prod([a.shape[d] for d in axes], dtype=np.int64))
        c = a.c.transpose([0] + [d + 1 for d in rest] + [d + 1 for d in axes])
        c = c.reshape(c.shape[:1 + len(rest)] + (count,))
        if not np.all(np.isfinite(c[0])):
            raise ValueError("expansion backend: a non-finite value reached a sum")
        terms, shape = _sum_terms(c)
        out = self._finish(terms, shape, ordered=True)
        if keepdims:
            out = out.reshape(tuple(1 if d in axes else n for d, n in enumerate(a.shape)))
        return out

    def max(self, a, axis=None, keepdims=False) -> Expansion:
        a = self.asarray(a)
        if axis is None:
            a, axis = a.reshape(-1), 0
        index = self.argmax(a, axis)
        c = np.take_along_axis(a.c, np.expand_dims(index, axis % a.ndim)[None], axis=axis % a.ndim + 1)
        out = Expansion(c, self)
        return out if keepdims else Expansion(np.squeeze(c, axis=axis % a.ndim + 1), self)

    def argmax(self, a, axis):
        """Index of the first maximum along ``axis`` (exact)."""
        a = self.asarray(a)
        axis = axis % a.ndim
        n = a.shape[axis]
        best = a.take([0], axis=axis)
        index = np.zeros(best.shape, dtype=np.int64)
        for j in range(1, n):
            cand = a.take([j], axis=axis)
            better = self.compare(cand, best) > 0
            index = np.where(better, j, index)
            best = self.where(better, cand, best)
        return np.squeeze(index, axis=axis)


def _pad(c, m):
    if c.shape[0] == m:
        return c
    return np.concatenate([c, np.zeros((m - c.shape[0],) + c.shape[1:])])


def _trim(c):
    """Drop trailing components that are zero everywhere (a float input stays one component)."""
    m = c.shape[0]
    while m > 1 and not np.any(c[m - 1]):
        m -= 1
    return c[:m]


def _interleave(ca, cb):
    """Components of two expansions, pairwise, the leading ones first."""
    terms = []
    for i in range(max(ca.shape[0], cb.shape[0])):
        if i < ca.shape[0]:
            terms.append(ca[i])
        if i < cb.shape[0]:
            terms.append(cb[i])
    return terms


def _fast_two_sum(a, b):
    """s + e = a + b exactly, s = fl(a + b), where exponent(a) ≥ exponent(b) or a = 0
    (Dekker; 3 operations instead of TwoSum's 6)."""
    s = a + b
    return s, b - (s - a)


def _vecsum(terms, ordered=False):
    """One error-free pass: (top, errors), top + Σ errors = Σ terms exactly, top the float
    sum of the chain; errors that are zero everywhere are dropped. ``ordered``: every term
    outweighs the sum of those before it (the chunks of ``_limb_terms``), so Fast2Sum is
    exact."""
    s = terms[0]
    errors = []
    for t in terms[1:]:
        s, e = _fast_two_sum(t, s) if ordered else _two_sum(s, t)
        if e.any():
            errors.append(e)
    return s, errors


def _round_terms(terms, bk, ordered=False):
    """At most K components whose sum is within 2^-prec (relative) of Σ terms, with the
    dominance of the leading one (see the module docstring); terms least significant first."""
    K, limit = bk.K, bk._limit
    shape = np.broadcast_shapes(*[np.shape(t) for t in terms])
    rest = [np.broadcast_to(t, shape) for t in terms if np.any(t)]
    if not rest:
        return [np.zeros(shape)]
    original = rest
    for _ in range(_ROUNDS):
        comps = []
        while len(comps) < K and rest:
            top, rest = _vecsum(rest, ordered and not comps)
            comps.append(top)
        ordered = False
        failing = _failing(comps, rest, limit)
        if failing is None:
            return comps
        rest = rest + comps[::-1]
    # Still failing after the rounds (a severe cancellation): those elements exactly.
    comps = [np.array(ci, copy=True) for ci in comps] + [np.zeros(shape)] * (K - len(comps))
    for idx in zip(*np.nonzero(failing)):
        parts = [float(t[idx]) for t in original]
        for i in range(K):
            value = math.fsum(parts)
            comps[i][idx] = value
            parts.append(-value)
    return comps


def _failing(comps, rest, limit):
    """None if every element meets precision and dominance; else the boolean mask of those
    that do not."""
    x0 = np.abs(comps[0])
    with np.errstate(over="ignore", invalid="ignore"):
        residual = np.zeros(x0.shape)
        for r in rest:
            residual = residual + np.abs(r)
        # n float additions of nonnegative numbers: relative error below n·2^-53 ≤ 2^-45.
        residual = residual * (1 + 2.0 ** -45)
        tail = residual
        for ci in comps[1:]:
            tail = tail + np.abs(ci)
        tail = tail * (1 + 2.0 ** -45)
        ok = (residual <= limit * x0) & (tail <= DOMINANCE * x0)
        ok |= (x0 == 0) & (tail == 0)
        ok |= ~np.isfinite(x0)
    if np.all(ok):
        return None
    return ~ok


# Exact products and sums (the Ozaki scheme on expansions) -------------------------------------

# M · 2^shift < 2^(53 + span) must stay a float64 number.
_MAX_SPAN_BITS = 960


def _fixed_point(c):
    """Components (m, *G, k) of an operand whose contraction axis is last, as a common fixed
    point per group G: mantissas M (exact integers in float64, |M| < 2^53), shifts ≥ 0 with
    component = M · 2^(shift + low), and the group's ``low``; plus the widest group's span."""
    mant, expo = np.frexp(c)                        # c = mant · 2^expo, 0.5 ≤ |mant| < 1
    M = np.ldexp(mant, _DOUBLE_BITS)                # exact integers
    E = expo.astype(np.int64) - _DOUBLE_BITS
    nonzero = M != 0
    big = np.int64(1) << 40
    low = np.min(np.where(nonzero, E, big), axis=(0, -1))            # per group
    top = np.max(np.where(nonzero, E + _DOUBLE_BITS, -big), axis=(0, -1))
    occupied = low < big
    low = np.where(occupied, low, 0)
    span = int(np.max(np.where(occupied, top - low, 0))) if low.size else 0
    if span > _MAX_SPAN_BITS:
        raise ExpansionRangeError(
            f"expansion backend: a row of a product or sum spans {span} bits (values of very "
            f"different magnitude side by side); at most {_MAX_SPAN_BITS} stay exact in float64")
    shifts = np.where(nonzero, E - low[None, ..., None], 0)
    return M, shifts, low, span


def _slices(M, shifts, width, count):
    """(count, *G, k): slice j = Σ_components r_j − 2^w·r_{j+1}, r_j = rint(X · 2^(−j·w)) with
    X = M · 2^shift, so that Σ_j slice_j · 2^(j·w) = X exactly (the sum telescopes, and
    r_count = 0 because |X| < 2^(count·w − 1)). Every step is exact in float64: X is M with
    another exponent (below 2^1013, as spans are capped), scaling by a power of two is exact
    (values that fall below the normal range are below 1/2 and round to 0 as they should), and
    rint of a float is a float. |slice| ≤ m · 2^(w−1): signed slices, one bit narrower than
    slices of the magnitude."""
    out = np.zeros((count,) + M.shape[1:])
    scale = 2.0 ** -width
    up = 2.0 ** width
    with np.errstate(under="ignore"):
        for i in range(M.shape[0]):
            nonzero = M[i] != 0
            if not nonzero.any():
                continue
            # Slices below the component's lowest bit (anywhere in the array) are zero: start
            # at the first slice it reaches (a low component of an expansion occupies a
            # 53-bit window of a span of K·53 bits and more).
            first = int(np.min(shifts[i][nonzero])) // width
            prev = np.ldexp(M[i], shifts[i] - first * width)
            for j in range(first, count):
                nxt = np.rint(prev * scale)
                out[j] += prev - nxt * up
                prev = nxt
                if not prev.any():
                    break
    return out


def _limb_terms(limbs, width, exponent):
    """Σ_d limbs[d] · 2^(d·width + exponent) as exact float64 terms, least significant first.

    ``limbs``: float64 (L, *S), integers of magnitude ≤ 2^52, the top ``_extra_limbs(width)``
    rows zero (room for the carries); changed in place. Balanced carries (rint) make every
    limb but the top one a digit in [−2^(w−1), 2^(w−1)] — exact in float64: scalings by powers
    of two, rint, and sums below 2^53 — so the lower digits of a number never outweigh the
    digit above them (no cancellation between terms), and ⌊53/w⌋ consecutive digits are one
    exact float, a *chunk*. Each chunk times 2^(d·w + exponent) is a term."""
    total, shape = limbs.shape[0], limbs.shape[1:]
    limbs = limbs.reshape(total, -1)             # rows are 1-d views, even for a 0-d result
    exponent = np.broadcast_to(exponent, shape).ravel()
    up, down = 2.0 ** width, 2.0 ** -width
    carry = np.empty(limbs.shape[1:])
    shifted = np.empty(limbs.shape[1:])
    for d in range(total - 1):                   # in place: these are the engine's widest arrays
        np.multiply(limbs[d], down, out=carry)
        np.rint(carry, out=carry)
        np.multiply(carry, up, out=shifted)
        np.subtract(limbs[d], shifted, out=limbs[d])
        np.add(limbs[d + 1], carry, out=limbs[d + 1])
    per_chunk = max(1, _DOUBLE_BITS // width)
    lowest = int(np.min(exponent)) if np.size(exponent) else 0
    scale = np.ldexp(1.0, exponent) if lowest >= -1022 + _DOUBLE_BITS else None
    terms = []
    for d in range(0, total, per_chunk):
        chunk = limbs[d].copy()
        for j in range(1, min(per_chunk, total - d)):
            np.multiply(limbs[d + j], 2.0 ** (j * width), out=shifted)
            chunk += shifted
        if not chunk.any():
            continue
        if scale is not None:
            chunk *= scale
            chunk *= 2.0 ** (d * width)
            terms.append(chunk)
            continue
        # Low chunks may fall below the normal range: ldexp then loses at most 2^-1075 (the
        # result's range check makes that negligible; module docstring, "Range").
        with np.errstate(under="ignore"):
            terms.append(np.ldexp(chunk, exponent + d * width))
    return [t.reshape(shape) for t in terms]


def _extra_limbs(width):
    """Rows above the top limb that the carries of limbs up to 2^52 fill."""
    return -(-52 // width) + 1


def _matmul_terms(ca, cb):
    """Exact terms of (Σ ca) @ (Σ cb): ca (ma, ..., m, k), cb (mb, ..., k, n)."""
    ma, mb = ca.shape[0], cb.shape[0]
    k = ca.shape[-1]
    out_shape = np.broadcast_shapes(ca.shape[1:-2], cb.shape[1:-2]) + (ca.shape[-2], cb.shape[-1])
    if k == 0 or 0 in out_shape:
        return [], out_shape
    Ma, sha, lowa, spana = _fixed_point(ca)
    Mb, shb, lowb, spanb = _fixed_point(np.swapaxes(cb, -1, -2))
    # Slice widths: |Sa| ≤ ma·2^(w−1), |Sb| ≤ mb·2^(w−1), so a dot product of k of their
    # products and every partial sum stay within ma·mb·k·2^(2w−2) — exact in any summation
    # order, blocking or thread split of the BLAS — and the at most min(sa, sb) products
    # added into one limb (one weight 2^((p+q)w)) within 2^52, which leaves the carries room.
    base = 54 - (k - 1).bit_length() - (ma * mb - 1).bit_length()
    w = base // 2
    for _ in range(3):                       # the limb sum depends on the slice counts
        sa, sb = -(-(spana + 1) // w), -(-(spanb + 1) // w)
        w_next = (base - (min(sa, sb) - 1).bit_length()) // 2
        if w_next == w:
            break
        w = w_next
    sa, sb = -(-(spana + 1) // w), -(-(spanb + 1) // w)
    if (base - (min(sa, sb) - 1).bit_length()) // 2 < w:       # not settled: the safe width
        w -= 1
        sa, sb = -(-(spana + 1) // w), -(-(spanb + 1) // w)
    A = _slices(Ma, sha, w, sa)                                   # (sa, ..., m, k)
    B = np.swapaxes(_slices(Mb, shb, w, sb), -1, -2)              # (sb, ..., k, n)
    limbs = np.zeros((sa + sb - 1 + _extra_limbs(w),) + out_shape)
    size = int(np.prod(out_shape, dtype=np.int64))
    if sa * sb * size <= _MAX_PRODUCT_VALUES:
        products = _slice_products(A, B)                      # (sa, sb, *out_shape)
        for q in range(sb):
            limbs[q:q + sa] += products[:, q]          # slice pair (p, q) weighs 2^((p+q)w)
    else:                                             # one slice of B at a time: less memory
        m = ca.shape[-2]
        a_stack = np.moveaxis(A, 0, -3).reshape(A.shape[1:-2] + (sa * m, k))
        for q in range(sb):
            prod = np.matmul(a_stack, B[q])
            prod = np.moveaxis(prod.reshape(prod.shape[:-2] + (sa, m, prod.shape[-1])), -3, 0)
            limbs[q:q + sa] += prod
    exponent = np.broadcast_to(lowa[..., :, None] + lowb[..., None, :], out_shape)
    return _limb_terms(limbs, w, exponent), out_shape


# Every slice product in one array up to this many values (128 MB); above, B's slices one at a
# time.
_MAX_PRODUCT_VALUES = 2 ** 24


def _slice_products(A, B):
    """(sa, sb, *out): A[p] @ B[q] for every slice pair, in as few GEMM calls as the shapes
    allow — one when either operand has no batch axes (the batch folds into the other's rows
    or columns), else one batched call — so that the BLAS sees a few large products instead of
    sa·sb·batch small ones (small GEMMs are where a multithreaded BLAS loses most, above all
    on a machine whose cores are busy)."""
    sa, sb = A.shape[0], B.shape[0]
    batch_a, batch_b = A.shape[1:-2], B.shape[1:-2]
    m, k, n = A.shape[-2], A.shape[-1], B.shape[-1]
    if not batch_a:                          # A (sa, m, k): B's batch folds into the columns
        cols = np.moveaxis(B, -2, 0).reshape(k, -1)                    # (k, sb·batch·n)
        prod = (A.reshape(sa * m, k) @ cols).reshape((sa, m, sb) + batch_b + (n,))
        return np.moveaxis(prod, 1, -2)                                # (sa, sb, *batch, m, n)
    if not batch_b:                          # B (sb, k, n): A's batch folds into the rows
        cols = np.moveaxis(B, 0, -2).reshape(k, sb * n)                # (k, sb·n)
        prod = (A.reshape(-1, k) @ cols).reshape((sa,) + batch_a + (m, sb, n))
        return np.moveaxis(prod, -2, 1)                                # (sa, sb, *batch, m, n)
    rows = np.moveaxis(A, 0, -3).reshape(batch_a + (sa * m, k))
    cols = np.moveaxis(B, 0, -2).reshape(batch_b + (k, sb * n))
    prod = np.matmul(rows, cols)
    prod = prod.reshape(prod.shape[:-2] + (sa, m, sb, n))
    return np.moveaxis(np.moveaxis(prod, -4, 0), -2, 1)              # (sa, sb, *batch, m, n)


def _sum_terms(c):
    """Exact terms of the sum over the last axis of components c (m, *G, n)."""
    m, n = c.shape[0], c.shape[-1]
    shape = c.shape[1:-1]
    if n == 0:
        return [], shape
    M, shifts, low, span = _fixed_point(c)
    # n slices of at most m·2^(w−1) each: every partial sum within n·m·2^(w−1) ≤ 2^52.
    width = 53 - (n - 1).bit_length() - (m - 1).bit_length()
    count = -(-(span + 1) // width)
    limbs = np.zeros((count + _extra_limbs(width),) + shape)
    limbs[:count] = np.sum(_slices(M, shifts, width, count), axis=-1)     # exact
    return _limb_terms(limbs, width, low), shape
