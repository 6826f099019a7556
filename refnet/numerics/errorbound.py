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

The probabilistic scale σ (``s2`` = σ², in the extended ``S2_DTYPE``). The first-order error of a
result is a linear combination Σᵢ cᵢδᵢ of the rounding errors δᵢ of every operation before it
(|δᵢ| ≤ rᵢ, rᵢ the ``r(v)`` or k_f ulps above), cᵢ the result's sensitivity to δᵢ. If the δᵢ are
independent with mean 0 (Higham & Mary 2019), Hoeffding's inequality gives P(|Σ cᵢδᵢ| > λσ) ≤
2 exp(−λ²/2) with σ² = Σᵢ cᵢ² rᵢ² — whatever the cᵢ, provided σ² *is* that sum. The verifier's
λσ (``LAMBDA``) rests on nothing else. An operation's own rounding is a new δ, independent of all
before it, and adds r² (quadrature); the propagated part needs each δᵢ's total sensitivity cᵢ,
the *sum* over every path by which δᵢ reaches the result.

- Independent elements (the default). Each array carries σ² per element only, and a
  contraction treats its operand's elements as independent: A @ B adds σ_A² B² + A² σ_B², i.e.
  Σ over paths of (path coefficient)² where Hoeffding needs (Σ over paths)². Exact where each δ
  reaches an element by one path; where it arrives by several, the cross terms are dropped. In a
  feed-forward net the paths of one δ run through different weight matrices with independent
  random signs, so the cross terms average out (measured errors 0.2–1.0σ, spec/verification.md).
- Correlated errors (``cov``): through a recurrence they do not. ∂L/∂h_t = (∂h_(t+k)/∂h_t)ᵀ
  ∂L/∂h_(t+k) applies the same W_hh k times, and the paths of one δ through Wᵀ…Wᵀ add
  coherently (closed walks W_ab W_ba… are products of the same entries): the independent rule
  propagates σ² with the products of the squared Jacobians (D W∘W)^k where the truth has the
  squares of the product ((D W)^k)∘((D W)^k), and the error exceeded 8σ by 8–12 % in 3 of the
  200 models of ``refnet study --recurrent`` (spec/study.md). So a recurrent layer's per-step
  values (h_t, c_t, ∂L/∂h_t, ∂L/∂c_t, the gate gradients: ``store_step``, called by
  ``layers.recurrent.at_step``) carry, from the first step on, the full covariance of their
  errors along the feature axis, row by row: ``cov`` (N, D, D), diagonal = s2. Every
  operation propagates it exactly to first order — elementwise f: Cov ← (c cᵀ) ∘ Cov, c = f′;
  A @ B: Cov ← Bᵀ Cov(A) B (the contraction sees its operand's correlation); a selection
  (``where``, max, min, the gate concatenation) keeps it between elements taken from one operand;
  a row sum: 1ᵀ Cov 1 — and then puts s2 (its own new, independent rounding included) on the
  diagonal. Along one row of a recurrence this is σ² = Σᵢ cᵢ² rᵢ² exactly, for every δ of the
  chain: the Hoeffding scale itself, not an estimate of it (tests/test_recurrent_sigma.py checks
  it against the explicit propagation J C Jᵀ).

What stays assumed independent, and why: (1) the rows (the batch: each row's recurrence runs on
its own, with exact weights); (2) two different arrays meeting in one operation (in a tanh RNN
the backward chain ∂L/∂h_t and the forward chain's tanh′(a_t); an LSTM's h and c paths; a GRU's
z ⊙ ∂L/∂h_t beside W_hhᵀ ∂L/∂v_t): their own correlations are carried, their cross-covariance is
taken as 0; (3) anything that leaves the (N, D) layout of one step: a transpose, a reshape, the
stacking of the steps, a contraction over rows (∂L/∂W = Σ_(n,t) δ_t x_tᵀ, ∂L/∂x_t = W_ihᵀ δ_t
after stacking): there ``cov`` is given up and the diagonal s2 continues under the independent
rule (a different matrix meets the errors, as in a feed-forward net). Measured (spec/study.md):
all 200 spot checks of the recurrent full grid pass; each model's worst element lies at
0.06–1.9σ for rnn-tanh, rnn-relu and gru (0.16–8.9σ under the independent rule), at up to 5.1σ
for the lstm at T = 200 — unchanged, the cross-covariance (2) of its h and c paths, which grows
with T. On non-recurrent nets nothing is tracked: the bound is bit for bit the independent
rule's. Cost: the bound pass of a recurrent net runs 2.4–3× longer (an (N, D, D) matrix per
per-step value); of any other net, as before.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .backend import FLOAT64, Constant, float_constant_and_error

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

    def __init__(self, v, e=None, s2=None, cov=None):
        self.v = np.asarray(v, dtype=np.float64)
        self.e = np.zeros_like(self.v) if e is None else np.asarray(e, dtype=np.float64)
        if e is not None and np.isnan(self.e).any():
            # inf·0 in a propagation formula (an unbounded operand times an exact zero): NaN
            # would poison min(e, λσ) downstream; "no rigorous bound" is inf.
            self.e = np.where(np.isnan(self.e), np.inf, self.e)
        self.s2 = (np.zeros(self.v.shape, dtype=S2_DTYPE) if s2 is None
                   else np.asarray(s2, dtype=S2_DTYPE))
        # The error covariance along the last axis, row by row (module docstring, "Correlated
        # errors"): None (the elements' errors are modelled as independent), or, for a 2-D
        # array (N, D), an (N, D, D) array whose diagonal is s2.
        self.cov = None
        if cov is not None:
            _set_cov(self, cov, copy=True)

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
        out = self._view(lambda a: a[idx])
        if self.cov is not None:
            # Rows and columns picked by slices or index arrays keep their covariance; any other
            # index (an integer, an ellipsis, a mask) gives up the correlation (s2 stays whole).
            rows, cols = (idx + (slice(None),))[:2] if isinstance(idx, tuple) else (idx, slice(None))
            if (isinstance(idx, tuple) and len(idx) <= 2 and out.v.ndim == 2
                    and all(isinstance(i, slice) or (isinstance(i, np.ndarray) and i.ndim == 1
                                                     and i.dtype.kind in "iu")
                            for i in (rows, cols))):
                _set_cov(out, self.cov[rows][:, cols][:, :, cols], copy=True)
        return out

    def reshape(self, *shape):
        out = self._view(lambda a: a.reshape(*shape))
        if self.cov is not None and out.v.shape == self.v.shape:
            out.cov = self.cov
        return out

    def take(self, indices, axis=None):
        out = self._view(lambda a: a.take(indices, axis=axis))
        if self.cov is not None and out.v.ndim == 2 and axis in (0, 1, -1, -2):
            if axis in (0, -2):
                _set_cov(out, self.cov.take(indices, axis=0))
            else:
                _set_cov(out, self.cov.take(indices, axis=1).take(indices, axis=2))
        return out

    def transpose(self, *axes):
        return self._view(lambda a: a.transpose(*axes))

    # arithmetic ------------------------------------------------------------------------------
    @_quiet
    def __add__(self, other):
        a, b = self, _wrap(other)
        v = a.v + b.v
        r = _half_ulp(v)
        return _linear(BoundArray(v, a.e + b.e + r, a.s2 + b.s2 + _sq(r)), (a, 1.0), (b, 1.0))

    __radd__ = __add__

    @_quiet
    def __sub__(self, other):
        a, b = self, _wrap(other)
        v = a.v - b.v
        r = _half_ulp(v)
        return _linear(BoundArray(v, a.e + b.e + r, a.s2 + b.s2 + _sq(r)), (a, 1.0), (b, -1.0))

    def __rsub__(self, other):
        return _wrap(other) - self

    @_quiet
    def __mul__(self, other):
        a, b = self, _wrap(other)
        v = a.v * b.v
        r = _half_ulp(v)
        out = BoundArray(v, np.abs(a.v) * b.e + np.abs(b.v) * a.e + a.e * b.e + r,
                         _sq(b.v) * a.s2 + _sq(a.v) * b.s2 + _sq(r))
        return _linear(out, (a, b.v), (b, a.v))

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
            slope_a, slope_b = 1.0 / b.v, -v / b.v
        r = _half_ulp(v)
        return _linear(BoundArray(v, prop + r, s2 + _sq(r)), (a, slope_a), (b, slope_b))

    def __rtruediv__(self, other):
        return _wrap(other) / self

    def __neg__(self):
        out = BoundArray(-self.v, self.e, self.s2)
        out.cov = self.cov                  # the same errors, negated: the same covariance
        return out

    def __pos__(self):
        return self

    def __abs__(self):
        out = BoundArray(np.abs(self.v), self.e, self.s2)
        return _linear(out, (self, np.where(self.v < 0, -1.0, 1.0)))

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


def _set_cov(out: BoundArray, cov, copy=False):
    """``out.cov = cov`` with its diagonal replaced by ``out.s2`` (which holds, beside the
    propagated variances, the operation's own rounding and every independent term); dropped
    (None) unless ``out`` is 2-D with the right shape and every entry is finite (one sum tells:
    inf and NaN survive it, and |entries| ≤ 1e617 cannot overflow the extended type). ``copy``:
    ``cov`` may be shared (a view), so the diagonal is written into a copy."""
    cov = np.asarray(cov, dtype=S2_DTYPE)
    if out.v.ndim != 2 or cov.shape != out.v.shape + out.v.shape[-1:] \
            or not np.isfinite(np.sum(cov)) or not np.isfinite(np.sum(out.s2)):
        out.cov = None
        return out
    if copy:
        cov = cov.copy()
    d = np.arange(out.v.shape[-1])
    cov[:, d, d] = out.s2
    out.cov = cov
    return out


def _diag(s2, shape):
    """The covariance of independent errors of variances ``s2`` (broadcast to ``shape``)."""
    s2 = np.broadcast_to(np.asarray(s2, dtype=S2_DTYPE), shape)
    cov = np.zeros(shape + shape[-1:], dtype=S2_DTYPE)
    d = np.arange(shape[-1])
    cov[:, d, d] = s2
    return cov


def _linear(out: BoundArray, *terms):
    """``out`` with its covariance, where an operand has one. ``terms``: (operand, c) with the
    propagated error of ``out`` = Σ c·err(operand), elementwise (c the operation's derivative
    in that operand, broadcast to ``out``). The operands' errors are independent of each other
    (the model's assumption for distinct arrays); each one's own correlation is carried:
    Cov(out) = Σ (c cᵀ) ∘ Cov(operand), off the diagonal; on it, ``out.s2``."""
    tracked = [(x, c) for x, c in terms if x.cov is not None and x.v.shape == out.v.shape]
    if not tracked:
        return out
    cov = 0
    for x, c in tracked:
        c = np.broadcast_to(np.asarray(c, dtype=S2_DTYPE), out.v.shape)
        cov = cov + c[:, :, None] * c[:, None, :] * x.cov
    return _set_cov(out, cov)


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
        return _linear(BoundArray(v, bound + r, s2 + _sq(r)), (x, slope))

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
            slope = 0.5 / v
        r = _half_ulp(v)
        return _linear(BoundArray(v, bound + r, s2 + _sq(r)), (x, slope))

    def abs(self, x):
        return abs(_wrap(x))

    def _select(self, cond, a, b):
        out = BoundArray(np.where(cond, a.v, b.v), np.where(cond, a.e, b.e),
                         np.where(cond, a.s2, b.s2))
        if (a.cov is not None or b.cov is not None) and out.v.ndim == 2:
            # An element's error is that of the operand it came from; two elements from the same
            # operand keep their covariance, two from different operands have none.
            shape = out.v.shape
            pick = lambda x: x.cov if x.cov is not None and x.v.shape == shape \
                else _diag(x.s2, shape)                                       # noqa: E731
            c = np.broadcast_to(np.asarray(cond, dtype=bool), shape)
            both_a, both_b = c[:, :, None] & c[:, None, :], ~c[:, :, None] & ~c[:, None, :]
            _set_cov(out, np.where(both_a, pick(a), np.where(both_b, pick(b), 0)))
        return out

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
        # The propagated error of A: its covariance along the contracted axis, Bᵀ Cov(A) B, where
        # A carries one; otherwise its elements as independent, σ_A² B².
        cov = None
        if a.cov is not None and a.v.ndim == 2 and b.v.ndim == 2:
            bl = np.asarray(b.v, dtype=S2_DTYPE)
            cov = np.matmul(np.matmul(bl.T, a.cov), bl)
            from_a = np.diagonal(cov, axis1=1, axis2=2)
        else:
            from_a = a.s2 @ _sq(b.v)
        # n roundings of partial sums, each at most u·(|A||B|) in size.
        s2 = _sq(a.v) @ b.s2 + from_a + a.s2 @ b.s2 + n * _sq(magnitude, U)
        out = BoundArray(v, e, s2 + _sq(r))
        return out if cov is None else _set_cov(out, cov)

    @_quiet
    def sum(self, a, axis=None, keepdims=False):
        a = _wrap(a)
        v = FLOAT64.sum(a.v, axis=axis, keepdims=keepdims)     # float64's value, bit for bit
        n = a.v.size if axis is None else int(np.prod([a.v.shape[i] for i in np.atleast_1d(axis)]))
        magnitude = np.sum(np.abs(a.v), axis=axis, keepdims=keepdims)
        e = np.sum(a.e, axis=axis, keepdims=keepdims) + _gamma(max(n - 1, 0)) * magnitude + n * ETA
        axes = range(a.v.ndim) if axis is None else [i % a.v.ndim for i in np.atleast_1d(axis)]
        if a.cov is not None and a.v.ndim - 1 in axes:
            # A row's sum: its errors' variance is 1ᵀ Cov 1 (its correlation counted); the rows
            # are independent.
            row = np.maximum(np.sum(a.cov, axis=(1, 2)), 0)[:, None]
            propagated = np.sum(row, axis=axis, keepdims=keepdims)
        else:
            propagated = np.sum(a.s2, axis=axis, keepdims=keepdims)
        s2 = propagated + max(n - 1, 0) * _sq(magnitude, U)
        return BoundArray(v, e, s2)

    def sum_product(self, a, b, axis):
        """Σ a·b with the float backend's value (``NumpyBackend.sum_product``: one pass, its
        own order, products perhaps fused) and the bound of the sum of the rounded products,
        which holds for any order of the additions, fused or not — so that the values stay
        float64's bit for bit."""
        a, b = _wrap(a), _wrap(b)
        out = self.sum(a * b, axis=axis)
        out.v = FLOAT64.sum_product(a.v, b.v, axis)
        return out

    def store_step(self, a, kind, layer, t):
        """A recurrent layer's per-step value (``layers.recurrent.at_step``): from here on its
        errors carry their covariance along the feature axis (module docstring, "Correlated
        errors"); the value and both bounds are unchanged."""
        if isinstance(a, BoundArray) and a.v.ndim == 2 and a.cov is None:
            return BoundArray(a.v, a.e, a.s2, cov=_diag(a.s2, a.v.shape))
        return a

    def argmax(self, a, axis):
        return np.argmax(_wrap(a).v, axis=axis)

    def max(self, a, axis=None, keepdims=False):
        a = _wrap(a)
        return BoundArray(np.max(a.v, axis=axis, keepdims=keepdims),
                          np.max(a.e, axis=axis, keepdims=keepdims),
                          np.max(a.s2, axis=axis, keepdims=keepdims))


BOUND = BoundBackend()
