"""Numeric backends: the layer math is written once, against this small namespace.

A layer never calls ``numpy`` for arithmetic on its tensors; it calls ``bk.exp``, ``bk.matmul``,
``bk.sum``, ... and the Python operators ``+ - * /`` and comparisons, which every backend array
supports. The same layer code then runs

=================  =========================================================================
``float64``        numpy float64 arrays
``float32``        numpy float32 arrays (every constant and input cast to float32 first)
``mp``             numpy object arrays of ``mpf`` from a *private* ``mpmath.MPContext``; the
                   global ``mpmath.mp`` is never touched, so two backends of different
                   precision can live side by side
``float64+bound``  float64 values that carry a rigorous running error bound
                   (:mod:`refnet.numerics.errorbound`); the values are bit-for-bit those of ``float64``
=================  =========================================================================

Constants that are not exact binary numbers (1/sqrt(2), SELU's lambda) are asked for with
``bk.const(...)`` so that each backend gets them at its own precision: the mp backend computes
them to its working precision, float backends get the correctly rounded value.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
from fractions import Fraction
from typing import Callable, Union

import mpmath
import numpy as np
from mpmath.libmp import MPZ, from_float, from_int, from_man_exp, round_nearest

from .exactgemm import matmul_exact, sum_exact

Constant = Union[str, float, int, Callable[[mpmath.ctx_mp.MPContext], object]]

# Digits used to evaluate a callable constant before rounding it to a float format.
_CONST_DPS = 40


def _mp_context(dps: int) -> mpmath.ctx_mp.MPContext:
    """A private mpmath context: changing its precision never changes ``mpmath.mp``."""
    ctx = mpmath.MPContext()
    ctx.dps = dps
    return ctx


def constant_value(value: Constant, ctx: mpmath.ctx_mp.MPContext):
    """The constant as an mpf of ``ctx``: decimal strings are read exactly, callables evaluated."""
    if callable(value):
        return ctx.mpf(value(ctx))
    return ctx.mpf(value)


def float_constant(value: Constant) -> float:
    """The constant correctly rounded to float64."""
    return float_constant_and_error(value)[0]


def scalar_like(value, number):
    """``number`` (a Python int or float) converted to ``value``'s dtype where ``value`` is a
    numpy float scalar or array (the float backends' values); unchanged otherwise (mp, interval).

    Why: a float backend's loss is a 0-d value, and numpy < 2 promotes float32 scalar ⊗ Python
    number to float64 (value-based casting treats the Python number as float64 when every
    operand is a scalar), so a float32 run's loss came out float64; numpy >= 2 (NEP 50) converts
    the Python number to float32 and stays in float32. Converting first gives numpy 2's result
    under both (a count is exact in float32 below 2^24, as it is under numpy 2)."""
    if isinstance(value, (np.floating, np.ndarray)) and np.asarray(value).dtype.kind == "f":
        return np.asarray(value).dtype.type(number)
    return number


@functools.lru_cache(maxsize=None)
def float_constant_and_error(value: Constant):
    """(the constant rounded to float64, |rounded − exact| as a float). Cached: layers ask for
    their constants (1/√2, SELU's λ) on every pass, and each answer costs an mpmath evaluation."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), 0.0
    ctx = _mp_context(_CONST_DPS)
    exact = constant_value(value, ctx)
    rounded = float(exact)
    return rounded, float(abs(ctx.mpf(rounded) - exact))


class LayerScope:
    """Mixin for a backend that needs to know which layer it is computing (the hooks the
    containers call, ``layers.sequential.run_forward``/``run_backward``): ``self.layer`` is the
    innermost layer whose forward or backward is running, None outside every layer."""

    layer = None

    @contextlib.contextmanager
    def inside(self, layer):
        outer, self.layer = self.layer, layer
        try:
            yield
        finally:
            self.layer = outer

    def forward_layer(self, layer, params, x, state):
        with self.inside(layer):
            return layer.forward(self, params, x, state)

    def backward_layer(self, layer, params, dy, cache):
        with self.inside(layer):
            return layer.backward(self, params, dy, cache)


class NumpyBackend:
    """float64 or float32: numpy as it is. ``erf``/``erfc`` go through the C library (math)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise ValueError(f"NumpyBackend: dtype must be float64 or float32, got {self.dtype}")
        self.name = self.dtype.name
        self._erf = np.vectorize(math.erf, otypes=[np.float64])
        self._erfc = np.vectorize(math.erfc, otypes=[np.float64])

    def __repr__(self):
        return f"<refnet backend {self.name}>"

    # conversion -------------------------------------------------------------------------
    def asarray(self, a):
        return np.asarray(a, dtype=self.dtype)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a, dtype=np.float64)

    def const(self, value: Constant):
        return self.dtype.type(float_constant(value))

    def zeros(self, shape):
        return np.zeros(shape, dtype=self.dtype)

    # elementwise ------------------------------------------------------------------------
    # Overflow of exp to inf and underflow to 0 are the correctly rounded results, and the
    # layers are written so that an inf never reaches the output for finite input; the
    # warnings would only be noise.
    def exp(self, x):
        with np.errstate(over="ignore", under="ignore"):
            return np.exp(x)

    def expm1(self, x):
        with np.errstate(over="ignore"):
            return np.expm1(x)

    def log(self, x):
        return np.log(x)

    def log1p(self, x):
        return np.log1p(x)

    def tanh(self, x):
        return np.tanh(x)

    def sqrt(self, x):
        return np.sqrt(x)

    def erf(self, x):
        return self._erf(x).astype(self.dtype, copy=False)

    def erfc(self, x):
        return self._erfc(x).astype(self.dtype, copy=False)

    def abs(self, x):
        return np.abs(x)

    def maximum(self, a, b):
        # np.maximum propagates NaN like torch.relu (np.fmax would not).
        return np.maximum(a, b).astype(self.dtype, copy=False)

    def minimum(self, a, b):
        return np.minimum(a, b).astype(self.dtype, copy=False)

    def where(self, cond, a, b):
        picked = bitwise_where(cond, a, b, self.dtype)
        if picked is not None:
            return picked
        return np.where(cond, a, b).astype(self.dtype, copy=False)

    # reductions and products -------------------------------------------------------------
    def matmul(self, a, b):
        return np.matmul(a, b)

    def sum(self, a, axis=None, keepdims=False):
        # An explicit accumulator dtype: numpy's float16 sum would accumulate in float16.
        # np.add.reduce is what np.sum calls, without its Python wrapper (5 µs a call, and a
        # small network makes dozens of calls a step).
        if type(a) is np.ndarray:
            if a.size >= FUSED_MIN_SIZE and a.dtype == self.dtype and _strided(axis, a.ndim):
                return _einsum_sum(a, axis, keepdims)
            return np.add.reduce(a, axis=axis, dtype=self.dtype, keepdims=keepdims)
        return np.sum(a, axis=axis, keepdims=keepdims, dtype=self.dtype)

    def max(self, a, axis=None, keepdims=False):
        return np.max(a, axis=axis, keepdims=keepdims)

    def argmax(self, a, axis):
        """Index of the first maximum (NaN counts as the maximum), as numpy ints."""
        return np.argmax(a, axis=axis)

    # fused forms (see sum_product and muladd below: every other backend computes them as
    # their plain expressions) ---------------------------------------------------------------
    def sum_product(self, a, b, axis):
        """Σ a·b over ``axis`` in one pass with no a·b temporary (np.einsum's sum-of-products
        loop; 3-4x faster than summing a fresh a * b over a batch, measured). The same error
        bound as the sum of the rounded products: each term is a product rounded once (or
        not at all, where einsum's loop uses a fused multiply-add — machine-dependent bits,
        as a GEMM's), summed in the backend's dtype with a few accumulators a row."""
        if (not _plain(a, self.dtype) or not _plain(b, self.dtype) or a.shape != b.shape
                or a.size < FUSED_MIN_SIZE):
            return self.sum(a * b, axis=axis)
        axes = _axis_tuple(axis, a.ndim)
        operand, kept = _einsum_axes(axes, a.ndim)
        return np.einsum(f"{operand},{operand}->{kept}", a, b)

    def sample_shaped(self, v, shape):
        """v (broadcastable to ``shape``, constant along its axis 0: a per-channel statistic)
        repeated to one sample of ``shape``, (1, *shape[1:]), where that makes numpy's
        broadcasting inner loop run over a whole sample instead of a few elements at a time
        (x − μ over (32, 64, 16, 16): 1.3x faster; the same values, only repeated)."""
        if not _plain(v, self.dtype) or math.prod(shape) < FUSED_MIN_SIZE:
            return v
        return _row_repeated(v, shape)

    def muladd(self, a, b, c, reuse=None):
        """a·b + c, rounded as ``a * b + c`` is — the product rounded, then the sum: no fused
        multiply-add, so the same bits — in two passes over one array: ``reuse`` where the
        caller gives one of the result's shape and dtype that it owns and no longer needs
        (writing into memory just read costs half a fresh array's first write, measured:
        0.71 ms against 1.31 ms over (32, 64, 16, 16) float64), else a fresh one. An operand
        broadcast over the result's leading axis with size-1 axes after it (a per-channel
        γ of shape (1, C, 1, 1)) is first repeated to one row of the result (C, H, W): numpy's
        inner loop then runs over a whole row instead of H·W elements at a time, 1.4x faster
        for BatchNorm's (32, 64, 16, 16) (measured; the same values, only repeated)."""
        if np.size(a) < FUSED_MIN_SIZE or not all(_plain(v, self.dtype) or np.isscalar(v)
                                                  for v in (a, b, c)):
            return a * b + c
        shape = np.broadcast_shapes(np.shape(a), np.shape(b), np.shape(c))
        a, b, c = (_row_repeated(v, shape) for v in (a, b, c))
        if not (_plain(reuse, self.dtype) and reuse.shape == shape and reuse.flags.writeable):
            reuse = None
        out = np.multiply(a, b, out=reuse, dtype=self.dtype)
        return np.add(out, c, out=out)


# The most bytes muladd repeats a broadcast operand to (one row of the result).
ROW_BYTES = 1 << 20
# Below this many elements (of sum_product's operands, of muladd's first) the plain expressions
# run: their few microseconds of call overhead are less than the fused forms' (einsum parses
# its subscripts; muladd inspects its operands), and a small network makes dozens of calls
# (measured: the fused forms even at 16 k elements, and 1.07x slower on the small ResNet's
# batchnorms; 3x faster at 128 k).
FUSED_MIN_SIZE = 1 << 15


def _plain(x, dtype) -> bool:
    """x is a plain numpy array (not a storage-format subclass) of the backend's dtype."""
    return type(x) is np.ndarray and x.dtype == dtype


def _row_repeated(v, shape):
    """v, broadcast to one row of ``shape`` ((1,) + shape[1:]) and made contiguous, when v is
    constant along axis 0 and along some later axis and that row is at most ROW_BYTES; else
    v unchanged."""
    if np.ndim(v) == 0 or len(shape) < 2:
        return v
    full = (1,) * (len(shape) - v.ndim) + v.shape
    row = (1,) + tuple(shape[1:])
    if full[0] != 1 or full == row or v.itemsize * math.prod(row) > ROW_BYTES:
        return v
    repeated = np.empty(row, dtype=v.dtype)
    repeated[...] = v.reshape(full)                 # (np.broadcast_to costs 10x this call)
    return repeated


def _strided(axis, ndim) -> bool:
    """Does a reduction over ``axis`` skip over kept axes — several axes reduced, not one
    trailing block (BatchNorm's (0, 2, 3) of (N, C, H, W))? Then np.add.reduce runs its inner
    loop over the last axis alone (W elements at a time) and adds the rest up one by one;
    np.einsum sums the contiguous run in one go, 1.5x faster, with partial sums no longer
    than add.reduce's (the same γ_n bound, any order). A trailing block (or everything) stays
    with add.reduce, whose pairwise summation is the more accurate there."""
    axes = _axis_tuple(axis, ndim)
    return 1 < len(axes) < ndim and axes != tuple(range(ndim - len(axes), ndim))


def _einsum_axes(axes, ndim):
    """einsum's subscripts for a reduction over ``axes`` of an ndim array: (the operand's, the
    kept ones')."""
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    return letters, "".join(letter for k, letter in enumerate(letters) if k not in axes)


def _einsum_sum(a, axis, keepdims):
    axes = _axis_tuple(axis, a.ndim)
    operand, kept = _einsum_axes(axes, a.ndim)
    total = np.einsum(f"{operand}->{kept}", a)
    if keepdims:
        total = total.reshape(tuple(1 if k in axes else n for k, n in enumerate(a.shape)))
    return total


def sample_shaped(bk, v, shape):
    """``NumpyBackend.sample_shaped`` where the backend has it (a per-channel statistic
    repeated to one sample, for numpy's broadcasting), else v itself."""
    spread = getattr(bk, "sample_shaped", None)
    return spread(v, shape) if spread else v


def sum_product(bk, a, b, axis):
    """Σ a·b over ``axis`` in backend ``bk``: the backend's fused form where it has one (the
    float backends, ``NumpyBackend.sum_product``), else ``bk.sum(a * b, axis=axis)``."""
    fused = getattr(bk, "sum_product", None)
    return fused(a, b, axis) if fused else bk.sum(a * b, axis=axis)


def muladd(bk, a, b, c, reuse=None):
    """a·b + c in backend ``bk`` (two roundings, as the expression): ``NumpyBackend.muladd``
    where the backend has it (the float backends; ``reuse``: an array of the result's shape
    the caller owns and no longer needs, which they may overwrite with the result), else
    ``a * b + c``."""
    fused = getattr(bk, "muladd", None)
    return fused(a, b, c, reuse) if fused else a * b + c


# Below this many elements np.where is as fast (the bitwise select's few ufunc calls cost ~6 µs;
# np.where's branches cost ~2 ns an element when mispredicted, and small masks are predicted).
BITWISE_WHERE_MIN = 8192


def _float_operand(x, dtype):
    """x as an array of ``dtype`` to select from — a plain ndarray already of that dtype, or a
    Python/numpy number converted (as np.where converts it: a Python number takes the array's
    dtype, NEP 50 and numpy 1.26's value-based casting alike) — else None."""
    if type(x) is np.ndarray:
        return x if x.dtype == dtype else None
    if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)):
        return np.asarray(dtype.type(x))
    return None


def bitwise_where(cond, a, b, dtype):
    """``np.where(cond, a, b)`` as a float backend computes it, bit for bit, for a boolean mask
    and operands of the backend's float ``dtype`` (numbers included); None for anything else
    (then np.where itself runs).

    Why: np.where copies element by element behind a branch on ``cond``, and the masks of a
    network (ReLU's z <= 0, half of them true at random) defeat branch prediction: 1.4–1.7 ms
    for 256×1024 elements on the machine of benchmarks/baseline, against 0.15–0.7 ms for this.
    The select works on the bits, so every value comes through unchanged (NaN payloads, −0, inf
    included): with m all ones where cond holds, result = b ⊕ ((a ⊕ b) ∧ m); where a (or b) is
    the number +0 (all bits clear), result = b ∧ ¬m (or a ∧ m)."""
    if type(cond) is not np.ndarray or cond.dtype != np.bool_:
        return None
    a, b = _float_operand(a, dtype), _float_operand(b, dtype)
    if a is None or b is None:
        return None
    shape = (cond.shape if a.shape in (cond.shape, ()) and b.shape in (cond.shape, ())
             else np.broadcast_shapes(cond.shape, a.shape, b.shape))
    if math.prod(shape) < BITWISE_WHERE_MIN:
        return None
    bits = np.dtype(f"u{dtype.itemsize}")
    a_bits, b_bits = a.view(bits), b.view(bits)
    mask = np.empty(shape, dtype=bits)
    # Unsigned subtraction wraps: 0 − 1 is all ones, silently.
    if a.ndim == 0 and a_bits == 0:                   # where(cond, +0, b): clear cond's lanes
        np.subtract(cond, bits.type(1), out=mask, dtype=bits)       # ¬m
        np.bitwise_and(mask, b_bits, out=mask)
    else:
        np.subtract(bits.type(0), cond, out=mask, dtype=bits)       # m
        if b.ndim == 0 and b_bits == 0:               # where(cond, a, +0)
            np.bitwise_and(mask, a_bits, out=mask)
        else:
            np.bitwise_and(mask, np.bitwise_xor(a_bits, b_bits), out=mask)
            np.bitwise_xor(mask, b_bits, out=mask)
    return mask.view(dtype)


class MPBackend:
    """High precision: numpy object arrays of ``mpf`` from a private context of ``dps`` digits.

    Every arithmetic operation rounds to the context's precision, so ``dps`` significant digits
    are carried through every step. Inputs (float64 arrays) are converted exactly.

    ``matmul`` and ``sum`` return the exact result rounded once. ``engine`` names how the exact
    result is computed — the values are bit for bit the same either way:

    ``"ozaki"``   (default) error-free slices on float64 BLAS, recombined in integers
                  (:mod:`refnet.numerics.exactgemm`); hands over to ``"bigint"`` where exactness
                  would need too many slices, and for products and sums too small to gain
                  (``OZAKI_MIN_MULADDS``, ``OZAKI_MIN_TERMS``)
    ``"bigint"``  the reference: one exponent per array, an object-array GEMM of Python ints
                  (``_matmul_reference``, ``_sum_reference``)
    """

    ENGINES = ("ozaki", "bigint")

    def __init__(self, dps: int = 50, engine: str = "ozaki"):
        if not isinstance(dps, (int, np.integer)) or isinstance(dps, bool) or dps < 16:
            raise ValueError(f"MPBackend: dps must be an integer >= 16, got {dps!r}")
        if engine not in self.ENGINES:
            raise ValueError(f"MPBackend: engine must be one of {self.ENGINES}, got {engine!r}")
        self.engine = engine
        self.dps = int(dps)
        self.ctx = _mp_context(self.dps)
        self.name = f"mp{self.dps}"
        ctx = self.ctx
        mpf_type = self._mpf_type = type(ctx.mpf(0))
        # Elements already of this context pass through untouched; others are converted.
        self._mpf = np.frompyfunc(lambda x: x if type(x) is mpf_type else ctx.mpf(x), 1, 1)
        self._to_float = np.frompyfunc(float, 1, 1)
        self._funcs = {
            name: np.frompyfunc(getattr(ctx, name), 1, 1)
            for name in ("exp", "expm1", "log", "log1p", "tanh", "sqrt", "erf", "erfc")
        }

    def __repr__(self):
        return f"<refnet backend mp, {self.dps} digits>"

    def _apply(self, name, x):
        return np.asarray(self._funcs[name](x), dtype=object)

    # conversion -------------------------------------------------------------------------
    def asarray(self, a):
        """Exact conversion of floats (and re-rounding of mpf from other contexts)."""
        arr = np.asarray(a)
        if arr.dtype.kind == "f" and arr.dtype.itemsize <= 8 and np.all(np.isfinite(arr)):
            out = np.empty(arr.shape, dtype=object)
            with _gc_paused():
                out.flat[:] = list(map(self.ctx.make_mpf, _float_mpf_tuples(arr)))
            return out
        return np.asarray(self._mpf(arr), dtype=object)

    def to_numpy(self, a) -> np.ndarray:
        """Correctly rounded float64 (mpmath's float conversion rounds to nearest)."""
        return np.asarray(self._to_float(np.asarray(a, dtype=object)), dtype=np.float64)

    def const(self, value: Constant):
        return constant_value(value, self.ctx)

    def zeros(self, shape):
        return np.full(shape, self.ctx.zero, dtype=object)

    # elementwise ------------------------------------------------------------------------
    def exp(self, x):
        return self._apply("exp", x)

    def expm1(self, x):
        return self._apply("expm1", x)

    def log(self, x):
        return self._apply("log", x)

    def log1p(self, x):
        return self._apply("log1p", x)

    def tanh(self, x):
        return self._apply("tanh", x)

    def sqrt(self, x):
        return self._apply("sqrt", x)

    def erf(self, x):
        return self._apply("erf", x)

    def erfc(self, x):
        return self._apply("erfc", x)

    def abs(self, x):
        return np.asarray(np.abs(x), dtype=object)

    def maximum(self, a, b):
        at_least = self._at_least_zero(a) if _is_zero_scalar(b) else None
        if at_least is None:
            at_least = np.asarray(a >= b, dtype=bool)
        return self.where(at_least, a, b)

    def minimum(self, a, b):
        return self.where(np.asarray(a <= b, dtype=bool), a, b)

    def _at_least_zero(self, a):
        """``a >= 0`` elementwise read off the mpf tuples (relu's maximum(z, 0)), the same
        booleans as mpmath's comparison: True for zero, positive numbers and +inf; False for
        negative numbers, -inf and NaN (mpmath's NaN has bc = -1). 20x faster than comparing
        mpf objects; None unless every element is an mpf of this context."""
        if not isinstance(a, np.ndarray) or a.dtype != object or not self._all_mine(a):
            return None
        tuples = [x._mpf_ for x in a.flat]
        sign = np.fromiter([t[0] for t in tuples], dtype=bool, count=len(tuples))
        nan = np.fromiter([t[3] == -1 for t in tuples], dtype=bool, count=len(tuples))
        return (~sign & ~nan).reshape(a.shape)

    def _all_mine(self, a):
        """Every element an mpf of this context (the set of element types, built in C: 8x
        faster than a generator over the elements)."""
        return set(map(type, a.flat)) <= {self._mpf_type}

    def _operand(self, x):
        """x with every element an mpf of this context: a scalar converted once, an object
        array of this context's mpf passed as it is (no per-element call), anything else
        through ``asarray``."""
        if isinstance(x, np.ndarray) and x.dtype == object and self._all_mine(x):
            return x
        return self.asarray(np.asarray(x))

    def where(self, cond, a, b):
        # Python scalars (0, 1, -inf) become mpf once, so that every element is an mpf of this
        # context; operands that already are pass untouched (a per-element conversion call
        # cost a third of a LeNet-5 gradient).
        out = np.where(np.asarray(cond, dtype=bool), self._operand(a), self._operand(b))
        return np.asarray(out, dtype=object)

    # reductions and products -------------------------------------------------------------
    def matmul(self, a, b):
        """Exact dot products, rounded once to the working precision.

        More accurate than rounding after every multiply-add, and far faster than mpf
        arithmetic. The ``ozaki`` engine computes the exact products with error-free float64
        GEMMs (see :mod:`refnet.numerics.exactgemm`; its own error is zero), the ``bigint``
        engine with Python integers; both round the same exact integer once.
        """
        a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
        with _gc_paused():
            if (self.engine == "ozaki" and a.ndim >= 1 and b.ndim >= 1
                    and _muladds(a.shape, b.shape) >= OZAKI_MIN_MULADDS):
                out = self._matmul_ozaki(a, b)
                if out is not None:
                    return out
            return self._matmul_reference(a, b)

    def _matmul_ozaki(self, a, b):
        # numpy's matmul rules for vectors: a vector a is a row, a vector b a column, and the
        # added axis is removed from the result.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        exact = matmul_exact(a2, b2)
        if exact is None:
            return None
        ints, exponent = exact
        out = self._round_each(ints, exponent)
        if a.ndim == 1:
            out = out[..., 0, :]
        if b.ndim == 1:
            out = out[..., 0]
        return out

    def _matmul_reference(self, a, b):
        """The big-integer reference: each operand as Python integers times one power of two
        (every mpf is ``man · 2**exp``), the product in Python integers (exact, an n³ loop of
        big-integer operations in the interpreter), each result element rounded once."""
        ia, ea = _to_fixed_point(a)
        ib, eb = _to_fixed_point(b)
        exact = np.asarray(np.matmul(ia, ib), dtype=object)
        return self._from_fixed_point(exact, ea + eb)

    def _round_each(self, ints, exponent):
        """Python ints (row-major) times 2^exponent (an int64 array of the output's shape),
        each rounded once to the working precision."""
        prec, make = self.ctx.prec, self.ctx.make_mpf
        exps = np.asarray(exponent).ravel().tolist()
        out = np.empty(np.shape(exponent), dtype=object)
        out.flat[:] = [make(from_man_exp(m, e, prec, round_nearest)) for m, e in zip(ints, exps)]
        return out

    def _from_fixed_point(self, ints, exponent):
        prec, make = self.ctx.prec, self.ctx.make_mpf
        round_one = lambda m: make(from_man_exp(int(m), exponent, prec, round_nearest))
        return np.asarray(np.frompyfunc(round_one, 1, 1)(ints), dtype=object)

    def sum(self, a, axis=None, keepdims=False):
        """Exact sum, rounded once (as matmul)."""
        a = np.asarray(a, dtype=object)
        with _gc_paused():
            if self.engine == "ozaki" and a.size >= OZAKI_MIN_TERMS:
                out = self._sum_ozaki(a, axis, keepdims)
                if out is not None:
                    return out
            return self._sum_reference(a, axis, keepdims)

    def _sum_ozaki(self, a, axis, keepdims):
        try:
            axes = _axis_tuple(axis, a.ndim)
        except (TypeError, ValueError):
            return None                     # the reference raises numpy's own error
        rest = [d for d in range(a.ndim) if d not in axes]
        rest_shape = tuple(a.shape[d] for d in rest)
        count = int(np.prod([a.shape[d] for d in axes], dtype=np.int64))
        # The summed axes last, as one contraction axis.
        flat = a.transpose(rest + list(axes)).reshape(rest_shape + (count,))
        exact = sum_exact(flat)
        if exact is None:
            return None
        ints, exponent = exact
        out = self._round_each(ints, exponent)
        if keepdims:
            out = out.reshape(tuple(1 if d in axes else n for d, n in enumerate(a.shape)))
        return out

    def _sum_reference(self, a, axis=None, keepdims=False):
        """The big-integer reference: one exponent for the array, a sum of Python integers."""
        ints, exponent = _to_fixed_point(a)
        exact = np.asarray(np.sum(ints, axis=axis, keepdims=keepdims, initial=0), dtype=object)
        return self._from_fixed_point(exact, exponent)

    def max(self, a, axis=None, keepdims=False):
        return np.asarray(np.max(a, axis=axis, keepdims=keepdims), dtype=object)

    def argmax(self, a, axis):
        return np.argmax(a, axis=axis)


# Below these sizes the "ozaki" engine hands a product or sum to the big-integer path: the
# fast path's fixed cost (~0.3 ms of numpy calls) exceeds the whole reference computation there
# (measured on a 2-core machine: an 8x8x8 product 0.40 ms vs 0.27 ms, 16x16x16 0.77 vs 1.16 ms;
# a sum of 64 terms 0.16 vs 0.14 ms). The values are the same bits either way.
OZAKI_MIN_MULADDS = 1024
OZAKI_MIN_TERMS = 64


def _muladds(shape_a, shape_b) -> int:
    """Multiply-adds of numpy's matmul of these shapes (vectors count as one row/column)."""
    a = shape_a if len(shape_a) > 1 else (1,) + tuple(shape_a)
    b = shape_b if len(shape_b) > 1 else tuple(shape_b) + (1,)
    try:
        batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    except ValueError:
        return 0                              # numpy's matmul will raise its own error
    return int(np.prod(batch, dtype=np.int64)) * a[-2] * a[-1] * b[-1]


def _float_mpf_tuples(arr: np.ndarray):
    """Every float of ``arr`` (row-major) as mpmath's normalized tuple (sign, man, exp, bc),
    computed in numpy: x = ±man·2^exp with man odd (trailing zero bits moved into exp) and bc
    its bit length, zero as (0, 0, 0, 0) — the tuple mpmath's own exact conversion gives. A
    float's at most 53 bits fit every working precision (dps ≥ 16: ≥ 56 bits), so no rounding
    is involved; 2x faster than normalizing each element through mpmath."""
    m, e = np.frexp(arr.astype(np.float64).ravel())     # subnormals included: m in [0.5, 1)
    signed = (m * 2.0 ** 53).astype(np.int64)             # exact: |x| = |signed|·2^(e − 53)
    mag = np.abs(signed)
    zero = mag == 0
    lowest = mag & -mag                                   # the lowest set bit, a power of two
    trailing = np.frexp(lowest.astype(np.float64))[1].astype(np.int64) - 1
    odd = mag >> np.where(zero, 0, trailing)
    bits = np.frexp(odd.astype(np.float64))[1].astype(np.int64)   # exact: odd < 2⁵³
    exp = np.where(zero, 0, e.astype(np.int64) - 53 + trailing)
    return zip((signed < 0).astype(np.int64).tolist(), map(MPZ, odd.tolist()), exp.tolist(),
               np.where(zero, 0, bits).tolist())


def _is_zero_scalar(x) -> bool:
    return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
            and x == 0)


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector off while a bulk conversion creates hundreds of thousands of
    mpf objects (it would otherwise run a full collection over every live object several times
    per conversion: measured 40 % of a 50-digit MLP gradient). mpf objects hold only a tuple of
    numbers and can form no cycle, so nothing is left uncollected; the previous state is
    restored on exit, whatever happens inside."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _axis_tuple(axis, ndim):
    """numpy's ``axis`` argument (None, an int or a tuple; negative counts from the end) as a
    sorted tuple of distinct non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for ax in axes:
        if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)) or not -ndim <= ax < ndim:
            raise ValueError(f"axis {ax!r} out of range for {ndim} dimensions")
        out.append(int(ax) % ndim)
    if len(set(out)) != len(out):
        raise ValueError("repeated axis")
    return tuple(sorted(out))


def _exact_parts(x):
    """mpmath's (sign, man, exp, bc) of a plain int or float, without rounding."""
    if isinstance(x, (int, np.integer)):
        return from_int(int(x))
    return from_float(float(x))


# Widest exponent span kept exact in a fixed-point sum. mpf exponents are unbounded: a softmax
# of logits ~1e15 holds exp(−1e15) = 2^(−1.4e15) beside 1, and one integer spanning both would
# need 1.4e15 bits (GMP aborts the process). Terms wholly below top − SPAN are dropped and a
# straddling one truncated there: the sum then errs by under n·2^(top − SPAN), which is below
# its rounding at any working precision unless the larger terms cancel through 2¹⁶ − prec bits.
EXACT_SPAN_BITS = 2 ** 16


def fraction_of(v) -> Fraction:
    """An mpf, an mpf tuple (sign, man, exp, bc), or a float, as the exact rational it is."""
    t = v._mpf_ if hasattr(v, "_mpf_") else v if isinstance(v, tuple) else None
    if t is None:
        return Fraction(float(v))
    sign, man, exp, _ = t
    if not man:
        if exp:
            raise ValueError("an infinite or NaN value has no exact rational")
        return Fraction(0)
    f = Fraction(man) * Fraction(2) ** exp
    return -f if sign else f


def _to_fixed_point(a: np.ndarray):
    """An object array of mpf (or numbers) as (object array of Python ints, exponent): exact
    while the exponents span at most EXACT_SPAN_BITS bits (see there)."""
    parts = [x._mpf_ if hasattr(x, "_mpf_") else _exact_parts(x) for x in a.flat]
    if any(p[1] == 0 and p[2] != 0 for p in parts):            # inf or nan: no fixed point
        raise ValueError("mp backend: a non-finite value reached a matmul or sum")
    nonzero = [p for p in parts if p[1]]
    low = min(p[2] for p in nonzero) if nonzero else 0
    if nonzero:
        top = max(p[2] + p[3] for p in nonzero)
        low = max(low, top - EXACT_SPAN_BITS)
    ints = np.empty(a.shape, dtype=object)
    ints.flat[:] = [0 if not man else (-1 if sign else 1) * (
        man << (exp - low) if exp >= low else man >> (low - exp))
        for sign, man, exp, _ in parts]
    return ints, low


FLOAT64 = NumpyBackend(np.float64)
FLOAT32 = NumpyBackend(np.float32)


def get_backend(precision: str, dps: int = 50):
    """The backend for a precision name: ``float64``, ``float32`` or ``mp``."""
    if precision == "float64":
        return FLOAT64
    if precision == "float32":
        return FLOAT32
    if precision == "mp":
        return MPBackend(dps)
    raise ValueError(f"precision: expected one of float64, float32, mp; got {precision!r}")
