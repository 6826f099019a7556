"""Low-precision binary formats, rounded bit-exactly from float64 — written once, for all of them.

=============  ===========  =====  ========  ============  =====================================
format         significand  e_min  max       inf           overflow (round to nearest even)
=============  ===========  =====  ========  ============  =====================================
fp16           11 bits      −14    65504     yes           ≥ 65520 → ±inf
bf16           8 bits       −126   3.39e38   yes           → ±inf
fp8_e5m2       3 bits       −14    57344     yes           → ±inf
fp8_e4m3fn     4 bits       −6     448       no (NaN only) → NaN (ml_dtypes' e4m3fn does the same)
=============  ===========  =====  ========  ============  =====================================

``round_to(x, fmt)`` rounds every float64 element **once** to the nearest value of the format,
ties to even, keeping subnormals (no flush to zero) and the sign of zero; the result is returned
as float64 (every value of these formats is a float64). One rounding matters: torch's
float64 → half/bfloat16 casts and ml_dtypes' float64 → bfloat16 go through float32 and round
twice, which lands on the farther neighbour for a few elements per tensor (`shared/PRECISION.md`).
numpy's ``astype(float16)`` from float64 rounds once, like this.

How: with q the format's spacing at |x| — 2^(max(e, e_min) − (p − 1)) for |x| in [2^e, 2^(e+1)) —
the result is round_half_even(x/q)·q, exact in float64 (q is a power of two). A result past max
becomes inf (NaN for e4m3fn): fp16 65519.99 → 65504, 65520 (a tie; 65504 is odd) → inf;
e4m3fn 464 (a tie; 448 is even) → 448, 465 → NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Format:
    name: str
    precision: int        # significand bits, the implicit one included
    emin: int             # exponent of the smallest normal number
    max: float            # largest finite value
    has_inf: bool

    @property
    def smallest_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.precision + 1)

    @property
    def unit_roundoff(self) -> float:
        return 2.0 ** -self.precision


FORMATS = {
    "fp16": Format("fp16", 11, -14, 65504.0, True),
    "bf16": Format("bf16", 8, -126, float((2 - 2.0**-7) * 2.0**127), True),
    "fp8_e5m2": Format("fp8_e5m2", 3, -14, 57344.0, True),
    "fp8_e4m3fn": Format("fp8_e4m3fn", 4, -6, 448.0, False),
}


# float32 as a Format (not a storage format, so not in FORMATS): round_to and ordinal take it,
# for comparisons that count float32 gradients in float32's own steps.
FLOAT32 = Format("float32", 24, -126, float(np.finfo(np.float32).max), True)


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"format: unknown format {name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name]


def round_to(x, fmt) -> np.ndarray:
    """Every element of ``x`` rounded once to the nearest ``fmt`` value (ties to even), as float64."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", under="ignore", divide="ignore"):
        _, e = np.frexp(x)                        # |x| in [2^(e-1), 2^e)
        exponent = np.maximum(e - 1, fmt.emin)
        q = np.ldexp(1.0, exponent - (fmt.precision - 1))
        rounded = np.round(x / q) * q             # np.round: half to even; x/q exact
        # Overflow: whatever rounds (to nearest even, on the format's grid) past max.
        big = np.abs(rounded) > fmt.max
        overflow = np.copysign(np.inf, x) if fmt.has_inf else np.nan
        out = np.where(big, overflow, rounded)
        out = np.where(np.isfinite(x), out, x if fmt.has_inf else np.where(np.isnan(x), x, np.nan))
    return out


def ordinal(x, fmt) -> np.ndarray:
    """Each value of ``fmt`` (``x`` must hold its values: ``round_to``'s results) numbered along
    the format's grid: ±0 is 0, consecutive values differ by 1 — across binades and through the
    subnormals — and negative values count down (−v ↦ −ordinal(v)). So |ordinal(a) − ordinal(b)|
    is how many units in the last place of the format lie between a and b. For a positive value
    it is the value's bit pattern as an integer (fp16, bf16, float32 alike). Finite values only;
    float64 results, exact (below 2⁵³).

    How: with q the spacing at |x| (as in ``round_to``) and E = max(exponent, e_min), |x|/q
    counts the steps inside the binade and (E − e_min)·2^(p−1) the steps below it."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    _, e = np.frexp(a)                        # a in [2^(e-1), 2^e)
    exponent = np.where(a == 0, fmt.emin, np.maximum(e - 1, fmt.emin))   # frexp(0): e = 0
    q = np.ldexp(1.0, exponent - (fmt.precision - 1))
    steps = (exponent - fmt.emin) * 2.0 ** (fmt.precision - 1) + a / q
    return np.copysign(steps, x)
