"""Certified gradients: every gradient element enclosed in an interval proven to contain the
exact derivative (``refnet verify --certify``).

The analytic backward runs in interval arithmetic (``refnet.numerics.interval``, outward rounding at
``prec`` bits). Each enclosure is then compared, exactly (as rationals), with

- the high-precision reference (mp at ``dps`` digits, chosen well above the interval precision so
  that its own rounding cannot matter): it must lie inside — otherwise the formulas or the
  arithmetic are wrong, and certification **fails**;
- the float64 gradient: inside the enclosure (rare: it is rounded), and within its own error
  bound of the enclosure (the verifier's min(e, 8σ)).

Inputs and parameters enter as boxes of relative radius 2⁻¹²⁰ (plus 2⁻¹⁴⁰), so the enclosures
hold for every point of the box, the given one included, and a comparison that a perturbation
could flip cannot be decided. Where that happens (an interval straddling a kink: a ReLU input
containing 0, a max-pool window whose top two overlap), no single derivative exists to enclose:
the report says **not certifiable** and where, instead of passing or failing. An exact tie of
identical values (max-pool over zeros from relu's flat side) is stable under perturbation: the
first-maximum convention decides it, as everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional

import numpy as np

from ..layers.base import ForwardState
from ..model import Model
from ..numerics.backend import FLOAT64, MPBackend, fraction_of
from ..numerics.errorbound import BOUND, LAMBDA
from ..numerics.interval import IntervalBackend

INFLATE_RELATIVE = 2.0 ** -120       # the box around each input and parameter: r = 2⁻¹²⁰|x| +
INFLATE_ABSOLUTE = 2.0 ** -140       # 2⁻¹⁴⁰ (small against the 1e-25 widths asked of a certificate)


def _endpoints(v):
    lo, hi = v._mpi_
    return fraction_of(lo), fraction_of(hi)


@dataclass
class CertifiedTensor:
    name: str
    shape: List[int]
    numel: int
    max_width: float                  # the widest enclosure
    max_relative_width: float         # width / |midpoint|, worst element (inf at 0)
    reference_outside: int            # enclosures that exclude the mp reference (must be 0)
    float64_inside: int               # float64 values inside their enclosure
    float64_within_bound: int         # float64 values within min(e, 8σ) of the enclosure
    intervals: List[List[str]] = field(default_factory=list)   # [lo, hi], 20 digits


@dataclass
class Certificate:
    certified: bool                   # every enclosure valid and no kink straddled
    failed: bool                      # some enclosure excludes the reference
    straddles: Dict[str, int]         # layer -> undecidable comparisons
    prec: int
    dps: int
    loss: List[str]
    tensors: List[CertifiedTensor]

    @property
    def status(self) -> str:
        if self.failed:
            return "FAILED: an enclosure excludes the high-precision reference"
        if self.straddles:
            where = ", ".join(f"{k}: {v}" for k, v in self.straddles.items())
            return f"not certifiable: the input straddles a kink ({where} undecidable comparisons)"
        return "certified"


def certify(model: Model, params=None, x=None, y=None, *, prec: int = 150,
            dps: Optional[int] = None, train: Optional[bool] = None) -> Certificate:
    """Enclose every gradient of ``model`` at (params, x, y); see the module docstring."""
    params, x, y = model.prepare(params, x, y)
    dps = int(prec * math.log10(2)) + 25 if dps is None else dps
    first = model.default_state(train)
    g64 = model.loss_and_grads(FLOAT64, params, x, y, first)
    replay = lambda: ForwardState(train=first.train, rng=None, masks=first.masks)  # noqa: E731
    ib = IntervalBackend(prec)
    # Inputs and parameters enter as tiny boxes, so that a comparison a perturbation could flip
    # (an input exactly on a kink) shows up as undecidable; the enclosures then hold for the
    # whole box, the exact point included.
    boxed = {k: ib.inflate(v, INFLATE_RELATIVE, INFLATE_ABSOLUTE) for k, v in params.items()}
    gi = model.loss_and_grads(ib, boxed, ib.inflate(x, INFLATE_RELATIVE, INFLATE_ABSOLUTE), y,
                              replay())
    # The kinks: every layer's kink signature, evaluated on the interval run's caches.
    ib.recording = True
    for layer, cache in zip(model.layers, gi.forward.caches):
        with ib.inside(layer):
            layer.kink_signature(cache)
    ib.outside = f"the loss ({model.loss.type})"              # l1's d = 0, huber's |d| = δ, …
    model.loss.kink_signature(gi.forward.loss_cache)
    ib.recording = False
    mp = MPBackend(dps)
    gm = model.loss_and_grads(mp, params, x, y, replay())
    gb = model.loss_and_grads(BOUND, params, x, y, replay())
    tensors = []
    failed = False
    for name in list(model.param_shapes()) + ["x"]:
        pick = (lambda g: g.params[name]) if name != "x" else (lambda g: g.x)
        enclosure = np.asarray(pick(gi), dtype=object)
        reference = np.asarray(pick(gm), dtype=object)
        f64 = np.asarray(pick(g64), dtype=np.float64)
        bound_arr = pick(gb)
        bound = np.minimum(bound_arr.e, bound_arr.probabilistic_bound(LAMBDA))
        outside = inside = within = 0
        widths, rel = [], []
        shown = []
        for v, r, f, b in zip(enclosure.ravel(), reference.ravel(), f64.ravel(), bound.ravel()):
            lo, hi = _endpoints(v)
            ref = fraction_of(r)
            outside += not (lo <= ref <= hi)
            ff = Fraction(float(f))
            inside += lo <= ff <= hi
            slack = Fraction(float(b)) if math.isfinite(b) else None
            within += slack is None or (lo - slack <= ff <= hi + slack)
            width = hi - lo
            widths.append(float(width))
            mid = abs(lo + hi) / 2
            rel.append(float(width / mid) if mid else (0.0 if width == 0 else math.inf))
            if len(shown) < 1000:
                shown.append([ib.ctx.nstr(ib.ctx.mpf(lo.numerator) / lo.denominator, 20),
                              ib.ctx.nstr(ib.ctx.mpf(hi.numerator) / hi.denominator, 20)])
        failed = failed or (outside > 0 and not ib.straddles)
        tensors.append(CertifiedTensor(name, list(f64.shape), int(f64.size),
                                       max(widths) if widths else 0.0,
                                       max(rel) if rel else 0.0, outside, inside, within, shown))
    lo, hi = _endpoints(np.asarray(gi.loss, dtype=object)[()])     # a sum may be 0-d
    loss = [str(float(lo)), str(float(hi))]
    return Certificate(not failed and not ib.straddles, failed, dict(ib.straddles), prec, dps,
                       loss, tensors)


def format_certificate(c: Certificate) -> str:
    lines = [f"certified gradients: interval arithmetic at {c.prec} bits, reference mp at "
             f"{c.dps} digits; loss in [{c.loss[0]}, {c.loss[1]}]", "",
             f"{'tensor':<14} {'numel':>6} {'max width':>10} {'rel width':>10} "
             f"{'ref outside':>11} {'f64 inside':>10} {'f64 in bound':>12}"]
    for t in c.tensors:
        lines.append(f"{t.name:<14} {t.numel:>6} {t.max_width:>10.2e} {t.max_relative_width:>10.2e} "
                     f"{t.reference_outside:>11} {t.float64_inside:>10} "
                     f"{t.float64_within_bound:>12}")
    lines += ["", c.status]
    return "\n".join(lines)
