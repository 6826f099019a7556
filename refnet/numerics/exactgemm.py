"""Exact products and sums of mpf arrays on float64 BLAS: the Ozaki scheme, error-free.

The mp backend's ``matmul`` and ``sum`` return the *exact* result rounded once to the working
precision. This module computes the exact result fast; :mod:`refnet.numerics.backend` rounds it.

The scheme (Ozaki, Ogita, Oishi, Rump 2012, in integer form)
------------------------------------------------------------
1. **Fixed point per group.** Every finite mpf is ``(-1)^sign · man · 2^exp``. The elements
   of one *group* — a row of A or a column of B (the elements one output's dot product reads
   along the contraction axis) — are written over one exponent, the group's lowest:
   ``x = F · 2^low`` with ``F = ±man · 2^(exp − low)`` an integer below ``2^span``,
   ``span = max(exp + bc) − low``. Per-group exponents (Ozaki's row/column scaling) keep a
   small row from inheriting a large row's span, so fewer slices are needed.
2. **Slices.** Each |F| is cut into ``s`` slices of ``w`` bits from the bottom,
   ``|F| = Σ_j f_j · 2^(j·w)`` with ``0 ≤ f_j < 2^w``, and each slice carries F's sign. Slices
   are small integers, exactly float64.
3. **Slice GEMMs on BLAS.** For every slice pair ``(p, q)``, ``C_pq = A_p · B_q`` in float64
   (numpy's matmul, i.e. the BLAS dgemm). Widths obey ``w_A + w_B + ⌈log2 k⌉ ≤ 53``: each
   product is an integer below ``2^(w_A + w_B)``, a sum of k of them is below ``2^53``, and so
   is every *partial* sum, in any order. Integers below ``2^53`` are float64 numbers, so every
   addition and multiplication of the GEMM — whatever its summation order, blocking, thread
   split or SIMD width, with or without fused multiply-add — is exact: ``C_pq`` is the exact
   integer dot product. (This assumes a classical GEMM, every output the sum of its k
   products; Strassen-type dgemm would void it, and no mainstream BLAS does that.) That is
   what makes the result independent of the BLAS vendor, thread count and CPU.
4. **Exact recombination in integers**, per output element only: with the shift of a pair a
   multiple of one limb width ``w`` (equal widths, or one operand in a single slice), the
   products are summed per limb in int64 (each ``|C| < 2^53``, at most ``MAX_SLICES`` per limb,
   so no int64 overflow), carries are propagated, and each output becomes one Python integer
   (``int.from_bytes`` of its two's-complement limbs), the exact ``Σ_p a_p b_p / 2^(lowA+lowB)``.

The error of this engine is **zero**: it returns the exact integer, and the backend rounds it
once — bit for bit what the big-integer reference (one exponent per array, Python-int GEMM)
returns whenever that reference is exact (exponent spans within ``EXACT_SPAN_BITS``).

Where exactness would need too many slices (groups spanning more than ``MAX_SPAN_BITS`` bits,
or more than ``MAX_SLICE_PAIRS`` slice GEMMs), or an exponent does not fit int64, the functions
return ``None`` and the backend takes the big-integer path.
"""

from __future__ import annotations

import numpy as np
from mpmath.libmp import from_float, from_int

# The float64 significand: integers of magnitude up to 2^53 are exact.
_DOUBLE_BITS = 53
# Limits of the fast path, each a cost or memory cap, none a correctness condition:
#   MAX_SPAN_BITS     a group spanning more bits than this (e.g. 1 next to 2^-5000) takes the
#                     big-integer path: its fixed-point bytes would be large and its slices many.
#   MAX_SLICES        slices of one operand; also bounds the terms added into one int64 limb
#                     (at most 512 = 2^9 of magnitude below 2^53: below 2^62, no overflow).
#   MAX_SLICE_PAIRS   slice GEMMs of one product, a cost cap: 200-digit operands (~670-bit
#                     spans) with k up to 8192 need ~1200.
MAX_SPAN_BITS = 4096
MAX_SLICES = 512
MAX_SLICE_PAIRS = 4096


class Decomposed:
    """An operand as integer fixed point per group, ready to be sliced.

    ``shape``: the operand's shape with the contraction axis last (the caller moves it there);
    ``low``: the exponent of each group, shape ``shape[:-1]``; ``span``: the widest group's span
    in bits; ``negative``: F < 0, per element. The magnitudes |F| are held one of two ways:

    - *narrow* (every mantissa of at most 53 bits, e.g. float64 inputs and weights):
      ``mans`` the mantissas as float64 (exact) and ``shifts`` = exp − low, int64;
    - *wide* (longer mantissas, results of earlier mp operations): ``raw``, the little-endian
      bytes of every |F| = man · 2^(exp − low), ``nbytes`` per element, row-major.
    """

    def __init__(self, shape, low, span, negative, mans=None, shifts=None, raw=None, nbytes=0):
        self.shape, self.low, self.span, self.negative = shape, low, span, negative
        self.mans, self.shifts, self.raw, self.nbytes = mans, shifts, raw, nbytes

    def slice_count(self, width: int) -> int:
        return max(1, -(-self.span // width))

    def slices(self, width: int, count: int) -> np.ndarray:
        """(count, *shape) float64: slice j holds bits [j·width, (j+1)·width) of each |F|, with
        F's sign."""
        out = self._narrow(width, count) if self.raw is None else self._wide(width, count)
        np.negative(out, out=out, where=self.negative[None, :])
        return out.reshape((count,) + tuple(self.shape))

    def _narrow(self, width, count):
        """slice_j = ⌊F / 2^(j·w)⌋ − 2^w · ⌊F / 2^((j+1)·w)⌋ in float64, all exact: F·2^e is a
        power-of-two scaling of a 53-bit integer (exact, or below 1 and floored to 0 when
        subnormal), the floor of a float is a float, and the difference is an integer
        below 2^w."""
        floors = np.empty((count + 1, self.mans.size), dtype=np.float64)
        for j in range(count + 1):
            e = np.maximum(self.shifts - j * width, -1100)
            floors[j] = np.floor(np.ldexp(self.mans, e))
        return floors[:-1] - np.ldexp(floors[1:], width)

    def _wide(self, width, count):
        """One unaligned 8-byte little-endian window per element and slice (width + 7 ≤ 64
        bits, so one window always covers a slice), shifted and masked."""
        n = self.negative.size
        need = -(-count * width // 8) + 8              # every window stays inside the row
        pad = max(0, need - self.nbytes)
        data = np.frombuffer(self.raw, dtype=np.uint8).reshape(n, self.nbytes)
        if pad:
            data = np.concatenate([data, np.zeros((n, pad), dtype=np.uint8)], axis=1)
        mask = np.uint64((1 << width) - 1)
        out = np.empty((count, n), dtype=np.float64)
        for j in range(count):
            start, shift = divmod(j * width, 8)
            window = np.ascontiguousarray(data[:, start:start + 8]).view("<u8")[:, 0]
            out[j] = (window >> np.uint64(shift)) & mask
        return out


def mpf_parts(a: np.ndarray):
    """mpmath's (sign, man, exp, bc) of every element of an object array, row-major; plain
    ints and floats exactly (as the backend's reference path reads them)."""
    try:
        parts = [x._mpf_ for x in a.flat]
    except AttributeError:
        parts = [x._mpf_ if hasattr(x, "_mpf_") else
                 from_int(int(x)) if isinstance(x, (int, np.integer)) else from_float(float(x))
                 for x in a.flat]
    return parts


# Spans up to this many bits in the narrow (float64) representation: 2^span stays far below
# float64's overflow at 2^1024.
_NARROW_SPAN_BITS = 960


def decompose(a: np.ndarray) -> "Decomposed | None":
    """Fixed point per group (the last axis is the contraction axis) of an object array of mpf
    (or numbers); None where the fast path does not apply."""
    shape = a.shape
    parts = mpf_parts(a)
    n = len(parts)
    if not n:
        return Decomposed(shape, np.zeros(shape[:-1], dtype=np.int64), 0,
                          np.zeros(0, dtype=bool), raw=b"", nbytes=0)
    bc = np.fromiter([p[3] for p in parts], dtype=np.int64, count=n).reshape(shape)
    if np.any(bc < 0):                           # mpmath's inf, -inf and nan: man 0, bc < 0
        raise ValueError("mp backend: a non-finite value reached a matmul or sum")
    nonzero = bc > 0
    try:
        exp = np.array([p[2] for p in parts], dtype=np.int64).reshape(shape)
    except OverflowError:                       # an exponent beyond int64: astronomical spans
        return None
    big = np.iinfo(np.int64).max // 4
    if np.any(np.abs(exp[nonzero]) >= big):
        return None
    low = np.min(np.where(nonzero, exp, big), axis=-1)
    top = np.max(np.where(nonzero, exp + bc, -big), axis=-1)
    occupied = np.any(nonzero, axis=-1)
    low = np.where(occupied, low, 0)
    span = int(np.max(np.where(occupied, top - low, 0))) if low.size else 0
    if span > MAX_SPAN_BITS:
        return None
    shifts = np.where(nonzero, exp - low[..., None], 0).ravel()
    negative = np.fromiter([p[0] for p in parts], dtype=bool, count=n)
    mans = [p[1] for p in parts]
    if int(bc.max()) <= _DOUBLE_BITS and span <= _NARROW_SPAN_BITS:
        mans = np.fromiter(map(float, mans), dtype=np.float64, count=n)
        return Decomposed(shape, low, span, negative, mans=mans, shifts=shifts)
    nbytes = max(1, -(-span // 8))
    # Only the nonzero elements are shifted and written (im2col padding, col2im and max-pool
    # backward arrays are mostly zeros); the others stay zero bytes.
    where = np.flatnonzero(nonzero.ravel())
    mans = [mans[i] for i in where.tolist()] if where.size < n else mans
    shifts = shifts[where].tolist()
    try:                                        # gmpy2 >= 2.2 mpz and Python int: to_bytes
        packed = b"".join([(m << d).to_bytes(nbytes, "little") for m, d in zip(mans, shifts)])
    except AttributeError:                      # an older gmpy2 mpz
        packed = b"".join([(int(m) << d).to_bytes(nbytes, "little")
                           for m, d in zip(mans, shifts)])
    if where.size == n:
        raw = packed
    else:
        data = np.zeros((n, nbytes), dtype=np.uint8)
        data[where] = np.frombuffer(packed, dtype=np.uint8).reshape(where.size, nbytes)
        raw = data.tobytes()
    return Decomposed(shape, low, span, negative, raw=raw, nbytes=nbytes)


def contraction_bits(k: int) -> int:
    """w_A + w_B: the bits two slices may have together so that a dot product of length k of
    their products, and every partial sum of it, stays below 2^53 (|f| < 2^w):
    k · 2^(w_A + w_B) ≤ 2^⌈log2 k⌉ · 2^(w_A + w_B) ≤ 2^53."""
    return _DOUBLE_BITS - (max(k, 1) - 1).bit_length()


def slice_widths(k: int, span_a: int, span_b: int):
    """(w_A, w_B) with w_A + w_B = contraction_bits(k) and the fewest slice pairs, among the
    choices whose pair shifts all fall on one limb grid: equal widths (shift (p + q)·w), or one
    operand whole in a single slice and the other with the remaining bits (shift p·w_A or
    q·w_B; a sum against ones, or float64 weights against short spans)."""
    total = contraction_bits(k)
    half = total // 2
    choices = [(half, half)]
    if 0 < span_b < half:
        choices.append((total - span_b, span_b))
    if 0 < span_a < half:
        choices.append((span_a, total - span_a))

    def pairs(widths):
        wa, wb = widths
        return max(1, -(-span_a // wa)) * max(1, -(-span_b // wb))
    wa, wb = min(choices, key=pairs)
    return wa, wb


def slice_pairs(count_a: int, count_b: int):
    """Every slice pair (p, q): all of them are needed for the exact product."""
    return [(p, q) for q in range(count_b) for p in range(count_a)]


def matmul_exact(a: np.ndarray, b: np.ndarray):
    """The exact ``a @ b`` of two object arrays of mpf (or numbers), shapes (..., m, k) and
    (..., k, n) (numpy's broadcasting of the leading axes), as (list of Python ints, int64
    exponents), both row-major over the output shape, value = int · 2^exponent; None where the
    fast path does not apply."""
    shape_a, shape_b = a.shape, b.shape
    k = shape_a[-1]
    if k != shape_b[-2]:
        raise ValueError(f"matmul: shapes {shape_a} and {shape_b} do not contract")
    # B's groups are its columns: decompose Bᵀ (the contraction axis last).
    dec_a, dec_b = decompose(a), decompose(b.swapaxes(-1, -2))
    if dec_a is None or dec_b is None:
        return None
    out_batch = np.broadcast_shapes(tuple(shape_a[:-2]), tuple(shape_b[:-2]))
    out_shape = out_batch + (shape_a[-2], shape_b[-1])
    exponent = np.broadcast_to(dec_a.low[..., :, None] + dec_b.low[..., None, :], out_shape)
    if k == 0 or 0 in out_shape:
        return [0] * int(np.prod(out_shape, dtype=np.int64)), exponent
    wa, wb = slice_widths(k, dec_a.span, dec_b.span)
    sa, sb = dec_a.slice_count(wa), dec_b.slice_count(wb)
    if sa > MAX_SLICES or sb > MAX_SLICES or sa * sb > MAX_SLICE_PAIRS:
        return None
    limb = wa if sa > 1 else wb
    a_sl = dec_a.slices(wa, sa)                                  # (sa, ..., m, k)
    b_sl = dec_b.slices(wb, sb).swapaxes(-1, -2)                 # (sb, ..., k, n)
    m = shape_a[-2]
    # All of A's slices stacked along the rows: one BLAS call per slice of B.
    a_stack = np.moveaxis(a_sl, 0, -3).reshape(tuple(shape_a[:-2]) + (sa * m, k))
    limbs = np.zeros((sa + sb - 1,) + out_shape, dtype=np.int64)
    by_q = {}
    for p, q in slice_pairs(sa, sb):
        by_q.setdefault(q, []).append(p)
    for q, ps in by_q.items():
        prod = np.matmul(a_stack, b_sl[q])                      # (..., sa·m, n), exact
        prod = np.moveaxis(prod.reshape(prod.shape[:-2] + (sa, m, prod.shape[-1])), -3, 0)
        for p in ps:
            limbs[p + q] += prod[p].astype(np.int64)           # shift (p + q)·limb
    return _limbs_to_ints(limbs.reshape(limbs.shape[0], -1), limb), exponent


def sum_exact(a: np.ndarray):
    """The exact sum over the last axis of an object array of mpf (or numbers), as (list of
    Python ints, int64 exponents) row-major over ``a.shape[:-1]``; None where the fast path
    does not apply. Slices of ``53 − ⌈log2 n⌉`` bits: every partial sum of n of them stays
    below 2^53, so numpy's float64 sum (pairwise, in any order) is exact."""
    dec = decompose(a)
    if dec is None:
        return None
    n = a.shape[-1]
    width = min(contraction_bits(n), 56)              # + 7 ≤ 64: one 8-byte window per slice
    count = dec.slice_count(width)
    if count > MAX_SLICES:
        return None
    limbs = np.sum(dec.slices(width, count), axis=-1).astype(np.int64)
    return _limbs_to_ints(limbs.reshape(count, -1), width), dec.low


def _limbs_to_ints(limbs: np.ndarray, width: int):
    """(L, M) int64, value_i = Σ_d limbs[d, i] · 2^(d·width), as M Python ints (exact).

    Carries first: every limb but the top one into [0, 2^width) (floor division), the top one
    keeping the sign; then the limbs are packed into two's-complement little-endian uint64 words
    (the top limb sign-extended) and each output read with one ``int.from_bytes``."""
    limbs = limbs.copy()
    count, m = limbs.shape
    for d in range(count - 1):
        carry = limbs[d] >> width
        limbs[d] -= carry << width
        limbs[d + 1] += carry
    top_pos = (count - 1) * width
    nwords = top_pos // 64 + 2                         # the top limb is a 64-bit signed value
    words = np.zeros((m, nwords), dtype=np.uint64)
    for d in range(count - 1):
        word, shift = divmod(d * width, 64)
        value = limbs[d].view(np.uint64)
        words[:, word] |= value << np.uint64(shift)
        if shift + width > 64:
            words[:, word + 1] |= value >> np.uint64(64 - shift)
    word, shift = divmod(top_pos, 64)
    top = limbs[-1]
    words[:, word] |= top.view(np.uint64) << np.uint64(shift)
    high = top >> np.int64(64 - shift) if shift else top >> np.int64(63)
    words[:, word + 1] |= high.view(np.uint64)
    # One bytes object per output (a void dtype's tolist copies each row once, 4x faster than
    # slicing the buffer in Python), each read as a signed little-endian integer.
    rows = words.astype("<u8", copy=False).view(f"V{8 * nwords}").ravel().tolist()
    from_bytes = int.from_bytes
    return [from_bytes(r, "little", signed=True) for r in rows]
