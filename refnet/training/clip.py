"""Gradient clipping, on a dict of gradients (name -> float64 array), as torch.nn.utils does.

clip_grad_value(grads, c)            g' = clamp(g, −c, c)                  (torch clip_grad_value_)
clip_grad_norm(grads, max_norm, p)   N = ‖(‖g_1‖_p, ‖g_2‖_p, ...)‖_p   (the global norm over all
                                     tensors; p = inf: max |g|)
                                     g' = g · min(1, max_norm / (N + 1e-6))
                                     returns (g', N)                       (torch clip_grad_norm_)
clip_grad_norm_per_tensor            the same, each tensor against its own norm
normalize_grads(grads)               g' = g / N  (gradient normalization; N = 0 leaves g = 0)

Conventions pinned to torch: the 1e-6 added to the norm before dividing (so a norm exactly at
max_norm is still scaled, by max_norm/(max_norm + 1e-6)); the coefficient is clamped at 1 and
*always* multiplied in (multiplying by 1.0 changes nothing); ``error_if_nonfinite`` raises when N
is inf or NaN, otherwise a non-finite N propagates (as torch).

The norms are computed accurately by default: |g|^p rounded once each, summed exactly
(math.fsum), one root — within an ulp of the exact norm, for any magnitude. torch reduces in its
own vectorized order, so its norm differs from the correctly rounded one by an ulp or so in 35 %
of random vectors (length 3 to 5000). ``reduction="torch_cpu"`` follows torch's CPU order instead
(``torch_cpu_norm``), and then ``clip_grad_norm`` equals ``torch.nn.utils.clip_grad_norm_`` bit
for bit, norm and clipped gradients — for p = 2 and inf on any length, for other p on tensors of
up to 32768 elements (or with torch on one thread). For p = 2 the order has two parameters, a
``TorchCpuOrder``: the default, ``TORCH_CPU_X86_64``, is the kernel x86-64 torch runs on AVX2 and
on AVX-512 CPUs alike; ``probe_torch_cpu_order`` finds, from two crafted vectors, which order an
installed torch follows, so that nothing has to be read from the CPU.

The clipping threshold is a kink: g' is not differentiable where N = max_norm (or |g| = c).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, NamedTuple, Tuple

import numpy as np

Grads = Dict[str, np.ndarray]
TORCH_CLIP_EPS = 1e-6


def _check_threshold(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"clip: {name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_norm_type(norm_type) -> float:
    if isinstance(norm_type, str) and norm_type in ("inf", "Infinity"):
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) \
            or math.isnan(norm_type) or norm_type < 1:
        raise ValueError(f"clip: norm_type must be >= 1 or inf, got {norm_type!r}")
    return float(norm_type)


def tensor_norm(g: np.ndarray, p: float) -> float:
    """‖g‖_p: scaled by a power of two (exact) so that |g|^p can neither overflow nor underflow,
    the powers summed exactly (math.fsum), one root. Within an ulp of the exact norm."""
    a = np.abs(np.asarray(g, dtype=np.float64)).ravel()
    if a.size == 0:
        return 0.0
    if math.isinf(p):
        return float(a.max())
    if not np.all(np.isfinite(a)):
        return float(np.nan if np.any(np.isnan(a)) else np.inf)
    top = float(a.max())
    if top == 0:
        return 0.0
    scale = math.ldexp(1.0, math.frexp(top)[1])          # 2^k > top: a/scale is exact, < 1
    with np.errstate(under="ignore"):
        scaled = a / scale
        if p == 1:
            return scale * math.fsum(scaled)
        if p == 2:
            return scale * math.sqrt(math.fsum(scaled * scaled))
        return scale * math.fsum(scaled ** p) ** (1 / p)


# torch's CPU kernel for float64 vector_norm (ATen's norm_kernel_tensor_iterator_impl, in
# aten/src/ATen/native/cpu/ReduceOpsKernel.cpp), reproduced operation for operation (measured
# against torch 2.13: 2000 of 2000 random vectors bit for bit for p = 2, 500 of 500 for p = 1;
# 898 of 900 for p = 3, 1.5, 4, where libm's pow can differ by an ulp):
#   p = 2:   `lanes` running sums of x² (each square rounded, then added: no FMA), the lanes
#            added left to right, the n mod lanes tail squares added one by one — with a fused
#            multiply-add where the kernel was compiled with FMA — and a square root. The whole
#            vector is one call of the kernel (binary_kernel_reduce_lastdim parallelizes over
#            output elements only), so the thread count does not enter.
#   p = 1:   |x| summed left to right;  p = inf: max |x| (exact: any order);  other p: |x|^p
#            summed left to right, then ^(1/p). These go through binary_kernel_reduce, which sums
#            strictly left to right up to at::internal::GRAIN_SIZE = 32768 elements and beyond
#            that splits the sum across torch's threads (measured: 100000 elements, 2 threads,
#            p = 1 and 3 differ on one random vector; 1 thread, equal). refnet does not model that split.
#
# Which p = 2 kernel runs. lanes = Vectorized<double>::size() of the compiled kernel: 4 with
# 256-bit vectors. torch registers this kernel with REGISTER_DISPATCH, which leaves the AVX-512
# slot empty, and DispatchStub then runs the AVX2 kernel on an AVX-512 CPU: so x86-64 torch uses
# 4 lanes on AVX2 and AVX-512 CPUs alike (measured, torch 2.13 on an AVX-512 Xeon:
# get_cpu_capability() says AVX512 and the 4-lane order matches 3000 of 3000 random vectors,
# also under ATEN_CPU_CAPABILITY=avx2 and =avx512; the 8-lane order matches 2055). The tail is
# fused in the AVX2 kernel (compiled with FMA) and not in the DEFAULT one (x86-64 without
# AVX2, or ATEN_CPU_CAPABILITY=default: 4 lanes, unfused tail, measured 3000 of 3000). 2 and 8
# lanes are the 128- and 512-bit vector widths other builds (aarch64, a kernel registered for
# AVX-512) would have; they are modeled so that the probe can name them, not measured.


class TorchCpuOrder(NamedTuple):
    """The summation order of torch's CPU float64 2-norm (see the comment above)."""
    lanes: int              # running sums of x²: Vectorized<double>::size() of the kernel
    fused_tail: bool        # the n mod lanes last squares added with a fused multiply-add


TORCH_CPU_X86_64 = TorchCpuOrder(lanes=4, fused_tail=True)     # AVX2 and AVX-512 CPUs
TORCH_CPU_LANES = (2, 4, 8)                                    # 128-, 256-, 512-bit vectors
TORCH_CPU_ORDERS = tuple(TorchCpuOrder(lanes, fused) for lanes in TORCH_CPU_LANES
                         for fused in (True, False))


def _check_order(order) -> TorchCpuOrder:
    if not (isinstance(order, tuple) and len(order) == 2 and order[0] in TORCH_CPU_LANES
            and not isinstance(order[0], bool) and isinstance(order[1], bool)):
        raise ValueError(f"clip: order must be a TorchCpuOrder(lanes, fused_tail) with lanes one "
                         f"of {list(TORCH_CPU_LANES)} and fused_tail a bool, got {order!r}")
    return TorchCpuOrder(*order)


def _fma(a: float, b: float, c: float) -> float:
    """a·b + c rounded once (math.fma arrived only in Python 3.13); finite a, b, c."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    try:
        return float(exact)              # int / int: correctly rounded, subnormals included
    except OverflowError:                # beyond the largest double: ±inf, as the FMA rounds
        return math.inf if exact > 0 else -math.inf


def torch_cpu_norm(g: np.ndarray, p: float, order: TorchCpuOrder = TORCH_CPU_X86_64) -> float:
    """``torch.linalg.vector_norm(g, p)`` of a contiguous float64 CPU tensor, bit for bit: for
    p = 2 when torch's kernel follows ``order`` (``TORCH_CPU_X86_64`` on x86-64;
    ``probe_torch_cpu_order`` tells), for p = inf always, for other p up to 32768 elements (or
    with torch on one thread)."""
    lanes, fused_tail = _check_order(order)
    a = np.asarray(g, dtype=np.float64).ravel()
    if a.size == 0:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if math.isinf(p):
            return float(np.max(np.abs(a)))
        if p == 1:
            return float(np.cumsum(np.abs(a))[-1])        # cumsum: strictly left to right
        if p == 2:
            full = a.size - a.size % lanes
            acc = np.zeros(lanes)
            if full:
                # A reduction over axis 0 of a C-contiguous array adds the rows in order.
                acc = np.add.reduce(np.square(a[:full]).reshape(-1, lanes), axis=0)
            total = float(acc[0])
            for j in range(1, lanes):
                total = total + float(acc[j])
            for x in a[full:]:
                x = float(x)
                # Fraction has no inf or NaN: where they occur the fused and the unfused sum
                # agree (inf, or NaN), so the unfused one stands in.
                fusable = fused_tail and math.isfinite(total) and math.isfinite(x)
                total = _fma(x, x, total) if fusable else total + x * x
            return math.sqrt(total)
        return float(np.cumsum(np.abs(a) ** p)[-1] ** (1.0 / p))


# The probe's two vectors. Every square in them is exact, so only the order of the additions
# (and the one FMA) shapes the result; the expected result of each order is worked out here.
#
# Lanes: one 2^27 (square 2^54, whose ulp is 4) and 4095 ones (n = 4096: no tail for any lane
# count). In lane 0 each 1 added to 2^54 is below half an ulp and is lost; every other lane
# sums its 4096/L ones exactly, and adding those sums to 2^54 is exact: the result is
# sqrt(2^54 + 4096 − 4096/L) — 2^54 + 2048, + 3072, + 3584 under the root for L = 2, 4, 8,
# square roots 2^27·(1 + 2^-45·k) apart by hundreds of ulps.
LANE_PROBE = np.concatenate([[2.0 ** 27], np.ones(4095)])


def tail_probe(lanes: int) -> np.ndarray:
    """[1, 2^-26, 0, ..., 0 | 1 + 2^-27]: `lanes` elements, then a tail of one.

    The lanes sum to t = 1 + 2^-52 exactly. The tail's x² = 1 + 2^-26 + 2^-54 rounds to 1 + 2^-26,
    and t + that = 2 + 2^-26 + 2^-52 lies exactly halfway between two doubles (the ulp in [2, 4)
    is 2^-51): unfused, the tie goes to the even 2 + 2^-26; fused, the 2^-54 breaks the tie and
    the sum is 2 + 2^-26 + 2^-51. Their square roots differ by an ulp (math.sqrt is correctly
    rounded; ``tests/test_clip_optim.py`` checks that every modeled order gives its own answer)."""
    return np.concatenate([[1.0, 2.0 ** -26], np.zeros(lanes - 2), [1.0 + 2.0 ** -27]])


def probe_torch_cpu_order(norm2) -> TorchCpuOrder:
    """The ``TorchCpuOrder`` that an implementation of the float64 2-norm follows, from its
    results on ``LANE_PROBE`` and ``tail_probe(lanes)``: ``norm2`` maps a 1-D float64 array to
    a float, e.g. ``lambda x: torch.linalg.vector_norm(torch.tensor(x)).item()`` (refnet does
    not import torch). Raises ValueError naming what was found when no modeled order gives the
    same results — torch then sums in an order refnet does not reproduce. The answer is a
    property of the installed torch on this machine: call this once and keep it."""
    got = float(norm2(LANE_PROBE.copy()))
    lanes = [n for n in TORCH_CPU_LANES
             if torch_cpu_norm(LANE_PROBE, 2, TorchCpuOrder(n, True)) == got]
    if len(lanes) != 1:
        raise ValueError(f"clip: the 2-norm probed sums in an order refnet does not model: on "
                         f"LANE_PROBE it gives {got!r}, {lanes or 'no'} lane count(s) of "
                         f"{list(TORCH_CPU_LANES)} give that")
    probe = tail_probe(lanes[0])
    got = float(norm2(probe.copy()))
    fused = [f for f in (True, False)
             if torch_cpu_norm(probe, 2, TorchCpuOrder(lanes[0], f)) == got]
    if len(fused) != 1:
        raise ValueError(f"clip: the 2-norm probed sums {lanes[0]} lanes, but its tail neither "
                         f"as refnet's fused nor as its unfused order: tail_probe({lanes[0]}) "
                         f"gives {got!r}")
    return TorchCpuOrder(lanes[0], fused[0])


def total_norm(grads: Grads, norm_type=2.0, reduction: str = "exact",
               order: TorchCpuOrder = TORCH_CPU_X86_64) -> float:
    """The norm of the vector of per-tensor norms (torch's definition of the global norm).

    ``reduction="exact"``: every norm within an ulp of the exact one (``tensor_norm``);
    ``"torch_cpu"``: torch's CPU summation order (``torch_cpu_norm`` with ``order``), so that
    clipping equals ``clip_grad_norm_`` bit for bit (``order`` is ignored for ``"exact"``)."""
    p = _check_norm_type(norm_type)
    if reduction == "exact":
        norm = lambda v: tensor_norm(v, p)                      # noqa: E731
    elif reduction == "torch_cpu":
        order = _check_order(order)
        norm = lambda v: torch_cpu_norm(v, p, order)            # noqa: E731
    else:
        raise ValueError(f"clip: reduction must be 'exact' or 'torch_cpu', got {reduction!r}")
    norms = np.array([norm(g) for g in grads.values()])
    return norm(norms)


def kink_signature(grads: Grads, max_norm=None, clip_value=None, norm_type=2.0) -> tuple:
    """Which side of each clipping threshold ``grads`` lie on — the kinks of clipping, in the
    form the verifier compares (``refnet.verification``: two points with equal signatures lie on the
    same smooth piece). By norm: (N > max_norm,) with N the total norm (torch scales whenever
    max_norm/(N + 1e-6) < 1, i.e. N > max_norm − 1e-6: that is the kink); by value: |g| > c per
    element. A finite difference of anything computed from clipped gradients whose ±h points
    have different signatures straddles a kink and must not be compared."""
    sig = []
    if max_norm is not None:
        max_norm = _check_threshold("max_norm", max_norm)
        sig.append(np.array([total_norm(grads, norm_type) + TORCH_CLIP_EPS > max_norm]))
    if clip_value is not None:
        c = _check_threshold("clip_value", clip_value)
        sig += [np.abs(np.asarray(g, dtype=np.float64)) > c for g in grads.values()]
    return tuple(sig)


def clip_grad_value(grads: Grads, clip_value) -> Grads:
    """clamp every element to [−c, c] (NaN stays NaN, as torch.clamp)."""
    c = _check_threshold("clip_value", clip_value)
    return {k: np.clip(np.asarray(g, dtype=np.float64), -c, c) for k, g in grads.items()}


def scale_by_norm(grads: Grads, norm: float, max_norm: float) -> Grads:
    """g · clamp(max_norm / (norm + 1e-6), max=1): torch's clipping step for a given norm."""
    coef = min(max_norm / (norm + TORCH_CLIP_EPS), 1.0) if not math.isnan(norm) else math.nan
    # A non-finite norm gives coefficient 0 or NaN and inf·0 = NaN, as in torch: deliberate.
    with np.errstate(invalid="ignore"):
        return {k: np.asarray(g, dtype=np.float64) * coef for k, g in grads.items()}


def clip_grad_norm(grads: Grads, max_norm, norm_type=2.0, error_if_nonfinite: bool = False,
                   reduction: str = "exact",
                   order: TorchCpuOrder = TORCH_CPU_X86_64) -> Tuple[Grads, float]:
    """Scale all gradients together so that their global norm is at most ``max_norm``.

    Returns (clipped gradients, the total norm *before* clipping). ``reduction``/``order``: see
    ``total_norm`` (``"torch_cpu"`` reproduces torch's clip_grad_norm_ bit for bit)."""
    max_norm = _check_threshold("max_norm", max_norm)
    norm = total_norm(grads, norm_type, reduction, order)
    if error_if_nonfinite and not math.isfinite(norm):
        raise ValueError(f"clip: the total norm of order {norm_type} of the gradients is "
                         f"{norm}, so clipping is undefined (error_if_nonfinite=True)")
    return scale_by_norm(grads, norm, max_norm), norm


def clip_grad_norm_per_tensor(grads: Grads, max_norm, norm_type=2.0) -> Tuple[Grads, Dict[str, float]]:
    """Each tensor clipped against its own norm; returns (clipped, norms before clipping)."""
    max_norm = _check_threshold("max_norm", max_norm)
    p = _check_norm_type(norm_type)
    norms = {k: tensor_norm(g, p) for k, g in grads.items()}
    clipped = {k: scale_by_norm({k: g}, norms[k], max_norm)[k] for k, g in grads.items()}
    return clipped, norms


def normalize_grads(grads: Grads, norm_type=2.0) -> Tuple[Grads, float]:
    """g / ‖g‖ over all tensors (a zero gradient stays zero); returns (normalized, norm)."""
    norm = total_norm(grads, norm_type)
    if norm == 0:
        return {k: np.zeros_like(np.asarray(g, dtype=np.float64)) for k, g in grads.items()}, 0.0
    return {k: np.asarray(g, dtype=np.float64) / norm for k, g in grads.items()}, norm
