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
              below 2⁵³), recombined exactly in float64 limbs; a product leaves out the low
              diagonals of slice products that provably weigh below 2^−(prec+2)·(|A| @ |B|)
``/``         by a small divisor (a mean, a count, softmax's sum): the reciprocal from mpmath,
              then a product; elementwise otherwise: mpmath per element
exp, log, …   mpmath's own functions per element at prec + 20 bits, on its raw values (no
              ``mpf`` objects, never ``mpmath.mp``)
============  ===================================================================================

**Rounding (``_round_terms``).** The exact terms of a result are turned into at most K
components: K − 1 by repeated error-free summation (VecSum: a chain of TwoSums moves the rounded
sum to the top and leaves the rounding errors as new terms; the top becomes a component, the
errors are summed again), the last as the plain float sum of what is left, with a bound on its
error. Then an a-posteriori check, per element, with R the leftover (the result's exact value is
Σ components + R, |R| ≤ ρ: ρ the float sum's error bound, or Σ|leftover terms| where all K
components were extracted error-free):

- *precision*: ρ ≤ 2^−prec · |x₀|  (``prec`` = ``PRECISION_BITS`` of the backend)
- *dominance*: Σ_{i≥1}|x_i| + ρ ≤ 2^−40 · |x₀|, or the element is exactly zero

Elements failing it are rounded again from their own terms, every component error-free, then
summed again from their components and leftovers (a second round converges: the inputs are then
nearly non-overlapping); after ``_ROUNDS`` rounds any element still failing is rounded exactly,
greedily, by ``math.fsum`` (exact, then correctly rounded).
So **every operation's result is within relative 2^−prec of the exact result of that operation
on the operands** (divisions and functions: 2^(1−prec), a reciprocal or an mpmath value rounded,
then a product; a matmul within 2^−prec·|AB| + 2^−(prec+2)·(|A| @ |B|), the model of a dot
product, since its lowest diagonals are left out: ``_first_diagonal``), the standard model of
floating-point error with unit roundoff 2^(1−prec) — the
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

**Where the time goes.** A product's exact value is far wider than its rounded result (two
212-bit operands, 400 bits and more), so the work is in the slice products and in carrying and
rounding their limbs: each diagonal of slice products (one weight) is one GEMM written straight
into its limb, the diagonals below the result's precision are not computed, and the limbs are
carried and rounded in blocks of ``_BLOCK`` elements that stay in cache — on the backend's
threads (``threads``) where there are several. No result depends on the block size or the
thread count: every element is rounded by its own terms alone.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import mpmath
import numpy as np
from mpmath.libmp import (
    ComplexResult,
    fone,
    from_float,
    from_man_exp,
    fzero,
    mpf_add,
    mpf_div,
    mpf_erf,
    mpf_erfc,
    mpf_exp,
    mpf_log,
    mpf_mul,
    mpf_shift,
    mpf_sqrt,
    mpf_sub,
    mpf_tanh,
    round_nearest,
)

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


# The variables that set a BLAS's thread count (OpenBLAS, OpenMP, MKL, BLIS, Accelerate).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                         "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                       # no affinity on this OS (macOS, Windows)
        return os.cpu_count() or 1


def default_threads() -> int:
    """As many threads as the BLAS runs: the smallest of BLAS_THREAD_VARIABLES that is set to a
    positive integer, else the cores this process may run on."""
    cores = available_cores()
    limits = [int(v) for v in (os.environ.get(k, "") for k in BLAS_THREAD_VARIABLES)
              if v.strip().isdigit() and int(v) > 0]
    return max(1, min([cores] + limits))


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


# Per-element functions on mpmath's raw values (sign, man, exp, bc) -------------------------------
# mpmath's own functions (those ``mpmath.mp.exp`` etc. call for a real mpf), at the precision they
# are given; expm1 and log1p are written here, the same on every mpmath version.

def _magnitude(t):
    """m with 2^(m−1) ≤ |x| < 2^m, for a finite nonzero raw value."""
    return t[2] + t[3]


def _mpf_expm1(t, prec, rnd):
    """exp(x) − 1 within mpmath's accuracy at ``prec``, relative to the result: exp is evaluated
    with as many more bits as the subtraction of 1 cancels (|x| < 2^m cancels up to −m bits),
    plus 20; below 2^−prec, x + x²/2 (the next term is below 2^−2prec relative)."""
    if not t[1]:                                       # 0, ±inf, nan
        return fzero if t == fzero else mpf_sub(mpf_exp(t, prec, rnd), fone, prec, rnd)
    m = _magnitude(t)
    if m < -prec:
        return mpf_add(t, mpf_shift(mpf_mul(t, t), -1), prec, rnd)
    return mpf_sub(mpf_exp(t, prec + max(0, -m) + 20, rnd), fone, prec, rnd)


def _mpf_log1p(t, prec, rnd):
    """log(1 + x) within mpmath's accuracy at ``prec``: 1 + x formed exactly, then mpmath's log,
    which itself adds the bits its argument's nearness to 1 cancels; below 2^−prec, x − x²/2."""
    if t == fzero:
        return fzero
    if t[1] and _magnitude(t) < -prec:
        return mpf_sub(t, mpf_shift(mpf_mul(t, t), -1), prec, rnd)
    return mpf_log(mpf_add(t, fone), prec, rnd)           # mpf_add without prec: exact


def _real(f, name):
    """f(x, prec, rnd) as (prec, x) -> raw, with a one-line error where mpmath's answer would
    be complex (a log or square root of a negative number)."""
    def apply(prec, t):
        try:
            return f(t, prec, round_nearest)
        except ComplexResult:
            raise ValueError(f"expansion backend: {name} of a negative number") from None
    return apply


_RAW_FUNCTIONS = {name: _real(f, name) for name, f in [
    ("exp", mpf_exp), ("expm1", _mpf_expm1), ("log", mpf_log), ("log1p", _mpf_log1p),
    ("tanh", mpf_tanh), ("sqrt", mpf_sqrt), ("erf", mpf_erf), ("erfc", mpf_erfc)]}


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
    """Expansions of at most K float64 components, every operation within 2^(1−prec).

    ``threads``: how many threads carry and round the blocks of a large product (None: as
    many as the BLAS runs, ``default_threads``); results are the same for any number."""

    def __init__(self, dps: int = 50, threads: Optional[int] = None):
        if not isinstance(dps, (int, np.integer)) or isinstance(dps, bool) or dps < 16:
            raise ValueError(f"ExpansionBackend: dps must be an integer >= 16, got {dps!r}")
        if threads is not None and (not isinstance(threads, (int, np.integer))
                                    or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"ExpansionBackend: threads must be a positive integer or None, "
                             f"got {threads!r}")
        self.dps = int(dps)
        # The threads that carry and round the blocks of a large product (numpy releases the
        # GIL in its loops); None: as many as the BLAS runs (BLAS_THREAD_VARIABLES, else the
        # cores), so that verify's FD workers, whose BLAS runs one thread, run one too. The
        # result does not depend on it (every element is rounded by its own terms).
        self.threads = default_threads() if threads is None else int(threads)
        self._pool = None
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

    def __getstate__(self):                  # a thread pool does not travel
        return {**self.__dict__, "_pool": None}

    def _map(self, fn, items):
        """fn over items, on the backend's threads where there are several."""
        if self.threads == 1 or len(items) < 2:
            return [fn(item) for item in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="refnet-expansion")
        return list(self._pool.map(fn, items))

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
        K components (``_from_raw``)."""
        flat = np.asarray(arr, dtype=object).ravel()
        raw = [v._mpf_ if hasattr(v, "_mpf_") else self.ctx.mpf(v)._mpf_ for v in flat]
        return self._from_raw(raw, np.shape(arr))

    def _from_raw(self, raw, shape):
        """mpmath's raw values (sign, man, exp, bc), one an element, each rounded greedily to K
        components, c_i = fl(x − Σ_{j<i} c_j) (Python's int → float conversion rounds
        correctly; the remainder is exact integer arithmetic)."""
        K = self.K
        out = np.zeros((K, len(raw)))
        for j, t in enumerate(raw):
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
        return Expansion(_trim(out.reshape((K,) + tuple(shape))), self)

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
        make = self.ctx.make_mpf
        out = np.empty(a.size, dtype=object)
        out[:] = [make(t) for t in self._raw(a)]
        out = out.reshape(a.shape)
        return out[()] if out.ndim == 0 else out

    def _raw(self, a):
        """Every element of Expansion ``a`` as mpmath's raw value (sign, man, exp, bc), a list
        in C order, rounded as ``to_mpf`` says."""
        prec = self.ctx.prec
        c = a.c.reshape(a.c.shape[0], -1)
        with np.errstate(invalid="ignore"):
            mant, expo = np.frexp(c)
        mans = np.ldexp(mant, _DOUBLE_BITS).astype(np.int64).tolist()
        exps = (expo.astype(np.int64) - _DOUBLE_BITS).tolist()
        finite = np.isfinite(c[0]).tolist()
        values = []
        for j in range(c.shape[1]):
            if not finite[j]:
                values.append(from_float(float(c[0, j])))
                continue
            parts = [(m[j], e[j]) for m, e in zip(mans, exps) if m[j]]
            if not parts:
                values.append(fzero)
                continue
            low = min(e for _, e in parts)
            total = sum(m << (e - low) for m, e in parts)
            values.append(from_man_exp(total, low, prec, round_nearest))
        return values

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
        return self._assemble(np.stack([np.broadcast_to(ci, shape) for ci in comps]), special)

    def _from_limbs(self, limbs, width, exponent, shape, layout="sum"):
        """The Expansion of Σ_d limbs[d] · 2^(d·width + exponent) (``_limb_terms``), rounded
        block by block: _BLOCK elements at a time, the ~100 passes of carrying and rounding
        run on arrays that stay in the CPU's cache (every element is rounded by its own terms
        alone, so the blocks change no result)."""
        total = limbs.shape[0]
        size = int(np.prod(shape, dtype=np.int64))
        flat = limbs.reshape(total, size)
        exponent = np.broadcast_to(exponent, shape).reshape(size)
        c = np.empty((self.K, size))

        def block(start):
            end = min(start + _BLOCK, size)
            terms = _limb_terms(flat[:, start:end], width, exponent[start:end], layout)
            comps = _round_terms(terms, self, ordered=True) if terms else []
            c[:len(comps), start:end] = comps
            c[len(comps):, start:end] = 0.0

        self._map(block, range(0, size, _BLOCK))
        return self._assemble(c.reshape((self.K,) + tuple(shape)))

    def _assemble(self, c, special=None):
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
        return self._elementwise(lambda prec, x, y: mpf_div(x, y, prec, round_nearest), a, b)

    def reciprocal(self, b) -> Expansion:
        return self._elementwise(lambda prec, y: mpf_div(fone, y, prec, round_nearest), b)

    def _elementwise(self, f, *args) -> Expansion:
        """f(prec, *raw) per element on mpmath's raw values (mpmath's own functions on them,
        without an mpf object each: a tenth of the time) at ``prec`` + 20 bits, then rounded
        to K components: within 2^−(prec+19) + 2^−(53K) relative, below 2^−prec (K·53 ≥
        prec + 12)."""
        args = [self.asarray(x) for x in args]
        shape = np.broadcast_shapes(*[x.shape for x in args])
        raws = []
        for x in args:
            raw = self._raw(x)
            if x.shape != shape:
                index = np.broadcast_to(np.arange(len(raw)).reshape(x.shape), shape).ravel()
                raw = [raw[i] for i in index.tolist()]
            raws.append(raw)
        prec = self.prec + 20
        return self._from_raw([f(prec, *vals) for vals in zip(*raws)], shape)

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
        return self._elementwise(_RAW_FUNCTIONS[name], x)

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
        out = self._from_limbs(*_matmul_limbs(ca, cb, self.prec))
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
        if count >= 1 and np.all(np.count_nonzero(c[0], axis=-1) <= 1):
            # At most one nonzero term a sum (a scatter whose windows do not overlap, a max
            # pool's gradient): the sum is that term, component by component — adding zeros
            # is exact (a zero element has every component zero: dominance).
            out = self._assemble(np.add.reduce(c, axis=-1))
        else:
            out = self._from_limbs(*_sum_limbs(c))
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


def _round_terms(terms, bk, ordered=False, rounds=_ROUNDS, error_free=False):
    """At most K components whose sum is within 2^-prec (relative) of Σ terms, with the
    dominance of the leading one (see the module docstring); terms least significant first.

    The first K − 1 components are extracted error-free (VecSum passes: what they leave is
    exact); the last is the plain float sum of what is left, whose own error is below
    (n − 1)·2^−53 of the sum of its n terms' magnitudes (recursive summation, Higham's
    γ_(n−1)) — already ~2^−(53(K−1)) below the leading component, far inside 2^−prec, at a
    fraction of the cost of one more exact pass. The check takes that bound as the leftover.
    ``error_free``: all K components extracted error-free, the leftover terms exact.

    Every element is rounded by its own terms alone: the elements that fail the check are
    gathered and rounded again — from their own terms, error-free; or, where that was the
    round that failed, from its components and exact leftovers (a second round converges: the
    inputs are then nearly non-overlapping) — and after ``rounds`` rounds rounded exactly by
    ``math.fsum``. So a result never depends on which other elements share its array (the
    blocks of ``_from_limbs``)."""
    K, limit = bk.K, bk._limit
    shape = np.broadcast_shapes(*[np.shape(t) for t in terms])
    if shape == ():                                   # one element: as an array of one
        return [c.reshape(()) for c in _round_terms([np.reshape(t, (1,)) for t in terms], bk,
                                                    ordered, rounds, error_free)]
    rest = [np.broadcast_to(t, shape) for t in terms if np.any(t)]
    if not rest:
        return [np.zeros(shape)]
    if rounds == 0:
        return _round_exactly(rest, K)
    comps = []
    while len(comps) < K - (not error_free) and rest:
        top, rest = _vecsum(rest, ordered and not comps)
        comps.append(top)
    leftover = rest
    if rest and not error_free:
        last = rest[0].copy()
        magnitude = np.abs(rest[0])
        for r in rest[1:]:
            last += r
            magnitude += np.abs(r)
        comps.append(last)
        # (n − 1)·2^−53 Σ|r| bounds the float sum's error; Σ|r| itself was summed in float
        # (relative error below n·2^−53): 2^−52·n·Σ|r| covers both.
        leftover = [magnitude * (len(rest) * 2.0 ** -52)] if len(rest) > 1 else []
    failing = _failing(comps, leftover, limit)
    if failing is None:
        return comps
    where = np.nonzero(failing)
    if error_free:
        again = _round_terms([t[where] for t in rest + comps[::-1]], bk, False, rounds - 1, True)
    else:
        again = _round_terms([np.broadcast_to(t, shape)[where] for t in terms], bk, ordered,
                             rounds - 1, True)
    comps = [np.array(ci, copy=True) for ci in comps] + [np.zeros(shape)] * (K - len(comps))
    for i in range(K):
        comps[i][where] = again[i] if i < len(again) else 0.0
    return comps


def _round_exactly(terms, K):
    """Greedy exact rounding of 1-d terms, element by element (``math.fsum`` is exact, then
    correctly rounded): the last resort of a severe cancellation."""
    comps = [np.zeros(terms[0].shape) for _ in range(K)]
    for j in range(terms[0].shape[0]):
        parts = [float(t[j]) for t in terms]
        for i in range(K):
            value = math.fsum(parts)
            comps[i][j] = value
            parts.append(-value)
    return comps


def _failing(comps, rest, limit):
    """None if every element meets precision and dominance; else the boolean mask of those
    that do not."""
    x0 = np.abs(comps[0])
    with np.errstate(over="ignore", invalid="ignore"):
        residual = np.zeros(x0.shape)
        for r in rest:
            residual += np.abs(r)
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
# Elements of a product or sum carried and rounded at a time (``_from_limbs``): ~20 arrays of
# this many float64 values stay in a core's cache (256 KiB each).
_BLOCK = 2 ** 15


class _FixedPoint:
    """Components c (m, *G, k) of an operand whose contraction axis is last (or, ``axis=-2``,
    c (m, *G', k, n) with the groups G = (*G', n): a product's right operand as it is laid
    out), as a common fixed point per group G: every component is an integer multiple of 2^low
    (``low``: the ulp of
    the group's smallest nonzero magnitude, float64's 53 bits below its leading bit), and
    below 2^top in magnitude (both 0 for a group of zeros); ``span``: the widest group's
    top − low; ``lowest[i]``: how far above ``low`` component i's smallest ulp lies, at least,
    in every group (its slices below that are zero). Found from each group's largest and
    smallest nonzero magnitude alone: no per-element exponent is taken."""

    def __init__(self, c, axis=-1):
        self.c, self.axis = c, axis
        magnitude = np.abs(c)
        largest = np.max(magnitude, axis=axis)                                # (m, *G)
        smallest = np.min(np.where(magnitude > 0, magnitude, np.inf), axis=axis)
        occupied = np.isfinite(smallest)
        with np.errstate(invalid="ignore"):
            ulp = np.frexp(np.where(occupied, smallest, 1.0))[1].astype(np.int64) - _DOUBLE_BITS
        top = np.frexp(largest)[1].astype(np.int64)                          # |x| < 2^top
        big = np.int64(1) << 40
        low = np.min(np.where(occupied, ulp, big), axis=0)                   # (*G)
        top = np.max(np.where(occupied, top, -big), axis=0)
        any_nonzero = low < big
        self.low = np.where(any_nonzero, low, 0)
        self.top = np.where(any_nonzero, top, 0)
        self.span = int(np.max(self.top - self.low)) if self.low.size else 0
        if self.span > _MAX_SPAN_BITS:
            raise ExpansionRangeError(
                f"expansion backend: a row of a product or sum spans {self.span} bits (values "
                f"of very different magnitude side by side); at most {_MAX_SPAN_BITS} stay "
                f"exact in float64")
        self.lowest = [int(np.min(np.where(occupied[i], ulp[i] - self.low, big)))
                       if occupied[i].any() else None for i in range(c.shape[0])]


def _power_of_two(e):
    """2^e for an integer array whose values lie within float64's normal exponents
    [−1022, 1023]: the bits of the float written directly (a tenth of ldexp's time)."""
    return ((np.asarray(e, dtype=np.int64) + 1023) << 52).view(np.float64)


def _scaled(x, e):
    """x · 2^e with e an integer array broadcast against x, by two multiplications by powers
    of two within float64's range (2^e itself may not be: e up to ±2000): exact wherever
    x · 2^(e/2) and the result are normal or zero, as everywhere this is used."""
    half = e // 2
    out = x * _power_of_two(half)
    out *= _power_of_two(e - half)
    return out


def _slices(fixed, width, count, carried=True, out=None, offset=None):
    """(count, *G, k): the slices of X = Σ_components · 2^−low in base 2^w, balanced digits
    with Σ_j slice_j · 2^(j·w) = X exactly; with ``offset`` = o, slice j comes out times its
    weight 2^((j − o)·w) (a product's operands: ``_matmul_limbs``), else as an integer.

    Per component, from the top down: R = component · 2^(−low − o·w), then for each slice j
    (highest first) T = (R + C) − C with C = 1.5·2^(52 + (j − o)·w) — R rounded to a multiple
    of 2^((j − o)·w), the nearest, in two exact operations: |R| < 2^(51 + (j − o)·w) keeps R + C
    in C's binade, whose ulp is that multiple, and the subtraction is exact (Sterbenz) — and
    R −= T (exact: T is R's rounding); the last slice the component reaches (``lowest``) takes
    what is left. Each remainder is within half the next weight, so every digit is within
    2^(w−1); the top one too, since |X| < 2^span ≤ 2^(count·w − 1). The scalings are by powers
    of two within range (``_scaled``), exact. Signed slices, one bit narrower than slices of
    the magnitude.

    Of m > 1 components the slices are summed, then (``carried``, for a product's operands,
    where each bit of width saves GEMMs) carried, balanced as ``_limb_terms`` does, so that
    they stay within 2^(w−1) too rather than m·2^(w−1): the digits below the top are balanced,
    and the top one is within 2^(w−1) because ``_slice_count`` gives such operands a bit of
    headroom (|Σ X| < 2^(span+1), and count·w ≥ span + 2). A sum's slices are not carried
    (|slice| ≤ m·2^(w−1)): there the carries would cost more than the bits they save.

    ``out``: where slice j goes, out[j] (a view into the stacked layout of ``_diagonal_products``,
    written in place: no copy of the slices is made to stack them)."""
    c = fixed.c
    if out is None:
        out = np.empty((count,) + c.shape[1:])
    o = 0 if offset is None else offset
    # The leading component writes every slice from its first one up; below, slices start at
    # zero (the lower components add into them).
    out[:count if fixed.lowest[0] is None else fixed.lowest[0] // width] = 0.0
    piece = np.empty(c.shape[1:])
    with np.errstate(under="ignore"):
        for i in range(c.shape[0]):
            if fixed.lowest[i] is None:
                continue
            # Slices below the component's lowest bit (anywhere in the array) are zero: stop at
            # the first slice it reaches (a low component of an expansion occupies a 53-bit
            # window of a span of K·53 bits and more).
            first = fixed.lowest[i] // width
            rest = _scaled(c[i], np.expand_dims(-fixed.low - o * width, fixed.axis))
            for j in range(count - 1, first, -1):
                target = out[j] if i == 0 else piece
                magic = 1.5 * 2.0 ** (52 + (j - o) * width)
                np.add(rest, magic, out=target)
                np.subtract(target, magic, out=target)
                np.subtract(rest, target, out=rest)
                if i:
                    out[j] += piece
            if i:
                out[first] += rest
            else:
                out[first] = rest
    if carried and c.shape[0] > 1:
        carry = np.empty(c.shape[1:])
        for j in range(count - 1):
            magic = 1.5 * 2.0 ** (52 + (j + 1 - o) * width)
            np.add(out[j], magic, out=carry)
            np.subtract(carry, magic, out=carry)
            out[j] -= carry
            out[j + 1] += carry
    if offset is None:
        for j in range(1, count):
            out[j] *= 2.0 ** (-j * width)
    return out


def _slice_count(fixed, width, carried=True):
    """How many slices of ``width`` bits hold an operand: |X| < 2^span for one component, so
    count·w ≥ span + 1 makes the top slice (rint of X / 2^((count−1)w)) within 2^(w−1); a sum
    of m > 1 components lies below 2^span·(1 + 2^−40) (dominance), and its carried top digit
    is within 2^(w−1) for count·w ≥ span + 2 (``_slices``)."""
    return -(-(fixed.span + 1 + (carried and fixed.c.shape[0] > 1)) // width)


def _chunk_groups(total, per_chunk, fold_top):
    """The rows of each term, least significant first. The top row, which the carries leave as
    it is (not a balanced digit), is a term of its own and the digits below it chunks of
    per_chunk from the bottom up; or (``fold_top``, a product's limbs) the top row and the digit
    under it are one term — the top row is below k·2^(w−2) + 1 (``_CARRY_ROWS``), so the
    two are below 2^(2w + log₂k − 1) ≤ 2^53 — and the digits below chunks from the top down."""
    if not fold_top or total < 2:
        return [range(d, min(d + per_chunk, total - 1)) for d in range(0, total - 1, per_chunk)] \
            + [range(total - 1, total)]
    groups = [range(total - 2, total)]
    for top in range(total - 3, -1, -per_chunk):
        groups.append(range(max(top - per_chunk + 1, 0), top + 1))
    return groups[::-1]


def _limb_terms(limbs, width, exponent, layout="sum"):
    """Σ_d limbs[d] · 2^(d·width + exponent) as exact float64 terms, least significant first.
    ``layout``: "sum" (``_sum_limbs``), "product" (``_matmul_limbs``: the top row folded into
    the term below, ``_chunk_groups``) or "scaled product" (a product's limbs that already
    hold limbs[d] · 2^(d·width): ``_scaled_limb_terms``).

    ``limbs``: float64 (L, *S), integers of magnitude ≤ 2^52, the top row zero (room for the
    carries: ``_CARRY_ROWS``); changed in place. Balanced carries (rint) make every
    limb but the top one a digit in [−2^(w−1), 2^(w−1)] — exact in float64: scalings by powers
    of two, rint, and sums below 2^53 — so the lower digits of a number never outweigh the
    digit above them (no cancellation between terms), and ⌊53/w⌋ consecutive digits are one
    exact float, a *chunk*. Each chunk times 2^(d·w + exponent) is a term."""
    total, shape = limbs.shape[0], limbs.shape[1:]
    limbs = limbs.reshape(total, -1)             # rows are 1-d views, even for a 0-d result
    exponent = np.broadcast_to(exponent, shape).ravel()
    if layout == "scaled product":
        return [t.reshape(shape) for t in _scaled_limb_terms(limbs, width, exponent)]
    fold_top = layout == "product"
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
    lowest, highest = (int(np.min(exponent)), int(np.max(exponent))) if np.size(exponent) else (0, 0)
    normal = lowest >= -1022 + _DOUBLE_BITS and highest <= 1023
    scale = _power_of_two(exponent) if normal else None
    terms = []
    # (Zero chunks are dropped by the rounding.)
    for rows in _chunk_groups(total, per_chunk, fold_top):
        d = rows[0]
        chunk = limbs[rows[-1]] * 2.0 ** ((rows[-1] - d) * width)
        for r in rows[-2::-1]:
            if r == d:
                chunk += limbs[r]
            else:
                np.multiply(limbs[r], 2.0 ** ((r - d) * width), out=shifted)
                chunk += shifted
        if scale is not None and d * width <= 1000:
            chunk *= scale
            chunk *= 2.0 ** (d * width)
            terms.append(chunk)
            continue
        # Low chunks may fall below the normal range: ldexp then loses at most 2^-1075 (the
        # result's range check makes that negligible; module docstring, "Range").
        with np.errstate(under="ignore", over="ignore"):
            terms.append(np.ldexp(chunk, exponent + d * width))
    return [t.reshape(shape) for t in terms]


def _scaled_limb_terms(limbs, width, exponent):
    """``_limb_terms`` of limbs that hold their weight 2^(d·w) already (a product's, whose
    slices were scaled so: ``_matmul_limbs``), rows (L, n). A carry is then a rounding to a
    multiple of 2^((d+1)w), (x + C) − C with C = 1.5·2^(52 + (d+1)w) — exact: |x| < 2^(51 +
    (d+1)w) keeps x + C in C's binade, whose ulp is 2^((d+1)w), and the subtraction is exact
    (Sterbenz) — that moves to the next row unscaled: four passes a row instead of five, and a
    chunk is the plain sum of its digits (no scaling either). The rows must stay finite: the
    caller scales only where (L + 1)·w + 53 < 1020."""
    total = limbs.shape[0]
    carry = np.empty(limbs.shape[1:])
    for d in range(total - 1):
        magic = 1.5 * 2.0 ** (52 + (d + 1) * width)
        np.add(limbs[d], magic, out=carry)
        np.subtract(carry, magic, out=carry)
        np.subtract(limbs[d], carry, out=limbs[d])
        np.add(limbs[d + 1], carry, out=limbs[d + 1])
    per_chunk = max(1, _DOUBLE_BITS // width)
    lowest, highest = (int(np.min(exponent)), int(np.max(exponent))) if np.size(exponent) else (0, 0)
    normal = lowest >= -1022 + _DOUBLE_BITS and highest + total * width + _DOUBLE_BITS <= 1023
    scale = _power_of_two(exponent) if normal else None
    terms = []
    for rows in _chunk_groups(total, per_chunk, fold_top=True):
        # (The rows are scratch: a one-row chunk is the row itself, scaled in place.)
        chunk = limbs[rows[-1]] if len(rows) == 1 else limbs[rows[-1]] + limbs[rows[-2]]
        for r in rows[-3::-1]:
            chunk += limbs[r]
        if scale is not None:
            chunk *= scale
        else:
            # Low chunks may fall below the normal range: ldexp then loses at most 2^-1075
            # (the result's range check makes that negligible; module docstring, "Range").
            with np.errstate(under="ignore", over="ignore"):
                chunk = np.ldexp(chunk, exponent)
        terms.append(chunk)
    return terms


# Rows above the top limb for the carries. One is enough: a product's value is below
# k·2^(span_a + span_b) in units of its lowest limb, and the slice counts make
# (sa + sb)·w ≥ span_a + span_b + 2, so what the carries leave in the row above the top
# diagonal is at most k·2^(w−2) + 1 — with the slice width's 2w + log₂k ≤ 54, an integer that
# times 2^w is still below 2^53, so the chunk holding it stays exact. (A sum's value: below
# n·m·2^span with count·w ≥ span + 1, the same argument with its width.)
_CARRY_ROWS = 1
# Whether a product's slices are scaled by their weight where the range allows (``_matmul_limbs``):
# the same bits either way, one pass a limb fewer with it.
_PRESCALE = True


def _matmul_limbs(ca, cb, prec=None):
    """(limbs, width, exponent, shape) of (Σ ca) @ (Σ cb) (``_limb_terms``): ca (ma, ..., m, k),
    cb (mb, ..., k, n). Exact for ``prec=None``; else the low diagonals of slice products
    whose sum is provably below 2^−(prec+2) · (|A| @ |B|) in every element are left out
    (``_first_diagonal``)."""
    k = ca.shape[-1]
    out_shape = np.broadcast_shapes(ca.shape[1:-2], cb.shape[1:-2]) + (ca.shape[-2], cb.shape[-1])
    if k == 0 or 0 in out_shape:
        return np.zeros((1,) + out_shape), 1, 0, out_shape, "product"
    fa, fb = _FixedPoint(ca), _FixedPoint(cb, axis=-2)
    lowa, topa = fa.low, fa.top
    lowb, topb = fb.low, fb.top
    # Slice widths: |Sa|, |Sb| ≤ 2^(w−1) (``_slices``), so a dot product of k of their
    # products and every partial sum stay within k·2^(2w−2) — exact in any summation order,
    # blocking or thread split of the BLAS — and the at most min(sa, sb) products added into
    # one limb (one weight 2^((p+q)w)) within 2^52, which leaves the carries room.
    base = 54 - (k - 1).bit_length()
    w = base // 2
    for _ in range(3):                       # the limb sum depends on the slice counts
        sa, sb = _slice_count(fa, w), _slice_count(fb, w)
        w_next = (base - (min(sa, sb) - 1).bit_length()) // 2
        if w_next == w:
            break
        w = w_next
    sa, sb = _slice_count(fa, w), _slice_count(fb, w)
    if (base - (min(sa, sb) - 1).bit_length()) // 2 < w:       # not settled: the safe width
        w -= 1
        sa, sb = _slice_count(fa, w), _slice_count(fb, w)
    diagonals = sa + sb - 1
    first = 0 if prec is None else _first_diagonal(
        ca[0], cb[0], (lowa, topa), (lowb, topb), w, diagonals, prec)
    # The slices written straight into the stacked layouts of ``_diagonal_products``: A's side
    # by side along k, (..., m, sa·k); B's on top of each other in reverse order, (..., sb·k, n).
    batch_a, batch_b = ca.shape[1:-2], cb.shape[1:-2]
    m, n = out_shape[-2:]
    wide = np.empty(batch_a + (m, sa, k))
    tall = np.empty(batch_b + (sb, k, n))
    # Slice p of A times 2^(p·w), slice q of B times 2^((q − first)·w): the diagonal d = p + q
    # then comes out of the BLAS as its limb times 2^((d − first)·w) (powers of two: the sums
    # stay exact), which saves the carries a pass (``_scaled_limb_terms``). Only where every
    # scaled value stays finite and normal (scaled B slices are integers times 2^(−first·w)).
    scaled = _PRESCALE and (sa + sb + 1) * w + k.bit_length() + _DOUBLE_BITS < 1020 and first * w < 900
    _slices(fa, w, sa, out=np.moveaxis(wide, -2, 0), offset=0 if scaled else None)
    _slices(fb, w, sb, out=np.moveaxis(tall, -3, 0)[::-1], offset=first if scaled else None)
    rows = diagonals - first + _CARRY_ROWS
    limbs = np.empty((rows,) + out_shape)
    limbs[diagonals - first:] = 0.0                               # the carry rows
    _diagonal_products(wide.reshape(batch_a + (m, sa * k)), tall.reshape(batch_b + (sb * k, n)),
                       sa, sb, limbs, first)
    exponent = np.broadcast_to(lowa[..., :, None] + lowb[..., None, :] + first * w, out_shape)
    return limbs, w, exponent, out_shape, "scaled product" if scaled else "product"


# Where a product's magnitudes scaled to their groups' lowest bits stay below 2^this, the bound
# of ``_first_diagonal`` is formed on them in one pass (else scaled to the group tops).
_UNIT_SCALED_LIMIT = 1000
# Below this, a float64 lower bound of Σ|a||b| (scaled to the group tops) is not trusted: its
# own underflow could then matter.
_TRUSTED_MAGNITUDE = 2.0 ** -900


def _first_diagonal(a0, b0, groups_a, groups_b, w, diagonals, prec):
    """The lowest diagonal of slice products that must be computed: every diagonal d below it
    is left out, and their sum is below 2^−(prec+2) · (|A| @ |B|) in every element.

    The bound. Slices are within 2^(w−1), so a limb (at most ``diagonals`` slice products of
    k terms) is within k·diagonals·2^(2w−2), and the limbs below d0 sum to at most
    k·diagonals·2^((d0+1)w − 2)/(1 − 2^−w) in units of 2^(low_a + low_b). Against
    it stands a lower bound of (|A| @ |B|)_ij: the float64 product of the leading components,
    each scaled by 2^−top of its group (so in [0, 1): no overflow), is within (1 − 2^−30) of
    the exact one where it is at least 2^−900 (every lost underflow ≤ 2^−1074), and every
    operand is a float or a result, whose leading component is within 2^−40 of its value
    (dominance). So d0 ≤ ⌊(span_a + span_b + log₂ L − 1 − prec − c)/w⌋ − 1 with
    c = ⌈log₂(k·diagonals)⌉ + 1 holds element (i, j); the smallest over the elements is
    taken. Where the scaled bound L is untrusted (below 2^−900), nothing is left out unless no
    term of that element is nonzero (then every slice product is zero there)."""
    (low_a, top_a), (low_b, top_b) = groups_a, groups_b
    k = a0.shape[-1]
    c = (k * diagonals - 1).bit_length() + 1
    # L < 2k at most: where even that leaves nothing out, the magnitudes need not be formed.
    widest = int(np.max(top_a - low_a)) + int(np.max(top_b - low_b)) if a0.size and b0.size else 0
    if (widest + k.bit_length() + 1 - 1 - prec - c) // w - 1 <= 0:
        return 0
    if widest + k.bit_length() + 2 < _UNIT_SCALED_LIMIT:
        # The same bound in one pass: scaled by 2^−low instead of 2^−top, every nonzero product
        # of magnitudes is at least 1 (no underflow, nothing untrusted; zero where no term is
        # nonzero) and the sum below 2^(widest + log₂k + 1) (no overflow), and the scaled sum
        # is L_ij · 2^(span_a,i + span_b,j) exactly: the element with the smallest allowed d0 is
        # the one with the smallest scaled sum (⌊·⌋ is monotone).
        unit_a = _scaled(np.abs(a0), -low_a[..., :, None])
        unit_b = _scaled(np.abs(b0), -low_b[..., None, :])
        scaled = np.matmul(unit_a, unit_b)                           # (..., m, n)
        positive = scaled[scaled > 0]
        if not positive.size:
            return 0
        exponent = int(np.frexp(np.min(positive))[1])                # ≥ 2^(exponent−1)
        return min(max((exponent - 1 - prec - c) // w - 1, 0), diagonals)
    with np.errstate(under="ignore"):
        scaled_a = _scaled(np.abs(a0), -top_a[..., :, None])
        scaled_b = _scaled(np.abs(b0), -top_b[..., None, :])
        magnitude = np.matmul(scaled_a, scaled_b)                  # (..., m, n), < k
    trusted = magnitude >= _TRUSTED_MAGNITUDE
    if not np.all(trusted):
        overlap = np.matmul((scaled_a != 0).astype(np.float64), (scaled_b != 0).astype(np.float64))
        if np.any(overlap[~np.broadcast_to(trusted, overlap.shape)] != 0):
            return 0
        if not np.any(trusted):
            return 0
    exponent = np.frexp(magnitude)[1].astype(np.int64)            # magnitude ≥ 2^(exponent−1)
    spans = (top_a - low_a)[..., :, None] + (top_b - low_b)[..., None, :]
    allowed = np.floor_divide(spans + exponent - 1 - prec - c, w) - 1
    d0 = int(np.min(np.where(trusted, allowed, diagonals)))
    return min(max(d0, 0), diagonals)


def _diagonal_products(wide, tall, sa, sb, limbs, first=0):
    """limbs[d − first] = Σ_{p+q=d} A[p] @ B[q] for the diagonals d ≥ ``first`` (slice pair
    (p, q) weighs 2^((p+q)w)), each diagonal one GEMM written straight into its limb: A's
    slices side by side along the contraction axis (``wide``: [A_0 A_1 … A_{sa−1}]) times B's
    stacked in reverse order (``tall``: [B_{sb−1}; …; B_0]) is the diagonal's sum, so the
    BLAS adds the products of one weight itself (exact: the width leaves room for min(sa, sb)
    of them) and no array of every slice product is formed."""
    k = wide.shape[-1] // sa
    for d in range(first, sa + sb - 1):
        p_lo, p_hi = max(0, d - sb + 1), min(d, sa - 1)
        r_lo = sb - 1 - d + p_lo                                    # B_{d−p_lo} in ``tall``
        count = p_hi - p_lo + 1
        np.matmul(wide[..., p_lo * k:(p_hi + 1) * k], tall[..., r_lo * k:(r_lo + count) * k, :],
                  out=limbs[d - first])


def _sum_limbs(c):
    """(limbs, width, exponent, shape) of the exact sum over the last axis of components
    c (m, *G, n) (``_limb_terms``)."""
    m, n = c.shape[0], c.shape[-1]
    shape = c.shape[1:-1]
    if n == 0:
        return np.zeros((1,) + shape), 1, 0, shape
    fixed = _FixedPoint(c)
    low = fixed.low
    # n slices of at most m·2^(w−1) each: every partial sum within n·m·2^(w−1) ≤ 2^52.
    width = 53 - (n - 1).bit_length() - (m - 1).bit_length()
    count = _slice_count(fixed, width, carried=False)
    limbs = np.empty((count + _CARRY_ROWS,) + shape)
    limbs[count:] = 0.0
    limbs[:count] = np.sum(_slices(fixed, width, count, carried=False), axis=-1)   # exact
    return limbs, width, low, shape
