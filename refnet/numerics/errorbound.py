"""float64 with a running error bound: how far can a float64 gradient be from the exact one?

``BoundArray`` holds the float64 value ``v`` that the plain float64 backend computes (bit for bit:
every value goes through the same numpy call) and a bound ``e >= 0`` such that the exact result of
the same formula on the same (exact) inputs lies in ``[v - e, v + e]``. This is Wilkinson's running
error analysis, done elementwise; it is what "ulps scaled by a condition estimate" means in refnet:
the bound is large exactly where the computation is ill-conditioned (cancellation in a sum, a
saturated unit, a long chain of products) and small where it is not.

Rules (a-hat = computed, a = exact, ``ea``/``eb`` the operands' bounds, ``r(v)`` the rounding
error of the result, half an ulp for correctly rounded operations)::

    a ± b        ea + eb                               + r(v)
    a * b        |a|eb + |b|ea + ea eb                 + r(v)
    a / b        (ea + |v| eb) / (|b| - eb)            + r(v)        (inf if |b| <= eb)
    exp, expm1   exp(a) expm1(ea)                      + k_f ulp(v)
    log, log1p   -log1p(-ea / x)      (x = a or 1 + a) + k_f ulp(v)  (inf if x <= ea)
    tanh         sech²(max(|a| - ea, 0)) ea            + k_f ulp(v)
    erf, erfc    2/√π exp(-max(|a| - ea, 0)²) ea        + k_f ulp(v)
    sqrt         min(ea / v, √ea)                      + r(v)
    max, min     max(ea, eb)                           (exact)
    A @ B        |A|eB + eA|B| + eA eB + γ_n |A||B|    + n η          γ_n = n u / (1 - n u)
    sum of n     Σ e + γ_(n-1) Σ|a|                    + n η

Each is a true bound on the propagated error (derivative bounded on the whole interval, not
first order only), plus the error of the operation itself. ``u = 2**-53``; ``η = 2**-1074`` covers
underflow. ``k_f`` is the accuracy of numpy's / the C library's implementation of ``f``, in ulps:
measured maxima here (x86-64, numpy 2.4, glibc) were exp 0.50, expm1 0.73, log 0.51, log1p 0.75,
tanh 1.03, erf 0.65, erfc 2.42; the table below allows 2 (4 for tanh, whose SIMD versions in numpy
are specified to 4 ulp, and 6 for erfc, glibc's documented worst case being 5).

The bound ignores the rounding of the bound computation itself (relative 1e-16 of the bound).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .backend import Constant, float_constant_and_error

U = 2.0**-53          # unit roundoff of float64
ETA = 2.0**-1074      # the smallest subnormal: more than an underflow can lose (half of it)
UNDERFLOW_FLOOR = 4 * ETA
LAMBDA = 8.0          # probabilistic bound: P(|err| > λσ) ≤ 2 exp(−λ²/2) ≈ 2.5e-14

# σ² is a sum of squares of errors down to 1e-323 and up to 1e308: it lives in numpy's longdouble,
# whose x86-64 80-bit format spans 1e±4932. Where longdouble is only a double (some platforms),
# squares under 1e-300 or over 1e300 would underflow or overflow; σ is then trusted only in
# between, and the rigorous bound is used outside (see ``BoundArray.probabilistic_bound``).
S2_DTYPE = np.longdouble
S2_EXTENDED = np.finfo(S2_DTYPE).minexp < -10000


def _sq(x, scale=1.0):
    """x², computed in the extended type (no underflow of squares of tiny errors)."""
    return np.square(np.asarray(x, dtype=S2_DTYPE) * scale)

# Accuracy of the elementwise functions, in ulps of the result (see the module docstring).
FUNCTION_ULPS = {"exp": 2.0, "expm1": 2.0, "log": 2.0, "log1p": 2.0, "tanh": 4.0,
                 "erf": 2.0, "erfc": 6.0}

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi) * (1 + 4 * U)   # rounded up
_erf = np.vectorize(math.erf, otypes=[np.float64])
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def _quiet(method):
    """Bound arithmetic may underflow (tiny bounds) or overflow (a bound of inf means "none"):
    neither is an error, so numpy stays silent inside the bound backend."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with np.errstate(under="ignore", over="ignore", invalid="ignore", divide="ignore"):
            return method(*args, **kwargs)
    return wrapper


def _half_ulp(v):
    """Rounding error of a correctly rounded result v: half an ulp, but never less than
    ``UNDERFLOW_FLOOR``. Below the normal range the bound's own products underflow too (a term
    |a|·eb under 2**-1074 rounds to 0), so every operation adds this floor for up to four lost
    terms; it matters only for results within a few subnormal steps of zero."""
    with np.errstate(invalid="ignore", under="ignore"):
        return np.maximum(0.5 * np.spacing(np.abs(v)), UNDERFLOW_FLOOR)


def _ulps(v, k):
    with np.errstate(invalid="ignore", under="ignore"):
        return np.maximum(k * np.spacing(np.abs(v)), UNDERFLOW_FLOOR)


def _gamma(n):
    """Higham's gamma_n = n u / (1 - n u): bound on the relative error of an n-term sum."""
    return n * U / (1 - n * U)


class BoundArray:
    """A float64 array ``v`` with an elementwise bound ``e`` on its distance to the exact value."""

    __array_ufunc__ = None      # numpy defers to our reflected operators (ndarray * BoundArray)

    def __init__(self, v, e=None, s2=None):
        self.v = np.asarray(v, dtype=np.float64)
        self.e = np.zeros_like(self.v) if e is None else np.asarray(e, dtype=np.float64)
        if e is not None and np.isnan(self.e).any():
            # inf·0 in a propagation formula (an unbounded operand times an exact zero): NaN
            # would poison min(e, λσ) downstream; "no rigorous bound" is inf.
            self.e = np.where(np.isnan(self.e), np.inf, self.e)
        self.s2 = (np.zeros(self.v.shape, dtype=S2_DTYPE) if s2 is None
                   else np.asarray(s2, dtype=S2_DTYPE))

    @property
    def sigma(self):
        """The probabilistic error scale √s2 (see the module docstring), as float64."""
        return np.sqrt(self.s2).astype(np.float64)

    def probabilistic_bound(self, lam):
        """λσ where σ can be trusted, inf elsewhere (only without an extended longdouble)."""
        sigma = self.sigma
        if S2_EXTENDED:
            return lam * sigma
        return np.where((sigma > 1e-140) & (sigma < 1e140), lam * sigma, np.inf)

    def _view(self, f):
        return BoundArray(f(self.v), f(self.e), f(self.s2))

    # array protocol used by the layers ----------------------------------------------------
    shape = property(lambda self: self.v.shape)
    ndim = property(lambda self: self.v.ndim)
    size = property(lambda self: self.v.size)
    T = property(lambda self: self._view(lambda a: a.T))

    def __len__(self):
        return len(self.v)

    def __repr__(self):
        return f"BoundArray(v={self.v!r}, e={self.e!r})"

    def __getitem__(self, idx):
        return self._view(lambda a: a[idx])

    def reshape(self, *shape):
        return self._view(lambda a: a.reshape(*shape))

    def take(self, indices, axis=None):
        return self._view(lambda a: a.take(indices, axis=axis))

    def transpose(self, *axes):
        return self._view(lambda a: a.transpose(*axes))

    # arithmetic ------------------------------------------------------------------------------
    @_quiet
    def __add__(self, other):
        a, b = self, _wrap(other)
        v = a.v + b.v
        r = _half_ulp(v)
        return BoundArray(v, a.e + b.e + r, a.s2 + b.s2 + _sq(r))

    __radd__ = __add__

    @_quiet
    def __sub__(self, other):
        a, b = self, _wrap(other)
        v = a.v - b.v
        r = _half_ulp(v)
        return BoundArray(v, a.e + b.e + r, a.s2 + b.s2 + _sq(r))

    def __rsub__(self, other):
        return _wrap(other) - self

    @_quiet
    def __mul__(self, other):
        a, b = self, _wrap(other)
        v = a.v * b.v
        r = _half_ulp(v)
        return BoundArray(v, np.abs(a.v) * b.e + np.abs(b.v) * a.e + a.e * b.e + r,
                          _sq(b.v) * a.s2 + _sq(a.v) * b.s2 + _sq(r))

    __rmul__ = __mul__

    @_quiet
    def __truediv__(self, other):
        a, b = self, _wrap(other)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = a.v / b.v
            margin = np.abs(b.v) - b.e
            prop = np.where(margin > 0, (a.e + np.abs(v) * b.e) / np.where(margin > 0, margin, 1),
                            np.inf)
            s2 = (a.s2 + _sq(v) * b.s2) / _sq(b.v)
        r = _half_ulp(v)
        return BoundArray(v, prop + r, s2 + _sq(r))

    def __rtruediv__(self, other):
        return _wrap(other) / self

    def __neg__(self):
        return BoundArray(-self.v, self.e, self.s2)

    def __pos__(self):
        return self

    def __abs__(self):
        return BoundArray(np.abs(self.v), self.e, self.s2)

    # comparisons give plain booleans from the computed values -----------------------------
    def __gt__(self, other):
        return self.v > _value(other)

    def __ge__(self, other):
        return self.v >= _value(other)

    def __lt__(self, other):
        return self.v < _value(other)

    def __le__(self, other):
        return self.v <= _value(other)

    def __eq__(self, other):
        return self.v == _value(other)

    def __ne__(self, other):
        return self.v != _value(other)

    __hash__ = None


def _wrap(x) -> BoundArray:
    """Plain numbers and arrays entering the computation are exact (bound 0)."""
    return x if isinstance(x, BoundArray) else BoundArray(x)


def _value(x):
    return x.v if isinstance(x, BoundArray) else x


def _interval_abs_min(a: BoundArray):
    """The smallest |x| over the interval [a - e, a + e]."""
    return np.maximum(np.abs(a.v) - a.e, 0.0)


class BoundBackend:
    """The float64 backend, every result carrying its rigorous bound ``e`` and scale ``s2``."""

    name = "float64+bound"
    dtype = np.dtype(np.float64)

    def __repr__(self):
        return "<refnet backend float64 with running error bounds>"

    def asarray(self, a):
        if isinstance(a, BoundArray):
            return a
        return BoundArray(np.asarray(a, dtype=np.float64))

    def to_numpy(self, a):
        return _wrap(a).v

    @_quiet
    def const(self, value: Constant):
        """The float64 constant, with its exact representation error as its bound."""
        v, error = float_constant_and_error(value)
        r = error * (1 + 4 * U)                     # rounded up: a bound, not an estimate
        return BoundArray(v, r, _sq(r))

    def zeros(self, shape):
        return BoundArray(np.zeros(shape))

    # elementwise ------------------------------------------------------------------------------
    @staticmethod
    @_quiet
    def _function(x, v, bound, slope, name):
        """Result of an elementwise f: propagated bound + own error; s2 through f'(x)²."""
        r = _ulps(v, FUNCTION_ULPS[name])
        with np.errstate(over="ignore", invalid="ignore"):
            s2 = _sq(slope) * x.s2
        return BoundArray(v, bound + r, s2 + _sq(r))

    @_quiet
    def exp(self, x):
        x = _wrap(x)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            v = np.exp(x.v)
            return self._function(x, v, v * np.expm1(x.e), v, "exp")

    @_quiet
    def expm1(self, x):
        x = _wrap(x)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            v = np.expm1(x.v)
            slope = np.exp(x.v)
            return self._function(x, v, slope * np.expm1(x.e), slope, "expm1")

    @_quiet
    def _log_like(self, x, v, arg, name):
        with np.errstate(divide="ignore", invalid="ignore"):
            ok = arg > x.e
            bound = np.where(ok, -np.log1p(-np.where(ok, x.e / np.where(ok, arg, 1), 0)), np.inf)
            return self._function(x, v, bound, 1.0 / arg, name)

    @_quiet
    def log(self, x):
        x = _wrap(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.log(x.v)
        return self._log_like(x, v, x.v, "log")

    @_quiet
    def log1p(self, x):
        x = _wrap(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.log1p(x.v)
        return self._log_like(x, v, 1.0 + x.v, "log1p")

    @_quiet
    def tanh(self, x):
        x = _wrap(x)
        v = np.tanh(x.v)
        m = _interval_abs_min(x)
        sech2 = 1.0 / np.cosh(np.minimum(m, 355.0)) ** 2      # ≥ the max of sech² on the interval
        return self._function(x, v, sech2 * x.e, 1.0 - v * v, "tanh")

    @_quiet
    def _erf_like(self, x, v, name):
        with np.errstate(under="ignore", over="ignore"):
            top = _TWO_OVER_SQRT_PI * np.exp(-np.minimum(_interval_abs_min(x), 40.0) ** 2)
            slope = _TWO_OVER_SQRT_PI * np.exp(-np.minimum(np.abs(x.v), 40.0) ** 2)
        return self._function(x, v, top * x.e, slope, name)

    @_quiet
    def erf(self, x):
        x = _wrap(x)
        return self._erf_like(x, _erf(x.v), "erf")

    @_quiet
    def erfc(self, x):
        x = _wrap(x)
        return self._erf_like(x, _erfc(x.v), "erfc")

    @_quiet
    def sqrt(self, x):
        x = _wrap(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.sqrt(x.v)
            bound = np.minimum(np.where(v > 0, x.e / np.where(v > 0, v, 1), np.inf), np.sqrt(x.e))
            s2 = x.s2 / (4 * np.asarray(x.v, dtype=S2_DTYPE))
        r = _half_ulp(v)
        return BoundArray(v, bound + r, s2 + _sq(r))

    def abs(self, x):
        return abs(_wrap(x))

    def _select(self, cond, a, b):
        return BoundArray(np.where(cond, a.v, b.v), np.where(cond, a.e, b.e),
                          np.where(cond, a.s2, b.s2))

    def maximum(self, a, b):
        a, b = _wrap(a), _wrap(b)
        out = self._select(a.v >= b.v, a, b)
        out.v = np.maximum(a.v, b.v)                 # NaN propagation as numpy's
        out.e = np.maximum(a.e, b.e)                 # rigorous even when the branch is wrong
        return out

    def minimum(self, a, b):
        a, b = _wrap(a), _wrap(b)
        out = self._select(a.v <= b.v, a, b)
        out.v = np.minimum(a.v, b.v)
        out.e = np.maximum(a.e, b.e)
        return out

    def where(self, cond, a, b):
        return self._select(_value(cond), _wrap(a), _wrap(b))

    # reductions and products ------------------------------------------------------------------
    @_quiet
    def matmul(self, a, b):
        a, b = _wrap(a), _wrap(b)
        v = np.matmul(a.v, b.v)
        n = a.v.shape[-1]
        abs_a, abs_b = np.abs(a.v), np.abs(b.v)
        magnitude = abs_a @ abs_b
        r = _half_ulp(v)
        e = abs_a @ b.e + a.e @ abs_b + a.e @ b.e + _gamma(n) * magnitude + n * ETA + r
        # n roundings of partial sums, each at most u·(|A||B|) in size.
        s2 = _sq(a.v) @ b.s2 + a.s2 @ _sq(b.v) + a.s2 @ b.s2 + n * _sq(magnitude, U)
        return BoundArray(v, e, s2 + _sq(r))

    @_quiet
    def sum(self, a, axis=None, keepdims=False):
        a = _wrap(a)
        v = np.sum(a.v, axis=axis, keepdims=keepdims, dtype=np.float64)
        n = a.v.size if axis is None else int(np.prod([a.v.shape[i] for i in np.atleast_1d(axis)]))
        magnitude = np.sum(np.abs(a.v), axis=axis, keepdims=keepdims)
        e = np.sum(a.e, axis=axis, keepdims=keepdims) + _gamma(max(n - 1, 0)) * magnitude + n * ETA
        s2 = np.sum(a.s2, axis=axis, keepdims=keepdims) + max(n - 1, 0) * _sq(magnitude, U)
        return BoundArray(v, e, s2)

    def argmax(self, a, axis):
        return np.argmax(_wrap(a).v, axis=axis)

    def max(self, a, axis=None, keepdims=False):
        a = _wrap(a)
        return BoundArray(np.max(a.v, axis=axis, keepdims=keepdims),
                          np.max(a.e, axis=axis, keepdims=keepdims),
                          np.max(a.s2, axis=axis, keepdims=keepdims))


BOUND = BoundBackend()
